"""Base models to adapt: the embedded pretrained ones (`load_base`) and Llama shapes from configs."""

from lorakit.base_models.load import load_base

__all__ = ["load_base"]
