"""The dependency versions lorakit is tested against, and a clear error outside them.

lorakit reaches into internals that change between releases (transformers' cache classes and the name of
the cache argument, bitsandbytes' 4-bit layers, PEFT's file layout), so each range below is the one the
test suite ran on; `constraints.txt` pins the newest tested set. Set LORAKIT_SKIP_VERSION_CHECK=1 to try
another release at your own risk.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lorakit.errors import LorakitError

LORAKIT_VERSION = "0.1.0"  # lorakit's own release (lorakit.__version__; keep in step with pyproject.toml)

# package -> the range the suite is tested against (keep in step with pyproject.toml and constraints.txt)
SUPPORTED: dict[str, str] = {
    "torch": ">=2.11,<2.14",
    "transformers": ">=5.17,<5.25",
    "peft": ">=0.21,<0.22",
    "bitsandbytes": ">=0.50,<0.51",
    "safetensors": ">=0.4,<1",
}
SUPPORTED_TRANSFORMERS = f"transformers {SUPPORTED['transformers']}"


class IncompatibleVersionError(LorakitError, ImportError):
    """An installed dependency lies outside the range lorakit is tested against."""


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_version(package: str, version: str | None = None) -> None:
    """Raise IncompatibleVersionError when `package` is installed at a version outside SUPPORTED."""
    if os.environ.get("LORAKIT_SKIP_VERSION_CHECK") == "1":
        return
    version = version if version is not None else installed_version(package)
    if version is None:
        return
    # a local label (2.13.0+cpu) is the release it labels; a pre-release (5.17.0rc1) comes before its release
    if not SpecifierSet(SUPPORTED[package]).contains(Version(version).public, prereleases=True):
        raise IncompatibleVersionError(
            f"lorakit is tested with {package} {SUPPORTED[package]}, but {package} {version} is installed; "
            f"install a tested one (pip install -c constraints.txt '{package}{SUPPORTED[package]}') or set "
            "LORAKIT_SKIP_VERSION_CHECK=1 to try it anyway")


def check_core_versions() -> None:
    """The dependencies every lorakit import uses. Run as the `lorakit` command, an untested version is a
    one-line error and exit status 2 (an input error of the environment, not a bug with a traceback)."""
    try:
        for package in ("torch", "transformers", "safetensors"):
            check_version(package)
    except IncompatibleVersionError as exc:
        if os.path.basename(sys.argv[0] if sys.argv else "") == "lorakit":
            print(f"lorakit: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
