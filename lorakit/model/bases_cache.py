"""A disk cache of LoRA-XS bases, so a base model's SVDs are computed once per machine, not per process.

    $LORAKIT_CACHE/bases/<key>.safetensors   (default ~/.cache/lorakit/bases; LORAKIT_BASES_CACHE=0: off)
        down (r, in)   up (out, r)   fingerprint (2r,)        metadata: key, shape, dtype

`key` hashes what the basis depends on: the weight's shape, dtype and 8192 values sampled across it
(cheap: no pass over the whole weight). A sample can miss a change elsewhere, so every hit is
verified against the weight itself (lorakit.methods.lora_xs.basis_residuals: two thin matmuls);
a file that fails to parse or to verify is ignored with a warning and recomputed, never trusted.
Files are written to a temp name, fsynced and renamed (lorakit.atomic_write), so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load, save as safetensors_save

from lorakit.atomic_write import replace_file
from lorakit.methods.basis import Basis
from lorakit.methods.lora_xs import basis_residuals

ENABLE_ENV = "LORAKIT_BASES_CACHE"  # "0" turns the cache off
ROOT_ENV = "LORAKIT_CACHE"  # lorakit's cache root, shared with lorakit.base_models.load
VERSION = "lora_xs-1"  # bump when the basis computation changes what it stores
SAMPLES = 8192
MIN_NUMEL = 1 << 16  # smaller weights decompose in well under a millisecond: not worth a file


def weight_key(weight: torch.Tensor) -> str:
    """A content key of an (out, in) weight from its shape, dtype and a strided sample of its values."""
    out_f, in_f = weight.shape
    n = out_f * in_f
    idx = torch.linspace(0, n - 1, min(SAMPLES, n), dtype=torch.float64).long()
    idx = torch.cat([idx, (idx * 7919 + 104729) % n])  # a second, scattered sample
    values = weight.detach()[idx // in_f, idx % in_f]  # works on transposed views without a copy
    digest = hashlib.sha256(f"{VERSION}|{tuple(weight.shape)}|{weight.dtype}|".encode())
    digest.update(values.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:40]


class BasesCache:
    """Cached LoRA-XS bases in one directory; `get` verifies, `put` writes atomically."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, weight: torch.Tensor, r: int, key: str | None = None) -> Basis | None:
        """The cached basis of rank ≥ r for `weight`, sliced to r and on its device; None on a miss."""
        path = self.path(key or weight_key(weight))
        if not path.is_file():
            return None
        try:
            tensors = safetensors_load(path.read_bytes())
            down, up, fp = tensors["down"], tensors["up"], tensors["fingerprint"]
            k = down.shape[0]
            if down.shape != (k, weight.shape[1]) or up.shape != (weight.shape[0], k) or fp.shape != (2 * k,):
                raise ValueError(f"shapes {tuple(down.shape)}, {tuple(up.shape)}, {tuple(fp.shape)} do not fit "
                                 f"a weight of shape {tuple(weight.shape)}")
        except Exception as exc:  # a truncated, garbled or foreign file: recompute, never trust it
            warnings.warn(f"ignoring corrupt LoRA-XS bases cache file {path}: {type(exc).__name__}: {exc}",
                          stacklevel=3)
            return None
        if k < r:
            return None
        fp = torch.cat([fp[:r], fp[k : k + r]]).float()
        basis = Basis(down[:r].to(weight.device, weight.dtype).contiguous(),
                      up[:, :r].to(weight.device, weight.dtype).contiguous(), fp.to(weight.device))
        tol = 1e-3 if weight.dtype == torch.float32 else 3e-2
        residuals = basis_residuals(weight, basis)
        if not all(e <= tol for e in residuals):  # nan fails too
            warnings.warn(f"ignoring LoRA-XS bases cache file {path}: it is not an SVD of this weight "
                          f"(relative residuals {residuals[0]:.2g}, {residuals[1]:.2g} > {tol})", stacklevel=3)
            return None
        return basis

    def put(self, weight: torch.Tensor, basis: Basis, key: str | None = None) -> None:
        """Store `basis` for `weight` atomically; a cache that cannot be written is skipped."""
        path = self.path(key or weight_key(weight))
        tensors = {"down": basis.down.detach().cpu().contiguous(), "up": basis.up.detach().cpu().contiguous(),
                   "fingerprint": basis.fingerprint.detach().float().cpu().contiguous()}
        metadata = {"lorakit_bases": VERSION, "shape": str(tuple(weight.shape)), "dtype": str(weight.dtype)}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_file(path, safetensors_save(tensors, metadata))
        except OSError as exc:  # read-only home, full disk: the bases are still correct, just not kept
            warnings.warn(f"could not write LoRA-XS bases cache {path}: {exc}", stacklevel=3)


def default_cache() -> BasesCache | None:
    """$LORAKIT_CACHE/bases (else ~/.cache/lorakit/bases), or None when LORAKIT_BASES_CACHE=0."""
    if os.environ.get(ENABLE_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    root = os.environ.get(ROOT_ENV)
    return BasesCache(Path(root).expanduser() / "bases" if root else Path.home() / ".cache" / "lorakit" / "bases")
