"""The lorakit command line: help, one-line errors with exit status 2, inspect on a tiny adapter."""

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli.main import main
from lorakit.base_models.load import NO_HUB_KERNELS


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in ("quickstart", "inspect", "merge", "export"):
        assert cmd in res.stdout


def test_lorakit_error_is_one_line_exit_2(tmp_path):
    res = _run("inspect", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("lorakit: error:") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_inspect_tiny_adapter(tmp_path, capsys):
    from lorakit.io import save_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    lorakit.attach(model, lorakit.LoraXSConfig(r=4), "tiny")
    save_adapter(model, "tiny", tmp_path / "ad")
    assert main(["inspect", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert "lora_xs" in out and "14" in out  # 2 layers x 7 linear modules


@pytest.mark.slow
def test_quickstart_quick_end_to_end(tmp_path):
    res = _run("quickstart", "--quick", "--out", str(tmp_path / "qs"), timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "EM" in res.stdout and (tmp_path / "qs" / "adapter_model.safetensors").is_file()


def test_quickstart_trains_through_lorakit_train_on_a_tiny_base(tmp_path, capsys):
    """The whole quickstart (eval, train, eval, save, table) on a tiny local Llama, in seconds."""
    from tests.train.conftest import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", max_positions=512)
    out = tmp_path / "qs"
    assert main(["quickstart", "--quick", "--base", str(base), "--rank", "4", "--steps", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[4/6] training 3 steps × 4 examples, AdamW lr=0.003" in text and "EM" in text
    assert (out / "adapter_model.safetensors").is_file() and not (out / "run").exists()
    loss_line = next(line for line in text.splitlines() if line.strip().startswith("loss "))
    assert "->" in loss_line and "tokens/s" in loss_line


@pytest.fixture
def tiny_base_and_adapter(tmp_path):
    """A tiny Llama saved as an HF directory, a trained-looking LoRA-XS adapter for it, and its logits."""
    from lorakit.io import save_adapter
    from lorakit.base_models.load import load_base
    from tests.conftest import randomize_adapters
    from tests.train.conftest import save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "base")
    model, _ = load_base(str(base_dir))
    lorakit.attach(model, lorakit.LoraXSConfig(r=4), "xs")
    randomize_adapters(model, std=0.5)
    save_adapter(model, "xs", tmp_path / "adapter")
    ids = torch.randint(6, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with lorakit.use_adapter(model, "xs"), torch.no_grad():
        adapted = model(input_ids=ids).logits
    with lorakit.disable_adapters(model), torch.no_grad():
        base = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the outputs
    return base_dir, tmp_path / "adapter", ids, adapted


def test_merge_writes_a_plain_model_with_the_adapted_outputs(tiny_base_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, adapter, ids, adapted = tiny_base_and_adapter
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", **NO_HUB_KERNELS).eval()  # plain transformers, no lorakit
    plain = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    assert set(merged.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted).abs().max() < 1e-5
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_export_to_peft_loads_in_peft_with_the_same_outputs(tiny_base_and_adapter, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir, adapter, ids, adapted = tiny_base_and_adapter
    out = tmp_path / "peft"
    assert main(["export", "--to", "peft", str(adapter), "--base", str(base_dir), "--out", str(out)]) == 0
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS), str(out)).eval()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - adapted).abs().max() < 1e-5


def test_merge_refuses_a_non_empty_out_and_keeps_its_files(tiny_base_and_adapter, tmp_path, capsys):
    base_dir, adapter, _, _ = tiny_base_and_adapter
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "lorakit: error:" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [["serve", "--help"], ["bench", "--help"], ["bench", "accuracy", "--help"]])
def test_delegated_commands_print_their_own_help(command):
    res = _run(*command)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()


# -- exit statuses, closed pipes, help ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_adapter_dir(tmp_path_factory):
    from lorakit.io import save_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    lorakit.attach(model, lorakit.LoraXSConfig(r=4), "tiny")
    return save_adapter(model, "tiny", tmp_path_factory.mktemp("ad") / "tiny")


def _run_into_closed_pipe(args, unbuffered: bool):
    """Run `python -m lorakit ARGS` with stdout a pipe whose reader is already gone (like `| head -0`)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "lorakit", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_inspect_into_a_closed_pipe_exits_quietly(tiny_adapter_dir, unbuffered, json_flag):
    res = _run_into_closed_pipe(["inspect", *json_flag, str(tiny_adapter_dir)], unbuffered)
    assert res.stderr == "" and res.returncode == 141


def test_help_into_a_closed_pipe_exits_quietly():
    res = _run_into_closed_pipe(["train", "--help"], unbuffered=False)
    assert res.stderr == "" and res.returncode == 141


@pytest.mark.parametrize("argv, message", [
    (["train", "--base", "b"], "--data, --output-dir required"),
    (["train", "--base", "b", "--data", "d", "--output-dir", "o", "--set", "r"], "--set expects KEY=VALUE"),
    (["train", "--base", "b", "--data", "d", "--output-dir", "o", "--batch-size", "0"], "batch_size must be a"),
])
def test_train_input_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error:") and message in err and len(err.strip().splitlines()) == 1


def test_resume_flags_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", "--resume-if-present"])
    assert info.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "merge", "export", "inspect", "quickstart", "data"])
def test_help_lists_exit_statuses(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "exit status:" in out and "141" in out


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 0.001)", "(default: linear)", "(default: 8)", "(default: lora)", "(default: 2)",
                 "(default: float32)", "an error if it has none"):
        assert text in out, text
    assert "(default: None)" not in out and "(default: False)" not in out


def test_demo_help_is_whole(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "then serve them with the chat page." in out and "then `lorakit serve` starts on them." in out
    assert "(default: 30)" in out and "exit status:" in out


# -- --no-strict ----------------------------------------------------------------------------------------------

@pytest.fixture
def other_base(tiny_base_and_adapter, tmp_path):
    """The tiny base with different weights of the same shapes: the LoRA-XS adapter's fingerprints differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_base_and_adapter[0]
    model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.01)
    model.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def test_wrong_base_error_names_the_cli_flag_and_no_strict_loads(tiny_base_and_adapter, other_base, tmp_path,
                                                                 capsys):
    _, adapter, _, _ = tiny_base_and_adapter
    argv = ["merge", "--base", str(other_base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bases of this model differ" in err and "--no-strict" in err and "strict=False" in err
    assert not (tmp_path / "m").exists()
    with pytest.warns(UserWarning, match="bases of this model differ"):
        assert main(argv + ["--no-strict"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_eval_no_strict(tiny_base_and_adapter, other_base, tmp_path, capsys):
    from tests.train.conftest import prompt_rows, write_jsonl

    _, adapter, _, _ = tiny_base_and_adapter
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows(4))
    argv = ["eval", "--base", str(other_base), "--adapter", str(adapter), "--data", str(data), "--no-generate",
            "--json"]
    assert main(argv) == 2 and "--no-strict" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="bases of this model differ"):
        assert main(argv + ["--no-strict"]) == 0
    assert '"adapter"' in capsys.readouterr().out
