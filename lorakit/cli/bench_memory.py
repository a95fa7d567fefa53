"""`lorakit bench memory`'s command line; with --worker CONFIG (hidden) it is one configuration's own process,
what the benchmark spawns as `python -m lorakit.cli.bench memory --worker CONFIG ...`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lorakit.bench import memory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit bench memory", description=memory.__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; every configuration runs once per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: steadier on a shared CPU)")
    p.add_argument("--configs", nargs="+", default=list(memory.CONFIGS), choices=memory.CONFIGS)
    p.add_argument("--out", default="docs/MEMORY.md", help="markdown report ('' for none)")
    p.add_argument("--json", default="", help="also write every figure as JSON here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        memory.run_worker(args)
    else:
        memory.run(args)
    return 0
