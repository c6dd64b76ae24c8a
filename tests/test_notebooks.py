"""The notebooks under notebooks/ run top to bottom without error, with notebooks/ as the cwd.

Each one is executed in a fresh ``python3`` kernel. When ipykernel is installed in the running
environment, jupyter_client resolves that kernel to *this* interpreter (``sys.executable``), so the
notebooks see the same ``ringattn`` as the tests; ``test_kernel_is_this_interpreter`` checks it
(same ``sys.prefix``).
The notebooks' stored outputs are not compared (timings differ run to run); the notebooks assert
what matters themselves (e.g. every strategy within 1e-5 of the oracle).

Run only these with ``pytest -m notebooks tests/test_notebooks.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ("01_semantics.ipynb", "02_ablation.ipynb", "03_new_strategy.ipynb")
CELL_TIMEOUT_S = 300

pytestmark = pytest.mark.notebooks


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's cwd
    )
    return client.execute()


def test_kernel_is_this_interpreter():
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_code_cell("import os, sys\nprint(sys.prefix)\nprint(os.getcwd())")
    )
    execute(nb)
    (output,) = nb.cells[0].outputs
    prefix, cwd = output.text.splitlines()
    assert prefix == sys.prefix, f"the python3 kernel runs {prefix}, the tests {sys.prefix}"
    assert Path(cwd).resolve() == NOTEBOOKS.resolve()


@pytest.mark.parametrize("name", sorted({*EXPECTED, *(p.name for p in NOTEBOOKS.glob("*.ipynb"))}))
def test_notebook_runs_top_to_bottom(name):
    path = NOTEBOOKS / name
    if not path.exists():
        pytest.fail(f"{path} is missing")
    nb = nbformat.read(path, as_version=4)
    execute(nb)  # raises CellExecutionError, with the failing cell and traceback, on any error
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors


# a computer planted in 01_semantics' kernel (after its imports) that returns NaN in one of its
# results: its strategies come after the built-ins', so a check that took Python's max() of the
# errors (which skips a NaN after a number: nan > x is False) passed them
NAN_COMPUTER = """
from ringattn.computers.math import MathComputer
from ringattn.registry import register

@register("computer", "nan_{part}")
class NaNComputer(MathComputer):
    def {part}(self, *args):
        result = list(super().{part}(*args))
        result[{index}] = result[{index}] * float("nan")
        return tuple(result)
"""


@pytest.mark.parametrize(
    "part, index, cell",
    [
        ("forward", 0, "worst forward rel err"),  # the output: section 4's forward table
        ("backward", 1, "| strategy | dq | dk | dv |"),  # dk alone, dq and dv right
    ],
)
def test_semantics_notebook_fails_a_strategy_whose_error_is_nan(part, index, cell):
    nb = nbformat.read(NOTEBOOKS / "01_semantics.ipynb", as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell(NAN_COMPUTER.format(part=part, index=index)))
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute(nb)
    (failed,) = [c for c in nb.cells if any(o.output_type == "error" for o in c.get("outputs", []))]
    assert cell in failed.source
    assert [o.ename for o in failed.outputs if o.output_type == "error"] == ["AssertionError"]
