"""`lorakit bench NAME` / `python -m lorakit.cli.bench NAME`: the first word picks the command line, each parses
its own flags and hands the libraries (lorakit.bench) what they run; bad flags end with status 2."""

from __future__ import annotations

import json

import pytest

from lorakit.bench import device_speed, memory, speed, train_step
from lorakit.cli import bench, bench_accuracy, bench_memory, bench_speed
from lorakit.cli.main import main as lorakit_main


def test_an_unknown_or_missing_benchmark_prints_the_usage(capsys):
    assert bench.main(["nope"]) == 2 and bench.main([]) == 2
    assert capsys.readouterr().err.count("usage: lorakit bench {speed,memory,accuracy,serve} [options]") == 2
    assert bench.main(["--help"]) == 0 and "{speed,memory,accuracy,serve}" in capsys.readouterr().out
    assert lorakit_main(["bench", "nope"]) == 2


@pytest.mark.parametrize("name", sorted(bench.COMMANDS))
def test_every_command_has_its_own_help(name, capsys):
    if name == "serve":
        pytest.importorskip("httpx")
    with pytest.raises(SystemExit) as done:
        bench.main([name, "--help"])
    assert done.value.code == 0
    prog = f"lorakit bench {name}" if name in bench.BENCHMARKS else f"python -m lorakit.cli.bench {name}"
    assert capsys.readouterr().out.startswith(f"usage: {prog}")


def test_only_refuses_the_other_benchmarks_scenarios(capsys):
    with pytest.raises(SystemExit) as err:
        bench_speed.main(["--only", "bases"])  # no --device/--dtype/config: the CPU benchmark has no "bases"
    assert err.value.code == 2 and "not a scenario of the CPU benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_speed.main(["--device", "cpu", "--only", "switch"])


@pytest.mark.parametrize("flags", [["--counts", "0"], ["--seq", "-1"], ["--repeats", "-1"]])
def test_counts_and_lengths_must_be_positive(flags, capsys):
    with pytest.raises(SystemExit) as err:
        bench_speed.main(flags)
    assert err.value.code == 2 and "must be >=" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [(["--quick"], "cpu benchmark"),
                                            (["--device", "cpu"], "device benchmark"),
                                            (["--dtype", "bfloat16"], "device benchmark"),
                                            (["--model", "my.json"], "device benchmark"),
                                            (["--model", "tiny-llama-random"], "device benchmark")])
def test_device_flags_or_a_config_pick_the_device_benchmark(monkeypatch, argv, expected):
    """The CPU benchmark's scenarios stay as they were; --device/--dtype or a config model select the new one."""
    picked = []
    monkeypatch.setattr(speed, "run", lambda args: picked.append(("cpu benchmark", args.argv)))
    monkeypatch.setattr(device_speed, "run", lambda args: picked.append(("device benchmark", args.argv)))
    assert lorakit_main(["bench", "speed", *argv]) == 0
    assert picked == [(expected, argv)]  # the report's command line is the one given


def test_memory_worker_flag_runs_one_configuration(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(memory, "run_worker", seen.append)
    monkeypatch.setattr(memory, "run", lambda args: pytest.fail("a worker must not start a whole benchmark"))
    argv = ["memory", "--worker", "lorakit-fp32", "--model", "m", "--rank", "4", "--steps", "1"]
    assert bench.main(argv) == 0
    assert (seen[0].worker, seen[0].model, seen[0].rank, seen[0].steps) == ("lorakit-fp32", "m", 4, 1)
    bench_memory.build_parser().print_help()
    assert "--worker" not in capsys.readouterr().out  # a worker's flag, not the user's


def test_memory_worker_command_parses_as_the_parent_writes_it(monkeypatch):
    """The parent's spawn line (WORKER_COMMAND + options) is a command line lorakit.cli.bench accepts."""
    seen = []
    monkeypatch.setattr(memory, "run_worker", seen.append)
    assert memory.WORKER_COMMAND[:2] == ("-m", "lorakit.cli.bench")
    assert bench.main([*memory.WORKER_COMMAND[2:], "accuracy", "--threads", "2"]) == 0
    assert seen[0].worker == "accuracy" and seen[0].threads == 2


def test_train_step_entry_point(monkeypatch):
    seen = []
    monkeypatch.setattr(train_step, "run", seen.append)
    assert train_step.COMMAND[:2] == ("-m", "lorakit.cli.bench")
    assert bench.main([*train_step.COMMAND[2:], "--impl", "peft", "--malloc", "keep"]) == 0
    assert (seen[0].impl, seen[0].method, seen[0].rank, seen[0].malloc) == ("peft", "lora", 16, "keep")
    with pytest.raises(SystemExit):
        bench.main(["train-step"])  # --impl is required


def test_accuracy_refuses_bad_seeds_and_an_unreadable_resume_file(tmp_path, capsys):
    assert bench_accuracy.main(["--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("[1, 2]")
    assert bench_accuracy.main(["--resume", "--out", str(tmp_path), "--tasks", "docstrings", "--methods", "head"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit bench accuracy: cannot resume from") and str(tmp_path / "results.json") in err
    assert json.loads((tmp_path / "results.json").read_text()) == [1, 2]  # left as it was


def test_serve_arguments():
    pytest.importorskip("httpx")
    from lorakit.cli import bench_serve

    with pytest.raises(SystemExit):
        bench_serve.parse_args(["--requests", "0"])
    with pytest.raises(SystemExit):
        bench_serve.parse_args(["--methods", "vera"])
    args = bench_serve.parse_args(["--device", "cuda"])
    assert args.adapters == [0, 1, 16, 128, 32] and args.clients == 32  # cuda: the 32-LoRA goal's scenario
    assert bench_serve.parse_args(["--quick", "--max-tokens", "6"]).max_tokens == 6  # explicit options win
    quick = bench_serve.parse_args(["--quick", "--methods", "lora", "lora"])
    assert quick.base == "tiny-llama-random" and quick.adapters == [0, 1, 3] and quick.methods == ["lora"]
