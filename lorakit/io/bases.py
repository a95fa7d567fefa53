"""A file of LoRA-XS bases, so a big model's SVDs are computed once and shared by every process.

    <module>.down (r_max, in)   Σ_r·V_rᵀ        <module>.up (out, r_max)   U_r
    <module>.fingerprint (2·r_max,)

`load_bases` checks each basis against the model's own W before installing it: W·downᵀ must equal
up·Σ² and upᵀ·W must equal down (two matmuls, much cheaper than an SVD), so bases for another model
are refused. Afterwards attach() and load_adapter() reuse them for any LoRA-XS rank up to r_max.
(Within one machine the per-weight bases cache, lorakit.model.bases_cache, does this automatically; a bases
file is for shipping them elsewhere.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.model.bases import weight_as_out_in
from lorakit.errors import AdapterMismatchError, AdapterNotFoundError, CorruptAdapterError, LorakitError
from lorakit.io.atomic import atomic_write_safetensors
from lorakit.io.files import check_finite, expect_keys, parse_safetensors
from lorakit.io.guard import restore_on_error, target_shapes
from lorakit.io.peft_lora import base_model_name
from lorakit.io.safe_open import read_safetensors_bytes
from lorakit.layer.linear import adapted_layers
from lorakit.methods.basis import Basis
from lorakit.methods.lora_xs import basis_residuals
from lorakit.model.record import install_bases

KIND = "lora_xs"
_PARTS = ("down", "up", "fingerprint")


def save_bases(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write every LoRA-XS basis on the model to one safetensors file (atomically)."""
    tensors = {}
    for module, layer in adapted_layers(model).items():
        basis = layer.basis(KIND)
        if basis is not None:
            for part in _PARTS:
                tensors[f"{module}.{part}"] = getattr(basis, part)
    if not tensors:
        raise LorakitError("the model holds no LoRA-XS bases: attach or load a LoRA-XS adapter first")
    metadata = {"format": "pt", "lorakit_bases": KIND, "lorakit_format": "1",
                "base_model_name_or_path": base_model_name(model) or ""}
    return atomic_write_safetensors(path, tensors, metadata)


def _check_basis(weight: torch.Tensor, basis: Basis, module: str, where: Path) -> None:
    """Refuse a basis that is not made of singular triplets of this W."""
    tol = 1e-3 if weight.dtype == torch.float32 else 3e-2
    err_right, err_left = basis_residuals(weight, basis)
    if not (err_right <= tol and err_left <= tol):  # NaN fails too
        raise AdapterMismatchError(f"{where}: the basis of module {module} is not an SVD of this model's weight "
                                   f"(relative residuals {err_right:.2g}, {err_left:.2g} > {tol}): bases for "
                                   "another base model?")


def load_bases(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Install the LoRA-XS bases of file `path` on the model (verified first); returns the modules."""
    path = Path(path)
    try:
        data = read_safetensors_bytes(path)  # guarded: not-a-file or a size its header denies is refused
    except FileNotFoundError:
        raise AdapterNotFoundError(f"bases file {path} does not exist") from None
    tensors, metadata = parse_safetensors(data, path)
    if metadata.get("lorakit_bases") != KIND:
        raise CorruptAdapterError(f"{path} is not a lorakit bases file (metadata {metadata})")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    expect_keys(set(tensors), {f"{m}.{p}" for m in modules for p in _PARTS}, path)
    shapes = target_shapes(model, modules, path)
    check_finite(tensors, path)
    bases = {}
    for module in modules:
        in_f, out_f = shapes[module]
        down, up, fp = (tensors[f"{module}.{p}"] for p in _PARTS)
        k = down.shape[0] if down.dim() == 2 else -1
        if (tuple(down.shape), tuple(up.shape), tuple(fp.shape)) != ((k, in_f), (out_f, k), (2 * k,)):
            raise AdapterMismatchError(f"{path}: module {module} ({in_f}->{out_f}) expects down (k, {in_f}), "
                                       f"up ({out_f}, k), fingerprint (2k,); file has {tuple(down.shape)}, "
                                       f"{tuple(up.shape)}, {tuple(fp.shape)}")
        weight = weight_as_out_in(model.get_submodule(module))
        basis = Basis(down.to(weight.device, weight.dtype), up.to(weight.device, weight.dtype),
                      fp.float().to(weight.device))
        _check_basis(weight, basis, module, path)
        bases[module] = basis
    with restore_on_error(model, "", modules):
        install_bases(model, KIND, bases)
    return modules
