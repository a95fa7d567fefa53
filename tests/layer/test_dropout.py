"""Dropout in per-row (mixed) batches: each row is dropped at its own adapter's rate, base rows never.

The layers here are made transparent (every projection the identity, every scale 1), so an adapter's
delta on an all-ones input *is* its dropout mask, scaled by 1/(1-p): the rate each row saw can be read off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit

WIDTH, TOKENS = 8, 64  # 512 mask entries per row: a rate is read to about ±0.02 (one standard deviation)


def _config(kind: str, p: float):
    if kind == "lora":
        return lorakit.LoraConfig(r=WIDTH, lora_alpha=WIDTH, lora_dropout=p, target_modules=["0"])
    if kind == "lora_xs":
        return lorakit.LoraXSConfig(r=WIDTH, lora_alpha=WIDTH, lora_dropout=p, target_modules=["0"])
    return lorakit.VeraConfig(r=WIDTH, vera_dropout=p, target_modules=["0"])


def transparent_model(specs: dict[str, tuple[str, float]], device: torch.device = torch.device("cpu")) -> nn.Module:
    """One Linear(8, 8) with adapters name -> (kind, dropout p), each adapter's Δ(x) = x exactly in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False)).to(device)
    for name, (kind, p) in specs.items():
        lorakit.attach(model, _config(kind, p), name)
    layer = model[0]
    eye = torch.eye(WIDTH, device=device)
    with torch.no_grad():
        for basis in layer.bases.values():
            basis.down.copy_(eye)
            basis.up.copy_(eye)
        for adapter in layer.adapters.values():
            for p in adapter.parameters():
                p.copy_(eye if p.dim() == 2 else torch.ones_like(p))
    return model


def row_deltas(model: nn.Module, names: list[str | None]) -> torch.Tensor:
    """(B, T*WIDTH): each row's adapter delta on an all-ones input, in the model's current mode."""
    x = torch.ones(len(names), TOKENS, WIDTH, device=model[0].weight.device)
    with lorakit.use_adapter(model, names):
        out = model(x)
    with lorakit.disable_adapters(model):
        base = model(x)
    return (out - base).detach().reshape(len(names), -1).cpu()


def check_rows(deltas: torch.Tensor, names: list[str | None], rates: dict[str | None, float]) -> None:
    for row, name in enumerate(names):
        p = rates[name]
        d = deltas[row]
        if name is None or p >= 1.0:
            assert torch.equal(d, torch.zeros_like(d)), f"row {row} ({name}, p={p}) must see exactly the base"
            continue
        kept = d != 0
        # every kept entry is scaled by 1/(1-p), as nn.Dropout does; dropped ones are exactly 0
        assert torch.allclose(d[kept], torch.full_like(d[kept], 1.0 / (1.0 - p)), atol=1e-5), (row, name)
        dropped = 1.0 - kept.float().mean().item()
        assert abs(dropped - p) < 0.1, f"row {row} ({name}): dropped {dropped:.2f} of its input, expected p={p}"


MIXES = {
    # shared-basis kinds used to skip dropout in the per-row path altogether
    "lora_xs": {"xa": ("lora_xs", 0.5), "xb": ("lora_xs", 0.0), "xc": ("lora_xs", 0.25)},
    "vera": {"va": ("vera", 0.5), "vb": ("vera", 0.0), "vc": ("vera", 0.25)},
    # six LoRA adapters (the old gathered path applied adapters[0]'s dropout to every row)
    "lora_many": {f"l{i}": ("lora", p) for i, p in enumerate([0.0, 0.5, 0.25, 0.75, 0.0, 0.5])},
    "all_kinds": {"la": ("lora", 0.5), "lb": ("lora", 0.0), "xa": ("lora_xs", 0.25), "va": ("vera", 0.75)},
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_each_row_is_dropped_at_its_own_adapters_rate(mix, device):
    specs = MIXES[mix]
    model = transparent_model(specs, device).train()
    names = [None, *specs, None, *reversed(list(specs))]
    rates = {None: 0.0, **{n: p for n, (_, p) in specs.items()}}
    first = row_deltas(model, names)
    check_rows(first, names, rates)
    second = row_deltas(model, names)
    for row, name in enumerate(names):  # rows with p > 0 draw a new mask per call, p = 0 rows never change
        assert torch.equal(first[row], second[row]) == (rates[name] == 0.0), (row, name)


@pytest.mark.parametrize("mix", ["lora_xs", "lora_many", "all_kinds"])
def test_rate_one_gives_exactly_the_base_and_eval_drops_nothing(mix):
    specs = MIXES[mix]
    model = transparent_model(specs)
    full = next(n for n, (_, p) in specs.items() if p > 0)
    model[0].adapters[full].dropout = nn.Dropout(1.0)  # the config refuses p = 1; the mask maths must not
    names = [full, None, *specs]
    rates = {None: 0.0, **{n: p for n, (_, p) in specs.items()}, full: 1.0}
    check_rows(row_deltas(model.train(), names), names, rates)
    check_rows(row_deltas(model.eval(), names), names, {n: 0.0 for n in rates})


def test_per_row_dropout_is_differentiable_and_masks_the_gradient():
    """The dropped input reaches each adapter's own parameters: a p = 0 adapter's gradient is the full one."""
    specs = MIXES["lora_many"]
    model = transparent_model(specs).train()
    names = list(specs)
    x = torch.ones(len(names), TOKENS, WIDTH)
    with lorakit.use_adapter(model, names):
        model(x).sum().backward()
    adapters = model[0].adapters
    for name, (_, p) in specs.items():
        grad_a = adapters[name].lora_A.grad  # dL/dA = Bᵀ·1·(dropped x)ᵀ summed over tokens: TOKENS where kept
        assert grad_a is not None
        if p == 0.0:
            assert torch.allclose(grad_a, torch.full_like(grad_a, float(TOKENS)))
        else:
            # this row's own mask reached its gradient: entries (kept count)/(1-p) differ from TOKENS
            assert not torch.allclose(grad_a, torch.full_like(grad_a, float(TOKENS))), name


@pytest.mark.parametrize("kind", ["lora", "lora_xs", "vera"])
@pytest.mark.parametrize("per_row", [False, True])
def test_subtracting_a_merged_adapter_is_never_dropped(kind, per_row):
    """Rows that do not route to a merged adapter get W₀x exactly, in training mode too: the subtraction
    undoes the merge, so dropping its input would leave noise ΔW(x − dropout(x)) on base rows."""
    model = transparent_model({"m": (kind, 0.5), "b": ("lora", 0.0)}).train()
    x = torch.ones(2, TOKENS, WIDTH)
    with torch.no_grad():
        base = model[0].base_forward(x)  # W₀x, before the merge
    lorakit.merge(model, "m")
    names = [None, "b"] if per_row else None
    with lorakit.use_adapter(model, names):
        out = model(x).detach()
    assert torch.allclose(out[0], base[0], atol=1e-5)
    if per_row:  # row 1 routes to b (p = 0): W₀x + x
        assert torch.allclose(out[1], base[1] + 1.0, atol=1e-5)
