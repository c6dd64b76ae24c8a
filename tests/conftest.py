"""Shared test helpers: hypothesis profiles, input generators, error metrics, tolerances."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st

from ringattn import reference
from ringattn.computers.flex import inductor_compiles_flex_on_cpu

settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,  # CI failures must reproduce
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

# pytest -n W: each worker's torch takes every core for its own threads, so W workers ran W times
# as many threads as cores. One share each: on CI's 2 cores with -n 2 the suite took 7 minutes
# instead of 12. (Bounds that hold at one thread and at two were checked: the suite passes under
# OMP_NUM_THREADS=1 as it does with torch's default.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _affinity = getattr(os, "sched_getaffinity", None)  # (not on macOS)
    _cores = len(_affinity(0)) if _affinity else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // _WORKERS))

# ‖out − ref‖ / ‖ref‖ bounds against the float64 oracle (the contract)
TOLERANCE = reference.TOLERANCE


# Compiled flex on the CPU needs torch's check_cpu_supported (x86 with AVX2, not macOS, not
# ATEN_CPU_CAPABILITY=default); elsewhere the module refuses it, which
# test_flex.py::test_compiled_flex_refuses_a_cpu_inductor_cannot_compile_it_for checks
NEEDS_COMPILED_CPU_FLEX = pytest.mark.skipif(
    not inductor_compiles_flex_on_cpu(),
    reason="Inductor does not compile FlexAttention for this CPU (torch's check_cpu_supported)",
)


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``‖x − ref‖ / max(‖ref‖, floor)``; ``floor`` keeps a (near-)zero reference meaningful."""
    x, ref = x.detach().double(), ref.detach().double()
    denom = max(float(ref.norm()), floor)
    if denom == 0:
        return float(x.norm())
    return float((x - ref).norm()) / denom


@st.composite
def dilation_configs(
    draw, max_k: int = 3, max_rate: int = 4, max_rows: int = 8, shared_rows: bool = False
):
    """``(segment_lengths, dilation_rates)`` with r | w; w may exceed n. ``shared_rows``: every
    config selects the same number of rows per segment (w / r), as LongNet's do (2048 rows at
    every rate): the fused kernels' grouped launches take such parts together."""
    # Half the draws aim at configs of distinct rates (LongNet's (1, 2, 4), or (3, 2)). Drawn
    # config by config, hypothesis' simplest choices (k = 1, rate 1), which it draws and repeats
    # far more often than uniformly, gave the tests that draw these directly, under CI's
    # profile, k = 1 in 43% of their examples, rate 1 in 38% of the rates, plain local attention
    # (every rate 1) in 28% and two distinct rates in 44%; now 27%, 28%, 13% and 64%, rate 1
    # still in 53% of the configs (58%), and the simplest draw is itself rates (1, 2)
    rate = st.integers(1, max_rate)
    any_rates = st.lists(rate, min_size=1, max_size=max_k)
    if max_k > 1 and max_rate > 1:
        rates = draw(st.one_of(st.lists(rate, min_size=2, max_size=max_k, unique=True), any_rates))
    else:
        rates = draw(any_rates)
    rows = st.just(draw(st.integers(1, max_rows))) if shared_rows else st.integers(1, max_rows)
    lengths = [r * draw(rows) for r in rates]
    return tuple(lengths), tuple(rates)


@st.composite
def problems(
    draw,
    max_n: int = 40,
    max_h: int = 5,
    dims: tuple[int, ...] = (1, 4, 8, 16),
    mixings: tuple[str, ...] = ("lse", "head_groups"),
    shared_rows: bool = False,
):
    """A full problem: shapes, configs (:func:`dilation_configs`), causal, mixing (head dims and
    mixings among these)."""
    segment_lengths, dilation_rates = draw(dilation_configs(shared_rows=shared_rows))
    configs = list(zip(segment_lengths, dilation_rates))
    mixing = draw(st.sampled_from(mixings))
    # docs/semantics.md's edge cases need few heads or a short tail, which n and h drawn from
    # 1..max_n and 1..max_h alone gave rarely: with CI's 5-20 examples a test, lse with h < r_i
    # came up in 0-3, head_groups with h < k in 0-2, a tail some head selects no row of in 0-3
    # (none in the bf16, fp16 and fp64 tests). Half of each draw now aims at them, and the
    # other half is as hypothesis draws it, which leans to its simplest choices (n = 1 in a
    # fifth of the draws), not uniform over the range.
    # h below the largest rate (lse: positions no head selects) or k (head_groups: configs no
    # head uses):
    few = min(max_h, max(dilation_rates) if mixing == "lse" else len(configs))
    any_h = st.sampled_from(range(1, max_h + 1))
    h = draw(st.one_of(any_h, st.sampled_from(range(1, few))) if few > 1 else any_h)
    # n = j·w + t with 0 < t <= some head's offset in that config: a tail in which that head
    # selects no row, after one full segment or the whole sequence (j = 0, w > n; the uniform
    # half has tails after more, and small n keeps the examples cheap)
    offsets = [
        [reference.head_offset(h, configs, mixing, hd, i) or 0 for hd in range(h)]
        for i in range(len(configs))
    ]
    short_tails = sorted(
        {
            j * w + t
            for (w, _), offs in zip(configs, offsets)
            for j in range(min(2, max_n // w + 1))
            for t in range(1, max(offs) + 1)
            if j * w + t <= max_n
        }
    )
    any_n = st.sampled_from(range(1, max_n + 1))
    return {
        "b": draw(st.integers(1, 2)),
        "n": draw(st.one_of(any_n, st.sampled_from(short_tails)) if short_tails else any_n),
        "h": h,
        "d": draw(st.sampled_from(dims)),
        "segment_lengths": segment_lengths,
        "dilation_rates": dilation_rates,
        "causal": draw(st.booleans()),
        "mixing": mixing,
        "scale": draw(st.sampled_from([None, None, 0.3, 1.7])),  # None: 1 / sqrt(d)
    }


# docs/semantics.md's edge cases in two problems, for the oracle tests of 3-10 draws, which
# problems() (each edge in a fifth to a third of its draws) can miss: under CI's profile the
# fp16 and fp64 tests drew no head_groups problem with h < k, so an oracle whose heads took the
# last groups there passed them. (Any edit to a test's source changes its derandomized draws.)
EDGE_PROBLEMS = (
    # lse, h = 2 below both rates: (6, 3) selects residue 2 for no head, (16, 4) residues 2-3;
    # head 0 has rows no config selects (1, 2, 5, ...); (6, 3)'s tail [12, 13) holds no row of
    # head 1; w = 16 > n
    {
        **{"b": 2, "n": 13, "h": 2, "d": 8, "causal": True, "mixing": "lse", "scale": 0.3},
        **{"segment_lengths": (6, 16), "dilation_rates": (3, 4)},
    },
    # head_groups, h = 2 < k = 3: no head uses config 2; head 0 takes (16, 2), w > n, at even
    # rows; head 1 (4, 2) at offset 1, whose tail [12, 13) selects no row
    {
        **{"b": 1, "n": 13, "h": 2, "d": 4, "causal": False, "mixing": "head_groups"},
        **{"segment_lengths": (16, 4, 8), "dilation_rates": (2, 2, 4), "scale": None},
    },
)


def edge_examples(test):
    """``@example`` each of :data:`EDGE_PROBLEMS` (a test drawing one problem, first argument)."""
    for p in reversed(EDGE_PROBLEMS):
        test = example(p)(test)
    return test


def make_qkv(p: dict, dtype: torch.dtype = torch.float32, seed: int = 0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (p["b"], p["n"], p["h"], p["d"])
    return tuple(
        torch.randn(shape, generator=gen, dtype=torch.float64)
        .to(dtype)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )


def options(p: dict) -> dict:
    keys = ("segment_lengths", "dilation_rates", "causal", "mixing", "scale")
    return {key: p[key] for key in keys if key in p}


@pytest.fixture
def one_gloo_rank(monkeypatch) -> None:
    """The environment torchrun sets up for one rank, on a free local port: a tool's ``main``
    then runs its distributed path in process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def small_problem() -> dict:
    return {
        "b": 2,
        "n": 37,
        "h": 5,
        "d": 8,
        "segment_lengths": (4, 8, 64),
        "dilation_rates": (1, 2, 4),
        "causal": True,
        "mixing": "lse",
    }


@contextmanager
def deterministic_algorithms(flag: bool, warn_only: bool = False) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(flag, warn_only=...)`` inside the block, the mode of
    before after it. (``experiments.deterministic_algorithms`` is the same; not imported from
    there, because notebooks import this module with only ``tests/`` on their path.)"""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(flag, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
