"""`AdapterStore`: which adapter files a server holds: read from a directory on first use, evicted
least-recently-used under a byte budget, never removed while a running request uses them.

    <adapter dir>/<name>/adapter_config.json + adapter_model.safetensors   (as lorakit.io.save_adapter writes)

Files are read, checked and copied to the device on the caller's thread (on CUDA through pinned host
memory, non-blocking: lorakit.serve.adapter_memory); only the attach (or detach) runs on the engine's
thread between two decode steps, so a load never stalls the batch for more than the attach itself,
and a load that fails leaves the model, and every other request, as they were.
LoRA-XS adapters go into the packed bank (r² numbers per layer each); LoRA and VeRA attach as modules.

The byte budget counts the bytes each adapter holds on the device once attached (its bank slot, or its
modules' tensors in the dtype adapters get on this base), not the size of its files. It holds at every
moment: before the attach, the file's tensors at the device dtype are reserved, evicting idle adapters
least-recently-used first; when every resident adapter is in use the load waits (up to `room_wait_s`)
for requests to finish, then fails. The measured figure replaces the reservation once attached, and an
adapter whose measured size finds no room is detached again. Releasing the last request of an adapter
evicts down to the budget too.

An adapter replaced on disk (a new save, by rename-exchange or two renames) is noticed by its files'
inode, size and modification time on the next request: that request and later ones get the new version,
attached under a versioned name (`NAME--lorakit-vN`) while requests still running on the old version
finish on it; the old version is detached when its last request ends. Directories that are lorakit's
own temporaries (`.NAME.tmp-XXXXXXXX`, lorakit.io.atomic) are never listed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import nn

from lorakit.model.manage import delete_adapter
from lorakit.config import adapter_dtype
from lorakit.errors import AdapterNotFoundError, LorakitError, UnsupportedAdapterError
from lorakit.io.atomic import is_temp_name
from lorakit.io.files import CONFIG_NAME, read_adapter_dir, read_config_only
from lorakit.io.formats import format_of
from lorakit.model.record import install_bases
from lorakit.names import adapter_name_problem
from lorakit.perf import in_fresh_thread
from lorakit.serve.adapter_memory import HOST_ONLY_SUFFIX, adapter_device_bytes, stage

log = logging.getLogger("lorakit.serve")
VERSION_MARK = "--lorakit-v"  # attached name of a replaced adapter's new version: NAME--lorakit-vN


class InvalidAdapterNameError(LorakitError, ValueError):
    """The name could leave the adapter directory (`../x`, `/etc`, a symlink out) or is not a plain name."""


class AdapterLoadError(LorakitError, RuntimeError):
    """The adapter exists but could not be loaded (corrupt files, another base model, too large)."""


class AdapterSource(Protocol):
    """Adapters from somewhere other than the directory (registered paths, an object store), found by name.

    `locate` returns a local adapter directory (materialising it first if need be, on the caller's thread)
    or None when the source does not know the name; its errors are AdapterLoadError (or subclasses)."""

    def names(self) -> list[str]: ...

    def locate(self, name: str) -> Path | None: ...


@dataclass
class _Entry:
    nbytes: int  # bytes the adapter holds on the device
    attached: str  # the name it has on the model (the adapter's own, or NAME--lorakit-vN after a replacement)
    signature: tuple  # its files as they were read (lorakit.serve.adapter_store._signature)
    refs: int = 0  # running or queued requests that use it
    unload_requested: bool = False  # remove once refs drops to 0


@dataclass
class StoreStats:
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    unloads: int = 0
    reloads: int = 0  # adapters found replaced on disk and served in their new version


class AdapterStore:
    """Adapters resident on one served model, bounded by `budget_bytes` of device memory (None: unbounded).

    `device` is where adapter tensors are copied before the attach (default: the model's device);
    `room_wait_s` how long a load waits for running requests to free budget before it fails."""

    def __init__(self, model: nn.Module, directory: str | os.PathLike | None, *, engine=None,
                 budget_bytes: int | None = None, packed: bool = True,
                 device: torch.device | str | None = None, room_wait_s: float = 30.0,
                 sources: Sequence[AdapterSource] = ()) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive or None, got {budget_bytes!r}")
        if not 0 <= room_wait_s < float("inf"):
            raise ValueError(f"room_wait_s must be a finite number >= 0, got {room_wait_s!r}")
        self.model = model
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.directory = Path(directory).resolve() if directory is not None else None
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.packed = packed
        self.room_wait_s = room_wait_s
        self.sources = tuple(sources)  # asked, in order, before the directory
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified whenever budget frees up
        self._resident: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._retiring: dict[str, _Entry] = {}  # attached name -> a replaced version still running requests
        self._reserved = 0  # bytes reserved by loads between their room check and their attach
        self._versions = itertools.count(2)
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, tuple[tuple, str]] = {}  # name -> (files' signature, error): not retried
        self._skipped: set[str] = set()  # directory entries with invalid names, logged once

    # -- what exists -------------------------------------------------------------------------------
    def path_for(self, name: str) -> Path:
        """The adapter directory of `name`, refusing anything that is not a plain entry of the directory."""
        problem = adapter_name_problem(name)
        if problem is not None:
            raise InvalidAdapterNameError(f"invalid adapter name: {problem}")
        if VERSION_MARK in name:
            raise InvalidAdapterNameError(f"invalid adapter name {name!r}: {VERSION_MARK!r} marks the server's "
                                          "own versions of replaced adapters")
        for source in self.sources:
            found = source.locate(name)
            if found is not None:
                return found
        if self.directory is None:
            raise AdapterNotFoundError(f"adapter {name!r} not found: the server has no adapter directory")
        path = self.directory / name
        resolved = path.resolve()
        if resolved.parent != self.directory:
            raise InvalidAdapterNameError(f"adapter {name!r} resolves outside the adapter directory")
        if not os.path.lexists(resolved / "adapter_config.json"):  # (a config that is no file: the load says so)
            raise AdapterNotFoundError(f"adapter {name!r} not found; available: {self.available() or 'none'}")
        return resolved

    def adapter_config(self, name: str) -> dict:
        """`name`'s adapter_config.json, its weights left unread (a source may fetch the adapter first): what
        it was trained on and how, for checks that must refuse a request before anything is loaded."""
        path = self.path_for(name)
        try:
            return read_config_only(path)
        except (AdapterNotFoundError, InvalidAdapterNameError):
            raise
        except (LorakitError, OSError) as exc:
            raise AdapterLoadError(f"adapter {name!r} cannot be read: {self.client_message(exc)}") from exc

    def available(self) -> list[str]:
        """Adapter names in the directory (plain subdirectories holding an adapter_config.json) and the sources."""
        extra = sorted({n for source in self.sources for n in source.names()})
        if self.directory is None or not self.directory.is_dir():
            return extra
        names = []
        for entry in sorted(os.listdir(self.directory)):
            if is_temp_name(entry):  # a save in progress, or one a crash left behind: never an adapter
                continue
            path = self.directory / entry
            if path.resolve().parent != self.directory or not os.path.lexists(path / "adapter_config.json"):
                continue
            problem = adapter_name_problem(entry)
            if problem is None and VERSION_MARK in entry:
                problem = f"{VERSION_MARK!r} marks the server's own versions of replaced adapters"
            if problem is None:
                names.append(entry)
            elif entry not in self._skipped:  # a race may log twice; harmless
                self._skipped.add(entry)
                log.warning("not serving adapter directory %r: %s", entry, problem)
        return sorted(set(names).union(extra)) if extra else names

    def client_message(self, exc: BaseException) -> str:
        """`exc`'s message with paths relative to the adapter directory (clients never see server paths)."""
        text = str(exc)
        if self.directory is not None:
            text = text.replace(f"{self.directory}{os.sep}", "").replace(str(self.directory), "<adapter dir>")
        return text

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def resident_bytes(self) -> int:
        """Bytes on the device: every resident adapter, and replaced versions still finishing requests."""
        with self._lock:
            return self._used_locked()

    def in_use(self, name: str) -> int:
        with self._lock:
            entry = self._resident.get(name)
            return entry.refs if entry else 0

    # -- use -----------------------------------------------------------------------------------------
    def acquire(self, name: str) -> str:
        """Make `name` resident (loading it if needed, or its new version if its files were replaced) and
        pin it until `release` of the returned name: the name it has on the model, which requests use."""
        for _ in range(8):  # a freshly loaded adapter may be evicted before we pin it: try again
            with self._lock:
                entry = self._resident.get(name)
            now = self._signature_now(name) if entry is not None else None  # stat calls, outside the lock
            with self._lock:
                entry = self._resident.get(name)
                if entry is not None and now is not None and now != entry.signature:
                    log.info("adapter %r changed on disk: serving its new version", name)
                    self._retire_locked(name)
                    self.stats.reloads += 1
                    entry = None
                if entry is not None:
                    entry.refs += 1  # a pending unload stays pending: it runs once refs drop to 0
                    self._resident.move_to_end(name)
                    return entry.attached
                future = self._loading.get(name)
                owner = future is None
                if owner:
                    future = self._loading[name] = Future()
            if owner:  # torch work on a thread that ends with it (lorakit.perf.in_fresh_thread)
                return in_fresh_thread(self._load, name, future, pin=True)
            future.result()  # another thread is loading it; re-raises its error
        raise AdapterLoadError(f"adapter {name!r} was evicted repeatedly while loading: the budget is too small")

    def release(self, name: str) -> None:
        """Unpin one use of `name`: pass the name acquire returned (after a replacement, the adapter's own
        name may still be the old version's attached name, which it then releases)."""
        with self._lock:
            entry = self._retiring.get(name) or self._resident.get(name)
            if entry is None:
                entry = next((e for e in self._resident.values() if e.attached == name), None)
            if entry is None:
                return
            entry.refs = max(0, entry.refs - 1)
            if entry.refs == 0 and entry.unload_requested:
                if self._retiring.get(entry.attached) is entry:
                    del self._retiring[entry.attached]
                    self._on_engine(lambda: delete_adapter(self.model, entry.attached))
                else:
                    self._remove_locked(name if name in self._resident else self._user_name_locked(entry))
                    self.stats.unloads += 1
            if entry.refs == 0:
                self._evict_locked(0)  # nothing stays over the budget once idle
                self._room.notify_all()

    def load(self, name: str) -> int:
        """Load without pinning (the API's POST /v1/adapters); returns the adapter's bytes."""
        self.release(self.acquire(name))
        with self._lock:
            entry = self._resident.get(name)
            return entry.nbytes if entry else 0

    def unload(self, name: str) -> bool:
        """Unload `name`: now if idle (True), else once its running requests finish (False)."""
        with self._lock:
            entry = self._resident.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {list(self._resident) or 'none'}")
            if entry.refs:
                entry.unload_requested = True
                return False
            self._remove_locked(name)
            self.stats.unloads += 1
            return True

    def replace(self, name: str) -> int:
        """Read `name`'s files again and swap them in for the resident copy (vLLM's load_inplace); returns the
        new copy's bytes. The new files are read, checked, staged and attached under a probe name before the
        old copy goes, so the old one serves until the new one has loaded, and a failure leaves it as it was.
        Running requests of `name` continue on the new weights from the next decode step."""
        with self._lock:
            if name not in self._resident:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {list(self._resident) or 'none'}")
        return in_fresh_thread(self._replace, name)

    def _replace(self, name: str) -> int:
        signature = self._signature_now(name)  # taken before the read: a later change is still seen as one
        try:
            path = self.path_for(name)
            files = read_adapter_dir(path)
            bases = self._precompute_bases(files)
            files = dataclasses.replace(files, tensors=stage(files.tensors, self.device))
            probe = f"{name[:96]}-incoming-{os.getpid()}-{threading.get_ident() % 10**6}"
            self._on_engine(lambda: self._attach(files, probe, bases)).result()  # proves the new files load
        except (AdapterNotFoundError, InvalidAdapterNameError, AdapterLoadError):
            raise
        except BaseException as exc:
            with self._lock:
                self.stats.load_failures += 1
            raise AdapterLoadError(f"adapter {name!r} failed to load: {type(exc).__name__}: "
                                   f"{self.client_message(exc)}") from exc

        def swap() -> int | None:  # on the engine thread: an unload queued after this runs after it
            delete_adapter(self.model, probe)
            with self._lock:
                entry = self._resident.get(name)
                if entry is None:  # unloaded meanwhile: nothing to replace
                    return None
                attached = entry.attached  # the name it has on the model (a version after a replacement)
            delete_adapter(self.model, attached)
            return self._attach(files, attached, bases)

        nbytes = self._on_engine(swap).result()
        if nbytes is None:
            raise AdapterNotFoundError(f"adapter {name!r} was unloaded while its replacement loaded")
        with self._lock:
            entry = self._resident.get(name)
            if entry is not None:
                entry.nbytes = nbytes
                if signature is not None:
                    entry.signature = signature
            self.stats.loads += 1
            self._failed.pop(name, None)
        return nbytes

    # -- internals -------------------------------------------------------------------------------------
    def _load(self, name: str, future: Future, pin: bool) -> str:
        signature: tuple | None = None
        try:
            path = self.path_for(name)
            signature = _signature(path)
            with self._lock:
                failed = self._failed.get(name)
            if failed is not None and failed[0] == signature:
                signature = None  # already remembered: neither counted nor stored again
                raise AdapterLoadError(f"{failed[1]} (this load failed before; it is retried once the "
                                       "adapter's files change)")
            files = read_adapter_dir(path)  # on this thread: the batch keeps decoding meanwhile
            estimate = self._estimate(files.tensors)
            if self.budget_bytes is not None and estimate > self.budget_bytes:
                raise AdapterLoadError(f"adapter {name!r} needs about {estimate} bytes, more than the whole budget "
                                       f"({self.budget_bytes} bytes)")
            bases = self._precompute_bases(files)  # SVDs here, not between decode steps
            with self._lock:
                self._make_room_locked(name, estimate)
                self._reserved += estimate
                attached = self._attached_name_locked(name)
            try:
                files = dataclasses.replace(files, tensors=stage(files.tensors, self.device))
                nbytes = self._on_engine(lambda: self._attach(files, attached, bases)).result()
            finally:
                with self._lock:
                    self._reserved -= estimate
            with self._lock:
                self._evict_locked(nbytes)  # the measured size may exceed the estimate
                room = self.budget_bytes is None or self._used_locked() + nbytes <= self.budget_bytes
                if room:
                    self._resident[name] = _Entry(nbytes, attached, signature, refs=1 if pin else 0)
                    self.stats.loads += 1
                    self._loading.pop(name, None)
                    self._failed.pop(name, None)
                else:
                    self._on_engine(lambda: delete_adapter(self.model, attached))
                self._room.notify_all()
            if not room:
                raise _NoRoomError(f"adapter {name!r} takes {nbytes} bytes on {self.device}: no room within the "
                                       f"budget ({self.budget_bytes} bytes) while the other adapters are in use")
            future.set_result(attached)
            return attached
        except BaseException as exc:
            about_the_files = isinstance(exc, LorakitError) and not isinstance(exc, _NoRoomError)
            if not isinstance(exc, (AdapterNotFoundError, InvalidAdapterNameError, AdapterLoadError)):
                exc = AdapterLoadError(f"adapter {name!r} failed to load: {type(exc).__name__}: "
                                       f"{self.client_message(exc)}").with_traceback(exc.__traceback__)
            with self._lock:
                self._loading.pop(name, None)
                if signature is not None and not isinstance(exc, (AdapterNotFoundError, InvalidAdapterNameError)):
                    self.stats.load_failures += 1
                    if about_the_files:
                        self._failed[name] = (signature, str(exc))
            future.set_exception(exc)
            raise exc

    def _estimate(self, tensors: dict[str, torch.Tensor]) -> int:
        """Bytes the file's tensors take on the device: in the dtype adapters get on this base (float32 on
        a bf16 base), fingerprints left out (they stay on the host)."""
        first = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        size = adapter_dtype(first.dtype if first is not None else torch.float32).itemsize
        return sum(t.numel() * max(size, t.element_size()) for k, t in tensors.items()
                   if not k.endswith(HOST_ONLY_SUFFIX))

    def _used_locked(self) -> int:
        return (sum(e.nbytes for e in self._resident.values()) + sum(e.nbytes for e in self._retiring.values())
                + self._reserved)

    def _make_room_locked(self, name: str, incoming: int) -> None:
        """Evict idle adapters until `incoming` bytes fit; while everything resident is in use, wait (up to
        room_wait_s) for requests to finish, then refuse: the budget is never exceeded."""
        if self.budget_bytes is None:
            return
        deadline = time.monotonic() + self.room_wait_s
        while True:
            self._evict_locked(incoming)
            if self._used_locked() + incoming <= self.budget_bytes:
                return
            left = deadline - time.monotonic()
            if left <= 0 or not self._room.wait(left):
                in_use = sorted(n for n, e in self._resident.items() if e.refs)
                raise _NoRoomError(f"adapter {name!r} needs about {incoming} bytes and the budget "
                                   f"({self.budget_bytes} bytes) has no room within {self.room_wait_s:g} s: "
                                   f"{self._used_locked()} bytes are held by adapters in use ({in_use[:5]})")

    def _attached_name_locked(self, name: str) -> str:
        """`name` itself, unless a replaced version of it still holds that name on the model."""
        taken = set(self._retiring) | {e.attached for e in self._resident.values()}
        if name not in taken:
            return name
        return next(f"{name}{VERSION_MARK}{n}" for n in self._versions if f"{name}{VERSION_MARK}{n}" not in taken)

    def _retire_locked(self, name: str) -> None:
        """Stop serving the resident version of `name` to new requests; running ones finish on it."""
        entry = self._resident.pop(name)
        if entry.refs == 0:
            self._on_engine(lambda: delete_adapter(self.model, entry.attached))
            self._room.notify_all()
        else:
            entry.unload_requested = True
            self._retiring[entry.attached] = entry

    def _user_name_locked(self, entry: _Entry) -> str:
        return next(n for n, e in self._resident.items() if e is entry)

    def _signature_now(self, name: str) -> tuple | None:
        """The files' signature of resident `name` now; None when they cannot be read (keep serving)."""
        try:
            return _signature(self.path_for(name))
        except (LorakitError, OSError):
            return None

    def _precompute_bases(self, files) -> dict:
        """The bases the adapter needs and the model lacks (LoRA-XS: SVDs), computed on the calling thread
        (reading weights only): the first LoRA-XS load on a base costs one SVD per layer, seconds on
        CPU, which must not stall the running batch. Its format checks the files first, so a bad file costs
        no SVD at all; a format the engine does not serve is refused here, before any eviction."""
        fmt = format_of(files.config, files.path / CONFIG_NAME)
        if not fmt.served:
            raise UnsupportedAdapterError(f"{files.path}: a {fmt.name} adapter, which the serving engine does not "
                                          "serve (serve a LoRA, LoRA-XS or VeRA adapter)")
        return fmt.precompute(self.model, files)

    def _attach(self, files, name: str, bases: dict) -> int:
        """Attach on the engine thread; returns the bytes the adapter holds on the device."""
        if bases:
            install_bases(self.model, "lora_xs", bases)  # the load then finds them and skips its SVDs
        fmt = format_of(files.config, files.path / CONFIG_NAME)
        fmt.load(self.model, files, name, packed=self.packed and fmt.packs(files.config))
        return adapter_device_bytes(self.model, name)

    def _evict_locked(self, incoming: int) -> None:
        if self.budget_bytes is None:
            return
        used = self._used_locked()
        for victim in [n for n, e in self._resident.items() if e.refs == 0]:  # least recently used first
            if used + incoming <= self.budget_bytes:
                break
            used -= self._resident[victim].nbytes
            self._remove_locked(victim)
            self.stats.evictions += 1

    def _remove_locked(self, name: str) -> None:
        """Forget `name` and queue its detach; queued under the lock, so a later re-load's attach
        always runs after it on the engine thread."""
        attached = self._resident.pop(name).attached
        self._on_engine(lambda: delete_adapter(self.model, attached))

    def _on_engine(self, fn) -> Future:
        if self.engine is not None:
            return self.engine.call_soon(fn)
        future: Future = Future()
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)
        return future


class _NoRoomError(AdapterLoadError):
    """The budget stayed full of adapters in use: not the files' fault, so the load is not remembered as failed."""


def _signature(path: Path) -> tuple:
    """What identifies the adapter's files: the directory's and each file's inode, size and modification
    time. A save replaces the directory (new inodes), an edit in place changes size or mtime."""
    top = os.stat(path)
    entries = [(top.st_dev, top.st_ino)]
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        try:
            with_stat = entry.stat()  # a linked file: its target's
        except OSError:  # a symlink loop or a dangling link: the read names it; here the link itself counts
            with_stat = entry.stat(follow_symlinks=False)
        entries.append((entry.name, with_stat.st_ino, with_stat.st_size, with_stat.st_mtime_ns))
    return tuple(entries)
