"""`lorakit bench NAME ...`, also `python -m lorakit.cli.bench NAME ...`: the first word picks a command line.

    lorakit bench speed|memory|accuracy|serve [options]      the benchmarks (docs/BENCHMARKS.md, MEMORY.md, RESULTS.md)
    python -m lorakit.cli.bench memory --worker CONFIG ...   one memory configuration, the process `bench memory` spawns
    python -m lorakit.cli.bench train-step --impl ours ...   one training configuration, spawned by `bench speed`
    python -m lorakit.cli.bench device-speed [options]       the device benchmark on its own

The benchmarks themselves are libraries (lorakit.bench); each command line here only parses and calls them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from functools import partial

from lorakit.cli.common import run_command

# name -> "module:function", the function taking the rest of the command line and returning an exit status.
BENCHMARKS: dict[str, str] = {"speed": "lorakit.cli.bench_speed:main", "memory": "lorakit.cli.bench_memory:main",
                              "accuracy": "lorakit.cli.bench_accuracy:main", "serve": "lorakit.cli.bench_serve:main"}
# Entry points that are not benchmarks to list: processes a benchmark spawns, and one half of `bench speed` alone.
ENTRY_POINTS: dict[str, str] = {"train-step": "lorakit.cli.bench_speed:train_step_main",
                                "device-speed": "lorakit.cli.bench_speed:device_main"}
COMMANDS = {**BENCHMARKS, **ENTRY_POINTS}
USAGE = f"usage: lorakit bench {{{','.join(BENCHMARKS)}}} [options]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command the first word names with the rest of the line (each owns its flags); 2 for no such name."""
    rest = list(sys.argv[1:] if argv is None else argv)
    target = COMMANDS.get(rest[0]) if rest else None
    if target is None:
        if rest and rest[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        print(USAGE, file=sys.stderr)
        return 2
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(rest[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_command(partial(main, sys.argv[1:]), "lorakit bench"))
