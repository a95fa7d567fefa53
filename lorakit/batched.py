"""Per-row routing: row i of a batch runs adapter names[i] (or the base model when None).

    shared-basis methods (LoRA-XS, VeRA)             LoRA
    h = x·Aᵀ            once for all rows (B,T,r)    few distinct adapters: group rows, one pair of
    h_i = h_i·C_iᵀ      per-row core: R_i (r×r),     matmuls per adapter, index_add back
                        or diag(d_i)                 many: gather each row's A_i, B_i, two bmm
    out += h·Bᵀ (⊙ b_i) once for all rows

So a batch mixing any number of LoRA-XS adapters costs about one adapter: the per-row part is an
r×r product. Adapters of lower rank are zero-padded to the basis rank (exact: the top-r singular
directions are a prefix of the top-r_max ones). Merged adapters are subtracted from rows that do not
route to them, so every row sees exactly what it asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.layer import AdaptedLinear

# With at most this many distinct LoRA adapters in a batch, a loop over groups beats gathering.
GROUP_LOOP_MAX = 4


def group_rows(names: tuple[str | None, ...]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return groups


def add_per_row_deltas(layer: "AdaptedLinear", x: torch.Tensor, out: torch.Tensor,
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
            out = _add_shared_basis(layer, kind, x, out, groups)
    for m in merged:  # rows not routed to a merged adapter must not see it
        rows = [i for i, n in enumerate(names) if n != m]
        if rows:
            out = _index_add(out, rows, lambda xs: -layer.delta(m, xs), x)
    return out


def _index_add(out: torch.Tensor, rows: list[int], fn, x: torch.Tensor) -> torch.Tensor:
    if len(rows) == x.shape[0]:
        return out + fn(x)
    idx = torch.tensor(rows, device=x.device)
    return out.index_add(0, idx, fn(x.index_select(0, idx)).to(out.dtype))


def _row_index(groups: dict[str, list[int]], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_slot, active): row i uses slot row_slot[i] of the stacked adapters; active[i] is 0 when no
    adapter of this kind applies (its slot points at slot 0 but its contribution is masked)."""
    slot = torch.zeros(batch, dtype=torch.long)
    active = torch.zeros(batch)
    for k, rows in enumerate(groups.values()):
        slot[rows] = k
        active[rows] = 1.0
    return slot.to(device), active.to(device)


def _add_shared_basis(layer: "AdaptedLinear", key: str, x: torch.Tensor, out: torch.Tensor,
                      groups: dict[str, list[int]]) -> torch.Tensor:
    basis = layer.bases[key]
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
    h = torch.matmul(x3, basis.down.T)  # (B, T, r_max): one projection for every row
    slot, active = _row_index(groups, batch, x.device)
    adapters = [layer.adapters[n] for n in groups]
    if adapters[0].method == "lora_xs":
        r_max = basis.rank
        cores = []
        for a in adapters:  # zero-pad lower ranks: exact, the basis is nested
            core = a.lora_R * a.scaling
            if a.r < r_max:
                core = torch.nn.functional.pad(core, (0, r_max - a.r, 0, r_max - a.r))
            cores.append(core)
        stack = torch.stack(cores)[slot] * active[:, None, None]  # (B, r_max, r_max)
        h = torch.bmm(h, stack.transpose(1, 2))  # (B, T, r_max)
        delta = torch.matmul(h, basis.up.T)  # (B, T, out)
    else:  # VeRA: diagonal cores
        d = torch.stack([a.vera_lambda_d for a in adapters])[slot]  # (B, r)
        b = torch.stack([a.vera_lambda_b for a in adapters])[slot] * active[:, None]  # (B, out)
        delta = torch.matmul(h * d[:, None, :], basis.up.T) * b[:, None, :]
    return out + delta.reshape(out.shape)


def _add_packed(layer: "AdaptedLinear", x: torch.Tensor, out: torch.Tensor,
                names: tuple[str | None, ...], cache: dict) -> torch.Tensor:
    """Rows routed to packed LoRA-XS adapters: one projection, one gather of (B, r, r) cores, one up."""
    bank = layer.registry.bank
    merged = tuple(layer.registry.merged)
    key = ("slots", bank.version, merged, x.device)
    if key not in cache:
        cache[key] = bank.row_slots(tuple(None if n in merged else n for n in names), x.device)  # (B,)
    slots = cache[key]
    down, up = layer.bases["lora_xs"].sliced(bank.rank)
    batch = x.shape[0]
    h = torch.matmul(x.reshape(batch, -1, x.shape[-1]), down.T)  # (B, T, r)
    cores = bank.cores[layer.bank_index].index_select(0, slots)  # (B, r, r); slot 0 is zero
    h = torch.bmm(h, cores.transpose(1, 2))
    return out + torch.matmul(h, up.T).reshape(out.shape)


def _add_lora(layer: "AdaptedLinear", x: torch.Tensor, out: torch.Tensor,
              groups: dict[str, list[int]], cache: dict) -> torch.Tensor:
    if len(groups) <= GROUP_LOOP_MAX:
        for name, rows in groups.items():
            out = _index_add(out, rows, lambda xs, n=name: layer.delta(n, xs), x)
        return out
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
    adapters = [layer.adapters[n] for n in groups]
    a_rows, b_rows = _gathered_lora(layer, adapters, groups, batch, x.device, cache)
    h = torch.bmm(adapters[0].dropout(x3), a_rows.transpose(1, 2))  # (B, T, r)
    return out + torch.bmm(h, b_rows.transpose(1, 2)).reshape(out.shape)


def _gathered_lora(layer: "AdaptedLinear", adapters: list, groups: dict[str, list[int]], batch: int,
                   device: torch.device, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's A (B, r, in) and scaled B (B, out, r), lower ranks zero-padded (exact).

    In inference the gathered tensors are kept in the route's cache, so decoding step after step
    under one route gathers once; parameter version counters guard against in-place edits.
    """
    versions = tuple(a.lora_A._version + a.lora_B._version for a in adapters)
    key = ("lora_rows", id(layer), layer.registry.version)
    hit = cache.get(key)
    if hit is not None and hit[0] == versions and not torch.is_grad_enabled():
        return hit[1], hit[2]
    slot, active = _row_index(groups, batch, device)
    r_max = max(a.r for a in adapters)
    pad = torch.nn.functional.pad
    a_rows = torch.stack([pad(a.lora_A, (0, 0, 0, r_max - a.r)) for a in adapters])[slot]  # (B, r, in)
    b_rows = torch.stack([pad(a.lora_B * a.scaling, (0, r_max - a.r)) for a in adapters])[slot]  # (B, out, r)
    b_rows = b_rows * active[:, None, None]
    if not torch.is_grad_enabled():
        cache[key] = (versions, a_rows, b_rows)
    return a_rows, b_rows
