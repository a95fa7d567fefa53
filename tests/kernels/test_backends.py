"""Every kernel backend equals the torch reference and each method's own `delta()`, per group of rows."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, LoraXSConfig, VeraConfig
from lorakit.errors import LorakitError
from lorakit.kernels import reference
from lorakit.kernels.backend import BACKENDS, ENV, KERNELS, choose
from lorakit.methods.dora import DoraAdapter, gain_minus_one
from lorakit.methods.lora import LoraAdapter
from lorakit.methods.lora_embedding import EmbeddingLoraAdapter
from lorakit.methods.lora_xs import LoraXSAdapter, svd_basis
from lorakit.methods.table import METHODS as TABLE
from lorakit.methods.vera import VeraAdapter, vera_basis, vera_projections
from tests.conftest import TOLERANCES

IN, OUT, R, GROUPS, TOKENS, VOCAB = 24, 20, 4, 3, 5, 30


def _randomised(adapter: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Non-zero trained tensors (B and b start at zero), so a wrong kernel cannot match by accident."""
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p))
    return adapter


def _lora(kernels, device, dtype, gen):
    adapters = [_randomised(LoraAdapter(IN, OUT, LoraConfig(r=R, lora_alpha=2 + i), torch.float32, device), gen)
                for i in range(GROUPS)]
    x = torch.randn(GROUPS, TOKENS, IN, generator=gen).to(device, dtype)
    out = torch.zeros(GROUPS, TOKENS, OUT, device=device, dtype=dtype)
    coef = torch.tensor([a.scaling for a in adapters], device=device)
    kernels.lora_rows(out, x, torch.stack([a.lora_A for a in adapters]),
                      torch.stack([a.lora_B.T for a in adapters]), coef)
    return out, torch.stack([a.delta(x[i]) for i, a in enumerate(adapters)])


def _dora(kernels, device, dtype, gen):
    """LoRA's rows into the base output, then DoRA's per-group rescale: g ⊙ (base − b + s·BAx) + b."""
    weight, bias = torch.randn(OUT, IN, generator=gen).to(device), torch.randn(OUT, generator=gen).to(device)
    adapters = [_randomised(DoraAdapter(IN, OUT, LoraConfig(r=R, lora_alpha=2 + i, use_dora=True), weight,
                                        torch.float32, device), gen) for i in range(GROUPS)]
    x = torch.randn(GROUPS, TOKENS, IN, generator=gen).to(device, dtype)
    base = torch.nn.functional.linear(x, weight.to(dtype), bias.to(dtype))
    out = base.clone()
    coef = torch.tensor([a.scaling for a in adapters], device=device)
    kernels.lora_rows(out, x, torch.stack([a.lora_A for a in adapters]), torch.stack([a.lora_B.T for a in adapters]),
                      coef)
    gains = torch.stack([gain_minus_one(weight, *a.factors(), a.lora_magnitude_vector) for a in adapters])
    out = kernels.rescale_rows(out, gains, bias, in_place=True)
    return out - base, torch.stack([a.delta(x[i], weight) for i, a in enumerate(adapters)])


def _lora_xs(kernels, device, dtype, gen):
    basis = svd_basis(torch.randn(OUT, IN, generator=gen).to(device), R)
    adapters = [_randomised(LoraXSAdapter(LoraXSConfig(r=R, lora_alpha=R + i), torch.float32, device), gen)
                for i in range(GROUPS)]
    x = torch.randn(GROUPS, TOKENS, IN, generator=gen).to(device, dtype)
    out = torch.zeros(GROUPS, TOKENS, OUT, device=device, dtype=dtype)
    cores = torch.stack([a.lora_R * a.scaling for a in adapters])
    kernels.core_rows(out, x, basis.down, basis.up, cores)
    return out, torch.stack([a.delta(x[i], basis) for i, a in enumerate(adapters)])


def _vera(kernels, device, dtype, gen):
    config = VeraConfig(r=R)
    shared = vera_projections(config.projection_seed, R, IN, OUT)
    basis = vera_basis((shared[0].to(device), shared[1].to(device)), IN, OUT, torch.float32)
    adapters = [_randomised(VeraAdapter(OUT, config, torch.float32, device), gen) for _ in range(GROUPS)]
    x = torch.randn(GROUPS, TOKENS, IN, generator=gen).to(device, dtype)
    out = torch.zeros(GROUPS, TOKENS, OUT, device=device, dtype=dtype)
    kernels.vera_rows(out, x, basis.down, basis.up, torch.stack([a.vera_lambda_d for a in adapters]),
                      torch.stack([a.vera_lambda_b for a in adapters]))
    return out, torch.stack([a.delta(x[i], basis) for i, a in enumerate(adapters)])


def _embedding(kernels, device, dtype, gen):
    adapters = [_randomised(EmbeddingLoraAdapter(VOCAB, OUT, LoraConfig(r=R, lora_alpha=1 + i), torch.float32,
                                                 device), gen) for i in range(GROUPS)]
    ids = torch.randint(0, VOCAB, (GROUPS, TOKENS), generator=gen).to(device)
    out = torch.zeros(GROUPS, TOKENS, OUT, device=device, dtype=dtype)
    index = torch.tensor([2, 0, 1], device=device)  # groups read the stack out of order
    stack = [adapters[j] for j in (1, 2, 0)]  # so group i's adapter is adapters[i]
    coef = torch.tensor([adapters[i].scaling for i in range(GROUPS)], device=device)
    kernels.embedding_rows(out, ids, torch.stack([a.lora_A for a in stack]), torch.stack([a.lora_B.T for a in stack]),
                           index, coef)
    return out, torch.stack([a.delta(ids[i]).to(dtype) for i, a in enumerate(adapters)])


METHODS = {"lora": _lora, "dora": _dora, "lora_xs": _lora_xs, "vera": _vera, "embedding": _embedding}


def test_every_method_of_the_table_is_held_here():
    """A new method's row in lorakit.methods.table names a kernel; this file must then check it."""
    assert {m.name for m in TABLE.values() if m.kernel is not None} <= set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_equals_reference_and_each_methods_delta(backend, method, device, dtype):
    run = METHODS[method]
    ours, by_delta = run(choose(backend), device, dtype, torch.Generator().manual_seed(0))
    ref, _ = run(choose("torch"), device, dtype, torch.Generator().manual_seed(0))
    assert ours.abs().amax() > 0  # the adapters were non-trivial
    tol = TOLERANCES[dtype] * max(1.0, by_delta.float().abs().amax().item())
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=tol)
    torch.testing.assert_close(ours.float(), by_delta.float(), rtol=0, atol=tol)


def test_one_group_is_the_whole_batch(device):
    """n = 1 (one adapter for every row, plain GEMMs) equals the same adapter given to each row (batched)."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, R, IN, generator=gen).to(device), torch.randn(1, R, OUT, generator=gen).to(device)
    x = torch.randn(GROUPS, TOKENS, IN, generator=gen).to(device)
    whole, per_row = torch.zeros(GROUPS, TOKENS, OUT, device=device), torch.zeros(GROUPS, TOKENS, OUT, device=device)
    KERNELS.lora_rows(whole, x, a, b, 0.5)
    KERNELS.lora_rows(per_row, x, a.expand(GROUPS, -1, -1), b.expand(GROUPS, -1, -1), torch.full((GROUPS,), 0.5, device=device))
    torch.testing.assert_close(whole, per_row, rtol=1e-5, atol=1e-5)


def test_the_layers_call_the_chosen_backend():
    assert KERNELS.name in BACKENDS and KERNELS.lora_rows is choose(KERNELS.name).lora_rows
    assert choose("torch").core_rows is reference.add_core_rows_


def test_an_unknown_backend_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(ENV, "fused-nonexistent")
    with pytest.raises(LorakitError, match="fused-nonexistent.*known: torch"):
        choose()
