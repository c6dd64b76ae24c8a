"""The plan's head parts: kernel calls of bounded size that still cover exactly each block; the
eager one-call row views equal the traced slicing views."""

from __future__ import annotations

import pytest
import torch
from conftest import dilation_configs, problems
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_strategies import check_against_oracle

import ringattn
from ringattn import pattern


def pairs_of(block: pattern.Block, h: int) -> list[tuple[int, int]]:
    heads = range(*block.job.heads.indices(h))
    return [(int(p), hd) for p in block.positions() for hd in heads]


@given(
    dilation_configs(),
    st.integers(1, 64),
    st.integers(1, 9),
    st.sampled_from(["lse", "head_groups"]),
    st.integers(1, 16),
)
# 5 heads cut evenly into the 4 parts the pair count asked for: one part of 2 heads, 1.6x the bound
@example(configs=((1,), (1,)), n=3, h=5, mixing="lse", split=4)
# a tail of 5 heads, 2 per part: 3 parts (2 parts, floor(5 / 2), put 3 heads, 1.2x, in one)
@example(configs=((16,), (1,)), n=8, h=5, mixing="lse", split=2)
# 4 segments, 8 parts asked for: 4 parts of one segment (not 8 bounds, 4 of them empty parts)
@example(configs=((4,), (2,)), n=16, h=1, mixing="lse", split=16)
def test_parts_partition_each_block_within_the_bound(configs, n, h, mixing, split):
    """Each block's parts (cut by segments, else by heads) cover its (row, head) pairs exactly
    once, none of them empty (an empty part is a kernel call on nothing), each part at most
    1/split of all pairs unless it is one segment of one head; a cut by heads, of whole heads
    only, keeps within the bound unless it is one head."""
    plan = pattern._build_plan(n, h, tuple(zip(*configs)), mixing, split)
    assert len(plan.parts) == len(plan.blocks)
    for block, parts in zip(plan.blocks, plan.parts):
        covered = [pair for part in parts for pair in pairs_of(part, h)]
        assert sorted(covered) == sorted(pairs_of(block, h))  # each pair once
        for part in parts:
            assert part.segments >= 1 and part.job.num_heads >= 1, part
            if len(parts) > 1 and part.segments == block.segments:  # cut by heads
                pairs = part.segments * part.length * part.job.num_heads
                assert part.job.num_heads == 1 or pairs * split <= n * h, part
            assert (part.length, part.tail, part.job.w, part.job.r) == (
                block.length,
                block.tail,
                block.job.w,
                block.job.r,
            )
            pairs = part.segments * part.length * part.job.num_heads
            atomic = part.segments == 1 or part.job.num_heads == 1  # not cut further
            assert atomic or pairs * split <= n * h + split * part.length * part.job.num_heads


def test_blocks_of_every_head_are_cut_by_segments():
    """The r = 1 block of lse mixing (all heads) is cut into row slabs, not head slices."""
    plan = pattern._build_plan(1024, 8, ((64, 1), (128, 2)), "lse", 8)
    parts = plan.parts[0]
    assert len(parts) == 8
    assert all(p.job.heads == plan.blocks[0].job.heads for p in parts)
    assert [p.start for p in parts] == [128 * c for c in range(8)]
    # fewer segments (4) than the parts the bound asks for (8), but no fewer than the heads (2):
    # still by segments, one each, not into two head slices of every segment
    plan = pattern._build_plan(64, 2, ((16, 1),), "lse", 8)
    assert [(p.start, p.segments, p.job.heads) for p in plan.parts[0]] == [
        (16 * c, 1, slice(0, 2, 1)) for c in range(4)
    ]


@given(
    dilation_configs(),
    st.integers(1, 40),
    st.integers(1, 6),
    st.sampled_from(["lse", "head_groups"]),
    st.integers(1, 8),
    st.sampled_from(["contiguous", "transposed", "sliced", "lse"]),
)
def test_eager_row_views_equal_the_sliced_views(configs, n, h, mixing, split, layout):
    """``Block.rows`` eagerly (one ``as_strided``) and traced (slicing) are the same view."""
    plan = pattern._build_plan(n, h, tuple(zip(*configs)), mixing, split)
    b, d = 2, 3
    if layout == "contiguous":
        x = torch.randn(b, n, h, d)
    elif layout == "transposed":  # [b, h, n, d] storage seen as [b, n, h, d]
        x = torch.randn(b, h, n, d).transpose(1, 2)
    elif layout == "sliced":  # a view with a storage offset and gaps
        x = torch.randn(b + 1, n + 2, h + 1, d + 2)[1:, 2:, 1:, 1:-1]
    else:  # the LSE accumulator: no trailing dim
        x = torch.randn(b, n, h)
    for block in (part for parts in plan.parts for part in parts):
        strided, sliced = block._rows_strided(x), block._rows_sliced(x)
        assert strided.shape == sliced.shape
        assert torch.equal(strided, sliced)
        if sliced.numel():  # and writes land in the same places: same start, same steps
            assert strided.data_ptr() == sliced.data_ptr()
            steps = [
                (a, b)
                for a, b, size in zip(strided.stride(), sliced.stride(), sliced.shape)
                if size > 1  # a dim of size 1 has no step to agree on
            ]
            assert all(a == b for a, b in steps)


def test_the_split_is_part_of_the_memo_key(monkeypatch):
    configs = ((8, 1), (16, 2))
    monkeypatch.setattr(pattern, "BLOCK_SPLIT", 1)
    whole = pattern.make_plan(32, 4, configs, "lse")
    monkeypatch.setattr(pattern, "BLOCK_SPLIT", 4)
    cut = pattern.make_plan(32, 4, configs, "lse")
    assert [len(p) for p in whole.parts] == [1, 1, 1]
    assert [len(p) for p in cut.parts] == [4, 1, 1]  # the r = 1 block covers every pair


@given(st.integers(1, 40), st.integers(1, 6), dilation_configs())
def test_the_memo_returns_the_plan_of_each_mixing(n, h, configs):
    """One shape and config set asked for under both mixings gets each mixing's own plan (a memo
    key without the mixing handed a ``head_groups`` call the ``lse`` plan memoised before it, or
    the reverse: the wrong heads attended, silently)."""
    configs = tuple(zip(*configs))
    for first, second in (("lse", "head_groups"), ("head_groups", "lse")):
        pattern._PLANS.clear()
        for mixing in (first, second):
            plan = pattern.make_plan(n, h, configs, mixing)
            assert plan.mixing == mixing
            assert plan == pattern._build_plan(n, h, configs, mixing, pattern.BLOCK_SPLIT)


@pytest.mark.parametrize("split", [1, 2, 64])
@given(p=problems())
def test_any_split_computes_the_same_function(split, p):
    """Outputs and gradients match the oracle whether blocks run whole or one head at a time."""
    default = pattern.BLOCK_SPLIT
    pattern.BLOCK_SPLIT = split
    try:
        block_strategies = [s for s in ringattn.Strategy.single_device() if s.computer != "flex"]
        check_against_oracle(p, torch.float64, block_strategies)
    finally:
        pattern.BLOCK_SPLIT = default


@given(st.integers(1, 80), st.integers(1, 7), dilation_configs(), st.sampled_from([1, 4, 8]))
def test_selection_marks_exactly_the_pairs_the_blocks_write(n, h, configs, split):
    # Plan.selection lets head_groups zero only the pairs no block writes: it must be exact
    configs = tuple(zip(*configs))
    default, pattern.BLOCK_SPLIT = pattern.BLOCK_SPLIT, split
    try:
        plan = pattern.make_plan(n, h, configs, "head_groups")
    finally:
        pattern.BLOCK_SPLIT = default
    written = torch.zeros(1, n, h, dtype=torch.int64)
    for parts in plan.parts:
        for part in parts:
            part.rows(written).add_(1)
    assert int(written.max()) <= 1  # disjoint
    rates, offsets = plan.selection
    selected = (torch.arange(n)[:, None] % torch.tensor(rates)) == torch.tensor(offsets)
    assert torch.equal(written[0].bool(), selected)
    assert pattern.make_plan(n, h, configs, "lse").selection is None


@settings(max_examples=60)
@given(st.integers(1, 64), st.integers(1, 24), st.integers(1, 8))
def test_global_permutation_lists_rows_by_residue(n, segments_per_w, r):
    """The definition, in plain Python: for each residue o, the rows s*w + o + j*r of every
    full segment, then the tail's rows of residue o (as a loop over residues built it)."""
    from ringattn.dilation.global_perm import global_permutation

    w = r * segments_per_w
    full = n // w
    want = [s * w + o + j * r for o in range(r) for s in range(full) for j in range(w // r)]
    want += [t for o in range(r) for t in range(full * w, n) if (t - full * w) % r == o]
    assert global_permutation(n, w, r).tolist() == want


@settings(max_examples=60)
@given(st.integers(1, 64), st.integers(1, 6), st.integers(1, 4), st.integers(1, 5))
def test_each_blocks_slice_of_the_permutation_is_its_rows(n, segments_per_w, r, h):
    """The global layout reads a block as a slice of its config's permutation: the slice holds
    exactly the block's positions, tails whose length r does not divide too (a wrong tail slice
    was found only by a minute of the strategies' hypothesis search)."""
    from ringattn.dilation.global_perm import _slice_of_permutation, global_permutation

    w = r * segments_per_w
    permutation = global_permutation(n, w, r)
    for block in pattern.make_plan(n, h, ((w, r),), "lse").blocks:
        start, stop = _slice_of_permutation(n, block)
        assert torch.equal(permutation[start:stop], block.positions()), block


@pytest.mark.parametrize(
    "n, w, r, error, match",
    [
        (8, 3, 2, ValueError, "r=2 must divide w=3"),  # (was 6 rows, not a permutation of 8)
        (8, 4, 8, ValueError, "r=8 must divide w=4"),  # (was no rows)
        (8, 4, 0, ValueError, "r must be >= 1, got 0"),  # (was ZeroDivisionError)
        (8.0, 4, 2, TypeError, "n must be an int, got float"),  # (was float rows)
        (-1, 4, 2, ValueError, "n must be >= 0, got -1"),
    ],
)
def test_global_permutation_refuses_what_is_not_a_config(n, w, r, error, match):
    from ringattn.dilation.global_perm import global_permutation

    with pytest.raises(error, match=match):
        global_permutation(n, w, r)


def test_a_segment_longer_than_the_sequence_costs_nothing_of_its_length():
    """w > n is one partial segment: the global layout's permutation and flex's run layout make
    nothing of size w or r (w = 2**34 asked for 128 GB for 8 rows; r = 2**14 looped in Python)."""
    from ringattn.dilation.global_perm import global_permutation
    from ringattn.masks import run_layout

    for w, r in ((2**40, 1), (2**40, 2**20), (2**34, 2**14)):
        assert global_permutation(8, w, r).tolist() == sorted(range(8), key=lambda p: p % r)
        run_id, run_residue = run_layout(8, w, r)
        assert run_residue.tolist() == sorted(p % r for p in range(8))
        assert run_id.tolist() == [r * 0 + o for o in run_residue.tolist()]


def test_jobs_for_an_unknown_mixing_is_refused():
    """Called directly (the module validates ``mixing`` before any plan), an unknown mixing is
    named, not an empty plan that would attend to nothing."""
    with pytest.raises(ValueError, match="unknown mixing 'sum'"):
        pattern.jobs_for(2, ((4, 1),), "sum")
