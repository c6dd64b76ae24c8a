"""What ``pip install ringattn`` puts into site-packages: the library's packages with their type
information, nothing else (the wheel is built here, offline, with this environment's setuptools)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # from a copy: setuptools writes build/ and *.egg-info/ next to the sources
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("ringattn", "experiments"):  # experiments/: must be left out by the config
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(out), str(source)], check=True, capture_output=True)
    (path,) = out.glob("ringattn-*.whl")
    return zipfile.ZipFile(path)


def test_only_the_library_is_installed(wheel):
    """``experiments/`` is scripts run from a checkout; installed, it was a top-level package named
    ``experiments``, a name a user's own project often has (one shadows the other, and two
    distributions that both ship it overwrite each other's files)."""
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ringattn"}
    packages = {
        "/".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "ringattn").rglob("__init__.py")
    }
    shipped = {name.rsplit("/", 1)[0] for name in wheel.namelist() if name.endswith("__init__.py")}
    assert shipped == packages


def test_type_information_is_shipped(wheel):
    """PEP 561: without ``py.typed`` mypy and pyright ignore the library's annotations."""
    assert "ringattn/py.typed" in wheel.namelist()


def test_console_scripts_run_installed_code(wheel):
    """A console script must point into what is installed (``ringattn``), or it fails with
    ModuleNotFoundError outside a checkout (``ringattn-ablate`` pointed into ``experiments``)."""
    entry_points = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    for name in entry_points:
        parser.read_string(wheel.read(name).decode())
    scripts = dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}
    outside = {name: aim for name, aim in scripts.items() if not aim.startswith("ringattn")}
    assert not outside, f"console scripts outside the installed library: {outside}"
