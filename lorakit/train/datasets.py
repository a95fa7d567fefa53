"""Two built-in data sets on real text shipped with Python, deterministic with disjoint splits.

    docstrings  classify a stdlib docstring by its module family (text, math, files, net, concurrency,
                containers): 6 labels, for an encoder such as MiniLM
    topics      language modelling on the language reference in `pydoc_data.topics`, in chunks

Splits are decided by a hash of the item's identity (qualified name, topic name), never by order,
so they are disjoint and stable however the text is enumerated. The text itself comes from the running
Python, so the exact rows can change between Python versions (the counts are reported).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "html", "html.parser", "codecs"),
    "math": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers"),
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "tempfile", "io", "zipfile", "tarfile", "fnmatch"),
    "net": ("urllib.request", "urllib.parse", "http.client", "http.server", "http.cookies", "email.message",
            "smtplib", "socket", "ftplib", "ssl"),
    "concurrency": ("threading", "multiprocessing.pool", "asyncio.tasks", "asyncio.queues", "asyncio.locks",
                    "concurrent.futures", "queue", "subprocess", "sched", "signal"),
    "containers": ("collections", "heapq", "bisect", "array", "itertools", "functools", "operator", "copy",
                   "dataclasses", "enum"),
}


def _in_test(key: str, test_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def _first_paragraph(doc: str, limit: int) -> str:
    text = inspect.cleandoc(doc).split("\n\n")[0]
    return re.sub(r"\s+", " ", text).strip()[:limit]


def docstring_rows(test_fraction: float = 0.2, seed: int = 0, min_chars: int = 40,
                   max_chars: int = 400) -> tuple[list[dict], list[dict]]:
    """(train, test) rows {"text", "label"}: first paragraphs of public docstrings, labelled by family."""
    seen: set[str] = set()
    train, test = [], []
    for family, modules in FAMILIES.items():
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
                    continue
                items = [(f"{module_name}.{name}", obj)]
                if inspect.isclass(obj):
                    items += [(f"{module_name}.{name}.{m}", v) for m, v in sorted(vars(obj).items())
                              if not m.startswith("_") and callable(v)]
                for key, item in items:
                    doc = inspect.getdoc(item) if callable(item) or inspect.isclass(item) else None
                    if not doc:
                        continue
                    text = _first_paragraph(doc, max_chars)
                    if len(text) < min_chars or text in seen:
                        continue
                    seen.add(text)
                    (test if _in_test(key, test_fraction, seed) else train).append({"text": text, "label": family})
    return train, test


def topics_rows(chunk_chars: int = 800, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) rows {"text"}: pydoc topics cut at paragraph ends into ~chunk_chars pieces, split by topic.

    Topics quote each other ("compound" holds "if", "try"...), so a paragraph is used once only and a
    test topic drops every paragraph that a training topic also has.
    """
    from pydoc_data.topics import topics

    def paragraphs(name: str) -> list[str]:
        return [p.strip() for p in topics[name].split("\n\n") if p.strip()]

    names = sorted(topics)
    in_test = {n: _in_test(n, test_fraction, seed) for n in names}
    seen = {p for n in names if not in_test[n] for p in paragraphs(n)}  # training paragraphs
    used: set[str] = set()
    train, test = [], []
    for name in names:
        chunk, pieces = "", []
        for p in paragraphs(name):
            if p in used or (in_test[name] and p in seen):
                continue
            used.add(p)
            if chunk and len(chunk) + len(p) > chunk_chars:
                pieces.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{p}" if chunk else p
        if chunk:
            pieces.append(chunk)
        (test if in_test[name] else train).extend({"text": piece[: chunk_chars * 2]} for piece in pieces)
    return train, test


TASKS = {"docstrings": docstring_rows, "topics": topics_rows}


def write_task(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write <out_dir>/train.jsonl and test.jsonl for built-in task `name`; returns their paths."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    train, test = TASKS[name]()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in (("train", train), ("test", test)):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
