"""Compile ringattn's FlashAttention-4 kernels for an H100/H200 (``sm_90a``) without a GPU.

    bash experiments/cute_env.sh                       # once: Python 3.12 with the CuTe DSL
    /tmp/py312/bin/python -m experiments.cute_compile  # every kernel, causal or not, LSE or not

Why: GPU time is scarce (about 30 minutes a session), and a kernel that does not compile costs
a device call to find out. The CUTLASS DSL compiles FA4's SM90 kernels on this machine from fake
CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, strides and dtypes, no memory) for
the architecture FA4's ``FLASH_ATTENTION_ARCH`` / ``CUTE_DSL_ARCH`` name; each kernel takes
4-10 s. This runs each module's own compile path (``_compile`` of :mod:`ringattn.kernels.
fa4_group`, :mod:`~ringattn.kernels.fa4_zero` and :mod:`~ringattn.kernels.fa4_merge`) on
operands laid out as the core lays out issue 5's blocks (views of ``[1, n, 16, 128]`` bf16
tensors). It checks that the kernels compile, not what they compute: that is the GPU's
(``experiments/fa4_probe.py``, ``experiments/flex_gpu.py --part check``). Prints a table last;
exits 1 if any kernel failed.

A refactor of a kernel class that should change nothing can be shown to change nothing here:
``CUTE_DSL_KEEP=ptx CUTE_DSL_DUMP_DIR=DIR`` writes each kernel's PTX (caching off), so the PTX of
a run before and after compares byte for byte (h200_perf.md step 64: the dQ postprocesses'
shared prologue).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from experiments import ISSUE_LENGTHS, ISSUE_RATES
from experiments.bench import failure
from ringattn.core import neighbour_shifts
from ringattn.kernels import fa4_group, fa4_merge, fa4_zero
from ringattn.pattern import make_plan


def _parts(
    n: int, h: int, d: int, mixing: str, with_lse: bool
) -> list[tuple[fa4_group.Group, tuple[int, ...]]]:
    """Each block's ``(q, k, v, out, lse or None)`` views ``[B, L, H, ...]`` (fake CUDA tensors)
    and its neighbour shifts, as the core's prepared launches hand them over."""
    plan = make_plan(n, h, tuple(zip(ISSUE_LENGTHS, ISSUE_RATES)), mixing)
    q, k, v, out = (torch.empty(1, n, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    lse = torch.empty(1, n, h, dtype=torch.float32, device="cuda")
    parts: list[tuple[fa4_group.Group, tuple[int, ...]]] = []
    for block in plan.blocks:
        q_rows, k_rows, v_rows, out_rows = (block.rows(x).flatten(0, 1) for x in (q, k, v, out))
        lse_rows = block.rows(lse).flatten(0, 1) if with_lse else None
        group = (q_rows, k_rows, v_rows, out_rows, lse_rows)
        parts.append((group, neighbour_shifts(block, out_rows)))
    return parts


def _grouped_backward(n: int, h: int, d: int, causal: bool) -> None:
    """Compile the grouped backward and its dQ postprocess
    (:func:`ringattn.kernels.fa4_group_bwd._compile`) for issue 5's head_groups blocks."""
    from ringattn.kernels import fa4_group_bwd

    groups: list[fa4_group_bwd.Group]
    shifts: list[tuple[int, ...]]
    groups, shifts = [], []
    for (q, k, v, out, lse), block_shifts in _parts(n, h, d, "head_groups", True):
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))  # (views of that layout will do)
        groups.append((torch.empty_like(out), q, k, v, out, lse, dq, dk, dv))
        shifts.append(block_shifts)  # (the gradients' unselected rows' zeros, as the output's)
    stats = fa4_group_bwd.workspaces(groups, causal)
    fa4_group_bwd._compile(fa4_group_bwd._key(groups, causal, shifts), groups, stats)


def _sm90_backward(d: int, causal: bool) -> tuple[Any, Any, Any]:  # (FA4's, untyped)
    """FA4's interface, bf16 as the CuTe DSL names it, and FA4's SM90 backward tiles for
    ``d``: what its launcher compiles the pre/postprocess kernels with."""
    import importlib

    from ringattn.kernels import fa4_group_bwd

    interface = importlib.import_module("flash_attn.cute.interface")
    dsl_utils = importlib.import_module("flash_attn.cute.cute_dsl_utils")
    bf16 = dsl_utils.torch2cute_dtype_map[torch.bfloat16]
    return interface, bf16, fa4_group_bwd._config(d, causal)


def _adding_postprocess(d: int, causal: bool) -> None:
    """Compile FA4's dQ postprocess as FA4's SM90 backward launcher does for issue 5's blocks,
    under :func:`ringattn.kernels.fa4_add.adding_all_kernels` (its adding variant)."""
    from ringattn.kernels import fa4_add

    interface, bf16, cfg = _sm90_backward(d, causal)
    with fa4_add.adding_all_kernels():
        interface._compile_bwd_postprocess(
            bf16,
            d,
            cfg.m_block_size,
            128 if cfg.dQ_single_wg else cfg.num_wg * 128,
            cfg.AtomLayoutMdQ,
            cfg.dQ_swapAB,
            False,  # (no variable lengths, no sequence-used counts)
            False,
            False,  # (SM90: no 2-CTA instructions, clusters of one)
            1,
            90,
            False,
            None,  # (no learnable sink)
            64 if cfg.dKV_swapAB else 32,  # (FA4's hdim_multiple_of on SM90)
            None,
        )


def _given_dpsum_preprocess(d: int, causal: bool) -> None:
    """Compile FA4's backward preprocess as FA4's SM90 launcher does for issue 5's blocks handed
    a dLSE, under :func:`ringattn.kernels.fa4_dpsum.given_dpsum_kernels` (its ``O`` / ``dO``
    loads as zero fills: with ``CUTE_DSL_KEEP=ptx`` its PTX has no 16-byte global loads left,
    FA4's own has those of ``O`` and ``dO``)."""
    from ringattn.kernels import fa4_dpsum

    interface, bf16, cfg = _sm90_backward(d, causal)
    with fa4_dpsum.given_dpsum_kernels():
        interface._compile_bwd_preprocess(
            bf16,
            d,
            d,
            cfg.m_block_size,
            False,  # (no variable lengths, no sequence-used counts)
            False,
            True,  # (a dLSE: the given sums)
            True,  # (FA4's dQ accumulator, zeroed)
            False,  # (no load-P scaling)
            True,  # (the LSE scaled to base 2)
            True,  # (padded offsets, FA4's default)
            False,  # (heads not major, no packed GQA: one key head per query head)
            False,
            1,
            1,
            False,
            64 if cfg.dKV_swapAB else 32,  # (FA4's hdim_multiple_of on SM90)
        )


@contextmanager
def _persistent(on: bool) -> Iterator[None]:
    """The grouped forward (``fa4_group``) set, where ``on``, to put every plan on its
    persistent grid (the grid the core takes past its ``ALL_TILES_MAX``), and restored after."""
    saved = fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX
    if on:
        fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX = "always", 0
    try:
        yield
    finally:
        fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX = saved


def kernels(n: int, h: int, d: int) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(name, compile())`` for every kernel variant."""
    for causal, with_lse in itertools.product((False, True), (True, False)):
        variant = f"causal={causal} lse={with_lse}"

        def grouped(
            causal: bool = causal, with_lse: bool = with_lse, persistent: bool = False
        ) -> None:
            parts = _parts(n, h, d, "head_groups", with_lse)
            groups, shifts = [p[0] for p in parts], [p[1] for p in parts]
            with _persistent(persistent):
                fa4_group._compile(fa4_group._key(groups, causal, shifts), groups)

        def zeroing(causal: bool = causal, with_lse: bool = with_lse) -> None:
            (q, k, v, out, lse), shifts = _parts(n, h, d, "head_groups", with_lse)[-1]
            lse_bhl = None if lse is None else lse.transpose(1, 2)
            fa4_zero._compile(fa4_zero._key(q, causal, lse, shifts), q, k, v, out, lse_bhl)

        yield f"fa4_group {variant}", grouped
        yield f"fa4_group persistent {variant}", partial(grouped, persistent=True)
        if with_lse:  # (the backward always has an LSE)

            def grouped_backward(causal: bool = causal) -> None:
                _grouped_backward(n, h, d, causal)

            yield f"fa4_group_bwd causal={causal}", grouped_backward
        yield f"fa4_zero {variant}", zeroing
        if with_lse:

            def merging(causal: bool = causal) -> None:
                (q, k, v, out, lse), _ = _parts(n, h, d, "lse", True)[1]
                assert lse is not None  # (asked for: with_lse)
                key = fa4_merge._key(q, causal, lse)
                fa4_merge._compile(key, q, k, v, out, lse.transpose(1, 2))

            yield f"fa4_merge causal={causal}", merging
            yield f"fa4_add postprocess causal={causal}", partial(_adding_postprocess, d, causal)
            yield (
                f"fa4_dpsum preprocess causal={causal}",
                partial(_given_dpsum_preprocess, d, causal),
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n",
        type=int,
        default=32768,
        help="sequence length the operands are laid out for (default: %(default)s)",
    )
    p.add_argument("--only", default="", help="compile only the kernels whose name has this")
    args = p.parse_args(argv)
    # read when the DSL and FA4's interface are first imported (in the modules' _compile)
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    os.environ.setdefault("FLASH_ATTENTION_ARCH", "sm_90")
    os.environ.setdefault("FLASH_ATTENTION_NUM_SMS", "132")
    rows = []
    for name, compile_ in kernels(args.n, 16, 128):
        if args.only not in name:
            continue
        start = time.perf_counter()
        try:
            with FakeTensorMode():
                compile_()
            result = "ok"
        except Exception as exc:  # report every kernel, then fail
            traceback.print_exc()
            result = failure(exc, 200)
        rows.append((name, time.perf_counter() - start, result))
        print(f"{name}: {result} ({rows[-1][1]:.1f} s)", flush=True)
    print(f"\nsm_90a, n={args.n}, torch {torch.__version__}")
    for name, seconds, result in rows:
        print(f"{name:32} | {seconds:5.1f} s | {result}")
    sys.exit(0 if all(result == "ok" for *_, result in rows) else 1)


if __name__ == "__main__":
    main()
