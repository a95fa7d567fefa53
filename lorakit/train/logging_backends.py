"""Where training metrics go besides metrics.csv/json and loss.png: TensorBoard and W&B, one table.

    report_to = ["tensorboard"]   <output_dir>/tensorboard/events.out.tfevents.*  (tensorboard --logdir)
    report_to = ["wandb"]         a W&B run under <output_dir>/wandb, offline unless WANDB_MODE is set

Each backend gets the same scalars the CSV log gets (train/loss, train/lr, train/tokens_per_s,
eval/loss), keyed by optimiser step. On resume TensorBoard purges events past the resumed step, so a
run's curves never hold the steps it redid twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lorakit.train.errors import TrainConfigError

SCALARS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}
TENSORBOARD_DIR = "tensorboard"


class Backend(Protocol):
    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    """Event files written by torch.utils.tensorboard's SummaryWriter (needs the `tensorboard` package)."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any], start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrainConfigError(f"report_to tensorboard needs the tensorboard package: {exc}") from None
        self.writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()), 0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(SCALARS[key], value, step)

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A W&B run; offline by default (WANDB_MODE=online to sync), files under <output_dir>/wandb."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any], start_step: int) -> None:
        try:
            import wandb
        except ImportError:
            raise TrainConfigError("report_to wandb needs the wandb package (pip install wandb); it is not "
                                   "installed") from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), dir=str(output_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=dict(config),
                              name=output_dir.name, resume="allow" if start_step else None)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        # not committed yet: an eval loss of the same step may follow; the next step (or close) commits it
        self.run.log({SCALARS[k]: v for k, v in values.items()}, step=step, commit=False)

    def close(self) -> None:
        self.run.log({}, commit=True)  # the last step's row
        self.run.finish()


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend}


class Reporters:
    """The run's backends; `scalars` drops None values and passes the rest to every backend."""

    def __init__(self, names: Sequence[str], output_dir: Path, config: Mapping[str, Any], start_step: int) -> None:
        unknown = [n for n in names if n not in BACKENDS]
        if unknown:
            raise TrainConfigError(f"report_to: unknown backend(s) {unknown}; known: {sorted(BACKENDS)}")
        self.backends: list[Backend] = [BACKENDS[n](output_dir, config, start_step) for n in names]

    def scalars(self, step: int, **values: float | None) -> None:
        kept = {k: float(v) for k, v in values.items() if v is not None}
        for backend in self.backends:
            backend.scalars(step, kept)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
