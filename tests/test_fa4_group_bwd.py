"""``head_groups``' backward in one FA4 launch (``ringattn.kernels.fa4_group_bwd``), without a
GPU: the core's wiring on the FA4 stand-in (``tests/fake_fa4.py``), and the module's rules.

A stand-in for ``fa4_group_bwd.backward_group_`` checks what the core hands it (two or more
groups of one length; each unit's LSE positions, ``index``, pointing at exactly that unit's rows
of the LSE, in unit order) and writes every group's gradients with FA4's (stand-in's) backward;
the results must match the oracle whether it runs or declines, and a stand-in that skips a
group must fail it.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import deterministic_algorithms, make_qkv, options, problems, rel_err
from hypothesis import example, given
from hypothesis import strategies as st
from test_fa4 import KERNEL_DIMS, full_configs, kernel_layouts, sdpa_strategies, with_fixture
from test_fa4_group import GROUPED, GroupStandIn, fake_fa4, grouping  # noqa: F401  (fixtures)
from test_fa4_zero import ZEROED, zeroing  # noqa: F401  (the fixture grouping uses)
from test_strategies import check_against_oracle

import ringattn
import ringattn.core
from ringattn import reference
from ringattn.kernels import fa4, fa4_group, fa4_group_bwd, fa4_merge, unselected


class BackwardStandIn:
    """``fa4_group_bwd.backward_group_`` on the CPU (declines every ``decline``-th call; skips
    the last group if ``lazy``, the unselected rows' zeros if ``zeroless``)."""

    def __init__(self, decline: int = 0, lazy: bool = False, zeroless: bool = False) -> None:
        self.calls = self.done = 0
        self.decline, self.lazy, self.zeroless = decline, lazy, zeroless
        self.shifts: list = []

    def __call__(
        self, groups, out, dout, lse, index, causal, scale, scratch=None, shifts=()
    ) -> bool:
        self.calls += 1
        self.scratch = scratch
        self.shifts.append(tuple(shifts))
        assert len(groups) >= 2 and len({g[1].shape[1] for g in groups}) == 1
        assert all(type(group) is tuple for group in groups)  # (fa4_group_bwd.Group)
        # the units' LSE positions: each group's [B, L, H] rows as [B, H, L], in group order
        units = torch.cat([g[5].transpose(1, 2).flatten() for g in groups])
        assert torch.equal(lse.flatten()[index.long()], units)
        assert out.is_contiguous() and dout.is_contiguous() and lse.is_contiguous()
        if self.decline and self.calls % self.decline == 0:
            return False
        for dout_g, q, k, v, out_g, lse_g, dq, dk, dv in groups[: -1 if self.lazy else None]:
            for grad, block in zip(
                (dq, dk, dv), fa4.backward(dout_g, q, k, v, out_g, lse_g, causal, scale)
            ):
                grad.copy_(block)
        for group, group_shifts in zip(groups, shifts or [()] * len(groups), strict=True):
            for grad in group[6:] if not self.zeroless else ():
                for shift in group_shifts:
                    unselected.shifted(grad, shift).zero_()
        self.done += 1
        return True


@pytest.fixture
def grouping_bwd(grouping):  # noqa: F811
    patch, selections = grouping
    patch.setattr(fa4_group, "forward_group_", GroupStandIn())
    patch.setattr(
        fa4_group_bwd,
        "supported",
        lambda groups: (
            len(groups) >= 2
            and all(fa4_merge.layout_ok(g[1], g[2], g[3], g[0], None) for g in groups)
        ),
    )
    return patch, selections


def nan_grads(patch) -> None:
    """The core's new gradient buffers full of NaN: a pair no launch or fill zeroes shows."""
    make = ringattn.core.new_grads
    patch.setattr(
        ringattn.core, "new_grads", lambda *a: tuple(x.fill_(float("nan")) for x in make(*a))
    )


@pytest.mark.parametrize(
    ("causal", "decline", "kernel_zeros"),
    [
        (False, 0, "always"),
        (True, 0, "causal"),
        (True, 2, "always"),
        (False, 0, "causal"),
        (True, 0, "never"),
    ],
)
def test_every_config_backward_in_one_launch(grouping_bwd, causal, decline, kernel_zeros):
    # the launch writes its configs' unselected rows' zeros (the fill skips them), or where it
    # declines the core does; where fa4_group_bwd.ZEROING says not, the fill does them all
    patch, _ = grouping_bwd
    stand_in = BackwardStandIn(decline)
    patch.setattr(fa4_group_bwd, "backward_group_", stand_in)
    patch.setattr(fa4_group_bwd, "ZEROING", kernel_zeros)
    nan_grads(patch)
    check_against_oracle({**ZEROED, "causal": causal}, torch.float32, sdpa_strategies())
    assert stand_in.done > 0 and (not decline or stand_in.done < stand_in.calls)
    wrote = kernel_zeros == "always" or (kernel_zeros == "causal" and causal)
    assert fa4_group_bwd.zeroing(causal) == wrote
    assert any(any(shifts) for call in stand_in.shifts for shifts in call) == wrote


def test_zeroing_takes_only_its_three_choices(monkeypatch):
    monkeypatch.setattr(fa4_group_bwd, "ZEROING", True)  # (the bool it was before step 35)
    with pytest.raises(ValueError, match="ZEROING must be one of"):
        fa4_group_bwd.zeroing(True)


@pytest.mark.parametrize("fault", ["lazy", "zeroless"])
def test_a_backward_that_skips_a_group_or_its_zeros_fails_the_oracle(grouping_bwd, fault):
    patch, _ = grouping_bwd
    patch.setattr(fa4_group_bwd, "backward_group_", BackwardStandIn(**{fault: True}))
    nan_grads(patch)
    with pytest.raises(AssertionError, match="rel err"):
        check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())


@with_fixture(max_examples=10)
@given(
    problems(dims=KERNEL_DIMS, mixings=("head_groups",), shared_rows=True),
    st.sampled_from([0, 2]),
)
@example(p={**GROUPED, "b": 1}, decline=0)
def test_any_problem_matches_oracle_backward_grouped_or_not(grouping_bwd, p, decline):
    """Tails, other lengths: whatever the launch leaves, the fill zeroes (NaN shows a miss).
    Configs that select the same rows per segment, two or more with a full segment, are offered
    one launch, unless a batch of two or more ends them in a tail (b > 1: a full part's rows
    over the batch are then no one view, and are launched per entry, not whole)."""
    stand_in = BackwardStandIn(decline)
    grouping_bwd[0].setattr(fa4_group_bwd, "backward_group_", stand_in)
    grouping_bwd[0].setattr(fa4_group_bwd, "ZEROING", "always")
    nan_grads(grouping_bwd[0])
    check_against_oracle(p, torch.float32, sdpa_strategies())
    full = full_configs(p)
    if (
        kernel_layouts(p)
        and len(full) >= 2
        and (p["b"] == 1 or all(p["n"] % w == 0 for w, _ in full))
    ):
        assert stand_in.calls > 0


def run_backward(p: dict, strategy: ringattn.Strategy, calls: int) -> None:
    q, k, v = (torch.randn(p["b"], p["n"], p["h"], p["d"], requires_grad=True) for _ in range(3))
    for _ in range(calls):
        out = ringattn.dilated_attention(
            q,
            k,
            v,
            segment_lengths=p["segment_lengths"],
            dilation_rates=p["dilation_rates"],
            mixing="head_groups",
            causal=True,
            strategy=strategy,
            compile=False,
        )
        out.sum().backward()


@pytest.mark.parametrize("capturing", [False, True])
def test_the_group_is_made_once_and_left_out_while_a_graph_is_captured(grouping_bwd, capturing):
    # replayed, the one launch was slower than the configs' own (it saves host time only); and
    # its unit index, made while capturing, would hold its values only in the graph's replays
    # (and made in a cudagraph tree's warm-up, be a pool tensor no output holds: step 63)
    patch, _ = grouping_bwd
    stand_in = BackwardStandIn()
    patch.setattr(fa4_group_bwd, "backward_group_", stand_in)
    patch.setattr(ringattn.core, "pool_allocating", lambda x: capturing)
    made = []
    make = ringattn.core.grouped_backward_launch
    patch.setattr(ringattn.core, "grouped_backward_launch", lambda *a: made.append(1) or make(*a))
    strategy = ringattn.Strategy(computer="sdpa", memory="pooled")
    ringattn.functional.clear_functional_modules()
    run_backward(ZEROED, strategy, 3)
    assert (len(made), stand_in.calls) == ((0, 0) if capturing else (1, 3))


def test_deterministic_algorithms_take_each_configs_deterministic_backward(grouping_bwd):
    """The one launch adds dQ atomically and has no deterministic schedule: under
    torch.use_deterministic_algorithms each config takes FA4's deterministic backward. The mode
    is in the prepared launches' key, so the same (functional API's) module offers the launch
    again once the mode is off."""
    patch, _ = grouping_bwd
    stand_in = BackwardStandIn()
    patch.setattr(fa4_group_bwd, "backward_group_", stand_in)
    fake = fa4._kernels.__self__  # (the FA4 stand-in the fixture installed)
    strategy = ringattn.Strategy(computer="sdpa", memory="pooled")
    ringattn.functional.clear_functional_modules()
    with deterministic_algorithms(True):
        check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())
        run_backward(ZEROED, strategy, 2)
    assert stand_in.calls == 0 and fake.calls > 0 and fake.deterministic is True
    run_backward(ZEROED, strategy, 1)
    assert stand_in.calls == stand_in.done == 1


def test_the_workspaces_come_from_the_memory_manager(grouping_bwd):
    patch, _ = grouping_bwd
    stand_in = BackwardStandIn()
    patch.setattr(fa4_group_bwd, "backward_group_", stand_in)
    ringattn.functional.clear_functional_modules()
    run_backward(ZEROED, ringattn.Strategy(computer="sdpa", memory="pooled"), 1)
    assert stand_in.done == 1
    patch.setattr(
        fa4_group_bwd, "_config", lambda d, causal: types.SimpleNamespace(m_block_size=64)
    )
    groups = [tuple(torch.zeros(2, 40, h, 8) for _ in range(9)) for h in (1, 3)]
    first = fa4_group_bwd.workspaces(groups, True, stand_in.scratch)
    again = fa4_group_bwd.workspaces(groups, True, stand_in.scratch)
    # 2 * 1 + 2 * 3 units, 40 rows up to 64, float32; pooled: the same buffers again
    assert [x.shape for x in first] == [(8, 1, 64), (8, 1, 64), (8, 1, 64 * 8)]
    assert all(x.dtype == torch.float32 for x in first)
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert len({x.data_ptr() for x in first}) == 3
    fresh = fa4_group_bwd.workspaces(groups, True)
    assert [x.shape for x in fresh] == [x.shape for x in first]


def test_support_rules(monkeypatch):
    monkeypatch.setattr(fa4, "sm90", lambda q: True)

    def groups_of(*shapes):
        return [tuple(torch.zeros(shape) for _ in range(9)) for shape in shapes]

    # 2 segments of 1 head and 2 of 3 heads, 200 rows (2 tiles of 128) each: 16 tiles
    groups = groups_of((2, 200, 1, 64), (2, 200, 3, 64))
    assert fa4_group_bwd.supported(groups)
    assert not fa4_group_bwd.supported(groups[:1])
    assert not fa4_group_bwd.supported(groups_of((2, 200, 1, 64), (2, 100, 3, 64)))
    assert not fa4_group_bwd.supported(groups_of((2, 200, 1, 64), (2, 200, 3, 128)))
    assert fa4_group_bwd.supported(groups_of((2, 200, 1, 128), (2, 200, 3, 128)))
    # its gradients were wrong at 32 on an H200 (experiments/gpu_fuzz.py)
    assert not fa4_group_bwd.supported(groups_of((2, 200, 1, 32), (2, 200, 3, 32)))
    monkeypatch.setattr(fa4_group_bwd, "ALL_TILES_MAX", 16)
    assert fa4_group_bwd.supported(groups)
    monkeypatch.setattr(fa4_group_bwd, "ALL_TILES_MAX", 15)
    assert not fa4_group_bwd.supported(groups)
    monkeypatch.undo()
    assert not fa4_group_bwd.supported(groups)  # off an SM90 GPU, never


def backward_groups(causal: bool = False, fill: float = float("nan")):
    """Two groups of [2, 16, H, 8] blocks (H = 1, 3): (dout, q, k, v, out, lse, dq, dk, dv),
    out and lse from the stand-in's forward, the gradients ``fill`` (NaN): the even rows of [2,
    32, H, 8] buffers (their odd rows, :data:`SHIFTS` away, are the unselected ones)."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for h in (1, 3):
        dout, q, k, v = (torch.randn(2, 16, h, 8, generator=gen) for _ in range(4))
        out, lse = fa4.forward(q, k, v, causal, 0.5)
        grads = [torch.full((2, 32, h, 8), fill)[:, 0::2] for _ in range(3)]
        groups.append((dout, q, k, v, out, lse, *grads))
    return groups


SHIFTS = ((8,), (24,))  # one row of each group's buffers (h * d elements)


@pytest.fixture
def guarded_bwd(fake_fa4, monkeypatch):  # noqa: F811
    """fa4_group_bwd with the FA4 stand-in, no Triton statistics and FA4's tile size faked: its
    first-call guard, held to the stand-in's per-group backward."""
    monkeypatch.setattr(fa4_group_bwd, "_COMPILED", {})
    monkeypatch.setattr(fa4_group_bwd, "unit_stats_", lambda *args: None)
    monkeypatch.setattr(
        fa4_group_bwd, "_config", lambda d, causal: types.SimpleNamespace(m_block_size=16)
    )
    return monkeypatch


def fake_kernels(groups, fault: str | None, calls: list):
    """``_compile``'s (backward, postprocess) pair computing the stand-in's gradients and the
    unselected rows' zeros (dq twice its value under ``fault == "wrong"``, 1.01 times under
    ``"slightly wrong"``, the last group's dv NaN under ``"nan"``, no zeros under
    ``"zeroless"``, none in dq under ``"zeroless dq"``), or raising (``"raises"``)."""

    def compile_(key, groups_seen, stats):
        if fault == "raises":
            raise RuntimeError("DSL says no")

        def backward(qs, ks, vs, douts, lse_log2, dpsum, dq_accum, dks, dvs, dqs, scale):
            calls.append(key)
            for views, slot in (
                (douts, 0),
                (qs, 1),
                (ks, 2),
                (vs, 3),
                (dqs, 6),
                (dks, 7),
                (dvs, 8),
            ):
                assert all(x is g[slot] for x, g in zip(views, groups, strict=True))
            for (dout, q, k, v, out, lse, dq, dk, dv), shifts in zip(groups, key[4], strict=True):
                want = fa4.backward(dout, q, k, v, out, lse, key[2], scale)
                for grad, value in zip((dq, dk, dv), want, strict=True):
                    grad.copy_(value)
                    skips = fault == "zeroless" or (fault == "zeroless dq" and grad is dq)
                    for shift in shifts if not skips else ():
                        unselected.shifted(grad, shift).zero_()
                if fault in ("wrong", "slightly wrong"):
                    dq.mul_(2 if fault == "wrong" else 1.01)
            if fault == "nan":  # the last group's dV only, after finite dQ and dK errors
                groups[-1][8].fill_(float("nan"))

        return backward, lambda dq_accum, dqs, scale: None

    return compile_


# ("nan": a running max() of the errors dropped it and kept the kernel; "zeroless dq": with
# gradient buffers of 0, as fresh ones are, only the poisoned rows show the missing zeros)
@pytest.mark.parametrize(
    ("fault", "causal"),
    [
        (None, False),
        (None, True),
        ("raises", False),
        ("wrong", False),
        ("slightly wrong", False),
        ("nan", False),
        ("zeroless", False),
        ("zeroless dq", True),
    ],
)
def test_first_call_keeps_or_refuses_the_grouped_backward(guarded_bwd, fault, causal):
    groups = backward_groups(causal, fill=0.0 if fault == "zeroless dq" else float("nan"))
    calls = []
    guarded_bwd.setattr(fa4_group_bwd, "_compile", fake_kernels(groups, fault, calls))
    out, dout, lse = torch.zeros(1), torch.zeros(1), torch.zeros(1)  # (read by unit_stats only)
    index = torch.zeros(1, dtype=torch.int32)
    key = fa4_group_bwd._key(groups, causal, SHIFTS)
    args = (groups, out, dout, lse, index, causal, 0.5, None, SHIFTS)
    if fault is None:
        assert fa4_group_bwd.backward_group_(*args)
        assert fa4_group_bwd._COMPILED[key] is not False
        assert fa4_group_bwd.backward_group_(*args)
        assert len(calls) == 2
        for group, shifts in zip(groups, SHIFTS, strict=True):
            for grad in group[6:]:
                assert torch.equal(unselected.shifted(grad, shifts[0]), torch.zeros_like(grad))
        return
    with pytest.warns(RuntimeWarning, match="backward over several configs in one launch"):
        assert not fa4_group_bwd.backward_group_(*args)
    assert fa4_group_bwd._COMPILED[key] is False
    why = {
        "raises": "DSL says no",
        "wrong": "gradients off by",
        "slightly wrong": "gradients off by 0.01",
        "nan": "gradients off by nan",
        "zeroless": "not zeroed",
        "zeroless dq": "not zeroed",
    }[fault]
    assert why in fa4_group_bwd.last_refusal
    assert not fa4_group_bwd.backward_group_(*args)
    assert len(calls) == (0 if fault == "raises" else 1)  # never again


def test_grouper_makes_the_views_after_the_statistics_and_without_out_and_lse(guarded_bwd):
    # once the kernels are kept, a call launches the statistics before the host makes the
    # groups' views (the GPU starts on them meanwhile), and makes none of out and lse
    groups = backward_groups()
    calls, events = [], []
    guarded_bwd.setattr(fa4_group_bwd, "_compile", fake_kernels(groups, None, calls))
    guarded_bwd.setattr(fa4_group_bwd, "unit_stats_", lambda *args: events.append("stats"))

    def groups_of(full: bool) -> list:
        events.append("full views" if full else "views")
        return groups if full else [(*g[:4], None, None, *g[6:]) for g in groups]

    out, dout, lse = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    index = torch.zeros(1, dtype=torch.int32)
    call = fa4_group_bwd.grouper(groups, False)
    for _ in range(3):
        assert call(groups_of, out, dout, lse, index, 0.5)
    assert events == ["full views", "stats", "stats", "views", "stats", "views"]
    assert len(calls) == 3
    guarded_bwd.setattr(fa4_group_bwd, "ENABLED", False)
    assert not call(groups_of, out, dout, lse, index, 0.5)
    assert not fa4_group_bwd.backward_group_(groups, out, dout, lse, index, False, 0.5)
    assert len(events) == 6 and len(calls) == 3


def test_the_launches_get_the_statistics_in_order_and_a_zeroed_accumulator(guarded_bwd):
    """The statistics kernel reads out and dout and writes dPsum and LSE * log2(e), which the
    backward reads by position; the dQ accumulator (scratch: whatever its last user left) is
    zeroed before every backward adds into it; a kept grouper's workspaces are the first
    call's shapes."""
    groups = backward_groups()
    calls, stats_calls, shapes = [], [], []
    compile_ = fake_kernels(groups, None, calls)

    def unit_stats(out, dout, lse, index, length, dpsum, lse_log2):
        stats_calls.append((out, dout, lse, index, length))
        dpsum.fill_(1.0)
        lse_log2.fill_(2.0)

    def checked(key, groups_seen, stats):
        backward, postprocess = compile_(key, groups_seen, stats)

        def run(qs, ks, vs, douts, lse_log2, dpsum, dq_accum, *rest):
            assert (lse_log2 == 2).all() and (dpsum == 1).all() and (dq_accum == 0).all()
            backward(qs, ks, vs, douts, lse_log2, dpsum, dq_accum, *rest)

        return run, postprocess

    def scratch(tag, shape):  # left full of NaN by its last user
        shapes.append(shape)
        return torch.full(shape, float("nan"))

    guarded_bwd.setattr(fa4_group_bwd, "unit_stats_", unit_stats)
    guarded_bwd.setattr(fa4_group_bwd, "_compile", checked)
    out, dout, lse = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    index = torch.zeros(1, dtype=torch.int32)
    call = fa4_group_bwd.grouper(groups, False, scratch)
    for _ in range(2):
        assert call(lambda full: groups, out, dout, lse, index, 0.5)
    assert len(calls) == 2 and len(stats_calls) == 2
    for got in stats_calls:
        assert got[0] is out and got[1] is dout and got[2] is lse and got[3] is index
        assert got[4] == 16
    # 2 * 1 + 2 * 3 units, 16 rows (FA4's tile faked to 16), head dim 8, both calls
    assert shapes == [(8, 1, 16), (8, 1, 16), (8, 1, 128)] * 2


def unit_stats_args(**change) -> dict:
    """A valid call of ``unit_stats_`` (2 units of 3 rows, rounded to 4), one argument changed."""
    args = {
        "out": torch.zeros(1, 6, 2, 8, dtype=torch.bfloat16),
        "dout": torch.zeros(1, 6, 2, 8, dtype=torch.bfloat16),
        "lse": torch.zeros(1, 6, 2),
        "index": torch.zeros(6, dtype=torch.int32),
        "length": 3,
        "dpsum": torch.zeros(2, 4),
        "lse_log2": torch.zeros(2, 4),
    }
    return {**args, **change}


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"dout": torch.zeros(1, 6, 2, 4, dtype=torch.bfloat16)}, "one contiguous"),
        ({"out": torch.zeros(1, 2, 6, 8, dtype=torch.bfloat16).transpose(1, 2)}, "contiguous"),
        ({"lse": torch.zeros(1, 6, 2, dtype=torch.bfloat16)}, "float32"),
        ({"lse": torch.zeros(1, 6, 3)}, "lse must be"),
        ({"dpsum": torch.zeros(2, 5)}, "dpsum and lse_log2"),
        ({"lse_log2": torch.zeros(4, 2).t()}, "dpsum and lse_log2"),
        ({"length": 5}, "length <= R"),
        ({"index": torch.zeros(5, dtype=torch.int32)}, "index positions"),
        ({"index": torch.zeros(6, dtype=torch.int64)}, "int32"),
        ({"dpsum": torch.zeros(2, 4, device="meta")}, "one device"),
        # the positions too: on another device than the rows, the kernel read them as offsets
        # into memory of the wrong device (checked without the index, it was launched)
        ({"index": torch.zeros(6, dtype=torch.int32, device="meta")}, "one device"),
        # each rule on its own (a case that breaks two passes with either check)
        (
            {
                "out": torch.zeros(6, 2, 8, dtype=torch.bfloat16),
                "dout": torch.zeros(6, 2, 8, dtype=torch.bfloat16),
                "lse": torch.zeros(6, 2),
            },
            "out and dout must be",
        ),
        ({"dout": torch.zeros(1, 2, 6, 8, dtype=torch.bfloat16).transpose(1, 2)}, "contiguous"),
        ({"lse": torch.zeros(1, 2, 6).transpose(1, 2)}, "lse must be a contiguous"),
        ({"dpsum": torch.zeros(2, 4, 1), "lse_log2": torch.zeros(2, 4, 1)}, "dpsum and lse"),
        ({"dpsum": torch.zeros(2, 4, dtype=torch.bfloat16)}, "dpsum and lse_log2"),
        ({"dpsum": torch.zeros(4, 2).t()}, "dpsum and lse_log2"),
        ({"length": 5, "index": torch.zeros(10, dtype=torch.int32)}, "length <= R"),
    ],
)
def test_unit_stats_refuses_operands_it_would_read_past(change, rule):
    """The statistics kernel addresses raw offsets: a wrong layout, dtype or count read past a
    tensor silently. It was guarded by asserts (gone under ``python -O``); now a ValueError,
    before the launch, names the rule."""
    from ringattn.kernels import unit_stats

    # (the valid call runs the kernel: tests/kernel_cases.py, under the Triton interpreter)
    with pytest.raises(ValueError, match=rule):
        unit_stats.unit_stats_(**unit_stats_args(**change))


def test_support_rules_each_view_on_its_own(monkeypatch):
    """Each view the kernel addresses by pointer and stride is checked on its own: keys, output
    gradients or a dtype other than the first group's, or a strided row of an input or a
    gradient, and the groups go config by config."""
    monkeypatch.setattr(fa4, "sm90", lambda q: True)
    shapes = ((2, 200, 1, 64), (2, 200, 3, 64))
    groups = [tuple(torch.zeros(shape) for _ in range(9)) for shape in shapes]
    assert fa4_group_bwd.supported(groups)

    def with_view(slot: int, view) -> bool:  # group 1 with one view replaced
        changed = list(groups[1])
        changed[slot] = view
        return fa4_group_bwd.supported([groups[0], tuple(changed)])

    strided = torch.zeros(2, 200, 3, 128)[..., ::2]  # group 1's shape, rows of stride 2
    for slot in (0, 1, 2, 3, 6, 7, 8):  # dout, q, k, v, dq, dk, dv
        assert not with_view(slot, torch.zeros(2, 100, 3, 64)), slot
        assert not with_view(slot, strided), slot
    assert not fa4_group_bwd.supported([groups[0], tuple(x.bfloat16() for x in groups[1])])


def test_key_holds_causality_heads_and_the_causal_tiles(fake_fa4, monkeypatch):  # noqa: F811
    groups = backward_groups()
    key = fa4_group_bwd._key(groups, True, SHIFTS)
    assert key[:5] == (torch.float32, 8, True, (1, 3), SHIFTS)
    assert fa4_group_bwd._key(groups, False)[2:5] == (False, (1, 3), ((), ()))
    config = tuple(range(11))  # (BwdConfig's fields: any 11 values do for the key)
    monkeypatch.setitem(fa4.BACKWARD_CONFIG, (8, True), config)
    assert fa4_group_bwd._key(groups, True)[5] == config
    assert fa4_group_bwd._key(groups, False)[5] is None


def test_zeroing_flipped_on_a_live_module_takes_effect(grouping_bwd):
    """``ZEROING`` is read when a backward's one launch is made (whether it writes its
    configs' zeros); in ``SDPAComputer.launch_options``, a change on a module that already ran
    takes effect on its next call, which then leaves every zero to the fill."""
    patch, _ = grouping_bwd
    stand_in = BackwardStandIn()
    patch.setattr(fa4_group_bwd, "backward_group_", stand_in)
    nan_grads(patch)
    p = {**ZEROED, "causal": True}
    strategy = ringattn.Strategy(computer="sdpa")
    attention = ringattn.DilatedAttention(**options(p), strategy=strategy, compile=False)
    q, k, v = make_qkv(p, requires_grad=True)
    ref = reference.dilated_attention(q.double(), k.double(), v.double(), **options(p))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for zeroing_ in ("causal", "never"):
        patch.setattr(fa4_group_bwd, "ZEROING", zeroing_)
        grads = torch.autograd.grad(attention(q, k, v).sum(), (q, k, v))
        assert any(stand_in.shifts[-1]) == (zeroing_ == "causal")
        for grad, want in zip(grads, ref_grads, strict=True):
            assert rel_err(grad, want) < 1e-5
    assert stand_in.done == 2
