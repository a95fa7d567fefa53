"""Device and dtype: every core path on each device (cpu, + cuda when present) x base dtype (fp32, bf16, fp16).

Tolerances (tests.conftest.TOLERANCES, absolute on a tiny model's O(1) logits) compare two computations of the
same output in one dtype: float32 1e-5, bf16 5e-2, fp16 1e-2, a few units of each format's last place after the
model's accumulations. Where a comparison crosses dtypes (a bf16 model against its float32 self) the bound is
stated in the test.
"""

from __future__ import annotations

import copy
import io as io_bytes

import pytest
import torch

import lorakit as lk
from lorakit import io
from lorakit.model.bank import add_packed_lora_xs, ensure_lora_xs_bases, get_bank, pack_adapter
from lorakit.config import adapter_dtype
from lorakit.io.export import export_to_peft
from lorakit.layer.slots import stacks
from tests.conftest import TOLERANCES, randomize_adapters, tiny_llama

LOW = (torch.bfloat16, torch.float16)
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _base(device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed).to(device=device, dtype=dtype)


def _logits(model: torch.nn.Module, ids: torch.Tensor, names=None) -> torch.Tensor:
    with torch.no_grad(), (lk.use_adapter(model, names) if names is not None else lk.disable_adapters(model)):
        return model(input_ids=ids).logits.float()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= TOLERANCES[dtype], f"{what}: max |diff| {diff:.3g} > {TOLERANCES[dtype]} ({dtype})"


def _mixed_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Five LoRA adapters, LoRA-XS of two ranks, VeRA: every kind of slot stack."""
    model = _base(device, dtype)
    for i in range(5):
        lk.attach(model, lk.LoraConfig(r=2 + i % 2, lora_alpha=4), f"l{i}")
    lk.attach(model, lk.LoraXSConfig(r=4), "xs4")
    lk.attach(model, lk.LoraXSConfig(r=2, target_modules=["q_proj", "down_proj"]), "xs2")
    lk.attach(model, lk.VeraConfig(r=4, projection_seed=1), "vera")
    randomize_adapters(model, std=0.1)
    return model


# ----------------------------------------------------------------------------------------------- attach

@pytest.mark.parametrize("autocast", [True, False])
def test_attach_puts_adapters_and_bases_where_the_base_is(device, dtype, autocast):
    model = _base(device, dtype)
    lk.attach(model, lk.LoraConfig(r=2, autocast_adapter_dtype=autocast), "l")
    lk.attach(model, lk.LoraXSConfig(r=2, autocast_adapter_dtype=autocast), "x")
    lk.attach(model, lk.VeraConfig(r=4, autocast_adapter_dtype=autocast), "v")
    lk.attach(model, lk.PrefixConfig(num_virtual_tokens=2, autocast_adapter_dtype=autocast), "p")
    want = torch.float32 if autocast and dtype in LOW else dtype
    assert adapter_dtype(dtype, autocast) == want
    for name in ["l", "x", "v", "p"]:
        for param in lk.adapter_parameters(model, name):
            assert (param.dtype, param.device.type) == (want, device.type), name
    layer = lk.adapted_layers(model)[Q_PROJ]
    for key, basis in layer.bases.items():  # frozen bases belong to the base: its dtype and device
        assert (basis.down.dtype, basis.up.dtype, basis.down.device.type) == (dtype, dtype, device.type), key
        assert basis.fingerprint.dtype == torch.float32  # compared against files at 1e-3: never rounded to bf16


# ------------------------------------------------------------------------------------------ routing

def test_issue_repro_lora_xs_mixed_batch_on_a_low_precision_base(device, dtype, ids):
    """Issue 12: `active` was float32 and promoted the cores; bmm refused the mix (bf16 and fp16 bases)."""
    model = _base(device, dtype)
    lk.attach(model, lk.LoraXSConfig(r=8, init_std=0.1), "xs")
    ids = ids[:3].to(device)
    with lk.use_adapter(model, ["xs", None, "xs"]), torch.no_grad():
        mixed = model(input_ids=ids).logits
    _assert_close(mixed[0], _logits(model, ids[:1], "xs")[0], dtype, "row 0")
    _assert_close(mixed[1], _logits(model, ids[1:2])[0], dtype, "row 1 (base)")


def test_issue_repro_five_lora_adapters_with_gradients(device, dtype, ids):
    """Issue 12: the gathered LoRA path (training, > 4 adapters) multiplied by a float32 mask."""
    model = _base(device, dtype)
    for i in range(5):
        lk.attach(model, lk.LoraConfig(r=2), f"l{i}")
    randomize_adapters(model, std=0.1)
    rows = ["l0", "l1", "l2", "l3", "l4", None]
    ids = torch.cat([ids, ids[:2]]).to(device)
    with lk.use_adapter(model, rows):
        out = model(input_ids=ids).logits
    out.float().square().mean().backward()
    for i in range(5):
        grads = [p.grad for p in lk.adapter_parameters(model, f"l{i}")]
        assert all(g is not None and g.dtype == p.dtype and torch.isfinite(g).all() and g.abs().sum() > 0
                   for g, p in zip(grads, lk.adapter_parameters(model, f"l{i}"))), f"l{i}"
    for i, name in enumerate(rows):
        _assert_close(out[i].detach(), _logits(model, ids[i:i + 1], name)[0], dtype, f"row {i}")


@pytest.mark.parametrize("grad", [False, True])
def test_per_row_routing_of_every_method_and_mixtures(device, dtype, ids, grad):
    """Each row of a batch mixing LoRA (stacked / gathered), LoRA-XS of two ranks, VeRA, a packed LoRA-XS
    adapter and the base gives what that row's adapter gives alone."""
    model = _mixed_model(device, dtype)
    lk.attach(model, lk.LoraXSConfig(r=4, init_std=0.2), "packed")
    pack_adapter(model, "packed")
    rows = ["l0", "xs4", "vera", None, "l3", "xs2", "packed", "l4", "l1", "l2"]
    ids = torch.cat([ids, ids, ids[:2]]).to(device)
    with lk.use_adapter(model, rows), torch.set_grad_enabled(grad):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        _assert_close(mixed[i].detach(), _logits(model, ids[i:i + 1], name)[0], dtype, f"row {i} ({name})")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_adapters_add_no_more_error_than_the_base_has(device, dtype, ids):
    """A bf16/fp16 model with (float32) adapters against the float32 model with the same adapters: the gap is
    within twice the base model's own low-precision gap, plus the dtype's tolerance (what the fp32-adapter
    path costs in accuracy: nothing beyond rounding activations)."""
    ref = _mixed_model(device, torch.float32)
    low = copy.deepcopy(ref).to(dtype)
    ids = ids.to(device)
    base_gap = (_logits(low, ids) - _logits(ref, ids)).abs().max().item()
    for name in ["l0", "xs4", "vera"]:
        gap = (_logits(low, ids, name) - _logits(ref, ids, name)).abs().max().item()
        assert gap <= 2 * base_gap + TOLERANCES[dtype], (name, gap, base_gap)


# ------------------------------------------------------------------------------------------ the bank

def test_packed_cores_from_the_cpu_land_on_the_model(device, dtype, ids):
    """Issue 12: cores read from a file are CPU tensors; the bank (on the model's device) must take them."""
    model = _base(device, dtype)
    ensure_lora_xs_bases(model, [Q_PROJ, "model.layers.1.mlp.down_proj"], 4)
    gen = torch.Generator().manual_seed(3)
    cores = {m: torch.randn(4, 4, generator=gen) * 0.3 for m in [Q_PROJ, "model.layers.1.mlp.down_proj"]}
    add_packed_lora_xs(model, "p", lk.LoraXSConfig(r=4, target_modules=list(cores)), cores)
    bank = get_bank(model)
    assert (bank.cores.device.type, bank.cores.dtype) == (device.type, adapter_dtype(dtype))
    lk.attach(model, lk.LoraXSConfig(r=4, target_modules=list(cores)), "m")
    with torch.no_grad():
        for module, core in cores.items():
            lk.adapted_layers(model)[module].adapters["m"].lora_R.copy_(core)
    ids = ids.to(device)
    _assert_close(_logits(model, ids, "p"), _logits(model, ids, "m"), dtype, "packed vs attached")
    state = lk.adapter_state_dict(model, "p")
    assert torch.allclose(state[f"{Q_PROJ}.lora_R"].float().cpu(), cores[Q_PROJ], atol=1e-6 if
                          adapter_dtype(dtype) == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------- merging

METHOD_CONFIGS = {"lora": lk.LoraConfig(r=4), "lora_xs": lk.LoraXSConfig(r=4), "vera": lk.VeraConfig(r=4)}


def _one_adapter(device: torch.device, dtype: torch.dtype, method: str) -> torch.nn.Module:
    """A base with adapter "a" of `method` holding non-trivial weights."""
    model = _base(device, dtype)
    lk.attach(model, METHOD_CONFIGS[method], "a")
    randomize_adapters(model, std=0.1)
    return model

@pytest.mark.parametrize("method", ["lora", "lora_xs", "vera"])
def test_merge_adds_in_float32_rounds_once_and_unmerges(device, dtype, ids, method):
    model, ids = _one_adapter(device, dtype, method), ids.to(device)
    unmerged = _logits(model, ids, "a")
    layer = lk.adapted_layers(model)[Q_PROJ]
    w0 = layer.weight.detach().clone()
    up, down = layer.factors("a")
    expected = (w0.float() + up.float() @ down.float()).to(dtype)  # ΔW in float32 added to W, rounded once
    lk.merge(model, "a")
    assert torch.equal(layer.weight, expected)
    with torch.no_grad():
        merged = model(input_ids=ids).logits.float()
    _assert_close(merged, unmerged, dtype, "merged vs unmerged")
    lk.unmerge(model, "a")
    # W + ΔW was rounded once (half a unit of its last place), W + ΔW - ΔW once more (half a unit of W's)
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    bound = ulp * (w0.float().abs() + expected.float().abs()) / 2 + 1e-7
    excess = ((layer.weight.float() - w0.float()).abs() - bound).max().item()
    assert excess <= 0, f"unmerge is off by more than the two roundings (excess {excess:.3g})"


# ---------------------------------------------------------------------------------- files and export

@pytest.mark.parametrize("method", ["lora", "lora_xs", "vera"])
def test_save_load_and_export_on_each_device_and_dtype(device, dtype, ids, tmp_path, method):
    model, ids = _one_adapter(device, dtype, method), ids.to(device)
    expected = _logits(model, ids, "a")
    io.save_adapter(model, "a", tmp_path / "ad")
    fresh = _base(device, dtype)
    io.load_adapter(fresh, tmp_path / "ad", name="a")
    assert all(p.dtype == adapter_dtype(dtype) for p in lk.adapter_parameters(fresh, "a"))
    _assert_close(_logits(fresh, ids, "a"), expected, dtype, "loaded")
    if method != "lora":
        export_to_peft(model, "a", tmp_path / "peft")
        plain = _base(device, dtype)
        io.load_adapter(plain, tmp_path / "peft", name="a")
        _assert_close(_logits(plain, ids, "a"), expected, dtype, "exported")


def test_packed_load_from_a_file(device, dtype, ids, tmp_path):
    model = _base(device, dtype)
    lk.attach(model, lk.LoraXSConfig(r=4, init_std=0.2), "a")
    ids = ids.to(device)
    expected = _logits(model, ids, "a")
    io.save_adapter(model, "a", tmp_path / "ad")
    io.load_adapter(model, tmp_path / "ad", name="b", packed=True)  # the fast path: bases already there
    _assert_close(_logits(model, ids, "b"), expected, dtype, "packed load")


# ---------------------------------------------------------------------------- prefix, generation

def test_prefix_and_lora_decode_with_the_kv_cache(device, dtype, ids):
    """Incremental decoding (prefix caches, mixed rows) gives the full forward's last logits; generate runs."""
    model = _base(device, dtype)
    lk.attach(model, lk.PrefixConfig(num_virtual_tokens=3), "p")
    lk.attach(model, lk.LoraConfig(r=2), "l")
    randomize_adapters(model, std=0.1)
    ids = ids[:2].to(device)
    rows = ["p", "l"]
    with lk.use_adapter(model, rows), torch.no_grad():
        full = model(input_ids=ids).logits[:, -1].float()
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                                   attention_mask=torch.ones_like(ids), pad_token_id=0)
    _assert_close(step.float(), full, dtype, "cached decode step")
    assert generated.shape == (2, ids.shape[1] + 3) and generated.device.type == device.type


# ------------------------------------------------------------------------------------------ training

def test_training_step_updates_float32_adapters_on_a_low_precision_base(device, dtype, ids):
    """Issue 12: adapters trained in bf16 on a bf16 base; a small AdamW step (1e-5 on weights ~0.1) rounds
    away in bf16's 8 bits. In float32 every entry moves."""
    model = _base(device, dtype)
    lk.attach(model, lk.LoraConfig(r=4), "a")
    randomize_adapters(model, std=0.1)
    params = lk.adapter_parameters(model, "a")
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = ids.to(device)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype  # computed in the activation dtype
    out.loss.backward()
    optimizer.step()
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    total = sum(b.numel() for b in before)
    assert moved >= 0.9 * total, f"{moved}/{total} adapter entries changed"


# ----------------------------------------------------------------------------------------- model.to

def _vera_storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for layer in lk.adapted_layers(model).values()
            for key, basis in layer.bases.items() if key.startswith("vera") for t in (basis.down, basis.up)}


@pytest.mark.parametrize("target", ["float64", "half", "bfloat16", "float16"])
def test_model_to_moves_bank_stacks_and_shared_projections(device, ids, target):
    """Issue 12: after model.to(...) the packed bank stayed behind and VeRA's projections became per-layer
    copies. Everything lorakit holds must follow, and routed outputs must equal a model built in place.
    A float32 model moved with .to(dtype) for each dtype, and with .half()."""
    model = _mixed_model(torch.device("cpu"), torch.float32)
    lk.attach(model, lk.LoraXSConfig(r=4, init_std=0.2), "packed")
    pack_adapter(model, "packed")
    rows = ["l0", "xs4", "vera", None, "l3", "packed", "l4", "l1"]
    ids = torch.cat([ids, ids]).to(device)
    _logits(model, ids[:8].cpu(), rows)  # builds the LoRA stacks on the CPU
    assert len(_vera_storages(model)) == 2  # one down, one up for every layer
    want = {"float64": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16, "float16": torch.float16}[target]
    reference = copy.deepcopy(model)
    model = model.half() if target == "half" else model.to(want)
    model = model.to(device)
    assert get_bank(model).cores.dtype == want and get_bank(model).cores.device.type == device.type
    assert len(_vera_storages(model)) == 2, "VeRA's projections must stay shared after .to()"
    for layer in lk.adapted_layers(model).values():
        for stack in stacks(layer).values():  # the parameters still live in the moved stacks
            assert stack.scales.dtype == want and stack.scales.device.type == device.type
            assert all(t.dtype == want and t.device.type == device.type for t in stack.fields.values())
            assert all(stack.holds(layer, n) for n in stack.held)
        assert all(b.fingerprint.dtype == torch.float32 for b in layer.bases.values())
    routed = _logits(model, ids[:8], rows)
    # the reference: the deep copy (its own registry, bank and stacks) moved the same way
    reference = reference.half() if target == "half" else reference.to(want)
    reference = reference.to(device)
    for i, name in enumerate(rows):
        _assert_close(routed[i], _logits(reference, ids[i:i + 1], name)[0],
                      want if want in TOLERANCES else torch.float32, f"row {i} ({name})")
    assert get_bank(reference) is not get_bank(model)


def test_deepcopy_or_pickle_then_to_moves_the_copy_alone(ids):
    model = _mixed_model(torch.device("cpu"), torch.float32)
    lk.attach(model, lk.LoraXSConfig(r=4), "packed")
    pack_adapter(model, "packed")
    twin = copy.deepcopy(model).to(torch.float64)
    assert get_bank(model).cores.dtype == torch.float32 and get_bank(twin).cores.dtype == torch.float64
    assert lk.adapted_layers(model)[Q_PROJ].weight.dtype == torch.float32
    buffer = io_bytes.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).to(torch.float64)  # the move hook survives pickling
    assert get_bank(loaded).cores.dtype == torch.float64 and get_bank(model).cores.dtype == torch.float32


def test_fingerprints_survive_a_bf16_move(tmp_path):
    """model.to(bf16) must not round the bases' float32 fingerprints (files are checked at 1e-3; bf16 keeps
    about 4e-3): a VeRA adapter saved after the move loads, strict, into a fresh bf16 model. (A LoRA-XS basis
    is the SVD of W, which the move itself rounds, so its fingerprint is checked for being untouched.)"""
    model = tiny_llama()
    lk.attach(model, lk.LoraXSConfig(r=4), "x")
    lk.attach(model, lk.VeraConfig(r=4), "v")
    before = {k: b.fingerprint.clone() for k, b in lk.adapted_layers(model)[Q_PROJ].bases.items()}
    model = model.to(torch.bfloat16)
    for key, basis in lk.adapted_layers(model)[Q_PROJ].bases.items():
        assert torch.equal(basis.fingerprint, before[key]), key
    io.save_adapter(model, "v", tmp_path / "v")
    io.load_adapter(tiny_llama().to(torch.bfloat16), tmp_path / "v")
