"""`lorakit bench accuracy`: the reproduction table of the papers' claims on the built-in tasks.

Protocol, per task and method (tasks in lorakit.tasks.accuracy, methods in accuracy_methods):

    1. choose the learning rate: one run (seed 0) per value of the method family's grid, each scored on the
       validation split (carved out of the training split); the best validation score wins, ties going
       to the lower validation loss. The test split plays no part in the choice.
    2. run the chosen rate with every seed (seed 0's run from step 1 is reused) and score the test split:
       the table shows mean ± sample std over seeds.

Every run starts from a freshly loaded base (seeded: the classifier head and adapter initialisations
depend on the seed only), trains `task.steps` AdamW steps (linear warm-up over 10%, linear decay,
clipping at 1.0) on batches drawn by a seeded shuffle, and records trainable numbers, the bytes of
the saved adapter (or of the model, for full fine-tuning), train time and peak resident memory
(the process's high-water mark, reset before each run).

Writes RESULTS.md (table, claims checked against our numbers, charts, the command), results.json
(every run) and one PNG per task: metric against trainable parameters on a log scale.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.bench.accuracy_methods import ADAPTER, BY_KEY, METHODS, Method, file_bytes, prepare
from lorakit.tasks.accuracy import TASKS, Task, TaskData
from lorakit.bench.peak import peak_kib, release_and_reset_peak
from lorakit.train.collate import collate
from lorakit.train.metrics import loss_sum, mean_loss
from lorakit.train.trainer import step_indices


@dataclass
class RunResult:
    task: str
    method: str
    lr: float
    seed: int
    val: float  # task metric on the validation split, percent
    val_loss: float
    test: float  # task metric on the test split, percent
    trainable: int  # the method's own trained numbers
    head: int  # classification-head numbers trained alongside
    file_bytes: int
    train_s: float
    peak_mib: float
    final_loss: float


def _routed(model, method: Method):
    """The call's route to the trained adapter (full fine-tuning and the probe have none)."""
    return lorakit.use_adapter(model, ADAPTER) if method.config is not None else contextlib.nullcontext()


def train_and_score(task: Task, data: TaskData, method: Method, lr: float, seed: int, steps: int,
                    scratch: str) -> RunResult:
    """One run: a fresh base prepared as `method`, trained, scored on validation and test."""
    torch.manual_seed(seed)
    model, _ = task.load_model()
    trainable, head = prepare(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warm if step < warm else 1.0 - (step - warm) / max(1, steps - warm))
    reset_ok = release_and_reset_peak()
    model.train()
    start = time.perf_counter()
    loss_value = math.nan
    for step in range(steps):
        batch = collate([data.train[i] for i in step_indices(step, task.batch_size, len(data.train), seed)],
                        data.pad_id)
        with _routed(model, method):
            total, count = loss_sum(model, batch)
        loss = total / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            break
    train_s = time.perf_counter() - start
    peak, _ = peak_kib(reset_ok)
    model.eval()
    with _routed(model, method):
        val_loss = mean_loss(model, data.val, data.pad_id, batch_size=64)
        val = task.score(model, data, data.val)
        test = task.score(model, data, data.test)
    size = file_bytes(model, method, scratch)
    return RunResult(task.name, method.key, lr, seed, val, val_loss, test, trainable, head, size, train_s,
                     peak / 1024, loss_value)


def base_scores(task: Task, data: TaskData) -> dict[str, float]:
    """The untouched base model (generation), or chance level (classification: its head is untrained)."""
    if task.kind == "classification":
        counts = [sum(s.label == c for s in data.test) for c in range(data.n_labels)]
        return {"test": 100.0 * max(counts) / len(data.test), "what": "majority class"}
    torch.manual_seed(0)
    model, _ = task.load_model()
    model.eval()
    return {"test": task.score(model, data, data.test), "val": task.score(model, data, data.val),
            "what": "base model, no adapter"}


@dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]
    methods: tuple[str, ...] | None  # None: each task's own default methods
    seeds: int | None  # seeds per chosen learning rate; None: each task's own default
    lr_grid: str  # "full": the whole grid; "middle": the grid's middle value only (quick mode)
    steps_scale: float  # multiplies each task's steps (quick mode shortens runs)


def methods_for(task: Task, keys: Sequence[str] | None) -> list[Method]:
    keys = keys or task.methods or [m.key for m in METHODS]
    return [BY_KEY[k] for k in keys if not (BY_KEY[k].classification_only and task.kind != "classification")]


def grid(task: Task, method: Method, lr_grid: str) -> tuple[float, ...]:
    values = task.lrs.get(method.family) or task.lrs["small"]
    return (values[len(values) // 2],) if lr_grid == "middle" else values


def choose(runs: Sequence[RunResult]) -> RunResult:
    """The run with the best validation score (ties: lower validation loss). Never looks at the test score."""
    return max(runs, key=lambda r: (r.val, -r.val_loss))


def reusable_runs(previous: Mapping | None) -> dict[tuple, RunResult]:
    """Finished runs of an earlier report, keyed by (task, method, lr, seed, steps, batch size): `--resume`
    reruns only what they do not cover. Quick-mode runs never stand in for full ones, nor the reverse."""
    if not previous:
        return {}
    about = previous.get("tasks", {})
    fields = set(RunResult.__dataclass_fields__)
    found = {}
    for run in previous.get("runs", []):
        ok = isinstance(run, dict) and isinstance(run.get("task"), str)  # anything odd is trained again
        task = about.get(run["task"]) if ok else None
        if ok and isinstance(task, dict) and set(run) >= fields and {"steps", "batch_size"} <= set(task):
            try:
                found[(run["task"], run["method"], run["lr"], run["seed"], task["steps"], task["batch_size"])] = \
                    RunResult(**{k: run[k] for k in fields})
            except TypeError:  # an unhashable value: train that run again
                continue
    return found


def run_plan(plan: Plan, say=print, progress: bool = True, tasks: Mapping[str, Task] = TASKS,
             on_method_done=None, reuse: Mapping[tuple, RunResult] | None = None) -> dict:
    """Run everything `plan` asks for; returns {"runs": [...], "base": {...}, "chosen": {...}, "tasks": {...}}.

    `on_method_done(result_so_far)` is called after each method, so a long run can write its report as it goes.
    Runs found in `reuse` (see reusable_runs) are taken as they are instead of being trained again."""
    from tqdm.auto import tqdm

    reuse = reuse or {}
    reused = 0

    def run(task: Task, data: TaskData, method: Method, lr: float, seed: int, steps: int) -> RunResult:
        nonlocal reused
        earlier = reuse.get((task.name, method.key, lr, seed, steps, task.batch_size))
        if earlier is not None:
            reused += 1
            return earlier
        return train_and_score(task, data, method, lr, seed, steps, scratch)

    runs: list[RunResult] = []
    bases: dict[str, dict] = {}
    chosen: dict[str, dict[str, float]] = {}
    about: dict[str, dict] = {}
    todo = 0
    for name in plan.tasks:
        task = tasks[name]
        for method in methods_for(task, plan.methods):
            todo += len(grid(task, method, plan.lr_grid)) + (plan.seeds or task.seeds) - 1
    bar = tqdm(total=todo, desc="bench accuracy", unit="run", disable=not progress, dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-accuracy-") as scratch:
        for name in plan.tasks:
            task = tasks[name]
            steps = max(1, round(task.steps * plan.steps_scale))
            about[name] = {"metric": task.metric, "kind": task.kind, "description": task.description,
                           "steps": steps, "batch_size": task.batch_size}
            _, tokenizer = task.load_model()
            data = task.load_data(tokenizer)
            say(f"{name}: {len(data.train)} train / {len(data.val)} validation / {len(data.test)} test rows, "
                f"{steps} steps × {task.batch_size}")
            bases[name] = base_scores(task, data)
            for method in methods_for(task, plan.methods):
                tried = []
                for lr in grid(task, method, plan.lr_grid):
                    bar.set_postfix_str(f"{name} {method.key} lr={lr:g}")
                    tried.append(run(task, data, method, lr, 0, steps))
                    bar.update(1)
                best = choose(tried)
                chosen.setdefault(name, {})[method.key] = best.lr
                runs += tried
                for seed in range(1, plan.seeds or task.seeds):
                    bar.set_postfix_str(f"{name} {method.key} seed {seed}")
                    runs.append(run(task, data, method, best.lr, seed, steps))
                    bar.update(1)
                say(f"  {method.label:<28} lr {best.lr:g}  val {best.val:5.1f}  test {best.test:5.1f}  "
                    f"{best.trainable:>11,} trainable  {best.train_s:6.1f} s")
                if on_method_done is not None:
                    on_method_done({"runs": [asdict(r) for r in runs], "base": bases, "chosen": chosen,
                                    "tasks": about, "reused_runs": reused})
    bar.close()
    return {"runs": [asdict(r) for r in runs], "base": bases, "chosen": chosen, "tasks": about,
            "reused_runs": reused}


# ------------------------------------------------------------------------------------------- report

@dataclass(frozen=True)
class Row:
    task: str
    method: str
    label: str
    lr: float
    trainable: int
    head: int
    file_bytes: int
    val: float
    test_mean: float
    test_std: float | None
    seeds: int
    train_s: float
    peak_mib: float


def table_rows(result: dict) -> list[Row]:
    """One row per task and method, tasks in the order the runs came and methods in METHODS order (results.json
    is written with sorted keys, so its dicts' order says nothing)."""
    rows = []
    tasks = dict.fromkeys(r["task"] for r in result["runs"])
    rank = {m.key: i for i, m in enumerate(METHODS)}
    for task in [t for t in tasks if t in result["chosen"]]:
        chosen = result["chosen"][task]
        for key, lr in sorted(chosen.items(), key=lambda item: rank.get(item[0], len(rank))):
            mine = [r for r in result["runs"] if r["task"] == task and r["method"] == key and r["lr"] == lr]
            tests = [r["test"] for r in mine]
            first = next(r for r in mine if r["seed"] == 0)
            rows.append(Row(task, key, BY_KEY[key].label, lr, first["trainable"], first["head"], first["file_bytes"],
                            first["val"], statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else None,
                            len(tests), statistics.median(r["train_s"] for r in mine),
                            max(r["peak_mib"] for r in mine)))
    return rows


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def claims(rows: Sequence[Row], metrics: Mapping[str, str]) -> list[str]:
    """The papers' claims, each checked against this run's numbers (the verdict is computed, not written)."""
    out = []
    for task in dict.fromkeys(r.task for r in rows):
        by = {r.method: r for r in rows if r.task == task}
        metric = metrics[task]
        lora, vera, full = by.get("lora"), by.get("vera"), by.get("full")
        xs = [r for k, r in by.items() if k.startswith("lora-xs-r")]
        if lora and xs:
            best = max(xs, key=lambda r: (r.val, -r.trainable))  # rank chosen on validation
            gap = best.test_mean - lora.test_mean
            ratio = lora.trainable / best.trainable
            ok = gap >= -2.0 and ratio >= 50
            out.append(f"**{task}, LoRA-XS vs LoRA** (claim: within a point or two at ≥ 50× fewer trainable "
                       f"parameters): LoRA-XS at the rank validation picks ({best.label}) {best.test_mean:.1f} vs LoRA {lora.test_mean:.1f} "
                       f"{metric} ({gap:+.1f} points) with {ratio:.0f}× fewer trainable parameters: "
                       f"**{'agrees' if ok else 'does not agree'}**.")
            small = [r for r in xs if lora.trainable / r.trainable >= 50]
            if small and best not in small:  # the claim's own budget: choose among the ranks it allows
                pick = max(small, key=lambda r: (r.val, -r.trainable))
                gap = pick.test_mean - lora.test_mean
                out.append(f"**{task}, LoRA-XS vs LoRA within the claim's budget** (validation picks among the "
                           f"ranks with ≥ 50× fewer trainable parameters): {pick.label} {pick.test_mean:.1f} vs LoRA "
                           f"{lora.test_mean:.1f} ({gap:+.1f} points) with {lora.trainable / pick.trainable:.0f}× "
                           f"fewer: **{'agrees' if gap >= -2.0 else 'does not agree'}**.")
            for r in sorted(xs, key=lambda r: r.trainable):
                out.append(f"  - {r.label}: {r.test_mean:.1f} ({r.test_mean - lora.test_mean:+.1f} vs LoRA) with "
                           f"{lora.trainable / r.trainable:.0f}× fewer trainable parameters.")
        if vera and xs:
            same = min(xs, key=lambda r: abs(r.trainable - vera.trainable))
            below = vera.test_mean < same.test_mean
            out.append(f"**{task}, VeRA below LoRA-XS** (claim): VeRA {vera.test_mean:.1f} with {vera.trainable:,} "
                       f"trainable vs {same.label} {same.test_mean:.1f} with {same.trainable:,}: "
                       f"**{'agrees' if below else 'does not agree'}**.")
        if full and xs:
            best = max(xs, key=lambda r: (r.val, -r.trainable))  # rank chosen on validation
            out.append(f"**{task}, close to full fine-tuning** (claim): full fine-tuning {full.test_mean:.1f}, validation-picked "
                       f"LoRA-XS {best.test_mean:.1f} ({best.test_mean - full.test_mean:+.1f} points).")
        for quant, plain in (("qlora", "lora"), ("lora-xs-4bit", "lora-xs-r16")):
            q, p = by.get(quant), by.get(plain)
            if q and p:
                gap = q.test_mean - p.test_mean
                out.append(f"**{task}, 4-bit base loses little** (QLoRA's claim): {q.label} {q.test_mean:.1f} vs "
                           f"{p.label} {p.test_mean:.1f} ({gap:+.1f} points): "
                           f"**{'agrees' if gap >= -2.0 else 'does not agree'}** (within 2 points).")
    return out


def plot(rows: Sequence[Row], task: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r.task == task]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in [r for r in mine if r.trainable == 0]:  # the head-only probe has no place on a log axis: a line
        ax.axhline(r.test_mean, linestyle="--", color="gray", linewidth=1)
        ax.annotate(r.label, (0.01, r.test_mean), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(0, 4), fontsize=8, color="gray")
    for r in [r for r in mine if r.trainable > 0]:
        color = "tab:orange" if "lora-xs" in r.method else "tab:blue"
        ax.errorbar(r.trainable, r.test_mean, yerr=r.test_std or 0, fmt="o", color=color, capsize=3)
        ax.annotate(r.label, (r.trainable, r.test_mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; classifier head not counted)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{task}: {metric} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict, rows: Sequence[Row], command: str, images: dict[str, str]) -> str:
    env = result["environment"]
    lines = ["# Reproduction table: LoRA-XS, LoRA, VeRA, prefix tuning, QLoRA and full fine-tuning", "",
             f"Made by `{command}` on {env['date']} ({env['machine']}; torch {env['torch']}, transformers "
             f"{env['transformers']}, bitsandbytes {env['bitsandbytes']}, Python {env['python']}). "
             f"Whole run: {env['minutes']:.1f} minutes." + ("" if result.get("complete", True) else
                                                          " **Partial: written before the run finished (or after it was stopped); "
                                                          "methods missing from a table were not run.**"),
             "",
             "Protocol: for each method the learning rate is chosen on a validation split carved out of the training "
             "split (seed 0, best validation score); the chosen rate is then run with every seed and scored on the "
             "test split, never used for the choice. Every run starts from a fresh base. *Trainable* counts the "
             "method's own numbers; a classification head (trained by every method) is listed apart. *File* is the "
             "saved adapter directory, or the fp32 weights a user would keep for full fine-tuning. *Peak* is the "
             "process's resident high-water mark during training (base model included).", ""]
    if result.get("reused_runs"):
        lines += [f"{result['reused_runs']} of the {len(result['runs'])} runs were taken from an earlier invocation "
                  "with the same task settings (`--resume`); *whole run* counts only this one's time.", ""]
    for task in dict.fromkeys(r.task for r in rows):
        t = result["tasks"][task]
        base = result["base"][task]
        lines += [f"## {task}", "", f"{t['description']}; {t['steps']} steps × {t['batch_size']} per run.", "",
                  f"Reference: {base['what']} scores {base['test']:.1f}% {t['metric']} on the test split.", "",
                  f"| method | trainable | head | file | lr (chosen) | val {t['metric']} | test {t['metric']} | seeds | "
                  "train s | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in [r for r in rows if r.task == task]:
            test = f"{r.test_mean:.1f} ± {r.test_std:.1f}" if r.test_std is not None else f"{r.test_mean:.1f}"
            lines.append(f"| {r.label} | {r.trainable:,} | {r.head:,} | {_size(r.file_bytes)} | {r.lr:g} | "
                         f"{r.val:.1f} | {test} | {r.seeds} | {r.train_s:.0f} | {r.peak_mib:.0f} |")
        lines += ["", f"![{task}: metric vs trainable parameters]({images[task]})", ""]
    lines += ["## The papers' claims against these numbers", ""] + [f"- {c}" if not c.startswith("  ") else c
                                                                      for c in claims(rows, {k: v["metric"] for k, v in result["tasks"].items()})]
    lines += ["", "Every run (learning-rate candidates included) is in `results.json` beside this file.", ""]
    return "\n".join(lines)


def environment(minutes: float) -> dict:
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "absent"
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads", "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bnb, "python": platform.python_version(),
            "minutes": minutes}


def write_report(result: dict, out_dir: Path, command: str) -> Path:
    """RESULTS.md (or RESULTS_quick.md), results.json and the charts, under out_dir."""
    rows = table_rows(result)
    quick = result.get("quick", False)
    stem = "RESULTS_quick" if quick else "RESULTS"
    images = {}
    for task in dict.fromkeys(r.task for r in rows):
        name = f"results_{task}{'_quick' if quick else ''}.png"
        plot(rows, task, result["tasks"][task]["metric"], out_dir / name)
        images[task] = name
    from lorakit.io.atomic import atomic_write_bytes, atomic_write_json

    atomic_write_json(out_dir / f"{stem.lower()}.json", result)
    path = out_dir / f"{stem}.md"
    atomic_write_bytes(path, markdown(result, rows, command, images).encode("utf-8"))
    return path


class ResumeError(LorakitError, ValueError):
    """--resume met a results.json it cannot read, or one lorakit bench accuracy did not write; names the file."""


def plan_for(quick: bool, tasks: Sequence[str] | None, methods: Sequence[str] | None, seeds: int | None) -> Plan:
    """The runs the options ask for: --quick is the docstrings task, one learning rate, one seed, a third of the
    steps; otherwise every task with its own default methods and seeds, unless given."""
    seeds = seeds if seeds is not None else (1 if quick else None)
    return Plan(tasks=tuple(tasks or (("docstrings",) if quick else TASKS)),
                methods=tuple(methods) if methods else None, seeds=seeds,
                lr_grid="middle" if quick else "full", steps_scale=1 / 3 if quick else 1.0)


def read_previous(out: Path, quick: bool) -> dict | None:
    """The results.json of an earlier run in `out` (None when there is none), for --resume."""
    earlier = out / ("results_quick.json" if quick else "results.json")
    if not earlier.is_file():
        return None
    import json

    try:
        previous = json.loads(earlier.read_text(encoding="utf-8"))
        if not isinstance(previous, dict) or not isinstance(previous.get("runs", []), list) \
                or not isinstance(previous.get("tasks", {}), dict):
            raise ValueError("not a results.json written by lorakit bench accuracy")
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot resume from {earlier}: {exc}") from exc
    return previous


def run(args: Any, command: str) -> Path:
    """Run the plan the options of `lorakit bench accuracy` (lorakit.cli.bench_accuracy: quick, tasks, methods,
    seeds, out, resume) ask for, rewriting the report after each method; prints it and returns its path."""
    plan = plan_for(args.quick, args.tasks, args.methods, args.seeds)
    start = time.perf_counter()

    def report(result: dict, done: bool = False) -> Path:
        result.update(environment=environment((time.perf_counter() - start) / 60), quick=args.quick,
                      plan=asdict(plan), complete=done)
        return write_report(result, Path(args.out), command)

    previous = read_previous(Path(args.out), args.quick) if args.resume else None
    reuse = reusable_runs(previous)
    if args.resume:
        print(f"lorakit bench accuracy: {len(reuse)} earlier runs available for reuse", file=sys.stderr)
    result = run_plan(plan, say=lambda s: print(s, file=sys.stderr, flush=True), on_method_done=report,
                      reuse=reuse)
    path = report(result, done=True)
    print(path.read_text(encoding="utf-8"))
    print(f"wrote {path}", file=sys.stderr)
    return path
