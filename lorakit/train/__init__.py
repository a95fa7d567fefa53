"""Training: data from files or a datasets.Dataset, a resumable trainer (1 process, DDP or FSDP2), checkpoints, logs, eval.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(base="smollm2-135m", data="train.jsonl", output_dir="runs/a", steps=100))
"""

from lorakit.train.config import TrainConfig
from lorakit.train.errors import (CheckpointError, DataFormatError, EmptyDatasetError, LabelMismatchError,
                                  NonFiniteLossError, RunExistsError, TrainConfigError)
from lorakit.train.trainer import TrainResult, train

__all__ = ["CheckpointError", "DataFormatError", "EmptyDatasetError", "LabelMismatchError", "NonFiniteLossError",
           "RunExistsError", "TrainConfig", "TrainConfigError", "TrainResult", "train"]
