"""Quantized bases: outputs near fp32, bitsandbytes-compatible keys, adapters over them, training, merging."""

import logging
import sys

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LoraXSConfig, VeraConfig
from lorakit.model import quantize as quant
from lorakit.errors import BitsAndBytesUnavailableError, MergeStateError, QuantizationError
from lorakit.methods.lora_xs import svd_basis
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.conftest import MODEL_FACTORIES, model_output, randomize_adapters, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

CONFIGS = {"lora": LoraConfig(r=4, lora_alpha=8), "lora_xs": LoraXSConfig(r=4, init_std=0.2), "vera": VeraConfig(r=8)}
# Stated tolerance of a quantized base against the fp32 model: mean |Δ output| / mean |output|. Random tiny
# models are harsh (no outlier structure); SmolLM2's figures are in test_smollm2_nf4_base.
REL_TOLERANCE = {"nf4": 0.2, "fp4": 0.2, "int8": 0.01}


def _quantized(arch: str, quant_type: str = "nf4", seed: int = 0):
    return lorakit.quantize(MODEL_FACTORIES[arch](seed), quant_type)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().mean() / ref.abs().mean()).item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_quantized_base_stays_within_tolerance_of_fp32(arch, ids, quant_type):
    ref = model_output(MODEL_FACTORIES[arch](), ids)
    model = _quantized(arch, quant_type)
    with torch.no_grad():
        err = _rel_error(model_output(model, ids), ref)
    assert 0 < err < REL_TOLERANCE[quant_type], err
    kind = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, kind) for m in model.modules()) == {"llama": 14, "bert": 13, "gpt2": 8}[arch]


def test_quantize_equals_transformers_bitsandbytes_loading(tmp_path, ids):
    """quantize() is bit-identical to loading with transformers' BitsAndBytesConfig (NF4, double quant)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                  dtype=torch.float32, **NO_HUB_KERNELS)
    ours = _quantized("llama")
    # (with grad enabled, so bitsandbytes does not repack the loaded model's weights for bf16 CPU kernels)
    assert torch.equal(ours(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # ...and such a model is a base like any other: adapters attach, and disabled is the base
    lorakit.attach(loaded, CONFIGS["lora"], "lora")
    randomize_adapters(loaded)
    with lorakit.disable_adapters(loaded):
        assert torch.equal(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    loaded.train()
    with lorakit.use_adapter(loaded, "lora"):
        loaded(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lorakit.adapter_parameters(loaded, "lora"))


def test_state_dict_keys_are_bitsandbytes_keys_and_reload(ids):
    plain = _quantized("llama")
    base_keys = set(plain.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in base_keys
    model = _quantized("llama")
    for name, config in CONFIGS.items():
        lorakit.attach(model, config, name)
    randomize_adapters(model)
    state = model.state_dict()
    assert {k for k in state if ".adapters." not in k} == base_keys
    # the whole state dict loads strict into a freshly quantized + attached model of another seed (LoRA-XS's
    # basis is the SVD of the base it was attached to, so it is left out of the comparison)
    other = _quantized("llama", seed=5)
    for name, config in CONFIGS.items():
        lorakit.attach(other, config, name)
    other.load_state_dict(state, strict=True)
    for name in ("lora", "vera"):
        with torch.no_grad(), lorakit.use_adapter(model, name), lorakit.use_adapter(other, name):
            assert torch.equal(model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_int8_state_dict_keys_match_bitsandbytes():
    plain = _quantized("llama", "int8")
    model = _quantized("llama", "int8")
    lorakit.attach(model, CONFIGS["lora"], "lora")
    assert {k for k in model.state_dict() if ".adapters." not in k} == set(plain.state_dict())
    assert "model.layers.0.mlp.up_proj.SCB" in plain.state_dict()


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_adapters_on_quantized_base_match_dense_reference(arch, ids, quant_type):
    """Routed output ≡ a float model holding D(Q(W)) + ΔW; disabled ≡ the quantized base exactly."""
    model = _quantized(arch, quant_type)
    with torch.no_grad():
        quantized_base = model_output(model, ids)
    for name, config in CONFIGS.items():
        lorakit.attach(model, config, name)
    randomize_adapters(model)
    with torch.no_grad(), lorakit.disable_adapters(model):
        assert torch.equal(model_output(model, ids), quantized_base)
    layers = lorakit.adapted_layers(model)
    for name in CONFIGS:
        reference = MODEL_FACTORIES[arch]()
        with torch.no_grad():
            for full_name, layer in layers.items():
                target = reference.get_submodule(full_name)
                w = layer.quant.dequantize(layer.weight) + layer.delta_weight(name)  # (out, in)
                target.weight.copy_(w.T if type(target).__name__ == "Conv1D" else w)
            with lorakit.use_adapter(model, name):
                routed = model_output(model, ids)
        tol = 1e-4 if quant_type == "nf4" else 5e-2  # int8 also rounds the activations (LLM.int8())
        assert (routed - model_output(reference, ids)).abs().max() < tol, name


def test_lora_xs_basis_comes_from_the_dequantized_weight():
    model = _quantized("llama")
    lorakit.attach(model, LoraXSConfig(r=4), "xs")
    layer = lorakit.adapted_layers(model)["model.layers.1.mlp.down_proj"]
    expected = svd_basis(layer.quant.dequantize(layer.weight), 4)
    assert torch.allclose(layer.bases["lora_xs"].down, expected.down, atol=1e-5)
    assert torch.allclose(layer.bases["lora_xs"].up, expected.up, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lora_xs", "vera"])
def test_training_on_4bit_base_lowers_loss_and_touches_only_the_adapter(ids, method):
    torch.manual_seed(0)
    model = _quantized("llama")
    config = {"lora": LoraConfig(r=8, lora_alpha=16), "lora_xs": LoraXSConfig(r=8, lora_alpha=8),
              "vera": VeraConfig(r=16, d_initial=1.0)}[method]
    lorakit.attach(model, config, method)
    packed = {n: p.detach().clone() for n, p in model.state_dict().items() if ".adapters." not in n}
    params = lorakit.adapter_parameters(model, method)
    optimizer = torch.optim.AdamW(params, lr={"lora": 2e-2, "lora_xs": 5e-2, "vera": 5e-2}[method])
    quant.prepare_for_training(model)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in packed.items())  # base untouched


def test_training_through_4bit_linears_with_bias(ids):
    """bitsandbytes hands back a view when a 4-bit linear has a bias, and the adapters add into the base output
    in place: without a copy, autograd refused the first backward (BERT-style models, the accuracy benchmark)."""
    torch.manual_seed(0)
    model = _quantized("bert")
    lorakit.attach(model, LoraConfig(r=4, lora_alpha=8), "lora")
    optimizer = torch.optim.AdamW(lorakit.adapter_parameters(model, "lora"), lr=2e-2)
    target = torch.randn(model.config.hidden_size)  # LayerNorm fixes the output's scale, not its direction
    losses = []
    for _ in range(6):
        loss = (model(input_ids=ids).last_hidden_state - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients(ids):
    grads = []
    for checkpointing in (False, True):
        model = _quantized("llama")
        lorakit.attach(model, LoraConfig(r=4), "lora")
        randomize_adapters(model)
        quant.prepare_for_training(model, gradient_checkpointing=checkpointing)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in lorakit.adapter_parameters(model, "lora")])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_merge_into_4bit_is_measured_and_unmerge_restores_the_packed_weight(ids):
    model = _quantized("llama")
    for name, config in CONFIGS.items():
        lorakit.attach(model, config, name)
    randomize_adapters(model, std=0.01)
    before = {n: (l.weight.data.clone(), l.weight.quant_state) for n, l in lorakit.adapted_layers(model).items()}
    report = quant.merge_quantized(model, "lora", ids)
    assert len(report.layers) == 14
    assert 0 < report.layer_mean_abs <= report.layer_max_abs
    assert 0 < report.output_mean_abs <= report.output_max_abs
    assert report.output_mean_abs < 0.1 * report.output_ref_mean_abs  # rounding, small next to the outputs
    assert "max" in report.summary() and report.effect_lost is not None and report.output_adapter_mean_abs > 0
    assert all(e.delta_mean_abs > 0 for e in report.layers.values())
    with torch.no_grad():
        merged_default = model(input_ids=ids).logits  # no route: the stored (merged) weights
    with torch.no_grad(), lorakit.use_adapter(model, "lora"):
        assert torch.equal(model(input_ids=ids).logits, merged_default)
    with pytest.raises(MergeStateError):
        lorakit.merge(model, "lora")
    lorakit.unmerge(model, "lora")
    for n, layer in lorakit.adapted_layers(model).items():
        assert torch.equal(layer.weight.data, before[n][0]) and layer.weight.quant_state is before[n][1]
    assert quant.merge_errors(model) == {}


def test_merge_and_unload_on_4bit_base(ids):
    def build():
        model = _quantized("llama")
        lorakit.attach(model, CONFIGS["lora_xs"], "xs")
        randomize_adapters(model, std=0.01)
        return model

    model = build()
    with torch.no_grad(), lorakit.use_adapter(model, "xs"):
        unmerged = model(input_ids=ids).logits
    full = lorakit.merge_and_unload(build(), "xs", full_precision=True)  # float: D(W₀) + ΔW, no rounding
    assert not any(quant.is_quantized_linear(m) for m in full.modules())
    assert type(full.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert (full(input_ids=ids).logits - unmerged).abs().max() < 1e-4
    packed = lorakit.merge_and_unload(build(), "xs")  # bitsandbytes layers, requantized
    assert isinstance(packed.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert set(packed.state_dict()) == set(_quantized("llama").state_dict())
    with torch.no_grad():
        assert (packed(input_ids=ids).logits - unmerged).abs().max() < 0.5


def test_bits_per_weight_of_nf4_with_and_without_double_quant():
    model = MODEL_FACTORIES["llama"]()
    # big enough layers that code books do not dominate: 4 + 8/64 + 32/(64·256) ≈ 4.13 bits
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(1024, 2048, bias=False)
    double = quant.bits_per_weight(lorakit.quantize(model, target_modules=["up_proj"]))
    assert double.layers == 2 and 4.1 < double.bits_per_weight < 4.2
    single = MODEL_FACTORIES["llama"]()
    single.model.layers[0].mlp.up_proj = torch.nn.Linear(1024, 2048, bias=False)
    lorakit.quantize(single, target_modules=["up_proj"], double_quant=False)
    assert 4.45 < quant.bits_per_weight(single).bits_per_weight < 4.55


def test_quantize_errors():
    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(QuantizationError, match="Embedding"):
        lorakit.quantize(model, target_modules=["embed_tokens"])
    with pytest.raises(QuantizationError, match="quant_type"):
        lorakit.quantize(model, "nf3")
    with pytest.raises(QuantizationError, match="not found"):
        lorakit.quantize(model, target_modules=["no_such_proj"])
    lorakit.attach(model, CONFIGS["lora"], "lora")
    with pytest.raises(QuantizationError, match="before attaching"):
        lorakit.quantize(model)
    assert not any(quant.is_quantized_linear(m) for m in model.modules())  # nothing was changed


@pytest.mark.parametrize("targets, exclude", [("all-linear", ()), ("all-linear", ("layers.0.mlp.up_proj", "o_proj")),
                                              (["q_proj", "layers.1.mlp.down_proj"], ()), (r".*\.(k|v)_proj", ("layers.0.self_attn.k_proj",))])
def test_quantize_selects_the_layers_attach_would(targets, exclude):
    """One target rule (lorakit.layer.surgery.select_modules) for both: the same spec names the same layers."""
    expected = lorakit.find_targets(MODEL_FACTORIES["llama"](), LoraConfig(target_modules=targets, exclude_modules=exclude))
    model = lorakit.quantize(MODEL_FACTORIES["llama"](), target_modules=targets, exclude_modules=exclude)
    assert [n for n, m in model.named_modules() if quant.is_quantized_linear(m)] == expected


def test_quantize_target_errors_are_quantization_errors():
    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(QuantizationError, match="invalid"):  # a bad regex, named (not a bare re.error)
        lorakit.quantize(model, target_modules="(")
    with pytest.raises(QuantizationError, match="matches no module"):
        lorakit.quantize(model, target_modules=r"nothing\.here")
    with pytest.raises(QuantizationError, match="after exclusions"):
        lorakit.quantize(model, target_modules=["q_proj"], exclude_modules=["q_proj"])
    assert not any(quant.is_quantized_linear(m) for m in model.modules())


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(BitsAndBytesUnavailableError, match="pip install bitsandbytes"):
        lorakit.quantize(MODEL_FACTORIES["llama"]())
    assert isinstance(BitsAndBytesUnavailableError("x"), ImportError)


@pytest.fixture(scope="module")
def smollm2():
    from lorakit.base_models.load import load_base

    model, tokenizer = load_base("smollm2-135m")
    text = ["The capital of France is Paris, and the capital of Germany is Berlin.",
            "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"]
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**batch).logits
    lorakit.quantize(model, "nf4")
    return model, batch, reference


def test_smollm2_nf4_base(smollm2):
    """Real model: ≤ 4.2 bits per weight; outputs within the stated tolerance of fp32 (measured: rel 0.22,
    top-1 agreement 0.74, KL 0.36 nats; SmolLM2 ships as Q4_1, so NF4 re-rounds already-rounded weights)."""
    model, batch, reference = smollm2
    report = quant.bits_per_weight(model)
    assert report.layers == 210 and report.bits_per_weight <= 4.2
    with torch.no_grad():
        logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert _rel_error(logits[mask], reference[mask]) < 0.3
    assert (logits.argmax(-1) == reference.argmax(-1))[mask].float().mean() > 0.6
    log_p, log_q = reference.log_softmax(-1)[mask], logits.log_softmax(-1)[mask]
    assert (log_p.exp() * (log_p - log_q)).sum(-1).mean() < 0.6


def test_smollm2_qlora_steps_lower_the_loss(smollm2):
    model, batch, _ = smollm2
    torch.manual_seed(0)
    lorakit.attach(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), "qlora")
    optimizer = torch.optim.AdamW(lorakit.adapter_parameters(model, "qlora"), lr=3e-3)
    quant.prepare_for_training(model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_swapping_merged_adapters_on_4bit_keeps_one_record_each():
    """swap_merged on a quantized base appended one concatenated record per swap that no unmerge matched:
    the record grew without bound and the original packed weight was never released."""
    model = _quantized("llama")
    for name in ("a", "b"):
        lorakit.attach(model, CONFIGS["lora"], name)
    randomize_adapters(model, std=0.01)
    layer = next(iter(lorakit.adapted_layers(model).values()))
    packed = layer.weight.data.clone()
    lorakit.merge(model, "a")
    for _ in range(4):
        lorakit.swap_merged(model, "a", "b")
        lorakit.swap_merged(model, "b", "a")
    assert len(layer.quant.applied) == 1
    lorakit.unmerge(model, "a")
    assert layer.quant.applied == [] and layer.quant.original is None
    assert torch.equal(layer.weight.data, packed)  # the original packed weight, bit for bit
