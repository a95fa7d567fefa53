"""The `lorakit` command: quickstart, inspect, merge, export.

    lorakit quickstart [--steps N] [--rank R] [--seed S] [--out DIR] [--quick]
    lorakit inspect ADAPTER_DIR [--json]
    lorakit merge --base smollm2-135m --adapter ADAPTER_DIR --out DIR
    lorakit export --to peft ADAPTER_DIR --base smollm2-135m --out DIR

Errors lorakit raises on purpose (LorakitError) print one line and exit with status 2; anything else
is a bug and keeps its traceback (status 1). lorakit.cli.common lists every exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lorakit.io.atomic import atomic_directory
from lorakit.cli.common import EXIT_STATUS_EPILOG, NO_STRICT_HELP, HelpFormatter, UsageError, run_command
from lorakit.tasks import arithmetic, evaluate, write_jsonl
from lorakit.tasks.records import chat_record
from lorakit.train import TrainConfig, train

DEFAULT_BASE = "smollm2-135m"

CliError = UsageError  # the name this module used before lorakit.cli.common existed


# -- small printing helpers ----------------------------------------------------------------------------

def _say(text: str = "") -> None:
    print(text, flush=True)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _print_files(directory: Path, indent: str = "    ") -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    width = max((len(p.name) for p in files), default=0)
    for p in files:
        _say(f"{indent}{p.name:<{width}}  {_human_bytes(p.stat().st_size):>10}")
    _say(f"{indent}{'total':<{width}}  {_human_bytes(sum(p.stat().st_size for p in files)):>10}")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _existing_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CliError(f"{what} {path!r} is not a directory")
    return p


def _fresh_out_dir(path: str, overwrite: bool) -> Path:
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CliError(f"--out {path!r} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise CliError(f"--out {path!r} is not empty; choose another directory or pass --overwrite")
    return p


# -- quickstart ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes of a quickstart run: the full one by default, a tiny one with --quick (for tests)."""

    steps: int
    batch_size: int
    n_train: int
    n_test: int
    max_new_tokens: int
    lr: float


FULL = QuickstartPlan(steps=60, batch_size=16, n_train=2000, n_test=64, max_new_tokens=16, lr=3e-3)
QUICK = QuickstartPlan(steps=2, batch_size=4, n_train=16, n_test=6, max_new_tokens=6, lr=3e-3)


def _module_summary(names: Sequence[str]) -> str:
    suffixes: dict[str, int] = {}
    for n in names:
        suffixes[n.split(".")[-1]] = suffixes.get(n.split(".")[-1], 0) + 1
    return ", ".join(f"{s}×{c}" for s, c in suffixes.items())


def quickstart_config(args: argparse.Namespace, plan: QuickstartPlan, data: Path, run_dir: Path) -> TrainConfig:
    """The quickstart's run for lorakit.train: LoRA-XS on every linear layer, 5 warm-up steps, then constant lr."""
    return TrainConfig(base=args.base, data=str(data), output_dir=str(run_dir), method="lora_xs",
                       adapter={"r": args.rank, "target_modules": "all-linear"}, adapter_name="quickstart",
                       steps=args.steps if args.steps is not None else plan.steps, batch_size=plan.batch_size,
                       lr=args.lr if args.lr is not None else plan.lr, schedule="constant", warmup_steps=5,
                       seed=args.seed)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    import lorakit
    from lorakit.io import save_adapter
    from lorakit.base_models.load import load_base

    plan = QUICK if args.quick else FULL
    out = Path(args.out).expanduser()
    work = tempfile.TemporaryDirectory(prefix="lorakit-quickstart-")  # the task as JSONL, the run's logs
    run = quickstart_config(args, plan, Path(work.name) / "train.jsonl", Path(work.name) / "run")
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    _say(f"lorakit quickstart: teach {args.base} short arithmetic word problems with a LoRA-XS adapter")
    _say("=" * 100)
    _say(f"[1/6] loading base model {args.base} (the first run converts it once and caches it)")
    t = time.perf_counter()
    model, tokenizer = load_base(args.base)
    base_params = sum(p.numel() for p in model.parameters())
    _say(f"      loaded in {time.perf_counter() - t:.1f} s: {base_params:,} parameters, all frozen")

    config = run.adapter_config()
    lorakit.attach(model, config, "quickstart")  # before training, to show its size and score the base
    layers = lorakit.adapted_layers(model)
    trainable = lorakit.count_trainable(model, "quickstart")
    lora_equiv = sum(args.rank * (layer.in_features + layer.out_features) for layer in layers.values())
    _say(f"[2/6] attached LoRA-XS r={args.rank}, alpha={config.lora_alpha:g}, to every linear layer "
         f"but the output head")
    _say(f"      {len(layers)} modules: {_module_summary(list(layers))}")
    _say(f"      trainable  {trainable:>12,}  = {100 * trainable / base_params:.3f}% of the base's {base_params:,}")
    _say(f"      LoRA r={args.rank} on the same modules would train {lora_equiv:,} "
         f"({lora_equiv / trainable:.0f}× more)")

    splits = arithmetic.make_splits(plan.n_train, plan.n_test, seed=args.seed)
    system = arithmetic.SYSTEM_PROMPT
    _say(f"      task: {len(splits.train)} training / {len(splits.test)} test word problems (disjoint), "
         f"e.g. {splits.test[0].question!r} -> {splits.test[0].answer}")

    def _eval(adapter: str | None):
        return evaluate(model, tokenizer, splits.test, arithmetic.parse_answer, system=system, adapter=adapter,
                        max_new_tokens=plan.max_new_tokens)

    _say(f"[3/6] evaluating the base model on {len(splits.test)} test problems (greedy decoding)")
    t = time.perf_counter()
    before = _eval(None)
    _say(f"      base     exact match {before.exact_match:6.1%}   answer loss {before.answer_loss:.3f}   "
         f"({time.perf_counter() - t:.0f} s)")

    _say(f"[4/6] training {run.steps} steps × {run.batch_size} examples, AdamW lr={run.lr:g}, seed={args.seed}")
    with work:
        write_jsonl((chat_record(p.question, p.answer_text, system) for p in splits.train), run.data)
        result = train(run, model=model, tokenizer=tokenizer)
    _say(f"      loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.seconds:.0f} s "
         f"({result.tokens_per_s:.0f} tokens/s)")

    _say(f"[5/6] evaluating the adapted model on the same {len(splits.test)} test problems")
    t = time.perf_counter()
    after = _eval("quickstart")
    _say(f"      adapted  exact match {after.exact_match:6.1%}   answer loss {after.answer_loss:.3f}   "
         f"({time.perf_counter() - t:.0f} s)")

    _say(f"[6/6] saving the adapter to {out}")
    save_adapter(model, "quickstart", out)
    _print_files(out, indent="      ")

    _say()
    _print_table(before.predictions, after.predictions, rows=6)
    _say()
    wall = time.perf_counter() - start
    beats = after.exact_match > before.exact_match
    verdict = "adapter beats base" if beats else "adapter does NOT beat base"
    _say(f"{verdict}: EM {before.exact_match:.1%} → {after.exact_match:.1%}  "
         f"(answer loss {before.answer_loss:.2f} → {after.answer_loss:.2f}; {wall:.0f} s in all)")
    _say(f"next: lorakit inspect {out}   |   lorakit merge --base {args.base} --adapter {out} --out merged")
    return 0


def _print_table(before, after, rows: int) -> None:
    """Side by side: question, correct answer, base reply and adapted reply with ✓/✗."""
    reply_w, question_w = 22, 52

    def cell(p) -> str:
        return f"{'✓' if p.correct else '✗'} {_clip(p.reply or '(empty)', reply_w - 2)}"

    header = f"{'question':<{question_w}}  {'answer':>6}  {'base':<{reply_w}}  {'adapted':<{reply_w}}"
    _say(header)
    _say("-" * len(header))
    for b, a in list(zip(before, after))[:rows]:
        _say(f"{_clip(b.question, question_w):<{question_w}}  {str(b.answer):>6}  {cell(b):<{reply_w}}  "
             f"{cell(a):<{reply_w}}")


# -- inspect / merge / export -----------------------------------------------------------------------------

def _cmd_inspect(args: argparse.Namespace) -> int:
    from lorakit.io import read_adapter_info

    info = read_adapter_info(_existing_dir(args.path, "adapter path"))
    if args.json:
        _say(json.dumps(info, indent=2, default=str))
        return 0
    files = info.get("file_bytes") or {}
    modules = list(info.get("modules") or [])
    rows = [
        ("path", info.get("path")),
        ("format", info.get("format")),
        ("method", info.get("method")),
        ("rank", info.get("rank")),
        ("alpha", info.get("alpha")),
        ("base model", info.get("base_model") or "(not recorded)"),
        ("dtype", info.get("dtype")),
        ("trained numbers", f"{info['trainable_numbers']:,}" if "trainable_numbers" in info else None),
        ("modules", f"{len(modules)} ({_module_summary(modules)})" if modules else "0"),
    ]
    rows += [(f"file {name}", _human_bytes(size)) for name, size in files.items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if value is not None:
            _say(f"{key:<{width}}  {value}")
    return 0


def _load_base_with_adapter(base: str, adapter_path: str, strict: bool = True):
    from lorakit.io import load_adapter
    from lorakit.base_models.load import load_base

    path = _existing_dir(adapter_path, "adapter path")
    model, tokenizer = load_base(base)
    name = load_adapter(model, path, strict=strict)
    return model, tokenizer, name


def _cmd_merge(args: argparse.Namespace) -> int:
    import lorakit

    out = _fresh_out_dir(args.out, args.overwrite)
    model, tokenizer, name = _load_base_with_adapter(args.base, args.adapter, args.strict)
    _say(f"merging adapter {name!r} from {args.adapter} into {args.base}")
    model = lorakit.merge_and_unload(model, name)
    with atomic_directory(out, replace_any=True) as tmp:  # a full disk: WriteError naming out, nothing left
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    _say(f"saved a plain model (no lorakit needed to load it) to {out}:")
    _print_files(out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lorakit.io import export_to_peft

    out = _fresh_out_dir(args.out, args.overwrite)
    model, _, name = _load_base_with_adapter(args.base, args.adapter, args.strict)
    drop = [m.strip() for m in args.drop_modules.split(",") if m.strip()] if args.drop_modules else []
    export_to_peft(model, name, out, drop_modules=drop, drop_extras=args.drop_extras)
    _say(f"exported adapter {name!r} from {args.adapter} as a PEFT LoRA adapter to {out}:")
    _print_files(out)
    return 0


# -- parser and entry point ---------------------------------------------------------------------------------

def add_command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with lorakit's help layout: defaults shown, exit statuses in the epilog."""
    return sub.add_parser(name, formatter_class=HelpFormatter, epilog=EXIT_STATUS_EPILOG, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Parameter-efficient fine-tuning and adapters.",
                                     formatter_class=HelpFormatter, epilog=EXIT_STATUS_EPILOG)
    from lorakit.versions import LORAKIT_VERSION as __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    base_help = "embedded model name (smollm2-135m, minilm-l6), local HF model directory or hub id"

    q = add_command(sub, "quickstart",
                    help="train a LoRA-XS adapter on a built-in task and compare with the base",
                    description="Evaluate SmolLM2-135M-Instruct on short arithmetic word problems, train a "
                                "LoRA-XS adapter for a few minutes on CPU, evaluate again and save it.")
    q.add_argument("--steps", type=int, default=None, help=f"training steps (default: {FULL.steps}; {QUICK.steps} "
                                                           "with --quick)")
    q.add_argument("--rank", type=int, default=16, help="LoRA-XS rank r; each module trains r×r numbers")
    q.add_argument("--seed", type=int, default=0, help="seed of the data splits and of training")
    q.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {FULL.lr:g})")
    q.add_argument("--out", default="./lorakit-quickstart", help="where to save the adapter")
    q.add_argument("--base", default=DEFAULT_BASE, help=base_help)
    q.add_argument("--quick", action="store_true", help="a tiny run (a few problems, 2 steps) to check the setup")
    q.set_defaults(func=_cmd_quickstart)

    i = add_command(sub, "inspect", help="print what an adapter directory holds (no weights are loaded)")
    i.add_argument("path", help="adapter directory")
    i.add_argument("--json", action="store_true", help="print everything as JSON")
    i.set_defaults(func=_cmd_inspect)

    m = add_command(sub, "merge", help="merge an adapter into its base and save a plain model")
    m.add_argument("--base", default=DEFAULT_BASE, help=base_help)
    m.add_argument("--adapter", required=True, help="adapter directory")
    m.add_argument("--out", required=True, help="output directory for the merged model")
    m.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    m.add_argument("--no-strict", dest="strict", action="store_false", help=NO_STRICT_HELP)
    m.set_defaults(func=_cmd_merge)

    e = add_command(sub, "export", help="export an adapter to another format (PEFT LoRA)")
    e.add_argument("--to", choices=["peft"], default="peft", help="target format")
    e.add_argument("adapter", metavar="ADAPTER_PATH", help="adapter directory")
    e.add_argument("--base", default=DEFAULT_BASE, help=base_help)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    e.add_argument("--no-strict", dest="strict", action="store_false", help=NO_STRICT_HELP)
    e.add_argument("--drop-modules", metavar="NAMES", help="comma-separated modules (names or suffixes, e.g. "
                   "embed_tokens,lm_head) to leave out of the export, for runtimes that refuse them (vLLM for "
                   "some models); what is dropped is named in a warning")
    e.add_argument("--drop-extras", action="store_true", help="leave out modules_to_save copies and trainable "
                   "tokens (vLLM loads neither); without it such an adapter is refused")
    e.set_defaults(func=_cmd_export)

    from lorakit.cli.train import add_data_parser, add_eval_parser, add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_data_parser(sub)
    for name, (_, text) in DELEGATED.items():  # listed in --help; main() hands their argv over untouched
        sub.add_parser(name, help=text, add_help=False)
    return parser


# Subcommands that own their flags: `lorakit NAME ...` runs NAME's own main(argv) with the rest of the line.
DELEGATED: dict[str, tuple[str, str]] = {
    "serve": ("lorakit.cli.serve", "serve adapters over HTTP (OpenAI-compatible)"),
    "demo": ("lorakit.cli.demo", "train character adapters, then serve the chat page"),
    "bench": ("lorakit.cli.bench", "benchmarks: `bench speed`, `bench memory`, `bench accuracy` or `bench serve`"),
}


def _delegate(target: str, rest: list[str]) -> int:
    """Hand the remaining arguments to a subcommand's own `main(argv)` (it owns its flags)."""
    import importlib

    result = importlib.import_module(target).main(rest)
    return result if isinstance(result, int) else 0


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "rank"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            parser.error(f"--{flag} must be a positive integer, got {value}")
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (lorakit.cli.common: 2 for usage and input errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(partial(_dispatch, argv), "lorakit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
