"""What an adapter directory holds, read from the config and the safetensors header only (no weights)."""

from __future__ import annotations

import os
from math import prod
from pathlib import Path

from lorakit.io.atomic import readable_directory
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, read_config_only, tensor_shapes
from lorakit.io.native import FINGERPRINT
from lorakit.io.peft_embedding import BASE_COPY, EMBEDDING_KEYS, LINEAR_KEYS


def read_adapter_info(path: str | os.PathLike) -> dict:
    """Method, rank, modules, trained numbers, file sizes and base model of the adapter at `path`."""
    path = Path(path)
    config = read_config_only(path)
    shapes = tensor_shapes(path / WEIGHTS_NAME)
    source = readable_directory(path)  # (the old copy, if a crash interrupted a swap without rename-exchange)
    file_bytes = {f: (source / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME)}
    file_bytes["total"] = sum(file_bytes.values())
    if "lorakit_method" in config:
        settings = config.get("config") or {}
        trained = {k: v for k, v in shapes.items() if not k.endswith("." + FINGERPRINT)}
        info = {"format": "lorakit", "method": config["lorakit_method"], "rank": settings.get("r"),
                "alpha": settings.get("lora_alpha"), "modules": list(config.get("modules") or [])}
    else:
        trained = {k: v for k, v in shapes.items() if not k.endswith(BASE_COPY)}  # PEFT's copies of base tables
        peft_type = str(config.get("peft_type", "unknown"))
        a_keys = (LINEAR_KEYS[0], EMBEDDING_KEYS[0])
        modules = sorted(k.removeprefix("base_model.model.").removesuffix(next(a for a in a_keys if k.endswith(a)))
                         for k in shapes if k.endswith(a_keys))
        method = ("dora" if config.get("use_dora") else "lora") if peft_type == "LORA" else peft_type.lower()
        info = {"format": "peft", "method": method,
                "rank": config.get("r"), "alpha": config.get("lora_alpha"), "modules": modules}
    dtypes = sorted({dtype for _, dtype in trained.values()})
    info.update({"path": str(path), "num_modules": len(info["modules"]),
                 "trainable_numbers": sum(prod(shape) for shape, _ in trained.values()),
                 "file_bytes": file_bytes, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                 "base_model": config.get("base_model_name_or_path"), "config": config})
    return info
