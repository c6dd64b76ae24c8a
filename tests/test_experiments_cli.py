"""Every script under ``experiments/`` imports on a CPU-only machine and parses ``--help``: the GPU
ones are run only on a lent device, so a broken import or argument table must show up here."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "experiments").glob("*.py") if p.stem != "__init__"
)


def test_every_script_is_listed():
    assert {"bench", "overheads", "merge_launch", "distributed_bench"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_parses_help(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    main = getattr(module, "main", None)
    if main is None:
        pytest.skip(f"experiments.{name} has no main()")
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out
