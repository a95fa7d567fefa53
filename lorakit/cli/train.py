"""`lorakit train` and `lorakit eval` subcommands (also runnable as `python -m lorakit.train ...`).

    lorakit train --base smollm2-135m --data train.jsonl --output-dir runs/a --method lora_xs --r 16 --steps 200
    lorakit train --config run.toml [--resume | --resume-if-present] [flags override the file]
    torchrun --nproc-per-node 2 -m lorakit.train train ...        DDP over gloo on CPU
    torchrun --nproc-per-node 2 -m lorakit train ... --fsdp        FSDP2: the base sharded per decoder layer
    lorakit eval --base smollm2-135m --adapter runs/a/adapter --data test.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from lorakit.methods.table import METHODS
from lorakit.cli.common import EXIT_STATUS_EPILOG, NO_STRICT_HELP, HelpFormatter, run_command
from lorakit.tasks.files import ROWS, write_task
from lorakit.train.checkpoint import latest_checkpoint, run_checkpoints
from lorakit.train.config import DEVICES, DTYPES, OPTIMIZERS, QUANTIZE, REPORT_TO, TrainConfig
from lorakit.train.errors import CheckpointError, TrainConfigError

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}

TRAIN_DESCRIPTION = """\
Train an adapter on a data file (JSONL, JSON, CSV, parquet, Arrow, a save_to_disk directory; docs/training.md).
Settings come from --config FILE, then the flags (a flag wins over
the file); without --config, --base, --data and --output-dir are required. Defaults shown are
TrainConfig's; the method's own (r, lora_alpha...) are those of lorakit.LoraConfig / LoraXSConfig /
VeraConfig."""


def _d(name: str) -> str:
    """' (default: X)' from TrainConfig: train's flags default to None so that a --config file's values stand."""
    value = _DEFAULTS[name]
    return f" (default: {('on' if value else 'off') if isinstance(value, bool) else value})"


def _command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=HelpFormatter, epilog=EXIT_STATUS_EPILOG, **kwargs)


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _command(sub, "train", help="train an adapter on a data file", description=TRAIN_DESCRIPTION)
    p.add_argument("--config", help="TOML / YAML / JSON file of settings (flags override it)")
    p.add_argument("--base", help="embedded model name (smollm2-135m, minilm-l6), local HF directory or hub id")
    p.add_argument("--data", help="training data: .jsonl, .json, .csv, .parquet, .arrow or a save_to_disk directory")
    p.add_argument("--eval-data", help="eval data, as --data (default: none, no eval loss)")
    p.add_argument("--output-dir", help="run directory (adapter, checkpoints, logs, plot)")
    p.add_argument("--method", choices=list(METHODS),
                   help="adapter method (dora: LoRA with use_dora; prefix: --set num_virtual_tokens=N)" + _d("method"))
    p.add_argument("--rank", "--r", dest="r", type=int,
                   help="adapter rank r (--r is refused by torchrun: use --rank; default: the method's, "
                        "8 for lora, 16 for lora_xs, 256 for vera)")
    p.add_argument("--alpha", type=float, help="lora_alpha of LoRA and LoRA-XS (default: 16)")
    p.add_argument("--dropout", type=float, help="adapter input dropout (default: 0)")
    p.add_argument("--targets", help="'all-linear', a regex, or comma-separated module names (default: all-linear); "
                   "names may include embed_tokens / lm_head (LoRA only)")
    p.add_argument("--modules-to-save", help="LoRA: comma-separated modules trained as full copies, as PEFT's "
                   "modules_to_save (e.g. score,model.norm)")
    p.add_argument("--trainable-tokens", help="LoRA: comma-separated token ids whose input-embedding rows train "
                   "(PEFT's trainable_token_indices)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method setting, e.g. --set init_std=1e-4 (value parsed as JSON)")
    p.add_argument("--adapter-name", help="name of the trained adapter" + _d("adapter_name"))
    p.add_argument("--steps", type=int, help="optimiser steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the data when --steps is not given (default: 1)")
    p.add_argument("--batch-size", type=int, help="global micro-batch, split over processes; a step sees "
                   "batch-size × grad-accum examples" + _d("batch_size"))
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step" + _d("grad_accum"))
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="causal LM: pack several examples per row (position ids restart, no attention across "
                        "them)" + _d("packing"))
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute decoder layers in the backward to save activation memory" +
                        _d("gradient_checkpointing"))
    p.add_argument("--quantize", choices=QUANTIZE, help="4-bit base (QLoRA) (default: none)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw, or bitsandbytes' 8-bit AdamW" + _d("optimizer"))
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun: shard the base per decoder layer (FSDP2) instead of DDP" + _d("fsdp"))
    p.add_argument("--device", choices=DEVICES, help="cpu, or cuda (cuda:LOCAL_RANK under torchrun)" +
                   _d("device"))
    p.add_argument("--report-to", help=f"comma-separated extra loggers ({', '.join(REPORT_TO)}); the CSV log and "
                   "PNG plot are always written (default: none)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate" + _d("lr"))
    p.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay" + _d("weight_decay"))
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"],
                   help="learning-rate decay after warm-up" + _d("schedule"))
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps from 0 to --lr" + _d("warmup_steps"))
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 disables it" + _d("max_grad_norm"))
    p.add_argument("--max-length", type=int, help="truncate longer sequences (default: the model's context)")
    p.add_argument("--eval-every", type=int, help="eval loss every N steps, 0: only at the end" + _d("eval_every"))
    p.add_argument("--save-every", type=int, help="checkpoint every N steps, 0: only at the end" + _d("save_every"))
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept on disk" + _d("keep_checkpoints"))
    p.add_argument("--seed", type=int, help="seeds the data order, adapter init and dropout" + _d("seed"))
    p.add_argument("--on-bad-line", choices=["stop", "skip"], help="what a malformed row does" +
                   _d("on_bad_line"))
    p.add_argument("--last-turn-only", action="store_true",
                   help="chats: loss on the last assistant turn only (default: on every assistant turn)")
    p.add_argument("--labels", help="comma-separated class names in head order (default: from the data)")
    p.add_argument("--dtype", choices=DTYPES, help="base dtype; adapters stay float32 on a 16-bit base" +
                   _d("dtype"))
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its last checkpoint; an error if it has none")
    resume.add_argument("--resume-if-present", action="store_true",
                        help="continue from the last checkpoint in --output-dir if there is one, else start at "
                             "step 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _command(sub, "eval", help="score the base model and an adapter side by side")
    p.add_argument("--base", required=True,
                   help="embedded model name (smollm2-135m, minilm-l6), local HF directory or hub id")
    p.add_argument("--adapter", help="adapter directory (omit to score the base only)")
    p.add_argument("--data", required=True, help="data in any training format and any file type --data of train reads")
    p.add_argument("--max-length", type=int, help="truncate longer sequences (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--no-generate", action="store_true", help="skip exact-match generation")
    p.add_argument("--on-bad-line", choices=["stop", "skip"], default="stop", help="what a malformed line does")
    p.add_argument("--no-strict", dest="strict", action="store_false", help=NO_STRICT_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_eval)
    return p


def add_data_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _command(sub, "data", help="write a built-in data set (train.jsonl, test.jsonl), made offline")
    p.add_argument("task", choices=sorted(ROWS),
                   help="arithmetic: chat word problems (the quickstart's task); docstrings: classify stdlib "
                        "docstrings by module family; topics: LM on pydoc topics")
    p.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
    p.set_defaults(func=run_data)
    return p


def run_data(args: argparse.Namespace) -> int:
    for path in write_task(args.task, args.out):
        print(f"{path}: {sum(1 for _ in path.open(encoding='utf-8'))} rows")
    return 0


def _adapter_settings(args: argparse.Namespace, base: dict) -> dict:
    settings = dict(base)
    method = args.method or "lora"
    settings.update(dict(METHODS[method].variant_of))  # DoRA: LoRA with use_dora, same file format and settings
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
    if getattr(args, "modules_to_save", None):
        settings["modules_to_save"] = args.modules_to_save.split(",")
    if getattr(args, "trainable_tokens", None):
        try:
            settings["trainable_token_indices"] = [int(i) for i in args.trainable_tokens.split(",")]
        except ValueError:
            raise TrainConfigError(f"--trainable-tokens expects comma-separated token ids, got "
                                   f"{args.trainable_tokens!r}") from None
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"base": args.base, "data": args.data, "eval_data": args.eval_data, "output_dir": args.output_dir,
             "method": args.method, "adapter_name": args.adapter_name, "steps": args.steps, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
             "schedule": args.schedule, "warmup_steps": args.warmup_steps, "max_grad_norm": args.max_grad_norm,
             "max_length": args.max_length, "eval_every": args.eval_every, "save_every": args.save_every,
             "keep_checkpoints": args.keep_checkpoints, "seed": args.seed, "on_bad_line": args.on_bad_line,
             "labels": args.labels.split(",") if args.labels else None, "dtype": args.dtype,
             "progress": False if args.no_progress else None, "grad_accum": args.grad_accum,
             "packing": args.packing, "gradient_checkpointing": args.gradient_checkpointing,
             "quantize": args.quantize, "optimizer": args.optimizer, "fsdp": args.fsdp, "device": args.device,
             "report_to": [r for r in args.report_to.split(",") if r] if args.report_to is not None else None,
             "last_turn_only": True if args.last_turn_only else None}
    flags = {k: v for k, v in flags.items() if v is not None}
    if "method" in flags:  # a variant (DoRA) trains as its config's method, its settings added (_adapter_settings)
        flags["method"] = METHODS[flags["method"]].config.method
    if args.config:
        file_config = TrainConfig.from_file(args.config)
        data = file_config.to_dict()
        data.update(flags)
        data["adapter"] = _adapter_settings(args, file_config.adapter)
        return TrainConfig.from_dict(data)
    missing = [f"--{k.replace('_', '-')}" for k in ("base", "data", "output_dir") if k not in flags]
    if missing:
        raise TrainConfigError(f"{', '.join(missing)} required (or --config FILE)")
    return TrainConfig(**flags, adapter=_adapter_settings(args, {}))


def run_train(args: argparse.Namespace) -> int:
    from lorakit.train.trainer import train

    import torch.distributed as dist

    try:
        config = config_from_args(args)
        result = train(config, resume=resume_wanted(args, config.output_dir))
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
                       generate=not args.no_generate, on_bad_line=args.on_bad_line, strict=args.strict)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def resume_wanted(args: argparse.Namespace, output_dir: str) -> bool:
    """Whether to resume: --resume needs a checkpoint in output_dir; --resume-if-present says when there is none.

    (The trainer itself prints the checkpoint and step it resumes from.)
    """
    if not (args.resume or args.resume_if_present):
        return False
    if latest_checkpoint(run_checkpoints(output_dir)) is None:
        where = run_checkpoints(output_dir)
        if args.resume:
            raise CheckpointError(f"--resume: no checkpoint in {where}, so there is nothing to resume; pass "
                                  "--resume-if-present to start from step 0 when there is none")
        if _rank() == 0:
            print(f"lorakit train: no checkpoint in {where}: starting from step 0", file=sys.stderr, flush=True)
    return True


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", formatter_class=HelpFormatter, epilog=EXIT_STATUS_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_data_parser(sub)

    def command() -> int:
        args = parser.parse_args(argv)
        return args.func(args)
    return run_command(command, "lorakit")
