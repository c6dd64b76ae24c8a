"""The Triton kernels (merge, unselected-pairs fill, gradient add, row sums), run on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter must be switched on before triton is imported, so the cases run in a fresh
process (``tests/kernel_cases.py``). On CUDA the same kernels run compiled; the GPU benchmark
(``experiments/bench.py``) checks every strategy against the oracle there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import ringattn

CASES = Path(__file__).with_name("kernel_cases.py")
# the checkout under test: a script's sys.path starts at its own folder (tests/), so without this
# the case script imported whichever ringattn is installed (another checkout's, for an editable
# install elsewhere) and its kernels were the ones tested
ROOT = str(Path(ringattn.__file__).resolve().parents[1])


def run_cases(*args: str, interpret: str = "1") -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, str(CASES), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_merge_kernel_matches_functional_merge_under_interpreter():
    done = run_cases("24")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[0] == "ok" and int(done.stdout.split()[1]) > 24
    # ... and tested this checkout's kernels, not an installed copy's
    assert done.stdout.splitlines()[1] == f"ringattn {ringattn.__file__}"


def test_kernels_reach_heads_past_int32_offsets():
    """A head stride times the head index passes 2**31 (gradients of a transposed [b, h, n, d]
    q at n = 1M, h = 32, d = 128, an r = 2 job): i32 head indices wrapped and the kernels
    crashed or wrote before their tensor (kernel_cases.wide_head_stride_cases)."""
    done = run_cases("wide-heads")
    assert done.returncode == 0, done.stderr[-4000:] or f"exit code {done.returncode}"
    assert done.stdout.split() == ["ok", "4"]


def test_cases_refuse_to_run_without_interpreter(monkeypatch):
    """The case script checks that it really exercises the kernels: without the interpreter (and
    without CUDA) they are unavailable on the CPU, and the script fails at its own check rather
    than passing through the torch twins."""
    from ringattn.kernels import merge as merge_kernel

    done = run_cases("1", interpret="0")
    assert done.returncode != 0
    assert "AssertionError" in done.stderr and 'get("TRITON_INTERPRET") == "1"' in done.stderr
    monkeypatch.setattr(merge_kernel, "INTERPRET", False)
    assert not merge_kernel.available(torch.empty(0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 64), st.integers(-1, 63), st.integers(1, 6)),
        min_size=1,
        max_size=12,
    ),
)
def test_selection_table_is_the_selection(runs):
    """The fill kernel's table, built by fills on the device (capture-safe), holds exactly the
    selection's rates and offsets in head order (heads drawn in runs of equal values, as groups
    make them)."""
    from ringattn.kernels.unselected import selection_table

    pairs = [(r, o) for r, o, count in runs for _ in range(count)]
    selection = (tuple(r for r, _ in pairs), tuple(o for _, o in pairs))
    table = selection_table(selection, torch.device("cpu"))
    assert table.dtype == torch.int32
    assert table.tolist() == [list(selection[0]), list(selection[1])]
