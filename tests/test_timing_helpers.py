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


# per-call seconds of two warm-up calls, then 3 repeats x 2 calls: the median repeat is 5 ms a
# call; a mean reads 18.7, a min 1, a skipped warm-up 1 (it times the warm-ups' calls as the
# first repeat), and a sum of each repeat's calls 10
CALL_SECONDS = [1e-4, 1e-4, 5e-3, 5e-3, 1e-3, 1e-3, 50e-3, 50e-3]


class _FakeClock:
    """A clock that only the timed function advances, by ``CALL_SECONDS`` in turn."""

    def __init__(self) -> None:
        self.now, self.calls = 0.0, 0

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.now += CALL_SECONDS[self.calls]
        self.calls += 1


def test_median_ms_is_the_median_per_call_after_the_warmup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every published time is this median: of the repeats, in ms per call, after the warm-up
    calls (a mean, a min, the warm-up left out or a repeat's calls summed passed every test)."""
    clock = _FakeClock()
    monkeypatch.setattr(ablate.time, "perf_counter", clock)
    ms = ablate.median_ms(clock.call, torch.device("cpu"), warmup=2, repeats=3, calls=2)
    assert ms == pytest.approx(5.0) and clock.calls == len(CALL_SECONDS)


def test_median_ms_on_cuda_times_each_repeats_calls_between_two_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA branch (CUDA events, stubbed here on the fake clock): the same median per call."""
    clock = _FakeClock()

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.at = None

        def record(self) -> None:
            self.at = clock()

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Event) -> float:
            return (end.at - self.at) * 1e3  # ms, as CUDA events give it

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ms = ablate.median_ms(clock.call, torch.device("cuda"), warmup=2, repeats=3, calls=2)
    assert ms == pytest.approx(5.0) and clock.calls == len(CALL_SECONDS)


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
