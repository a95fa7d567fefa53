"""`AdaptedLinear`: a frozen linear base plus any number of named adapters, routed per call.

It takes over the base layer's own `weight` and `bias` parameters (same objects, same state-dict
keys), so base checkpoints load as they are and a merged model saves as a plain one. Adapters live in
`adapters` (a ModuleDict), shared frozen projections in `bases` (non-persistent buffers).

    forward(x) = base(x) + Σ_{a routed, not merged} Δ_a(x) − Σ_{m merged, not routed} Δ_m(x)

A DoRA adapter's Δ rescales the base output row-wise (lorakit.methods.dora), so its merge replaces W by
diag(g)·(W + s·B·A) and keeps W itself to put back: nothing else may be merged into the layer beside it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorakit import walk
from lorakit.layer.deltas import add_routed_deltas
from lorakit.errors import MergeStateError, NonFiniteAdapterError, RoutingError
from lorakit.methods.basis import Basis
from lorakit.methods.table import method_of_kind
from lorakit.layer.quantized import quantized_base
from lorakit.routing.resolve import RouteSlots, resolve
from lorakit.routing.context import AS_STORED, RowNames, current_route
from lorakit.routing.record import AdapterRecord
from lorakit.layer.slots import SlotStack, SlotStacks, stacks

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

ADAPTABLE_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


class AdaptedLinear(nn.Module):
    """A linear (or Conv1D) layer whose output adds the routed adapters' deltas."""

    wraps_linear: bool = True  # False for a layer over another kind of base (lorakit.layer.embedding)
    lorakit_sealed = True  # its children hold only per-adapter state: model walks skip them (lorakit.walk)

    def __init__(self, base: nn.Module, module_name: str, registry: AdapterRecord) -> None:
        """`registry` is the model's adapter record (lorakit.model.record, a floor above: it walks these layers),
        held through its contract (lorakit.routing.record): what is merged, the packed bank, the default route."""
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D) if isinstance(Conv1D, type) else False
        self.weight = base.weight  # the base's own Parameter: same key, same storage
        self.bias = getattr(base, "bias", None)  # an embedding table has none
        self.quant = quantized_base(base)  # bitsandbytes specifics of a 4/8-bit base (lorakit.layer.quantized), else None
        if self.quant is not None:  # a packed weight's shape is not (out, in)
            self.in_features, self.out_features = base.in_features, base.out_features
            self.quant.adopt(self)
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.out_features, self.in_features = base.weight.shape
        self.module_name = module_name
        self.adapters = nn.ModuleDict()
        self.bases = nn.ModuleDict()
        self.bank_index: int | None = None  # this layer's row in the packed bank, if any
        # what each merged adapter added to W, as non-persistent buffers (they move with .to()): unmerging and
        # the per-row subtraction use exactly this, even if the adapter's parameters changed since the merge
        self.merged_deltas = nn.Module()
        self.registry: AdapterRecord = registry  # a plain reference (not a Module), to the record's contract
        self.slot_stacks = SlotStacks()  # built and kept up to date by lorakit.layer.slots
        self.training = base.training  # an eval model stays in eval mode (int8 bases compute differently)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={list(self.adapters)}, merged={self.merged_names()}")

    # -- forward ---------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            out = self.quant.forward(x, self.weight, self.bias)
            if out.requires_grad and out._base is not None:
                # bitsandbytes (>= 0.49, layers with a bias) may return a view of its custom Function's output;
                # adapters add into the base output in place, which autograd forbids on such a view
                out = out.clone()
            return out
        weight = self.weight.T if self.fan_in_fan_out else self.weight
        return F.linear(x, weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W as it stands, (out, in), in its own dtype (a view: transposed for Conv1D)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def unmerged_weight(self) -> torch.Tensor:
        """The base W (out, in) without what is merged into it: what DoRA's norms are taken of."""
        merged = self.merged_names()
        if not merged:
            return self.dense_weight()
        kept = self.merged_base(merged[0])  # a merged DoRA adapter is merged alone
        if kept is not None:
            return kept.T if self.fan_in_fan_out else kept
        weight = self.dense_weight().float()
        for name in merged:
            up, down = self.merged_factors(name) or self.factors(name)
            weight = weight - up.float() @ down.float()
        return weight

    def has(self, name: str) -> bool:
        """Whether adapter `name` touches this layer (as a module or as packed cores)."""
        if name in self.adapters:
            return True
        bank = self.registry.bank
        return bank is not None and self.bank_index is not None and self.bank_index in bank.targets.get(name, ())

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Δ_name(x) alone (the adapter's contribution, whether attached or packed)."""
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.has(name) and self.is_dora(name):  # DoRA rescales the base output: its delta needs it
            base = self.base_forward(x)
            return add_routed_deltas(self, x, base.clone(), self.resolved(name, {}, x.device, merged=()), {}) - base
        if self.has(name):
            out = add_routed_deltas(self, x, out, self.resolved(name, {}, x.device, merged=()), {})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and x.dtype != torch.float32:  # adapters on a quantized base run in float32
            return self.forward(x.float()).to(x.dtype)
        out = self.base_forward(x)
        registry = self.registry
        if torch.compiler.is_compiling():  # lorakit.model.compiled: the route's tensors are the graph's inputs
            handed = registry.traced_slots if registry.traced_slots is not None else registry.entry_slots
            if handed is not None:
                return self.add_deltas(x, out, handed, None)
        if not self.adapters and self.bank_index is None and not registry.merged:
            return out
        route = current_route(id(registry))
        names = route.names if route is not None else registry.default_names()
        if names is AS_STORED:
            return out
        if isinstance(names, tuple) and len(names) != x.shape[0]:
            raise RoutingError(f"{self.module_name}: route has {len(names)} row names but the batch has "
                               f"{x.shape[0]} rows (input shape {tuple(x.shape)})")
        cache = route.cache if route is not None else registry.slot_table_memo()
        resolved = self.resolved(names, cache, x.device, tuple(registry.merged))
        if not resolved.kinds and not resolved.merged:
            return out
        return self.add_deltas(x, out, resolved, cache)

    def add_deltas(self, x: torch.Tensor, out: torch.Tensor, route: RouteSlots, cache: dict | None) -> torch.Tensor:
        """out (the fresh base output) + the route's deltas; `cache` is None while compiling. The one step
        a layer over another kind of base (lorakit.layer.embedding) does its own way."""
        if x.dtype != out.dtype:  # under torch.autocast the base output is bf16/fp16 while x is not: the
            x = x.to(out.dtype)  # adapter math and its in-place adds then run in the output's dtype
        return add_routed_deltas(self, x, out, route, cache)

    def resolved(self, names: RowNames, cache: dict, device: torch.device, merged: tuple[str, ...]) -> RouteSlots:
        """The route's tensors (lorakit.routing.resolve), made once per route, table version and device (and
        inference mode: an inference tensor may not be saved for backward later)."""
        table = self.registry.slot_table
        key = ("slots", names, table.version, merged, str(device), torch.is_inference_mode_enabled())
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = resolve(names, table, merged, device)
        return hit

    def slot_stack(self, kind: str) -> SlotStack | None:
        """The stack of `kind` as it stands (built by lorakit.layer.slots.stack_for), without checks."""
        return stacks(self).get(kind)

    # -- merging -----------------------------------------------------------------------------------
    def merged_names(self) -> list[str]:
        return [n for n in self.registry.merged if self.has(n)]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW of adapter `name` as up (out, k) @ down (k, in)."""
        if name not in self.adapters:  # packed: up = B·(α/r)R, down = A
            bank, basis = self.registry.bank, self.bases["lora_xs"]
            k = min(bank.rank, basis.rank)  # the bank grows to its widest adapter; this layer's basis may be narrower
            down, up = basis.sliced(k)
            core = bank.core(self.bank_index, name)[:k, :k]  # (k, k), zero beyond the adapter's rank; bank's dtype
            wide = torch.promote_types(torch.promote_types(up.dtype, core.dtype), torch.float32)
            return up.to(wide) @ core.to(wide), down
        adapter = self.adapters[name]
        basis = self.bases[adapter.basis_key] if adapter.basis_key else None
        return adapter.factors(basis)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in) in float32: the dense update of adapter `name` (DoRA's: diag(g)·(W + s·B·A) − W)."""
        if self.is_dora(name):
            weight = self.unmerged_weight()
            return self.adapters[name].merged_weight(weight) - weight.float()
        up, down = self.factors(name)
        return up.float() @ down.float()

    def is_dora(self, name: str) -> bool:
        """Whether adapter `name`'s method rescales the output (DoRA; lorakit.methods.table): its merge replaces W."""
        adapter = self.adapters[name] if name in self.adapters else None
        return adapter is not None and method_of_kind(adapter.slot_kind).rescales_output

    def check_mergeable(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.factors(name)
        finite = torch.isfinite(up).all() and torch.isfinite(down).all()
        if self.is_dora(name):
            finite = finite and torch.isfinite(self.adapters[name].lora_magnitude_vector).all()
        if not finite:
            raise NonFiniteAdapterError(f"adapter {name!r} holds NaN/inf values in module {self.module_name}; "
                                        "refusing to merge it")
        dora = [n for n in self.merged_names() + [name] if self.is_dora(n)]
        if dora and self.merged_names():  # DoRA's merge rescales W: another merge beside it would not come out exactly
            raise MergeStateError(f"cannot merge adapter {name!r} into {self.module_name}: {self.merged_names()} "
                                  f"already merged there and DoRA adapter {dora[0]!r} merges only alone; unmerge first")
        if self.is_dora(name) and self.quant is not None:
            raise MergeStateError(f"cannot merge DoRA adapter {name!r} into quantized module {self.module_name}")
        return up, down

    @torch.no_grad()
    def add_factors_(self, up: torch.Tensor, down: torch.Tensor, sign: float) -> None:
        """W ± up·down in W's own layout, with one fused addmm (no dense ΔW temporary)."""
        up, down = up.detach(), down.detach()
        if self.quant is not None:  # dequantize, add, requantize (exact bookkeeping in lorakit.layer.quantized)
            self.quant.add_factors_(self, up, down, sign)
        elif self.weight.itemsize >= 4:  # float32/64 W: add in W's dtype, in place
            up, down = up.to(self.weight.dtype), down.to(self.weight.dtype)
            if self.fan_in_fan_out:  # W is (in, out)
                self.weight.addmm_(down.T, up.T, alpha=sign)
            else:
                self.weight.addmm_(up, down, alpha=sign)
        else:  # low-precision W: add in float32, round once
            delta = up.float() @ down.float()
            delta = delta.T if self.fan_in_fan_out else delta
            self.weight.copy_((self.weight.float() + sign * delta).to(self.weight.dtype))

    def merge(self, name: str) -> None:
        if name in self.merged_names():
            raise MergeStateError(f"adapter {name!r} is already merged into {self.module_name}")
        self.merge_factors_(name, *self.check_mergeable(name))

    def unmerge(self, name: str) -> None:
        if name not in self.merged_names():
            raise MergeStateError(f"adapter {name!r} is not merged into {self.module_name}")
        self.unmerge_factors_(name)

    def merged_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) that merging adapter `name` added to W, or None when it is not merged here (or is DoRA,
        whose merge is not low-rank: merged_base)."""
        up = getattr(self.merged_deltas, f"{name}_up", None)
        return (up, getattr(self.merged_deltas, f"{name}_down")) if up is not None else None

    def merged_base(self, name: str) -> torch.Tensor | None:
        """W as it was before DoRA adapter `name` was merged (W's own layout and dtype), or None."""
        return getattr(self.merged_deltas, f"{name}_base", None)

    def merge_factors_(self, name: str, up: torch.Tensor, down: torch.Tensor) -> None:
        """W += up·down, and remember exactly what was added. DoRA: W := diag(g)·(W + up·down), W kept."""
        if self.is_dora(name):
            with torch.no_grad():
                kept = self.weight.detach().clone()
                merged = self.adapters[name].merged_weight(self.dense_weight())  # (out, in) float32
                self.weight.copy_((merged.T if self.fan_in_fan_out else merged).to(self.weight.dtype))
            self.merged_deltas.register_buffer(f"{name}_base", kept, persistent=False)
            return
        up, down = up.detach().clone(), down.detach().clone()
        self.add_factors_(up, down, +1.0)
        self.record_merge(name, up, down)

    def record_merge(self, name: str, up: torch.Tensor, down: torch.Tensor) -> None:
        self.merged_deltas.register_buffer(f"{name}_up", up, persistent=False)
        self.merged_deltas.register_buffer(f"{name}_down", down, persistent=False)

    def unmerge_factors_(self, name: str) -> None:
        """W −= what merging `name` added (its record; the live factors for a merge made before records);
        a merged DoRA adapter puts back the W it kept, bit for bit."""
        kept = self.merged_base(name)
        if kept is not None:
            with torch.no_grad():
                self.weight.copy_(kept)
            self.forget_merge(name)
            return
        recorded = self.merged_factors(name)
        self.add_factors_(*(recorded if recorded is not None else self.factors(name)), -1.0)
        self.forget_merge(name)

    def forget_merge(self, name: str) -> None:
        for part in ("up", "down", "base"):
            self.merged_deltas._buffers.pop(f"{name}_{part}", None)

    # -- bookkeeping -----------------------------------------------------------------------------
    def basis(self, key: str) -> Basis | None:
        return self.bases[key] if key in self.bases else None

    def take_back(self, name: str, bases: dict[str, Basis]) -> None:
        """Undo a failed add of adapter `name` (lorakit.model.record.unwrap_on_error): its adapter removed,
        the bases exactly `bases` again."""
        if name in self.adapters:
            del self.adapters[name]
        for key in [k for k in self.bases if k not in bases]:
            del self.bases[key]
        for key, basis in bases.items():
            self.bases[key] = basis

    def drop_unused_bases(self) -> None:
        used = {a.basis_key for a in self.adapters.values() if a.basis_key}
        if self.bank_index is not None:
            used.add("lora_xs")  # packed adapters use it
        for key in [k for k in self.bases if k not in used]:
            del self.bases[key]

    def to_plain(self, full_precision: bool = False) -> nn.Module:
        """A plain nn.Linear / Conv1D holding this layer's (possibly merged) weight and bias; for a quantized
        base a bitsandbytes layer, or (full_precision) a float nn.Linear with D(W₀) + ΔW unrounded."""
        if self.quant is not None:
            return self.quant.to_plain(self, full_precision)
        if self.fan_in_fan_out:
            plain = Conv1D(self.out_features, self.in_features)
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device="meta")
        plain.weight = self.weight
        if self.bias is not None or self.fan_in_fan_out:
            plain.bias = self.bias
        return plain


def is_adaptable(module: nn.Module) -> bool:
    """A layer adapters can be put on: a plain linear / Conv1D base, or one already adapted."""
    if isinstance(module, AdaptedLinear):
        return module.wraps_linear
    return isinstance(module, ADAPTABLE_TYPES)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Full name -> AdaptedLinear for every adapted layer of the model."""
    return {n: m for n, m in walk.named_modules(model) if isinstance(m, AdaptedLinear)}
