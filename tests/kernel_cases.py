"""Run by tests/test_kernels.py in a subprocess with ``TRITON_INTERPRET=1``: the Triton kernels on
CPU tensors — the merge against the functional merge (an independent formula) on the strided row
views of real plans, the unselected-pairs fill against its definition — and both through the
core against the oracle. Prints ``ok <cases>`` and ``ringattn <its file>``, or raises."""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from ringattn.kernels import merge as merge_kernel
from ringattn.kernels import unselected
from ringattn.merge import merge
from ringattn.pattern import make_plan

assert os.environ.get("TRITON_INTERPRET") == "1"
assert merge_kernel.available(torch.empty(0)), "triton kernel not available under the interpreter"
# ... and only CPU ones: a tensor elsewhere (no CUDA here) is not the interpreter's to run
assert not merge_kernel.available(torch.empty(0, device="meta")), "a meta tensor is not runnable"


def with_infs(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    holes = torch.rand(x.shape, generator=gen) < p
    return x.masked_fill(holes, float("-inf"))


def main(cases: int) -> None:
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for case in range(cases):
        b = 1 + case % 2
        h = int(torch.randint(1, 6, (), generator=gen))
        d = int(torch.randint(1, 20, (), generator=gen))
        w = int(torch.randint(1, 5, (), generator=gen)) * 4
        r = [1, 2, 4][case % 3]
        n = int(torch.randint(1, 3 * w, (), generator=gen))
        # case // 3: every rate meets every dtype in 9 cases (case % 3 for both tied r to dtype)
        dtype = [torch.float32, torch.bfloat16, torch.float16][case // 3 % 3]
        plan = make_plan(n, h, ((w, r),), "lse")
        for block in plan.blocks:
            out_acc = torch.randn(b, n, h, d, generator=gen).to(dtype)
            lse_acc = with_infs(torch.randn(b, n, h, generator=gen) * 3, gen, 0.3)
            rows, lse_rows = block.rows(out_acc), block.rows(lse_acc)
            # the block's partials: a transposed (non-contiguous) layout, as the kernels return
            part = torch.randn((*rows.shape[:2], rows.shape[3], rows.shape[2], d), generator=gen)
            part = part.to(dtype).transpose(2, 3)
            lse_part = with_infs(torch.randn(lse_rows.shape, generator=gen) * 3, gen, 0.3)

            want = merge([rows.float(), part.float()], [lse_rows, lse_part], torch.float32)
            want_lse = torch.logaddexp(lse_rows, lse_part)
            before_out, before_lse = out_acc.clone(), lse_acc.clone()
            merge_kernel.merge_rows_(rows, lse_rows, part, lse_part)

            # float32 math, one rounding to the accumulator's dtype: within its ulp (2 ** -10
            # relative for fp16, whose bound was bf16's 1e-2, ten of its ulps, before)
            tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2**-9}[dtype]
            torch.testing.assert_close(rows.float(), want, atol=min(tol, 1e-5), rtol=tol)
            torch.testing.assert_close(lse_rows, want_lse, atol=1e-5, rtol=1e-5)
            none = torch.isneginf(want_lse)
            assert (rows[none] == 0).all(), "rows selected by nothing must merge to exactly 0"
            # everything outside the block's rows is untouched
            rows.fill_(0), lse_rows.fill_(0)
            before_out_rows, before_lse_rows = block.rows(before_out), block.rows(before_lse)
            before_out_rows.fill_(0), before_lse_rows.fill_(0)
            assert torch.equal(out_acc, before_out) and torch.equal(lse_acc, before_lse)
            checked += 1
    checked += large_lse_cases()
    # and through the whole core: eager dilated attention now merges with the kernel
    import ringattn
    from ringattn import reference

    calls = []
    original = merge_kernel.merge_rows_
    merge_kernel.merge_rows_ = lambda *a: (calls.append(1), original(*a))[1]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(2, 37, 4, 8, generator=gen).to(dtype) for _ in range(3))
        opts = {"segment_lengths": (8, 16), "dilation_rates": (1, 4), "causal": True}
        out = ringattn.dilated_attention(q, k, v, compile=False, **opts)
        ref = reference.dilated_attention(q, k, v, **opts)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= tol, (dtype, err)
        checked += 1
    assert calls, "the core did not use the kernel"
    # float64 keeps torch's merge (the kernel's arithmetic is float32): to the float64 bound
    calls.clear()
    q, k, v = (torch.randn(2, 37, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = ringattn.dilated_attention(q, k, v, compile=False, **opts)
    ref = reference.dilated_attention(q, k, v, **opts)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-10
    assert not calls, "a float64 merge went to the float32 kernel"
    merge_kernel.merge_rows_ = original
    checked += 1 + merge_into_cases(gen)
    checked += zero_unselected_cases(gen, cases)
    checked += add_rows_cases(gen, cases)
    checked += dpsum_cases(gen, cases)
    checked += unit_stats_cases(gen, cases)
    checked += tracing_cases(gen)
    print("ok", checked)
    print("ringattn", ringattn.__file__)  # (which checkout ran: test_kernels checks it)


def large_lse_cases() -> int:
    """Two partial rows of ones merge to ones at any LSE: weights taken relative to the merged
    (rounded) LSE summed to 1 only within ulp(|LSE|) (LSE 2000: 4e-5 off, 6e4: 2e-3), which
    random LSEs of a few units never show."""
    checked = 0
    for level in (3.0, 2000.0, 6e4, -6e4):
        for gap in (0.0, 0.5, 1.0, 3.0):
            rows, lse_rows = torch.ones(1, 1, 1, 1, 64), torch.full((1, 1, 1, 1), level + gap)
            merge_kernel.merge_rows_(rows, lse_rows, torch.ones(1, 1, 1, 1, 64), lse_rows - gap)
            err = (rows - 1).abs().max().item()
            assert err <= 4e-7, f"merge of ones at LSE {level} (gap {gap}) is {err:.1e} off"
            checked += 1
        # one side empty (LSE -inf: a row no block has reached yet, or a part that does not
        # select it): the other side comes out as it is, its weights taken relative to the
        # larger LSE (relative to the smaller, exp(level) overflows at 2000)
        for empty_first in (True, False):
            acc, part = torch.randn(2, 1, 1, 1, 3, 16, generator=torch.Generator().manual_seed(0))
            lse_acc, lse_part = torch.full((1, 1, 1, 3), level), torch.full((1, 1, 1, 3), level)
            (lse_acc if empty_first else lse_part).fill_(float("-inf"))
            want = (part if empty_first else acc).clone()
            merge_kernel.merge_rows_(acc, lse_acc, part, lse_part)
            assert torch.equal(acc, want), f"merge with an empty side at LSE {level}: {acc}"
            assert (lse_acc == level).all(), (level, lse_acc)
            checked += 1
    return checked


def merge_into_cases(gen: torch.Generator) -> int:
    """:func:`ringattn.merge.merge_into_` takes the kernel only where it computes what torch's
    twin does: operands of other shapes (a computer's result of the wrong shape) are refused as
    torch refuses them, not read past their end; float64 accumulators keep their digits."""
    from ringattn.merge import merge_into_

    checked = 0
    for dims in (4, 5):
        shape = (2, 3, 5, 4, 8)[5 - dims :]
        acc = torch.randn(shape, generator=gen)
        lse_acc = torch.randn(shape[:-1], generator=gen)
        fewer = (*shape[:-3], shape[-3] - 2, *shape[-2:])  # two rows short
        for out, lse in (
            (torch.randn(fewer, generator=gen), torch.randn(shape[:-1], generator=gen)),
            (torch.randn(shape, generator=gen), torch.randn(fewer[:-1], generator=gen)),
        ):
            before = acc.clone(), lse_acc.clone()
            try:
                merge_into_(acc, lse_acc, out, lse)
            except RuntimeError:
                pass
            else:
                raise AssertionError(f"merged a {tuple(out.shape)} result into {shape} rows")
            assert torch.equal(acc, before[0]) and torch.equal(lse_acc, before[1])
            checked += 1
    # a float64 accumulator with float32 LSEs: a part of weight 0 leaves it bit for bit
    acc = torch.randn(1, 2, 3, 2, 8, generator=gen, dtype=torch.float64)
    want = acc.clone()
    lse_acc, lse_part = torch.zeros(1, 2, 3, 2), torch.full((1, 2, 3, 2), float("-inf"))
    merge_into_(acc, lse_acc, torch.randn(acc.shape, generator=gen), lse_part)
    assert torch.equal(acc, want), "a float64 accumulator went through float32"
    # float64 LSEs: the weights and the merged LSE in float64 (the kernel's are float32)
    acc = torch.randn(1, 2, 3, 2, 8, generator=gen)
    lse_acc, lse_part = (torch.randn(1, 2, 3, 2, generator=gen, dtype=torch.float64) for _ in "ab")
    want_lse = torch.logaddexp(lse_acc, lse_part)
    merge_into_(acc, lse_acc, torch.randn(acc.shape, generator=gen), lse_part)
    torch.testing.assert_close(lse_acc, want_lse, rtol=1e-14, atol=1e-14)
    # other ranks than the kernel's [b, S, L, H, d] (or [b, n, h, d]) go to torch: a leading
    # dim of 1 changes nothing
    acc, part = (torch.randn(1, 2, 3, 2, 8, generator=gen) for _ in "ab")
    lse_acc, lse_part = (torch.randn(1, 2, 3, 2, generator=gen) for _ in "ab")
    wide = [x.clone()[None] for x in (acc, lse_acc, part, lse_part)]
    merge_into_(acc, lse_acc, part, lse_part)
    merge_into_(*wide)
    torch.testing.assert_close(wide[0][0], acc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wide[1][0], lse_acc)
    return checked + 3


def dpsum_cases(gen: torch.Generator, cases: int) -> int:
    """The shared row sums ``−rowsum(out∘dout)`` (``ringattn.kernels.dpsum``) against float64
    sums of the same rounded operands: dtypes, head counts and dims that are not powers of two
    (masked lanes), strided operands, and the kernel (not torch's twin) run."""
    from ringattn.kernels import dpsum

    assert dpsum.available(torch.empty(0)), "the kernel, not its torch twin, is under test"
    checked = 0
    for case in range(cases):
        b, n = 1 + case % 2, int(torch.randint(1, 40, (), generator=gen))
        h, d = (
            int(torch.randint(1, 7, (), generator=gen)),
            int(torch.randint(1, 40, (), generator=gen)),
        )
        dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3]
        out = torch.randn(b, n, h, d, generator=gen).to(dtype)
        # dout strided as a head-major buffer seen as [b, n, h, d]
        dout = torch.randn(b, h, n, d, generator=gen).to(dtype).transpose(1, 2)
        lse = torch.empty(b, n, h)
        got = dpsum.minus_dpsum(out, dout, lse)
        want = -(out.double() * dout.double()).sum(-1)
        assert got is not None and got.shape == lse.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * d)
        checked += 1
    return checked


def add_rows_cases(gen: torch.Generator, cases: int) -> int:
    """The three-gradient add against torch's ``add_`` on the strided rows of real ``lse`` plans
    (blocks and offset runs), and ``lse`` gradients through the core (which then adds with it)
    against the oracle."""
    from ringattn.kernels import add as add_kernel
    from ringattn.pattern import offset_runs

    checked = 0
    for case in range(cases):
        b, h = 1 + case % 2, int(torch.randint(1, 6, (), generator=gen))
        d = int(torch.randint(1, 20, (), generator=gen))
        r = [2, 4, 8][case % 3]
        w = r * int(torch.randint(1, 4, (), generator=gen))
        n = int(torch.randint(1, 3 * w, (), generator=gen))
        # r, dtype and the pairs handed over vary independently: 24 cases meet every pair of
        # their values (case % 3 for all three tied them: only fp16 ever added three pairs)
        dtype = [torch.float32, torch.bfloat16, torch.float16][case // 3 % 3]
        pairs = 1 + (case + case // 9) % 3
        plan = make_plan(n, h, ((w, r),), "lse")
        views = [*plan.blocks, *(run for _, runs in offset_runs(plan, 1) for run in runs)]
        for view in views:
            accs = [torch.randn(b, n, h, d, generator=gen).to(dtype) for _ in range(3)]
            want = [acc.clone() for acc in accs]
            geometry = view.rows_geometry(accs[0].shape, accs[0].stride())
            rows = [acc.as_strided(*geometry[:2], geometry[2]) for acc in accs]
            # the parts in a transposed layout, as the kernels return them
            shape = (*geometry[0][:3], geometry[0][4], geometry[0][3])
            parts = [torch.randn(shape, generator=gen).to(dtype).transpose(3, 4) for _ in range(3)]
            for acc, part in zip(want, parts):
                acc.as_strided(*geometry[:2], geometry[2]).add_(part)
            assert add_kernel.add_rows_(rows[:pairs], parts[:pairs])
            for i, (acc, expected) in enumerate(zip(accs, want)):
                if i >= pairs:  # a pair not handed to the kernel: untouched
                    assert not torch.equal(acc, expected) or not parts[i].numel()
                    continue
                # (the interpreter rounds float32 -> bf16/fp16 its own way: 1 ulp at most)
                tol = {torch.float32: 0.0, torch.bfloat16: 1e-2, torch.float16: 2**-9}[dtype]
                torch.testing.assert_close(acc, expected, atol=min(tol, 1e-5), rtol=tol)
            checked += 1
    # pairs of different layouts (a computer's dq, dk, dv need not share strides): the kernel
    # reads every part with the first one's strides, so it must refuse them (its caller then
    # adds with torch), not add a transposed dk into dk's rows
    for mixed in ("parts", "accs"):
        plain = [torch.randn(1, 2, 4, 3, 8, generator=gen) for _ in range(2)]
        transposed = torch.randn(1, 2, 4, 8, 3, generator=gen).transpose(3, 4)
        accs = [plain[0].clone(), transposed.clone() if mixed == "accs" else plain[1].clone()]
        parts = [torch.randn(1, 2, 4, 3, 8, generator=gen) for _ in range(2)]
        if mixed == "parts":
            parts[1] = torch.randn(1, 2, 4, 8, 3, generator=gen).transpose(3, 4)
        want = [acc + part for acc, part in zip(accs, parts)]
        if not add_kernel.add_rows_(accs, parts):
            for acc, part in zip(accs, parts):
                acc.add_(part)
        for acc, expected in zip(accs, want):
            torch.testing.assert_close(acc, expected, atol=0, rtol=0)
        checked += 1
    assert not add_kernel.add_rows_(
        [torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)] * 3,
        [torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)] * 3,
    ), "float64 must keep torch's add"
    # what the kernel does not take, refused (the caller then adds with torch): the result is
    # torch's add_, bit for bit. Four pairs (it adds three), a float64 part (rounded to float32
    # first: 1 + (2**-24 + 2**-50) came out 1.0, where torch's one rounding gives 1 + 2**-23)
    # A float64 accumulator with a float32 part (read into float32: 1 + 2**-40 + 2**-30 came
    # out 1 + 2**-30, where torch's add keeps the float64 digits)
    one = torch.ones(1, 1, 1, 1, 8)
    for accs, parts in (
        ([one.clone() for _ in range(4)], [one * i for i in range(4)]),
        ([one.clone()], [torch.full(one.shape, 2.0**-24 + 2.0**-50, dtype=torch.float64)]),
        ([one.double() + 2.0**-40], [one * 2.0**-30]),
    ):
        want = [acc.clone().add_(part) for acc, part in zip(accs, parts)]
        if not add_kernel.add_rows_(accs, parts):
            for acc, part in zip(accs, parts):
                acc.add_(part)
        for acc, expected in zip(accs, want):
            assert torch.equal(acc, expected), (acc, expected)
        checked += 1
    # operands it would read past or mis-address, refused (False: nothing written), not added:
    # a part or accumulator of other rows (a computer's result of the wrong shape: torch's
    # add then raises), [b, n, h, d] views (it takes [b, S, L, H, d]), no pairs at all
    rows = torch.zeros(1, 2, 4, 3, 8)
    for accs, parts in (
        ([rows.clone()], [torch.ones(1, 2, 2, 3, 8)]),
        # (an accumulator of fewer rows in the first one's layout: its strides pass)
        ([rows.clone(), torch.zeros(rows.shape)[:, :, :2]], [torch.ones(rows.shape)] * 2),
        ([rows[0].clone()], [torch.ones(rows.shape[1:])]),
        ([], []),
    ):
        before = [acc.clone() for acc in accs]
        assert not add_kernel.add_rows_(accs, parts), [tuple(a.shape) for a in accs + parts]
        assert all(torch.equal(acc, was) for acc, was in zip(accs, before))
        checked += 1
    import ringattn
    from ringattn import reference

    calls = []
    original = add_kernel.add_rows_
    add_kernel.add_rows_ = lambda *a: (calls.append(1), original(*a))[1]
    for causal in (False, True):
        q, k, v = (torch.randn(2, 40, 4, 8, generator=gen).requires_grad_() for _ in range(3))
        opts = {"segment_lengths": (8, 16, 16), "dilation_rates": (1, 2, 4), "causal": causal}
        out = ringattn.dilated_attention(q, k, v, compile=False, **opts)
        exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = reference.dilated_attention(*exact, **opts)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.sum(), exact)
        for grad, ref_grad in zip(grads, ref_grads):
            assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() <= 1e-5
        checked += 1
    assert calls, "the core did not use the add kernel"
    add_kernel.add_rows_ = original
    return checked


def zero_unselected_cases(gen: torch.Generator, cases: int) -> int:
    """The unselected-pairs fill against its definition on poisoned (NaN) strided tensors, and
    head_groups attention through the core (which then fills with it) against the oracle."""
    checked = 0
    for case in range(cases):
        b, n = 1 + case % 2, int(torch.randint(1, 40, (), generator=gen))
        h = int(torch.randint(1, 6, (), generator=gen))
        d = int(torch.randint(1, 20, (), generator=gen))
        rates = tuple(int(torch.randint(1, 5, (), generator=gen)) for _ in range(h))
        offsets = tuple(int(torch.randint(-1, r, (), generator=gen)) for r in rates)
        dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3]
        # a [b, n, h, d] view with a transposed layout: the kernel takes any strides
        x = torch.full((b, h, n, d), float("nan"), dtype=dtype).transpose(1, 2)
        unselected.zero_unselected_(x, torch.tensor([rates, offsets], dtype=torch.int32))
        p = torch.arange(n)[:, None]
        selected = (p % torch.tensor(rates)) == torch.tensor(offsets)  # [n, h]
        assert x[:, selected].isnan().all(), "a selected pair was written"
        assert (x[:, ~selected] == 0).all(), "an unselected pair was not zeroed"
        checked += 1
    import ringattn
    from ringattn import reference

    calls = []
    original, empty_like, empty = unselected.zero_unselected_, torch.empty_like, torch.empty
    unselected.zero_unselected_ = lambda *a: (calls.append(1), original(*a))[1]

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(float("nan")) if x.is_floating_point() else x

    # poisoned "uninitialised" memory: a pair neither written by a block nor zeroed shows as NaN
    torch.empty_like = lambda x, **kw: poisoned(empty_like(x, **kw))
    torch.empty = lambda *a, **kw: poisoned(empty(*a, **kw))
    for causal in (False, True):
        q, k, v = (torch.randn(2, 37, 4, 8, generator=gen).requires_grad_() for _ in range(3))
        opts = {"segment_lengths": (8, 16), "dilation_rates": (2, 4), "causal": causal}
        out = ringattn.dilated_attention(q, k, v, compile=False, mixing="head_groups", **opts)
        exact = (x.double() for x in (q, k, v))
        ref = reference.dilated_attention(*exact, mixing="head_groups", **opts)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
        for g, g_ref in zip(grads, ref_grads):
            assert ((g.double() - g_ref).norm() / g_ref.norm()).item() <= 1e-5
        checked += 1
    # per call: the forward's output, and each gradient's own buffer (q, k, v are leaves: their
    # .grad own their storage; a graph's inner q, k, v share one stacked buffer and one fill)
    assert len(calls) == 8, f"the core zeroed through the kernel {len(calls)} times, not 8"
    unselected.zero_unselected_, torch.empty_like, torch.empty = original, empty_like, empty
    return checked + fill_unselected_cases()


def fill_unselected_cases() -> int:
    """``fill_unselected_`` (the core's entry): no selection zeroes everything; a selection
    zeroes exactly its unselected pairs, and skips the launch only where every pair is selected
    (every rate 1, offset 0). Every head at offset 0 is not that: a single ``head_groups``
    config ``(w, r > 1)``, or rates ``(4, 1)`` (both groups' ``g mod r`` is 0)."""
    from ringattn.memory.none import NoReuse

    checked = 0
    calls, original = [], unselected.zero_unselected_
    unselected.zero_unselected_ = lambda *a: (calls.append(1), original(*a))[1]
    for selection in (None, ((1, 1), (0, 0)), ((2, 2), (0, 0)), ((4, 4, 1), (0, 0, 0))):
        h = 2 if selection is None else len(selection[0])
        x = torch.full((2, 9, h, 3), float("nan"))
        calls.clear()
        unselected.fill_unselected_(x, selection, NoReuse())
        launched = selection is not None and any(r > 1 for r in selection[0])
        assert len(calls) == launched, (selection, "launched" if calls else "not launched")
        if selection is None:
            selected = torch.zeros(9, h, dtype=torch.bool)
        else:
            p = torch.arange(9)[:, None]
            selected = p % torch.tensor(selection[0]) == torch.tensor(selection[1])
        assert x[:, selected].isnan().all(), (selection, "a selected pair was written")
        assert (x[:, ~selected] == 0).all(), (selection, "an unselected pair was not zeroed")
        checked += 1
    unselected.zero_unselected_ = original
    # one caching manager, two selections of as many heads on one device: each its own table
    # (a table cached under another selection's key zeroes that selection's pairs)
    from ringattn.memory.pooled import PooledMemory

    memory = PooledMemory()
    for selection in (((2, 2), (0, 0)), ((2, 2), (1, 1)), ((4, 1), (3, 0))):
        x = torch.full((1, 8, 2, 3), float("nan"))
        unselected.fill_unselected_(x, selection, memory)
        p = torch.arange(8)[:, None]
        selected = p % torch.tensor(selection[0]) == torch.tensor(selection[1])
        assert x[:, selected].isnan().all() and (x[:, ~selected] == 0).all(), selection
        checked += 1
    # wide heads (h * d past the 64K-element tile): one row per program, not none
    x = torch.full((1, 3, 2, 2**16), float("nan"))
    unselected.zero_unselected_(x, torch.tensor([[2, 1], [0, 0]], dtype=torch.int32))
    assert x[:, [0, 2], 0].isnan().all() and x[:, :, 1].isnan().all()
    assert (x[:, 1, 0] == 0).all()
    return checked + 1


def unit_stats_cases(gen: torch.Generator, cases: int) -> int:
    """The grouped backward's statistics by unit (``ringattn.kernels.unit_stats``) against their
    definition: each head_groups part's rows as ``[B, H, L]`` units (the order of
    ``launches.packed``), ``rowsum(out * dout)`` and ``lse * log2(e)``, the rows past ``L`` 0 and
    ``+inf``."""
    import math

    from ringattn.kernels.unit_stats import unit_stats_

    checked = 0
    for case in range(cases):
        b, h = 1 + case % 2, int(torch.randint(2, 6, (), generator=gen))
        d = int(torch.randint(1, 20, (), generator=gen))
        length = int(torch.randint(1, 6, (), generator=gen))
        rates = (1, 2, 4)[: 1 + case % 3]
        n = length * max(rates) * int(torch.randint(1, 4, (), generator=gen))
        plan = make_plan(n, h, tuple((length * r, r) for r in rates), "head_groups")
        dtype = [torch.float32, torch.bfloat16][case % 2]
        out, dout = (torch.randn(b, n, h, d, generator=gen).to(dtype) for _ in range(2))
        lse = torch.randn(b, n, h, generator=gen)
        positions = torch.arange(b * n * h).view(b, n, h)
        index = torch.cat(
            [block.rows(positions).flatten(0, 1).transpose(1, 2).flatten() for block in plan.blocks]
        ).to(torch.int32)
        units = index.numel() // length
        rounded = length + case // 3 % 3  # not case % 3: that tied it to the rates
        dpsum, lse_log2 = (torch.full((units, rounded), float("nan")) for _ in range(2))
        unit_stats_(out, dout, lse, index, length, dpsum, lse_log2)
        rows = index.long().view(units, length)
        want = (out.float() * dout.float()).sum(-1).flatten()[rows]
        torch.testing.assert_close(dpsum[:, :length], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse_log2[:, :length], lse.flatten()[rows] * math.log2(math.e))
        assert (dpsum[:, length:] == 0).all() and (lse_log2[:, length:] == float("inf")).all()
        checked += 1
    return checked


def tracing_cases(gen: torch.Generator) -> int:
    """While ``torch.compile`` traces (``torch.compiler.is_compiling()``, stood in for here),
    the callers keep the torch twins, which Inductor fuses: no Triton launch is traced. The merge
    and the gradient add go to torch, and the fill zeroes the whole tensor."""
    from ringattn.core import accumulate_
    from ringattn.kernels import add as add_kernel
    from ringattn.memory.none import NoReuse
    from ringattn.merge import merge_into_

    calls = []
    originals = merge_kernel.merge_rows_, add_kernel.add_rows_, unselected.zero_unselected_
    is_compiling = torch.compiler.is_compiling
    merge_kernel.merge_rows_ = lambda *a: calls.append("merge")
    add_kernel.add_rows_ = lambda *a: calls.append("add") or True
    unselected.zero_unselected_ = lambda *a: calls.append("fill")
    torch.compiler.is_compiling = lambda: True
    try:
        acc, part = (torch.randn(1, 2, 3, 2, 8, generator=gen) for _ in "ab")
        lse_acc, lse = (torch.randn(1, 2, 3, 2, generator=gen) for _ in "ab")
        want = torch.logaddexp(lse_acc, lse)
        merge_into_(acc, lse_acc, part, lse)
        torch.testing.assert_close(lse_acc, want)
        grads = [torch.zeros(1, 2, 3, 2, 8) for _ in range(3)]
        accumulate_(grads, tuple(torch.ones(2, 3, 2, 8) for _ in range(3)), False)
        assert all((grad == 1).all() for grad in grads)
        x = torch.full((1, 4, 2, 3), float("nan"))
        unselected.fill_unselected_(x, ((2, 2), (0, 0)), NoReuse())
        assert (x == 0).all(), "a traced fill left the selected pairs unwritten"
    finally:
        torch.compiler.is_compiling = is_compiling
        merge_kernel.merge_rows_, add_kernel.add_rows_, unselected.zero_unselected_ = originals
    assert not calls, f"a Triton launch while tracing: {calls}"
    return 3


def wide_head_stride_cases() -> int:
    """The add, merge, fill and dpsum kernels on rows whose heads lie 2**28 elements apart: a job's
    rows of gradients in q's layout where q is a [b, h, n, d] tensor transposed (head stride
    r * n * d: r = 2 at n = 1M, d = 128). i32 head indices times that stride wrapped at head 8,
    and the kernels read and wrote 4 GB before the tensor (a crash here; on a GPU, others'
    memory or an illegal address). The rows are views of a sparse file mapped into memory: only
    the pages touched are ever held (8 GB of fp16 addressed)."""
    from ringattn.kernels import add as add_kernel
    from ringattn.kernels import dpsum

    heads, d, head_stride = 16, 8, 2**28
    numel = (heads - 1) * head_stride + d
    gen = torch.Generator().manual_seed(0)
    checked = 0
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rows.bin")
        with open(path, "wb") as f:
            f.truncate(numel * 2)  # (sparse: no blocks written)
        storage = torch.from_file(path, shared=True, size=numel, dtype=torch.float16)

        def wide() -> torch.Tensor:  # [1, 1, 1, heads, d], heads head_stride apart, zeros
            rows = storage.as_strided((1, 1, 1, heads, d), (numel, numel, numel, head_stride, 1))
            return rows.zero_()

        part = torch.randn(1, 1, 1, heads, d, generator=gen).half()
        acc = wide()
        assert add_kernel.add_rows_([acc], [part])
        assert torch.equal(acc, part), "add: a head's row missed (wrapped offset)"
        checked += 1
        acc = wide()
        lse_acc = torch.full((1, 1, 1, heads), float("-inf"))  # (acc's rows: none yet)
        merge_kernel.merge_rows_(acc, lse_acc, part, torch.zeros(1, 1, 1, heads))
        assert torch.equal(acc, part), "merge: a head's row missed (wrapped offset)"
        checked += 1
        x = wide().fill_(1.0).view(1, 1, heads, d)  # [b, n, h, d], every pair unselected
        unselected.zero_unselected_(
            x, unselected.selection_table(((2,) * heads, (1,) * heads), x.device)
        )
        assert (x == 0).all(), "fill: a head's row missed (wrapped offset)"
        checked += 1
        out = wide().copy_(part).view(1, 1, heads, d)  # (out and dout: one view, both read)
        got = dpsum.minus_dpsum(out, out, torch.empty(1, 1, heads))
        want = -part.float().square().sum(-1).view(1, 1, heads)
        torch.testing.assert_close(got, want, msg="dpsum: a head's row missed (wrapped offset)")
        checked += 1
    return checked


if __name__ == "__main__":
    if sys.argv[1:] == ["wide-heads"]:
        print("ok", wide_head_stride_cases())
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
