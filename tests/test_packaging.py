"""What ``pip install ringattn`` puts into site-packages: the library's packages, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import setuptools

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_only_the_library_is_installed():
    """``experiments/`` is scripts run from a checkout; installed, it was a top-level package named
    ``experiments``, a name a user's own project often has (one shadows the other, and two
    distributions that both ship it overwrite each other's files)."""
    find = _project()["tool"]["setuptools"]["packages"]["find"]
    found = set(setuptools.find_packages(str(REPO), include=find["include"]))
    library = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "ringattn").rglob("__init__.py")
    }
    extra, missing = sorted(found - library), sorted(library - found)
    assert found == library, f"installed {extra}, missing {missing}"


def test_console_scripts_run_installed_code():
    """A console script must point into what is installed (``ringattn``), or it fails with
    ModuleNotFoundError outside a checkout."""
    scripts = _project()["project"].get("scripts", {})
    outside = {name: aim for name, aim in scripts.items() if not aim.startswith("ringattn")}
    assert not outside, f"console scripts outside the installed library: {outside}"
