"""The oracle against itself and against first principles."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import edge_examples, make_qkv, options, problems, rel_err
from hypothesis import example, given
from hypothesis import strategies as st

from ringattn import reference


@given(problems())
@edge_examples
def test_two_oracles_agree(p):
    q, k, v = make_qkv(p, torch.float64)
    loop = reference.dilated_attention(q, k, v, **options(p))
    by_multiplicity = reference.dilated_attention_by_multiplicity(q, k, v, **options(p))
    assert rel_err(loop, by_multiplicity) < 1e-12 or (loop - by_multiplicity).abs().max() < 1e-12


@given(problems())
@edge_examples
def test_two_oracles_agree_on_gradients(p):
    q, k, v = make_qkv(p, torch.float64, requires_grad=True)
    grads = []
    for fn in (reference.dilated_attention, reference.dilated_attention_by_multiplicity):
        out = fn(q, k, v, **options(p))
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-10


@given(st.integers(1, 24), st.integers(1, 4), st.booleans(), st.sampled_from([None, 0.3, 1.7]))
def test_one_full_config_is_plain_attention(n, h, causal, scale):
    """Pinned by torch's SDPA, scale too: the oracle and the library both take it from
    DilatedConfig.scale_for, so comparing them could not see it ignored."""
    p = {"b": 2, "n": n, "h": h, "d": 8}
    q, k, v = make_qkv(p, torch.float64)
    out = reference.dilated_attention(
        q, k, v, segment_lengths=[n], dilation_rates=[1], causal=causal, scale=scale
    )
    dense = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal, scale=scale
    ).transpose(1, 2)
    assert (out - dense).abs().max() < 1e-12


def test_unselected_rows_are_exactly_zero():
    # h=1 with rate 2 in every config: odd rows are selected by nothing
    p = {"b": 1, "n": 16, "h": 1, "d": 4}
    q, k, v = make_qkv(p, torch.float64)
    out = reference.dilated_attention(q, k, v, segment_lengths=[4, 8], dilation_rates=[2, 2])
    assert torch.equal(out[:, 1::2], torch.zeros_like(out[:, 1::2]))
    assert out[:, 0::2].abs().min() > 0


def test_head_groups_uses_one_config_per_head():
    h, configs = 5, ((4, 1), (8, 2))
    # h mod k = 1: group 0 has heads 0..2, group 1 has heads 3..4
    offsets = [
        [reference.head_config_offset(h, configs, "head_groups", hd, i) for i in range(2)]
        for hd in range(h)
    ]
    assert offsets == [[0, None]] * 3 + [[None, 1]] * 2
    # docs/semantics.md's example, h=7 over 3 configs: heads 0-2 | 3-4 | 5-6 (only the first
    # group takes the extra head; h=5 over 2 could not tell "g < extra" from "g <= extra")
    configs3 = ((4, 1), (8, 2), (16, 4))
    groups = [
        [
            i
            for i in range(3)
            if reference.head_config_offset(7, configs3, "head_groups", hd, i) is not None
        ]
        for hd in range(7)
    ]
    assert groups == [[0]] * 3 + [[1]] * 2 + [[2]] * 2


def test_selection_matches_predicate():
    sel = reference.selection(12, 3, [6, 12], [2, 3], "lse")
    for i, (w, r) in enumerate([(6, 2), (12, 3)]):
        for hd in range(3):
            for pos in range(12):
                assert sel[i, hd, pos] == ((((pos % w) - hd % r) % r) == 0)


def test_multiplicity_counts_configs():
    # two identical configs: every visible pair is seen twice
    m = reference.multiplicity(8, 1, [4, 4], [1, 1])
    assert set(m.unique().tolist()) == {0, 2}
    assert m[0, 0, 3] == 2 and m[0, 0, 4] == 0
    assert torch.equal(reference.multiplicity(8, 1, [4], [1], causal=True).triu(1), 0 * m[:1])


def test_multiplicity_refuses_a_causal_that_is_not_a_bool():
    """A string ``"False"`` is truthy: it masked the pairs causally, unasked."""
    with pytest.raises(TypeError, match="causal must be a bool"):
        reference.multiplicity(8, 1, [4], [1], causal="False")  # type: ignore[arg-type]


def test_segment_longer_than_n_is_one_partial_segment():
    p = {"b": 1, "n": 5, "h": 1, "d": 4}
    q, k, v = make_qkv(p, torch.float64)
    out = reference.dilated_attention(q, k, v, segment_lengths=[64], dilation_rates=[1])
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (out - dense).abs().max() < 1e-12


def test_lse_merge_weights_by_config_mass():
    # with two identical configs, "lse" mixing must equal a single config (weights 1/2 each)
    p = {"b": 1, "n": 12, "h": 2, "d": 4}
    q, k, v = make_qkv(p, torch.float64)
    twice = reference.dilated_attention(q, k, v, segment_lengths=[4, 4], dilation_rates=[2, 2])
    once = reference.dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[2])
    assert (twice - once).abs().max() < 1e-12  # (a NaN fails it too)


@pytest.mark.parametrize(
    "fn", [reference.dilated_attention, reference.dilated_attention_by_multiplicity]
)
def test_oracles_return_float64(fn):
    p = {"b": 1, "n": 8, "h": 2, "d": 4}
    q, k, v = make_qkv(p, torch.float32)
    assert fn(q, k, v, segment_lengths=[4], dilation_rates=[2]).dtype == torch.float64


_Q = torch.randn(1, 8, 2, 4)


@pytest.mark.parametrize(
    "fn", [reference.dilated_attention, reference.dilated_attention_by_multiplicity]
)
@pytest.mark.parametrize(
    "q, kv, error, match",
    [
        (_Q, torch.randn(1, 16, 2, 4), ValueError, "k must be"),  # was: extra keys ignored
        (_Q, torch.randn(1, 4, 2, 4), ValueError, "k must be"),  # was: an IndexError
        (_Q, torch.randn(2, 8, 2, 4), ValueError, "k must be"),
        (_Q.long(), _Q.long(), TypeError, "q must be a floating"),  # was: accepted
        (_Q[:, :0], _Q[:, :0], ValueError, "q must have no empty dim"),  # was: accepted
        (_Q[0], _Q[0], TypeError, r"q must be a floating \[b, n, h, d\]"),
    ],
)
def test_the_oracles_refuse_bad_inputs(fn, q, kv, error, match):
    with pytest.raises(error, match=match):
        fn(q, kv, kv, segment_lengths=(4,), dilation_rates=(1,))


@pytest.mark.parametrize(
    "fn", [reference.dilated_attention, reference.dilated_attention_by_multiplicity]
)
def test_the_oracles_refuse_k_and_v_of_other_kv_heads(fn):
    """k and v each of a valid [b, n, h_kv, d] shape but not the same h_kv: named, not an
    einsum error after each was repeated to its own head count."""
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"k and v must have the same shape, got \(1, 8, 1, 4\)"):
        fn(q, q[:, :, :1], q[:, :, :2], segment_lengths=(4,), dilation_rates=(1,))


def test_the_worked_examples_multiplicity_is_the_oracles():
    """docs/semantics.md's worked example (n=12, h=2, configs (4, 1) and (8, 2), "lse"), read
    from the page: its matrices were derived by hand from the definition, so they pin the
    oracle independently of the selection code both oracles share."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "semantics.md").read_text()
    block = text.split('Multiplicity `m(p, p\')` for `"lse"`')[1].split("```")[1]
    rows = re.findall(r"query\s+\d+\s+([.\d]{12})", block)
    assert len(rows) == 48  # two heads, 12 queries, non-causal then causal
    for causal, part in ((False, rows[:24]), (True, rows[24:])):
        drawn = torch.tensor([[0 if c == "." else int(c) for c in row] for row in part])
        drawn = drawn.view(12, 2, 12).transpose(0, 1)  # (each line: head 0's row, head 1's)
        want = reference.multiplicity(12, 2, (4, 8), (1, 2), causal, "lse")
        assert torch.equal(drawn, want), causal


@pytest.mark.parametrize("scale", [1.0, 1e16])
def test_a_config_listed_twice_is_the_config_once_at_any_logit_scale(scale):
    """Two identical configs give every row two equal partials: the merge weighs each by 1/2.
    Weights taken as ``exp(LSE_i - LSE)`` without dividing by their sum are 1 each once
    ``ulp(|LSE|)`` exceeds ``log 2`` (logits near 1e16): the row came out doubled."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    opts = {"causal": True, "scale": scale}
    once = reference.dilated_attention(q, k, v, segment_lengths=(6,), dilation_rates=(1,), **opts)
    twice = reference.dilated_attention(
        q, k, v, segment_lengths=(6, 6), dilation_rates=(1, 1), **opts
    )
    assert rel_err(twice, once) <= 1e-12


def brute_force(q, k, v, segment_lengths, dilation_rates, causal=False, mixing="lse", scale=None):
    """docs/semantics.md read literally, one (head, query) at a time in plain Python: the keys
    every config lets the query see, a key seen by two configs listed twice, then one softmax.
    It shares no code with reference.py (not head_config_offset, selection or multiplicity,
    which both oracles share), so a mistake there cannot cancel out. Returns (output, LSE)."""
    b, n, h, d = q.shape
    h_kv, num = k.shape[2], len(segment_lengths)
    scale = 1 / math.sqrt(d) if scale is None else scale
    # head_groups: num contiguous groups, the first h mod num one head larger (some may be empty)
    group = [g for g in range(num) for _ in range(h // num + (g < h % num))]
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    lse = torch.full((b, n, h), -math.inf, dtype=torch.float64)
    for hd, p in itertools.product(range(h), range(n)):
        keys = []
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            if mixing == "head_groups" and group[hd] != i:
                continue
            off = hd % r if mixing == "lse" else i % r
            seen = [j for j in range(n) if j // w == p // w and ((j % w) - off) % r == 0]
            if p in seen:
                keys += [j for j in seen if j <= p or not causal]
        if keys:  # else the row is selected by no config: exactly 0
            kv = hd // (h // h_kv)  # grouped-query attention: K/V head of query head hd
            s = scale * (k[:, keys, kv].double() @ q[:, p, hd].double()[..., None])[..., 0]
            lse[:, p, hd] = torch.logsumexp(s, -1)
            out[:, p, hd] = (torch.softmax(s, -1)[:, None] @ v[:, keys, kv].double())[:, 0]
    return out, lse


@st.composite
def small_problems(draw):
    """problems() kept small for the brute force, with h_kv K/V heads (h_kv | h)."""
    p = draw(problems(max_n=20))
    p["h_kv"] = draw(st.sampled_from([x for x in range(1, p["h"] + 1) if p["h"] % x == 0]))
    return p


def _case(n, h, h_kv, lengths, rates, causal, mixing, scale=None):
    return {
        "b": 1,
        "n": n,
        "h": h,
        "h_kv": h_kv,
        "d": 4,
        "segment_lengths": lengths,
        "dilation_rates": rates,
        "causal": causal,
        "mixing": mixing,
        "scale": scale,
    }


@given(small_problems())
# docs/semantics.md's "head_groups with h < k": h=2, k=3 leaves config 2 unused (an oracle that
# gave an empty group a head passed every other test of this file)
@example(_case(13, 2, 2, (4, 6, 16), (1, 2, 4), False, "head_groups"))
@example(_case(11, 5, 5, (3, 4, 8), (1, 2, 4), True, "head_groups"))  # 5 heads over 3: 2 | 2 | 1
@example(_case(12, 4, 2, (4, 8), (2, 4), True, "lse", 0.3))  # grouped-query, h < r_1
def test_both_oracles_are_the_brute_force_definition(p):
    """The oracles' outputs and the merged LSE against brute_force. The returned LSE feeds the
    strategy tests' gradient-error model, and nothing else checked it: an LSE taken as the max of
    the configs' LSE_i, or as config 0's alone, passed."""
    q, k, v = make_qkv(p, torch.float64)
    k, v = k[:, :, : p["h_kv"]], v[:, :, : p["h_kv"]]
    want, want_lse = brute_force(q, k, v, **options(p))
    out, lse = reference.dilated_attention_and_lse(q, k, v, **options(p))
    by_multiplicity = reference.dilated_attention_by_multiplicity(q, k, v, **options(p))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_multiplicity, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)  # (-inf rows must match too)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_reach_exactly_the_rows_the_page_says(name, bad):
    """docs/semantics.md, "Non-finite inputs", one bad element at a time at every (position,
    head). The page said NaN or ±inf made NaN exactly the rows attending to it, and nothing
    checked it: an infinite value row gives ±inf, a key whose score is -inf is ignored (unless it
    is all a row sees in a config), and under causal a value row also reaches the earlier rows
    of its dilated segment (found checking the page against the oracle). h = 2 with rates 2 and
    4: odd rows of head 0 are selected by no config (a NaN query there stays 0)."""
    n, h, lengths, rates = 12, 2, (4, 8), (2, 4)
    gen = torch.Generator().manual_seed(0)
    x = {c: torch.randn(1, n, h, 4, generator=gen, dtype=torch.float64) for c in "qkv"}
    m = reference.multiplicity(n, h, lengths, rates, causal=True)
    # a value row reaches the rows that see it or would without causal: 0 * NaN is NaN
    m_v = reference.multiplicity(n, h, lengths, rates, causal=False)
    # an infinite key with score -inf still makes NaN a row that sees nothing else in a config
    each = [reference.multiplicity(n, h, [w], [r], causal=True) for w, r in zip(lengths, rates)]
    alone = torch.stack([(mi > 0) & (mi.sum(-1, keepdim=True) == 1) for mi in each]).any(0)
    for j, hd in itertools.product(range(n), range(h)):
        xs = {c: t.clone() for c, t in x.items()}
        xs[name][0, j, hd, 1] = bad
        out = reference.dilated_attention(
            *xs.values(), segment_lengths=lengths, dilation_rates=rates, causal=True
        )[0]
        want = torch.zeros(n, h, dtype=torch.bool)
        if name == "q":
            want[j, hd] = bool(m[hd, j].any())  # (a row no config selects stays 0)
        else:
            want[:, hd] = (m_v if name == "v" else m)[hd, :, j] > 0
            if name == "k" and not math.isnan(bad):  # score sign(q[p, hd, 1] * bad) * inf
                want[:, hd] &= (x["q"][0, :, hd, 1] * bad > 0) | alone[hd, :, j]
        if name == "v" and not math.isnan(bad):
            assert torch.equal(~out.isfinite().all(-1), want), (j, hd)
        else:
            assert torch.equal(out.isnan().any(-1), want), (j, hd)
            assert out[~want].isfinite().all(), (j, hd)


@pytest.mark.parametrize(
    "fn", [reference.dilated_attention, reference.dilated_attention_by_multiplicity]
)
def test_the_oracles_run_under_vmap(fn):
    """``torch.func.vmap`` over the oracles (the refusal of torch.func inputs names them as the
    way out): the loop's outputs. ``dilated_attention`` wrote into buffers made with
    ``torch.zeros``, which vmap refused as unbatched."""
    from torch.func import vmap

    opts = {"segment_lengths": (2, 4), "dilation_rates": (1, 2), "causal": True}
    q, k, v = (torch.randn(3, 1, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    batched = vmap(lambda a, b, c: fn(a, b, c, **opts))(q, k, v)
    looped = torch.stack([fn(q[i], k[i], v[i], **opts) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-14)


def _split_over_heads(q, k, v, tp, **opts):
    """Each of ``tp`` tensor-parallel ranks' call on its own contiguous heads, put back."""
    heads = q.shape[2] // tp
    shares = [slice(t * heads, (t + 1) * heads) for t in range(tp)]
    parts = [
        reference.dilated_attention(q[:, :, s], k[:, :, s], v[:, :, s], **opts) for s in shares
    ]
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize(
    "mixing, lengths, rates, same",
    [  # docs/semantics.md's "Heads split across ranks", H = 16 over tp = 4 (h' = 4)
        ("lse", (8, 16, 32), (1, 2, 4), True),  # h' a multiple of every rate
        ("lse", (8, 32), (1, 8), False),  # rank 1's heads take offsets 0-3, not 4-7
        ("head_groups", (8, 16, 32, 32), (1, 2, 4, 4), False),  # k > 1
        ("head_groups", (16,), (2,), True),  # one config: offset 0 for every head
    ],
)
def test_heads_split_across_ranks_as_the_page_says(mixing, lengths, rates, same):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 16, 4, dtype=torch.float64) for _ in range(3))
    opts = {"segment_lengths": lengths, "dilation_rates": rates, "mixing": mixing}
    whole = reference.dilated_attention(q, k, v, **opts)
    assert torch.allclose(_split_over_heads(q, k, v, 4, **opts), whole) == same


@given(
    rates=st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3),
    tp=st.integers(2, 3),
    multiple=st.integers(1, 2),
    causal=st.booleans(),
)
def test_lse_heads_split_in_multiples_of_every_rate_are_the_whole_layer(
    rates, tp, multiple, causal
):
    """The page's rule, its "if" half, drawn: h' a multiple of every r_i gives every rank the
    whole layer's offsets."""
    heads = math.lcm(*rates) * multiple
    lengths = [4 * r for r in rates]
    q, k, v = (torch.randn(1, 16, heads * tp, 2, dtype=torch.float64) for _ in range(3))
    opts = {"segment_lengths": lengths, "dilation_rates": rates, "causal": causal}
    whole = reference.dilated_attention(q, k, v, **opts)
    torch.testing.assert_close(_split_over_heads(q, k, v, tp, **opts), whole, rtol=0, atol=1e-12)
