"""The documentation's runnable examples run as written (CPU): a stale name in one fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), re.DOTALL | re.MULTILINE)


def test_readme_use_example_runs_and_matches_its_oracle():
    """README's first example: the module, the function and the oracle it points to."""
    scope: dict = {}
    exec(python_blocks("README.md")[0], scope)
    assert scope["out"].shape == scope["q"].shape
    assert rel_err(scope["out"], scope["ref"]) <= 1e-5


@pytest.mark.parametrize("doc, index", [("docs/architecture.md", 0)])
def test_doc_example_runs(doc, index):
    scope: dict = {}
    exec(python_blocks(doc)[index], scope)
    assert isinstance(scope["out"], torch.Tensor) and scope["out"].shape == scope["q"].shape


def test_the_ablation_notebooks_help_is_the_current_one():
    """notebooks/02_ablation.ipynb shows ablate's --help as stored output: it had gone stale
    (no --import line). Compared word for word (the stored width may differ)."""
    import json

    from experiments.ablate import build_parser

    notebook = json.loads((ROOT / "notebooks" / "02_ablation.ipynb").read_text())
    (cell,) = [
        c
        for c in notebook["cells"]
        if c["cell_type"] == "code" and 'main(["--help"])' in "".join(c["source"])
    ]
    stored = "".join("".join(o.get("text", "")) for o in cell["outputs"])
    assert stored.split() == build_parser().format_help().split()
