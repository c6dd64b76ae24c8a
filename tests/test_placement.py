"""Placed blocks: results that are not merged are written into views of the core's tensors.

``head_groups`` blocks and the parts of a block that covers every row and head go through
``BlockComputer.forward_into`` / ``backward_into`` with views of the output / gradients, so a
computer whose kernels take output strides (sdpa with the cuDNN frontend) writes them in place.
These tests hold the core to passing *views*: a copy there would lose the result silently for a
computer that writes in place (the oracle tests catch it for the default, which copies).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn import pattern
from ringattn.computers.base import accumulation_dtype
from ringattn.computers.math import MathComputer
from ringattn.core import flat_view


@given(
    b=st.integers(1, 3),
    n=st.integers(1, 64),
    h=st.integers(1, 4),
    configs=st.sampled_from([((4, 1),), ((4, 1), (8, 2)), ((8, 2), (16, 4)), ((2, 1), (32, 4))]),
    mixing=st.sampled_from(["lse", "head_groups"]),
    split=st.sampled_from([1, 4, 8]),
)
@settings(max_examples=60, deadline=None)
def test_flat_view_is_a_view_of_exactly_the_block_rows_or_none(b, n, h, configs, mixing, split):
    default, pattern.BLOCK_SPLIT = pattern.BLOCK_SPLIT, split
    try:
        plan = pattern.make_plan(n, h, configs, mixing)
    finally:
        pattern.BLOCK_SPLIT = default
    for parts in plan.parts:
        for part in parts:
            x = torch.zeros(b, n, h, 3)
            rows = part.rows(x)
            flat = flat_view(rows)
            if flat is None:  # only where merging b and the segments cannot be a view
                assert b > 1 and part.segments > 1
                assert rows.stride(0) != rows.shape[1] * rows.stride(1)
                continue
            assert flat.shape == (b * part.segments, *rows.shape[2:])
            flat.copy_(torch.arange(1, flat.numel() + 1, dtype=x.dtype).view(flat.shape))
            # the writes landed in x, on the block's rows and nowhere else
            assert torch.equal(rows.flatten(0, 1), flat)
            assert int((x != 0).sum()) == flat.numel()


@pytest.mark.parametrize("mixing", ["head_groups", "lse"])
def test_placed_blocks_write_into_the_output_and_gradients(monkeypatch, mixing):
    p = {"b": 1, "n": 64, "h": 4, "d": 8}
    q, k, v = make_qkv(p, torch.float32, requires_grad=True)
    seen: dict[str, set[int]] = {"out": set(), "dq": set(), "dk": set(), "dv": set()}
    forward_into, backward_into = MathComputer.forward_into, MathComputer.backward_into

    def spy_forward_into(self, q, k, v, causal, scale, out, lse):
        seen["out"].add(out.untyped_storage().data_ptr())
        forward_into(self, q, k, v, causal, scale, out, lse)

    def spy_backward_into(self, dout, q, k, v, out, lse, causal, scale, grads):
        for name, grad in zip(("dq", "dk", "dv"), grads):
            seen[name].add(grad.untyped_storage().data_ptr())
        backward_into(self, dout, q, k, v, out, lse, causal, scale, grads)

    monkeypatch.setattr(MathComputer, "forward_into", spy_forward_into)
    monkeypatch.setattr(MathComputer, "backward_into", spy_backward_into)
    attention = ringattn.DilatedAttention(
        (16, 32, 64),
        (1, 2, 4),
        mixing=mixing,
        strategy=ringattn.Strategy(computer="math"),
        compile=False,
    )
    out = attention(q, k, v)
    out.sum().backward()
    # every placed block of the backward wrote into the gradient's own storage (head_groups:
    # the three are views of one zero-started buffer), and the three are distinct
    for name, x in zip(("dq", "dk", "dv"), (q, k, v)):
        assert seen[name] == {x.grad.untyped_storage().data_ptr()}, seen
    assert len({x.grad.data_ptr() for x in (q, k, v)}) == 3
    if mixing == "head_groups":  # lse merges its forward blocks, head_groups places them
        assert seen["out"] == {out.untyped_storage().data_ptr()}
    else:
        assert not seen["out"]


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64],
    ids=["bf16", "fp16", "fp32", "fp64"],
)
def test_default_placement_writes_forward_and_backward_into_views(dtype):
    """``BlockComputer.forward_into`` / ``backward_into`` (the defaults) place exactly what
    ``forward`` / ``backward`` return into strided views, and nothing around them; the LSE is in
    :func:`accumulation_dtype` (float32, float64 for float64 inputs: bf16 statistics would
    cost the merge its precision, float32 ones the float64 path its own)."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert accumulation_dtype(dtype) == want
    computer, scale = MathComputer(), 0.3
    p = {"b": 2, "n": 6, "h": 3, "d": 4}
    b, n, h, d = p.values()
    q, k, v = make_qkv(p, dtype)
    dout = make_qkv(p, dtype, seed=1)[0]
    out, lse = computer.forward(q, k, v, True, scale)
    assert lse.shape == (b, n, h) and lse.dtype == want
    out_full = torch.zeros(b, 2 * n, h, d, dtype=dtype)  # placed on every other row
    lse_full = torch.zeros(b, n, h, 2, dtype=want)
    computer.forward_into(q, k, v, True, scale, out_full[:, ::2], lse_full[..., 1])
    assert torch.equal(out_full[:, ::2], out.to(dtype)) and not out_full[:, 1::2].any()
    assert torch.equal(lse_full[..., 1], lse) and not lse_full[..., 0].any()
    grads = computer.backward(dout, q, k, v, out.to(dtype), lse, True, scale)
    grads_full = torch.zeros(3, b, n, h, 2 * d, dtype=dtype)
    computer.backward_into(
        dout, q, k, v, out.to(dtype), lse, True, scale, tuple(grads_full[..., d:])
    )
    for placed, grad in zip(grads_full, grads, strict=True):
        assert torch.equal(placed[..., d:], grad.to(dtype)) and not placed[..., :d].any()
