"""`train(TrainConfig) -> TrainResult`: one adapter (plus a classifier head) trained with AdamW (or 8-bit AdamW).

Every step takes the next `batch_size × grad_accum` indices of a seeded, per-epoch shuffled order, so
the data a step sees depends on (seed, step) only: resuming needs no sampler state. The step's indices
are cut into grad_accum micro-batches of batch_size, each split over processes as rows [rank::world]
(DDP, or FSDP2 with fsdp = true). The loss is a sum over labelled tokens divided by the step's global
count, so K micro-batches equal one K× batch and 2 processes compute the gradient of 1 (DDP and FSDP
average, hence ×world). Packing (lorakit.train.packing) changes the rows, never the sum.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lorakit
from lorakit.io import save_adapter
from lorakit.layer.saved_modules import COPIES, SavedModule
from lorakit.io.files import parse_safetensors
from lorakit.io.safe_open import read_safetensors_bytes, read_safetensors_header
from lorakit.io.atomic import (atomic_write_json, fsync_dir, is_temp_name, replace_directory, reporting_write_errors,
                               sweep_stale, temp_path, tensors_bytes)
from lorakit.train import checkpoint as ckpt
from lorakit.train.collate import collate
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE, label_names, load_dataset, read_records
from lorakit.train.errors import NonFiniteLossError, RunExistsError, TrainConfigError
from lorakit.train.fsdp import WholeOptimizerState, full_tensors, plain_parameters, restore_targets
from lorakit.train.logging_backends import Reporters
from lorakit.train.metrics import MetricsLog, loss_sum, mean_loss
from lorakit.train.optim import checkpoint_state, make_optimizer
from lorakit.train.packing import check_packing, pack
from lorakit.train.plots import plot_losses
from lorakit.train.setup import gradient_sync, init_distributed, prepare_model, refuse_unsupported, run_device, wrap

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
RUN_FILE = "run_config.json"  # marks a directory as holding a run
HEAD_FILE = "head.safetensors"  # classifier head, saved beside the adapter files
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads of BERT-like / decoder models
# Settings that may change on resume without changing the result.
_RESUMABLE = {"progress", "keep_checkpoints", "save_every", "log_every", "eval_every", "eval_data", "report_to",
              "gradient_checkpointing"}


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int  # optimiser steps done in total
    losses: list[float] = field(default_factory=list)  # train loss of each step run in this call
    eval_loss: float | None = None  # final eval loss, when eval data was given
    tokens: int = 0  # real tokens processed (all processes)
    seconds: float = 0.0
    truncated: int = 0  # training samples cut to max_length
    skipped: tuple[str, ...] = ()  # bad lines skipped
    resumed_from: str | None = None  # checkpoint this run continued from

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _say(message: str) -> None:
    print(f"lorakit train: {message}", file=sys.stderr, flush=True)


def lr_lambda(config: TrainConfig, total: int):
    """Multiplier of the peak lr at a step: linear warm-up, then constant / linear / cosine decay to 0."""
    warm = config.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if config.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Global batch of step `step`: positions step·B .. step·B+B-1 of the concatenated epoch orders."""
    out, cache = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out.append(cache[epoch][pos % n])
    return out


def _check_output_dir(out: Path, config: TrainConfig, resume: bool) -> Path | None:
    """Refuse a directory holding another run unless resuming; returns the checkpoint to resume from."""
    run_file = out / RUN_FILE
    sweep_stale(out)
    if not out.exists() or not any(not is_temp_name(p.name) for p in out.iterdir()):
        return None  # new, or holding only what a crash during the first run_config.json write left
    if not resume:
        what = "another run" if run_file.exists() else f"files ({sorted(p.name for p in out.iterdir())[:5]})"
        raise RunExistsError(f"output directory {out} already holds {what}; pass resume=True (--resume) to "
                             "continue it, or choose a new directory")
    if not run_file.exists():
        raise RunExistsError(f"cannot resume in {out}: it holds no {RUN_FILE}, so it is not a lorakit run")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    now = config.to_dict()
    saved = {**_DEFAULTS, **saved}  # a run saved before a setting existed ran with its default
    differ = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE and saved.get(k) != now.get(k))
    if differ:
        raise TrainConfigError(f"cannot resume {out}: settings {differ} differ from the run's "
                               f"({[(k, saved.get(k), now.get(k)) for k in differ][:3]})")
    return ckpt.latest_checkpoint(out / "checkpoints")


def load_model(config: TrainConfig, labels: tuple[str, ...] | None):
    from lorakit.base_models.load import load_base

    if labels is not None:
        return load_base(config.base, dtype=config.dtype, task="classification", num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return load_base(config.base, dtype=config.dtype, task="causal-lm")


def attach_or_check(model: nn.Module, config: TrainConfig) -> None:
    """Attach the run's adapter, or accept one already attached with exactly the run's settings."""
    name, wanted = config.adapter_name, config.adapter_config()
    if name not in lorakit.adapter_names(model):
        lorakit.attach(model, wanted, name)
        return
    attached = lorakit.adapter_config(model, name)
    if attached != wanted:
        raise TrainConfigError(f"the model already holds adapter {name!r} with {attached}, but the run's "
                               f"settings ({config.method}, {config.adapter}) give {wanted}")


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the classification head (trained in full and saved with the adapter), unless the adapter
    holds its own copy of the head (modules_to_save): then the copy trains, as part of the adapter."""
    copied = {n for n in HEAD_NAMES if isinstance(getattr(model, n, None), SavedModule)}
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] in set(HEAD_NAMES) - copied}


def frozen_head(model: nn.Module) -> dict[str, torch.Tensor]:
    """The original (untrained) classifier head under its own keys, when the adapter holds a trained copy."""
    return {n: p.detach() for n, p in model.named_parameters()
            if n.split(".")[0] in HEAD_NAMES and f".{COPIES}." not in n}


def _labelled(batch: dict[str, torch.Tensor]) -> float:
    """Loss terms in a batch: labelled next-token targets, or rows for classification."""
    labels = batch["labels"]
    return float((labels[:, 1:] != IGNORE).sum()) if labels.dim() == 2 else float(labels.shape[0])


def train(config: TrainConfig, *, resume: bool = False, model: nn.Module | None = None,
          tokenizer: Any = None) -> TrainResult:
    """Train adapter `config.adapter_name` as `config` says; writes everything under config.output_dir.

    `model`/`tokenizer` may be given to skip loading `config.base` (tests, notebooks, the quickstart and
    the demo). A given model may already carry the adapter, attached with `config.adapter_config()`
    (to inspect or evaluate it before training); otherwise it is attached here. Only that adapter's
    parameters (and a classifier head) are trained, whatever other adapters the model holds.
    """
    rank, world = init_distributed(config)
    refuse_unsupported(config, world)
    device = run_device(config)
    out = Path(config.output_dir)
    resume_from = _check_output_dir(out, config, resume) if rank == 0 else None
    if world > 1:
        box = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(box, src=0)
        resume_from = Path(box[0]) if box[0] else None
    if config.batch_size % world:
        raise TrainConfigError(f"batch_size={config.batch_size} must divide evenly over {world} processes")

    records, fmt, _ = read_records(config.data, config.on_bad_line)
    labels = (config.labels or label_names(records)) if fmt == "classification" else None
    if config.packing and labels is not None:
        raise TrainConfigError(f"packing is for causal-LM data; {config.data} holds classification records "
                               "(one label per row): set packing = false")
    torch.manual_seed(config.seed)  # the head and adapter initialisations come from here
    if model is None:
        model, tokenizer = load_model(config, labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length = config.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 512)
    train_set = load_dataset(config.data, tokenizer, max_length=max_length, on_bad_line=config.on_bad_line,
                             labels=labels, last_turn_only=config.last_turn_only)
    eval_set = (load_dataset(config.eval_data, tokenizer, max_length=max_length, on_bad_line=config.on_bad_line,
                             labels=labels, expect_format=fmt, last_turn_only=config.last_turn_only)
                if config.eval_data is not None else None)
    if rank == 0:
        for ds in (train_set, eval_set):
            if ds is not None and ds.truncated:
                _say(f"{ds.path}: {ds.truncated} of {len(ds)} samples longer than {max_length} tokens were truncated")
            if ds is not None and ds.skipped:
                _say(f"{ds.path}: skipped {len(ds.skipped)} bad line(s), first: {ds.skipped[0]}")

    name = config.adapter_name
    prepare_model(model, config, device, lambda m: attach_or_check(m, config))
    head = head_parameters(model) if labels is not None else {}
    for p in head.values():
        p.requires_grad_(True)
    if config.packing and len(train_set) > 1:
        with lorakit.use_adapter(model, name):
            check_packing(model, train_set.samples[0], train_set.samples[1], pad_id, device)
    runner = wrap(model, config, world, device)  # FSDP2 shards `model` in place: collect parameters after
    head = head_parameters(model) if labels is not None else {}
    trained = {id(p) for p in lorakit.adapter_parameters(model, name)} | {id(p) for p in head.values()}
    params = {n: p for n, p in model.named_parameters() if id(p) in trained}
    optimizer = make_optimizer(config.optimizer, list(params.values()), config.lr, config.betas,
                               config.weight_decay)
    step_size = config.batch_size * config.grad_accum  # examples per optimiser step
    per_epoch = math.ceil(len(train_set) / step_size)
    total = config.steps or max(1, math.ceil((config.epochs or 1.0) * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total))

    log = MetricsLog(out)
    start_step, tokens, elapsed0 = 0, 0, 0.0
    if resume_from is not None:
        meta = ckpt.restore(resume_from, restore_targets(params), WholeOptimizerState(optimizer), scheduler)
        start_step, tokens, elapsed0 = meta["step"], meta["tokens"], meta["elapsed_s"]
        log = MetricsLog(out, meta["log"])
        if rank == 0:
            _say(f"resuming from {resume_from} at step {start_step}")
    reporters = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, config.to_dict())
        reporters = Reporters(config.report_to, out, config.to_dict(), start_step)
    collective = config.fsdp  # gathering shards, and any forward, needs every rank

    def save(step: int) -> Path | None:
        if rank != 0 and not collective:
            return None
        whole_params = full_tensors(params)
        whole_optim = WholeOptimizerState.gather(optimizer, checkpoint_state(optimizer))
        if rank != 0:
            return None
        return ckpt.save_checkpoint(out / "checkpoints", step, whole_params, whole_optim, scheduler,
                                    {"tokens": tokens, "elapsed_s": elapsed0 + time.perf_counter() - t0,
                                     "log": log.rows, "config": config.to_dict()}, keep=config.keep_checkpoints)

    def evaluate() -> float | None:
        if eval_set is None or (rank != 0 and not collective):
            return None
        model.eval()
        with lorakit.use_adapter(model, name):
            value = mean_loss(model, eval_set.samples, pad_id, batch_size=config.batch_size, device=device,
                              autograd=world > 1)
        model.train()
        return value

    def batch_of(samples: list) -> dict[str, torch.Tensor]:
        batch = pack(samples, pad_id, max_length) if config.packing else collate(samples, pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start_step, desc=f"train {name}", unit="step",
               disable=not config.progress or rank != 0, dynamic_ncols=True)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    last_saved: Path | None = resume_from
    try:
        for step in range(start_step, total):
            indices = step_indices(step, step_size, len(train_set), config.seed)
            micro = [[train_set.samples[i] for i in indices[j * config.batch_size:(j + 1) * config.batch_size]
                      [rank::world]] for j in range(config.grad_accum)]
            batches = [batch_of(samples) for samples in micro]
            stats = torch.tensor([0.0, float(sum(len(s.input_ids) for m in micro for s in m))])  # (loss sum, tokens)
            counts = torch.tensor([sum(_labelled(b) for b in batches)])  # loss terms of the whole step
            if world > 1:
                dist.all_reduce(counts)
            optimizer.zero_grad(set_to_none=True)
            for j, batch in enumerate(batches):
                with gradient_sync(runner, j == len(batches) - 1), lorakit.use_adapter(model, name):
                    nll, _ = loss_sum(runner, batch)
                    (nll * world / counts.clamp_min(1)[0]).backward()  # DDP / FSDP average: ×world
                stats[0] += float(nll.detach())
            if world > 1:
                dist.all_reduce(stats)
            step_loss = float(stats[0] / counts.clamp_min(1)[0])
            if not math.isfinite(step_loss):  # the parameters are still those of the last good step
                kept = last_saved
                if step > start_step and all(bool(torch.isfinite(t).all()) for t in full_tensors(params).values()):
                    kept = save(step)
                raise NonFiniteLossError(f"loss became {step_loss} at step {step + 1}; training stopped, last "
                                         f"good checkpoint: {kept}", step + 1, str(kept) if kept else None)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            tokens += int(stats[1])
            losses.append(step_loss)
            done = step + 1
            elapsed = elapsed0 + time.perf_counter() - t0
            if done % config.log_every == 0 or done == total:
                tok_s = round(tokens / max(elapsed, 1e-9), 1)
                log.add(step=done, epoch=round(done * step_size / len(train_set), 4), loss=step_loss, lr=lr,
                        tokens=tokens, tokens_per_s=tok_s, elapsed_s=round(elapsed, 3))
                if reporters is not None:
                    reporters.scalars(done, loss=step_loss, lr=lr, tokens_per_s=tok_s)
            if config.eval_every and done % config.eval_every == 0 and done != total:
                value = evaluate()
                if rank == 0:
                    log.set_eval(done, value)
                    reporters.scalars(done, eval_loss=value)
                    log.flush()
            elif rank == 0 and done % (20 * config.log_every) == 0:
                log.flush()  # the CSV/JSON logs can be followed while training runs
            if config.save_every and done % config.save_every == 0 and done != total:
                last_saved = save(done)
                if rank == 0:
                    log.flush()
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            bar.update(1)
    finally:
        bar.close()
        model.eval()
        if reporters is not None and sys.exc_info()[0] is not None:
            reporters.close()
    adapter_dir = out / "adapter"
    eval_loss = evaluate()
    model.eval()
    save(total)
    whole_params = full_tensors(params)  # the adapter (and head) whole: every rank gathers, rank 0 writes
    if rank == 0:
        if eval_loss is not None:
            log.set_eval(total, eval_loss)
            reporters.scalars(total, eval_loss=eval_loss)
        whole_head = {n: whole_params[n] for n in head}
        if labels is not None and not head:  # the adapter holds the head's copy: the file keeps the labels and
            whole_head = frozen_head(model)  # the original head, which routes without the adapter still run
        with plain_parameters(model, whole_params) if collective else nullcontext():
            write_adapter(model, name, adapter_dir, whole_head, labels)
        log.flush()
        reporters.close()
        plot_losses(log.rows, out / "loss.png", title=f"{config.method} on {Path(train_set.path).name}")
    seconds = time.perf_counter() - t0
    result = TrainResult(out, adapter_dir, total, losses, eval_loss, tokens, seconds, train_set.truncated,
                         train_set.skipped, str(resume_from) if resume_from else None)
    if rank == 0:
        atomic_write_json(out / "result.json", {
            "steps": total, "final_loss": losses[-1] if losses else None, "eval_loss": eval_loss, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            "truncated": train_set.truncated, "skipped": list(train_set.skipped), "resumed_from": result.resumed_from})
    if world > 1:
        dist.barrier()
    return result


def write_adapter(model: nn.Module, name: str, path: Path, head: dict[str, nn.Parameter],
                  labels: tuple[str, ...] | None) -> Path:
    """The adapter (PEFT / native layout) plus head.safetensors for a classifier, swapped in atomically."""
    tmp = temp_path(path)
    with reporting_write_errors(path):
        try:
            save_adapter(model, name, tmp)
            if head:
                data = tensors_bytes({n: p.detach() for n, p in head.items()},
                                     {"labels": json.dumps(list(labels or ()))})
                with open(tmp / HEAD_FILE, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                fsync_dir(tmp)
            replace_directory(tmp, path)  # the old adapter goes only once the new one has its name
            fsync_dir(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_head_labels(file: str | Path) -> tuple[str, ...] | None:
    """Label names stored with a classifier head, or None when there is no head file."""
    if not os.path.lexists(file):
        return None
    header = read_safetensors_header(file)  # guarded: a FIFO or a device here is an error, not a hang
    return tuple(json.loads((header.get("__metadata__") or {}).get("labels", "[]")))


def load_head(model: nn.Module, adapter_dir: str | Path) -> tuple[str, ...] | None:
    """Load head.safetensors (if present) into the model; returns the label names it was trained with."""
    file = Path(adapter_dir) / HEAD_FILE
    if not os.path.lexists(file):
        return None
    tensors, metadata = parse_safetensors(read_safetensors_bytes(file), file)
    labels = tuple(json.loads(metadata.get("labels", "[]")))
    own = dict(model.named_parameters())
    from lorakit.train.errors import LabelMismatchError

    for key, value in tensors.items():
        if key not in own or own[key].shape != value.shape:
            raise LabelMismatchError(f"{file}: head tensor {key} {tuple(value.shape)} does not fit the model "
                                     f"({tuple(own[key].shape) if key in own else 'absent'})")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return labels
