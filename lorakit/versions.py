"""The dependency versions lorakit is tested against: refuse what is known to break, warn on what is untested.

lorakit reaches into internals that change between releases (transformers' cache classes and the name of
the cache argument, bitsandbytes' 4-bit layers, PEFT's file layout). Each package has the oldest and the
newest release series the test suite ran on (scripts/newest_venv.sh builds and tests both ends). A version
older than the oldest, or one listed as known to break, is refused, naming every package out of range in one
error; a release series newer than the newest tested only warns, once per package, since it usually works
and a user should not wait for lorakit to publish before trying it. LORAKIT_SKIP_VERSION_CHECK=1 skips both.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lorakit.errors import LorakitError

LORAKIT_VERSION = "0.1.0"  # lorakit's own release (lorakit.__version__; keep in step with pyproject.toml)
CORE = ("torch", "transformers", "safetensors")  # what every `import lorakit` uses


@dataclass(frozen=True)
class Releases:
    """What the suite ran on for one package (keep in step with pyproject.toml's floors)."""

    oldest: str  # the oldest release series tested ("2.11"): older ones are refused
    newest: str  # the newest release series tested ("2.15"): a newer series warns once
    broken: tuple[str, ...] = ()  # releases known to break lorakit ("5.20.1", "5.21.*"): refused

    def __post_init__(self) -> None:
        if Version(self.oldest) > Version(self.newest):
            raise ValueError(f"oldest {self.oldest} is newer than newest {self.newest}")

    @property
    def requirement(self) -> SpecifierSet:
        """The pip range pyproject.toml declares: the floor minus the broken releases, no ceiling."""
        return SpecifierSet(",".join([f">={self.oldest}"] + [f"!={v}" for v in self.broken]))

    def describe(self) -> str:
        broken = f", not {', '.join(self.broken)}" if self.broken else ""
        return f">={self.oldest} (tested {self.oldest} to {self.newest}{broken})"


# package -> its tested releases (dated in README's "Tested versions"; constraints.txt pins the CI set)
TESTED: dict[str, Releases] = {
    "torch": Releases("2.11", "2.15"),
    "transformers": Releases("5.17", "5.25"),
    "peft": Releases("0.21", "0.21"),
    "bitsandbytes": Releases("0.50", "0.50"),
    "safetensors": Releases("0.8", "0.8"),  # transformers 5.17 needs 0.8
}
SUPPORTED_TRANSFORMERS = f"transformers {TESTED['transformers'].describe()}"


class IncompatibleVersionError(LorakitError, ImportError):
    """An installed dependency is older than lorakit's oldest tested release or known to break it."""


class UntestedVersionWarning(UserWarning):
    """An installed dependency is a release series newer than the newest lorakit was tested with."""


_warned: set[str] = set()  # packages already warned about in this process (warn once each)


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _series(version: Version) -> Version:
    return Version(".".join(str(part) for part in (version.release + (0,))[:2]))


def verdict(package: str, version: str) -> str | None:
    """'refused' (too old, or known to break), 'untested' (a newer series than tested) or None (tested)."""
    tested = TESTED[package]
    # a local label (2.13.0+cpu) is the release it labels; a pre-release (5.17.0rc1) comes before its release
    public = Version(Version(version).public)
    if not tested.requirement.contains(public, prereleases=True):
        return "refused"
    return "untested" if _series(public) > Version(tested.newest) else None


def check_versions(packages: Iterable[str], versions: dict[str, str] | None = None) -> None:
    """Raise one IncompatibleVersionError naming every refused package; warn once per untested newer one.

    `versions` overrides what is installed (package -> version), for checking a planned environment."""
    if os.environ.get("LORAKIT_SKIP_VERSION_CHECK") == "1":
        return
    refused = []
    for package in packages:
        version = (versions or {}).get(package) or installed_version(package)
        if version is None:
            continue
        found = verdict(package, version)
        if found == "refused":
            refused.append(f"{package} {version} is installed, tested {TESTED[package].describe()}")
        elif found == "untested" and package not in _warned:
            _warned.add(package)
            warnings.warn(f"lorakit is tested with {package} up to {TESTED[package].newest}.x, but {package} "
                          f"{version} is installed: it will probably work; report what breaks "
                          "(LORAKIT_SKIP_VERSION_CHECK=1 silences this)", UntestedVersionWarning, stacklevel=3)
    if refused:
        pins = " ".join(f"'{r.split()[0]}{TESTED[r.split()[0]].requirement}'" for r in refused)
        raise IncompatibleVersionError(
            f"lorakit cannot run with these versions: {'; '.join(refused)}. Install tested ones "
            f"(pip install -c constraints.txt {pins}) or set LORAKIT_SKIP_VERSION_CHECK=1 to try anyway")


def check_version(package: str, version: str | None = None) -> None:
    """check_versions for one package (`version`: this one instead of the installed one)."""
    check_versions((package,), {package: version} if version is not None else None)


def check_core_versions() -> None:
    """The dependencies every lorakit import uses. Run as the `lorakit` command, a refused version is a
    one-line error and exit status 2 (an input error of the environment, not a bug with a traceback)."""
    try:
        check_versions(CORE)
    except IncompatibleVersionError as exc:
        if os.path.basename(sys.argv[0] if sys.argv else "") == "lorakit":
            print(f"lorakit: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
