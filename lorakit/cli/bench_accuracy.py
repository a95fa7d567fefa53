"""`lorakit bench accuracy`'s command line: which tasks, methods and seeds, where the report goes, --resume."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.bench import accuracy
from lorakit.bench.accuracy_methods import METHODS
from lorakit.tasks.accuracy import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit bench accuracy", description=accuracy.__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="docstrings task only, one learning rate per method, one seed, a third of the steps (minutes)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="tasks (default: all; --quick: docstrings)")
    p.add_argument("--methods", nargs="+", choices=[m.key for m in METHODS],
                   help="methods (default: all on docstrings; LoRA, LoRA-XS r=4/16, VeRA, QLoRA on arithmetic)")
    p.add_argument("--seeds", type=int, help="seeds per chosen learning rate (default: 3 for docstrings, 1 for "
                                             "arithmetic; --quick 1)")
    p.add_argument("--out", default="docs", help="directory for RESULTS.md, results.json and the charts")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in OUT's results.json that match (task, method, learning rate, seed "
                        "and the task's steps and batch size); train only the rest. The rewritten report holds this "
                        "plan's runs only: resume with the same --tasks/--methods to keep the others")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        print("lorakit bench accuracy: --seeds must be >= 1", file=sys.stderr)
        return 2
    command = ("lorakit bench accuracy " + " ".join(argv)).strip()
    try:
        accuracy.run(args, command)
    except accuracy.ResumeError as err:
        print(f"lorakit bench accuracy: {err}", file=sys.stderr)
        return 2
    return 0
