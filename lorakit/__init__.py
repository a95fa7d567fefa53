"""lorakit: parameter-efficient fine-tuning and many-adapter serving over one frozen base model."""

from lorakit.versions import LORAKIT_VERSION, check_core_versions

check_core_versions()  # before anything reaches into torch's or transformers' internals

from lorakit.adapters import (adapter_config, adapter_names, adapter_parameters, adapter_state_dict,
                              count_trainable, delete_adapter, set_trainable)
from lorakit.attach import attach, find_targets
from lorakit.combine import combine
from lorakit.compiled import CompiledForward
from lorakit.generation import generate
from lorakit.config import LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig
from lorakit.errors import *  # noqa: F401,F403 - the exception classes are part of the API
from lorakit.embedding_layer import AdaptedEmbedding
from lorakit.layer import AdaptedLinear, adapted_layers
from lorakit.merge import merge, merge_and_unload, merged_names, swap_merged, unmerge
from lorakit.quant_model import quantize
from lorakit.tied import untie
from lorakit.routing import (Route, checkpoint_with_route, disable_adapters, route_context, use_adapter,
                             use_route)

__version__ = LORAKIT_VERSION

__all__ = [
    "AdaptedEmbedding", "AdaptedLinear", "CompiledForward", "LoraConfig", "LoraXSConfig", "VeraConfig", "adapted_layers", "adapter_config",
    "checkpoint_with_route", "combine", "route_context",
    "adapter_names", "adapter_parameters", "adapter_state_dict", "attach", "count_trainable",
    "delete_adapter", "disable_adapters", "find_targets", "generate", "merge", "merge_and_unload", "merged_names", "PrefixConfig",
    "quantize", "set_trainable", "untie",
    "Route", "swap_merged", "unmerge", "use_adapter", "use_route",
]
