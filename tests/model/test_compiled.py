"""The compiled forward: no graph break in adapted layers, no recompile when the route changes, equal to eager.

torch.compile runs with backend="aot_eager" here (AOTAutograd's traced graph, run by eager kernels): it
needs no C compiler, and a graph break or recompile shows exactly as with inductor. `fullgraph=True` makes
any graph break an error; `error_on_recompile` makes any recompile one.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import lorakit as lk
from lorakit.model.bank import pack_adapter
from tests.conftest import randomize_adapters, tiny_llama

ROUTES = [["l0", "x0", None, "v"], ["x1", "l2", "l1", "l0"], [None, None, "x1", "x1"], ["v", "v", "l2", "x0"]]


@pytest.fixture()
def model():
    model = tiny_llama().eval()
    for i in range(3):
        lk.attach(model, lk.LoraConfig(r=2 + i, lora_alpha=4), f"l{i}")
    lk.attach(model, lk.LoraXSConfig(r=4), "x0")
    lk.attach(model, lk.LoraXSConfig(r=2), "x1")
    lk.attach(model, lk.VeraConfig(r=4), "v")
    randomize_adapters(model, std=0.1)
    pack_adapter(model, "x1")  # packed and attached LoRA-XS in one batch
    return model


def _eager(model, route, **kwargs):
    with torch.no_grad(), lk.use_adapter(model, route):
        return model(**kwargs).logits


def test_one_graph_for_every_route_equal_to_eager(model, no_recompile_after_first):
    step = lk.CompiledForward(model, backend="aot_eager")  # fullgraph=True: a graph break would raise
    ids = torch.randint(0, 101, (4, 7), generator=torch.Generator().manual_seed(0))
    torch._dynamo.utils.counters.clear()
    for k, route in enumerate(ROUTES):
        torch._dynamo.config.error_on_recompile = k > 0
        got = step(route, input_ids=ids).logits
        assert (got - _eager(model, route, input_ids=ids)).abs().max() < 1e-5, route
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_merged_adapters_stay_exact_in_the_compiled_forward(model, no_recompile_after_first):
    lk.merge(model, "l1")
    step = lk.CompiledForward(model, backend="aot_eager")
    ids = torch.randint(0, 101, (4, 5), generator=torch.Generator().manual_seed(1))
    for k, route in enumerate(ROUTES):
        torch._dynamo.config.error_on_recompile = k > 0
        assert (step(route, input_ids=ids).logits - _eager(model, route, input_ids=ids)).abs().max() < 1e-5


def test_compiled_decode_equals_eager_decode(model, no_recompile_after_first):
    """generate(compile=True): a StaticCache decode step compiled once, tokens equal to the eager loop's."""
    ids = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(2))
    step = lk.CompiledForward(model, backend="aot_eager")
    for k, route in enumerate(ROUTES[:2]):
        eager = lk.generate(model, ids, route, max_new_tokens=5)
        torch._dynamo.config.error_on_recompile = k > 0
        compiled = lk.generate(model, ids, route, max_new_tokens=5, step=step)
        assert torch.equal(compiled, eager), route
    alone = lk.generate(model, ids[1:2], "l2", max_new_tokens=5)  # and per-row equals alone
    assert torch.equal(lk.generate(model, ids, ROUTES[1], max_new_tokens=5)[1:2], alone)


def test_bad_routes_are_refused_before_compiling(model):
    lk.attach(model, lk.PrefixConfig(num_virtual_tokens=2), "p")
    step = lk.CompiledForward(model, backend="aot_eager")
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(lk.RoutingError, match="2 rows"):
        step(["l0", "l1", "l2"], input_ids=ids)
    with pytest.raises(lk.AdapterNotFoundError, match="nope"):
        step(["l0", "nope"], input_ids=ids)
    with pytest.raises(lk.RoutingError, match="prefix adapter"):
        step(["p", None], input_ids=ids)


def test_a_model_without_adapters_compiles_and_refuses_adapter_names(no_recompile_after_first):
    """Base-only serving with --compile: the plain model runs compiled; naming an adapter is a clear error,
    and adapters attached after the CompiledForward was made are seen."""
    model = tiny_llama().eval()
    step = lk.CompiledForward(model, backend="aot_eager")
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (step(None, input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5
    with pytest.raises(lk.RoutingError, match="no lorakit adapters"):
        step(["a", None], input_ids=ids)
    lk.attach(model, lk.LoraConfig(r=2), "a")
    randomize_adapters(model, std=0.1)
    assert (step(["a", None], input_ids=ids).logits - _eager(model, ["a", None], input_ids=ids)).abs().max() < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_decode_equals_eager_decode_on_cuda(no_recompile_after_first):
    """On a GPU: inductor with mode="reduce-overhead" (CUDA graphs) on a bf16 base, per-row LoRA and LoRA-XS;
    greedy tokens equal the eager loop's for two routes of one batch size. scripts/gpu_check.py runs it."""
    model = tiny_llama().eval().to("cuda", torch.bfloat16)
    for i in range(3):
        lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), f"l{i}")
    lk.attach(model, lk.LoraXSConfig(r=4), "x0")
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(2)).cuda()
    step = lk.CompiledForward(model, mode="reduce-overhead")
    for route in (["l0", "x0", None, "l2"], ["l1", "l1", "x0", None]):
        assert torch.equal(lk.generate(model, ids, route, max_new_tokens=6, step=step),
                           lk.generate(model, ids, route, max_new_tokens=6)), route


def test_dora_rows_one_graph_no_break_and_fresh_gains(model, no_recompile_after_first):
    """DoRA beside LoRA, LoRA-XS (attached and packed) and VeRA: one graph for every route; the kept gains are
    refreshed outside the graph, so a magnitude changed between calls is seen without a recompile."""
    from tests.methods.test_dora import randomize_dora

    lk.attach(model, lk.LoraConfig(r=2, lora_alpha=4, use_dora=True), "d0")
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]), "d1")
    randomize_dora(model, "d0")
    randomize_dora(model, "d1", seed=4)
    step = lk.CompiledForward(model, backend="aot_eager")
    ids = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(2))
    routes = [["d0", "l0", None, "d1"], ["x1", "d1", "d0", "v"], ["d0"] * 4, [None, "x0", "l2", "d0"]]
    torch._dynamo.utils.counters.clear()
    for k, route in enumerate(routes):
        torch._dynamo.config.error_on_recompile = k > 0
        assert (step(route, input_ids=ids).logits - _eager(model, route, input_ids=ids)).abs().max() < 1e-5, route
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    before = step(routes[0], input_ids=ids).logits
    with torch.no_grad():
        for layer in lk.adapted_layers(model).values():
            if "d0" in layer.adapters:
                layer.adapters["d0"].lora_magnitude_vector.mul_(1.5)
    after = step(routes[0], input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    assert (after - _eager(model, routes[0], input_ids=ids)).abs().max() < 1e-5
