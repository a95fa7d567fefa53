"""Each data format trains a few steps, lowers the loss and leaves the run's files behind."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

from lorakit.train import train
from tests.train.conftest import chat_rows, class_rows, prompt_rows, run_config, text_rows, write_jsonl

CASES = {
    "text": (text_rows, "llama", "lora"),
    "prompt_completion": (prompt_rows, "llama", "lora_xs"),
    "chat": (chat_rows, "llama", "vera"),
    "classification": (class_rows, "bert", "lora"),
    "pair": (lambda: class_rows(pair=True), "bert", "lora"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_trains_and_lowers_loss(case, tmp_path, llama_dir, bert_dir):
    rows, arch, method = CASES[case]
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    base = llama_dir if arch == "llama" else bert_dir
    settings = {"lora": {"r": 4}, "lora_xs": {"r": 4, "lora_alpha": 64.0, "init_std": 1e-3},
                "vera": {"r": 16, "d_initial": 0.5}}[method]
    lr = 3e-2 if method == "vera" else 1e-2
    config = run_config(base, data, tmp_path / "run", method=method, adapter=settings, eval_data=str(data),
                        eval_every=10, lr=lr, schedule="constant")
    result = train(config)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first, (case, result.losses)
    out = tmp_path / "run"
    for name in ("metrics.csv", "metrics.json", "loss.png", "result.json", "run_config.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    rows_csv = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows_csv) == 20 and rows_csv[9]["eval_loss"] and float(rows_csv[-1]["tokens_per_s"]) > 0
    assert json.loads((out / "metrics.json").read_text())[-1]["eval_loss"] == pytest.approx(result.eval_loss)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if arch == "bert":  # the trained head travels with the adapter
        head = load_file(out / "adapter" / "head.safetensors")
        assert set(head) == {"classifier.weight", "classifier.bias"} and head["classifier.weight"].shape[0] == 3


def test_answer_only_loss_masks_the_prompt(llama_dir):
    from transformers import AutoTokenizer

    from lorakit.train.data import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(llama_dir)
    sample, cut = encode({"prompt": "2+3=", "completion": "5"}, "prompt_completion", tok, 64)
    assert not cut and sample.labels[: sample.prompt_len] == (IGNORE,) * sample.prompt_len
    assert [t for t in sample.labels if t != IGNORE] == tok("5", add_special_tokens=False).input_ids + [tok.eos_token_id]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    sample, _ = encode(chat, "chat", tok, 64)
    answer = tok.decode([t for t in sample.labels if t != IGNORE])
    assert answer == "yo</s>"


def test_collate_pads_with_attention_mask(llama_dir):
    from lorakit.train.collate import collate
    from lorakit.train.data import IGNORE, Sample

    batch = collate([Sample((1, 2, 3), labels=(1, 2, 3)), Sample((4,) * 5, labels=(IGNORE, 4, 4, 4, 4))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [4, 4, 4, 4, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0].tolist() == [1, 2, 3, IGNORE, IGNORE]


def test_padding_does_not_change_a_rows_loss(llama_dir):
    """A row's loss is the same alone and padded inside a batch with a longer row."""
    import torch

    from lorakit.base_models.load import load_base
    from lorakit.train.collate import collate
    from lorakit.train.data import Sample
    from lorakit.train.metrics import loss_sum

    model, _ = load_base(str(llama_dir))
    short, long = Sample((1, 5, 6, 7), labels=(1, 5, 6, 7)), Sample(tuple(range(1, 12)), labels=tuple(range(1, 12)))
    alone, _ = loss_sum(model, collate([short], 0))
    both = model(**{k: v for k, v in collate([short, long], 0).items() if k != "labels"}).logits[0, :3]
    ref = torch.nn.functional.cross_entropy(both, torch.tensor([5, 6, 7]), reduction="sum")
    assert torch.allclose(alone, ref, atol=1e-5)
