"""The torch reference of every routed delta: the definition each fused backend is tested equal to.

Each function adds, in place into `out` (the fresh base output), one kind's deltas for a batch split into n
equal groups of rows, group i using its own adapter (gathered from a slot stack; zero for no adapter). n = 1
is one adapter for the whole batch (plain GEMMs); n = rows is one adapter per row (batched products).

    add_lora_rows_       LoRA (and a merged adapter taken back out)    out += coef_i·B_i(A_i·x_i)
    add_core_rows_       LoRA-XS over the shared SVD basis              out += B·(R_i·(A·x_i))
    add_vera_rows_       VeRA over the shared random projections        out += b_i ⊙ B(d_i ⊙ A·x_i)
    add_embedding_rows_  LoRA on an embedding table                     out += coef_i·A_iᵀ[ids_i]·B_iᵀ
    rescale_rows         DoRA's magnitude, on the base output           out + c_i ⊙ (out − bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def add_lora_rows_(out: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
                   coef: torch.Tensor | float) -> None:
    """out += coef_i·(x_i·A_iᵀ)·B_iᵀ for every group i of rows, in place.

    a_rows (n, r, in) and b_rows (n, r, out) are each group's A and Bᵀ (gathered from a slot stack, zero for a
    group without an adapter); `coef` (n,) scales each group (α/r, −1 to take a merged adapter back out, 0
    for nothing), or is one float for all. The batch is split into n equal groups of rows: n = 1 runs one
    adapter over the whole batch (two GEMMs), n = batch rows gives every row its own (bmm). One path."""
    n, dtype = a_rows.shape[0], x.dtype
    x3 = x.reshape(n, -1, x.shape[-1])  # (n, tokens per group, in)
    a_rows, b_rows = a_rows.to(dtype), b_rows.to(dtype)
    if n == 1:  # plain GEMMs (a shape, so fixed for a compiled graph), A applied as PEFT's nn.Linear applies
        # it (F.linear over an (r, in) weight): BLAS then rounds the sums the same way
        h = F.linear(x3[0], a_rows[0])  # (T, r)
        b_rows = b_rows[0]
        out = out.view(-1, out.shape[-1]) if out.is_contiguous() else out
    else:
        h = torch.bmm(x3, a_rows.transpose(1, 2))  # (n, T, r)
    alpha = 1.0
    if isinstance(coef, torch.Tensor):  # per group; r-wide, so cheaper on h than on the output
        h = h.mul_(coef.to(dtype).view(-1, *([1] * (h.dim() - 1))))
    else:  # one adapter for the batch: scaled after the product, as PEFT rounds it
        alpha = coef
    if n == 1 and out.dim() == 2:  # out += h·Bᵀ, fused, no output-sized temporary
        out.addmm_(h, b_rows, alpha=alpha)
    elif out.is_contiguous():  # the same, group by group
        out.view(n, -1, out.shape[-1]).baddbmm_(h, b_rows, alpha=alpha)
    else:
        out.add_(torch.matmul(h, b_rows).reshape(out.shape), alpha=alpha)


def add_core_rows_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                   cores: torch.Tensor) -> None:
    """out += B·(R_i·(A·x_i)) for every group i of rows, in place: the shared basis is applied once for the
    whole batch, the per-group part is an r×r product. `down` (k, in) and `up` (out, k) are the basis's
    first k directions; `cores` (n, k, k) are the groups' scaled cores (zero for groups without one), the
    batch split into n equal groups (n = 1: one adapter for all rows; n = rows: one per row)."""
    n, k, dtype = cores.shape[0], down.shape[0], x.dtype
    h = torch.matmul(x.reshape(n, -1, x.shape[-1]), down.to(dtype).T)  # (n, T, k): one projection
    h = torch.bmm(h, cores.to(dtype).transpose(1, 2))  # (n, T, k)
    if out.is_contiguous():  # out += h·Bᵀ as one fused GEMM
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, k), up.to(dtype).T)
    else:
        out.add_(torch.matmul(h, up.to(dtype).T).reshape(out.shape))


def add_vera_rows_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, d: torch.Tensor,
                   b: torch.Tensor) -> None:
    """out += b_i ⊙ B(d_i ⊙ A·x_i) for every group i of rows, in place: the shared projections once for the
    batch, the per-group vectors d (n, r) and b (n, out) element-wise (zero for groups without an adapter;
    the batch split into n equal groups as in add_lora_rows_)."""
    n, dtype = d.shape[0], x.dtype
    h = torch.matmul(x.reshape(n, -1, x.shape[-1]), down.to(dtype).T) * d.to(dtype)[:, None, :]  # (n, T, r)
    y = torch.matmul(h, up.to(dtype).T).mul_(b.to(dtype)[:, None, :])  # (n, T, out)
    out.add_(y.reshape(out.shape))


def add_embedding_rows_(out: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
                        coef: torch.Tensor | float, padding_idx: int | None = None) -> None:
    """out += coef_i·A_{index_i}ᵀ[ids_i]·B_{index_i}ᵀ for every group i of rows, in place.

    out (..., D) holds the base embeddings of `ids` (...); a (C, r, V) and b (C, r, D) are stacks of A and Bᵀ
    (as lorakit.layer.slots holds them) and index (n,) picks each group's; `coef` (n,) scales each group, or is one
    float for all. Only the picked columns of A are read (n·T·r numbers), never a whole (r, V) table per
    group. Ids equal to `padding_idx` give A no gradient, as F.embedding's padding_idx does."""
    n, dtype = index.shape[0], out.dtype
    ids2 = ids.reshape(n, -1)  # (n, T): the batch split into n equal groups of rows
    h = a[index[:, None], :, ids2]  # (n, T, r)
    if padding_idx is not None and h.requires_grad:
        h = torch.where((ids2 == padding_idx)[..., None], h.detach(), h)
    h = h.to(dtype)
    alpha = 1.0
    if isinstance(coef, torch.Tensor):
        h = h * coef.to(dtype)[:, None, None]
    else:  # one adapter for the batch: scaled after the product, as PEFT rounds it
        alpha = coef
    out.view(n, -1, out.shape[-1]).baddbmm_(h, b.index_select(0, index).to(dtype), alpha=alpha)  # (n, T, D)


def rescale_rows(out: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """out + c ⊙ (out − bias), per group of rows: out (..., out) the base output, c (n, out) each group's
    g − 1 (the batch split into n equal groups, as add_lora_rows_). `in_place` only where
    nothing needs out's old value for gradients (inference)."""
    n, width = c.shape
    c = c.to(out.dtype)[:, None, :]  # (n, 1, out)
    shift = None if bias is None else (c * bias.to(out.dtype))  # (n, 1, out): c ⊙ b, r-cheap
    if in_place and out.is_contiguous():
        y = out.view(n, -1, width).mul_(1 + c)
        if shift is not None:
            y.sub_(shift)
        return out
    y = out.reshape(n, -1, width)
    y = y * (1 + c) if shift is None else torch.addcmul(-shift, y, 1 + c)
    return y.reshape(out.shape)
