"""Gradient checkpointing with routes: backward() after the `use_adapter` block has closed (as lorakit's
trainer and HF-Trainer-style loops do) recomputes each layer under the route of its forward.

Every test compares gradients against the same model without checkpointing; adapters have dropout, so the
recomputation must also redraw the same masks (torch's checkpoint restores the RNG state).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit
from lorakit.errors import RoutingError
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.conftest import randomize_adapters, tiny_llama

LORAS = {f"l{i}": p for i, p in enumerate([0.2, 0.0, 0.5, 0.1, 0.3])}  # five: the gathered LoRA path
ROUTES = {
    "single": "l0",
    "per_row_few": ["l0", None, "xs", "ve"],  # LoRA grouped by rows, LoRA-XS, VeRA, the base
    "per_row_many": ["l0", "l1", "l2", "xs", "l3", None, "l4", "ve"],
}


def mixed_llama(device: torch.device = torch.device("cpu")) -> nn.Module:
    model = tiny_llama().to(device)
    for name, p in LORAS.items():
        lorakit.attach(model, lorakit.LoraConfig(r=2 + len(name) % 3, lora_dropout=p), name)
    lorakit.attach(model, lorakit.LoraXSConfig(r=4, lora_dropout=0.3), "xs")
    lorakit.attach(model, lorakit.VeraConfig(r=4, vera_dropout=0.2), "ve")
    randomize_adapters(model)
    return model.train()


def grads_after(model: nn.Module, names, rows: int) -> dict[str, torch.Tensor]:
    """Forward under `names`, backward after the block, HF-Trainer style; the adapter gradients."""
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 101, (rows, 6), generator=torch.Generator().manual_seed(3)).to(model.device)
    torch.manual_seed(7)  # the same dropout masks in both runs
    with lorakit.use_adapter(model, names):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_checkpointed_llama_gradients_equal_plain_ones(route, reentrant, device):
    names = ROUTES[route]
    rows = len(names) if isinstance(names, list) else 3
    model = mixed_llama(device)
    plain = grads_after(model, names, rows)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = grads_after(model, names, rows)
    model.gradient_checkpointing_disable()
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6, rtol=1e-5), name
    routed = {names} if isinstance(names, str) else set(names or ())
    routed.discard(None)
    for adapter in routed:  # not vacuous: every routed adapter got a gradient, none other did
        assert any(f".adapters.{adapter}." in n and g.abs().sum() > 0 for n, g in plain.items()), adapter
    assert not any(f".adapters.{a}." in n for n in plain for a in (set(LORAS) | {"xs", "ve"}) - routed)


def test_checkpointing_enabled_before_attach():
    """The checkpoint functions set by gradient_checkpointing_enable() earlier are wrapped at first call."""
    model = tiny_llama().train()
    model.gradient_checkpointing_enable()
    lorakit.attach(model, lorakit.LoraConfig(r=2, lora_dropout=0.1), "a")
    lorakit.attach(model, lorakit.LoraXSConfig(r=2, lora_dropout=0.1), "b")
    randomize_adapters(model)
    checkpointed = grads_after(model, ["a", "b", None], 3)
    model.gradient_checkpointing_disable()
    plain = grads_after(model, ["a", "b", None], 3)
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6, rtol=1e-5), name


class TwoBlocks(nn.Module):
    """A plain torch model that checkpoints its blocks itself, with a way to choose how."""

    def __init__(self, wrap) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.wrap(block, x) if self.wrap else block(x)
        return x


def _plain_torch_grads(wrap) -> dict[str, torch.Tensor]:
    model = TwoBlocks(wrap)
    lorakit.attach(model, lorakit.LoraConfig(r=2, lora_dropout=0.25, target_modules=r"blocks\.\d\.0"), "a")
    lorakit.attach(model, lorakit.VeraConfig(r=2, vera_dropout=0.5, target_modules=r"blocks\.\d\.0"), "v")
    randomize_adapters(model)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(2)
    with lorakit.use_adapter(model.train(), ["a", None, "v"]):
        y = model(x)
    y.square().sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("how", ["checkpoint_with_route", "route_context", "reentrant"])
def test_plain_torch_checkpoint_helpers(how):
    wraps = {
        "checkpoint_with_route": lorakit.checkpoint_with_route,
        "route_context": lambda f, x: checkpoint(f, x, use_reentrant=False, context_fn=lorakit.route_context),
        "reentrant": lambda f, x: lorakit.checkpoint_with_route(f, x, use_reentrant=True),
    }
    plain, checkpointed = _plain_torch_grads(None), _plain_torch_grads(wraps[how])
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


class OldStyleBlock(nn.Module):
    """transformers 4.56-5.17's GradientCheckpointingLayer: it checkpoints `super().__call__` from `__call__`,
    so its own forward pre-hooks run inside the checkpoint, too late to wrap its checkpoint function."""

    gradient_checkpointing = False

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)
        return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


@pytest.mark.parametrize("enable_first", [False, True])
def test_old_style_checkpointed_blocks_carry_the_route_from_the_first_step(enable_first):
    def run(checkpointed: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(OldStyleBlock(), OldStyleBlock())

        def enable() -> None:
            for block in model:
                block.gradient_checkpointing = checkpointed
                block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        if enable_first:
            enable()
        lorakit.attach(model, lorakit.LoraConfig(r=2, lora_dropout=0.5, target_modules=["proj"]), "a")
        lorakit.attach(model, lorakit.LoraXSConfig(r=2, lora_dropout=0.5, target_modules=["proj"]), "b")
        if not enable_first:
            enable()
        randomize_adapters(model)
        x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(2)
        with lorakit.use_adapter(model.train(), ["a", "b", None]):
            y = model(x)  # the very first call: no earlier call could have wrapped anything
        y.sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = run(False), run(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


def test_plain_torch_checkpoint_without_the_helper_has_no_route():
    """Why the helper exists: torch's own checkpoint recomputes outside the block and finds no route."""
    with pytest.raises(RoutingError, match="choose one per call"):
        _plain_torch_grads(lambda f, x: checkpoint(f, x, use_reentrant=False))


@pytest.mark.parametrize("other", [False, True])
def test_lorakit_trainer_with_gradient_checkpointing(tmp_path, other):
    """lorakit's trainer calls backward() outside its use_adapter block; with a second adapter attached
    (`other`) a recomputation without the route could not pick one. Same adapter after 3 steps either way."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lorakit.train import train
    from tests.train.conftest import prompt_rows, run_config, save_tiny_llama, write_jsonl

    base = save_tiny_llama(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows(8))
    trained = {}
    for checkpointed in (False, True):
        model = LlamaForCausalLM.from_pretrained(base, **NO_HUB_KERNELS)
        if other:
            lorakit.attach(model, lorakit.LoraXSConfig(r=2), "other")
        if checkpointed:
            model.gradient_checkpointing_enable()
        config = run_config(base, data, tmp_path / f"run{checkpointed}", steps=3, batch_size=4,
                            adapter={"r": 4, "lora_dropout": 0.1})
        train(config, model=model, tokenizer=AutoTokenizer.from_pretrained(base))
        trained[checkpointed] = lorakit.adapter_state_dict(model, config.adapter_name)
    assert trained[False].keys() == trained[True].keys()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained[True].items())  # it did train
    for key, value in trained[False].items():
        assert torch.allclose(value, trained[True][key], atol=1e-6), key
