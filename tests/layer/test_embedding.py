"""AdaptedEmbedding: LoRA on nn.Embedding equal to PEFT's, per-row routing, merging, dtype/device, training,
torch.compile; and adapters on a tied output head (lorakit.model.tied)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import lorakit as lk
from lorakit.layer.embedding import AdaptedEmbedding
from lorakit.errors import TiedWeightError, UnsupportedLayerError
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.conftest import TOLERANCES, randomize_adapters, tiny_llama

TARGETS = ("embed_tokens", "q_proj")


def tied_llama(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _logits(model, ids, route="__default__"):
    with torch.no_grad():
        if route == "__default__":
            return model(input_ids=ids).logits
        with lk.use_adapter(model, route):
            return model(input_ids=ids).logits


def _peft_twin(model, name, targets, make=tiny_llama):
    """The same adapter built in PEFT (the oracle) from lorakit's parameters."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    config = lk.adapter_config(model, name)
    twin = get_peft_model(make(), PeftLoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(targets)))
    state = {}
    for module, layer in lk.adapted_layers(model).items():
        adapter = layer.adapters[name]
        for part, tensor in (("A", adapter.lora_A), ("B", adapter.lora_B)):
            if isinstance(layer, AdaptedEmbedding):
                state[f"base_model.model.{module}.lora_embedding_{part}.default"] = tensor.detach().cpu()
            else:
                state[f"base_model.model.{module}.lora_{part}.default.weight"] = tensor.detach().cpu()
    result = twin.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return twin.eval()


def test_fresh_adapter_is_a_no_op_with_peft_init_and_base_keys_kept(ids):
    base = tiny_llama()
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS))
    layer = model.model.embed_tokens
    assert isinstance(layer, AdaptedEmbedding)
    adapter = layer.adapters["default"]
    assert tuple(adapter.lora_A.shape) == (4, 101) and tuple(adapter.lora_B.shape) == (32, 4)
    assert not adapter.lora_A.any() and adapter.lora_B.std() > 0.5  # PEFT's embedding init: A zeros, B normal
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys and "model.embed_tokens.weight" in keys
    assert sorted(k for k in keys - set(base.state_dict()) if "embed" in k) == [
        "model.embed_tokens.adapters.default.lora_A", "model.embed_tokens.adapters.default.lora_B"]


def test_equals_peft_one_adapter_and_per_row(device, ids):
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "a")
    randomize_adapters(model, std=0.3)
    twin = _peft_twin(model, "a", TARGETS)
    model, twin, ids = model.to(device), twin.to(device), ids.to(device)
    reference = _logits(twin, ids)
    assert (_logits(model, ids, "a") - reference).abs().max() < 2e-5
    assert (_logits(model, ids, ("a", None, "a", None)) - reference).abs()[0::2].max() < 2e-5


def test_per_row_routing_equals_each_adapter_alone(device, ids):
    model = tiny_llama()
    lk.attach(model, lk.LoraConfig(r=4, target_modules=TARGETS), "a")
    lk.attach(model, lk.LoraConfig(r=2, lora_alpha=6, target_modules=("embed_tokens",)), "b")
    randomize_adapters(model, std=0.3)
    model, ids = model.to(device), ids.to(device)
    route = ("b", None, "a", "b")
    alone = {n: _logits(model, ids, n) for n in ("a", "b", None)}
    mixed = _logits(model, ids, route)
    for row, name in enumerate(route):
        assert (mixed[row] - alone[name][row]).abs().max() < 1e-5, (row, name)
    assert not torch.allclose(alone["a"], alone[None]) and not torch.allclose(alone["b"], alone[None])
    embeds = model.model.embed_tokens
    with torch.no_grad():  # the layer alone: Δ_b(ids) is the only difference from the base table
        assert torch.allclose(embeds.delta("b", ids), embeds.adapters["b"].delta(ids), atol=1e-6)


def test_merge_and_unmerge_are_exact(device, ids):
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS), "a").to(device)
    randomize_adapters(model, std=0.3)
    ids = ids.to(device)
    weight = model.model.embed_tokens.weight.detach().clone()
    unmerged, base = _logits(model, ids, "a"), _logits(model, ids, None)
    lk.merge(model, "a")
    assert not torch.allclose(model.model.embed_tokens.weight, weight)
    assert (_logits(model, ids, "a") - unmerged).abs().max() < 1e-5
    assert (_logits(model, ids, (None, "a", None, "a")) - torch.stack([base[0], unmerged[1], base[2], unmerged[3]])
            ).abs().max() < 1e-5  # rows not routed to a merged adapter have it taken back out
    with pytest.raises(lk.MergeStateError):
        lk.merge(model, "a")
    lk.unmerge(model, "a")
    assert torch.allclose(model.model.embed_tokens.weight, weight, atol=1e-6, rtol=0)
    plain = lk.merge_and_unload(model, "a")
    assert type(plain.model.embed_tokens) is nn.Embedding
    assert (_logits(plain, ids) - unmerged).abs().max() < 1e-5


def test_delete_frees_the_table_and_a_new_adapter_attaches(ids):
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS), "a")
    randomize_adapters(model, std=0.3)
    base = _logits(model, ids, None)
    _logits(model, ids, ("a", None, "a", None))  # builds the slot stack the deletion must release
    lk.delete_adapter(model, "a")
    assert not model.model.embed_tokens.adapters and torch.equal(_logits(model, ids), base)
    lk.attach(model, lk.LoraConfig(r=2, target_modules=("embed_tokens",)), "b")
    randomize_adapters(model, std=0.3)
    assert not torch.allclose(_logits(model, ids, "b"), base)


def test_dtype_and_device_follow_the_base(device, dtype, ids):
    model = lk.attach(tiny_llama().to(device, dtype), lk.LoraConfig(r=4, target_modules=TARGETS), "a")
    randomize_adapters(model, std=0.3)
    adapter = model.model.embed_tokens.adapters["a"]
    assert adapter.lora_A.device.type == device.type and adapter.lora_A.dtype == torch.float32  # autocast default
    ids = ids.to(device)
    out = _logits(model, ids, "a")
    assert out.dtype == dtype and out.device.type == device.type
    reference = _logits(lk.attach(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS), "a"), ids.cpu(), None)
    model32 = model.to(torch.float32).cpu()  # model.to moves and casts the adapters' slot stacks too
    assert (_logits(model32, ids.cpu(), None) - reference).abs().max() < TOLERANCES[dtype] * 10
    assert (out.float().cpu() - _logits(model32, ids.cpu(), "a")).abs().max() < TOLERANCES[dtype] * 10


def test_training_reaches_only_a_and_b_and_skips_the_padding_row():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6, padding_idx=0)
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = lk.attach(Tagger(), lk.LoraConfig(r=2, target_modules=("embed",)), "a")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["embed.adapters.a.lora_A", "embed.adapters.a.lora_B"]
    model.train()
    ids = torch.tensor([[0, 3, 5, 0], [3, 7, 0, 2]])
    model(ids).pow(2).sum().backward()
    grad = model.embed.adapters["a"].lora_A.grad  # (r, V)
    assert grad[:, [2, 3, 5, 7]].abs().min() > 0 and not grad[:, 0].any() and not grad[:, [1, 4, 6, 8]].any()
    assert model.embed.weight.grad is None and model.head.weight.grad is None


def test_refused_configs_and_tables_leave_the_model_as_it_was():
    model = tiny_llama()
    for config in (lk.VeraConfig(r=4, target_modules=TARGETS), lk.LoraXSConfig(r=4, target_modules=TARGETS)):
        with pytest.raises(UnsupportedLayerError, match="only LoRA adapts embedding"):
            lk.attach(model, config, "x")
    assert type(model.model.embed_tokens) is nn.Embedding and not lk.adapted_layers(model)
    holder = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(UnsupportedLayerError, match="max_norm"):
        lk.attach(holder, lk.LoraConfig(r=2, target_modules=("0",)))
    lk.attach(model, lk.LoraConfig(r=2, target_modules="all-linear"), "lin")  # all-linear never takes embeddings
    assert type(model.model.embed_tokens) is nn.Embedding


def test_torch_compile_without_graph_breaks_equal_to_eager(ids):
    torch._dynamo.reset()
    model = tiny_llama()
    lk.attach(model, lk.LoraConfig(r=4, target_modules=TARGETS), "a")
    lk.attach(model, lk.LoraConfig(r=2, target_modules=("embed_tokens",)), "b")
    randomize_adapters(model, std=0.3)
    route = ["a", None, "b", "a"]
    step = lk.CompiledForward(model, backend="aot_eager")  # fullgraph=True: a graph break would raise
    with torch.no_grad():
        for r in (route, ["b", "b", None, "a"]):  # a new route of the same shape: the same graph
            assert (step(r, input_ids=ids).logits - _logits(model, ids, tuple(r))).abs().max() < 1e-5, r
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # the plain idiom, the route read at the model's entry
    assert (_logits(compiled, ids, route) - _logits(model, ids, route)).abs().max() < 1e-5
    torch._dynamo.reset()


# -- a tied output head ----------------------------------------------------------------------------------

def test_lm_head_adapter_on_tied_embeddings_leaves_the_embedding_and_refuses_merge(ids):
    model = lk.attach(tied_llama(), lk.LoraConfig(r=4, target_modules=("lm_head", "q_proj")), "a")
    randomize_adapters(model, std=0.3)
    table = model.model.embed_tokens.weight
    assert model.lm_head.weight is table  # still one Parameter
    before = table.detach().clone()
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), before[ids])  # the adapter is on the head only
    twin = _peft_twin(model, "a", ("lm_head", "q_proj"), make=tied_llama)
    assert (_logits(model, ids, "a") - _logits(twin, ids)).abs().max() < 2e-5
    unmerged = _logits(model, ids, "a")
    with pytest.raises(TiedWeightError, match=r"lm_head.weight is tied to \['model.embed_tokens.weight'\]"):
        lk.merge(model, "a")
    with pytest.raises(TiedWeightError):
        lk.merge_and_unload(model, "a")
    assert torch.equal(table, before) and lk.merged_names(model) == []  # nothing was written, q_proj included
    lk.untie(model, "lm_head")  # explicit: the head gets its own copy of the table
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    lk.merge(model, "a")
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert (_logits(model, ids, "a") - unmerged).abs().max() < 1e-5


def test_untied_head_merges_and_tied_save_keeps_the_tie(tmp_path, ids):
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=4, target_modules=("lm_head", "embed_tokens")), "a")
    randomize_adapters(model, std=0.3)
    unmerged = _logits(model, ids, "a")
    lk.merge(model, "a")
    assert (_logits(model, ids, "a") - unmerged).abs().max() < 1e-5

    tied = lk.attach(tied_llama(), lk.LoraConfig(r=4, target_modules=("q_proj", "embed_tokens", "lm_head")), "t")
    lk.attach(tied, lk.LoraConfig(r=4, target_modules=("q_proj",)), "q")
    randomize_adapters(tied, std=0.3)
    expected = _logits(tied, ids, "q")
    plain = lk.merge_and_unload(tied, "q")  # an adapter off the tied modules merges; the others are dropped
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    plain.save_pretrained(tmp_path / "m")
    reloaded = type(plain).from_pretrained(tmp_path / "m", **NO_HUB_KERNELS).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert (_logits(reloaded, ids) - expected).abs().max() < 1e-5


def test_smollm2_tied_embedding_and_head_equal_peft():
    """The embedded real model (SmolLM2-135M, tied embeddings): LoRA on embed_tokens, lm_head and q_proj."""
    from lorakit.base_models import load as models

    try:
        base, tokenizer = models.load_base("smollm2-135m")
    except lk.BaseModelNotFoundError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")
    ids = tokenizer(["LoRA adapters are small.", "Files are the interface"], return_tensors="pt",
                    padding=True).input_ids
    targets = ("embed_tokens", "lm_head", "q_proj")
    plain = copy.deepcopy(base)
    base_logits = _logits(plain, ids)
    ours = lk.attach(base, lk.LoraConfig(r=8, lora_alpha=16, target_modules=targets), "a")
    randomize_adapters(ours, std=0.02)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    reference = _logits(_peft_twin(ours, "a", targets, make=lambda: plain), ids)
    out = _logits(ours, ids, ("a", None))
    assert (out[0] - reference[0]).abs().max() < 2e-5
    assert (out[1] - base_logits[1]).abs().max() < 2e-5
    assert (reference[0] - base_logits[0]).abs().max() > 1e-2  # the adapter does something
