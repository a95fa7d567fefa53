"""Method settings: one frozen dataclass per adapter method, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Union

import torch

from lorakit.errors import AdapterConfigError

# "all-linear", a regex (matched against full module names), or a list of names/suffixes.
Targets = Union[str, tuple[str, ...]]


def _normalise_targets(value: object) -> Targets:
    if isinstance(value, str):
        if not value:
            raise AdapterConfigError("target_modules is empty")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise AdapterConfigError(f"target_modules must be 'all-linear', a regex or a list of names, got {value!r}")


def normalise_excludes(value: object) -> tuple[str, ...]:
    """exclude_modules as a tuple of names: one name given as a string is one name, not its characters."""
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise AdapterConfigError(f"exclude_modules must be a module name or a list of names, got {value!r}")


def normalise_saved(value: object) -> tuple[str, ...]:
    """modules_to_save as a tuple of module names (a lone string is one name)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise AdapterConfigError(f"modules_to_save must be a module name or a list of names, got {value!r}")


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


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise AdapterConfigError(f"{name} must be True or False, got {value!r}")


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


def _check_alpha(alpha: object) -> None:
    """A finite real number of sane size: NaN or -1e39 would make every output non-finite."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or \
            abs(alpha) > MAX_ALPHA:
        raise AdapterConfigError(f"lora_alpha must be a finite number of magnitude at most {MAX_ALPHA:g}, "
                                 f"got {alpha!r}")


def _check_rank(r: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterConfigError(f"rank r must be a positive integer, got {r!r}")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: ΔW = (α/r)·B·A, A random, B zero, both trained; with use_dora, DoRA (lorakit.methods.dora)."""

    method: ClassVar[str] = "lora"
    r: int = 8  # rank of the update
    lora_alpha: float = 16.0  # scaling numerator: scaling = α/r (α/√r with rsLoRA)
    lora_dropout: float = 0.0  # dropout on the adapter's input, training only
    use_rslora: bool = False  # rank-stabilised scaling α/√r
    target_modules: Targets = "all-linear"  # which layers get an adapter
    exclude_modules: tuple[str, ...] = ()  # names/suffixes never adapted (the output head always is)
    autocast_adapter_dtype: bool = True  # on a bf16/fp16 base: weights in float32, computed in the activation dtype
    modules_to_save: tuple[str, ...] = ()  # modules trained as full copies (a classifier head, a norm), as PEFT's
    trainable_token_indices: TokenIndices = None  # embedding rows trained for these ids (lorakit.layer.trainable_tokens)
    use_dora: bool = False  # DoRA: each output row rescaled to a trained magnitude m (W' = m·(W+ΔW)/‖W+ΔW‖)

    def __post_init__(self) -> None:
        _check_rank(self.r)
        _check_alpha(self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check_flag("autocast_adapter_dtype", self.autocast_adapter_dtype)
        _check_flag("use_dora", self.use_dora)
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
        object.__setattr__(self, "exclude_modules", normalise_excludes(self.exclude_modules))
        object.__setattr__(self, "modules_to_save", normalise_saved(self.modules_to_save))
        object.__setattr__(self, "trainable_token_indices", normalise_token_indices(self.trainable_token_indices))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass(frozen=True)
class LoraXSConfig:
    """LoRA-XS: ΔW = (α/r)·U_r·R·Σ_r·V_rᵀ; only the r×r matrix R is trained."""

    method: ClassVar[str] = "lora_xs"
    r: int = 16  # rank of the frozen SVD basis; R is r×r
    lora_alpha: float = 16.0  # scaling = α/r
    init_std: float = 1e-5  # R starts as N(0, init_std²): near zero, so training starts at the base
    lora_dropout: float = 0.0  # dropout on the adapter's input, training only
    target_modules: Targets = "all-linear"
    exclude_modules: tuple[str, ...] = ()
    autocast_adapter_dtype: bool = True  # on a bf16/fp16 base: weights in float32, computed in the activation dtype

    def __post_init__(self) -> None:
        _check_rank(self.r)
        _check_alpha(self.lora_alpha)
        if not self.init_std >= 0.0:
            raise AdapterConfigError(f"init_std must be >= 0, got {self.init_std!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check_flag("autocast_adapter_dtype", self.autocast_adapter_dtype)
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
        object.__setattr__(self, "exclude_modules", normalise_excludes(self.exclude_modules))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@dataclass(frozen=True)
class VeraConfig:
    """VeRA: ΔW = Λ_b·B·Λ_d·A with A, B random and shared by all layers; only d and b are trained."""

    method: ClassVar[str] = "vera"
    r: int = 256  # rank of the shared random projections
    d_initial: float = 0.1  # initial value of every entry of d
    projection_seed: int = 0  # seed of the shared A and B
    vera_dropout: float = 0.0  # dropout on the adapter's input, training only
    target_modules: Targets = "all-linear"
    exclude_modules: tuple[str, ...] = ()
    autocast_adapter_dtype: bool = True  # on a bf16/fp16 base: weights in float32, computed in the activation dtype

    def __post_init__(self) -> None:
        _check_rank(self.r)
        if not 0.0 <= self.vera_dropout < 1.0:
            raise AdapterConfigError(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        _check_flag("autocast_adapter_dtype", self.autocast_adapter_dtype)
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
        object.__setattr__(self, "exclude_modules", normalise_excludes(self.exclude_modules))

    @property
    def scaling(self) -> float:
        return 1.0


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: trained keys and values put in front of every attention layer's own (no linear changes)."""

    method: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 20  # prefix length: key/value slots added to every layer
    prefix_projection: bool = False  # train through a reparameterisation MLP (folded into the prefix when saved)
    encoder_hidden_size: int | None = None  # the MLP's hidden width; None = the model's key/value width
    autocast_adapter_dtype: bool = True  # on a bf16/fp16 base: weights in float32, computed in the activation dtype

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) or \
                self.num_virtual_tokens <= 0:
            raise AdapterConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise AdapterConfigError(f"encoder_hidden_size must be a positive integer or None, got "
                                     f"{self.encoder_hidden_size!r}")
        _check_flag("autocast_adapter_dtype", self.autocast_adapter_dtype)
        if not isinstance(self.prefix_projection, bool):
            raise AdapterConfigError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")


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
