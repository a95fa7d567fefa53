"""The one table from a config to its method: attach, the slot kinds, the routed-delta path, io and the
command line read it, so a new method is its file and one row here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import AdapterConfig, LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig
from lorakit.errors import AdapterConfigError
from lorakit.methods.dora import DoraAdapter
from lorakit.methods.lora import LoraAdapter
from lorakit.methods.lora_embedding import EmbeddingLoraAdapter
from lorakit.methods.lora_xs import LoraXSAdapter
from lorakit.methods.vera import VeraAdapter

# (in_features, out_features, config, dtype, device, the layer's dense unmerged weight (out, in) on demand)
#   -> one layer's adapter (a methods.contract.LinearMethod)
Build = Callable[[int, int, AdapterConfig, torch.dtype, torch.device, Callable[[], torch.Tensor]], nn.Module]


@dataclass(frozen=True)
class Method:
    name: str  # the slot kind and `lorakit_method`; config.method, or a variant of it (DoRA: LoRA's use_dora)
    label: str  # how messages name it
    config: type
    build: Build | None  # None: no per-layer state (prefix tuning lives in attention, lorakit.model.prefix_hook)
    build_embedding: Build | None = None  # on an nn.Embedding target, where the method supports one
    kernel: str | None = None  # the lorakit.kernels.backend.RowKernels field its routed delta runs
    basis: str | None = None  # the frozen basis its layers share: "svd" (of W), "projections" (from a seed)
    trained: tuple[str, ...] = ()  # its parameters per layer, as native files name them
    rank_bounded: bool = False  # r may not exceed min(in, out) of a target
    reads_weight: bool = False  # built from the dense base weight (DoRA's magnitudes): float linear layers only
    rescales_output: bool = False  # scales the base output itself (DoRA): its delta runs before the others, and
    # its update is no sum of low-rank factors (so it is not combined, and merges one adapter at a time)
    variant_of: tuple[tuple[str, object], ...] = ()  # a variant's settings on its config (DoRA: use_dora=True)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LoRA", LoraConfig, lambda i, o, c, dt, dev, w: LoraAdapter(i, o, c, dt, dev),
           build_embedding=lambda i, o, c, dt, dev, w: EmbeddingLoraAdapter(i, o, c, dt, dev),
           kernel="lora_rows", trained=("lora_A", "lora_B"), rank_bounded=True),
    Method("dora", "DoRA", LoraConfig, lambda i, o, c, dt, dev, w: DoraAdapter(i, o, c, w(), dt, dev),
           kernel="lora_rows", trained=("lora_A", "lora_B", "lora_magnitude_vector"), rank_bounded=True,
           reads_weight=True, rescales_output=True, variant_of=(("use_dora", True),)),
    Method("lora_xs", "LoRA-XS", LoraXSConfig, lambda i, o, c, dt, dev, w: LoraXSAdapter(c, dt, dev),
           kernel="core_rows", basis="svd", trained=("lora_R",), rank_bounded=True),
    Method("vera", "VeRA", VeraConfig, lambda i, o, c, dt, dev, w: VeraAdapter(o, c, dt, dev),
           kernel="vera_rows", basis="projections", trained=("vera_lambda_d", "vera_lambda_b")),
    Method("prefix", "prefix tuning", PrefixConfig, None),
)}


def method_for(config: AdapterConfig) -> Method:
    """The row of `config`'s method (DoRA for a LoraConfig with use_dora); an unknown config type is refused by
    name."""
    name = getattr(config, "method", None)
    variants = [m for m in METHODS.values() if m.variant_of and m.config is type(config)
                and all(getattr(config, k, None) == v for k, v in m.variant_of)]
    method = variants[0] if variants else METHODS.get(name)
    if method is None or not isinstance(config, method.config):
        known = dict.fromkeys(m.config.__name__ for m in METHODS.values())
        raise AdapterConfigError(f"unsupported config type {type(config).__name__}; known: {', '.join(known)}")
    return method


def method_of_kind(kind: str) -> Method:
    """The method whose adapters fill slot kind `kind`: its name, or `<name>_<basis>` (methods.contract)."""
    method = METHODS.get(kind) or METHODS.get(kind.split("_")[0])
    if method is None or method.kernel is None:
        raise KeyError(f"slot kind {kind!r} belongs to no method in lorakit.methods.table")
    return method
