"""The analytic useful-work count equals the oracle's multiplicity sum."""

from __future__ import annotations

from conftest import dilation_configs
from hypothesis import given
from hypothesis import strategies as st

from ringattn import reference
from ringattn.flops import dense_flops, useful_flops, useful_pairs


@given(
    dilation_configs(),
    st.integers(1, 64),
    st.integers(1, 6),
    st.booleans(),
    st.sampled_from(["lse", "head_groups"]),
)
def test_useful_pairs_is_the_multiplicity_sum(configs, n, h, causal, mixing):
    m = reference.multiplicity(n, h, *configs, causal=causal, mixing=mixing)
    assert useful_pairs(n, h, *configs, causal, mixing) == int(m.sum())


def test_one_full_config_costs_what_dense_attention_costs():
    for causal in (False, True):
        assert useful_flops(2, 64, 4, 8, [64], [1], causal, "lse") == dense_flops(
            2, 64, 4, 8, causal
        )
        assert useful_flops(2, 64, 4, 8, [64], [1], causal, "lse", backward=True) == dense_flops(
            2, 64, 4, 8, causal, backward=True
        )
