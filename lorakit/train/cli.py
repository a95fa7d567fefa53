"""`lorakit train` and `lorakit eval` subcommands (also runnable as `python -m lorakit.train ...`).

    lorakit train --base smollm2-135m --data train.jsonl --output-dir runs/a --method lora_xs --r 16 --steps 200
    lorakit train --config run.toml [--resume] [flags override the file]
    torchrun --nproc-per-node 2 -m lorakit.train train ...        DDP over gloo on CPU
    lorakit eval --base smollm2-135m --adapter runs/a/adapter --data test.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.errors import LorakitError


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train an adapter on a JSONL file")
    p.add_argument("--config", help="TOML / YAML / JSON file of settings (flags override it)")
    p.add_argument("--base", help="embedded model name, local HF directory or hub id")
    p.add_argument("--data", help="training JSONL")
    p.add_argument("--eval-data", help="eval JSONL")
    p.add_argument("--output-dir", help="run directory (adapter, checkpoints, logs, plot)")
    p.add_argument("--method", choices=["lora", "lora_xs", "vera"])
    p.add_argument("--rank", "--r", dest="r", type=int, help="adapter rank r (--r is refused by torchrun: use --rank)")
    p.add_argument("--alpha", type=float, help="lora_alpha (LoRA, LoRA-XS)")
    p.add_argument("--dropout", type=float, help="adapter input dropout")
    p.add_argument("--targets", help="'all-linear', a regex, or comma-separated module names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method setting, e.g. --set init_std=1e-4 (value parsed as JSON)")
    p.add_argument("--adapter-name")
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--max-length", type=int, help="truncate longer sequences (default: the model's context)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--on-bad-line", choices=["stop", "skip"])
    p.add_argument("--labels", help="comma-separated class names in head order (default: from the data)")
    p.add_argument("--dtype")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)
    return p


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score the base model and an adapter side by side")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", help="adapter directory (omit to score the base only)")
    p.add_argument("--data", required=True, help="JSONL file in any training format")
    p.add_argument("--max-length", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-generate", action="store_true", help="skip exact-match generation")
    p.add_argument("--on-bad-line", choices=["stop", "skip"], default="stop")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_eval)
    return p


def add_data_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="write a built-in data set (train.jsonl, test.jsonl) made from Python's own text")
    p.add_argument("task", choices=["docstrings", "topics"],
                   help="docstrings: classify stdlib docstrings by module family; topics: LM on pydoc topics")
    p.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
    p.set_defaults(func=run_data)
    return p


def run_data(args: argparse.Namespace) -> int:
    from lorakit.train.datasets import write_task

    for path in write_task(args.task, args.out):
        print(f"{path}: {sum(1 for _ in path.open(encoding='utf-8'))} rows")
    return 0


def _adapter_settings(args: argparse.Namespace, base: dict) -> dict:
    settings = dict(base)
    method = args.method or "lora"
    if args.r is not None:
        settings["r"] = args.r
    if args.alpha is not None:
        settings["lora_alpha"] = args.alpha
    if args.dropout is not None:
        settings["vera_dropout" if method == "vera" else "lora_dropout"] = args.dropout
    if args.targets is not None:
        regex = "," not in args.targets and any(c in args.targets for c in "*[]()|^$+?\\")
        plain = args.targets == "all-linear" or regex
        settings["target_modules"] = args.targets if plain else args.targets.split(",")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


def config_from_args(args: argparse.Namespace):
    from lorakit.train.config import TrainConfig

    flags = {"base": args.base, "data": args.data, "eval_data": args.eval_data, "output_dir": args.output_dir,
             "method": args.method, "adapter_name": args.adapter_name, "steps": args.steps, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
             "schedule": args.schedule, "warmup_steps": args.warmup_steps, "max_grad_norm": args.max_grad_norm,
             "max_length": args.max_length, "eval_every": args.eval_every, "save_every": args.save_every,
             "keep_checkpoints": args.keep_checkpoints, "seed": args.seed, "on_bad_line": args.on_bad_line,
             "labels": args.labels.split(",") if args.labels else None, "dtype": args.dtype,
             "progress": False if args.no_progress else None}
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.config:
        file_config = TrainConfig.from_file(args.config)
        data = file_config.to_dict()
        data.update(flags)
        data["adapter"] = _adapter_settings(args, file_config.adapter)
        return TrainConfig.from_dict(data)
    missing = [f"--{k.replace('_', '-')}" for k in ("base", "data", "output_dir") if k not in flags]
    if missing:
        raise SystemExit(f"lorakit train: {', '.join(missing)} required (or --config FILE)")
    return TrainConfig(**flags, adapter=_adapter_settings(args, {}))


def run_train(args: argparse.Namespace) -> int:
    from lorakit.train.trainer import train

    import torch.distributed as dist

    try:
        result = train(config_from_args(args), resume=args.resume)
    finally:
        if dist.is_initialized():  # torchrun: leave the process group cleanly, on errors too
            dist.destroy_process_group()
    if _rank() == 0:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        print(f"trained {result.steps} steps: final loss {last}{ev}, {result.tokens_per_s:.0f} tokens/s; adapter in "
              f"{result.adapter_dir}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lorakit.train.evaluate import evaluate, format_table

    results = evaluate(args.base, args.adapter, args.data, max_length=args.max_length, batch_size=args.batch_size,
                       generate=not args.no_generate, on_bad_line=args.on_bad_line)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_data_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LorakitError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
