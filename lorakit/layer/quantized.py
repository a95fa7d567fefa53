"""Quantized bases, one layer at a time: bitsandbytes 4-bit (NF4 / FP4) and 8-bit weights under AdaptedLinear.

A quantized base is a kind of base, not a kind of adapter. AdaptedLinear keeps the packed weight (a
Params4bit with its quant_state, or an Int8Params with its row scales) and calls this module's
`QuantizedBase` (the per-layer strategy, from `quantized_base(base)`) for

    base_forward   y = x·Q(W)ᵀ + b        with bitsandbytes' own matmul (matmul_4bit / matmul)
    dequantize     D(Q(W)) in float32   (LoRA-XS takes its SVD from it)
    add_factors_   W ← Q(D(W₀) + Σ up·down)   merging: dequantize, add, requantize

Merging is exact bookkeeping here too: the packed weight W₀ from before the first merge is kept, every
merge re-quantizes D(W₀) + Σ ΔW from it (rounding never accumulates), and unmerging the last adapter
puts W₀ back bit for bit. What rounding a merge adds is measured on a fixed probe batch per layer
(`QuantizedBase.merge_error`; the model-level report is lorakit.model.quantize.merge_quantized).
Adapters on a quantized base compute in float32. The model-level operations (quantize a model, bits
per weight, merge reports, prepare_for_training) are lorakit.model.quantize.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.errors import BitsAndBytesUnavailableError, QuantizationError
from lorakit.layer.surgery import replace_module
from lorakit.versions import check_version

QUANT_TYPES = ("nf4", "fp4", "int8")
PROBE_ROWS = 32  # rows of the fixed probe batch a merge's rounding error is measured on
_INT8_FORMAT_ROW = 0  # bitsandbytes' `weight_format` code for its row-major int8 layout


def bnb():
    """The bitsandbytes module, or a clear error when it is not installed."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise BitsAndBytesUnavailableError(
            f"quantized bases need the bitsandbytes package, which failed to import ({exc}); install it with "
            "`pip install bitsandbytes` (4-bit and 8-bit layers run on CPU and CUDA)") from None
    check_version("bitsandbytes")
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (checked without importing bitsandbytes)."""
    mod = sys.modules.get("bitsandbytes")
    return mod is not None and isinstance(module, (mod.nn.Linear4bit, mod.nn.Linear8bitLt))


def quantized_base(base: nn.Module) -> "QuantizedBase | None":
    """The quantization specifics of `base` for AdaptedLinear, or None for a float layer."""
    if not is_quantized_linear(base):
        return None
    return Quant4bit(base) if isinstance(base, sys.modules["bitsandbytes"].nn.Linear4bit) else Quant8bit(base)


@dataclass(frozen=True)
class LayerMergeError:
    """How much requantizing after a merge moved one layer's outputs on the probe batch."""

    max_abs: float  # max |y_merged − y_exact| over the probe batch
    mean_abs: float  # mean |y_merged − y_exact|
    output_mean_abs: float  # mean |y_exact|, for scale
    delta_mean_abs: float  # mean |ΔW·x|: what the merged adapters add, to compare the error with


class QuantizedBase:
    """What AdaptedLinear needs from a quantized weight; one instance per adapted layer."""

    kind = ""

    def __init__(self, base: nn.Module) -> None:
        self.original: tuple | None = None  # packed weight before the first merge (restored exactly)
        self.applied: list[tuple[torch.Tensor, torch.Tensor]] = []  # factors (up, down) merged since then
        self.merge_error: LayerMergeError | None = None

    # -- per-kind operations ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_snapshot(self, snap: tuple) -> torch.Tensor:
        """(out, in) float32 from a snapshot (the stored tensors of the weight)."""
        raise NotImplementedError

    def requantize_(self, weight: nn.Parameter, w: torch.Tensor) -> None:
        raise NotImplementedError

    def snapshot(self, weight: nn.Parameter) -> tuple:
        raise NotImplementedError

    def restore_(self, weight: nn.Parameter, snap: tuple) -> None:
        raise NotImplementedError

    def storage_bytes(self, weight: nn.Parameter) -> int:
        raise NotImplementedError

    def plain(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def adopt(self, layer: nn.Module) -> None:
        """Make `layer`'s state dict hold the same keys the bitsandbytes layer saves."""

    # -- merging ----------------------------------------------------------------------------------
    def dequantize(self, weight: nn.Parameter) -> torch.Tensor:
        """(out, in) float32."""
        return self.dequantize_snapshot(self.snapshot(weight))

    @torch.no_grad()
    def exact_weight(self, weight: nn.Parameter) -> torch.Tensor:
        """D(W₀) + Σ merged ΔW in float32: the weight a full-precision merge would hold."""
        w = self.dequantize_snapshot(self.original if self.original is not None else self.snapshot(weight))
        for up, down in self.applied:
            w.addmm_(up, down)
        return w

    @torch.no_grad()
    def add_factors_(self, layer: nn.Module, up: torch.Tensor, down: torch.Tensor, sign: float) -> None:
        """W ← Q(D(W₀) + Σ ΔW): dequantize, add, requantize, and measure the rounding on the probe batch."""
        weight = layer.weight
        up = (up.detach().float() * sign).contiguous()  # (out, r)
        down = down.detach().float().contiguous()  # (r, in)
        if self.original is None:
            self.original = self.snapshot(weight)
        cancelled = next((i for i, (u, d) in enumerate(self.applied)
                          if torch.equal(d, down) and torch.equal(u, -up)), None)
        if cancelled is not None:  # an unmerge of what was merged: drop both, no rounding drift
            del self.applied[cancelled]
        else:
            self.applied.append((up, down))
        if not self.applied:  # nothing merged any more: the original packed weight, bit for bit
            self.restore_(weight, self.original)
            self.original = None
            self.merge_error = None
            return
        target = self.exact_weight(weight)  # (out, in) float32
        self.requantize_(weight, target)
        probe = probe_batch(layer.in_features, target.device)  # (PROBE_ROWS, in)
        exact = probe @ target.T  # (PROBE_ROWS, out)
        change = (probe @ self.dequantize(weight).T - exact).abs()
        delta = exact - probe @ self.dequantize_snapshot(self.original).T
        self.merge_error = LayerMergeError(change.max().item(), change.mean().item(), exact.abs().mean().item(),
                                           delta.abs().mean().item())

    def to_plain(self, layer: nn.Module, full_precision: bool) -> nn.Module:
        """The bitsandbytes layer holding the (merged) weight, or a float nn.Linear with D(W₀) + Σ ΔW."""
        if not full_precision:
            return self.plain(layer)
        return float_linear(self.exact_weight(layer.weight), layer.bias, self.float_dtype(layer.weight))

    def float_dtype(self, weight: nn.Parameter) -> torch.dtype:
        return torch.float32


def probe_batch(in_features: int, device: torch.device) -> torch.Tensor:
    """A fixed standard-normal batch (seeded CPU generator, so the same on every machine)."""
    gen = torch.Generator().manual_seed(in_features)
    return torch.randn(PROBE_ROWS, in_features, generator=gen).to(device)


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) and `bias`."""
    out_f, in_f = weight.shape
    plain = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return plain


class Quant4bit(QuantizedBase):
    """A bitsandbytes Params4bit weight: NF4 or FP4 codes, blockwise absmax, optionally quantized twice."""

    kind = "4bit"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        weight = base.weight
        if weight.quant_state is None:
            raise QuantizationError(f"{type(base).__name__} holds no quant_state: it was never quantized "
                                    "(move it to a device, or use lorakit.quantize)")
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # bnb's CPU inference repacking
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        self.compute_dtype = getattr(base, "compute_dtype", None) or torch.float32

    def forward(self, x, weight, bias):
        qs = weight.quant_state
        xc = x.to(self.compute_dtype)
        bias = None if bias is None else bias.to(xc.dtype)
        return bnb().matmul_4bit(xc, weight, quant_state=qs, bias=bias).to(x.dtype)

    def dequantize_snapshot(self, snap):
        from bitsandbytes.functional import dequantize_4bit

        data, state = snap
        return dequantize_4bit(data, state).float()

    def requantize_(self, weight, w):
        from bitsandbytes.functional import quantize_4bit

        qs = weight.quant_state
        data, state = quantize_4bit(w.to(qs.dtype).contiguous(), blocksize=qs.blocksize, compress_statistics=qs.nested,
                                    quant_type=qs.quant_type, quant_storage=weight.data.dtype)
        weight.data = data
        weight.quant_state = state

    def snapshot(self, weight):
        return weight.data, weight.quant_state

    def restore_(self, weight, snap):
        weight.data, weight.quant_state = snap

    def storage_bytes(self, weight):
        return storage_bytes_4bit(weight)

    def float_dtype(self, weight):
        dtype = weight.quant_state.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def plain(self, layer):
        mod = bnb()
        plain = mod.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=self.compute_dtype, compress_statistics=layer.weight.quant_state.nested,
                                  quant_type=layer.weight.quant_state.quant_type,
                                  quant_storage=layer.weight.data.dtype, device="meta")
        plain.weight = layer.weight
        plain.weight.module = plain
        plain.quant_state = layer.weight.quant_state
        no_cpu_repacking(plain)
        if layer.bias is not None:
            plain.bias = layer.bias
        return plain

    def adopt(self, layer):
        layer.register_state_dict_post_hook(_save_4bit_state)
        layer.register_load_state_dict_pre_hook(_load_4bit_state)


def no_cpu_repacking(layer: nn.Module) -> None:
    """bitsandbytes repacks a Linear4bit's weight for bf16 AVX-512 kernels on its first CPU inference call
    (bf16 scales, fails on layers narrower than a block); keep the float32 path AdaptedLinear uses."""
    layer.support_avx512bf16_for_cpu = False


def _save_4bit_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """weight.absmax, weight.quant_map, ... exactly as bitsandbytes' Linear4bit writes them."""
    qs = module.weight.quant_state
    for key, value in qs.as_dict(packed=True).items():
        state_dict[f"{prefix}weight.{key}"] = value


def _load_4bit_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Take the quant-state keys out of a bitsandbytes checkpoint and rebuild the weight's quant_state."""
    from bitsandbytes.functional import QuantState

    start = f"{prefix}weight."
    stats = {key[len(start):]: state_dict.pop(key) for key in list(state_dict) if key.startswith(start)}
    if stats:
        module.weight.quant_state = QuantState.from_dict(stats, device=module.weight.device)


def storage_bytes_4bit(weight: torch.Tensor) -> int:
    """Bytes a Params4bit occupies: packed codes, absmax (itself quantized when nested), code books."""
    qs = weight.quant_state
    total = weight.data.numel() * weight.data.element_size()
    parts = [qs.absmax, qs.code]
    if qs.nested:
        parts += [qs.state2.absmax, qs.state2.code, qs.offset]
    return total + sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))


class Quant8bit(QuantizedBase):
    """A bitsandbytes Int8Params weight: int8 rows with one float scale (SCB) per output row."""

    kind = "8bit"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        weight = base.weight
        if weight.dtype != torch.int8:
            raise QuantizationError(f"{type(base).__name__} holds a {weight.dtype} weight: it was never quantized "
                                    "(has_fp16_weights=True layers are not supported as bases)")
        scb = getattr(weight, "SCB", None)
        if scb is None:  # bitsandbytes moves the scales into `state` after its first forward
            scb = base.state.SCB
        weight.CB, weight.SCB = weight.data, scb
        self.threshold = float(base.state.threshold)
        self._layer: weakref.ref | None = None  # the AdaptedLinear, for its training flag
        quiet_int8_cast_notice()

    def _state(self, weight: nn.Parameter):
        state = bnb().MatmulLtState()
        state.CB, state.SCB = weight.data, weight.SCB
        state.has_fp16_weights = False
        state.threshold = self.threshold
        # as Linear8bitLt: in training bitsandbytes dequantizes the weight on CPU (no int8 activations)
        layer = self._layer() if self._layer is not None else None
        state.is_training = bool(layer is not None and layer.training)
        return state

    def forward(self, x, weight, bias):
        # LLM.int8(): x is rounded to fp16 and quantized row-wise inside; the output comes back in x's dtype
        bias = None if bias is None else bias.to(x.dtype)
        return bnb().matmul(x, weight, bias=bias, state=self._state(weight))

    def dequantize_snapshot(self, snap):
        cb, scb = snap
        return cb.float() * (scb.float()[:, None] / 127.0)

    def requantize_(self, weight, w):
        from bitsandbytes.functional import int8_vectorwise_quant

        cb, scb, _ = int8_vectorwise_quant(w.to(torch.float16).contiguous())
        weight.data = cb
        weight.CB, weight.SCB = cb, scb

    def snapshot(self, weight):
        return weight.data, weight.SCB

    def restore_(self, weight, snap):
        weight.data, weight.SCB = snap
        weight.CB = weight.data

    def storage_bytes(self, weight):
        return weight.data.numel() + weight.SCB.numel() * weight.SCB.element_size()

    def float_dtype(self, weight):
        return torch.float32

    def plain(self, layer):
        mod = bnb()
        plain = mod.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    has_fp16_weights=False, threshold=self.threshold, device="meta")
        plain.weight = layer.weight
        if layer.bias is not None:
            plain.bias = layer.bias
        return plain

    def adopt(self, layer):
        self._layer = weakref.ref(layer)
        layer.register_state_dict_post_hook(_save_8bit_state)
        layer.register_load_state_dict_pre_hook(_load_8bit_state)


class _Int8CastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on every int8 matmul of float32 inputs: by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in logger.filters):
        logger.addFilter(_Int8CastNotice())


def _save_8bit_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """SCB and weight_format, as bitsandbytes' Linear8bitLt writes them."""
    state_dict[f"{prefix}SCB"] = module.weight.SCB
    state_dict[f"{prefix}weight_format"] = torch.tensor(_INT8_FORMAT_ROW, dtype=torch.uint8)


def _load_8bit_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(f"{prefix}weight_format", None)
    scb = state_dict.pop(f"{prefix}SCB", None)
    if scb is not None:
        module.weight.SCB = scb.to(module.weight.device, torch.float32).clone()



def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes linear layer left in `model` by a float nn.Linear (in place)."""
    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            quant = quantized_base(module)
            dtype = quant.float_dtype(module.weight)
            replace_module(model, name, float_linear(quant.dequantize(module.weight), module.bias, dtype))
    return model
