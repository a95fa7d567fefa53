"""lorakit's import graph is one-way: no cycles, no private names across modules, layers only import downward.

Every import counts, wherever it is written (module level, inside a function, under TYPE_CHECKING): a
function-level import hides a cycle from Python but not from this test. The graph is read from the
source with `ast`, so the test needs no import of lorakit and runs in milliseconds.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lorakit"

# Low to high: a module may import from its own layer (without cycles) or any layer below, never above.
# Every lorakit module must be listed, so a new one is placed on purpose. A name ending in ".*" covers a package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("lorakit.errors", "lorakit.versions", "lorakit.names", "lorakit.config", "lorakit.perf",
                    "lorakit.atomic_write", "lorakit.walk")),
    ("methods", ("lorakit.methods.*",)),
    ("kernels", ("lorakit.kernels.*",)),
    ("routing", ("lorakit.routing.*",)),
    ("layer", ("lorakit.layer.*",)),
    ("model", ("lorakit.model.*",)),
    ("package API", ("lorakit",)),
    ("io", ("lorakit.io.*",)),
    ("integrations", ("lorakit.integrations.*",)),
    ("base models", ("lorakit.base_models.*",)),
    ("libraries", ("lorakit.train.*", "lorakit.tasks.*", "lorakit.serve.*", "lorakit.bench.*")),
    ("command line", ("lorakit.cli.*", "lorakit.__main__", "lorakit.train.__main__")),
]


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported lorakit module
    name: str | None  # the name taken from it (`from x import name`), None for `import x`
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lorakit_imports(root: Path) -> tuple[set[str], list[Import]]:
    """Every module under `root` and every import of a lorakit module in them, at any depth."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    found = []
    for source, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; lorakit uses absolute imports")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lorakit":
                for alias in node.names:  # `from lorakit import io` imports the module lorakit.io
                    full = f"{node.module}.{alias.name}"
                    target = full if full in files else resolve(node.module)
                    found.append(Import(source, target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                found += [Import(source, resolve(a.name), None, node.lineno)
                          for a in node.names if a.name.split(".")[0] == "lorakit"]
    return set(files), [i for i in found if i.target != i.source]


def cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    edges: dict[str, set[str]] = defaultdict(set)
    for i in imports:
        edges[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    """The layer that names the module itself, else the one whose package covers it (`lorakit.train.__main__` is
    a command line, though `lorakit.train.*` is a library)."""
    for level, (_, members) in enumerate(LAYERS):
        if module in members:
            return level
    for level, (_, members) in enumerate(LAYERS):
        if any(m.endswith(".*") and (module + ".").startswith(m[:-1]) for m in members):
            return level
    raise KeyError(module)


def upward(imports: list[Import]) -> list[str]:
    return [f"{i.source} (layer '{LAYERS[layer_of(i.source)][0]}') imports {i.target} "
            f"(layer '{LAYERS[layer_of(i.target)][0]}'), line {i.line}"
            for i in imports if layer_of(i.target) > layer_of(i.source)]


def private(imports: list[Import]) -> list[str]:
    """`from lorakit.x import _name` across modules (dunders such as __version__ are public by convention)."""
    return [f"{i.source}:{i.line} imports {i.name} from {i.target}" for i in imports
            if i.name and i.name.startswith("_") and not (i.name.startswith("__") and i.name.endswith("__"))]


def argparse_users(root: Path) -> list[str]:
    """`module:line` of every argparse import outside lorakit.cli and the `__main__` modules: libraries take parsed
    options (or plain arguments), the command lines that parse them all live in cli."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if (module + ".").startswith("lorakit.cli.") or module.endswith(".__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "argparse" for name in names):
                found.append(f"{module}:{node.lineno}")
    return found


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Import]]:
    return lorakit_imports(ROOT)


def test_no_import_cycle(graph):
    found = cycles(*graph)
    assert found == [], f"import cycles among lorakit modules (function-level imports count too): {found}"


def test_no_private_name_imported_across_modules(graph):
    assert private(graph[1]) == []


def test_every_module_has_a_layer(graph):
    unplaced = []
    for module in sorted(graph[0]):
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == [], f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_imports_only_go_down_the_layers(graph):
    assert upward(graph[1]) == []


def test_core_rules_spelled_out(graph):
    """The rules the layer table implies that matter most, stated directly."""
    edges = {(i.source, i.target) for i in graph[1]}
    core = {m for m in graph[0] if layer_of(m) < layer_of("lorakit.io.native")}
    assert not {(s, t) for s, t in edges if s.startswith("lorakit.methods") and t in
                {"lorakit.layer.linear", "lorakit.model.attach", "lorakit.model.record", "lorakit.layer.surgery"}}
    io_users = {(s, t) for s, t in edges if s in core and t.startswith("lorakit.io")}
    assert not io_users, "io is never imported by the core"
    assert not {(s, t) for s, t in edges if t == "lorakit.model.attach" and s in
                {"lorakit.model.record", "lorakit.layer.linear", "lorakit.model.bank", "lorakit.model.merge", "lorakit.layer.quantized"}}


def test_only_the_command_line_imports_argparse():
    found = argparse_users(ROOT)
    assert found == [], f"argparse outside lorakit.cli (move the parser into lorakit/cli/): {found}"


def test_the_argparse_checker_sees_a_parser_in_a_library(tmp_path):
    pkg = tmp_path / "lorakit"
    for folder in ("bench", "cli", "train"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "bench" / "speed.py").write_text("def main():\n    from argparse import ArgumentParser\n")
    (pkg / "bench" / "memory.py").write_text("import os, argparse\n")
    (pkg / "cli" / "bench.py").write_text("import argparse\n")
    (pkg / "train" / "__main__.py").write_text("import argparse\n")
    assert argparse_users(pkg) == ["lorakit.bench.memory:1", "lorakit.bench.speed:2"]


def test_the_checker_sees_what_it_must(tmp_path):
    """A cycle through a function-level import, a private import and an upward import are all caught."""
    pkg = tmp_path / "lorakit"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "layer").mkdir()
    (pkg / "layer" / "__init__.py").write_text("")
    (pkg / "layer" / "linear.py").write_text("from lorakit.methods.lora import helper\n")
    (pkg / "methods" / "lora.py").write_text("def helper():\n    from lorakit.layer.linear import _private\n")
    modules, imports = lorakit_imports(pkg)
    assert cycles(modules, imports) == [["lorakit.layer.linear", "lorakit.methods.lora"]]
    assert private(imports) == ["lorakit.methods.lora:2 imports _private from lorakit.layer.linear"]
    assert len(upward(imports)) == 1 and upward(imports)[0].startswith("lorakit.methods.lora (layer 'methods')")


def test_the_folders_are_the_floors(graph):
    """Above the foundation, a module's folder says its floor: nothing else sits at the top of the package."""
    top = {m for m in graph[0] if m.count(".") == 1 and m + ".*" not in {x for _, ms in LAYERS for x in ms}}
    top -= {m for m in top if any(m + "." in other for other in graph[0])}  # packages are folders
    assert top <= set(LAYERS[0][1]) | {"lorakit.__main__"}, sorted(top - set(LAYERS[0][1]))
