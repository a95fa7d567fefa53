"""The routed deltas of one adapted layer: per kind, one path for one adapter or one per row.

    kind      per call                                                   kernel (lorakit.kernels)
    LoRA      gather each group's A, Bᵀ from the slot stack             lora_rows: bmm, baddbmm_
    LoRA-XS   x·Aᵀ once (shared basis), gather r×r cores (attached      core_rows
              and packed), up once
    VeRA      x·Aᵀ once, gather d and b vectors                          vera_rows
    DoRA      gather each group's g − 1 (kept per slot in inference),   lora_rows, then rescale_rows
              add LoRA's part, rescale it with the base output

A route arrives resolved (lorakit.routing.resolve): per kind, one slot index per group of rows, where the
batch is one group (every row the same adapter) or one group per row. In inference the sources are the
layer's preallocated slot stacks (lorakit.layer.slots) indexed by model-wide slots; with gradients on (or
dropout active) they are stacked from the route's adapters' own parameters per call, indexed locally, so
gradients reach each adapter. Same math either way: one path per method (PATHS), whatever the source.

Merged adapters are taken back out of rows that do not route to them with what the merge added (the
layer's record), through the LoRA path; a merged DoRA adapter, whose update is not low-rank, by the base
computed again from the W its merge kept. Deltas are added into the base output in place (it is fresh).
DoRA rescales the base output itself, so where a route has DoRA (or a DoRA adapter is merged) merged
adapters are taken out first, DoRA comes next, then the other kinds.
Dropout (training only) is per row: row i's adapter input is dropped at that adapter's own rate.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.kernels.backend import KERNELS
from lorakit.methods.dora import gain_minus_one
from lorakit.routing.resolve import KindRows, RouteSlots
from lorakit.layer.slots import SlotStack, names_of_kind, param_source, stack_for

# `layer` below is an AdaptedLinear: lorakit.layer.linear imports this module, so annotations say nn.Module


def add_routed_deltas(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, route: RouteSlots,
                      checked: dict | None) -> torch.Tensor:
    """out + the route's deltas for this layer, added in place into `out` (the fresh base output) and
    returned. `checked` (the route's cache, None while compiling) remembers which stacks were verified to
    hold the route's adapters."""
    per_call = uses_parameters(layer, checked)
    if per_call and out._base is not None:  # autograd forbids a chain of in-place adds through a view
        out = out.clone()
    merged = route.merged
    rescaled = route.rescales or (merged and any(layer.merged_base(n) is not None for n in merged))
    if rescaled and merged:  # a rescale of the base output must see the unmerged base, nothing else added
        out = _take_out_merged(layer, x, out, route)
    for kind, method in route.order:  # each kind's method's path, in run order (lorakit.routing.resolve)
        out = PATHS[method](layer, kind, x, out, route.kinds[kind], route.groups, per_call, checked)
    if merged and not rescaled:
        out = _take_out_merged(layer, x, out, route)
    return out


def _take_out_merged(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, route: RouteSlots) -> torch.Tensor:
    """Rows not routed to a merged adapter must not see it: its record subtracted at each row's coefficient."""
    for name, coef in route.merged.items():
        groups = coef.shape[0]
        kept = layer.merged_base(name)
        if kept is not None:  # DoRA: out += coef·(out − base(x)), base(x) from the W its merge kept
            base = F.linear(x, kept.T if layer.fan_in_fan_out else kept, layer.bias).to(out.dtype)
            step = (out - base).reshape(groups, -1, out.shape[-1]) * coef.to(out.dtype)[:, None, None]
            out = out + step.reshape(out.shape)
            continue
        recorded = layer.merged_factors(name)
        if recorded is not None:
            up, down = recorded
            KERNELS.lora_rows(out, x, down[None].expand(groups, -1, -1), up.T[None].expand(groups, -1, -1), coef)
    return out


def _add_dora(layer: nn.Module, kind: str, x: torch.Tensor, out: torch.Tensor, columns: tuple[KindRows, ...],
              groups: int, per_call: bool, checked: dict | None) -> torch.Tensor:
    """DoRA's columns: the base output rescaled once by 1 + Σ_j w_j(g_j − 1), then each column's LoRA part
    with Bᵀ·diag(g_j), times w_j; one unweighted column (no blend) as g ⊙ (base − b + s·B(Ax)) + b, the LoRA
    part added first and rescaled with the base. Returns the new output (a new tensor when gradients flow)."""
    total, parts = None, []
    for rows in columns:
        if checked is not None and groups == 1 and rows.lead not in layer.adapters:
            continue  # one adapter for the batch, and it does not touch this layer
        source = routed_source(layer, kind, rows, per_call, checked, x)
        if source is None:
            continue
        fields, scales, index, rates = source
        stack = layer.slot_stack(kind)
        from_stack = stack is not None and fields is stack.fields  # else stacked per call from the parameters
        gains = _stack_gains(layer, stack, rows, checked) if from_stack else \
            _parameter_gains(layer, fields, scales, rows)
        gm1 = gains.index_select(0, index)  # (n, out) float32: g − 1, zero for groups without a DoRA adapter
        a_rows, b_rows, coef = _lora_rows(fields, scales, index, x.dtype)
        if len(columns) > 1 or rows.weights is not None:  # else scaled with the base, below: g ⊙ (base + s·BAx)
            b_rows = b_rows * (1 + gm1).to(x.dtype)[:, None, :]  # Bᵀ·diag(g): (n, r, out)
        if checked is not None and groups == 1:  # one adapter for the batch: a float scale, as PEFT rounds it
            coef = layer.adapters[rows.lead].scaling * rows.lead_weight
        elif rows.weights is not None:
            coef = coef * rows.weights
        if rows.weights is not None:
            gm1 = gm1 * rows.weights.to(gm1)[:, None]
        total = gm1 if total is None else total + gm1
        parts.append((row_dropout(x, rates, index) if rates is not None else x, a_rows, b_rows, coef))
    if total is None:
        return out
    if len(columns) == 1 and columns[0].weights is None:  # one DoRA adapter per row: rescale base and LoRA at once
        KERNELS.lora_rows(out, *parts[0])
        return KERNELS.rescale_rows(out, total, layer.bias, in_place=not per_call)
    out = KERNELS.rescale_rows(out, total, layer.bias, in_place=not per_call)
    for xd, a_rows, b_rows, coef in parts:
        KERNELS.lora_rows(out, xd, a_rows, b_rows, coef)
    return out


def _parameter_gains(layer: nn.Module, fields: dict[str, torch.Tensor], scales: torch.Tensor,
                     rows: KindRows) -> torch.Tensor:
    """(1 + len(rows.names), out) float32 g − 1 from per-call fields (training: m gets gradients, the norm
    none); zero for slot 0 and for the route's adapters this layer lacks."""
    weight = layer.unmerged_weight()
    gains = [torch.zeros(layer.out_features, dtype=torch.float32, device=weight.device)]
    for k, name in enumerate(rows.names, start=1):
        if name not in layer.adapters:
            gains.append(gains[0])
            continue
        up = fields["b"][k].T * scales[k]  # (out, r)
        gains.append(gain_minus_one(weight, up, fields["a"][k], fields["m"][k]))
    return torch.stack(gains)


def _stack_gains(layer: nn.Module, stack: SlotStack, rows: KindRows | None, checked: dict | None) -> torch.Tensor:
    """(C, out) float32 g − 1 of every slot of the layer's DoRA stack, kept in `stack.derived` and brought up
    to date for the route's adapters (all held ones when `rows` is None) whose parameters or the layer's
    weight changed since (tensor versions). While compiling (`checked` None) it is read as prepared
    (refresh_gains ran before the call)."""
    gains = stack.derived.get("gains")
    if checked is None and gains is not None:
        return gains
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, updated in place: a compiled graph keeps them
        if gains is None:
            gains = stack.derived["gains"] = torch.zeros(stack.capacity, layer.out_features, dtype=torch.float32,
                                                         device=stack.scales.device)
        known = stack.derived.setdefault("versions", {})
        weight = None
        for name in (stack.held if rows is None else rows.names):
            if name not in stack.held:
                continue
            adapter = layer.adapters[name]
            version = (layer.weight._version, id(layer.weight), *(p._version for p in adapter._parameters.values()))
            if known.get(name) != version:
                weight = layer.unmerged_weight() if weight is None else weight
                gains[stack.held[name]] = gain_minus_one(weight, *adapter.factors(), adapter.lora_magnitude_vector)
                known[name] = version
    return gains


def refresh_gains(layer: nn.Module) -> None:
    """Bring the layer's kept DoRA gains up to date outside any graph (lorakit.model.compiled, before each call)."""
    stack = layer.slot_stack("dora")
    if stack is not None:
        _stack_gains(layer, stack, None, {})


def uses_parameters(layer: nn.Module, checked: dict | None) -> bool:
    """Whether deltas read the adapters' own parameters (stacked per call) rather than the slot stacks."""
    # gradients must reach the parameters themselves; and under torch.compile(model) the slot stacks must not be
    # (re)built while tracing (`param.data` re-pointed under Dynamo: inductor's stride asserts then fail)
    return torch.is_grad_enabled() or layer.training or (checked is not None and torch.compiler.is_compiling())


def _column_source(layer: nn.Module, kind: str, x: torch.Tensor, rows: KindRows, groups: int, per_call: bool,
                   checked: dict | None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                  torch.Tensor] | None:
    """(fields, scales, index, the input after each row's dropout) of one column, or None when no adapter of it
    is on this layer."""
    if checked is not None and groups == 1 and rows.lead not in layer.adapters:
        return None  # one adapter for the batch, and it does not touch this layer
    source = routed_source(layer, kind, rows, per_call, checked, x)
    if source is None:
        return None
    fields, scales, index, rates = source
    return fields, scales, index, (row_dropout(x, rates, index) if rates is not None else x)


def _add_lora(layer: nn.Module, kind: str, x: torch.Tensor, out: torch.Tensor, columns: tuple[KindRows, ...],
              groups: int, per_call: bool, checked: dict | None) -> torch.Tensor:
    """LoRA: a blend of m adapters is m passes, each group's adapter times its blend weight."""
    for rows in columns:
        source = _column_source(layer, kind, x, rows, groups, per_call, checked)
        if source is None:
            continue
        fields, scales, index, xd = source
        a_rows, b_rows, coef = _lora_rows(fields, scales, index, x.dtype)
        if checked is not None and groups == 1:  # one adapter for the batch: a float scale, as PEFT rounds it
            coef = layer.adapters[rows.lead].scaling * rows.lead_weight
        elif rows.weights is not None:
            coef = coef * rows.weights
        KERNELS.lora_rows(out, xd, a_rows, b_rows, coef)
    return out


def _add_vera(layer: nn.Module, kind: str, x: torch.Tensor, out: torch.Tensor, columns: tuple[KindRows, ...],
              groups: int, per_call: bool, checked: dict | None) -> torch.Tensor:
    """VeRA (one kind per shared basis): the blend weight scales each group's d."""
    basis = layer.bases[kind]
    for rows in columns:
        source = _column_source(layer, kind, x, rows, groups, per_call, checked)
        if source is None:
            continue
        fields, _, index, xd = source
        d = fields["d"].index_select(0, index)  # (n, r)
        if rows.weights is not None:
            d = d * rows.weights.to(d)[:, None]
        KERNELS.vera_rows(out, xd, basis.down, basis.up, d, fields["b"].index_select(0, index))
    return out


def _lora_rows(fields: dict[str, torch.Tensor], scales: torch.Tensor, index: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's A, Bᵀ (in `dtype`) and scale, gathered from the stack on every call rather than kept with
    a decode loop's route: a kept copy would double the bytes each step reads, and a decode step is bound by
    the bytes it reads, not by the gather."""
    return (fields["a"].index_select(0, index).to(dtype), fields["b"].index_select(0, index).to(dtype),
            scales.index_select(0, index))


def routed_source(layer: nn.Module, kind: str, rows: KindRows, per_call: bool, checked: dict | None,
                  like: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                               torch.Tensor | None] | None:
    """(fields, scales, index, dropout rates or None) for `kind` in this layer, or None when no adapter of
    the kind is here. Inference reads the slot stack; training stacks the route's parameters, in the dtype
    and on the device of `like` (the activations)."""
    if not per_call:
        stack = _checked_stack(layer, kind, rows, checked)
        if stack is not None:
            return stack.fields, stack.scales, rows.slots, None
        if checked is None and not names_of_kind(layer, kind):  # compiling: never read the route's names
            return None
    adapters = [layer.adapters[n] if n in layer.adapters else None for n in rows.names]
    present = [a for a in adapters if a is not None]
    if not present:
        return None
    shapes = type(present[0]).slot_shapes(layer.in_features, layer.out_features, max(a.r for a in present))
    fields, scales = param_source(adapters, shapes, like.dtype, like.device)
    rates = [0.0] + [dropout_rate(a) if a is not None else 0.0 for a in adapters]
    return fields, scales, rows.local, (torch.tensor(rates, device=like.device) if any(rates) else None)


def _checked_stack(layer: nn.Module, kind: str, rows: KindRows, checked: dict | None) -> SlotStack | None:
    """The layer's slot stack of `kind`, rebuilt if its parameters no longer live in it; None if it has none."""
    if checked is None:  # compiling: lorakit.model.compiled prepared every stack before tracing
        return layer.slot_stack(kind)
    stack = stack_for(layer, kind, layer.registry.slot_table)
    if stack is None or checked.get(("stack", id(layer), kind)) is stack:
        return stack
    # parameters re-pointed behind lorakit's back (`param.data = ...`, `.to()` on a submodule alone): checked
    # on the route's first adapter only, once per route and layer: checking every adapter of a wide route
    # would read all their parameters' pointers on every step; model-level moves re-point them all (slots.moved)
    first = next((n for n in rows.names if n in layer.adapters), None)
    if first is not None and not stack.holds(layer, first):
        stack = stack_for(layer, kind, layer.registry.slot_table, stale=stack)
    checked[("stack", id(layer), kind)] = stack
    return stack


def _add_lora_xs(layer: nn.Module, kind: str, x: torch.Tensor, out: torch.Tensor, columns: tuple[KindRows, ...],
                 groups: int, per_call: bool, checked: dict | None) -> torch.Tensor:
    """Attached LoRA-XS cores (slot stack or parameters) and packed ones (the model's bank), of every column
    (a blend's parts, weighted), summed into one core per group: one product whatever the blend."""
    parts: list[torch.Tensor] = []
    dropout = None  # (rates, index): training drops the input once, at the first column's adapters' rates
    bank = layer.registry.bank
    for rows in columns:
        weights = rows.weights[:, None, None] if rows.weights is not None else None
        source = routed_source(layer, kind, rows, per_call, checked, x)
        if source is not None:
            fields, scales, index, rates = source
            if dropout is None and rates is not None:
                dropout = (rates, index)
            core = fields["core"].index_select(0, index) * scales.index_select(0, index)[:, None, None]
            parts.append(core if weights is None else core * weights.to(core))
        if bank is not None and layer.bank_index is not None:
            if checked is not None:  # attached LoRA-XS adapters take numbers too: rows routed to them read zeros
                bank.ensure_capacity(layer.registry.slot_table.capacity(kind))
            packed = bank.cores[layer.bank_index].index_select(0, rows.slots)  # scaled; slot 0 zero
            parts.append(packed if weights is None else packed * weights.to(packed))
    if not parts:
        return out
    basis = layer.bases[kind]
    k = min(max(p.shape[-1] for p in parts), basis.rank)  # the bank may be wider than this layer's basis
    cores = None
    for part in parts:
        r = part.shape[-1]
        part = part[:, :k, :k] if r >= k else nn.functional.pad(part, (0, k - r, 0, k - r))  # zero: exact
        cores = part.to(x.dtype) if cores is None else cores + part.to(x.dtype)
    xd = row_dropout(x, *dropout) if dropout is not None else x
    down, up = basis.sliced(k)
    KERNELS.core_rows(out, xd, down, up, cores)
    return out


# method (lorakit.methods.table) -> the path that gathers its kind's columns and runs its kernels; each returns
# the output (the same tensor, added into in place, unless it must be a new one for autograd)
PATHS = {"lora": _add_lora, "dora": _add_dora, "lora_xs": _add_lora_xs, "vera": _add_vera}


def dropout_rate(adapter: nn.Module) -> float:
    """The probability with which `adapter` drops its input now: 0 in eval mode or without dropout."""
    drop = getattr(adapter, "dropout", None)
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def row_dropout(x: torch.Tensor, rates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x with group i of its rows dropped at rates[index[i]] (inverted dropout, as nn.Dropout: kept entries
    scaled by 1/(1-p), p = 1 drops everything). One mask for the whole batch, drawn from torch's RNG, so
    gradient checkpointing's recomputation (which restores the RNG state) draws the same mask."""
    n = index.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])
    keep = (1.0 - rates.float().index_select(0, index))[:, None, None]  # (n, 1, 1)
    scale = torch.where(keep > 0, 1.0 / keep.clamp_min(1e-12), torch.zeros_like(keep))
    mask = (torch.rand(x3.shape, device=x.device) < keep).to(x.dtype)  # drawn in float32: bf16 would round p
    return (x3 * (mask * scale.to(x.dtype))).reshape(x.shape)
