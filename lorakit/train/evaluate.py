"""`lorakit eval`: the base model and the adapter side by side on one JSONL file.

Generative data: loss per answer token, perplexity, and exact match of greedy answers (prompt /
completion and chat records). Classification: loss, accuracy and macro-F1; the "base" column keeps
the trained head but disables the adapter, so it shows what the adapter adds to the encoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

import lorakit
from lorakit.io import load_adapter
from lorakit.train.data import Dataset, load_dataset
from lorakit.train.metrics import accuracy_f1, classify, exact_match, mean_loss

ADAPTER_NAME = "evaluated"


def scores(model: nn.Module, tokenizer: Any, data: Dataset, pad_id: int, *, generate: bool = True,
           batch_size: int = 16) -> dict[str, float]:
    """Metrics of `model` as currently routed (call inside use_adapter / disable_adapters)."""
    loss = mean_loss(model, data.samples, pad_id, batch_size)
    out = {"loss": loss}
    if data.format == "classification":
        preds = classify(model, data.samples, pad_id, batch_size)
        acc, f1 = accuracy_f1(preds, [s.label for s in data.samples], len(data.labels or ()))
        out.update(accuracy=acc, macro_f1=f1)
    else:
        out["perplexity"] = math.exp(loss) if loss < 700 else math.inf
        if generate and data.format != "text":
            out["exact_match"] = exact_match(model, tokenizer, data.samples, pad_id, batch_size)
    return out


def evaluate(base: str, adapter_dir: str | Path | None, data_path: Any, *, max_length: int | None = None,
             batch_size: int = 16, generate: bool = True, on_bad_line: str = "stop", model: nn.Module | None = None,
             tokenizer: Any = None, strict: bool = True) -> dict[str, dict[str, float]]:
    """{"base": metrics, "adapter": metrics} (no "adapter" entry when adapter_dir is None). `data_path`: any
    data file lorakit reads, a save_to_disk directory or a datasets.Dataset.

    strict=False loads an adapter that only partly fits the base (see lorakit.io.load_adapter).
    """
    from lorakit.base_models.load import load_base
    from lorakit.train.trainer import HEAD_FILE, load_head, read_head_labels

    labels = read_head_labels(Path(adapter_dir) / HEAD_FILE) if adapter_dir else None
    if model is None:
        if labels:
            model, tokenizer = load_base(base, task="classification", num_labels=len(labels))
        else:
            model, tokenizer = load_base(base, task="causal-lm")
    model.eval()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, ADAPTER_NAME, strict=strict)
        load_head(model, adapter_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max_length or int(getattr(model.config, "max_position_embeddings", 0) or 512)
    data = load_dataset(data_path, tokenizer, max_length=length, on_bad_line=on_bad_line, labels=labels)
    results: dict[str, dict[str, float]] = {}
    if adapter_dir is None:
        results["base"] = scores(model, tokenizer, data, pad_id, generate=generate, batch_size=batch_size)
        return results
    with lorakit.disable_adapters(model):
        results["base"] = scores(model, tokenizer, data, pad_id, generate=generate, batch_size=batch_size)
    with lorakit.use_adapter(model, ADAPTER_NAME):
        results["adapter"] = scores(model, tokenizer, data, pad_id, generate=generate, batch_size=batch_size)
    results["data"] = {"samples": len(data), "truncated": data.truncated, "skipped": len(data.skipped)}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, base and adapter as columns."""
    columns = [c for c in ("base", "adapter") if c in results]
    metrics = [m for m in ("loss", "perplexity", "exact_match", "accuracy", "macro_f1") if m in results[columns[0]]]
    lines = [f"{'metric':<12}" + "".join(f"{c:>12}" for c in columns)]
    for m in metrics:
        lines.append(f"{m:<12}" + "".join(f"{results[c][m]:>12.4f}" for c in columns))
    if "data" in results:
        d = results["data"]
        lines.append(f"({d['samples']} samples, {d['truncated']} truncated, {d['skipped']} bad lines skipped)")
    return "\n".join(lines)
