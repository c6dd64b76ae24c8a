"""Prepared launches (``ringattn.launches``): the eager core's per-layout preparation must compute
exactly what the general path computes, be taken where it applies, and hold no tensor."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import TOLERANCE, dilation_configs, make_qkv, options, problems, rel_err
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ringattn
from ringattn import core, launches, pattern, reference
from ringattn.computers.base import BlockComputer
from ringattn.computers.sdpa import SDPAComputer
from ringattn.core import flat_view


def layouts(b: int, n: int, h: int, d: int) -> dict[str, torch.Tensor]:
    """``[b, n, h, d]`` tensors of different strides and storage offsets."""
    return {
        "contiguous": torch.randn(b, n, h, d),
        "transposed": torch.randn(b, h, n, d).transpose(1, 2),  # [b, h, n, d] storage
        "sliced": torch.randn(b + 1, n + 2, h + 1, d + 2)[1:, 2:, 1:, 1:-1],
        "lse": torch.randn(b, n, h),  # no trailing dim
    }


@given(
    dilation_configs(),
    st.integers(1, 2),
    st.integers(1, 40),
    st.integers(1, 6),
    st.sampled_from(["lse", "head_groups"]),
    st.integers(1, 8),
)
def test_flat_geometry_is_the_flat_view_or_none(configs, b, n, h, mixing, split):
    """``Block.flat_geometry`` makes the very view ``flat_view(block.rows(x))`` makes (same data,
    same start, same steps), and is None exactly where that view does not exist."""
    plan = pattern._build_plan(n, h, tuple(zip(*configs)), mixing, split)
    for x in layouts(b, n, h, 3).values():
        for part in (part for parts in plan.parts for part in parts):
            flat = flat_view(part.rows(x))
            geometry = part.flat_geometry(x.shape, x.stride())
            assert (geometry is None) == (flat is None)
            if flat is None:
                continue
            prepared = launches.views((x,), (geometry,))[0]
            assert prepared.shape == flat.shape and torch.equal(prepared, flat)
            if flat.numel():
                assert prepared.data_ptr() == flat.data_ptr()
                assert all(
                    a == c
                    for a, c, size in zip(prepared.stride(), flat.stride(), flat.shape)
                    if size > 1
                )


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in a tensor of another layout."""
    b, n, h, d = x.shape
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        y = torch.zeros(b + 1, n + 2, h + 1, d + 2)[1:, 2:, 1:, 1:-1]
        return y.copy_(x)
    return x


def leaf_like(x: torch.Tensor) -> torch.Tensor:
    """A new leaf of ``x``'s values at ``x``'s strides and storage offset (``clone()`` makes a
    sliced tensor contiguous: the calls with gradients would never see the layout)."""
    storage = torch.zeros(x.untyped_storage().nbytes() // x.element_size(), dtype=x.dtype)
    return storage.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(x).requires_grad_()


def run(p: dict, strategy: ringattn.Strategy, q, k, v, dout):
    attention = ringattn.DilatedAttention(
        p["segment_lengths"],
        p["dilation_rates"],
        causal=p["causal"],
        mixing=p["mixing"],
        strategy=strategy,
        compile=False,
    )
    xs = [leaf_like(x) for x in (q, k, v)]
    out = attention(*xs)
    out.backward(dout)
    with torch.no_grad():
        out_no_grad = attention(q, k, v)
    return attention, (out.detach(), out_no_grad, *(x.grad for x in xs))


def run_counted(p: dict, strategy: ringattn.Strategy, tensors: tuple, patches: list) -> tuple:
    """:func:`run` with ``(owner, name, value)`` patches applied, and how many prepared launches
    it took (the core's ``views`` calls): ``(module, results, launches)``."""
    taken: list[int] = []

    def spy(tensors, geometry):
        taken.append(len(tensors))
        return launches.views(tensors, geometry)

    with pytest.MonkeyPatch.context() as patch:
        for owner, name, value in (*patches, (core, "views", spy)):
            patch.setattr(owner, name, value)
        attention, results = run(p, strategy, *tensors)
    return attention, results, len(taken)


@pytest.mark.parametrize("computer", ["math", "sdpa"])
@settings(max_examples=20, deadline=None)
@given(p=problems(), layout=st.sampled_from(["contiguous", "sliced"]), split=st.integers(1, 8))
def test_every_local_block_is_prepared_at_any_batch(computer, p, layout, split):
    """segment_local's blocks are all prepared (none left to the general path, which copies its
    q, k, v rows) at any batch size: where a part's rows over a batch of more than one are no
    one view (some of a block's segments: ``b * S`` rows at two strides), it goes once per
    batch entry, each of whose rows are, cut no finer than ``BLOCK_SPLIT / b`` (about the
    launches and pairs of views over the whole batch). They compute the general path's results
    (test_prepared_launches_compute_exactly_the_general_path, whose b > 1 draws take them)."""
    p = {**p, "b": max(p["b"], 2)}
    q, k, v = make_qkv(p, torch.float32)
    dout = torch.randn_like(q)
    q, k, v, dout = (relayout(x, layout) for x in (q, k, v, dout))
    asked: list[tuple[set, set]] = []
    prepare = launches._prepare

    def spy(spec, reads, writes, block_ids, *args):
        found = prepare(spec, reads, writes, block_ids, *args)
        asked.append((set(block_ids), set(found)))
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launches, "_prepare", spy)
        patch.setattr(pattern, "BLOCK_SPLIT", split)
        run(p, ringattn.Strategy(computer=computer), q, k, v, dout)
    assert asked
    for block_ids, prepared_ids in asked:
        assert block_ids == prepared_ids


@pytest.mark.parametrize("computer", ["math", "sdpa"])
@pytest.mark.parametrize("dilation", ["segment_local", "global"])
@settings(max_examples=15, deadline=None)
@given(p=problems(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_prepared_launches_compute_exactly_the_general_path(computer, dilation, p, layout):
    """Outputs (with and without gradients) and gradients are bit-identical with and without the
    prepared launches (to a few ulps at b > 1: below), for inputs of several layouts, with
    gradients too; and the launches are taken wherever the reads are views (segment_local),
    never where they gather (global)."""
    q, k, v = make_qkv(p, torch.float32)
    dout = torch.randn_like(q)
    q, k, v, dout = (relayout(x, layout) for x in (q, k, v, dout))
    strategy = ringattn.Strategy(dilation=dilation, computer=computer)
    taken = []

    def spy(tensors, geometry):
        taken.append(len(tensors))
        return launches.views(tensors, geometry)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "views", spy)
        patch.setattr(launches, "FUSE_OFFSETS", False)  # one launch per part: the same calls
        attention, prepared = run(p, strategy, q, k, v, dout)
    blocks = attention._specs[(p["n"], p["h"], p["d"], torch.device("cpu"))].plan.blocks
    if dilation == "segment_local" and len(blocks) > 1:
        # every part's rows are one view, or each batch entry's are (b > 1, a part of a block's
        # segments: test_every_local_block_is_prepared_at_any_batch)
        assert taken, "no prepared launch was taken"
    if dilation == "global":
        assert not taken
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "prepared", lambda *args, **kwargs: launches.Prepared())
        _, general = run(p, strategy, q, k, v, dout)
    for a, c in zip(prepared, general):
        if p["b"] > 1:
            # a part of several segments has its b * S rows at two strides: the general path
            # copies them, the launches read each batch entry's as a view, and CPU's kernels
            # (flash attention, matmul) round a view's rows (off their vector alignment: sliced,
            # or d = 1) otherwise than a copy's: a few ulps at the values' scale (a misplaced
            # row: ~1)
            bound = 16 * torch.finfo(c.dtype).eps * max(1.0, c.abs().max().item())
            torch.testing.assert_close(a, c, rtol=0, atol=bound)
        else:
            assert torch.equal(a, c)


def test_prepared_launches_hold_no_tensor():
    """The preparations outlive the call (on the module's spec); the tensors must not: inputs,
    outputs and gradients are freed as soon as the caller drops them, garbage collector off."""
    p = {"b": 1, "n": 64, "h": 4, "d": 8}
    attention = ringattn.DilatedAttention(
        (16, 32), (1, 2), mixing="head_groups", strategy=ringattn.Strategy(computer="sdpa")
    )
    gc.collect()
    gc.disable()
    try:
        q, k, v = make_qkv(p, torch.float32, requires_grad=True)
        out = attention(q, k, v)
        out.sum().backward()
        refs = [weakref.ref(x) for x in (q, k, v, out, q.grad)]
        assert all(spec.launches for spec in attention._specs.values())
        del q, k, v, out
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_preparations_per_spec_are_bounded():
    attention = ringattn.DilatedAttention(
        (8,), (1,), mixing="head_groups", strategy=ringattn.Strategy(computer="math")
    )
    with torch.no_grad():
        for width in range(4, 4 + launches.MAX_PREPARED + 3):  # new strides each time
            x = torch.randn(1, 16, 2, width)[..., :4]
            attention(x, x, x)
    (spec,) = attention._specs.values()
    assert 0 < len(spec.launches) <= launches.MAX_PREPARED


def test_alternating_batch_sizes_prepare_once_each(monkeypatch):
    """One layout takes up to five preparations (forward, no-grad forward, the backward's three):
    with 8 kept oldest-first, two or three alternating batch sizes re-prepared every call."""
    attention = ringattn.DilatedAttention(
        (8, 16), (1, 2), strategy=ringattn.Strategy(computer="sdpa"), compile=False
    )
    made = []
    original = launches._prepare
    monkeypatch.setattr(launches, "_prepare", lambda *a: (made.append(1), original(*a))[1])
    for step in range(9):
        q = torch.randn(1 + step % 3, 32, 4, 8, requires_grad=True)
        attention(q, q, q).sum().backward()
        with torch.no_grad():
            attention(q, q, q)
        if step == 2:
            first_three = len(made)
    assert len(made) == first_three > launches.MAX_PREPARED // 4, (first_three, len(made))


def test_a_computer_switch_flipped_on_a_live_module_takes_effect(monkeypatch):
    """The prepared launchers are made with the computer's switches of that moment; with them
    in the key, ``SDPAComputer.cuda_forward = "torch"`` on a module that already ran takes
    effect on its next call (before, its prepared launchers kept FA4's kernels)."""
    from fake_fa4 import FakeFA4, installed

    from ringattn.computers.sdpa import SDPAComputer
    from ringattn.kernels import fa4_merge

    merges = []  # FA4's merging kernel (CUDA only) stood in for: it declines, so torch merges
    monkeypatch.setattr(fa4_merge, "supported", lambda *args: True)
    monkeypatch.setattr(fa4_merge, "merger", lambda *args: lambda *a: merges.append(1) or False)
    with installed(FakeFA4()):
        attention = ringattn.DilatedAttention(
            (8, 16), (1, 2), strategy=ringattn.Strategy(computer="sdpa"), compile=False
        )
        q = torch.randn(1, 32, 4, 8)
        with torch.no_grad():
            attention(q, q, q)
            assert merges
            monkeypatch.setattr(SDPAComputer, "cuda_forward", "torch")
            merges.clear()
            attention(q, q, q)
        assert not merges


# module-level A/B switches read where launches are prepared (the plan's parts too, BLOCK_SPLIT):
# (their owner, a value other than the default, a problem whose launches that value changes)
SHORT = {"b": 2, "n": 64, "h": 4, "d": 8, "segment_lengths": (8, 32), "dilation_rates": (1, 2)}
LAUNCH_SWITCHES = {
    "FUSE_OFFSETS": (
        launches,
        False,
        {**SHORT, "h": 8, "segment_lengths": (8, 64), "dilation_rates": (1, 8), "mixing": "lse"},
    ),
    "PER_ENTRY": (launches, False, {**SHORT, "mixing": "head_groups"}),
    "BLOCK_SPLIT": (pattern, 1, {**SHORT, "mixing": "lse"}),
}


def launches_around_a_flip(switch: str, computer: str, compiled: bool, p: dict) -> list[int]:
    """The prepared launches (the core's ``views`` calls) of a forward and backward by a module
    before ``switch`` flips, by that module after, and by a new module after; every output
    against the oracle. ``compiled``: each call through ``torch.compile`` (the opaque ops)."""
    owner, other, _ = LAUNCH_SWITCHES[switch]
    q, k, v = make_qkv(p, torch.float32)
    ref = reference.dilated_attention(q.double(), k.double(), v.double(), **options(p))
    strategy = ringattn.Strategy(computer=computer)
    taken: list[int] = []

    def spy(tensors, geometry):
        taken.append(1)
        return launches.views(tensors, geometry)

    def launched(attention: ringattn.DilatedAttention) -> int:
        taken.clear()
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = (torch.compile(attention, fullgraph=True) if compiled else attention)(*xs)
        out.sum().backward()
        assert rel_err(out, ref) <= TOLERANCE[torch.float32]
        return len(taken)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "views", spy)
        live = ringattn.DilatedAttention(**options(p), strategy=strategy)
        counts = [launched(live)]
        patch.setattr(owner, switch, other)
        counts += [
            launched(live),
            launched(ringattn.DilatedAttention(**options(p), strategy=strategy)),
        ]
    return counts


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("computer", ["math", "sdpa"])
@pytest.mark.parametrize("switch", LAUNCH_SWITCHES)
def test_a_launch_switch_flipped_on_a_live_module_takes_effect(switch, computer, compiled):
    """``launches.FUSE_OFFSETS``, ``launches.PER_ENTRY`` and ``pattern.BLOCK_SPLIT`` flipped on
    a module that already ran take effect on its next call, eager or compiled: it launches what
    a new module launches. Before, its spec kept the plan and the preparations made under the
    old value, so an A/B in a notebook measured the same code path twice."""
    p = {**LAUNCH_SWITCHES[switch][2], "causal": True}
    before, live, fresh = launches_around_a_flip(switch, computer, compiled, p)
    assert before != fresh  # (the problem shows the switch)
    assert live == fresh, (before, live, fresh)


@pytest.mark.parametrize("switch", LAUNCH_SWITCHES)
@settings(max_examples=10, deadline=None)
@given(p=problems(), computer=st.sampled_from(["math", "sdpa"]))
def test_any_problem_launches_as_a_new_module_after_a_flip(switch, p, computer):
    """:func:`launches_around_a_flip` over drawn problems (both mixings, causal or not): the
    live module launches what a new one does, and both match the oracle."""
    _, live, fresh = launches_around_a_flip(switch, computer, False, p)
    assert live == fresh


@given(
    dilation_configs(max_rate=6),
    st.integers(1, 2),
    st.integers(1, 48),
    st.integers(1, 6),
    st.integers(1, 8),
)
# each offset's block (2 pairs) within the bound (32 / 8 pairs), their run of 4 offsets (8) not
@example(configs=((8,), (4,)), b=1, n=8, h=4, split=8)
def test_offset_runs_view_exactly_their_blocks_rows(configs, b, n, h, split):
    """An ``OffsetRun``'s view holds, at head ``o``, offset ``o``'s block rows at head
    ``index`` (same elements, same memory), for tensors of several layouts; and runs only group
    whole configs of equal-headed offsets into fewer launches than blocks, each run within the
    bound on a kernel call's pairs that the blocks' parts keep (``split``)."""
    plan = pattern._build_plan(n, h, tuple(zip(*configs)), "lse", split)
    for members, runs in pattern.offset_runs(plan, split):
        assert len(runs) < len(members) == runs[0].offsets
        first = runs[0].first
        assert first.segments * first.length * runs[0].offsets * split <= n * h
        for x in layouts(b, n, h, 3).values():
            for run in runs:
                view = launches.views((x,), (run.rows_geometry(x.shape, x.stride()),))[0]
                for o, i in enumerate(members):
                    rows = plan.blocks[i].rows(x)[:, :, :, run.index]
                    assert torch.equal(view[:, :, :, o], rows)
                    if rows.numel():
                        assert view[:, :, :, o].data_ptr() == rows.data_ptr()
                flat = run.flat_geometry(x.shape, x.stride())
                if flat is not None:
                    flat_view_ = launches.views((x,), (flat,))[0]
                    assert torch.equal(flat_view_, view.flatten(0, 1))


def test_offset_runs_take_tails_whose_offsets_have_equal_rows():
    """A config's tail (its partial last segment, or the whole sequence where ``w > n``) is one
    more run group where every offset has equally many tail rows, and none where some have
    fewer (issue 5's ``(32768, 16)`` config at 16K tokens: one launch instead of 16)."""

    def groups(n: int, h: int, configs, split: int = 1) -> list[tuple[int, bool]]:
        plan = pattern._build_plan(n, h, configs, "lse", split)
        return [
            (plan.blocks[m[0]].job.config, plan.blocks[m[0]].tail)
            for m, _ in pattern.offset_runs(plan, split)
        ]

    assert groups(12, 4, ((8, 4),)) == [(0, False), (0, True)]  # 1 tail row per offset
    assert groups(10, 4, ((8, 4),)) == [(0, False)]  # offsets 2, 3 have no tail row
    assert groups(4, 4, ((8, 4),)) == [(0, True)]  # w > n: the tail is the whole sequence
    issue5 = ((2048, 1), (4096, 2), (8192, 4), (16384, 8), (32768, 16))
    assert groups(16384, 16, issue5, split=8) == [(3, False), (4, True)]


@pytest.mark.parametrize("computer", ["math", "sdpa"])
@settings(max_examples=15, deadline=None)
@given(
    p=problems(max_n=48), rate=st.integers(2, 6), layout=st.sampled_from(["contiguous", "sliced"])
)
@example(  # a full segment and a tail of one row per offset: two run groups
    p={
        "b": 1,
        "n": 12,
        "h": 4,
        "d": 4,
        "segment_lengths": (4,),
        "dilation_rates": (1,),
        "causal": True,
        "mixing": "lse",
    },
    rate=4,
    layout="sliced",
)
def test_offset_runs_compute_exactly_one_launch_per_block(computer, p, rate, layout):
    """With a config's offsets launched as runs, outputs and gradients are those of one launch per
    block part, and the runs are taken (fewer launches) wherever a plan has them."""
    p = {**p, "mixing": "lse", "segment_lengths": (*p["segment_lengths"], 2 * rate)}
    p["dilation_rates"] = (*p["dilation_rates"], rate)
    q, k, v = make_qkv(p, torch.float32)
    dout = torch.randn_like(q)
    q, k, v, dout = (relayout(x, layout) for x in (q, k, v, dout))
    strategy = ringattn.Strategy(computer=computer)
    results, counts = {}, {}
    for fuse in (True, False):
        # (BLOCK_SPLIT 1: so runs are never too large)
        patches = [(pattern, "BLOCK_SPLIT", 1), (launches, "FUSE_OFFSETS", fuse)]
        attention, results[fuse], counts[fuse] = run_counted(p, strategy, (q, k, v, dout), patches)
    plan = attention._specs[(p["n"], p["h"], p["d"], torch.device("cpu"))].plan
    if not pattern.offset_runs(plan, 1):
        assert counts[True] == counts[False]
    elif p["b"] == 1:  # then every run is one view (b > 1: where the batch dims merge)
        assert counts[True] < counts[False]
    else:
        assert counts[True] <= counts[False]
    for a, c in zip(results[True], results[False]):
        # same to rounding, not to the bit: a kernel's (or bmm's) reduction order may depend on
        # the batch of heads it is handed; a misplaced row would be off by O(1)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def run_with_answers(
    p: dict, computer: str, layout: str, split: int, hook: str, answers: tuple, kind: tuple
) -> tuple[dict, dict, dict]:
    """For each of ``answers`` of the computers' method ``hook`` (the plan cut with ``split``),
    :func:`run_counted`'s results and launch count, and the part count of each block of the
    preparations whose key starts with ``kind`` (``("backward", True)``: the placed backward's),
    each a dict by answer."""
    q, k, v = make_qkv(p, torch.float32)
    dout = torch.randn_like(q)
    q, k, v, dout = (relayout(x, layout) for x in (q, k, v, dout))
    strategy = ringattn.Strategy(computer=computer)
    results, counts, parts = {}, {}, {}
    for answer in answers:
        patches = [(pattern, "BLOCK_SPLIT", split)]
        # (sdpa has its own answer: FA4 or not)
        patches += [(cls, hook, lambda *_, a=answer: a) for cls in (BlockComputer, SDPAComputer)]
        attention, results[answer], counts[answer] = run_counted(
            p, strategy, (q, k, v, dout), patches
        )
        (spec,) = attention._specs.values()
        parts[answer] = [
            len(entries)
            for key, prepared in spec.launches.items()
            if key[: len(kind)] == kind
            for entries in prepared.values()
        ]
    return results, counts, parts


@pytest.mark.parametrize("computer", ["math", "sdpa"])
@settings(max_examples=15, deadline=None)
@given(p=problems(), split=st.integers(2, 8), layout=st.sampled_from(["contiguous", "sliced"]))
@example(
    p={
        "b": 1,
        "n": 32,
        "h": 4,
        "d": 4,
        "segment_lengths": (8, 16),
        "dilation_rates": (1, 2),
        "causal": True,
        "mixing": "head_groups",
    },
    split=8,
    layout="contiguous",
)
def test_whole_blocks_compute_their_parts_in_fewer_launches(computer, p, split, layout):
    """A computer without block-sized temporaries (``places_whole_blocks``) has each placed
    (head_groups) block launched whole in the forward: the same outputs and gradients as the
    launches of its parts, and fewer launches wherever a local block has several parts."""
    p = {**p, "mixing": "head_groups"}
    results, counts, forward_parts = run_with_answers(
        p, computer, layout, split, "places_whole_blocks", (True, False), ("forward",)
    )
    # each prepared forward block is one launch (one per batch entry where its rows over the
    # batch are no one view); where one had several parts and the rest was prepared alike
    # (b == 1: every block's rows are one view), the call made fewer launches
    assert all(count <= p["b"] for count in forward_parts[True])
    if p["b"] == 1 and any(count > 1 for count in forward_parts[False]):
        assert counts[True] < counts[False]
    for a, c in zip(results[True], results[False]):
        # (a kernel's reduction order may depend on the batch it is handed; a misplaced or
        # missing row would be off by O(1))
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("computer", ["math", "sdpa"])
@settings(max_examples=15, deadline=None)
@given(p=problems(), split=st.integers(2, 8), layout=st.sampled_from(["contiguous", "sliced"]))
def test_a_computers_backward_split_launches_larger_parts_of_the_same_gradients(
    computer, p, split, layout
):
    """A computer whose placed backward has fewer temporaries (``placed_backward_split``) has
    its placed blocks' backward launched in the parts that split makes: the same gradients as
    the plan's parts, each prepared block in at most as many launches as that split allows, and
    fewer launches in all wherever the plan cut a prepared block finer."""
    results, counts, parts = run_with_answers(
        p, computer, layout, split, "placed_backward_split", (1, None), ("backward", True)
    )
    assert all(count <= p["b"] for count in parts[1])  # (one per batch entry: see above)
    # (b == 1: with more, a block whose rows are no one view over the batch goes once per entry
    # either way, which may take as many launches as the plan's parts)
    if p["b"] == 1 and len(parts[1]) == len(parts[None]) and any(c > 1 for c in parts[None]):
        assert counts[1] < counts[None]
    for a, c in zip(results[1], results[None]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_fa4s_placed_backward_split_is_the_plans_over_its_merge(monkeypatch):
    """FA4's placed backward (one float32 dQ accumulator) takes parts ``fa4_backward_merge``
    times the plan's; without FA4 (the CPU) or with a merge of 1, the plan's parts."""
    computer, q = SDPAComputer(), torch.empty(1, 8, 2, 4)
    assert computer.placed_backward_split(q) is None  # no FA4 here
    monkeypatch.setattr(SDPAComputer, "_fa4_backward", lambda self, q: True)
    monkeypatch.setattr(pattern, "BLOCK_SPLIT", 8)
    assert computer.placed_backward_split(q) == 4
    for merge, split in ((1, None), (3, 2), (16, 1)):
        monkeypatch.setattr(SDPAComputer, "fa4_backward_merge", merge)
        assert computer.placed_backward_split(q) == split


def test_the_fill_selection_is_derived_once_per_preparation(monkeypatch):
    """The forward's fill selection (which configs' launches zero their own rows) depends on the
    preparation alone: computed at its first call, reused by later ones, anew for new layouts."""
    calls = []
    derive = core.unzeroed_selection
    monkeypatch.setattr(core, "unzeroed_selection", lambda *a: (calls.append(1), derive(*a))[1])
    attention = ringattn.DilatedAttention(
        (8, 16), (1, 2), mixing="head_groups", strategy=ringattn.Strategy(computer="math")
    )
    x = torch.randn(1, 32, 4, 8)
    with torch.no_grad():
        first = attention(x, x, x)
        assert torch.equal(attention(x, x, x), first)
        assert len(calls) == 1
        attention(*(x.transpose(1, 2).contiguous().transpose(1, 2) for _ in range(3)))
    assert len(calls) == 2  # new strides: a new preparation


@pytest.mark.parametrize("h, r", [(6, 3), (8, 4), (12, 4)])
def test_offset_runs_of_several_heads_per_offset_view_their_rows(h, r):
    """Each offset run's view holds its member blocks' rows, head by head (K >= 2 heads per
    offset, with full segments and with a tail)."""
    for n in (4 * r, 4 * r + r + 1):  # full segments, and a tail
        plan = pattern._build_plan(n, h, ((2 * r, r),), "lse", 1)
        groups = pattern.offset_runs(plan, 1)
        assert any(len(runs) >= 2 for _, runs in groups)
        for members, runs in groups:
            for x in layouts(2, n, h, 3).values():
                for run in runs:
                    view = launches.views((x,), (run.rows_geometry(x.shape, x.stride()),))[0]
                    for o, i in enumerate(members):
                        assert torch.equal(
                            view[:, :, :, o], plan.blocks[i].rows(x)[:, :, :, run.index]
                        )


def test_offset_runs_of_several_heads_per_offset_match_oracle():
    """Several heads per offset (r divides h, h / r < r): hypothesis's problems (h <= 5) almost
    never draw one; a run's head stride without its factor r was 0.044 off here."""
    from test_strategies import check_against_oracle

    p = {
        "b": 2,
        "n": 40,
        "h": 8,
        "d": 8,
        "segment_lengths": (8, 16),
        "dilation_rates": (1, 4),
        "causal": True,
        "mixing": "lse",
    }
    check_against_oracle(
        p, torch.float32, [ringattn.Strategy(computer=c) for c in ("sdpa", "math")]
    )


def test_preparations_are_keyed_by_every_part_of_a_layout():
    """A launcher is made for its operands' shapes, strides, dtype and device (a cuDNN graph or
    an FA4 kernel is compiled for them): a preparation reused across any of them would launch
    the wrong kernel."""
    x = torch.randn(2, 8, 4, 16)
    key = launches.layouts_of((x, None))
    assert key == launches.layouts_of((torch.randn(2, 8, 4, 16), None))
    for other in (x.double(), x.to("meta"), x[:, :4], x.transpose(1, 2), x.reshape(4, 4, 4, 16)):
        assert launches.layouts_of((other, None)) != key
    assert launches.layouts_of((x, x)) != key


def _spec_and_tensors():
    """A head_groups module's spec (math computer) and tensors of one layout."""
    attention = ringattn.DilatedAttention(
        (8, 16), (1, 2), mixing="head_groups", strategy=ringattn.Strategy(computer="math")
    )
    q = torch.randn(1, 32, 4, 8)
    with torch.no_grad():
        attention(q, q, q)
    (spec,) = attention._specs.values()
    spec.launches.clear()
    return spec, (q, q, q), (torch.empty_like(q), None)


def _counting_prepare(monkeypatch) -> list:
    made: list = []
    original = launches._prepare
    monkeypatch.setattr(launches, "_prepare", lambda *a: (made.append(a[6]), original(*a))[1])
    return made


def test_preparations_are_keyed_by_split(monkeypatch):
    """The backward prepares one layout's placed blocks twice, in the computer's split and whole
    (split 1, for a grouped launch): served the other's, the grouped launch sees the wrong parts."""
    spec, reads, writes = _spec_and_tensors()
    made = _counting_prepare(monkeypatch)
    ids = range(len(spec.plan.blocks))
    launcher = lambda span, part, *views: lambda *views: None  # noqa: E731
    for split in (None, 1, None, 1):
        launches.prepared(spec, "backward", reads, writes, ids, launcher, True, split=split)
    assert made == [None, 1]


def test_the_bound_drops_the_least_recently_used_preparation(monkeypatch):
    spec, reads, writes = _spec_and_tensors()
    made = _counting_prepare(monkeypatch)
    launcher = lambda span, part, *views: lambda *views: None  # noqa: E731

    def prepare(kind: str) -> None:
        launches.prepared(spec, kind, reads, writes, (0,), launcher, True)

    kinds = [f"kind {i}" for i in range(launches.MAX_PREPARED + 1)]
    for kind in kinds:
        prepare(kind)
    assert len(made) == len(kinds) and len(spec.launches) == launches.MAX_PREPARED
    prepare(kinds[-1])  # the newest is kept
    prepare(kinds[1])  # and the oldest but one
    assert len(made) == len(kinds)
    prepare(kinds[0])  # the oldest was dropped
    assert len(made) == len(kinds) + 1


def test_gather_reads_from_the_tensors_own_offset():
    """The LSE a backward gets may be a view into a larger storage (``lse[1:]``)."""
    base = torch.arange(12.0)
    x = base[5:]
    index = torch.tensor([0, 2, 4, 1])
    assert torch.equal(launches.gather(x, index, 5), x[index])


@pytest.mark.parametrize(
    "dilation, computer, whole",
    [
        ("segment_local", "sdpa", True),  # views, a fused kernel: the block is the accumulator
        ("segment_local", "math", False),  # [B, H, L, L] scores
        ("global", "math", False),
        ("global", "sdpa", False),  # q, k and v's rows gathered: 3 copies of the block
    ],
)
@pytest.mark.parametrize("grad", [False, True])
def test_a_covering_first_block_runs_whole_only_where_that_holds_no_block_sized_temporary(
    dilation, computer, whole, grad
):
    """A first block that covers every row and head (``r = 1`` under ``lse``) ran whole in the
    forward whatever the strategy, its output becoming the accumulator, while every other block
    (and its backward) ran in the plan's parts, which bound each call's temporaries
    (``pattern.BLOCK_SPLIT``). Whole, ``math`` held its ``[B, H, w, w]`` scores for the entire
    sequence (CPU, n = 16K, w = 512..2048: a 416 MiB forward peak for 16 MiB inputs, 8x what the
    parts hold) and ``global`` gathered all of q, k and v (4x the output). Only a computer whose
    kernel tiles (``BlockComputer.whole_covering_forward``) on rows read as views runs it whole;
    the others' forward calls each cover one part's share, with the oracle's results."""
    p = {"n": 64, "h": 4, "d": 8, "segment_lengths": (8, 16), "dilation_rates": (1, 2)}
    split = pattern.BLOCK_SPLIT
    q, k, v = make_qkv({**p, "b": 1}, torch.float32)
    cls = type(ringattn.Strategy(computer=computer).component("computer")())
    covered: list[int] = []
    original = cls.forward

    def spy(self, q, k, v, causal, scale):
        covered.append(q.shape[0] * q.shape[1] * q.shape[2])  # (row, head) pairs of the call
        return original(self, q, k, v, causal, scale)

    strategy = ringattn.Strategy(dilation=dilation, computer=computer)
    attention = ringattn.DilatedAttention(**options(p), strategy=strategy, compile=False)
    xs = [x.clone().requires_grad_(grad) for x in (q, k, v)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, "forward", spy)
        with torch.set_grad_enabled(grad):
            out = attention(*xs)
    whole_block = p["n"] * p["h"]
    assert (max(covered) == whole_block) == whole
    if not whole:
        assert max(covered) <= whole_block // split
    ref_inputs = [x.double().requires_grad_(grad) for x in (q, k, v)]
    expected = ringattn.reference.dilated_attention(*ref_inputs, **options(p))
    assert rel_err(out, expected) < 1e-5
    if grad:  # the parts' merge is differentiated too: the backward sees the merged out / LSE
        dout = torch.randn_like(expected)
        out.backward(dout.float())
        expected.backward(dout)
        for x, ref in zip(xs, ref_inputs):
            assert x.grad is not None and ref.grad is not None
            assert rel_err(x.grad, ref.grad) < 1e-5
