"""``head_groups``' backward in one FA4 launch (``ringattn.kernels.fa4_group_bwd``, work in
progress), without a GPU: the core's wiring on the FA4 stand-in (``tests/fake_fa4.py``).

A stand-in for ``fa4_group_bwd.backward_group_`` checks what the core hands it (two or more
groups of one length; each unit's LSE positions, ``index``, pointing at exactly that unit's rows
of the LSE, in unit order) and writes every group's gradients with FA4's (stand-in's) backward;
the results must match the oracle whether it runs or declines, and a stand-in that skips a
group must fail it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import problems
from hypothesis import given
from hypothesis import strategies as st
from test_fa4 import sdpa_strategies, with_fixture
from test_fa4_group import GroupStandIn, grouping  # noqa: F401  (the fixture)
from test_fa4_zero import ZEROED, zeroing  # noqa: F401  (the fixture grouping uses)
from test_strategies import check_against_oracle

from ringattn.kernels import fa4, fa4_group, fa4_group_bwd, fa4_merge


class BackwardStandIn:
    """``fa4_group_bwd.backward_group_`` on the CPU (declines every ``decline``-th call; skips
    the last group if ``lazy``)."""

    def __init__(self, decline: int = 0, lazy: bool = False) -> None:
        self.calls = self.done = 0
        self.decline, self.lazy = decline, lazy

    def __call__(self, groups, out, dout, lse, index, causal, scale) -> bool:
        self.calls += 1
        assert len(groups) >= 2 and len({g[1].shape[1] for g in groups}) == 1
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


@pytest.mark.parametrize(("causal", "decline"), [(False, 0), (True, 0), (True, 2)])
def test_every_config_backward_in_one_launch(grouping_bwd, causal, decline):
    patch, _ = grouping_bwd
    stand_in = BackwardStandIn(decline)
    patch.setattr(fa4_group_bwd, "backward_group_", stand_in)
    check_against_oracle({**ZEROED, "causal": causal}, torch.float32, sdpa_strategies())
    assert stand_in.done > 0 and (not decline or stand_in.done < stand_in.calls)


def test_a_backward_that_skips_a_group_fails_the_oracle(grouping_bwd):
    patch, _ = grouping_bwd
    patch.setattr(fa4_group_bwd, "backward_group_", BackwardStandIn(lazy=True))
    with pytest.raises(AssertionError, match="rel err"):
        check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())


@with_fixture(max_examples=10)
@given(problems(), st.sampled_from([0, 2]))
def test_any_problem_matches_oracle_backward_grouped_or_not(grouping_bwd, p, decline):
    grouping_bwd[0].setattr(fa4_group_bwd, "backward_group_", BackwardStandIn(decline))
    check_against_oracle(p, torch.float32, sdpa_strategies())
