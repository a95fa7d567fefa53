"""Quantized bases, model-level: quantize a model in place, measure it, report what merging cost.

    quantize(model, "nf4")          nn.Linear / Conv1D ──► bnb Linear4bit, in place, keys as bitsandbytes saves them
    attach(model, LoraConfig())     Linear4bit         ──► AdaptedLinear whose `quant` is a QuantizedBase

The per-layer strategy (forward, dequantize, requantize on merge) is lorakit.layer.quantized. An adapter's
per-weight update is often far below the NF4 grid spacing, so requantizing on merge can round most of it
away; `merge_quantized` measures that (`MergeReport.effect_lost`), and
`merge_and_unload(..., full_precision=True)` is the lossless alternative.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from lorakit.errors import AdapterConfigError, QuantizationError, TargetNotFoundError
from lorakit.layer.linear import ADAPTABLE_TYPES, AdaptedLinear, adapted_layers
from lorakit.model.merge import merge
from lorakit.layer.quantized import (QUANT_TYPES, LayerMergeError, QuantizedBase, bnb, dequantize_model,
                                     is_quantized_linear, no_cpu_repacking, quiet_int8_cast_notice, storage_bytes_4bit)
from lorakit.model.use import disable_adapters, use_adapter
from lorakit.layer.surgery import replace_module, select_modules


def _float_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or a (transposed) Conv1D."""
    return module.weight.T if not isinstance(module, nn.Linear) else module.weight


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, ADAPTABLE_TYPES) and not is_quantized_linear(module)


def _select(model: nn.Module, targets: str | Iterable[str], exclude: Iterable[str]) -> list[str]:
    """The layers to quantize, by attach's own target rule (lorakit.layer.surgery.select_modules)."""
    try:
        chosen = select_modules(model, targets, exclude, _quantizable)
    except (AdapterConfigError, TargetNotFoundError) as exc:
        raise QuantizationError(str(exc)) from None
    modules = dict(model.named_modules())
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not _quantizable(modules[n])]
    if bad:
        raise QuantizationError(f"bitsandbytes cannot quantize {bad[:5]}: only nn.Linear and transformers' Conv1D "
                                "layers (not yet quantized, not yet adapted) can be")
    return chosen


def quantize(model: nn.Module, quant_type: str = "nf4", *, double_quant: bool = True,
             target_modules: str | Iterable[str] = "all-linear", exclude_modules: Iterable[str] = (),
             compute_dtype: torch.dtype = torch.float32, blocksize: int = 64, threshold: float = 0.0) -> nn.Module:
    """Replace the model's linear layers by bitsandbytes 4-bit ("nf4" / "fp4") or 8-bit ("int8") layers, in
    place, and return the model. Quantize before attaching adapters. The output head is left alone.

    double_quant quantizes the 4-bit block scales again (8-bit, blocks of 256): ~4.13 bits per weight
    instead of 4.5. compute_dtype is what 4-bit matmuls run in; threshold is LLM.int8()'s outlier threshold.
    """
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    mod = bnb()
    from bitsandbytes.functional import int8_vectorwise_quant, quantize_4bit


    if adapted_layers(model):
        raise QuantizationError("quantize the base before attaching adapters: this model already has adapted layers")
    for name in _select(model, target_modules, exclude_modules):
        old = model.get_submodule(name)
        w = _float_weight(old).detach()  # (out, in)
        out_f, in_f = w.shape
        bias = old.bias
        if quant_type == "int8":
            new = mod.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                      threshold=threshold, device="meta")
            cb, scb, _ = int8_vectorwise_quant(w.to(torch.float16).contiguous())
            new.weight = mod.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
            quiet_int8_cast_notice()
        else:
            new = mod.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                                    compress_statistics=double_quant, quant_type=quant_type, device="meta")
            data, state = quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type)
            new.weight = mod.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type=quant_type, module=new,
                                           bnb_quantized=True)
            new.quant_state = state
            no_cpu_repacking(new)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach(), requires_grad=False)
        new.train(old.training)
        replace_module(model, name, new)
        del old, w
    return model


# ------------------------------------------------------------------------------------- reports

@dataclass(frozen=True)
class BitsReport:
    """Storage of a model's quantized linear weights."""

    bits_per_weight: float  # all bytes of the quantized weights (codes, scales, code books) × 8 / weights
    weights: int  # number of quantized weights
    bytes: int  # their storage
    layers: int  # number of quantized layers


def _quantized_weights(model: nn.Module) -> list[tuple[nn.Module, QuantizedBase | None]]:
    found = []
    for module in model.modules():
        if isinstance(module, AdaptedLinear) and module.quant is not None:
            found.append((module, module.quant))
        elif is_quantized_linear(module):
            found.append((module, None))
    return found


def bits_per_weight(model: nn.Module) -> BitsReport:
    """Bits per weight of every quantized linear layer of `model` (adapted or not)."""
    weights = total = 0
    found = _quantized_weights(model)
    if not found:
        raise QuantizationError(f"{type(model).__name__} has no quantized linear layer")
    for module, quant in found:
        weights += module.in_features * module.out_features
        if quant is not None:
            total += quant.storage_bytes(module.weight)
        elif isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit):
            total += storage_bytes_4bit(module.weight)
        else:
            scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
            total += module.weight.numel() + scb.numel() * scb.element_size()
    return BitsReport(8.0 * total / weights, weights, total, len(found))


def merge_errors(model: nn.Module) -> dict[str, LayerMergeError]:
    """Layer name -> the output change requantizing its merged weight added (layers with something merged)."""
    return {n: layer.quant.merge_error for n, layer in adapted_layers(model).items()
            if layer.quant is not None and layer.quant.merge_error is not None}


@dataclass
class MergeReport:
    """What merging into a quantized base cost: per layer on a probe batch, and on the model's outputs."""

    layers: dict[str, LayerMergeError] = field(default_factory=dict)
    layer_max_abs: float = 0.0  # worst layer's max output change
    layer_mean_abs: float = 0.0  # mean over layers of the mean output change
    output_max_abs: float | None = None  # max |merged − unmerged| of the model's outputs on the probe inputs
    output_mean_abs: float | None = None
    output_ref_mean_abs: float | None = None  # mean |unmerged output|, for scale
    output_adapter_mean_abs: float | None = None  # mean |unmerged − base output|: the adapter's own effect

    @property
    def effect_lost(self) -> float | None:
        """Model-output error over the adapter's effect: near 0 is a faithful merge, near 1 the adapter is gone."""
        if self.output_mean_abs is None or not self.output_adapter_mean_abs:
            return None
        return self.output_mean_abs / self.output_adapter_mean_abs

    def summary(self) -> str:
        text = (f"merge into a quantized base: {len(self.layers)} layers, layer outputs changed by max "
                f"{self.layer_max_abs:.3g}, mean {self.layer_mean_abs:.3g}")
        if self.output_max_abs is not None:
            text += (f"; model outputs changed by max {self.output_max_abs:.3g}, mean {self.output_mean_abs:.3g} "
                     f"(mean |output| {self.output_ref_mean_abs:.3g}; the adapter itself moves them by "
                     f"{self.output_adapter_mean_abs:.3g})")
        return text


def _outputs(model: nn.Module, inputs: dict | torch.Tensor) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(input_ids=inputs)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr).float()
    return out.float() if isinstance(out, torch.Tensor) else out[0].float()


@torch.no_grad()
def merge_quantized(model: nn.Module, name: str, probe_inputs: dict | torch.Tensor | None = None) -> MergeReport:
    """Merge adapter `name` into the (quantized) base and report the error requantizing added.

    Per layer: max and mean change of its outputs on a fixed probe batch. With `probe_inputs` (input ids or
    a dict of model inputs): also max and mean change of the model's outputs, merged vs unmerged.
    """
    before = base = None
    if probe_inputs is not None:
        with use_adapter(model, name):
            before = _outputs(model, probe_inputs)
        with disable_adapters(model):
            base = _outputs(model, probe_inputs)
    merge(model, name)
    report = MergeReport(layers=merge_errors(model))
    if report.layers:
        report.layer_max_abs = max(e.max_abs for e in report.layers.values())
        report.layer_mean_abs = sum(e.mean_abs for e in report.layers.values()) / len(report.layers)
    if before is not None:
        with use_adapter(model, name):
            after = _outputs(model, probe_inputs)
        diff = (after - before).abs()
        report.output_max_abs, report.output_mean_abs = diff.max().item(), diff.mean().item()
        report.output_ref_mean_abs = before.abs().mean().item()
        report.output_adapter_mean_abs = (before - base).abs().mean().item()
    return report


def prepare_for_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Train mode, and optionally gradient checkpointing (non-reentrant, so frozen inputs are fine and
    adapter and prefix gradients flow); the model's own cache is turned off while checkpointing."""
    model.train()
    if gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise QuantizationError(f"{type(model).__name__} is not a transformers model: it has no "
                                    "gradient_checkpointing_enable")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    return model


__all__ = ["BitsReport", "LayerMergeError", "MergeReport", "QUANT_TYPES", "bits_per_weight", "dequantize_model",
           "is_quantized_linear", "merge_errors", "merge_quantized", "prepare_for_training", "quantize"]
