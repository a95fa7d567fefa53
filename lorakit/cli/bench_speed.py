"""`lorakit bench speed`'s command line, and the two it stands on: `device-speed` (the device benchmark alone)
and `train-step` (one training configuration in its own process, what `--only training` spawns)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.bench import device_speed, speed, train_step
from lorakit.cli.common import non_negative_int, positive_int


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that select the device benchmark (the rest are shared with the CPU one)."""
    parser.add_argument("--device", help="run the device benchmark on this torch device (cpu, cuda, cuda:1 ...)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the base model in the device benchmark (default float32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit bench speed", description=speed.__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="base model (default: the embedded SmolLM2-135M); a Llama config .json or a preset "
                             "(tinyllama-1.1b-random, tiny-llama-random) builds random weights, no download")
    parser.add_argument("--quick", action="store_true", help="fewer adapters and repeats (a few minutes)")
    parser.add_argument("--repeats", type=non_negative_int, default=0,
                        help="timed rounds per scenario (default, or 0: 5, quick 3)")
    parser.add_argument("--counts", type=positive_int, nargs="+",
                        help="distinct adapters per mixed batch (default 1 8 32 64 128; quick 1 8 32)")
    parser.add_argument("--seq", type=positive_int, default=32, help="tokens per row in the mixed-batch scenarios")
    parser.add_argument("--out", default="docs", help="where bench_speed.md/.json/.png are written")
    parser.add_argument("--only", nargs="+", choices=speed.SCENARIOS + device_speed.DEVICE_SCENARIOS,
                        help=f"run only these scenarios (CPU benchmark: {', '.join(speed.SCENARIOS)}; device "
                             f"benchmark: {', '.join(device_speed.DEVICE_SCENARIOS)})")
    add_device_arguments(parser)
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep (as `lorakit serve` does): glibc keeps freed memory for reuse, for base, PEFT "
                             "and lorakit alike; default: the C library's own behaviour")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CPU benchmark, or the device one when --device, --dtype or a config model asks for it."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # every flag changes the figures: the report names the command
    device_bench = speed.wants_device_benchmark(args.device, args.dtype, args.model)
    scenarios = device_speed.DEVICE_SCENARIOS if device_bench else speed.SCENARIOS
    wrong = [o for o in args.only or () if o not in scenarios]
    if wrong:
        parser.error(f"--only {' '.join(wrong)}: not a scenario of the "
                     + ("device benchmark (--device/--dtype/config model)" if device_bench else "CPU benchmark"))
    if device_bench:
        device_speed.run(args)
    else:
        speed.run(args)
    return 0


def device_main(argv: Sequence[str] | None = None) -> int:
    """The device benchmark alone, on the tiny random Llama unless told otherwise."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.cli.bench device-speed", description=device_speed.__doc__)
    parser.add_argument("--model", default="tiny-llama-random")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--only", nargs="+", choices=device_speed.DEVICE_SCENARIOS)
    add_device_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    device_speed.run(args)
    return 0


def train_step_main(argv: Sequence[str] | None = None) -> int:
    """One training configuration; its result is the JSON line it prints (lorakit.bench.train_step)."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.cli.bench train-step", description=train_step.__doc__)
    parser.add_argument("--impl", choices=["ours", "peft"], required=True)
    parser.add_argument("--method", choices=["lora", "lora_xs"], default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--malloc", choices=("keep", "default"), default="default",
                        help="keep: lorakit.perf.keep_freed_memory, as the parent benchmark was run")
    train_step.run(parser.parse_args(argv))
    return 0
