"""A layer's slot stacks: adapters' weights held once, edits show through, moves and deletes rebuild them."""

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.layer import slots
from lorakit.io import save_adapter
from tests.conftest import randomize_adapters, tiny_llama

NAMES = [f"a{i}" for i in range(6)] + [None]


def _model():
    model = tiny_llama()
    for i in range(6):
        lorakit.attach(model, LoraConfig(r=4 if i % 3 else 2, lora_alpha=8), f"a{i}")
    randomize_adapters(model, std=0.1)
    return model


def _mixed(model, ids):
    with torch.no_grad(), lorakit.use_adapter(model, NAMES):
        return model(input_ids=ids).logits


def _each_alone(model, ids):
    rows = []
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            with lorakit.use_adapter(model, name) if name else lorakit.disable_adapters(model):
                rows.append(model(input_ids=ids[i:i + 1]).logits[0])
    return torch.stack(rows)


def _ids():
    return torch.randint(0, 101, (len(NAMES), 5), generator=torch.Generator().manual_seed(3))


def test_parameters_become_views_of_one_stack_so_weights_are_held_once():
    model, ids = _model(), _ids()
    layer = model.model.layers[0].self_attn.q_proj
    before = {n: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for n, a in layer.adapters.items()}
    params = {n: (a.lora_A, a.lora_B) for n, a in layer.adapters.items()}
    assert (_mixed(model, ids) - _each_alone(model, ids)).abs().max() < 1e-5
    stack = slots.stacks(layer)["lora"]
    table = model.lorakit_registry.slot_table
    assert stack is not None and tuple(stack.held) == tuple(before)
    assert stack.held == {n: table.slot(n) for n in before}  # model-wide slot numbers
    a, b = stack.fields["a"], stack.fields["b"]
    for name, adapter in layer.adapters.items():
        assert adapter.lora_A is params[name][0] and adapter.lora_B is params[name][1]  # same Parameter objects
        assert adapter.lora_A.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
        assert adapter.lora_B.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert torch.equal(adapter.lora_A, before[name][0]) and torch.equal(adapter.lora_B, before[name][1])
    small, k = layer.adapters["a0"], table.slot("a0")  # rank 2 among rank 4: the padding stays zero
    assert a[k, 2:].abs().sum() == 0 and b[k, 2:].abs().sum() == 0 and small.lora_A.shape[0] == 2
    assert a[0].abs().sum() == 0 and b[0].abs().sum() == 0  # slot 0: rows without an adapter


def test_training_after_stacking_writes_through_and_mixed_batches_see_it():
    model, ids = _model(), _ids()
    with torch.inference_mode():  # the stack is first built under inference mode...
        with lorakit.use_adapter(model, NAMES):
            model(input_ids=ids)
    params = lorakit.adapter_parameters(model, "a3")
    optimizer = torch.optim.SGD(params, lr=0.5)
    with lorakit.use_adapter(model, "a3"):  # ...yet its tensors are ordinary, so training may update them
        model(input_ids=ids).logits.square().mean().backward()
    optimizer.step()
    assert (_mixed(model, ids) - _each_alone(model, ids)).abs().max() < 1e-5
    with lorakit.use_adapter(model, NAMES):  # with gradients on, the mixed path trains every row's adapter
        model(input_ids=ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lorakit.adapter_parameters(model, "a5"))


def test_moving_the_model_or_deleting_an_adapter_rebuilds_the_stack():
    model, ids = _model(), _ids()
    _mixed(model, ids)
    model.to(torch.float64)
    expected = _each_alone(model, ids.clone())
    assert expected.dtype == torch.float64
    assert (_mixed(model, ids) - expected).abs().max() < 1e-10
    layer = model.model.layers[0].self_attn.q_proj
    old = slots.stacks(layer)["lora"]
    assert old.fields["a"].dtype == torch.float64  # moved with the model
    lorakit.delete_adapter(model, "a5")
    assert "lora" not in slots.stacks(layer)
    shared = {a.lora_A.untyped_storage().data_ptr() for a in layer.adapters.values()}
    assert old.fields["a"].untyped_storage().data_ptr() not in shared  # the old stack (and a5's weights) can be freed
    names = ["a0", "a1", "a2", "a3", "a4", None, "a1"]
    with torch.no_grad(), lorakit.use_adapter(model, names):
        mixed = model(input_ids=ids).logits
    with torch.no_grad(), lorakit.use_adapter(model, "a1"):
        assert (mixed[6] - model(input_ids=ids[6:7]).logits[0]).abs().max() < 1e-10


def test_saved_adapter_is_unchanged_by_stacking(tmp_path):
    model, ids = _model(), _ids()
    save_adapter(model, "a0", tmp_path / "before")
    _mixed(model, ids)
    save_adapter(model, "a0", tmp_path / "after")
    from safetensors.torch import load_file

    before = load_file(next((tmp_path / "before").glob("*.safetensors")))
    after = load_file(next((tmp_path / "after").glob("*.safetensors")))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _routed(model, ids, names):
    """Per-row routed logits and each row run alone with its adapter (None: the base)."""
    with torch.no_grad():
        with lorakit.use_adapter(model, names):
            mixed = model(input_ids=ids).logits
        rows = []
        for i, name in enumerate(names):
            with lorakit.use_adapter(model, name) if name else lorakit.disable_adapters(model):
                rows.append(model(input_ids=ids[i:i + 1]).logits[0])
    return mixed, torch.stack(rows)


def test_attaching_within_capacity_extends_the_stack_instead_of_rebuilding_it():
    """The k-th attach between forwards copies one adapter into its free slot: the stack's tensors stay and the
    adapters already held are not copied again (a rebuild per attach copied all k); at a doubling it rebuilds."""
    model, ids = _model(), _ids()  # six adapters at slots 1-6: capacity 8
    _mixed(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    before = slots.stacks(layer)["lora"]
    held = {n: (a.lora_A.data_ptr(), a.lora_B.data_ptr()) for n, a in layer.adapters.items()}
    lorakit.attach(model, LoraConfig(r=2, lora_alpha=4), "a6")  # slot 7: still within capacity 8
    randomize_adapters(model, std=0.1, seed=5)
    names = ["a6", "a0", None, "a6", "a4", "a3", "a6"]
    mixed, alone = _routed(model, ids, names)
    assert (mixed - alone).abs().max() < 1e-5
    stack, table = slots.stacks(layer)["lora"], model.lorakit_registry.slot_table
    assert stack.fields["a"] is before.fields["a"] and stack.fields["b"] is before.fields["b"]
    assert {n: (a.lora_A.data_ptr(), a.lora_B.data_ptr()) for n, a in layer.adapters.items() if n in held} == held
    assert stack.held == {n: table.slot(n) for n in layer.adapters} and stack.table_version == table.version
    new = layer.adapters["a6"]
    assert new.lora_A.untyped_storage().data_ptr() == stack.fields["a"].untyped_storage().data_ptr()
    assert stack.scales[table.slot("a6")] == new.scaling
    lorakit.attach(model, LoraConfig(r=4, lora_alpha=8), "a7")  # slot 8: capacity doubles to 16
    randomize_adapters(model, std=0.1, seed=6)
    mixed, alone = _routed(model, ids, ["a7", "a6", "a1", None, "a7", "a2", "a0"])
    assert (mixed - alone).abs().max() < 1e-5
    assert slots.stacks(layer)["lora"].capacity == 16


def test_a_wider_rank_or_a_deleted_adapter_rebuilds_the_stack():
    model, ids = _model(), _ids()  # ranks 2 and 4
    _mixed(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    before = slots.stacks(layer)["lora"]
    lorakit.attach(model, LoraConfig(r=8, lora_alpha=16), "wide")
    randomize_adapters(model, std=0.1, seed=7)
    mixed, alone = _routed(model, ids, ["wide", "a0", None, "a5", "wide", "a1", "a2"])
    assert (mixed - alone).abs().max() < 1e-5
    stack = slots.stacks(layer)["lora"]
    assert stack.fields["a"] is not before.fields["a"] and stack.fields["a"].shape[1] == 8
    lorakit.delete_adapter(model, "a3")
    lorakit.attach(model, LoraConfig(r=4, lora_alpha=8), "again")  # takes a3's slot back
    randomize_adapters(model, std=0.1, seed=8)
    mixed, alone = _routed(model, ids, ["again", "a0", None, "wide", "again", "a4", "a2"])
    assert (mixed - alone).abs().max() < 1e-5
