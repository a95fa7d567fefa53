"""Routing is per call: per thread, per async task, per model; never a global switch."""

import asyncio
import threading

import pytest
import torch

import lorakit
from lorakit import AdapterNotFoundError, LoraConfig, RoutingError
from tests.conftest import randomize_adapters, tiny_llama


def _model_with(n: int):
    model = tiny_llama()
    for i in range(n):
        lorakit.attach(model, LoraConfig(r=2, lora_alpha=4), f"a{i}")
    randomize_adapters(model, std=0.1)
    return model


def _each_alone(model, count: int, ids) -> dict[int, torch.Tensor]:
    """Adapter a<i>'s logits, each routed on its own in this thread: what every concurrent caller must get."""
    expected = {}
    for i in range(count):
        with lorakit.use_adapter(model, f"a{i}"):
            expected[i] = model(input_ids=ids).logits
    return expected


def test_eight_threads_each_with_its_own_adapter_get_single_threaded_outputs(ids):
    model = _model_with(8)
    expected = _each_alone(model, 8, ids)
    assert len({round(float(v.detach().sum()), 3) for v in expected.values()}) == 8  # adapters really differ
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(8)}
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            with lorakit.use_adapter(model, f"a{i}"), torch.no_grad():
                results[i].append(model(input_ids=ids).logits)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert len(results[i]) == 5
        for out in results[i]:
            assert (out - expected[i]).abs().max() < 1e-6, i


def test_async_tasks_keep_their_own_routes(ids):
    model = _model_with(3)
    expected = _each_alone(model, 3, ids)

    async def task(i: int) -> torch.Tensor:
        with lorakit.use_adapter(model, f"a{i}"):
            await asyncio.sleep(0.01 * (3 - i))  # interleave the tasks inside their blocks
            return model(input_ids=ids).logits

    async def main():
        return await asyncio.gather(*(task(i) for i in range(3)))

    for i, out in enumerate(asyncio.run(main())):
        assert torch.allclose(out, expected[i], atol=1e-6)


def test_nested_routes_restore_and_two_models_keep_separate_routes(ids):
    m1, m2 = _model_with(2), _model_with(2)
    with lorakit.use_adapter(m1, "a0"):
        outer = m1(input_ids=ids).logits
        with lorakit.use_adapter(m1, "a1"):
            inner = m1(input_ids=ids).logits
            with lorakit.use_adapter(m2, "a0"):
                assert torch.equal(m1(input_ids=ids).logits, inner)  # m2's route leaves m1 alone
        assert torch.equal(m1(input_ids=ids).logits, outer)
    assert not torch.equal(outer, inner)
    with pytest.raises(RoutingError, match="choose one"):
        m1(input_ids=ids)  # several adapters, no route: ambiguous


def test_single_adapter_applies_without_a_route(ids):
    model = _model_with(1)
    with lorakit.use_adapter(model, "a0"):
        routed = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, routed)


def test_bad_routes_are_clear_errors(ids):
    model = _model_with(2)
    with pytest.raises(AdapterNotFoundError, match="nope.*a0.*a1"):
        with lorakit.use_adapter(model, "nope"):
            pass
    with pytest.raises(AdapterNotFoundError):
        with lorakit.use_adapter(model, ["a0", "missing"]):
            pass
    with lorakit.use_adapter(model, ["a0", "a1"]):  # 2 names, 4 rows
        with pytest.raises(RoutingError, match="2 row names but the batch has 4 rows"):
            model(input_ids=ids)
    with pytest.raises(lorakit.LorakitError, match="no lorakit adapters"):
        with lorakit.use_adapter(tiny_llama(), "a0"):
            pass


def test_a_reused_route_sees_in_place_weight_changes(ids):
    """Per-route caches (resolved slots, checked stacks) never serve stale adapter weights."""
    from lorakit.model.use import Route

    model = _model_with(7)
    route = Route(tuple(f"a{i}" for i in range(6)))  # the slot stacks, checked once per route
    ids = torch.randint(0, 101, (6, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with lorakit.use_route(model, route):
            first = model(input_ids=ids).logits
            assert torch.equal(model(input_ids=ids).logits, first)  # served from the cache
            layer = model.model.layers[0].self_attn.q_proj
            layer.adapters["a2"].lora_B.add_(0.5)
            changed = model(input_ids=ids).logits
        with lorakit.use_adapter(model, list(route.names)):
            assert torch.equal(model(input_ids=ids).logits, changed)
    assert not torch.allclose(first[2], changed[2]) and torch.allclose(first[0], changed[0])


def test_names_that_are_not_strings_are_a_routing_error_not_a_type_error():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2), "a")
    for names in (["zz", 3], [["a"], None], ["a", {"x", "y"}], {"a": "heavy"}, [{3: 1.0}]):
        with pytest.raises(lorakit.RoutingError, match="must be (str or None|a finite number|str, got)"):
            with lorakit.use_adapter(model, names):
                pass
    with pytest.raises(lorakit.RoutingError, match="tuple"):
        with lorakit.use_route(model, lorakit.Route(["a", "a"])):
            pass


def test_per_row_index_tensors_are_built_once_per_route(monkeypatch):
    """Row lists, index and mask tensors depend only on the route's names: a decode loop under one route
    builds them in its first forward, not in every layer of every step."""
    import sys

    model = tiny_llama()
    for k in range(6):
        lorakit.attach(model, LoraConfig(r=4), f"l{k}")
    lorakit.attach(model, lorakit.LoraXSConfig(r=4), "xs")
    lorakit.attach(model, lorakit.VeraConfig(r=8), "ve")
    randomize_adapters(model)
    lorakit.merge(model, "l5")  # rows not routed to it subtract it: the _add_rows path
    names = ["l0", "l1", "xs", None, "ve", "l2", "l3", "l4"]
    ids = torch.randint(0, 101, (8, 5), generator=torch.Generator().manual_seed(0))
    real, built = torch.tensor, []

    def counting(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith("batched.py"):
            built.append(1)
        return real(*args, **kwargs)

    with torch.no_grad(), lorakit.use_adapter(model, names):
        first = model(input_ids=ids).logits
        monkeypatch.setattr(torch, "tensor", counting)
        again = model(input_ids=ids).logits
        monkeypatch.setattr(torch, "tensor", real)
    assert built == []
    assert torch.equal(first, again)
    for i, name in enumerate(names):  # and the cached tensors still route every row right
        with torch.no_grad(), lorakit.use_adapter(model, name):
            assert (again[i] - model(input_ids=ids[i:i + 1]).logits[0]).abs().max() < 1e-5, (i, name)
