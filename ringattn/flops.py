"""Useful work of dilated attention, counted exactly from the pattern (no n × n matrices).

``useful_pairs`` is the number of (query, key) score pairs the definition computes, summed over
heads and configs, i.e. ``sum(reference.multiplicity(...))``. Forward FLOPs are ``4 · d · b``
times that (QK^T and PV, two FLOPs per multiply-add); forward+backward is 3.5× the forward
(the backward does 2.5× the forward's matmul work).
"""

from __future__ import annotations

from collections.abc import Sequence

from ringattn.config import DilatedConfig, checked_int
from ringattn.pattern import make_plan

# forward+backward FLOPs over the forward's: the backward does 2.5x the forward's matmul work
FORWARD_BACKWARD_FACTOR = 3.5


def _pairs(rows: int, causal: bool) -> int:
    return rows * (rows + 1) // 2 if causal else rows * rows


def useful_pairs(
    n: int,
    h: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    mixing: str = "lse",
) -> int:
    """The (query, key) score pairs dilated attention computes over a sequence of ``n`` and
    ``h`` heads, summed over heads and configs (batch 1): ``sum(reference.multiplicity(...))``.
    The options are checked as the module checks them (``DilatedConfig``)."""
    # the module's rules first: zip dropped a config without its rate, and a rate that does not
    # divide its length was counted as if it did
    config = DilatedConfig.of(segment_lengths, dilation_rates, causal, mixing)
    checked_int("n", n)
    checked_int("h", h)
    plan = make_plan(n, h, config.configs, mixing)
    total = 0
    for block in plan.blocks:
        total += block.job.num_heads * block.segments * _pairs(block.length, causal)
    return total


def dense_pairs(n: int, h: int, causal: bool) -> int:
    """Score pairs of plain attention over all ``h`` heads (causal: the lower triangle)."""
    # the sizes checked as useful_pairs checks them: a numpy or torch int32 n squared in its own
    # type (n * n wraps from n = 46341) counted 0 FLOPs at n = 65536, silently
    checked_int("n", n)
    checked_int("h", h)
    return h * _pairs(n, causal)


def useful_flops(
    b: int,
    n: int,
    h: int,
    d: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool,
    mixing: str,
    backward: bool = False,
) -> float:
    """The forward's FLOPs, ``4 · d · b ·`` :func:`useful_pairs`; with ``backward``, forward and
    backward's (``FORWARD_BACKWARD_FACTOR`` times that)."""
    checked_int("b", b)
    checked_int("d", d)
    flops = 4.0 * d * b * useful_pairs(n, h, segment_lengths, dilation_rates, causal, mixing)
    return flops * FORWARD_BACKWARD_FACTOR if backward else flops


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` FLOPs done in ``ms`` milliseconds (the benchmarks' one unit)."""
    return flops / ms / 1e9


def dense_flops(b: int, n: int, h: int, d: int, causal: bool, backward: bool = False) -> float:
    """Plain attention's FLOPs with the same convention (causal counts the lower triangle)."""
    checked_int("b", b)
    checked_int("d", d)
    flops = 4.0 * b * d * dense_pairs(n, h, causal)  # (Python ints: exact at any n)
    return flops * FORWARD_BACKWARD_FACTOR if backward else flops
