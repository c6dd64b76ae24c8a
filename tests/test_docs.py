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
