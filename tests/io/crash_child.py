"""Crash points, run in a child process by tests/io/test_faults.py: `python -m tests.io.crash_child ROOT`.

For each scenario (a save over an existing version) and each N = 1, 2, ...: a forked process patches the
file-system calls the save makes (mkdir, write, fsync, rename, replace, unlink, rmdir, the rename-exchange)
and exits at once (os._exit, no cleanup, like SIGKILL) before the Nth one; the parent then reads what is on
disk, as the next process would. N grows until a save runs to the end. One JSON line per scenario on stdout.
Deterministic: the same calls in the same order on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import lorakit
import lorakit.atomic_write as atomic_write
import lorakit.io.atomic as atomic
import lorakit.train.checkpoint as ckpt
import lorakit.train.trainer as trainer
from lorakit.config import LoraConfig
from lorakit.io import load_adapter, save_adapter
from lorakit.train.config import TrainConfig
from tests.conftest import tiny_llama

KILLED = 77
ADAPTER_TARGETS = ("q_proj", "v_proj")


class Points:
    """Counts the patched calls of one forked save and exits before call number `crash_at`."""

    def __init__(self, crash_at: int) -> None:
        self.crash_at, self.seen = crash_at, 0

    def hit(self) -> None:
        self.seen += 1
        if self.seen == self.crash_at:
            os._exit(KILLED)

    def wrap(self, fn: Callable) -> Callable:
        def patched(*args, **kwargs):
            self.hit()
            return fn(*args, **kwargs)
        return patched


def install(points: Points, exchange: bool) -> None:
    """Patch the calls saves make; `exchange=False` is a system without renameat2(RENAME_EXCHANGE)."""
    for name in ("mkdir", "rename", "replace", "fsync", "unlink", "rmdir"):
        setattr(os, name, points.wrap(getattr(os, name)))
    real_exchange = atomic.rename_exchange
    atomic.rename_exchange = points.wrap(real_exchange if exchange else (lambda a, b: False))

    def write_in_two_halves(path: Path, data: bytes) -> None:  # a crash may leave half a file
        with open(path, "wb") as handle:
            points.hit()
            handle.write(data[: len(data) // 2])
            handle.flush()
            points.hit()
            handle.write(data[len(data) // 2:])
            handle.flush()
            os.fsync(handle.fileno())
    atomic_write.write_durable = write_in_two_halves  # the fault injection's seam: every atomic write uses it
    ckpt._write = write_in_two_halves  # noqa: SLF001


def model_with(seed: int) -> torch.nn.Module:
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2, target_modules=ADAPTER_TARGETS), "a")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    return model


def adapter_value(path: Path) -> float:
    model = tiny_llama()
    load_adapter(model, path, "a")
    return float(next(p for n, p in model.named_parameters() if "lora_B" in n).detach().sum())


def temporaries(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if atomic.is_temp_name(n)) if directory.is_dir() else []


def sweep_then_check(directory: Path, write_again: Callable[[], None], read: Callable[[], object]) -> dict:
    """Age the leftovers past the sweep's threshold, write once more: the leftovers must be gone."""
    for name in temporaries(directory):
        os.utime(directory / name, (1, 1), follow_symlinks=False)
    write_again()
    return {"left": temporaries(directory), "reads": read()}


def scenario_adapter(exchange: bool, writer: str) -> dict:
    old, new = model_with(1), model_with(2)
    values = {"old": adapter_value_of(old), "new": adapter_value_of(new)}

    def save(model, path):
        if writer == "save_adapter":
            save_adapter(model, "a", path)
        else:  # the trainer's final adapter write
            trainer.write_adapter(model, "a", path, {}, None)

    def setup(d: Path) -> None:
        save(old, d / "adapter")

    def act(d: Path) -> None:
        save(new, d / "adapter")

    def read(d: Path) -> str:
        try:
            value = adapter_value(d / "adapter")
        except Exception as exc:  # noqa: BLE001 - reported
            return f"none: {type(exc).__name__}: {exc}"
        return next((k for k, v in values.items() if v == value), f"other: {value}")

    return run_points(setup, act, read, exchange, lambda d: sweep_then_check(d, lambda: act(d), lambda: read(d)))


def adapter_value_of(model: torch.nn.Module) -> float:
    return float(next(p for n, p in model.named_parameters() if "lora_B" in n).detach().sum())


def scenario_checkpoint(exchange: bool) -> dict:
    """Re-saving the step a resumed run starts from, with --keep-checkpoints 1."""
    params = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([params], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(d: Path, value: float) -> None:
        ckpt.save_checkpoint(d / "checkpoints", 5, {"w": torch.full((3,), value)}, optimizer, scheduler,
                             {"tokens": 0, "elapsed_s": 0.0, "log": []}, keep=1)

    def read(d: Path) -> str:
        latest = ckpt.latest_checkpoint(d / "checkpoints")
        if latest is None:
            return "none: no checkpoint"
        try:
            tensors, _ = ckpt.read_checkpoint(latest)
        except Exception as exc:  # noqa: BLE001 - reported
            return f"none: {type(exc).__name__}: {exc}"
        return {1.0: "old", 2.0: "new"}.get(float(tensors["param/w"][0]), "other")

    return run_points(lambda d: save(d, 1.0), lambda d: save(d, 2.0), read, exchange,
                      lambda d: sweep_then_check(d / "checkpoints", lambda: save(d, 2.0), lambda: read(d)))


def scenario_run_config(exchange: bool) -> dict:
    """The first run_config.json write of a run: afterwards the directory must be resumable or fresh."""
    def config(d: Path) -> TrainConfig:
        return TrainConfig(base="tiny", data="data.jsonl", output_dir=str(d / "out"))

    def setup(d: Path) -> None:
        (d / "out").mkdir()

    def act(d: Path) -> None:
        atomic.atomic_write_json(d / "out" / trainer.RUN_FILE, config(d).to_dict())

    def read(d: Path) -> str:
        try:
            found = trainer._check_output_dir(d / "out", config(d), resume=True)  # noqa: SLF001 - what resume does
        except Exception as exc:  # noqa: BLE001 - reported
            return f"none: {type(exc).__name__}: {exc}"
        state = "new" if (d / "out" / trainer.RUN_FILE).exists() else "old"
        return state if found is None else "other"

    return run_points(setup, act, read, exchange, lambda d: sweep_then_check(d / "out", lambda: act(d), lambda: read(d)))


def run_points(setup, act, read, exchange: bool, again) -> dict:
    """Kill `act` before each of its calls in turn; after each kill record what `read` finds and what is
    left over, then what remains once the next write (`again`) swept the aged leftovers."""
    outcomes: list[str] = []
    leftovers: list[list[str]] = []
    after_sweep: list[dict] = []
    n = 1
    while n < 500:
        d = ROOT / f"case-{len(os.listdir(ROOT))}"
        d.mkdir()
        setup(d)
        pid = os.fork()
        if pid == 0:  # the save that is killed
            try:
                install(Points(n), exchange)
                act(d)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == KILLED
        outcomes.append(read(d))
        leftovers.append(sorted({*temporaries(d / "adapter"), *temporaries(d), *temporaries(d / "checkpoints"),
                                 *temporaries(d / "out")}))
        after_sweep.append(again(d))
        shutil.rmtree(d)
        if not killed:
            return {"points": n - 1, "outcomes": outcomes, "leftovers": leftovers, "after_sweep": after_sweep}
        n += 1
    raise RuntimeError("a save that never ends")


def main() -> None:
    torch.set_num_threads(1)  # no worker threads: forking stays safe
    scenarios = {
        "save_adapter, rename-exchange": lambda: scenario_adapter(True, "save_adapter"),
        "save_adapter, two renames": lambda: scenario_adapter(False, "save_adapter"),
        "trainer adapter, rename-exchange": lambda: scenario_adapter(True, "trainer"),
        "trainer adapter, two renames": lambda: scenario_adapter(False, "trainer"),
        "checkpoint re-save, rename-exchange": lambda: scenario_checkpoint(True),
        "checkpoint re-save, two renames": lambda: scenario_checkpoint(False),
        "first run_config.json": lambda: scenario_run_config(True),
    }
    for name, run in scenarios.items():
        print(json.dumps({"scenario": name, **run()}), flush=True)


if __name__ == "__main__":
    ROOT = Path(sys.argv[1])
    main()
