"""SmolLM2-135M (210 projections): LoRA-XS bases before/after, and a LoRA-XS load on a fresh base with the
bases cache.   PYTHONPATH=. python scripts/bench_bases_real.py [--rank 8] [--old]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import lorakit as lk
from lorakit import io
from lorakit.model.bases import lora_xs_bases_for, weight_as_out_in
from lorakit.model.bases_cache import BasesCache
from lorakit.methods import lora_xs as lora_xs_module
from lorakit.methods.basis import fingerprints_match
from lorakit.methods.lora_xs import basis_fingerprint
from lorakit.base_models.load import cache_root, load_base
from scripts.bench_bases import old_svd_basis


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--old", action="store_true", help="also time the old per-module float32 SVD on all modules")
    args = p.parse_args()
    models = cache_root()  # (the bases cache below moves $LORAKIT_CACHE; converted models stay put)
    model, _ = load_base("smollm2-135m", cache_dir=models)
    targets = lk.find_targets(model, lk.LoraXSConfig(r=args.rank))
    print(f"{len(targets)} modules, r={args.rank}, torch threads {torch.get_num_threads()}")
    if args.old:
        t0 = time.perf_counter()
        old = {n: old_svd_basis(weight_as_out_in(model.get_submodule(n)).detach(), args.rank) for n in targets}
        print(f"old: float32 torch.linalg.svd per module: {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    new = lora_xs_bases_for(model, targets, args.rank, cache=None, progress=False)
    print(f"new: float64 Gram + eigh, batched: {time.perf_counter() - t0:.2f} s")
    if args.old:
        bad = [n for n in targets if not fingerprints_match(old[n], basis_fingerprint(new[n], args.rank))]
        diff = max((old[n] - basis_fingerprint(new[n], args.rank)).abs().max().item() for n in targets)
        print(f"fingerprints old vs new: {len(targets) - len(bad)}/{len(targets)} match, max abs diff {diff:.2g}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORAKIT_CACHE"] = tmp
        lk.attach(model, lk.LoraXSConfig(r=args.rank), "a")  # fills the cache
        io.save_adapter(model, "a", f"{tmp}/ad")
        calls = []
        real = lora_xs_module.top_singular
        lora_xs_module.top_singular = lambda *a, **k: calls.append(1) or real(*a, **k)
        for _ in range(2):
            fresh, _ = load_base("smollm2-135m", cache_dir=models)
            t0 = time.perf_counter()
            io.load_adapter(fresh, f"{tmp}/ad", "a")
            print(f"load_adapter on a fresh base with the bases cache: {time.perf_counter() - t0:.2f} s "
                  f"({len(calls)} batched SVDs computed; {len(list(BasesCache(tmp + '/bases').directory.iterdir()))} "
                  "cache files)")


if __name__ == "__main__":
    main()
