"""Per-row routing: row i of a batch runs adapter names[i] (or the base model when None).

    shared-basis methods (LoRA-XS, VeRA)             LoRA
    h = x·Aᵀ            once for all rows (B,T,r)    few distinct adapters: group rows, one pair of
    h_i = h_i·C_iᵀ      per-row core: R_i (r×r),     fused matmuls per adapter, index_add_ back
                        or diag(d_i)                 many: pick each row's A_i, B_i from the layer's
    out += h·Bᵀ (⊙ b_i) once for all rows            LoRA stack (lorakit.lora_stack), bmm + baddbmm_

Dropout (training only) is per row: row i's adapter input is dropped at that adapter's own rate; rows of
the base model, and rows of other kinds, get none.

Deltas are added into the base output in place (it is fresh, as in AdaptedLinear.add_delta_), so no
output-sized temporary is allocated per adapter kind.

So a batch mixing any number of LoRA-XS adapters costs about one adapter: the per-row part is an
r×r product. Adapters of lower rank are zero-padded to the basis rank (exact: the top-r singular
directions are a prefix of the top-r_max ones). Merged adapters are subtracted from rows that do not
route to them, so every row sees exactly what it asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit import lora_stack

# `layer` below is an AdaptedLinear: lorakit.layer imports this module, so annotations say nn.Module

# With at most this many distinct LoRA adapters in a batch, a loop over groups beats gathering.
GROUP_LOOP_MAX = 4


def group_rows(names: tuple[str | None, ...]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return groups


def add_per_row_deltas(layer: nn.Module, x: torch.Tensor, out: torch.Tensor,
                       names: tuple[str | None, ...], cache: dict | None = None) -> torch.Tensor:
    """out[i] += Δ_{names[i]}(x[i]) − Σ_{merged m ≠ names[i]} Δ_m(x[i]), for every row i.

    `cache` (the route's) keeps what depends only on the names, so it is computed once per call.
    """
    cache = {} if cache is None else cache
    merged = layer.merged_names()
    registry = layer.registry
    adding: dict[str, list[int]] = {}
    packed_rows = False
    if "groups" not in cache:
        cache["groups"] = group_rows(names)
    for name, rows in cache["groups"].items():
        if name is None or name in merged:
            continue
        if name in layer.adapters:
            adding[name] = rows
        elif name in registry.packed and layer.has(name):
            packed_rows = True
    if packed_rows:
        out = _add_packed(layer, x, out, names, cache)
    by_kind: dict[str, dict[str, list[int]]] = {}
    for name, rows in adding.items():
        adapter = layer.adapters[name]
        kind = adapter.basis_key or "lora"
        by_kind.setdefault(kind, {})[name] = rows
    for kind, groups in by_kind.items():
        if kind == "lora":
            out = _add_lora(layer, x, out, groups, cache)
        else:
            out = _add_shared_basis(layer, kind, x, out, groups, cache)
    for m in merged:  # rows not routed to a merged adapter must not see it
        rows = route_cached(cache, ("rows_not", m), lambda: [i for i, n in enumerate(names) if n != m])
        if rows:
            out = _add_rows(layer, m, -1.0, out, rows, x, cache)
    return out


def route_cached(cache: dict, key: tuple, build: Callable[[], Any]) -> Any:
    """What depends only on the route's names (row lists, index and mask tensors), built once per route
    rather than once per layer and forward: a decode loop re-enters one route step after step. Tensors are
    keyed by device, dtype and inference mode (an inference tensor cannot enter autograd later)."""
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = build()
    return hit


def _tensor_key(device: torch.device, dtype: torch.dtype | None = None) -> tuple:
    return (str(device), dtype, torch.is_inference_mode_enabled())


def _add_rows(layer: nn.Module, name: str, sign: float, out: torch.Tensor, rows: list[int],
              x: torch.Tensor, cache: dict) -> torch.Tensor:
    """out[rows] += sign·Δ_name(x[rows]), in place like AdaptedLinear.add_delta_ (the base output is fresh)."""
    if len(rows) == x.shape[0]:
        layer.add_delta_(name, out, x, sign)
        return out
    idx = route_cached(cache, ("rows", tuple(rows)) + _tensor_key(x.device),
                       lambda: torch.tensor(rows, device=x.device))
    xs = x.index_select(0, idx)
    delta = xs.new_zeros(*xs.shape[:-1], out.shape[-1])
    layer.add_delta_(name, delta, xs, sign)
    return out.index_add_(0, idx, delta.to(out.dtype))


def _add_(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return out.add_(delta.reshape(out.shape))


def _cached_row_index(cache: dict, groups: dict[str, list[int]], batch: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("row_index", tuple((name, tuple(rows)) for name, rows in groups.items()), batch) + _tensor_key(device, dtype)
    return route_cached(cache, key, lambda: _row_index(groups, batch, device, dtype))


def _row_index(groups: dict[str, list[int]], batch: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_slot, active): row i uses slot row_slot[i] of the stacked adapters; active[i] is 0 when no
    adapter of this kind applies (its slot points at slot 0 but its contribution is masked). `active` is in
    the activations' dtype: a float32 mask would promote what it multiplies, and bmm refuses mixed dtypes."""
    slot, active = [0] * batch, [0.0] * batch  # built in Python: one tensor each, made where it is used
    for k, rows in enumerate(groups.values()):
        for row in rows:
            slot[row], active[row] = k, 1.0
    return (torch.tensor(slot, dtype=torch.long, device=device), torch.tensor(active, dtype=dtype, device=device))


def dropout_rate(adapter: torch.nn.Module) -> float:
    """The probability with which `adapter` drops its input now: 0 in eval mode or without dropout."""
    drop = getattr(adapter, "dropout", None)
    return float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


def row_dropout(x3: torch.Tensor, adapters: list, slot: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """x3 (B, T, in) with row i dropped at the rate of its adapter, adapters[slot[i]] (inverted dropout, as
    nn.Dropout: kept entries scaled by 1/(1-p), p = 1 drops everything); rows with active[i] = 0 untouched.

    One mask for the whole batch, drawn from torch's RNG, so gradient checkpointing's recomputation (which
    restores the RNG state) draws the same mask."""
    rates = [dropout_rate(a) for a in adapters]
    if not any(rates):
        return x3
    rate = torch.tensor(rates, dtype=torch.float32, device=x3.device)[slot] * active.float()  # (B,)
    keep = (1.0 - rate)[:, None, None]  # (B, 1, 1)
    scale = torch.where(keep > 0, 1.0 / keep.clamp_min(1e-12), torch.zeros_like(keep))
    mask = (torch.rand(x3.shape, device=x3.device) < keep).to(x3.dtype)  # drawn in float32: bf16 would round p
    return x3 * (mask * scale.to(x3.dtype))


def _add_shared_basis(layer: nn.Module, key: str, x: torch.Tensor, out: torch.Tensor,
                      groups: dict[str, list[int]], cache: dict) -> torch.Tensor:
    basis = layer.bases[key]
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
    dtype = x.dtype  # adapters and bases may be held wider (float32 on a bf16 base): compute in x's dtype
    slot, active = _cached_row_index(cache, groups, batch, x.device, dtype)
    adapters = [layer.adapters[n] for n in groups]
    h = torch.matmul(row_dropout(x3, adapters, slot, active), basis.down.to(dtype).T)  # (B, T, r_max): one projection
    if adapters[0].method == "lora_xs":
        r_max = basis.rank
        cores = []
        for a in adapters:  # zero-pad lower ranks: exact, the basis is nested
            core = a.lora_R.to(dtype) * a.scaling
            if a.r < r_max:
                core = torch.nn.functional.pad(core, (0, r_max - a.r, 0, r_max - a.r))
            cores.append(core)
        stack = torch.stack(cores)[slot] * active[:, None, None]  # (B, r_max, r_max)
        h = torch.bmm(h, stack.transpose(1, 2))  # (B, T, r_max)
        if out.is_contiguous():  # out += h·upᵀ as one fused GEMM
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, r_max), basis.up.to(dtype).T)
            return out
        return _add_(out, torch.matmul(h, basis.up.to(dtype).T))
    # VeRA: diagonal cores
    d = torch.stack([a.vera_lambda_d.to(dtype) for a in adapters])[slot]  # (B, r)
    b = torch.stack([a.vera_lambda_b.to(dtype) for a in adapters])[slot] * active[:, None]  # (B, out)
    return _add_(out, torch.matmul(h * d[:, None, :], basis.up.to(dtype).T) * b[:, None, :])


def _add_packed(layer: nn.Module, x: torch.Tensor, out: torch.Tensor,
                names: tuple[str | None, ...], cache: dict) -> torch.Tensor:
    """Rows routed to packed LoRA-XS adapters: one projection, one gather of (B, r, r) cores, one up."""
    bank = layer.registry.bank
    merged = tuple(layer.registry.merged)
    key = ("slots", bank.version, merged, bank.cores.device)
    if key not in cache:  # on the bank's device: index_select needs its index there
        cache[key] = bank.row_slots(tuple(None if n in merged else n for n in names), bank.cores.device)  # (B,)
    slots = cache[key]
    basis = layer.bases["lora_xs"]
    k = min(bank.rank, basis.rank)  # the bank grows to its widest adapter; this layer's basis may be narrower
    down, up = basis.sliced(k)
    down, up = down.to(x.dtype), up.to(x.dtype)  # the basis may be held in another dtype than x
    batch = x.shape[0]
    h = torch.matmul(x.reshape(batch, -1, x.shape[-1]), down.T)  # (B, T, r)
    # (B, r, r); slot 0 is zero. The bank may be float32 on a bf16 base: only the gathered cores are cast
    cores = bank.cores[layer.bank_index, :, :k, :k].index_select(0, slots).to(x.dtype)  # entries past k are zero
    h = torch.bmm(h, cores.transpose(1, 2))
    if out.is_contiguous():  # out += h·upᵀ as one fused GEMM
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.T)
        return out
    return _add_(out, torch.matmul(h, up.T))


def _add_lora(layer: nn.Module, x: torch.Tensor, out: torch.Tensor,
              groups: dict[str, list[int]], cache: dict) -> torch.Tensor:
    if len(groups) <= GROUP_LOOP_MAX:
        for name, rows in groups.items():
            out = _add_rows(layer, name, 1.0, out, rows, x, cache)
        return out
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
    picked = None if torch.is_grad_enabled() or layer.training else _stacked_rows(layer, groups, batch, x, cache)
    if picked is None:  # training (gradients must reach each adapter's own parameters), or no common stack
        adapters = [layer.adapters[n] for n in groups]
        slot, active = _cached_row_index(cache, groups, batch, x.device, x.dtype)
        a_rows, b_rows = _gathered_lora(adapters, slot, active)
        h = torch.bmm(row_dropout(x3, adapters, slot, active), a_rows.transpose(1, 2))  # (B, T, r)
        return out + torch.bmm(h, b_rows.transpose(1, 2)).reshape(out.shape)
    a_rows, b_rows, coef = picked
    h = torch.bmm(x3, a_rows).mul_(coef)  # (B, T, r), scaled per row (0 for rows of other kinds)
    if out.is_contiguous():  # out += h·Bᵀ row by row, fused, no temporary
        out.view(batch, -1, out.shape[-1]).baddbmm_(h, b_rows)
        return out
    return _add_(out, torch.bmm(h, b_rows))


def _stacked_rows(layer: nn.Module, groups: dict[str, list[int]], batch: int, x: torch.Tensor,
                  cache: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each row's Aᵀ (B, in, r_max) and Bᵀ (B, r_max, out), picked from the layer's LoRA stack by one
    index_select each, and its scaling (B, 1, 1), 0 for rows of other adapter kinds.

    Kept in the route's cache, so decoding step after step under one route picks once. The picked rows are
    cast to x's dtype there, once (the stack is float32 on a bf16 base), never the whole stack per call. The entry is
    checked against the parameters' own version counters (bumped by any in-place edit; `.data` views
    keep their own counters, not the stack's) and against the stack still backing the first adapter.
    """
    device, dtype = x.device, x.dtype
    key = ("lora_stack_rows", id(layer), tuple(groups), dtype)  # groups change if an adapter is merged mid-route
    hit = cache.get(key)
    first = next(iter(groups))
    if hit is not None:
        stack, params, versions, picked = hit
        if (stack is getattr(layer, lora_stack.ATTR, None) and tuple(p._version for p in params) == versions
                and stack.holds(layer, first)):
            return picked
    stack = lora_stack.stack_for(layer, tuple(groups))
    if stack is None or stack.a.device != device:
        return None
    slot, coef = [0] * batch, [0.0] * batch  # built in Python: one tensor each, not one index_put per adapter
    for name, rows in groups.items():
        k = stack.index[name]
        for row in rows:
            slot[row], coef[row] = k, stack.scales[k]
    slot_t = torch.tensor(slot, device=device)
    picked = (stack.a.index_select(0, slot_t).to(dtype), stack.b.index_select(0, slot_t).to(dtype),
              torch.tensor(coef, dtype=dtype, device=device)[:, None, None])
    params = [p for name in groups for p in (layer.adapters[name].lora_A, layer.adapters[name].lora_B)]
    cache[key] = (stack, params, tuple(p._version for p in params), picked)
    return picked


def _gathered_lora(adapters: list, slot: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's A (B, r, in) and scaled B (B, out, r) in the activations' dtype (`active`'s), lower ranks
    zero-padded (exact), built from the adapters' own parameters so that gradients reach them (through the
    cast too; row i uses adapters[slot[i]], 0 where not active)."""
    dtype = active.dtype
    r_max = max(a.r for a in adapters)
    pad = torch.nn.functional.pad
    a_rows = torch.stack([pad(a.lora_A.to(dtype), (0, 0, 0, r_max - a.r)) for a in adapters])[slot]  # (B, r, in)
    b_rows = torch.stack([pad(a.lora_B.to(dtype) * a.scaling, (0, r_max - a.r)) for a in adapters])[slot]  # (B, out, r)
    return a_rows, b_rows * active[:, None, None]
