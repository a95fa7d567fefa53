"""Time LoRA-XS basis set-up: the old per-module float32 torch.linalg.svd against lorakit.model.bases.

    python scripts/bench_bases.py --shape tinyllama --device cuda --rank 16
TinyLlama-1.1B's 154 projections (22 layers × q,k,v,o,gate,up,down) as random nn.Linear layers; the
old path is timed on one layer's 7 modules and scaled by 22 (it takes ~26 s in full on an H100).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lorakit.model.bases import lora_xs_bases_for
from lorakit.methods.lora_xs import basis_fingerprint
from lorakit.methods.basis import fingerprints_match

SHAPES = {  # one decoder layer: (in, out) of q, k, v, o, gate, up, down
    "tinyllama": (22, [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048), (2048, 5632), (2048, 5632),
                       (5632, 2048)]),
    "smollm2": (30, [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]),
}


def old_svd_basis(w: torch.Tensor, r: int) -> torch.Tensor:
    """The pre-change computation (float32 full SVD), returning its fingerprint (2r,)."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    u, s = u[:, :r], s[:r]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(r, device=w.device)])
    u = u * signs
    i = torch.arange(u.shape[0], dtype=torch.float64, device=w.device)
    probe = torch.cos(0.618 * i * 2 + 0.5).float()
    return torch.cat([s, probe @ u])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    layers, shapes = SHAPES[args.shape]
    torch.manual_seed(0)
    model = nn.ModuleDict()
    for i in range(layers):
        for j, (fi, fo) in enumerate(shapes):
            lin = nn.Linear(fi, fo, bias=False, device=args.device, dtype=dtype)
            with torch.no_grad():  # a decaying spectrum, like trained weights
                lin.weight.copy_(torch.randn(fo, fi, device=args.device) * torch.linspace(1, 0.05, fi,
                                 device=args.device) / fi**0.5)
            model[f"l{i}_{j}"] = lin
    names = list(model.keys())
    print(f"{len(names)} modules ({args.shape}), device {args.device}"
          f" {torch.cuda.get_device_name() if args.device == 'cuda' else ''}, dtype {args.dtype}, r={args.rank}")
    t0 = time.perf_counter()
    first = lora_xs_bases_for(model, names, args.rank, cache=None, progress=False)
    sync(args.device)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora_xs_bases_for(model, names, args.rank, cache=None, progress=False)
    sync(args.device)
    warm = time.perf_counter() - t0
    print(f"new (float64 Gram + eigh, batched): {cold:.2f} s first call, {warm:.2f} s again")
    one_layer = names[: len(shapes)]
    old_svd_basis(model[one_layer[0]].weight, args.rank)
    sync(args.device)
    t0 = time.perf_counter()
    old = {n: old_svd_basis(model[n].weight.detach(), args.rank) for n in one_layer}
    sync(args.device)
    per_layer = time.perf_counter() - t0
    print(f"old (float32 torch.linalg.svd per module): {per_layer:.2f} s per layer -> ~{per_layer * layers:.1f} s "
          f"for {len(names)} modules")
    ok = [fingerprints_match(old[n].cpu(), basis_fingerprint(first[n], args.rank).cpu()) for n in one_layer]
    diffs = [(old[n].cpu() - basis_fingerprint(first[n], args.rank).cpu()).abs().max().item() for n in one_layer]
    print(f"fingerprints new vs old match: {ok}; max abs diffs {[f'{d:.2g}' for d in diffs]}")
    for n in one_layer[:1] + one_layer[4:5]:
        w = model[n].weight.detach()
        g = (w.double() @ w.double().T) if w.shape[0] <= w.shape[1] else (w.double().T @ w.double())
        for dt in (torch.float64, torch.float32):
            torch.linalg.eigh(g.to(dt))
            sync(args.device)
            t0 = time.perf_counter()
            torch.linalg.eigh(g.to(dt))
            sync(args.device)
            print(f"  eigh {tuple(g.shape)} {dt}: {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
