"""Specific exceptions: each names the module, file and expected vs actual values involved."""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class AdapterConfigError(LorakitError, ValueError):
    """A method setting is invalid (rank <= 0, rank above the layer's size, a bad dropout...)."""


class TargetNotFoundError(LorakitError, KeyError):
    """A target module name matches nothing in the model; the message lists what exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedLayerError(LorakitError, TypeError):
    """A targeted module is of a type no adapter method supports."""


class AdapterNotFoundError(LorakitError, KeyError):
    """An adapter name is not attached to the model (or not found on disk)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedAdapterError(AdapterConfigError):
    """An adapter file uses a feature lorakit does not implement (DoRA, modules_to_save, embedding targets...)."""


class AdapterExistsError(LorakitError, ValueError):
    """An adapter of this name is already attached."""


class AdapterMismatchError(LorakitError, ValueError):
    """An adapter does not fit this base model: shapes, module names or basis fingerprints differ."""


class CorruptAdapterError(LorakitError, ValueError):
    """An adapter file is unreadable, truncated, or holds the wrong keys or dtypes."""


class NonFiniteAdapterError(LorakitError, ValueError):
    """An adapter holds NaN or infinite values, so it may not be merged or loaded."""


class MergeStateError(LorakitError, RuntimeError):
    """Merge bookkeeping refused an operation (unmerging what is not merged, training while merged...)."""


class RoutingError(LorakitError, ValueError):
    """A per-call route is malformed: wrong number of rows, unknown names, or ambiguous default."""


class BaseModelNotFoundError(LorakitError, FileNotFoundError):
    """A base model name is neither embedded, a local directory, nor reachable on the hub."""


class QuantizationError(UnsupportedLayerError):
    """A module cannot be quantized by bitsandbytes (not a linear layer), or quantizing is refused here."""


class BitsAndBytesUnavailableError(LorakitError, ImportError):
    """A quantized (4-bit / 8-bit) base was asked for but the bitsandbytes package is not installed."""


class PrefixLengthError(AdapterConfigError):
    """A prefix (plus the input) is longer than the model's context (max_position_embeddings)."""


class PrefixMismatchError(AdapterMismatchError):
    """A prefix adapter was made for another architecture: layers, key/value heads or head size differ."""


class WriteError(LorakitError, OSError):
    """A file or directory could not be written (no space left, no permission...): the message names the
    path; the previous version is intact and the write's temporary files are gone."""


class TiedWeightError(MergeStateError):
    """A merge would write into a weight another module shares (a tied embedding and output head)."""
