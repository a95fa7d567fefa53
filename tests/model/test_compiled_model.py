"""`torch.compile(model)` on a lorakit model (lorakit.model.compiled.RouteEntry): one graph, no graph break, the
route read per call outside it; equal to eager in inference and training, one adapter and per-row routes.

Most cases run with backend="aot_eager" (AOTAutograd's graph, eager kernels: no C compiler, and a graph break
or recompile shows as with inductor); one runs inductor itself, the default backend, on a one-layer Llama.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from tests.conftest import randomize_adapters

ROUTES = ["l", ["l", "x", None], ["v", "l", "x"], "x", None]  # one adapter, per row, the base


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def _model(model=None):
    model = _one_layer_llama() if model is None else model
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "l")
    lk.attach(model, lk.LoraXSConfig(r=4), "x")
    lk.attach(model, lk.VeraConfig(r=4), "v")
    randomize_adapters(model, std=0.1)
    return model


def _logits(model, route, ids):
    with torch.no_grad(), lk.use_adapter(model, route):
        return model(input_ids=ids).logits


@pytest.fixture()
def ids():
    return torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(0))


def test_no_graph_break_one_graph_and_equal_to_eager(ids):
    model = _model()
    for route in ("l", ["l", "x", None]):
        with torch.no_grad(), lk.use_adapter(model, route):
            explained = torch._dynamo.explain(model)(input_ids=ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    for route in ROUTES:
        assert (_logits(compiled, route, ids) - _logits(model, route, ids)).abs().max() < 1e-5, route


def test_a_new_route_of_the_same_shape_does_not_recompile(ids):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    _logits(compiled, ["l", "x", None], ids)
    _logits(compiled, "l", ids)
    torch._dynamo.config.error_on_recompile = True  # per-row and one-adapter graphs exist: values change only
    for route in (["v", "l", "x"], [None, None, "l"], "x", "v"):
        assert (_logits(compiled, route, ids) - _logits(model, route, ids)).abs().max() < 1e-5, route


@pytest.mark.parametrize("route", ["l", ["l", "x", None]])
def test_training_gradients_equal_eager(ids, route):
    model = _model().train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        with lk.use_adapter(model, route):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert counter.frame_count == 1  # one graph: a graph break would start a second frame
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-5


def test_threads_keep_their_own_routes(ids):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    routes = ["l", "x", "v", "l", "x", "v"]
    want = {r: _logits(model, r, ids) for r in set(routes)}
    _logits(compiled, "l", ids)  # compiled once before the threads start
    results, errors = {}, []

    def work(k, route):
        try:
            for _ in range(3):
                results[k] = (_logits(compiled, route, ids) - want[route]).abs().max().item()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, r)) for k, r in enumerate(routes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == len(routes) and max(results.values()) < 1e-5


def test_no_route_with_several_adapters_raises_and_the_next_call_runs(ids):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), pytest.raises(lk.RoutingError):
        compiled(input_ids=ids)
    assert (_logits(compiled, "x", ids) - _logits(model, "x", ids)).abs().max() < 1e-5


def _one_layer_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_inference_equals_eager(ids):
    """The default backend: this crashed (inductor's stride assert) when slot stacks were built while tracing."""
    model = _model(_one_layer_llama())
    compiled = torch.compile(model)
    for route in ("l", ["l", "x", None], ["v", None, "x"]):
        assert (_logits(compiled, route, ids) - _logits(model, route, ids)).abs().max() < 1e-5, route


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def _grads(model, runs, route, ids) -> list[dict[str, torch.Tensor]]:
    """Each run's gradients of `model`'s parameters for one language-model loss on `route`."""
    grads = []
    for run in runs:
        model.zero_grad()
        with lk.use_adapter(model, route):
            run(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return grads


def test_inductor_training_equals_eager(ids):
    model = _model(_one_layer_llama()).train()
    compiled = torch.compile(model)
    for route in ("l", ["l", "x", None]):
        grads = _grads(model, (model, compiled), route, ids)
        assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-5, route


def test_an_error_inside_the_graph_leaves_the_model_usable(ids):
    """A compiled call that fails inside the graph (where the exit hook does not run) does not block this
    thread's next call: it still holds the model's hand-over and re-enters it."""
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(Exception):
        _logits(compiled, ["l", "x"], ids)  # two row names for three rows
    assert (_logits(compiled, "l", ids) - _logits(model, "l", ids)).abs().max() < 1e-5
    assert model.lorakit_registry.entry_slots is None  # a call that ends normally takes the route back


def test_dora_compiles_whole_in_training_and_inference(ids):
    from tests.methods.test_dora import randomize_dora

    route = ["d", "l", None]  # DoRA, LoRA and the base in one batch

    model = _model()
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True), "d")
    randomize_dora(model, "d")
    with torch.no_grad(), lk.use_adapter(model, route):
        explained = torch._dynamo.explain(model)(input_ids=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    assert (_logits(compiled, route, ids) - _logits(model, route, ids)).abs().max() < 1e-5
    model.train()
    grads = _grads(model, (model, compiled), route, ids)
    assert any(k.endswith("lora_magnitude_vector") for k in grads[0]) and grads[0].keys() == grads[1].keys()
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-5
