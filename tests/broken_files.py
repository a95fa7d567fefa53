"""Ways to break an adapter or checkpoint file in place, shared by the io, train and serve fault tests."""

from __future__ import annotations

import os
from pathlib import Path


def make_fifo(path: Path) -> None:
    """`path` becomes a named pipe: an ordinary open() of it would block until a writer came."""
    path.unlink()
    os.mkfifo(path)


def make_dev_zero(path: Path) -> None:
    """`path` becomes a link to /dev/zero: endless bytes, a reader without a bound never stops."""
    path.unlink()
    os.symlink("/dev/zero", path)


def make_symlink_loop(path: Path) -> None:
    """`path` and `path.b` link to each other."""
    path.unlink()
    os.symlink(path.name + ".b", path)
    os.symlink(path.name, path.with_name(path.name + ".b"))
