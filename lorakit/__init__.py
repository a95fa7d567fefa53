"""lorakit: parameter-efficient fine-tuning and many-adapter serving over one frozen base model."""

from lorakit.versions import LORAKIT_VERSION, check_core_versions

check_core_versions()  # before anything reaches into torch's or transformers' internals

from lorakit.model.manage import (adapter_config, adapter_names, adapter_parameters, adapter_state_dict,
                                  count_trainable, delete_adapter, set_trainable)
from lorakit.model.attach import attach, find_targets
from lorakit.model.combine import combine
from lorakit.model.compiled import CompiledForward
from lorakit.model.generate import generate
from lorakit.config import LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig
from lorakit.errors import *  # noqa: F401,F403 - the exception classes are part of the API
from lorakit.layer.embedding import AdaptedEmbedding
from lorakit.layer.linear import AdaptedLinear, adapted_layers
from lorakit.model.merge import merge, merge_and_unload, merged_names, swap_merged, unmerge
from lorakit.model.quantize import quantize
from lorakit.model.tied import untie
from lorakit.model.use import (Route, checkpoint_with_route, disable_adapters, route_context, use_adapter,
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
