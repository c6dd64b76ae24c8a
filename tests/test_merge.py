"""The LSE merge: online (in place) and functional forms agree, and empty rows give 0, not NaN."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ringattn.merge import merge, merge_into_


@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_online_and_functional_merge_agree(parts, seed):
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(parts)]
    lses = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(parts)]
    for lse in lses:  # some rows empty in some partials, row 0 empty everywhere
        lse[torch.rand(3, 5, generator=gen) < 0.3] = float("-inf")
        lse[0] = float("-inf")
    out_acc = torch.zeros(3, 5, 4, dtype=torch.float64)
    lse_acc = torch.full((3, 5), float("-inf"), dtype=torch.float64)
    for out, lse in zip(outs, lses):
        merge_into_(out_acc, lse_acc, out, lse)
    functional = merge(outs, lses, torch.float64)
    assert torch.allclose(out_acc, functional, atol=1e-12)
    assert torch.equal(out_acc[0], torch.zeros_like(out_acc[0]))
    # against the definition: softmax weights over the partials' masses
    stacked = torch.stack(lses)
    expected = (
        torch.softmax(torch.where(torch.isfinite(stacked), stacked, -1e300), 0).unsqueeze(-1)
        * torch.stack(outs)
    ).sum(0)
    expected[torch.isinf(stacked).all(0)] = 0
    assert torch.allclose(functional, expected, atol=1e-12)


def test_functional_merge_has_finite_gradients_on_empty_rows():
    outs = [torch.randn(2, 3, requires_grad=True) for _ in range(2)]
    lses = [torch.tensor([0.5, float("-inf")], requires_grad=True) for _ in range(2)]
    merged = merge(outs, lses, torch.float32)
    merged.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in outs + lses)
