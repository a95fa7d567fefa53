"""A built-in classification task on real text shipped with Python: stdlib docstrings by module family.

    docstrings  classify the first paragraph of a public docstring by its module's family (text, math,
                files, net, concurrency, containers): 6 labels, for an encoder such as MiniLM

The split is decided by a hash of the item's qualified name, never by order, so it is disjoint and
stable however the modules are enumerated. The text comes from the running Python, so the exact rows
can change between Python versions (`lorakit data` reports the counts).
"""

from __future__ import annotations

import importlib
import inspect
import re

from lorakit.tasks.splits import in_fraction

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
                    (test if in_fraction(key, test_fraction, seed) else train).append({"text": text, "label": family})
    return train, test
