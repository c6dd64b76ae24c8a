"""``head_groups``' configs in one FA4 launch (``ringattn.kernels.fa4_group``), without a GPU.

The kernel runs only on SM90 GPUs (held to FA4's forward there by its first-call guard, by
``experiments/fa4_probe.py --part group`` and to the oracle by ``experiments/flex_gpu.py --part
check``). Here, on the FA4 stand-in of ``tests/fake_fa4.py``, with the core's fill poisoning
every pair a block should write (``tests/test_fa4_zero.py``):

* the core's wiring: which parts are offered to one launch (those of the most common segment
  length, two or more), each with the shifts its own launch would zero, the launch's views
  pointing at the parts' rows; a stand-in that writes every group's rows and zeros matches the
  oracle, one that declines leaves every part to its own launch, and one that skips a group
  fails the oracle;
* the first-call guard: a kernel is kept only if every group's rows, LSE and zeros agree with
  FA4's forward on the groups' first entries (``fa4.CHECKED_BATCH``), then launched on the whole
  call; one that fails to compile or disagrees is refused with a warning and never called
  again, and the core launches the groups one by one (the oracle holds either way).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import problems
from fake_fa4 import FakeFA4, installed
from hypothesis import example, given
from hypothesis import strategies as st
from test_fa4 import KERNEL_DIMS, full_configs, kernel_layouts, sdpa_strategies, with_fixture
from test_fa4_zero import ZEROED, StandIn, flipped_on_a_live_module, zeroing  # noqa: F401  (the fixture)
from test_strategies import check_against_oracle

from ringattn.kernels import fa4, fa4_group, fa4_merge, fa4_zero
from ringattn.kernels.unselected import shifted

# tails at every config, and full segments of 8 rows at r = 1, 2 and 4 (heads 0-1, 2, 3)
GROUPED = {**ZEROED, "b": 2, "n": 44, "h": 4, "scale": None}


class GroupStandIn:
    """``fa4_group.forward_group_`` on the CPU: FA4's (stand-in's) forward of each group into
    its views and zeros at its shifts, after checking the contract; declines every
    ``decline``-th call, and leaves out the last group if ``lazy``."""

    def __init__(self, decline: int = 0, lazy: bool = False) -> None:
        self.calls = self.done = 0
        self.decline, self.lazy = decline, lazy
        self.lengths: set[int] = set()
        self.shifts: list[tuple[tuple[int, ...], ...]] = []

    def __call__(self, groups, causal, scale, shifts) -> bool:
        self.calls += 1
        assert len(groups) == len(shifts) >= 2
        assert all(type(group) is tuple for group in groups)  # (fa4_group.Group, as annotated)
        assert len({q.shape[1] for q, *_ in groups}) == 1
        self.lengths.add(groups[0][0].shape[1])
        self.shifts.append(tuple(shifts))
        if self.decline and self.calls % self.decline == 0:
            return False
        for q, k, v, out, lse in groups[: -1 if self.lazy else None]:
            out_block, lse_block = fa4.forward(q, k, v, causal, scale)
            out.copy_(out_block)
            if lse is not None:
                lse.copy_(lse_block)
        for (*_, out, _), group_shifts in zip(groups, shifts, strict=True):
            for shift in group_shifts:
                shifted(out, shift).zero_()
        self.done += 1
        return True


@pytest.fixture
def grouping(zeroing):  # noqa: F811
    """``zeroing``'s set-up, with one launch offered for any two or more groups."""
    patch, selections = zeroing
    patch.setattr(
        fa4_group,
        "supported",
        lambda groups, shifts, causal: (
            len(groups) >= 2 and all(fa4_merge.layout_ok(*group) for group in groups)
        ),
    )
    patch.setattr(fa4_zero, "forward_zero_", StandIn())
    return patch, selections


@pytest.mark.parametrize(("causal", "decline"), [(False, 0), (True, 0), (True, 2)])
def test_every_config_in_one_launch(grouping, causal, decline):
    """n = 64: full segments only, so the three configs (L = 8) go as one launch, with the
    shifts of the r = 2 and r = 4 groups; declined calls go config by config."""
    patch, _ = grouping
    stand_in = GroupStandIn(decline)
    patch.setattr(fa4_group, "forward_group_", stand_in)
    per_config = fa4_zero.forward_zero_
    check_against_oracle({**ZEROED, "causal": causal}, torch.float32, sdpa_strategies())
    assert stand_in.done > 0 and stand_in.lengths == {8}
    # the groups' shifts are their configs' (test_fa4_zero), the r = 1 config's none
    assert {frozenset(shifts) for shifts in stand_in.shifts} == {
        frozenset({(), (-48,), (-96, -48, 48)})
    }
    if decline:  # the declined calls' configs took their own launches
        assert stand_in.done < stand_in.calls and per_config.zeroed > 0
    else:
        assert per_config.zeroed == 0


def test_a_launch_that_skips_a_group_fails_the_oracle(grouping):
    patch, _ = grouping
    patch.setattr(fa4_group, "forward_group_", GroupStandIn(lazy=True))
    with pytest.raises(AssertionError, match="rel err"):
        check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())


@with_fixture(max_examples=15)
@given(
    problems(dims=KERNEL_DIMS, mixings=("head_groups",), shared_rows=True),
    st.sampled_from([0, 2, 3]),
)
@example(p=GROUPED, decline=0)
def test_any_problem_matches_oracle_grouped_or_not(grouping, p, decline):
    """Tails, several segment lengths, configs without blocks: the oracle holds whichever
    parts go in one launch and whichever calls are declined. The configs select the same rows
    per segment (LongNet's), so two or more with a full segment are offered one launch."""
    stand_in = GroupStandIn(decline)
    grouping[0].setattr(fa4_group, "forward_group_", stand_in)
    check_against_oracle(p, torch.float32, sdpa_strategies())
    if kernel_layouts(p) and len(full_configs(p)) >= 2:
        assert stand_in.calls > 0


def test_parts_of_the_most_common_length_are_grouped(grouping):
    """n = 72: the (8, 1) config has 9 segments of 8 rows, (16, 2) 4 of 8 and a tail of 4, (32,
    4) 2 of 8 and a tail of 2: the L = 8 parts go in one launch, the tails on their own."""
    patch, _ = grouping
    stand_in = GroupStandIn()
    patch.setattr(fa4_group, "forward_group_", stand_in)
    check_against_oracle({**ZEROED, "n": 72, "causal": True}, torch.float32, sdpa_strategies())
    assert stand_in.lengths == {8} and fa4_zero.forward_zero_.zeroed == 0


def groups_of(seed: int = 0, lse: bool = True):
    """Two groups of ``[2, 32, 3, 8]`` tensors: heads 0 at (16, 1) and 1-2 at (32, 2) offset 1,
    both with 16-row segments, and their shifts."""
    gen = torch.Generator().manual_seed(seed)
    b, n, h, d = 2, 32, 3, 8
    q, k, v, out = (torch.randn(b, n, h, d, generator=gen) for _ in range(4))
    lse_full = torch.randn(b, n, h, generator=gen)

    def rows(x, w, r, o, heads):  # [b, n, h, ...] -> [b * n / w, w / r, H, ...]
        return x.unflatten(1, (n // w, w))[:, :, o::r, heads].flatten(0, 1)

    configs = ((16, 1, 0, slice(0, 1)), (32, 2, 1, slice(1, 3)))
    groups = [
        (*(rows(x, *c) for x in (q, k, v, out)), rows(lse_full, *c) if lse else None)
        for c in configs
    ]
    shifts = [(), (-h * d,)]
    return groups, shifts


def faithful_kernel(causal: bool, shifts, launches: list):
    """A compiled grouped kernel that does the real one's work through FA4's forward per group:
    each group's rows and LSE, then its neighbour rows' zeros; each call's operands noted in
    ``launches``."""

    def kernel(qs, ks, vs, outs, lses_bhl, scale):
        launches.append((qs, ks, vs, outs, lses_bhl))
        lses = (None,) * len(qs) if lses_bhl is None else lses_bhl  # (None: no LSE written)
        for q, k, v, out, lse in zip(qs, ks, vs, outs, lses, strict=True):
            out_block, lse_block = fa4.forward(q, k, v, causal, scale)
            out.copy_(out_block)
            if lse is not None:
                lse.transpose(1, 2).copy_(lse_block)
        for out, group_shifts in zip(outs, shifts, strict=True):
            for shift in group_shifts:
                shifted(out, shift).zero_()

    return kernel


@pytest.fixture
def fake_fa4():
    with installed(FakeFA4()) as kernel:
        yield kernel


@pytest.mark.parametrize("causal", [False, True])
def test_first_call_keeps_an_agreeing_kernel(fake_fa4, monkeypatch, causal):
    # (held to FA4's forward of the call's causality: a causal kernel against a non-causal
    # reference would be refused, and the other way round kept)
    groups, shifts = groups_of()
    compiled: list = []
    monkeypatch.setattr(
        fa4_group, "_compile", lambda key, groups: faithful_kernel(causal, shifts, compiled)
    )
    monkeypatch.setattr(fa4_group, "_COMPILED", {})
    assert fa4_group.forward_group_(groups, causal, 0.5, shifts)
    key = fa4_group._key(groups, causal, shifts)
    assert fa4_group._COMPILED[key] is not False
    assert fa4_group.forward_group_(groups, causal, 0.5, shifts)
    # checked on every group's first entries only (a whole 2M-token block's copies took GBs),
    # then the call's groups launched whole; the later call goes straight to the kernel
    entries = [q.shape[0] for q, *_ in groups]
    assert max(entries) > fa4.CHECKED_BATCH
    checked = [min(b, fa4.CHECKED_BATCH) for b in entries]
    assert [[q.shape[0] for q in qs] for qs, *_ in compiled] == [checked, entries, entries]
    for q, k, v, out, lse in groups:
        out_ref, lse_ref = fa4.forward(q, k, v, causal, 0.5)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(lse, lse_ref)
    assert (shifted(groups[1][3], shifts[1][0]) == 0).all()


# ("wrong LSE": rows right, LSE off; "no zeros, rows 0": the rows it skips already held 0 before
# the call, as a fresh buffer's would)
@pytest.mark.parametrize(
    "fault", ["raises", "wrong rows", "wrong LSE", "no zeros", "no zeros, rows 0"]
)
def test_first_call_refuses_a_failing_kernel(fake_fa4, monkeypatch, fault):
    groups, shifts = groups_of()
    if fault == "no zeros, rows 0":  # the rows it should zero hold 0 already
        for (*_, out, _), group_shifts in zip(groups, shifts, strict=True):
            for shift in group_shifts:
                shifted(out, shift).zero_()

    def compile_(key, groups):
        if fault == "raises":
            raise RuntimeError("DSL says no")

        def kernel(qs, ks, vs, outs, lses_bhl, scale):
            for q, k, v, out, lse in zip(qs, ks, vs, outs, lses_bhl, strict=True):
                out_block, lse_block = fa4.forward(q, k, v, False, scale)
                out.copy_(out_block * (2 if fault == "wrong rows" else 1))
                lse.transpose(1, 2).copy_(lse_block + (0.01 if fault == "wrong LSE" else 0))
            for out, group_shifts in zip(outs, shifts, strict=True):  # (each fault on its own)
                for shift in group_shifts if not fault.startswith("no zeros") else ():
                    shifted(out, shift).zero_()

        return kernel

    monkeypatch.setattr(fa4_group, "_compile", compile_)
    monkeypatch.setattr(fa4_group, "_COMPILED", {})
    before = [(out.clone(), lse.clone()) for *_, out, lse in groups]
    with pytest.warns(RuntimeWarning, match="several configs in one launch"):
        # (the caller then launches the groups one by one: they write every row)
        assert not fa4_group.forward_group_(groups, False, 0.5, shifts)
    assert fa4_group._COMPILED[fa4_group._key(groups, False, shifts)] is False
    # run on the checked entries only: group 0's later entries (no neighbours) untouched
    assert groups[0][0].shape[0] > fa4.CHECKED_BATCH
    later = slice(fa4.CHECKED_BATCH, None)
    assert torch.equal(groups[0][3][later], before[0][0][later])
    assert torch.equal(groups[0][4][later], before[0][1][later])
    assert not fa4_group.forward_group_(groups, False, 0.5, shifts)  # never again


def test_key_and_support():
    groups, shifts = groups_of()
    key = fa4_group._key(groups, True, shifts)
    assert key[:3] == (torch.float32, 8, True) and key[5] == (1, 2) and key[6] == ((), (-24,))
    no_lse, _ = groups_of(lse=False)
    assert fa4_group._key(no_lse, True, shifts)[4] is True
    assert not fa4_group.supported(groups, shifts, False)  # off an SM90 GPU, never


def test_support_rules(monkeypatch):
    monkeypatch.setattr(fa4, "sm90", lambda q: True)
    groups, shifts = groups_of()
    assert fa4_group.supported(groups, shifts, False)
    no_lse, _ = groups_of(lse=False)
    assert fa4_group.supported(no_lse, shifts, False)
    # one group, an LSE for some groups only, misaligned shifts, another length: never
    assert not fa4_group.supported(groups[:1], shifts[:1], False)
    assert not fa4_group.supported([groups[0], no_lse[1]], shifts, False)
    assert not fa4_group.supported(groups, [(), (-3,)], False)
    shorter = tuple(None if x is None else x[:, :8] for x in groups[1])
    assert not fa4_group.supported([groups[0], shorter], shifts, False)
    # 4 segments of 1 head and 2 of 2 heads, one tile each: 8 tiles
    monkeypatch.setattr(fa4_group, "ALL_TILES_MAX", 8)
    assert fa4_group.supported(groups, shifts, False)
    monkeypatch.setattr(fa4_group, "ALL_TILES_MAX", 7)
    # past the bound: one launch on a persistent grid where PERSISTENT takes the plan (by
    # default every plan), else none
    assert fa4_group.PERSISTENT == "always" and fa4_group.supported(groups, shifts, False)
    monkeypatch.setattr(fa4_group, "PERSISTENT", "causal")
    assert fa4_group.supported(groups, shifts, True)
    assert not fa4_group.supported(groups, shifts, False)
    monkeypatch.setattr(fa4_group, "PERSISTENT", "never")
    assert not fa4_group.supported(groups, shifts, True)


def test_persistent_grid_is_keyed_and_checked(monkeypatch):
    groups, shifts = groups_of()
    # within the bound one CTA per tile (0); past it the SM count bounds the grid
    assert fa4_group._key(groups, True, shifts)[-1] == 0
    monkeypatch.setattr(fa4_group, "ALL_TILES_MAX", 7)
    assert fa4_group._key(groups, True, shifts)[-1] == 132  # (no GPU here)
    assert fa4_group._key(groups, False, shifts)[-1] == 132
    monkeypatch.setattr(fa4_group, "PERSISTENT", "causal")
    assert fa4_group._key(groups, False, shifts)[-1] == 0
    monkeypatch.setattr(fa4_group, "PERSISTENT", "always")
    monkeypatch.setattr(fa4_group, "ALL_TILES_MAX", 8)  # 8 tiles: not past it
    assert fa4_group._key(groups, True, shifts)[-1] == 0
    monkeypatch.setattr(fa4_group, "PERSISTENT", True)  # not one of the three
    with pytest.raises(ValueError, match="PERSISTENT must be one of"):
        fa4_group.persistent(groups, True)


def test_support_rules_each_group_matches_the_first(monkeypatch):
    """Each rule on its own: a group the kernel would read or write past (another key / value
    length, head dim or dtype, an unaligned shift, a layout it cannot address), or a shift list
    that leaves a group out, is never offered to the one launch."""
    monkeypatch.setattr(fa4, "sm90", lambda q: True)
    groups, shifts = groups_of()
    q, k, v, out, lse = groups[1]
    assert fa4_group.supported(groups, shifts, False)

    def with_second(*views):
        return fa4_group.supported([groups[0], views], shifts, False)

    assert not fa4_group.supported(groups, shifts[:1], False)  # group 1's zeros would be lost
    assert not fa4_group.supported(groups, [*shifts, ()], False)
    assert not with_second(q, k[:, :8], v, out, lse)  # cross-attention: keys of another length
    assert not with_second(q, k, v[:, :8], out, lse)
    wide = [torch.randn(2, 16, 2, 16) for _ in range(4)]  # head dim 16, the first group's 8
    assert not with_second(*wide, lse)
    assert not with_second(*(x.bfloat16() for x in (q, k, v, out)), lse)
    assert not with_second(q, k, v, torch.randn(2, 16, 2, 16)[..., ::2], lse)  # strided rows
    # 8 bytes (two float32) apart: its 16-byte vector stores would straddle rows
    assert not fa4_group.supported(groups, [(), (-2,)], False)
    assert fa4_group.supported(groups, [(), (-4,)], False)


def test_key_holds_the_lse_layout_and_the_causal_tiles(monkeypatch):
    """The LSE views' unit-stride dim (of [B, H, L]: H here) and the causal forward's tiles are
    compiled in: a key without either would hand a kernel compiled for one to the other."""
    groups, shifts = groups_of()
    assert fa4_group._key(groups, True, shifts)[7] == (1, 1)
    q, k, v, out, _ = groups[1]
    lse_l = torch.randn(2, 2, 16).transpose(1, 2)  # [B, L, H] with L of stride 1
    assert fa4_group._key([groups[0], (q, k, v, out, lse_l)], True, shifts)[7] == (1, 2)
    monkeypatch.setitem(fa4.FORWARD_CONFIG, True, (128, 128, False, True))
    assert fa4_group._key(groups, True, shifts)[3] == (128, 128, False, True)
    assert fa4_group._key(groups, False, shifts)[3] is None


def test_grouper_runs_the_kept_kernel_on_kernel_ready_views_and_honours_enabled(
    fake_fa4, monkeypatch
):
    """A prepared launch calls the kept kernel itself, but only with views it accepts (a size-1
    dim of stride 0 is re-strided through forward_group_), and never once ENABLED is off."""
    groups, shifts = groups_of()
    # group 0's heads (one) broadcast: its views' size-1 head dim of stride 0
    groups[0] = tuple(
        x.as_strided(x.shape, (*x.stride()[:2], 0, *x.stride()[3:])) for x in groups[0]
    )
    launched: list = []
    monkeypatch.setattr(
        fa4_group, "_compile", lambda key, groups_seen: faithful_kernel(True, shifts, launched)
    )
    monkeypatch.setattr(fa4_group, "_COMPILED", {})
    call = fa4_group.grouper(groups, True, shifts)
    assert call(groups, 0.5) and call(groups, 0.5) and len(launched) == 3  # (check, 2 calls)
    plain, _ = groups_of(seed=1)  # (another key: its LSE views' unit stride)
    plain_call = fa4_group.grouper(plain, True, shifts)
    assert plain_call(plain, 0.5) and plain_call(plain, 0.5) and len(launched) == 6
    assert not any(0 in x.stride() for call in launched for xs in call for x in xs)
    for q, k, v, out, lse in [*groups, *plain]:
        out_ref, lse_ref = fa4.forward(q, k, v, True, 0.5)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(lse, lse_ref)
    monkeypatch.setattr(fa4_group, "ENABLED", False)
    assert not call(groups, 0.5) and not plain_call(plain, 0.5)
    assert not fa4_group.forward_group_(plain, True, 0.5, shifts)
    assert len(launched) == 6


@pytest.mark.parametrize("faithful", [True, False])
def test_a_first_call_through_the_core_matches_the_oracle_kept_or_refused(grouping, faithful):
    """The real guard under the core: a faithful kernel is checked on its groups' first entries
    and then launched on all of them; a refused one (its rows doubled in the checked entries)
    leaves the core to launch the groups one by one. The oracle holds either way."""
    patch, _ = grouping
    patch.setattr(fa4_group, "_COMPILED", {})
    launches: list = []

    def compile_(key, groups):
        kernel = faithful_kernel(key[2], key[6], launches)
        if faithful:
            return kernel

        def doubled(qs, ks, vs, outs, lses_bhl, scale):
            kernel(qs, ks, vs, outs, lses_bhl, scale)
            for out in outs:
                out.mul_(2)

        return doubled

    patch.setattr(fa4_group, "_compile", compile_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not faithful else "error", RuntimeWarning)
        check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())
    checks = [qs for qs, *_ in launches if all(q.shape[0] <= fa4.CHECKED_BATCH for q in qs)]
    kept = [kernel is not False for kernel in fa4_group._COMPILED.values()]
    assert checks and kept and set(kept) == {faithful}
    # (kept: launched on the call's groups, more entries than were checked)
    entries = max(q.shape[0] for qs, *_ in launches for q in qs)
    assert (entries > fa4.CHECKED_BATCH) is faithful


def test_a_tile_bound_flipped_on_a_live_module_takes_effect(zeroing):  # noqa: F811
    """``ALL_TILES_MAX`` and ``PERSISTENT`` are read when a forward's launches are prepared
    (whether its parts go as one launch); in ``SDPAComputer.launch_options``, a change on a
    module that already ran takes effect on its next call. Before, the module kept its
    prepared one launch (an A/B on one module in a notebook measured the same path twice)."""
    patch, _ = zeroing
    patch.setattr(fa4, "sm90", lambda q: True)  # (the real support rules, tiles included)
    patch.setattr(fa4_zero, "forward_zero_", StandIn())
    stand_in = GroupStandIn()
    patch.setattr(fa4_group, "forward_group_", stand_in)

    def one_launch() -> None:
        assert stand_in.calls == 1

    flips = [(fa4_group, "ALL_TILES_MAX", 0), (fa4_group, "PERSISTENT", "never")]
    flipped_on_a_live_module(patch, flips, one_launch)
    assert stand_in.calls == 1  # (no tile bound takes the plan now: config by config)
