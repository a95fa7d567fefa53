"""Per-row routing: row i of a batch runs adapter names[i] (or the base model when None).

Rows are grouped by adapter and each group's delta is added with one index_add, so the cost grows
with the number of distinct adapters in the batch, not with the batch size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.layer import AdaptedLinear


def group_rows(names: tuple[str | None, ...]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return groups


def add_per_row_deltas(layer: "AdaptedLinear", x: torch.Tensor, out: torch.Tensor,
                       names: tuple[str | None, ...]) -> torch.Tensor:
    """out[i] += Δ_{names[i]}(x[i]) − Σ_{merged m ≠ names[i]} Δ_m(x[i]), for every row i."""
    merged = layer.merged_names()
    for name, rows in group_rows(names).items():
        add = name is not None and name in layer.adapters and name not in merged
        subtract = [m for m in merged if m != name]
        if not add and not subtract:
            continue
        if len(rows) == x.shape[0]:
            idx, xs = None, x
        else:
            idx = torch.tensor(rows, device=x.device)
            xs = x.index_select(0, idx)
        change = layer.delta(name, xs) if add else None
        for m in subtract:
            change = -layer.delta(m, xs) if change is None else change - layer.delta(m, xs)
        out = out + change if idx is None else out.index_add(0, idx, change.to(out.dtype))
    return out
