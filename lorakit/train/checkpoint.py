"""Checkpoints that resume exactly: trained tensors, AdamW state, scheduler, RNG and step.

    <output_dir>/checkpoints/step-000120/
        state.safetensors   param/<name>  trained parameters (adapter + classifier head)
                            optim/<i>/<key>  AdamW moments and step counts
                            rng/torch     torch's CPU generator state
        state.json          step, scheduler state, optimiser hyper-parameters, log rows, run config

Safetensors for tensors, JSON for the rest: nothing is ever unpickled. A checkpoint directory is
built under a temp name, made durable, and swapped into place by lorakit.io.atomic (re-saving a step
exchanges the two copies, never deletes the old one first), so a crash leaves the old checkpoint or the
new one, never none. Files are read through lorakit.io.safe_open: a FIFO, a device or a symlink loop in
a checkpoint is a CheckpointError naming it, never a hang. A full disk is a WriteError naming the
directory, the previous checkpoints intact.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from lorakit.io.atomic import (TEMP_NAME, fsync_dir, json_bytes, replace_directory, reporting_write_errors,
                               sweep_stale, temp_path, tensors_bytes)
from lorakit.io.safe_open import parse_json_object, read_bounded, read_safetensors_bytes
from lorakit.train.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
CHECKPOINTS_DIR = "checkpoints"  # under a run's output directory
_MAX_STATE_JSON = 256 << 20  # state.json carries the log rows of a long run: bounded, but generously


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(root: str | Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` (the checkpoints directory) and prune to the newest `keep`."""
    root = Path(root)
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
    with reporting_write_errors(final):
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root)
        tmp = temp_path(final)
        tmp.mkdir()
        try:
            _write(tmp / "state.safetensors", tensors_bytes(tensors))
            _write(tmp / "state.json", json_bytes(meta))
            fsync_dir(tmp)
            replace_directory(tmp, final)  # re-saving a step (after a resume): the old copy goes only now
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the new files on failure, the old step on success
        fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first.

    A step whose re-save a crash interrupted between the two renames of a swap without rename-exchange
    is the old copy moved aside (`.step-N.old-XXXXXXXX`): it is complete, and it counts."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        match = _STEP_DIR.match(p.name)
        moved = TEMP_NAME.match(p.name)
        if match is None and moved is not None and moved["kind"] == "old":
            match = _STEP_DIR.match(moved["target"])
            if match is None or (root / moved["target"]).exists():
                continue
        if match is None or not all(os.path.lexists(p / f) for f in ("state.json", "state.safetensors")):
            continue  # (a file there that is not readable is read_checkpoint's error to name, not skipped)
        step = int(match.group(1))
        if step not in found or p.name.startswith("step-"):
            found[step] = p
    return [found[step] for step in sorted(found)]


def run_checkpoints(output_dir: str | Path) -> Path:
    """The checkpoints directory of the run in `output_dir` (it may not exist yet)."""
    return Path(output_dir) / CHECKPOINTS_DIR


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of one checkpoint directory, each file read through the guarded reader."""
    path = Path(path)
    try:
        data = read_safetensors_bytes(path / "state.safetensors", error=CheckpointError)
        meta = parse_json_object(read_bounded(path / "state.json", limit=_MAX_STATE_JSON, error=CheckpointError),
                                 path / "state.json", error=CheckpointError)
        tensors = load_safetensors_bytes(data)
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: {exc.filename} is missing") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
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
