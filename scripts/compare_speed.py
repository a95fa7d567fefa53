"""`lorakit bench speed` on two source trees in one run, interleaved (A B A B ...), to hold a change to "no row
slower": per row, the median over rounds of ours / base (both measured in the same process, so a busy machine
moves them together), after against before.

    python scripts/compare_speed.py BEFORE_TREE AFTER_TREE --rounds 3 -- --quick --only prefill mixed decode
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(tree: Path, bench_args: list[str], out: Path) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "lorakit", "bench", "speed", *bench_args, "--out", str(out)],
                   cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return {row["measure"]: row for row in json.loads((out / "bench_speed.json").read_text())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=float, default=1.03, help="largest after/before ratio allowed per row")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after "--": bench speed's own arguments
    args = parser.parse_args(argv[:cut])
    bench_args = argv[cut + 1:]
    ratios: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")  # neither always goes first
            for side in order:
                rows = one_run(getattr(args, side).resolve(), bench_args, Path(tmp) / f"{side}{round_}")
                for measure, row in rows.items():
                    if row.get("ours") and row.get("base"):
                        ratios[side].setdefault(measure, []).append(row["ours"] / row["base"])
                print(f"round {round_ + 1}/{args.rounds}: {side} done", file=sys.stderr, flush=True)
    worst = 0.0
    print("| measure | before (ours/base) | after (ours/base) | after/before |\n|---|---|---|---|")
    for measure, before in ratios["before"].items():
        after = ratios["after"].get(measure)
        if not after:
            continue
        b, a = statistics.median(before), statistics.median(after)
        worst = max(worst, a / b)
        print(f"| {measure} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
    print(f"\nworst row after/before: {worst:.3f} (limit {args.limit})")
    return 0 if worst <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
