"""`TrainConfig`: every setting of a training run, from flags, a TOML/YAML file or Python."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorakit.config import CONFIG_CLASSES, AdapterConfig, config_from_dict
from lorakit.train.data_sources import describe, is_hf_dataset
from lorakit.train.errors import TrainConfigError

SCHEDULES = ("constant", "linear", "cosine")
BAD_LINE_POLICIES = ("stop", "skip")
OPTIMIZERS = ("adamw", "adamw8bit")  # lorakit.train.optim builds them
QUANTIZE = ("nf4", "fp4")  # 4-bit bases (QLoRA) made by lorakit.model.quantize.quantize
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
REPORT_TO = ("tensorboard", "wandb")  # lorakit.train.logging_backends; the CSV log and PNG plot always stay


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Paths are stored as strings so the config round-trips through JSON."""

    base: str  # embedded model name (smollm2-135m, minilm-l6), local HF directory or hub id
    data: Any  # training data: a JSONL/JSON/CSV/parquet/Arrow file, a save_to_disk directory, a datasets.Dataset
    output_dir: str  # where the adapter, checkpoints, logs and plot go
    eval_data: Any = None  # optional data for the eval loss (any form `data` takes)
    method: str = "lora"  # lora | lora_xs | vera | prefix
    adapter: dict[str, Any] = field(default_factory=dict)  # method settings: r, lora_alpha, target_modules...
    adapter_name: str = "default"  # name of the trained adapter
    steps: int | None = None  # optimiser steps; None: derived from epochs
    epochs: float | None = None  # passes over the data when steps is None (default 1)
    batch_size: int = 8  # global micro-batch (split over processes); a step sees batch_size × grad_accum
    grad_accum: int = 1  # micro-batches per optimiser step: K of B equal one step of K·B
    packing: bool = False  # causal LM: several examples per row up to max_length, position ids reset per example
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward (less activation memory)
    quantize: str | None = None  # nf4 | fp4: a 4-bit base (QLoRA); None keeps the base in `dtype`
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit AdamW)
    fsdp: bool = False  # under torchrun: shard the base per decoder layer (FSDP2 fully_shard) instead of DDP
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    schedule: str = "linear"  # constant | linear | cosine decay after warm-up
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    max_grad_norm: float = 1.0  # gradient clipping (0 disables it)
    max_length: int | None = None  # truncate longer sequences (default: the model's context length)
    eval_every: int = 0  # eval loss every N steps (0: only at the end, if eval_data is set)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 1  # write a log row every N steps
    seed: int = 0  # seeds the data order, the adapter init and dropout
    on_bad_line: str = "stop"  # stop | skip malformed rows
    last_turn_only: bool = False  # chats: loss on the last assistant turn only (default: every assistant turn)
    labels: tuple[str, ...] | None = None  # classification: label names in head order (default: from data)
    dtype: str = "float32"  # base dtype (float32 | bfloat16 | float16); adapters stay float32 on a 16-bit base
    device: str = "cpu"  # cpu | cuda (under torchrun: cuda:LOCAL_RANK, NCCL)
    report_to: tuple[str, ...] = ()  # extra loggers: tensorboard, wandb (offline unless WANDB_MODE says otherwise)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in ("base", "data", "output_dir"):
            if name == "data" and is_hf_dataset(self.data):
                continue
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TrainConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.method not in CONFIG_CLASSES:
            raise TrainConfigError(f"method must be one of {sorted(CONFIG_CLASSES)}, got {self.method!r}")
        self.adapter_config()  # validates the method settings
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise TrainConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainConfigError(f"epochs must be > 0, got {self.epochs!r}")
        for name in ("batch_size", "log_every", "keep_checkpoints", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise TrainConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise TrainConfigError(f"need lr > 0, weight_decay >= 0, max_grad_norm >= 0; got {self.lr!r}, "
                                   f"{self.weight_decay!r}, {self.max_grad_norm!r}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.eval_data is not None and not (is_hf_dataset(self.eval_data) or
                                               (isinstance(self.eval_data, str) and self.eval_data)):
            raise TrainConfigError(f"eval_data must be a path or a datasets.Dataset, got {self.eval_data!r}")
        if not isinstance(self.last_turn_only, bool):
            raise TrainConfigError(f"last_turn_only must be true or false, got {self.last_turn_only!r}")
        if self.on_bad_line not in BAD_LINE_POLICIES:
            raise TrainConfigError(f"on_bad_line must be one of {BAD_LINE_POLICIES}, got {self.on_bad_line!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise TrainConfigError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self._check_choices()
        if self.labels is not None:
            labels = tuple(str(x) for x in self.labels)
            if len(set(labels)) != len(labels) or len(labels) < 2:
                raise TrainConfigError(f"labels must be at least 2 distinct names, got {self.labels!r}")
            object.__setattr__(self, "labels", labels)

    def _check_choices(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("device", DEVICES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise TrainConfigError(f"quantize must be one of {QUANTIZE} or None, got {self.quantize!r}")
        for name in ("packing", "gradient_checkpointing", "fsdp", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TrainConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        report = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to or ())
        unknown = [r for r in report if r not in REPORT_TO]
        if unknown:
            raise TrainConfigError(f"report_to must list some of {REPORT_TO}, got {list(report)!r}")
        object.__setattr__(self, "report_to", report)
        if self.packing and self.method == "prefix":
            raise TrainConfigError("packing cannot be used with the prefix method: the prefix hook shifts each "
                                   "row's position ids past its prefix, which would hide the packed examples' "
                                   "boundaries (set packing = false)")

    def adapter_config(self) -> AdapterConfig:
        try:
            return config_from_dict({"method": self.method, **self.adapter})
        except (TypeError, ValueError) as exc:
            raise TrainConfigError(f"adapter settings {self.adapter!r} for {self.method}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["adapter"] = dict(self.adapter)
        data["data"] = describe(self.data)  # a Dataset is recorded by content fingerprint: resume checks it
        data["eval_data"] = describe(self.eval_data) if self.eval_data is not None else None
        data["betas"] = list(self.betas)
        data["labels"] = list(self.labels) if self.labels is not None else None
        data["report_to"] = list(self.report_to)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a .toml, .yaml/.yml or .json file; keyword overrides (e.g. from flags) win."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TrainConfigError(f"cannot read config file {path}: {exc}") from None
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise TrainConfigError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
        except (tomllib.TOMLDecodeError, ValueError) as exc:
            if isinstance(exc, TrainConfigError):
                raise
            raise TrainConfigError(f"{path}: cannot parse: {exc}") from None
        except Exception as exc:  # yaml.YAMLError
            raise TrainConfigError(f"{path}: cannot parse: {exc}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)
