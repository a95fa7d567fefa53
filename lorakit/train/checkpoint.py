"""Checkpoints that resume exactly: trained tensors, AdamW state, scheduler, RNG and step.

    <output_dir>/checkpoints/step-000120/
        state.safetensors   param/<name>  trained parameters (adapter + classifier head)
                            optim/<i>/<key>  AdamW moments and step counts
                            rng/torch     torch's CPU generator state
        state.json          step, scheduler state, optimiser hyper-parameters, log rows, run config

Safetensors for tensors, JSON for the rest: nothing is ever unpickled. A checkpoint directory is
built under a temp name and renamed into place, so a crash leaves either the whole thing or nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lorakit.io.atomic import fsync_dir, json_bytes, tensors_bytes
from lorakit.train.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
CHECKPOINTS_DIR = "checkpoints"  # under a run's output directory


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(root: str | Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` (the checkpoints directory) and prune to the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{k}": v for k, v in params.items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for index, slot in opt["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value
            else:
                opt_scalars.setdefault(str(index), {})[key] = value
    tensors["rng/torch"] = torch.get_rng_state()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"step": step, "scheduler": sched, "param_groups": opt["param_groups"], "optim_scalars": opt_scalars,
            **state}
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write(tmp / "state.safetensors", tensors_bytes(tensors))
        _write(tmp / "state.json", json_bytes(meta))
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()
             and (p / "state.safetensors").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def run_checkpoints(output_dir: str | Path) -> Path:
    """The checkpoints directory of the run in `output_dir` (it may not exist yet)."""
    return Path(output_dir) / CHECKPOINTS_DIR


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of one checkpoint directory."""
    path = Path(path)
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # safetensors raises SafetensorError (an Exception) on corruption
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    return tensors, meta


def restore(path: str | Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: Any) -> dict[str, Any]:
    """Load checkpoint `path` into the trained parameters, optimiser, scheduler and RNG; returns its meta."""
    tensors, meta = read_checkpoint(path)
    saved = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, extra {extra[:5]}")
    for name, param in params.items():
        if saved[name].shape != param.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the model's "
                                  f"is {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, slot = key.split("/", 2)
            state.setdefault(int(index), {})[slot] = value
    for index, scalars in meta["optim_scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng/torch"])
    return meta
