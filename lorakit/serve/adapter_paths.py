"""Adapters loaded by path (vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`), only from the
directories the operator allowed (`lorakit serve --allow-adapter-root DIR`, repeatable).

A path is checked as text first (no NUL: 400; absolute, no '..', lexically under a root, else 403), so a
path outside every root is refused before the filesystem is asked anything; then its real path (symlinks followed)
must still lie under the root's real path. Nothing is opened before both checks pass.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from lorakit.errors import LorakitError

MAX_PATH_CHARS = 4096


class AdapterPathError(LorakitError, ValueError):
    """A lora_path that is not a usable absolute path (400)."""


class AdapterPathForbiddenError(LorakitError, PermissionError):
    """A lora_path outside every allowed root, or loading by path is off (403)."""


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class AllowedRoots:
    """The directories adapters may be loaded from by path; empty: loading by path is off."""

    def __init__(self, roots: Iterable[str | os.PathLike] = ()) -> None:
        self.roots: tuple[str, ...] = tuple(os.path.realpath(os.fspath(r)) for r in roots)
        for root in self.roots:
            if not os.path.isdir(root):
                raise ValueError(f"allowed adapter root {root} is not a directory")

    def check(self, lora_path: object) -> Path:
        """The real path of `lora_path` if it lies under an allowed root; else AdapterPathError (malformed)
        or AdapterPathForbiddenError (not allowed)."""
        if not isinstance(lora_path, str) or not lora_path:
            raise AdapterPathError("lora_path must be a non-empty string")
        if len(lora_path) > MAX_PATH_CHARS or "\x00" in lora_path:
            raise AdapterPathError(f"lora_path must be at most {MAX_PATH_CHARS} characters with no NUL")
        try:
            lora_path.encode("utf-8")
        except UnicodeEncodeError:
            raise AdapterPathError("lora_path is not valid Unicode") from None
        if not self.roots:
            raise AdapterPathForbiddenError("loading adapters by path is off on this server (start it with "
                                            "--allow-adapter-root DIR)")
        if not os.path.isabs(lora_path) or ".." in lora_path.split(os.sep):  # never under a root as written
            raise AdapterPathForbiddenError(f"lora_path must be an absolute path without '..' under an allowed "
                                            f"adapter root, got {lora_path!r}")
        lexical = os.path.normpath(lora_path)
        root = next((r for r in self.roots if _under(lexical, r)), None)
        if root is None:
            raise AdapterPathForbiddenError(f"lora_path {lora_path!r} is outside the allowed adapter roots")
        real = os.path.realpath(lexical)  # follows symlinks (lstat/readlink only: nothing is opened)
        if not _under(real, root) or real == root:
            raise AdapterPathForbiddenError(f"lora_path {lora_path!r} resolves outside the allowed adapter roots")
        return Path(real)


class PathAdapters:
    """Names registered with a path (an AdapterStore source: lorakit.serve.adapter_store.AdapterSource)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def locate(self, name: str) -> Path | None:
        with self._lock:
            return self._paths.get(name)

    def register(self, name: str, path: Path | None) -> Path | None:
        """Point `name` at `path` (None: forget it); returns the path it had before."""
        with self._lock:
            before = self._paths.pop(name, None)
            if path is not None:
                self._paths[name] = path
            return before
