"""Packing: examples share rows without attending across them; losses and adapters equal the unpacked ones."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.train import TrainConfigError, train
from lorakit.train.data import IGNORE, load_dataset
from lorakit.train.packing import check_packing, pack, pack_rows
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.train.conftest import class_rows, prompt_rows, run_config, text_rows, write_jsonl


def test_pack_rows_first_fit_longest_first():
    assert pack_rows([3, 5, 2, 4], 8) == [[1, 0], [3, 2]]  # 5+3, 4+2
    assert sorted(i for row in pack_rows([1] * 9, 4) for i in row) == list(range(9))
    with pytest.raises(ValueError, match="more than"):
        pack_rows([9], 8)


def _samples(llama_dir, tmp_path, rows):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    return load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_length=64).samples


def test_pack_layout(llama_dir, tmp_path):
    samples = _samples(llama_dir, tmp_path, prompt_rows(3))
    batch = pack(samples, 0, 64)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    ids, pos, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    n = sum(len(s.input_ids) for s in samples)
    assert starts[:3] == [0, len(samples[0].input_ids), len(samples[0].input_ids) + len(samples[1].input_ids)]
    assert all(labels[s] == IGNORE for s in starts) and (labels[n:] == IGNORE).all()
    assert int((labels != IGNORE).sum()) == sum(sum(x != IGNORE for x in s.labels[1:]) for s in samples)


def _token_nll(model, batch) -> torch.Tensor:
    """Per-target NLL of the labelled next-token targets, in row-major order."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return nll[targets.reshape(-1) != IGNORE]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_per_token(llama_dir, tmp_path, attn):
    samples = _samples(llama_dir, tmp_path, text_rows(5))
    model = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation=attn, **NO_HUB_KERNELS)
    lorakit.attach(model, lorakit.LoraConfig(r=4), "a")
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, "a"):
            p.normal_(0, 0.2)  # a non-zero adapter, so its path counts too
    alone = []
    with lorakit.use_adapter(model, "a"):
        for s in samples:
            one = {"input_ids": torch.tensor([s.input_ids]), "labels": torch.tensor([s.labels])}
            alone.append(_token_nll(model, one))
        batch = pack(samples, 0, 64)
        packed = _token_nll(model, batch)
    order = [i for row in pack_rows([len(s.input_ids) for s in samples], 64) for i in row]
    want = torch.cat([alone[i] for i in order])
    assert packed.shape == want.shape and len(samples) > 1 and batch["input_ids"].shape[0] < len(samples)
    assert torch.allclose(packed, want, atol=1e-5, rtol=1e-5), float((packed - want).abs().max())
    # without the restarted position ids (one position run over the whole row) the examples do see each other
    crossed = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    with lorakit.use_adapter(model, "a"):
        assert not torch.allclose(_token_nll(model, crossed), want, atol=1e-3)


def test_training_packed_equals_unpacked(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    kw = dict(steps=4, max_length=32)
    plain = train(run_config(llama_dir, data, tmp_path / "plain", **kw))
    packed = train(run_config(llama_dir, data, tmp_path / "packed", packing=True, **kw))
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "packed" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert packed.losses == pytest.approx(plain.losses, abs=1e-5)
    assert packed.tokens == plain.tokens


class _AttendsAcross(nn.Module):
    """A causal LM that ignores position ids and attends over the whole row: packing must be refused."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def test_check_packing_refuses_a_model_that_attends_across(llama_dir, tmp_path):
    samples = _samples(llama_dir, tmp_path, text_rows(2))
    model = LlamaForCausalLM.from_pretrained(llama_dir, **NO_HUB_KERNELS)
    check_packing(model, samples[0], samples[1], 0, torch.device("cpu"))  # transformers' Llama: fine
    with pytest.raises(TrainConfigError, match="attends across packed examples"):
        check_packing(_AttendsAcross(model), samples[0], samples[1], 0, torch.device("cpu"))


def test_packing_classification_is_refused(bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", class_rows())
    with pytest.raises(TrainConfigError, match="packing is for causal-LM"):
        train(run_config(bert_dir, data, tmp_path / "c", packing=True))
