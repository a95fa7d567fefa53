"""Tiny offline models and a character-level tokenizer (with a chat template), saved as HF directories."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
CHARS = list(string.ascii_letters + string.digits + " .,?!:'-+=")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>a:{% endif %}")


def char_tokenizer(kind: str = "llama") -> PreTrainedTokenizerFast:
    """One token per character; specials kept whole. BPE with no merges splits text into characters."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    if kind == "llama":
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
        fast.chat_template = CHAT_TEMPLATE
    else:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 4), ("[SEP]", 5)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                       unk_token="<unk>")
    return fast


def save_tiny_llama(path: Path, max_positions: int = 128) -> Path:
    torch.manual_seed(0)
    tokenizer = char_tokenizer("llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = char_tokenizer("bert")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


WORDS = ["red apple", "blue sky", "green leaf", "yellow sun", "white snow", "black night"]


def text_rows(n: int = 24) -> list[dict]:
    return [{"text": f"the {WORDS[i % 6]} is nice"} for i in range(n)]


def prompt_rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((i % 7, i % 5) for i in range(n))]


def chat_rows(n: int = 24) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"color of {WORDS[i % 6].split()[1]}?"},
                          {"role": "assistant", "content": WORDS[i % 6].split()[0]}]} for i in range(n)]


def class_rows(n: int = 24, pair: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        label = ["pos", "neg", "neutral"][i % 3]
        text = {"pos": "good great fine", "neg": "bad awful poor", "neutral": "table chair door"}[label]
        row = {"text": f"{text} {i}", "label": label}
        if pair:
            row["text_pair"] = "is it good?"
        rows.append(row)
    return rows


def run_config(base: Path, data: Path, out: Path, **kw):
    from lorakit.train import TrainConfig

    settings = dict(base=str(base), data=str(data), output_dir=str(out), steps=20, batch_size=8, lr=1e-2,
                    adapter={"r": 4}, progress=False)
    settings.update(kw)
    return TrainConfig(**settings)


def interrupt_at_call(monkeypatch, n: int) -> None:
    """The trainer's n-th loss computation raises KeyboardInterrupt: a run killed mid-way (undo to go on)."""
    from lorakit.train import trainer

    real, calls = trainer.loss_sum, {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(trainer, "loss_sum", interrupted)
