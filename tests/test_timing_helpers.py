"""The benchmarks' timing helpers (experiments/): what they measure must not depend on the GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from experiments import ablate, bench
from experiments.kernel_timeline import busy_and_span


def test_busy_and_span_counts_a_kernel_that_outlasts_later_ones() -> None:
    # a long kernel with two short ones started inside it (concurrent streams)
    kernels = [{"ts": 0.0, "dur": 100.0}, {"ts": 10.0, "dur": 5.0}, {"ts": 20.0, "dur": 5.0}]
    gaps, busy, span = busy_and_span(kernels)
    assert (busy, span) == (110.0, 100.0)  # the span ends with the first kernel, not the last
    assert gaps == [None, -90.0, -80.0]  # both against the long one's end
    gaps, _, span = busy_and_span([*kernels, {"ts": 130.0, "dur": 10.0}])
    assert (gaps[-1], span) == (30.0, 140.0)  # idle from the long kernel's end


@given(
    st.lists(st.tuples(st.floats(0, 1e4), st.floats(0.1, 1e3)), min_size=1, max_size=30).map(sorted)
)
def test_busy_and_span_covers_every_kernel(intervals: list[tuple[float, float]]) -> None:
    kernels = [{"ts": ts, "dur": dur} for ts, dur in intervals]
    gaps, busy, span = busy_and_span(kernels)
    first = kernels[0]["ts"]
    assert span >= max(e["ts"] + e["dur"] for e in kernels) - first - 1e-6
    assert all(e["ts"] + e["dur"] <= first + span + 1e-6 for e in kernels)
    assert busy == sum(dur for _, dur in intervals)
    idle = sum(max(gap, 0.0) for gap in gaps if gap is not None)
    assert busy >= span - idle - 1e-6  # what is not idle is covered by some kernel


def test_settle_calls_for_about_the_asked_time() -> None:
    calls = []
    ran = ablate.settle(lambda: calls.append(1), torch.device("cpu"), 0.05, batch=4)
    assert ran == len(calls) > 0 and ran % 4 == 0
    assert ablate.settle(lambda: calls.append(1), torch.device("cpu"), 0.0) == 0


def test_bench_refuses_a_negative_settle_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse(["--settle", "-1"])
    assert "--settle must be >= 0" in capsys.readouterr().err
    assert bench.parse(["--settle", "2.5"]).settle == 2.5


def test_a_kernels_lead_is_from_its_launch_call_to_its_start() -> None:
    from experiments.kernel_timeline import issue_leads

    def launch(ts: float, correlation: int, name: str = "cudaLaunchKernel") -> dict:
        args = {"correlation": correlation}
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "args": args}

    kernels = [
        {"ts": 100.0, "dur": 5.0, "args": {"correlation": 7}},
        {"ts": 130.0, "dur": 5.0, "args": {"correlation": 9}},
        {"ts": 150.0, "dur": 5.0, "args": {}},
    ]
    events = [launch(20.0, 7), launch(128.0, 9, "cudaLaunchKernelExC"), launch(1.0, 8)]
    events.append(
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaMemcpyAsync",
            "ts": 0.0,
            "args": {"correlation": 9},
        }
    )
    assert issue_leads(kernels, events) == [80.0, 2.0, None]
