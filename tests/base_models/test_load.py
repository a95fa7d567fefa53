"""load_base on the embedded models, the SmolLM2 GGUF cache (build, validate, rebuild) and the error paths.

The first run converts SmolLM2 into the default cache (~30 s, once); the rebuild test converts again
into a temp dir, which doubles as the GGUF-vs-cache equivalence check (one conversion, both tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit.base_models.load as models
from lorakit.errors import BaseModelNotFoundError
from lorakit.base_models.load import EMBEDDED_MODELS, UnknownTaskError, cache_problem, ensure_cache, load_base
from tests.conftest import tiny_llama

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2():
    return load_base(SMOL)  # default cache: converts once on a fresh machine, then ~0.2 s


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def last_logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0, -1]


# ------------------------------------------------------------------------------------------ smollm2

def test_embedded_names_are_listed():
    assert set(EMBEDDED_MODELS) == {SMOL, "minilm-l6"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in EMBEDDED_MODELS.values())


def test_smollm2_is_ready_for_use(smollm2):
    model, tokenizer = smollm2
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert torch.isfinite(last_logits(model, tokenizer, "The quick brown fox")).all()


def test_smollm2_greedy_batch_answers_sensibly(smollm2):
    model, tokenizer = smollm2
    prompts = [chat(tokenizer, "What is the capital of France?"),
               chat(tokenizer, "Answer in one sentence: what is the largest planet in the solar system?")]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        alone = tokenizer(prompts[:1], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=8, do_sample=False)
    n = batch["input_ids"].shape[1]
    assert "Paris" in tokenizer.decode(out[0, n:], skip_special_tokens=True)
    assert "planet" in tokenizer.decode(out[1, n:], skip_special_tokens=True).lower()
    # Left padding must not change what the padded row generates.
    assert out[0, n:].tolist() == single[0, alone["input_ids"].shape[1]:].tolist()


def test_bfloat16_from_cache(smollm2):
    model, _ = load_base(SMOL, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_cache_directory_loads_as_local_path(smollm2):
    model, tokenizer = load_base(str(ensure_cache(SMOL)))  # architectures say CausalLM → causal LM
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.padding_side == "left"


# ------------------------------------------------------------- rebuild of a corrupt cache + equivalence

@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, smollm2):
    """Truncate a copy of the cache, let load_base rebuild it, and keep the GGUF model the rebuild used."""
    good = ensure_cache(SMOL)
    root = tmp_path_factory.mktemp("cache")
    target = root / SMOL
    shutil.copytree(good, target, ignore=shutil.ignore_patterns("model.safetensors"))
    with (good / "model.safetensors").open("rb") as src:
        (target / "model.safetensors").write_bytes(src.read(1 << 20))
    problem = cache_problem(target)
    captured = []
    real_load_gguf = models.load_gguf

    def spy(path):
        captured.append(real_load_gguf(path))
        return captured[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_gguf", spy)
        model, tokenizer = load_base(SMOL, cache_dir=root)
    return {"problem": problem, "root": root, "target": target, "good": good, "gguf": captured,
            "model": model, "tokenizer": tokenizer}


def test_truncated_cache_is_detected_and_rebuilt(rebuilt):
    problem = rebuilt["problem"]
    assert problem is not None and ("truncated" in problem or "header describes" in problem)
    assert len(rebuilt["gguf"]) == 1  # exactly one conversion happened
    assert cache_problem(rebuilt["target"]) is None
    size = (rebuilt["target"] / "model.safetensors").stat().st_size
    assert size == (rebuilt["good"] / "model.safetensors").stat().st_size
    assert sorted(p.name for p in rebuilt["root"].iterdir()) == [SMOL]  # no temp or old dirs left behind


def test_cached_model_matches_gguf(rebuilt):
    gguf_model, gguf_tokenizer = rebuilt["gguf"][0]
    model, tokenizer = rebuilt["model"], rebuilt["tokenizer"]
    text = chat(tokenizer, "Name three colours.")
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, gguf_model.lm_head.weight)
    with torch.no_grad():
        ids = tokenizer(text, return_tensors="pt")
        diff = (model(**ids).logits - gguf_model(**ids).logits).abs().max().item()
    assert diff <= 1e-5


# -------------------------------------------------------------- cache validation and publishing, cheap

def fake_cache(directory: Path) -> Path:
    """A structurally valid cache with a tiny weights file (no conversion)."""
    directory.mkdir(parents=True)
    source = models.embedded_path(SMOL)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "tokenizer.json").write_text("{}")
    (directory / "tokenizer_config.json").write_text("{}")
    (directory / models.MARKER).write_text(json.dumps({"format": 1, "name": SMOL, "source": source.name,
                                                        "source_bytes": source.stat().st_size}))
    save_file({"w": torch.zeros(64, 64)}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("damage, expected", [
    (lambda d: None, None),
    (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
    (lambda d: (d / "config.json").unlink(), "missing config.json"),
    (lambda d: (d / models.MARKER).unlink(), f"missing {models.MARKER}"),
    (lambda d: (d / "config.json").write_text("{not json"), "unreadable"),
    (lambda d: os.truncate(d / "model.safetensors", 4000), "bytes but its header"),
    (lambda d: os.truncate(d / "model.safetensors", 5), "truncated"),
    (lambda d: (d / models.MARKER).write_text(json.dumps({"format": 1, "name": SMOL})), "another source"),
])
def test_cache_problem(tmp_path, damage, expected):
    directory = fake_cache(tmp_path / SMOL)
    damage(directory)
    problem = cache_problem(directory)
    assert problem is None if expected is None else expected in problem


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_cache(SMOL, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temp dir


def test_abandoned_temp_dirs_are_swept_and_bad_cache_replaced(tmp_path, monkeypatch, smollm2):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".{SMOL}.tmp-{dead.pid}-abc123"
    abandoned.mkdir()
    (tmp_path / SMOL).mkdir()
    (tmp_path / SMOL / "config.json").write_text("{}")  # incomplete cache
    monkeypatch.setattr(models, "load_gguf", lambda path: (tiny_llama(), smollm2[1]))
    model, _ = load_base(SMOL, cache_dir=tmp_path)
    assert model.config.hidden_size == 32  # the (stand-in) rebuilt cache was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOL]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_root() == tmp_path / "models"
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"


# ------------------------------------------------------------------------------------------ minilm

def mean_pool(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embedding_ranks_similar_sentences():
    model, tokenizer = load_base("minilm-l6")
    assert type(model).__name__ == "BertModel" and not model.training and tokenizer.padding_side == "right"
    a, b, c = mean_pool(model, tokenizer, ["A man is playing a guitar.", "Someone plays the guitar.",
                                           "The stock market fell sharply today."])
    assert a @ b > a @ c + 0.2


def test_minilm_classification_is_quiet_and_shaped(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing beyond the expected new head
        model, tokenizer = load_base("minilm-l6", task="classification", num_labels=3)
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert logging.getLogger("transformers.modeling_utils").filters == []  # real reports still get through
    logits = model(**tokenizer(["good", "a much longer bad sentence"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_minilm_bfloat16():
    model, _ = load_base("minilm-l6", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ errors

def test_unknown_hub_name_says_offline_and_lists_embedded(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of 23 s of retries
    with pytest.raises(BaseModelNotFoundError) as info:
        load_base("no-such-org/no-such-model")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "offline" in message
    assert SMOL in message and "minilm-l6" in message


def test_missing_local_paths(tmp_path):
    with pytest.raises(BaseModelNotFoundError, match="no model directory"):
        load_base(str(tmp_path / "nope" / "model"))
    with pytest.raises(BaseModelNotFoundError, match="no config.json"):
        load_base(str(tmp_path))


def test_unknown_task():
    with pytest.raises(UnknownTaskError, match="task"):
        load_base("minilm-l6", task="translation")


# ------------------------------------------------------------------------ names: fail fast, suggest, portable

def test_misspelled_name_fails_fast_with_a_suggestion(monkeypatch):
    """Offline this used to spend ~30-60 s in hub retries: now the hub is never asked once the probe says
    there is no connection (the probe itself is tested below)."""
    monkeypatch.setattr(models, "hub_online", lambda: False)
    monkeypatch.setattr(models, "_load_hub", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(BaseModelNotFoundError, match="did you mean 'smollm2-135m'"):
        load_base("smolm2-135m")


def test_offline_switch_fails_without_touching_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models.socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    monkeypatch.setattr(models, "_load_hub", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(BaseModelNotFoundError, match=r"HF_HUB_OFFLINE is set.*did you mean 'minilm-l6'"):
        load_base("all-minilm-l6")


def test_malformed_hub_id_is_refused_before_any_hub_call(monkeypatch):
    monkeypatch.setattr(models, "hub_online", lambda: pytest.fail("probed the network"))
    with pytest.raises(BaseModelNotFoundError, match="not a valid hub id.*did you mean 'smollm2-135m'"):
        load_base("smol lm2 135m")


def test_hub_id_still_goes_to_the_hub_when_online(monkeypatch):
    monkeypatch.setattr(models, "hub_online", lambda: True)
    monkeypatch.setattr(models, "_load_hub", lambda name, *a: ("hub", name))
    assert load_base("some-org/some-model") == ("hub", "some-org/some-model")


def test_hub_probe_reports_no_connection(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("no route")
    monkeypatch.setattr(models.socket, "create_connection", refuse)
    assert models.hub_online() is False


def test_embedded_models_report_their_hub_id_and_it_loads_offline(monkeypatch):
    model, _ = load_base("minilm-l6")
    assert model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no HF cache copy here: falls back to the embedded one
    again, _ = load_base("sentence-transformers/all-MiniLM-L6-v2")
    assert type(again).__name__ == "BertModel" and again.name_or_path == model.name_or_path


@pytest.mark.parametrize("name, close", [("smollm2", ["smollm2-135m"]), ("SmolLM2-135M-Instruct", ["smollm2-135m"]),
                                         ("minilm_l6", ["minilm-l6"]), ("gpt2", [])])
def test_close_names(name, close):
    assert models.close_names(name) == close


# ------------------------------------------------------------------------------------------ hub kernels

@pytest.fixture
def kernels_by_default(monkeypatch):
    """from_pretrained as transformers 5.25 has it (use_kernels=True unless told), on any installed release."""
    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("the kernels package is installed: use_kernels=True would work here")
    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("use_kernels", True)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))


def test_load_base_keeps_transformers_modules_without_the_kernels_package(tmp_path, kernels_by_default):
    from transformers import AutoTokenizer

    tiny_llama().save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ensure_cache(SMOL)).save_pretrained(tmp_path)
    model, _ = load_base(str(tmp_path))  # 5.25's default alone: "Kernels are not available"
    assert not model.use_kernels and type(model).__name__ == "LlamaForCausalLM"
