"""Method settings: one frozen dataclass per adapter method, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Union

import torch

from lorakit.errors import AdapterConfigError

# "all-linear", a regex (matched against full module names), or a list of names/suffixes.
Targets = Union[str, tuple[str, ...]]


def _normalise_targets(name: str, value: object) -> Targets:
    if isinstance(value, str):
        if not value:
            raise AdapterConfigError(f"{name} is empty")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise AdapterConfigError(f"{name} must be 'all-linear', a regex or a list of names, got {value!r}")


def _names(name: str, value: object) -> tuple[str, ...]:
    """A tuple of module names: one name given as a string is one name, not its characters."""
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise AdapterConfigError(f"{name} must be a module name or a list of names, got {value!r}")


def normalise_excludes(value: object) -> tuple[str, ...]:
    """exclude_modules as a tuple of names: one name given as a string is one name, not its characters."""
    return _names("exclude_modules", value)


def normalise_saved(value: object) -> tuple[str, ...]:
    """modules_to_save as a tuple of module names (a lone string is one name)."""
    return () if value is None else _names("modules_to_save", value)


# trainable_token_indices as PEFT takes it: ids for the input embedding, or {module name: ids}; held as a
# tuple of ids, or a tuple of (module, ids) pairs, so the frozen config stays hashable
TokenIndices = Union[None, tuple[int, ...], tuple[tuple[str, tuple[int, ...]], ...]]


def _token_ids(value: object, where: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value) and len(set(value)) == len(value):
        return tuple(value)
    raise AdapterConfigError(f"trainable_token_indices{where} must be a non-empty list of distinct token ids >= 0, "
                             f"got {value!r}")


def normalise_token_indices(value: object) -> TokenIndices:
    """trainable_token_indices: None, a list of ids (the input embedding) or {module: ids}."""
    if value is None:
        return None
    if isinstance(value, dict) or (isinstance(value, tuple) and value and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value)):
        pairs = value.items() if isinstance(value, dict) else value
        if not pairs:
            raise AdapterConfigError("trainable_token_indices is an empty mapping")
        return tuple((str(m), _token_ids(ids, f"[{m!r}]")) for m, ids in pairs)
    return _token_ids(value, "")


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise AdapterConfigError(f"{name} must be True or False, got {value!r}")
    return value


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype an adapter's trained weights are kept in on a base whose weights are `base_dtype`.

    Why float32 on a bf16/fp16 base: small optimizer updates round away in 8 or 11 mantissa bits. The
    weights are cast to the activation dtype per call (cheap: they are r-wide), as PEFT's autocast does.
    A non-float (quantized) base gets float32 either way."""
    if not base_dtype.is_floating_point:
        return torch.float32
    if autocast_adapter_dtype and base_dtype.itemsize < 4:
        return torch.float32
    return base_dtype


MAX_ALPHA = 1e6  # |lora_alpha| beyond this overflows a half-precision scaled update; no real adapter comes near


def _alpha(name: str, alpha: object) -> float:
    """A finite real number of sane size: NaN or -1e39 would make every output non-finite."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or \
            abs(alpha) > MAX_ALPHA:
        raise AdapterConfigError(f"{name} must be a finite number of magnitude at most {MAX_ALPHA:g}, got {alpha!r}")
    return alpha


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _rank(name: str, r: object) -> int:
    return _positive_int(f"rank {name}", r)


def _rate(name: str, p: object) -> float:
    if not 0.0 <= p < 1.0:
        raise AdapterConfigError(f"{name} must be in [0, 1), got {p!r}")
    return p


# -- the fields several methods share: each declared once, with its default and its check ---------------------
# A config class lists them in its own order (the constructor's positional order and config_to_dict's keys stay
# as they were); `CheckedConfig.__post_init__` runs every field's check, so a shared field is validated one way.

def checked(default: object, check: Callable[[str, object], object]) -> Any:
    """A dataclass field whose value is checked (and normalised) by `check(field_name, value)` on construction."""
    return field(default=default, metadata={"check": check})


def rank(default: int) -> Any:
    return checked(default, _rank)


def alpha(default: float = 16.0) -> Any:
    return checked(default, _alpha)


def dropout() -> Any:
    return checked(0.0, _rate)


def flag(default: bool) -> Any:
    return checked(default, _flag)


def targets() -> Any:
    return checked("all-linear", _normalise_targets)


def excludes() -> Any:
    return checked((), _names)


def autocast() -> Any:
    return flag(True)


def saved() -> Any:
    return checked((), lambda _, value: normalise_saved(value))


def token_indices() -> Any:
    return checked(None, lambda _, value: normalise_token_indices(value))


class CheckedConfig:
    """Base of the frozen configs: construction runs each field's own check (see `checked`) in field order."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]  (subclasses are dataclasses)
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))


@dataclass(frozen=True)
class LoraConfig(CheckedConfig):
    """LoRA: ΔW = (α/r)·B·A, A random, B zero, both trained."""

    method: ClassVar[str] = "lora"
    r: int = rank(8)  # rank of the update
    lora_alpha: float = alpha()  # scaling numerator: scaling = α/r (α/√r with rsLoRA)
    lora_dropout: float = dropout()  # dropout on the adapter's input, training only
    use_rslora: bool = False  # rank-stabilised scaling α/√r
    target_modules: Targets = targets()  # which layers get an adapter
    exclude_modules: tuple[str, ...] = excludes()  # names/suffixes never adapted (the output head always is)
    autocast_adapter_dtype: bool = autocast()  # on a bf16/fp16 base: weights in float32, computed in the activation dtype
    modules_to_save: tuple[str, ...] = saved()  # modules trained as full copies (a classifier head, a norm), as PEFT's
    trainable_token_indices: TokenIndices = token_indices()  # embedding rows trained for these ids (lorakit.layer.trainable_tokens)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


def _non_negative(name: str, value: object) -> float:
    if not value >= 0.0:
        raise AdapterConfigError(f"{name} must be >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class LoraXSConfig(CheckedConfig):
    """LoRA-XS: ΔW = (α/r)·U_r·R·Σ_r·V_rᵀ; only the r×r matrix R is trained."""

    method: ClassVar[str] = "lora_xs"
    r: int = rank(16)  # rank of the frozen SVD basis; R is r×r
    lora_alpha: float = alpha()  # scaling = α/r
    init_std: float = checked(1e-5, _non_negative)  # R starts as N(0, init_std²): near zero, so training starts at the base
    lora_dropout: float = dropout()  # dropout on the adapter's input, training only
    target_modules: Targets = targets()
    exclude_modules: tuple[str, ...] = excludes()
    autocast_adapter_dtype: bool = autocast()  # on a bf16/fp16 base: weights in float32, computed in the activation dtype

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@dataclass(frozen=True)
class VeraConfig(CheckedConfig):
    """VeRA: ΔW = Λ_b·B·Λ_d·A with A, B random and shared by all layers; only d and b are trained."""

    method: ClassVar[str] = "vera"
    scaling: ClassVar[float] = 1.0  # d and b carry the whole scale: no α
    r: int = rank(256)  # rank of the shared random projections
    d_initial: float = 0.1  # initial value of every entry of d
    projection_seed: int = 0  # seed of the shared A and B
    vera_dropout: float = dropout()  # dropout on the adapter's input, training only
    target_modules: Targets = targets()
    exclude_modules: tuple[str, ...] = excludes()
    autocast_adapter_dtype: bool = autocast()  # on a bf16/fp16 base: weights in float32, computed in the activation dtype


def _positive_int_or_none(name: str, value: object) -> int | None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise AdapterConfigError(f"{name} must be a positive integer or None, got {value!r}")
    return value


@dataclass(frozen=True)
class PrefixConfig(CheckedConfig):
    """Prefix tuning: trained keys and values put in front of every attention layer's own (no linear changes)."""

    method: ClassVar[str] = "prefix"
    num_virtual_tokens: int = checked(20, _positive_int)  # prefix length: key/value slots added to every layer
    prefix_projection: bool = flag(False)  # train through a reparameterisation MLP (folded into the prefix when saved)
    encoder_hidden_size: int | None = checked(None, _positive_int_or_none)  # MLP hidden width; None: the key/value width
    autocast_adapter_dtype: bool = autocast()  # on a bf16/fp16 base: weights in float32, computed in the activation dtype


AdapterConfig = Union[LoraConfig, LoraXSConfig, VeraConfig]
CONFIG_CLASSES: dict[str, type] = {c.method: c for c in (LoraConfig, LoraXSConfig, VeraConfig, PrefixConfig)}


def config_to_dict(config: AdapterConfig) -> dict:
    """A JSON-ready dict of the config, with its method name."""
    data = asdict(config)
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(data.get(key), tuple):
            data[key] = list(data[key])
    tokens = data.get("trainable_token_indices")
    if tokens is not None:  # back to PEFT's JSON shape: a list of ids or {module: ids}
        data["trainable_token_indices"] = list(tokens) if isinstance(tokens[0], int) else \
            {m: list(ids) for m, ids in tokens}
    return {"method": config.method, **data}


def config_from_dict(data: dict) -> AdapterConfig:
    """Inverse of config_to_dict; unknown fields are an error, not silently dropped."""
    data = dict(data)
    method = data.pop("method", None)
    cls = CONFIG_CLASSES.get(method)
    if cls is None:
        raise AdapterConfigError(f"unknown adapter method {method!r}; known: {sorted(CONFIG_CLASSES)}")
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise AdapterConfigError(f"unknown {method} config fields {sorted(unknown)}; known: {sorted(known)}")
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    return cls(**data)


__all__ = ["adapter_dtype", "LoraConfig", "LoraXSConfig", "PrefixConfig", "VeraConfig", "AdapterConfig", "config_to_dict",
           "config_from_dict"]
