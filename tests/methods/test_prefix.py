"""Prefix tuning: PEFT's math, per-call and per-row routing, generate(), padding, GQA, training, errors."""

import threading

import pytest
import torch

import lorakit
from lorakit import LoraConfig, PrefixConfig
from lorakit.errors import (AdapterNotFoundError, MergeStateError, PrefixLengthError, RoutingError,
                            UnsupportedLayerError)
from lorakit.methods.prefix import prefix_shape
from lorakit.model.prefix_hook import fold_prefix, prefix_adapter, prefix_store
from tests.conftest import MODEL_FACTORIES, model_output, randomize_adapters

GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _prefixed(arch: str, seed: int = 0):
    """A tiny model with prefixes "p" (3 slots), "q" (5 slots, through the MLP) and a LoRA "l"."""
    model = MODEL_FACTORIES[arch](seed)
    torch.manual_seed(seed + 1)
    lorakit.attach(model, PrefixConfig(num_virtual_tokens=3), "p")
    lorakit.attach(model, PrefixConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16), "q")
    lorakit.attach(model, LoraConfig(r=4), "l")
    randomize_adapters(model)  # the LoRA's B is zero otherwise
    return model


def _run(model, ids, names, **kwargs):
    if names is None:
        with lorakit.disable_adapters(model), torch.no_grad():
            return model_output(model, ids) if not kwargs else model(input_ids=ids, **kwargs)
    with lorakit.use_adapter(model, names), torch.no_grad():
        return model_output(model, ids) if not kwargs else model(input_ids=ids, **kwargs)


def test_prefix_changes_outputs_and_disabled_is_exactly_the_base(arch, ids):
    base = model_output(MODEL_FACTORIES[arch](), ids)
    model = _prefixed(arch)
    assert torch.equal(_run(model, ids, None), base)
    for name in ("p", "q"):
        assert (_run(model, ids, name) - base).abs().max() > 1e-2, name
    assert prefix_store(model) is not None and lorakit.adapter_names(model) == ["p", "q", "l"]


def test_prefix_matches_peft_prefix_tuning(arch, ids):
    """Same prefix in PEFT's PrefixTuning model (reparameterised, training mode) ≡ ours."""
    peft = pytest.importorskip("peft")
    model = _prefixed(arch)
    task = "FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM"
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=5, prefix_projection=True,
                                     encoder_hidden_size=16)
    reference = peft.get_peft_model(MODEL_FACTORIES[arch](), config)
    reference.prompt_encoder["default"].load_state_dict(prefix_adapter(model, "q").state_dict())
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask)
    expected = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
    out = _run(model, ids, "q", attention_mask=mask)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_per_row_prefixes_equal_running_each_alone(arch, ids):
    model = _prefixed(arch)
    rows = ["p", None, "q", "l"]
    mixed = _run(model, ids, rows)
    for i, name in enumerate(rows):
        alone = _run(model, ids[i:i + 1], name)[0]
        assert (mixed[i] - alone).abs().max() < 1e-5, (i, name)
    base = model_output(MODEL_FACTORIES[arch](), ids)
    assert (mixed[1] - base[1]).abs().max() < 1e-5  # a row without a prefix gets the base model's output


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_per_row_equals_each_alone_and_recomputation(arch):
    model = _prefixed(arch)
    names = ["p", None, "q", "l"]
    prompt = torch.randint(1, 101, (4, 5), generator=torch.Generator().manual_seed(2))
    with lorakit.use_adapter(model, names):
        batched = model.generate(prompt, **GEN)
    for i, name in enumerate(names):
        with (lorakit.use_adapter(model, name) if name else lorakit.disable_adapters(model)):
            alone = model.generate(prompt[i:i + 1], **GEN)
            seq = prompt[i:i + 1]  # greedy decoding from scratch each step, no cache
            with torch.no_grad():
                for _ in range(GEN["max_new_tokens"]):
                    seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        n = alone.sequences.shape[1]  # a row that met EOS stops alone, and is padded in the batch
        assert torch.equal(batched.sequences[i, :n], alone.sequences[0]), (i, name)
        assert (batched.sequences[i, n:] == GEN["pad_token_id"]).all()
        assert torch.equal(alone.sequences[0], seq[0, :n]), (i, name)
        for step_batched, step_alone in zip(batched.logits, alone.logits):
            assert (step_batched[i] - step_alone[0]).abs().max() < 1e-5, (i, name)
    assert len({tuple(s.tolist()) for s in batched.sequences}) > 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_in_generate(arch):
    model = _prefixed(arch)
    prompt = torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt[:1, :3]], 1)  # row 0: 3 pads + 3 tokens
    batch = torch.cat([padded, prompt[1:]])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with lorakit.use_adapter(model, ["q", "p"]):
        out = model.generate(batch, attention_mask=mask, **GEN)
    with lorakit.use_adapter(model, "q"):
        alone = model.generate(prompt[:1, :3], **GEN)
    assert torch.equal(out.sequences[0, 3:], alone.sequences[0])
    for step_batched, step_alone in zip(out.logits, alone.logits):
        assert (step_batched[0] - step_alone[0]).abs().max() < 1e-5


def test_encoder_right_padding_with_attention_mask():
    model = _prefixed("bert")
    ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # row 0 has 4 real tokens
    with lorakit.use_adapter(model, ["p", "q"]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with lorakit.use_adapter(model, "p"), torch.no_grad():
        alone = model(input_ids=ids[:1, :4]).last_hidden_state
    assert (out[0, :4] - alone[0]).abs().max() < 1e-5


def test_grouped_query_attention_stores_only_kv_heads(ids):
    model = _prefixed("llama")  # 4 query heads, 2 key/value heads of size 8, 2 layers
    shape = prefix_shape(model)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (2, 2, 8)
    assert prefix_adapter(model, "p").embedding.weight.shape == (3, 2 * 2 * 2 * 8)
    with lorakit.use_adapter(model, "p"), torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape == (4, 2, 3 + ids.shape[1], 8)  # (B, kv heads, prefix + tokens, D)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_lowers_loss_and_checkpointing_gives_the_same_gradients(arch, ids):
    from lorakit.model.quantize import prepare_for_training

    grads = []
    for checkpointing in (False, True):
        model = MODEL_FACTORIES[arch]()
        torch.manual_seed(0)
        lorakit.attach(model, PrefixConfig(num_virtual_tokens=4, prefix_projection=True), "p")
        prepare_for_training(model, gradient_checkpointing=checkpointing)
        out = model(input_ids=ids, labels=ids) if arch != "bert" else model(input_ids=ids)
        loss = out.loss if arch != "bert" else out.last_hidden_state.square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in lorakit.adapter_parameters(model, "p")])
        assert all(p.grad is None for n, p in model.named_parameters() if "lorakit_prefix" not in n)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    if arch == "bert":
        return
    params = lorakit.adapter_parameters(model, "p")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_fold_keeps_outputs(ids):
    model = _prefixed("llama")
    before = _run(model, ids, "q")
    fold_prefix(model, "q")
    assert prefix_adapter(model, "q").transform is None
    assert (_run(model, ids, "q") - before).abs().max() < 1e-5


def test_prefix_on_a_quantized_base(ids):
    pytest.importorskip("bitsandbytes")
    model = lorakit.quantize(MODEL_FACTORIES["llama"]())
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lorakit.attach(model, PrefixConfig(num_virtual_tokens=3), "p")
    mixed = _run(model, ids, ["p", None, "p", None])
    assert (mixed[1] - base[1]).abs().max() < 1e-5 and (mixed[0] - base[0]).abs().max() > 1e-2


def test_threads_with_different_prefixes_at_once(ids):
    model = _prefixed("llama")
    expected = {name: _run(model, ids, name) for name in ("p", "q", "l", None)}
    errors = []

    def work(name):
        for _ in range(5):
            if (_run(model, ids, name) - expected[name]).abs().max() > 1e-5:  # other threads: other BLAS splits
                errors.append(name)

    threads = [threading.Thread(target=work, args=(n,)) for n in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_registry_merge_delete_and_unload(ids):
    model = _prefixed("llama")
    base = model_output(MODEL_FACTORIES["llama"](), ids)
    assert lorakit.count_trainable(model, "p") == 3 * 2 * 2 * 2 * 8
    with pytest.raises(MergeStateError, match="prefix"):
        lorakit.merge(model, "p")
    with pytest.raises(AdapterNotFoundError):
        lorakit.use_adapter(model, "nope").__enter__()
    lorakit.delete_adapter(model, "q")
    assert "q" not in prefix_store(model).adapters
    with lorakit.use_adapter(model, "l"):
        lora_out = model_output(model, ids)
    merged = lorakit.merge_and_unload(model, "l")  # the other adapters, the prefix too, are dropped
    assert prefix_store(merged) is None and not any("lorakit_prefix" in k for k in merged.state_dict())
    assert (model_output(merged, ids) - lora_out).abs().max() < 1e-5
    only = MODEL_FACTORIES["llama"]()
    lorakit.attach(only, PrefixConfig(num_virtual_tokens=2), "p")
    lorakit.delete_adapter(only, "p")  # the last prefix goes: hooks go, the model is the base again
    assert prefix_store(only) is None and torch.equal(model_output(only, ids), base)


def test_errors():
    model = MODEL_FACTORIES["gpt2"]()  # 64 positions
    with pytest.raises(PrefixLengthError, match="64 positions"):
        lorakit.attach(model, PrefixConfig(num_virtual_tokens=64), "long")
    assert lorakit.adapter_names(model) == []
    lorakit.attach(model, PrefixConfig(num_virtual_tokens=40), "p")
    with lorakit.use_adapter(model, "p"), pytest.raises(PrefixLengthError, match="context"):
        model(input_ids=torch.ones(1, 30, dtype=torch.long))
    with pytest.raises(lorakit.AdapterConfigError):
        PrefixConfig(num_virtual_tokens=0)
    with pytest.raises(UnsupportedLayerError):
        lorakit.attach(torch.nn.Sequential(torch.nn.Linear(2, 2)), PrefixConfig(), "p")
    # a cache started with one route cannot be continued with another
    llama = _prefixed("llama")
    ids = torch.randint(1, 101, (2, 4))
    with lorakit.use_adapter(llama, ["p", None]), torch.no_grad():
        cache = llama(input_ids=ids, use_cache=True).past_key_values
    with lorakit.use_adapter(llama, ["q", None]), pytest.raises(RoutingError, match="same route"):
        llama(input_ids=ids[:, :1], past_key_values=cache)
    with lorakit.use_adapter(llama, ["p", None, "q"]), pytest.raises(RoutingError, match="rows"):
        llama(input_ids=ids)
