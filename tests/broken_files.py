"""Ways to break an adapter or checkpoint file in place, shared by the io, train and serve fault tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest


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


FAILSAFE_S = 20.0  # only reached when a read blocks (the old FIFO hang); the test then fails


def answer_without_blocking(call: Callable[[], object], unblock: Path | None = None) -> object:
    """What `call` returns or raises; a call still blocked after FAILSAFE_S fails the test. FIFOs in `unblock`
    are then opened for writing and closed, which releases the blocked reader thread."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["out"] = call()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["out"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(FAILSAFE_S)
    if thread.is_alive():
        for fifo in [p for p in unblock.iterdir() if p.is_fifo()] if unblock is not None else []:
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        thread.join(FAILSAFE_S)
        pytest.fail(f"{call} blocked for {FAILSAFE_S} s")
    return box["out"]
