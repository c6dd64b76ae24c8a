"""docs/other_implementations.md held by tests: two other LongNet implementations, each
re-expressed here in plain float64 torch from that page's reading of its source (no upstream
code: these functions follow the documented semantics, loop by loop), against the oracle and the
default strategy where the page says they coincide, and apart from them where it says they
differ, by what it says."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st

import ringattn
from ringattn import reference

# torchscale marks a config's unselected rows (and its rows whose LSE is exactly 0) with this LSE
UNSELECTED = -1e8


def torchscale_offset(h: int, r: int, hd: int) -> int:
    """torchscale's offset of head ``hd`` at rate ``r``: ``r`` contiguous blocks of ``ceil(h/r)``
    heads (the heads padded to a multiple of ``r``), block ``g`` at offset ``g``."""
    return hd // -(-h // r)


def torchscale_dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=False):
    """What microsoft/torchscale's ``DilatedAttention.forward`` computes from its projected
    ``q, k, v`` (here ``[b, n, h, d]``), one process, no incremental state, attention dropout 0
    (``torchscale/component/dilated_attention.py`` at 11e745ec5f7a36c5f6deb3467d29e99befa50e0c,
    with ``multihead_attention.py`` and ``flash_attention.py`` of that commit), as
    docs/other_implementations.md states it:

    * config ``(w, r)`` cuts the sequence into segments of ``L = min(w, n)``, zero-padded at the
      end to a multiple of ``L``, each segment to a multiple of ``r``;
    * head ``hd`` takes the rows ``start + off + j*r`` of every segment, ``off`` from
      :func:`torchscale_offset`; queries, keys and values alike, padded rows included;
    * softmax attention with scale ``1/sqrt(d)`` over them (causal: by position, which puts every
      padded row after every real one, so a real query never sees one; non-causal: each padded
      row is a key of score 0 and value 0);
    * configs merged by softmax weights of their LSEs, with no gradient through the weights; a
      row a config does not select, or whose LSE is exactly 0, counts as LSE ``-1e8``.
    """
    b, n, h, d = q.shape
    q, k, v = (x.double() for x in (q, k, v))
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        seg = min(w, n)
        assert seg % r == 0 or seg == n, "r must divide w (or w >= n): not analysed otherwise"
        span = -(-seg // r) * r  # the segment padded to a multiple of r
        out = torch.zeros_like(q)
        lse = torch.full((b, n, h), UNSELECTED, dtype=torch.float64)
        for hd in range(h):
            off = torchscale_offset(h, r, hd)
            for start in range(0, n, seg):
                rows = list(range(start + off, start + span, r))
                real = [p for p in rows if p < n]
                if not real:
                    continue
                pads = 0 if causal else len(rows) - len(real)
                idx = torch.tensor(real)
                s = torch.einsum("bmd,bjd->bmj", q[:, idx, hd], k[:, idx, hd]) / math.sqrt(d)
                if causal:
                    s = s.masked_fill(idx[None, :] > idx[:, None], -math.inf)
                s = torch.cat([s, s.new_zeros(b, len(real), pads)], -1)  # the zero keys
                probs = torch.softmax(s, -1)[..., : len(real)]  # (their values are 0)
                out[:, idx, hd] = torch.einsum("bmj,bjd->bmd", probs, v[:, idx, hd])
                lse[:, idx, hd] = torch.logsumexp(s, -1)
        outs.append(out)
        lses.append(torch.where(lse == 0, UNSELECTED, lse))
    weights = torch.softmax(torch.stack(lses), 0).detach()
    return (weights[..., None] * torch.stack(outs)).sum(0)


def fkodom_dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=False):
    """What fkodom/dilated-attention-pytorch's ``DilatedAttention.forward`` computes
    (``dilated_attention_pytorch/dilated_attention.py`` at
    3101cbeaf85f46837251a8c6f8c81f1905a4c6b6), as docs/other_implementations.md states it:

    * ``n`` must be a multiple of every segment length (upstream, an einops error);
    * config ``i`` of ``k``: group size ``g_i = h // k + (i < h % k)``, heads
      ``[i*g_i, (i+1)*g_i)`` (overlapping, some heads in no config, when ``k`` does not divide
      ``h``), rows ``start + (i mod r_i) + j*r_i`` of each segment;
    * softmax attention, scale ``1/sqrt(d)`` (its ``softmax_scale`` is never used), causal by
      position;
    * each config's output divided, per batch element, head and channel, by its sum over the
      whole sequence; the configs' results summed and divided by ``k``.
    """
    _b, n, h, d = q.shape
    num = len(segment_lengths)
    if any(n % w for w in segment_lengths):
        raise ValueError("n must be a multiple of every segment length")
    q, k, v = (x.double() for x in (q, k, v))
    out = torch.zeros_like(q)
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        g = h // num + (i < h % num)
        for hd in range(i * g, min((i + 1) * g, h)):
            x = torch.zeros_like(q[:, :, hd])  # [b, n, d]
            for start in range(0, n, w):
                idx = torch.arange(start + i % r, start + w, r)
                s = torch.einsum("bmd,bjd->bmj", q[:, idx, hd], k[:, idx, hd]) / math.sqrt(d)
                if causal:
                    s = s.masked_fill(idx[None, :] > idx[:, None], -math.inf)
                x[:, idx] = torch.einsum("bmj,bjd->bmd", torch.softmax(s, -1), v[:, idx, hd])
            out[:, :, hd] += x / x.sum(1, keepdim=True)  # rows it does not select stay 0
    return out / num


def qkv(b, n, h, d, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
        for _ in range(3)
    )


def ours(q, k, v, segment_lengths, dilation_rates, causal, mixing):
    """ringattn's oracle and its default strategy (eager), which must agree with each other."""
    opts = {
        "segment_lengths": segment_lengths,
        "dilation_rates": dilation_rates,
        "causal": causal,
        "mixing": mixing,
    }
    ref = reference.dilated_attention(q, k, v, **opts)
    fast = ringattn.dilated_attention(q, k, v, compile=False, **opts)
    assert rel_err(fast, ref) <= 1e-10
    return ref, fast


def drawn(p):
    """A drawn problem's inputs and options: q, k, v, segment lengths, rates, causal."""
    q, k, v = qkv(p["b"], p["n"], p["h"], p["d"])
    return q, k, v, p["segment_lengths"], p["dilation_rates"], p["causal"]


def pads_nothing(n, segment_lengths, dilation_rates):
    """torchscale pads no segment: ``w | n`` where ``w <= n``, ``r | n`` where ``w > n``."""
    return all(n % (w if w <= n else r) == 0 for w, r in zip(segment_lengths, dilation_rates))


# ---------------------------------------------------------------------------------------------
# torchscale


def test_torchscale_offsets_are_ours_exactly_where_each_rate_is_1_or_at_least_h():
    for h in range(1, 13):
        for r in range(1, 13):
            same = all(torchscale_offset(h, r, hd) == hd % r for hd in range(h))
            assert same == (r == 1 or r >= h), (h, r)
    # h = 5, r = 4: blocks of 2 heads take offsets 0, 1, 2; residue 3 is selected by no head
    assert [torchscale_offset(5, 4, hd) for hd in range(5)] == [0, 0, 1, 1, 2]


@st.composite
def torchscale_coinciding(draw, max_n=24):
    """Configs where docs/other_implementations.md says torchscale computes ``mixing="lse"``:
    every rate 1 or >= h; causal with any n, or non-causal with no padding."""
    h = draw(st.integers(1, 4))
    rate = st.sampled_from([1, *range(max(h, 2), 5)])
    rates = draw(st.lists(rate, min_size=1, max_size=3))
    lengths = tuple(r * draw(st.integers(1, 3)) for r in rates)
    causal = draw(st.booleans())
    ns = [n for n in range(1, max_n + 1) if causal or pads_nothing(n, lengths, rates)]
    ns.append(math.lcm(*lengths))  # pads nothing: never empty
    return {
        "b": draw(st.integers(1, 2)),
        "n": draw(st.sampled_from(ns)),
        "h": h,
        "d": draw(st.sampled_from([1, 4])),
        "segment_lengths": lengths,
        "dilation_rates": tuple(rates),
        "causal": causal,
    }


@given(torchscale_coinciding())
def test_torchscale_is_lse_mixing_where_the_docs_say_it_coincides(p):
    q, k, v, lengths, rates, causal = drawn(p)
    theirs = torchscale_dilated_attention(q, k, v, lengths, rates, causal)
    for out in ours(q, k, v, lengths, rates, causal, "lse"):
        assert rel_err(theirs, out) <= 1e-12


@given(
    st.integers(1, 3),  # c = h / r heads a block
    st.integers(2, 3),  # r, the one rate other than 1
    st.integers(1, 2),  # rows of a segment at rate r
    st.booleans(),
)
def test_torchscale_offsets_are_ours_on_reordered_heads_with_one_rate_dividing_h(
    c, r, rows, causal
):
    """The page's recipe: one config of rate r | h (others rate 1): torchscale's head ``hd`` is
    our head ``(hd mod c)·r + hd // c``, ``c = h / r``."""
    h, lengths, rates = c * r, (4, r * rows), (1, r)
    n = math.lcm(*lengths)
    perm = [(hd % c) * r + hd // c for hd in range(h)]
    q, k, v = qkv(1, n, h, 4)
    theirs = torchscale_dilated_attention(q, k, v, lengths, rates, causal)
    inverse = torch.argsort(torch.tensor(perm))
    q2, k2, v2 = (x[:, :, inverse] for x in (q, k, v))  # our head perm[hd] holds their hd
    for out in ours(q2, k2, v2, lengths, rates, causal, "lse"):
        assert rel_err(theirs, out[:, :, perm]) <= 1e-12


@given(
    st.lists(
        st.sampled_from([(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 4)]), min_size=1, max_size=3
    ),
    st.integers(1, 12),
    st.integers(1, 2),
)
def test_torchscale_non_causal_tail_is_ours_on_zero_padded_inputs(configs, n, h):
    """Non-causal with padding: zero keys enter torchscale's softmax (ours has none, so the two
    differ there), and the page's recipe reproduces them: segment lengths ``w' = w`` where
    ``w <= n``, ``r·ceil(n/r)`` where ``w > n``; q, k, v zero-padded to a multiple ``N >= n`` of
    every ``w'``; the first ``n`` rows of the output. (h <= 2 <= every rate > 1: offsets agree.)"""
    lengths, rates = zip(*configs)
    q, k, v = qkv(2, n, h, 4)
    theirs = torchscale_dilated_attention(q, k, v, lengths, rates, causal=False)
    fitted = tuple(w if w <= n else r * -(-n // r) for w, r in zip(lengths, rates))
    big = math.lcm(*fitted) * -(-n // math.lcm(*fitted))
    padded = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, big - n)) for x in (q, k, v))
    for out in ours(*padded, fitted, rates, False, "lse"):
        assert rel_err(theirs, out[:, :n]) <= 1e-12
    plain = reference.dilated_attention(
        q, k, v, segment_lengths=lengths, dilation_rates=rates, mixing="lse"
    )
    if pads_nothing(n, lengths, rates):  # (padding reaches no key of a real row at times)
        assert rel_err(theirs, plain) <= 1e-12


def test_torchscale_differs_where_the_docs_say():
    q, k, v = qkv(1, 16, 4, 4)
    ref = ours(q, k, v, (4, 8), (1, 2), False, "lse")[0]
    # offsets: h = 4 > r = 2, blocks (0, 0, 1, 1) against our (0, 1, 0, 1); heads 0 and 3 agree
    theirs = torchscale_dilated_attention(q, k, v, (4, 8), (1, 2))
    assert rel_err(theirs[:, :, [0, 3]], ref[:, :, [0, 3]]) <= 1e-12
    assert rel_err(theirs[:, :, [1, 2]], ref[:, :, [1, 2]]) > 1e-2
    # h = 5, r = 4: positions of residue 3 mod 4 selected by no head, so with r = 4 alone their
    # rows are exactly 0 (ours: head 3 selects them)
    q5, k5, v5 = qkv(1, 16, 5, 4)
    theirs = torchscale_dilated_attention(q5, k5, v5, (16,), (4,))
    assert theirs[:, 3::4].abs().max() == 0
    assert ours(q5, k5, v5, (16,), (4,), False, "lse")[0][:, 3::4, 3].abs().min() > 0
    # non-causal tail: n = 10, config (8, 2)'s segment [8, 10) padded to [8, 16): 3 zero keys
    # for each of its rows; causal, none is seen
    q, k, v = qkv(1, 10, 2, 4)
    for causal in (False, True):
        theirs = torchscale_dilated_attention(q, k, v, (4, 8), (1, 2), causal)
        ref = ours(q, k, v, (4, 8), (1, 2), causal, "lse")[0]
        assert rel_err(theirs[:, :8], ref[:, :8]) <= 1e-12
        assert (rel_err(theirs[:, 8:], ref[:, 8:]) <= 1e-12) == causal


def test_torchscale_weights_take_no_gradient():
    """The same forward, other gradients once two configs reach a row; one config: the same."""
    q, k, v = qkv(1, 8, 2, 4, requires_grad=True)  # h = 2 = r: offsets agree
    for configs, same in ((((8,), (2,)), True), (((4, 8), (1, 2)), False)):
        theirs = torchscale_dilated_attention(q, k, v, *configs)
        ref = reference.dilated_attention(
            q, k, v, segment_lengths=configs[0], dilation_rates=configs[1]
        )
        assert rel_err(theirs, ref) <= 1e-12
        g_theirs = torch.autograd.grad(theirs.square().sum(), (q, k, v))
        g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        errs = [rel_err(a, b) for a, b in zip(g_theirs, g_ref)]
        # dV the same (the weights depend on q and k alone); dQ and dK not, with two configs
        assert errs[2] <= 1e-12
        assert (max(errs) <= 1e-12) if same else (min(errs[:2]) > 1e-3), (configs, errs)


def test_torchscale_drops_a_config_whose_lse_is_exactly_0():
    """A zero query row at the start of a config-0 segment: config 0's LSE is log 1 = 0, which
    torchscale takes for "not selected"; the row is config 1's output alone (ours: 1/4 and 3/4)."""
    q, k, v = qkv(1, 8, 1, 4)
    q[:, 4] = 0  # causal: row 4 sees itself in (4, 1); itself, 0 and 2 in (8, 2) at offset 0
    theirs = torchscale_dilated_attention(q, k, v, (4, 8), (1, 2), causal=True)
    ref = ours(q, k, v, (4, 8), (1, 2), True, "lse")[0]
    mean = v[:, [0, 2, 4], 0].mean(1)
    assert rel_err(theirs[:, 4, 0], mean) <= 1e-12
    assert rel_err(ref[:, 4, 0], (v[:, 4, 0] + 3 * mean) / 4) <= 1e-12
    assert rel_err(theirs[:, :4], ref[:, :4]) <= 1e-12  # rows before it: no difference


# ---------------------------------------------------------------------------------------------
# fkodom/dilated-attention-pytorch


@st.composite
def fkodom_coinciding(draw):
    """Where the page says fkodom's output is ours (head_groups) renormalized: k | h, w | n."""
    rates = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    lengths = tuple(r * draw(st.integers(1, 3)) for r in rates)
    return {
        "b": draw(st.integers(1, 2)),
        "n": math.lcm(*lengths) * draw(st.integers(1, 2)),
        "h": len(rates) * draw(st.integers(1, 2)),
        "d": draw(st.sampled_from([1, 4])),
        "segment_lengths": lengths,
        "dilation_rates": tuple(rates),
        "causal": draw(st.booleans()),
    }


@given(fkodom_coinciding())
def test_fkodom_is_head_groups_divided_by_k_and_its_sum_over_the_sequence(p):
    q, k, v, lengths, rates, causal = drawn(p)
    theirs = fkodom_dilated_attention(q, k, v, lengths, rates, causal)
    for out in ours(q, k, v, lengths, rates, causal, "head_groups"):
        recipe = out / (len(rates) * out.sum(1, keepdim=True))
        assert rel_err(theirs, recipe) <= 1e-10
        # every (batch, head, channel) of theirs sums to 1/k over the sequence; ours does not
        assert torch.allclose(theirs.sum(1), torch.full_like(theirs.sum(1), 1 / len(rates)))
        assert rel_err(theirs, out) > 1e-2


def test_fkodom_heads_overlap_when_k_does_not_divide_h():
    """h = 3, k = 2: groups of 2 and 1 at heads [0, 2) and [1, 2): head 1 in both configs, head 2
    in none (exactly 0); ours: heads 0-1 take config 0, head 2 config 1 (at offset 1)."""
    lengths, rates = (4, 8), (1, 2)
    q, k, v = qkv(1, 8, 3, 4)
    theirs = fkodom_dilated_attention(q, k, v, lengths, rates)
    ref = ours(q, k, v, lengths, rates, False, "head_groups")[0]
    assert theirs[:, :, 2].abs().max() == 0
    assert ref[:, 1::2, 2].abs().min() > 0
    # each config alone, every head: (4, 1) at offset 0; (8, 2) at offset hd mod 2 (head 1: 1)
    c0, c1 = (
        reference.dilated_attention(q, k, v, segment_lengths=(w,), dilation_rates=(r,))
        for w, r in zip(lengths, rates)
    )
    c0, c1 = (c / c.sum(1, keepdim=True) for c in (c0, c1))
    assert rel_err(theirs[:, :, 0], c0[:, :, 0] / 2) <= 1e-12
    assert rel_err(theirs[:, :, 1], (c0[:, :, 1] + c1[:, :, 1]) / 2) <= 1e-12


# ---------------------------------------------------------------------------------------------
# the page's recipes, run as written


def doc_recipes():
    """docs/other_implementations.md's two code blocks, executed: their functions."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "other_implementations.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(block, scope)
    return scope["torchscale_forward"], scope["fkodom_forward"]


@given(
    st.lists(st.sampled_from([(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 4)]), max_size=3),
    st.integers(1, 12),
    st.integers(1, 2),
    st.booleans(),
)
def test_the_pages_recipes_reproduce_both(configs, n, h, causal):
    torchscale_forward, fkodom_forward = doc_recipes()
    configs = configs or [(4, 2)]
    lengths, rates = zip(*configs)  # h <= 2 <= every rate > 1: torchscale's offsets are ours
    with pytest.MonkeyPatch.context() as patch:  # the recipes' ringattn calls, eager
        eager = functools.partial(ringattn.dilated_attention, compile=False)
        patch.setattr(ringattn, "dilated_attention", eager)
        q, k, v = qkv(2, n, h, 4)
        want = torchscale_dilated_attention(q, k, v, lengths, rates, causal)
        assert rel_err(torchscale_forward(q, k, v, lengths, rates, causal), want) <= 1e-12
        q, k, v = qkv(1, math.lcm(*lengths), len(rates) * h, 4)  # k | h, w | n
        want = fkodom_dilated_attention(q, k, v, lengths, rates, causal)
        assert rel_err(fkodom_forward(q, k, v, lengths, rates, causal), want) <= 1e-10
