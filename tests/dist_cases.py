"""Functions each gloo rank runs for tests/test_distributed.py (see dist_pool.py).

Each case runs its collectives before its value checks: a rank whose assert failed first left
the others waiting in the next collective until gloo's timeout, and the pool broken for every
later test (found by the drawn problems at bf16, where one rank's gradient missed the bound)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from gradient_bounds import gradient_shifts, naive_gradients

import ringattn
from ringattn import distributed, reference
from ringattn.nn.decode import KVCache

TOL = {str(dtype).removeprefix("torch."): bound for dtype, bound in reference.TOLERANCE.items()}


def registered_names(kind: str) -> tuple[str, ...]:
    """This rank's registered names of ``kind`` (the pool imports strategies kept outside the
    tree, as the parent process has them)."""
    from ringattn import registry

    return registry.names(kind)


def _rel(x, ref, floor=0.0):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm()) / max(float(ref.norm()), floor, 1e-300)


def full_problem(b, n, h, d, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    grad = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(dtype)
    return qkv, grad


def matches_oracle(
    shape,
    options,
    strategy_fields,
    dtype_name="float32",
    seed=0,
    layout="contiguous",
    mixed_strides=False,
):
    """Outputs and gradients of the sharded run equal the single-process oracle's shards.
    ``mixed_strides``: odd ranks hold their shards in ``[b, h, n, d]`` storage, so ranks see
    different layouts (what each prepares must still post the same collectives). Gradients are
    bounded as the local tests bound them (tests/gradient_bounds.py): the dtype's bound or 4x the
    naive baseline's error on this rank's shard, plus what the output's rounding propagates
    (float32's were bounded by a flat 10x its tolerance, which hid errors up to 1e-4 where the
    local tests allow ~1e-5)."""
    b, n, h, d = shape
    dtype = getattr(torch, dtype_name)
    (q, k, v), grad = full_problem(b, n, h, d, seed, dtype)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref, lse_ref = reference.dilated_attention_and_lse(*ref_in, **options)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double(), retain_graph=True)

    module = ringattn.DilatedAttention(
        options["segment_lengths"],
        options["dilation_rates"],
        causal=options["causal"],
        mixing=options["mixing"],
        scale=options.get("scale"),
        strategy=ringattn.Strategy(**strategy_fields),
        compile=False,
        layout=layout,
    )

    def shard(x):
        return distributed.shard(x, layout=layout)

    def relayout(x):
        if mixed_strides and dist.get_rank() % 2:
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        return x

    local = [relayout(shard(x)).requires_grad_() for x in (q, k, v)]
    out = module(*local)
    grads = torch.autograd.grad(out, local, shard(grad))
    tol = TOL[dtype_name]
    errors = {"out": _rel(out, shard(ref))}
    floor = 0.1 * float(shard(grad).double().norm())
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        errors[f"d{name}"] = _rel(g, shard(g_ref), floor)
    with torch.no_grad():  # inference takes another path (head_groups: no LSE kept)
        errors["out_no_grad"] = _rel(module(*local), shard(ref))
    # the gathered output is the single-device result (gathered before any assert: a rank that
    # failed one first left the others waiting in this collective until gloo's timeout, and the
    # pool broken for every later test)
    out_full = distributed.gather(out, layout=layout)
    gathered = _rel(out_full, ref)
    naive = naive_gradients(q, k, v, grad, options)
    naive_error = max(_rel(shard(g), shard(g_ref), floor) for g, g_ref in zip(naive, ref_grads))
    shifts = gradient_shifts(out_full, ref, lse_ref, ref_in, grad.double())
    bounds = {
        f"d{name}": max(tol, 4 * naive_error)
        + float(shard(s).norm()) / max(float(shard(g_ref).norm()), floor)
        for name, s, g_ref in zip("qkv", shifts, ref_grads)
    }
    assert errors["out"] <= tol and errors["out_no_grad"] <= tol, errors
    assert all(errors[name] <= bound for name, bound in bounds.items()), (errors, bounds)
    assert gathered <= tol
    return errors


def bf16_partial_results_merge_in_float32(communicator: str) -> tuple[str, str, float, bool]:
    """bf16 K/V spanning every rank, through the communicator's ``attend``: the shards' partial
    results merge in float32 accumulators (the module's oracle test, at bf16's tolerance, cannot
    see accumulators rounded to bf16 once per shard). Returns their dtypes, the output's error
    against float64 attention over the gathered keys, and whether ``attend_into`` without an
    LSE (a placed block under no_grad) writes what it writes with a float32 one."""
    p = dist.get_world_size()
    module = _small_module({"communicator": communicator, "computer": "sdpa"})
    comm, computer = module.communicator, module.computer
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(1, 8, 2, 8, generator=gen).to(torch.bfloat16) for _ in range(3))
    out, lse = comm.attend(computer, q, k, v, False, 8**-0.5, p)
    placed = [torch.zeros_like(q) for _ in range(2)]
    comm.attend_into(computer, q, k, v, False, 8**-0.5, p, placed[0], None)
    stats = torch.empty(q.shape[:3], dtype=torch.float32)
    comm.attend_into(computer, q, k, v, False, 8**-0.5, p, placed[1], stats)
    gathered = []
    for x in (k, v):
        parts = [torch.empty_like(x) for _ in range(p)]
        dist.all_gather(parts, x)
        gathered.append(torch.cat(parts, dim=1).double())
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), gathered[0]) * 8**-0.5
    ref = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), gathered[1])
    return str(out.dtype), str(lse.dtype), _rel(out, ref), torch.equal(*placed)


class _ConstantOutputs:
    """A computer whose forward gives outputs of ``first`` on its first call (the rank's own
    chunk) and of ``later`` on every later one, in ``dtype`` (None: the inputs'), each with LSE
    0. By default 1 and ``1 + 2**-7`` (bf16's next value after 1) in bf16: merged in float32,
    the mean ``1 + (p - 1) / p * 2**-7`` to within float32's rounding of the weights; merged in
    bf16, rounded to 1 or ``1 + 2**-7`` at every merge (at p = 2 already: ``1 + 2**-8`` lies
    between them)."""

    def __init__(self, first=1.0, later=1.0 + 2.0**-7, dtype=None) -> None:
        self.calls = 0
        self.first, self.later, self.dtype = first, later, dtype

    def forward(self, q, k, v, causal, scale):
        value = self.first if self.calls == 0 else self.later
        self.calls += 1
        out = torch.full_like(q, value, dtype=self.dtype or q.dtype)
        return out, torch.zeros(q.shape[:3], dtype=torch.float32)

    def forward_into(self, q, k, v, causal, scale, out, lse):
        from ringattn.computers.base import place_

        place_(out, lse, self.forward(q, k, v, causal, scale))


def bf16_partial_results_merge_exactly(communicator: str) -> tuple[str, list[float]]:
    """bf16 K/V spanning every rank, through the communicator's ``attend`` with constant
    partial results (``_ConstantOutputs``): returns the merged output's dtype and its values."""
    comm = _small_module({"communicator": communicator, "computer": "sdpa"}).communicator
    q, k, v = (torch.randn(1, 8, 2, 8).to(torch.bfloat16) for _ in range(3))
    out, _ = comm.attend(_ConstantOutputs(), q, k, v, False, 0.5, dist.get_world_size())
    return str(out.dtype), sorted(set(out.flatten().tolist()))


def bf16_placed_partial_results_round_once(communicator: str) -> list[list[float]]:
    """bf16 rows of a placed block spanning every rank (``attend_into``, with the LSE's float32
    rows and without), from float32 partial results (``math``'s kind): ``1 + 5 * 2**-10`` from
    the rank's own chunk, ``1 + 2**-10`` from each other. Their mean, below ``1 + 2**-8`` at
    every p, rounds once to 1; merged into the bf16 rows shard by shard, the own chunk rounded
    up to ``1 + 2**-7`` and every later merge (its mean above ``1 + 2**-8``) kept it there.
    Returns each call's values."""
    p = dist.get_world_size()
    comm = _small_module({"communicator": communicator, "computer": "math"}).communicator
    q, k, v = (torch.randn(1, 8, 2, 8).to(torch.bfloat16) for _ in range(3))
    values = []
    for lse in (None, torch.empty(q.shape[:3], dtype=torch.float32)):
        computer = _ConstantOutputs(1 + 5 * 2.0**-10, 1 + 2.0**-10, torch.float32)
        out = torch.zeros_like(q)
        comm.attend_into(computer, q, k, v, False, 0.5, p, out, lse)
        values.append(sorted(set(out.float().flatten().tolist())))
    return values


# the placed blocks' (head_groups), causal or not, and the merged blocks' (lse)
LOW_PRECISION_CASES = (("head_groups", False), ("head_groups", True), ("lse", True))


def low_precision_errors_against_one_device(
    communicator, layout, dtype_name, cases=LOW_PRECISION_CASES, seed=0
):
    """bf16 / fp16 errors against the float64 oracle over ``p`` ranks, relative to one device's
    in the same dtype, on this rank's shard: ``{(mixing, causal): [out, dq, dk, dv]}`` ratios.
    ``math``'s float32 partial results, so any rounding the ranks add beyond one device's shows;
    every config one segment over the whole sequence, so every head's rows merge partials from
    every rank."""
    p = dist.get_world_size()
    n, dtype = 64 * p, getattr(torch, dtype_name)
    (q, k, v), grad = full_problem(1, n, 2, 16, seed, dtype)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]

    def cut(x):
        return distributed.shard(x, layout=layout)

    ratios = {}
    for mixing, causal in cases:
        options = {"segment_lengths": (n, n), "dilation_rates": (1, 2), "causal": causal}
        options["mixing"] = mixing
        ref = reference.dilated_attention(*ref_in, **options)
        expected = [cut(x) for x in (ref, *torch.autograd.grad(ref, ref_in, grad.double()))]
        errors = []
        for sharded in (False, True):
            fields = {"communicator": communicator if sharded else "local", "computer": "math"}
            module = ringattn.DilatedAttention(
                **options,
                strategy=ringattn.Strategy(**fields),
                compile=False,
                **({"layout": layout} if sharded else {}),
            )
            inputs = [(cut(x) if sharded else x).requires_grad_() for x in (q, k, v)]
            out = module(*inputs)
            found = [out, *torch.autograd.grad(out, inputs, cut(grad) if sharded else grad)]
            errors.append([_rel(x if sharded else cut(x), r) for x, r in zip(found, expected)])
        ratios[(mixing, causal)] = [sp / one for one, sp in zip(*errors)]
    return ratios


class _ConstantGradients:
    """A computer whose backward gives gradients of 1 on its first call (the rank's own chunk)
    and of ``2**-9`` on every later one (the other chunks), in bf16: summed in float32 and
    rounded once, ``1 + (p - 1) * 2**-9``; summed in bf16, each small share is lost (it is
    below half of bf16's ulp at 1), so the sum stays 1. Exact either way."""

    def __init__(self) -> None:
        self.calls = 0

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        value = 1.0 if self.calls == 0 else 2.0**-9
        self.calls += 1
        return tuple(torch.full_like(x, value) for x in (q, k, v))


def bf16_partial_gradients_sum_in_float32(communicator: str) -> tuple[str, list[list[float]]]:
    """bf16 K/V spanning every rank, through the communicator's ``attend_backward``: each
    gradient's shares (dQ's from every chunk, dK's and dV's from every rank) must sum in
    float32. An accumulator of bf16, rounding at every step, passed the oracle tests at bf16's
    tolerance (about 20% more error at p = 4). Returns the gradients' dtype and their values."""
    p = dist.get_world_size()
    comm = _small_module({"communicator": communicator, "computer": "sdpa"}).communicator
    q, k, v, out, dout = (torch.randn(1, 8, 2, 8).to(torch.bfloat16) for _ in range(5))
    lse = torch.zeros(1, 8, 2)
    grads = comm.attend_backward(_ConstantGradients(), dout, q, k, v, out, lse, False, 0.5, p)
    return str(grads[0].dtype), [g.float().unique().tolist() for g in grads]


def matches_oracle_through_fake_fa4(
    shape, options, strategy_fields, layout="contiguous", share_dpsum=False
):
    """:func:`matches_oracle` with sdpa's blocks on the FA4 stand-in (tests/fake_fa4.py), twice:
    the first call records each block signature's launches, the second replays them. Returns
    (launcher calls, kernel runs) of forward and backward, and the backward kernel runs that
    formed dPsum from given sums alone. ``share_dpsum``: the stand-in takes given sums
    (``ringattn.kernels.fa4_dpsum``) wherever the core offers them."""
    from fake_fa4 import FakeFA4, installed

    import ringattn.core
    from ringattn.kernels import fa4_dpsum

    saved = fa4_dpsum.supported, ringattn.core.DPSUM_SHARED_FROM
    if share_dpsum:
        fa4_dpsum.supported = lambda q: True
        ringattn.core.DPSUM_SHARED_FROM = 0.0
    try:
        with installed(FakeFA4()) as kernel:
            for _ in range(2):
                matches_oracle(shape, options, strategy_fields, "float32", 0, layout)
    finally:
        fa4_dpsum.supported, ringattn.core.DPSUM_SHARED_FROM = saved
    counts = kernel.forward_calls, kernel.forward_runs, kernel.calls, kernel.backward_runs
    return (*counts, kernel.unloaded_runs)


def matches_oracle_through_merge_kernel(shape, options, strategy_fields, dtype_name, layout):
    """:func:`matches_oracle` in a process running Triton's interpreter, so the ring's and
    all-gather's merges of partial results (strided row views, zigzag halves) go through the
    Triton merge kernel that CUDA runs. Returns how often the kernel merged."""
    import os

    from ringattn.kernels import merge as merge_kernel

    assert os.environ.get("TRITON_INTERPRET") == "1" and merge_kernel.INTERPRET
    calls = []
    original = merge_kernel.merge_rows_
    merge_kernel.merge_rows_ = lambda *a: (calls.append(1), original(*a))[1]
    try:
        matches_oracle(shape, options, strategy_fields, dtype_name, 0, layout)
    finally:
        merge_kernel.merge_rows_ = original
    return len(calls)


def spanning_runs_match_oracle(shape, options, strategy_fields, layout="contiguous"):
    """:func:`matches_oracle` with ``lse``'s offset runs on and off (``launches.FUSE_OFFSETS``).
    Returns, for each, the communicator's exchanges for spanning segments (calls of ``attend``
    and ``attend_backward`` with ``span > 1``) and the bytes this rank sent."""
    from ringattn import launches, registry

    cls = registry.get("communicator", strategy_fields["communicator"])
    originals = cls.attend, cls.attend_backward
    fuse_default = launches.FUSE_OFFSETS
    found = {}
    for fuse in (True, False):
        exchanges = []

        def counted(original, exchanges=exchanges):
            def call(self, *args):
                exchanges.append(args[-1] > 1)  # span, the last positional argument
                return original(self, *args)

            return call

        cls.attend, cls.attend_backward = (counted(f) for f in originals)
        launches.FUSE_OFFSETS = fuse
        try:
            forward_bytes, backward_bytes = bytes_sent(
                shape, options, strategy_fields, True, layout
            )
            matches_oracle(shape, options, strategy_fields, "float32", 0, layout)
        finally:
            cls.attend, cls.attend_backward = originals
            launches.FUSE_OFFSETS = fuse_default
        found[fuse] = (sum(exchanges), forward_bytes + backward_bytes)
    return found[True], found[False]


def placed_spanning_blocks_merge_in_place(shape, options, strategy_fields, layout="contiguous"):
    """:func:`matches_oracle` for ``head_groups``, whose blocks are placed: a block whose segments
    span ranks merges its shards straight into the output's rows (``into``) and copies no result
    into them (``place_``). Returns how many spanning exchanges went ``into`` the rows."""
    from ringattn import registry
    from ringattn.communicators import base

    cls = registry.get("communicator", strategy_fields["communicator"])
    original, place = cls._attend, base.place_
    into_calls, copies = [], []

    def counted(self, *args):
        into_calls.append(args[-1] is not None)
        return original(self, *args)

    cls._attend = counted
    base.place_ = lambda *args: (copies.append(1), place(*args))[1]
    try:
        matches_oracle(shape, options, strategy_fields, "float32", 0, layout)
    finally:
        cls._attend, base.place_ = original, place
    assert not copies, "a placed block's result was copied into its rows"
    return sum(into_calls)


def bytes_sent(
    shape, options, strategy_fields, backward: bool, layout="contiguous", dtype_name="float32"
):
    b, n, h, d = shape
    (q, k, v), grad = full_problem(b, n, h, d, 0, getattr(torch, dtype_name))
    module = ringattn.DilatedAttention(
        options["segment_lengths"],
        options["dilation_rates"],
        causal=options["causal"],
        mixing=options["mixing"],
        strategy=ringattn.Strategy(**strategy_fields),
        compile=False,
        layout=layout,
    )
    local = [distributed.shard(x, layout=layout).requires_grad_(backward) for x in (q, k, v)]
    module.communicator.bytes_sent = 0
    out = module(*local)
    forward_bytes = module.communicator.bytes_sent
    if backward:
        out.backward(distributed.shard(grad, layout=layout))
    return forward_bytes, module.communicator.bytes_sent - forward_bytes


def _error_of_call(lengths, rates, n_local, strategy_fields, layout="contiguous") -> str:
    """The ValueError message of calling the module on this rank (AssertionError if none)."""
    module = ringattn.DilatedAttention(
        lengths,
        rates,
        strategy=ringattn.Strategy(**strategy_fields),
        compile=False,
        layout=layout,
    )
    q = torch.randn(1, n_local, 2, 8)
    return _value_error_of(lambda: module(q, q, q))


def mismatched_configs_raise_everywhere(strategy_fields):
    lengths = (8, 32) if dist.get_rank() == 0 else (8, 16)  # rank 0 disagrees
    return _error_of_call(lengths, (1, 2), 16, strategy_fields)


def mismatched_shapes_raise_everywhere(strategy_fields):
    n_local = 16 if dist.get_rank() == 0 else 8
    return _error_of_call((8, 32), (1, 2), n_local, strategy_fields)


def bad_layout_raises(lengths, rates, n_local, layout="contiguous"):
    return _error_of_call(lengths, rates, n_local, {"communicator": "ring"}, layout)


def shard_requires_divisible_n(layout="contiguous"):
    # zigzag: n = 3p divides into p shards but not into 2p chunks (shard would drop rows)
    n = 7 if layout == "contiguous" else 3 * dist.get_world_size()
    return _value_error_of(lambda: distributed.shard(torch.randn(1, n, 2, 4), layout=layout))


def shard_gather_roundtrip(layout="contiguous"):
    p, rank = dist.get_world_size(), dist.get_rank()
    x = torch.arange(2 * 16 * 3 * 2, dtype=torch.float32).view(2, 16, 3, 2)
    part = distributed.shard(x, layout=layout)
    gathered = distributed.gather(part, layout=layout)  # (the collective before any assert)
    assert part.shape[1] == 16 // p
    # the shard holds exactly the positions `positions` names
    where = distributed.positions(16 // p, rank, p, layout)
    assert torch.equal(part, x[:, where])
    assert torch.equal(gathered, x)
    return where.tolist()


def _group_errors(group, strategy, options, seed, layout="contiguous"):
    """One float64 problem of 64 tokens (``seed``'s) over ``group``: the gathered output's and
    the three gradient shards' relative errors against the oracle's."""
    (q, k, v), grad = full_problem(1, 64, 2, 8, seed, torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(*ref_in, **options)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    module = ringattn.DilatedAttention(
        **options, strategy=strategy, compile=False, group=group, layout=layout
    )
    local = [distributed.shard(x, group, layout).requires_grad_() for x in (q, k, v)]
    out = module(*local)
    grads = torch.autograd.grad(out, local, distributed.shard(grad, group, layout))
    errors = [_rel(distributed.gather(out, group, layout), ref)]
    return errors + [_rel(g, distributed.shard(r, group, layout)) for g, r in zip(grads, ref_grads)]


def groups_side_by_side_match_oracle(communicator, size):
    """Data parallel x sequence parallel: the world cut into groups of ``size`` consecutive ranks,
    each computing its own problem at the same time, several calls (a fresh module each: new
    signatures). Before, the first call of a spanning config made sub-groups with ``new_group``
    on the group's ranks only, which every rank of the world must enter: the groups' sub-groups
    got mixed up, and calls hung or timed out (5 of 7 runs)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
    group = groups[rank // size]
    # shards of 64 / size: spans 1, 2 and (size 4) all 4 ranks; a span of 2 in a group of 4 is
    # the point-to-point path, a span of the whole group the collective
    options = {"segment_lengths": (8, 32, 64), "dilation_rates": (1, 2, 4), "causal": True}
    strategy = ringattn.Strategy(communicator=communicator, computer="math")
    errors = []
    for call, mixing in enumerate(("lse", "head_groups", "lse")):
        seed = 10 * (rank // size) + call
        errors += _group_errors(group, strategy, {**options, "mixing": mixing}, seed)
    for g in groups:
        dist.destroy_process_group(g)
    assert all(e < 1e-10 for e in errors), errors  # (max() drops a NaN that is not first)
    return True


def strided_groups_match_oracle(communicator, sp_size=2, cases=None):
    """Sequence parallelism over ``mesh["sp"]`` of a ("sp", "dp") mesh: ``sp_size`` 2, groups
    [0, 2] and [1, 3], whose group ranks are not their global ranks nor those modulo the group's
    size (the consecutive groups elsewhere here have both); ``sp_size`` 4 (8 ranks), groups
    [0, 2, 4, 6] and [1, 3, 5, 7], where a segment spanning 2 of them is sub-segments [0, 2] and
    [4, 6] (the all-gather's point-to-point path, whose peers are global ranks). Each group's
    own problem, each ``(layout, segment_lengths, mixing, causal)`` of ``cases``, forward,
    backward and gather against the oracle; then rank 3 alone passes another layout, and the
    message names it by its global rank (it was "rank 1", the name of a process of the other
    group). Returns (errors, message)."""
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    sp = init_device_mesh("cpu", (sp_size, 2), mesh_dim_names=("sp", "dp"))["sp"]
    strategy = ringattn.Strategy(communicator=communicator, computer="math")
    errors = []
    cases = cases or (
        ("contiguous", (8, 32, 64), "lse", True),
        ("zigzag", (8, 16, 128), "head_groups", True),
    )
    for layout, lengths, mixing, causal in cases:
        options = {
            "segment_lengths": lengths,
            "dilation_rates": (1, 2, 4),
            "causal": causal,
            "mixing": mixing,
        }
        errors += _group_errors(sp, strategy, options, rank % 2, layout)  # (one per group)
    layout = "zigzag" if rank == 3 else "contiguous"
    module = ringattn.DilatedAttention((8,), (1,), strategy=strategy, compile=False, group=sp,
                                       layout=layout)  # fmt: skip
    x = torch.randn(1, 16, 2, 8)
    message = "no error" if rank % 2 == 0 else _value_error_of(lambda: module(x, x, x))
    if rank % 2 == 0:
        module(x, x, x)  # (group [0, 2] agrees)
    return errors, message


def groups_of_one_take_what_one_device_takes(communicator):
    """Each rank a sequence-parallel group of its own (data parallel only): the whole sequence
    is there, so segments that do not divide it (partial tails) are valid, as on one device.
    They were refused ("must divide the shard length n/p=10"). Returns the worst error."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group([r]) for r in range(world)]
    options = {"segment_lengths": (4, 6), "dilation_rates": (1, 3), "causal": True}
    (q, k, v), grad = full_problem(2, 10, 3, 4, rank, torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(*ref_in, **options)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    errors = []
    for layout in distributed.LAYOUTS:
        module = ringattn.DilatedAttention(
            **options,
            strategy=ringattn.Strategy(communicator=communicator, computer="math"),
            compile=False,
            group=groups[rank],
            layout=layout,
        )
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = module(*inputs)
        errors.append(_rel(out, ref))
        errors += [_rel(g, r) for g, r in zip(torch.autograd.grad(out, inputs, grad), ref_grads)]
    for g in groups:
        dist.destroy_process_group(g)
    return max(errors)


def gather_of_unequal_shards_raises_everywhere():
    """Before, rank 0 got a tensor padded with garbage and rank 1 was aborted by gloo."""
    rows = 8 if dist.get_rank() == 1 else 12
    return _value_error_of(lambda: distributed.gather(torch.randn(2, rows, 1, 2)))


def gather_of_mixed_dtypes_raises_everywhere():
    """fp16 on rank 0, bf16 elsewhere (the same bytes: gloo moved them, and the other ranks read
    rank 0's 1.0 as 0.0078125, silently, where the check did not compare dtypes)."""
    dtype = torch.float16 if dist.get_rank() == 0 else torch.bfloat16
    return _value_error_of(lambda: distributed.gather(torch.ones(1, 4, 2, dtype=dtype)))


def a_rank_outside_the_group_is_refused():
    """A module given a group this rank is not in: a ValueError naming ``group`` at once (before,
    its rank was -1 and its first call raised torch's "Invalid process group specified")."""
    only_zero = dist.new_group([0])
    try:
        if dist.get_rank() == 0:
            ringattn.DilatedAttention((8,), (1,), group=only_zero, strategy=_RING)
            return "member"
        return _value_error_of(
            lambda: ringattn.DilatedAttention((8,), (1,), group=only_zero, strategy=_RING)
        )
    finally:
        dist.destroy_process_group(only_zero)


_RING = ringattn.Strategy(communicator="ring")


def a_kv_cache_is_refused_sequence_parallel(communicator):
    """Each rank would cache its shard and decode against it: wrong tokens (0.7-0.9 off), and
    ranks generating different sequences, with no error. A rank-local refusal."""
    from ringattn.models import LongNet, LongNetConfig

    strategy = ringattn.Strategy(communicator=communicator)
    layer = ringattn.MultiheadDilatedAttention(16, 2, (8,), (1,), causal=True, strategy=strategy)
    config = LongNetConfig(
        vocab_size=16,
        dim=16,
        depth=1,
        num_heads=2,
        segment_lengths=(8,),
        dilation_rates=(1,),
        strategy=strategy,
    )
    messages = []
    for call in (
        lambda: layer.new_cache(1, 8),
        lambda: layer(torch.randn(1, 4, 16), KVCache.empty(1, 8, 2, 8, torch.float32, "cpu")),
        lambda: LongNet(config).generate(torch.zeros(1, 4, dtype=torch.long), 2),
    ):
        try:
            call()
        except ValueError as exc:
            messages.append(str(exc))
        else:
            raise AssertionError("no error")
    return messages


def longnet_shards_match_the_full_model(communicator, layout="contiguous"):
    """The LM runs sequence-parallel: every rank's logits are its shard of the full logits."""
    from ringattn.models import LongNet, LongNetConfig

    def model(strategy):
        torch.manual_seed(0)
        config = LongNetConfig(
            vocab_size=32,
            dim=32,
            depth=2,
            num_heads=4,
            num_kv_heads=2,
            # zigzag: shard-local segments fit a chunk (n/2p), the others span every rank
            segment_lengths=(8, 32, 64) if layout == "contiguous" else (8, 64, 128),
            dilation_rates=(1, 2, 4),
            strategy=strategy,
            layout="contiguous" if strategy.communicator == "local" else layout,
        )
        return LongNet(config).double()

    tokens = torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(0))
    full_model = model(ringattn.Strategy(computer="math"))
    full = full_model(tokens)
    sharded = model(ringattn.Strategy(computer="math", communicator=communicator))
    logits = sharded(distributed.shard(tokens, layout=layout))
    error = (logits - distributed.shard(full, layout=layout)).abs().max()
    # every rank's parameter gradients are its shard's part of the full loss's: summed over the
    # ranks, the full model's (the zigzag rotary positions and the ring's backward included)
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(1), dtype=full.dtype)
    (logits * distributed.shard(weights, layout=layout)).sum().backward()
    (full * weights).sum().backward()
    grad_error = 0.0
    for mine, whole in zip(sharded.parameters(), full_model.parameters(), strict=True):
        summed = torch.zeros_like(mine) if mine.grad is None else mine.grad.clone()
        dist.all_reduce(summed)
        grad_error = max(grad_error, _rel(summed, whole.grad))
    assert error < 1e-10 and grad_error < 1e-10, (float(error), grad_error)
    return True


def longnet_over_a_group_copies():
    """``copy.deepcopy`` / ``AveragedModel`` (an EMA model) of a LongNet built with
    ``LongNetConfig(group=...)``: its config held the process group, which raised "cannot pickle
    'ProcessGroup' object". The copy runs as the model does."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    from ringattn.models import LongNet, LongNetConfig

    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=32, dim=16, depth=1, num_heads=2, segment_lengths=(8, 64),
        dilation_rates=(1, 2), strategy=ringattn.Strategy(communicator="ring"),
        group=dist.group.WORLD,
    )  # fmt: skip
    model = LongNet(config)
    tokens = distributed.shard(torch.randint(0, 32, (2, 64), generator=torch.Generator()))
    ema = AveragedModel(model)
    copied = copy.deepcopy(model)
    assert copied.config is model.config
    return float((copied(tokens) - model(tokens)).abs().max()), float(
        (ema(tokens) - model(tokens)).abs().max()
    )


def longnet_loss_is_the_whole_sequences(communicator, layout="contiguous"):
    """``LongNet.loss`` sequence-parallel: every rank's value is the one-process model's loss
    over the whole sequence, and the mean of the ranks' parameter gradients (DDP's) its
    gradient, though the shards hold different numbers of scored targets (the last rank's
    none). Each rank's own mean weighted a shard of 3 scored targets as much as a full one
    (gradients 2x off) and was NaN on a shard of none."""
    from ringattn.models import LongNet, LongNetConfig

    def model(strategy):
        torch.manual_seed(0)
        config = LongNetConfig(
            vocab_size=32, dim=16, depth=1, num_heads=2, segment_lengths=(8, 64),
            dilation_rates=(1, 2), strategy=strategy,
            layout="contiguous" if strategy.communicator == "local" else layout,
        )  # fmt: skip
        return LongNet(config).double()

    p = dist.get_world_size()
    tokens = torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(0))
    # the last rank's shard holds no scored target, the first rank's 13 of row 0's 16 / 32, the
    # others row 0's (row 1 is padding throughout)
    targets = tokens.roll(-1, 1)
    targets[1] = -100
    targets[:, distributed.positions(64 // p, p - 1, p, layout)] = -100
    targets[0, distributed.positions(64 // p, 0, p, layout)[:3]] = -100
    full_model = model(ringattn.Strategy(computer="math"))
    full_loss = full_model.loss(tokens, targets)
    full_loss.backward()
    sharded = model(ringattn.Strategy(computer="math", communicator=communicator))
    loss = sharded.loss(
        distributed.shard(tokens, layout=layout), distributed.shard(targets, layout=layout)
    )
    loss.backward()
    grad_error = 0.0
    for mine, whole in zip(sharded.parameters(), full_model.parameters(), strict=True):
        mean = torch.zeros_like(mine) if mine.grad is None else mine.grad.clone()
        dist.all_reduce(mean)
        grad_error = max(grad_error, _rel(mean / p, whole.grad))
    return float((loss - full_loss).abs()), grad_error


def compiled_longnet_loss_checks_targets_on_every_rank(communicator):
    """``torch.compile(model.loss, fullgraph=True)`` sequence-parallel: one graph, the eager
    loss; with an id out of range in rank 1's shard alone every rank raises (the count of bad
    ids rides the loss's all-reduce). The eager range check branched on the ids, so the trace
    failed; a check on rank 1 alone would leave the others in the all-reduce."""
    from torch._dynamo.utils import counters

    from ringattn.models import LongNet, LongNetConfig

    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=32, dim=16, depth=1, num_heads=2, segment_lengths=(8, 64),
        dilation_rates=(1, 2), strategy=ringattn.Strategy(communicator=communicator),
    )  # fmt: skip
    model = LongNet(config)
    tokens = torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(0))
    targets = distributed.shard(tokens.roll(-1, 1))
    tokens = distributed.shard(tokens)
    eager = model.loss(tokens, targets)  # the eager call a compiled model needs first
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    counters.clear()
    error = float((compiled(tokens, targets) - eager).abs())
    assert counters["stats"]["unique_graphs"] == 1
    if dist.get_rank() == 1:
        targets = targets.clone()
        targets[0, 0] = 32
    try:
        compiled(tokens, targets)
    except ValueError as exc:
        return error, str(exc)
    return error, "no error"


def compiled_model_matches_eager(communicator, layout="contiguous", compile=True):
    """A model compiled as a whole (fullgraph) captures the sequence-parallel core as its opaque
    ops: outputs and gradients equal the eager module's, and the oracle's. ``compile=False``
    too (LongNet's default): its eager call's spec was kept under the compile flag, so the
    trace did not find it and raised that the module must run eagerly first."""
    p = dist.get_world_size()
    b, n, h, d = 2, 32 * p, 3, 8
    lengths = (8, n) if layout == "contiguous" else (8, 2 * n)
    options = {"segment_lengths": lengths, "dilation_rates": (1, 2), "causal": True}
    (q, k, v), grad = full_problem(b, n, h, d, 0, torch.float32)
    module = ringattn.DilatedAttention(
        lengths,
        (1, 2),
        causal=True,
        strategy=ringattn.Strategy(communicator=communicator, computer="sdpa"),
        layout=layout,
        compile=compile,
    )

    def shard(x):
        return distributed.shard(x, layout=layout)

    def run(fn):
        xs = [shard(x).requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        return [out, *torch.autograd.grad(out, xs, shard(grad))]

    from torch._dynamo.utils import counters

    eager = run(module)  # the first call checks the ranks and registers the core's ops
    # a fresh Dynamo cache: a module freed by an earlier case may have had this one's address
    torch._dynamo.reset()
    model = torch.compile(module, fullgraph=True, backend="aot_eager")
    counters.clear()
    compiled = run(model)
    assert counters["stats"]["unique_graphs"] == 1  # captured as one graph, not run eagerly
    for a, e in zip(compiled, eager):
        assert _rel(a, e) <= 1e-6, _rel(a, e)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(*ref_in, **options)
    assert _rel(compiled[0], shard(ref)) <= TOL["float32"]
    return True


def compiled_model_needs_an_eager_call_first(communicator):
    module = ringattn.DilatedAttention(
        (8, 64), (1, 2), strategy=ringattn.Strategy(communicator=communicator)
    )
    x = torch.randn(1, 64 // dist.get_world_size(), 2, 8)
    torch._dynamo.reset()  # trace afresh (no cached graph of an earlier module at this address)
    try:
        torch.compile(module, fullgraph=True, backend="aot_eager")(x, x, x)
    except Exception as exc:  # Dynamo wraps the ValueError raised while tracing
        return str(exc)
    raise AssertionError("no error")


def compiled_divergent_call_raises_everywhere(communicator):
    """A compiled model whose rank 1 alone gets a short last batch (a shape its graph takes:
    the module's eager spec depends on n, h, d only). The eager boundary's check is not in the
    graph; the opaque op ran the ring on the two batch sizes and gloo aborted the process
    ("Received data size doesn't match expected size") while the other rank waited. Now the op
    makes the check at run time: a ValueError on every rank, then the agreed calls go on."""
    module = ringattn.DilatedAttention(
        (8, 16 * dist.get_world_size()),
        (1, 2),
        strategy=ringattn.Strategy(communicator=communicator, computer="sdpa"),
    )
    q = torch.randn(2, 16, 2, 8)
    module(q, q, q)  # the eager call a compiled model needs first
    torch._dynamo.reset()  # trace afresh (no cached graph of an earlier module at this address)
    model = torch.compile(module, fullgraph=True, backend="aot_eager")
    model(q, q, q)
    last = q[:1] if dist.get_rank() == 1 else q
    message = _value_error_of(lambda: model(last, last, last))
    return message, model(q, q, q).shape == q.shape


def compiled_grad_mode_divergence_raises_everywhere(communicator, what):
    """A compiled model called under no_grad on rank 1 alone (``what="no_grad"``), or with
    inputs that need no gradient there (``"requires_grad"``). Inside the opaque op, where the
    ranks' check runs, autograd is off and nothing requires a grad, so the check passed; rank 0
    then waited in its backward for a rank that had moved on (a hang; eager calls raised). Now
    the trace hands the op the call's grad state: a ValueError on every rank, then the agreed
    calls go on."""
    module = ringattn.DilatedAttention(
        (8, 16 * dist.get_world_size()),
        (1, 2),
        strategy=ringattn.Strategy(communicator=communicator),
    )
    q = torch.randn(2, 16, 2, 8, requires_grad=True)
    module(q, q, q)  # the eager call a compiled model needs first
    torch._dynamo.reset()  # trace afresh (no cached graph of an earlier module at this address)
    model = torch.compile(module, fullgraph=True, backend="aot_eager")
    model(q, q, q).sum().backward()
    alone = dist.get_rank() == 1
    if what == "no_grad":
        with torch.no_grad() if alone else contextlib.nullcontext():
            message = _value_error_of(lambda: model(q, q, q).sum().backward())
    else:
        x = q.detach() if alone else q
        message = _value_error_of(lambda: model(x, x, x).sum().backward())
    model(q, q, q).sum().backward()
    return message, q.grad is not None


def divergent_call_after_a_graph_break_raises_everywhere(communicator):
    """A user's torch.compile (no fullgraph) gave a call at a new n back to eager (a graph
    break: the module had not run eagerly at that n); Dynamo then traces each frame the eager
    call runs, the ranks' check too, and a later divergent call raised Dynamo's internal
    UnsafeScriptObjectError on every rank instead of the ValueError naming their calls."""
    p = dist.get_world_size()
    module = ringattn.DilatedAttention(
        (8, 32, 64), (1, 2, 4), causal=True, strategy=ringattn.Strategy(communicator=communicator)
    )

    def shards(n):
        return [torch.randn(1, n // p, 4, 4, requires_grad=True) for _ in range(3)]

    for n in (64, 128):
        module(*shards(n))
    torch._dynamo.reset()  # trace afresh (no cached graph of an earlier module at this address)
    compiled = torch.compile(lambda q, k, v: module(q * 2, k, v), backend="aot_eager")
    for n in (64, 128, 256):  # (256: never run eagerly, so the trace breaks there)
        compiled(*shards(n))
    return _value_error_of(lambda: compiled(*shards(256 if dist.get_rank() == 0 else 64)))


def backwards_of_other_calls_raise_everywhere(communicator, case):
    """Ranks whose backwards belong to other calls: ``"order"``, two modules of one config
    differentiated in other orders on rank 0 and the rest (their ring messages paired across
    the calls: every rank's gradients wrong, silently); ``"skipped"``, rank 1 skipping a
    backward for its next forward (the others waited in theirs: a hang). Each raises on every
    rank; then the ranks' agreed calls go on."""
    first, second = (
        _small_module({"communicator": communicator}),
        _small_module({"communicator": communicator}),
    )
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, y = ([torch.randn(2, 16, 2, 8, generator=gen, requires_grad=True)] * 3 for _ in range(2))
    out_first, out_second = first(*x), second(*y)
    alone = dist.get_rank() == 1
    if case == "order":
        order = (out_second, out_first) if alone else (out_first, out_second)
        message = _value_error_of(lambda: [out.sum().backward() for out in order])
    else:
        message = _value_error_of(
            lambda: first(*x) if alone else torch.autograd.grad(out_first.sum(), x[0])
        )
    x = [x[0].detach().requires_grad_()] * 3
    expected = torch.autograd.grad(first(*x).sum(), x[0])[0]
    again = torch.autograd.grad(first(*x).sum(), x[0])[0]
    return message, torch.equal(expected, again)


def calls_over_another_group_do_not_shift_the_count(communicator):
    """A rank's calls over its own group (here one of one rank each; rank 1's alone makes one)
    leave the numbering of the world's calls alone: counted per process, rank 1's world backward
    named another forward call than the others' and every rank raised, though all made the
    same calls over the world."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group([r]) for r in range(world)]  # (every rank makes every group)
    fields = {"communicator": communicator}
    q = torch.randn(2, 16, 2, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    if rank == 1:
        own = ringattn.DilatedAttention(
            (8, 16), (1, 2), strategy=ringattn.Strategy(**fields), group=groups[rank]
        )
        own(q, q, q).sum().backward()
    module = _small_module(fields)
    module(q, q, q).sum().backward()
    for group in groups:
        dist.destroy_process_group(group)
    return True


def a_step_compiled_on_one_rank_and_eager_on_another(communicator):
    """One step that rank 0 runs through a compiled model and the others eagerly (Dynamo's
    choice can depend on a shard's values: a recompile limit, ``eager_on_recompile``), then
    eager steps. The compiled forward was not numbered and its backward has no number: the
    mixed step's backward and every later one were refused (the counts never met again)."""
    module = _small_module({"communicator": communicator})
    q = torch.randn(2, 16, 2, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    q.requires_grad_()
    (expected,) = torch.autograd.grad(module(q, q, q).sum(), q)  # (also the eager call first)
    torch._dynamo.reset()  # trace afresh (no cached graph of an earlier module at this address)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    step = compiled if dist.get_rank() == 0 else module
    grads = [torch.autograd.grad(step(q, q, q).sum(), q)[0]]
    grads += [torch.autograd.grad(module(q, q, q).sum(), q)[0] for _ in range(2)]
    return max(float((g - expected).abs().max()) for g in grads)


def a_forward_failing_on_one_rank_after_its_messages(communicator):
    """Rank 1's forward raises after all its messages (its last local kernel or an OOM that a
    training loop catches and skips), while its peers' forwards return. The next steps agree
    and must run: numbered after the work, rank 1's call count stayed one behind and every
    later backward over the group was refused on every rank ("differ in: forward call").
    Returns whether rank 1 raised, and the later steps' gradients' distance from the first's."""
    from ringattn import core

    module = _small_module({"communicator": communicator})
    q = torch.randn(2, 16, 2, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    q.requires_grad_()
    (expected,) = torch.autograd.grad(module(q, q, q).sum(), q)
    original = core.dilated_forward

    def failing(*args, **kwargs):
        original(*args, **kwargs)
        raise torch.OutOfMemoryError("injected after the forward's messages")

    raised = False
    core.dilated_forward = failing if dist.get_rank() == 1 else original
    try:
        module(q, q, q)
    except torch.OutOfMemoryError:
        raised = True
    finally:
        core.dilated_forward = original
    grads = [torch.autograd.grad(module(q, q, q).sum(), q)[0] for _ in range(2)]
    return raised, max(float((g - expected).abs().max()) for g in grads)


def _small_module(strategy_fields=None) -> ringattn.DilatedAttention:
    """The rank-agreement cases' module: ``(8, 16)`` / ``(1, 2)``, eager, ring by default."""
    fields = strategy_fields or {"communicator": "ring"}
    return ringattn.DilatedAttention(
        (8, 16), (1, 2), strategy=ringattn.Strategy(**fields), compile=False
    )


def later_divergent_call_raises_everywhere(strategy_fields):
    """A rank repeating an agreed call while another makes a new one (an uneven last batch)
    raises on both, instead of one waiting in the check while the other starts the ring."""
    module = _small_module(strategy_fields)
    q = torch.randn(2, 16, 2, 8)
    module(q, q, q)
    module(q, q, q)
    last = q[:1] if dist.get_rank() == 1 else q  # rank 1's last batch is short
    return _value_error_of(lambda: module(last, last, last))


def an_nccl_sub_group_agrees_on_the_calls_gpu():
    """An NCCL-only sub-group (no gloo twin) agrees on the GPU of the call's tensors, which its
    ring uses, not on the current GPU (that put every rank that never set its device on GPU 0).
    Here gloo poses as NCCL and the CPU as the GPU: the devices asked for are recorded. Groups
    of 2 at p >= 4 (the second rank's batch differs: the report runs too), else of 1."""
    import contextlib
    from unittest import mock

    p, rank = dist.get_world_size(), dist.get_rank()
    size = 2 if p >= 4 else 1
    groups = [dist.new_group(list(range(i, i + size))) for i in range(0, p, size)]
    group = groups[rank // size]
    asked: list = []
    entered: list = []

    def recorded(device):
        asked.append(device)
        return torch.device("cpu")

    def current(device):
        entered.append(device)
        return contextlib.nullcontext()

    strategy = ringattn.Strategy(communicator="ring")
    module = ringattn.DilatedAttention((8, 16), (1, 2), strategy=strategy, group=group)
    q = torch.randn(1 + rank % size, 16, 2, 8)
    with (
        mock.patch.object(distributed.dist, "get_backend", return_value="nccl"),
        mock.patch.object(distributed, "nccl_device", recorded),
        mock.patch.object(distributed.torch.cuda, "device", current),
    ):
        if size > 1:
            message = _value_error_of(lambda: module(q, q, q))
        else:
            module(q, q, q)
            message = "no error"
        distributed.gather(torch.randn(1, 4), group)
        # a layer's own refusal (x of the wrong width, on every rank) joins the agreement too
        layer = ringattn.MultiheadDilatedAttention(
            16, 2, (8,), (1,), strategy=strategy, group=group
        )
        try:
            layer(torch.randn(1, 16, 15))
        except (TypeError, ValueError):
            pass
        else:
            raise AssertionError("no error")
    for g in groups:
        dist.destroy_process_group(g)
    return asked, entered, message


def agree_on_call_numbers():
    """``distributed.agree``'s call numbers: equal digests agree where every rank passed the
    same number, or some passed none (a compiled graph's backward); two different numbers
    disagree, whoever passed none; a digest that differs disagrees whatever the numbers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {
        "all unnumbered": (None, True),
        "all the same": (7, True),
        "rank 0 unnumbered": (None if rank == 0 else 7, True),
        "rank 0 alone numbered": (7 if rank == 0 else None, True),
        "two numbers": (7 if rank == 1 else 8, False),
        # (two numbers from 3 ranks on; on 2, one number and none)
        "two numbers and none": (None if rank == 0 else 7 + (rank == world - 1), world == 2),
        "a negative number": (-3, True),
    }
    world_group = dist.group.WORLD
    answers = {name: distributed.agree(world_group, 5, call=c) for name, (c, _) in cases.items()}
    answers["digests differ"] = distributed.agree(world_group, 5 + rank, call=7)
    expected = {name: want for name, (_, want) in cases.items()} | {"digests differ": False}
    return answers == expected or answers


def agree_on_a_gloo_side_group():
    """``distributed.agree`` on a group whose backend is not gloo (NCCL on GPUs) makes a gloo
    side group of the same ranks once, and answers on it: equal digests agree, unequal ones
    disagree on every rank. (Here the group is gloo; its backend is reported as NCCL's.)"""
    from unittest import mock

    # a group only rank 0 is in: ranks count their groups differently from here on (a side group
    # made with local synchronisation would get a different name on each rank, and hang)
    dist.new_group([0])
    group = dist.new_group(list(range(dist.get_world_size())))
    with mock.patch.object(distributed.dist, "get_backend", return_value="nccl"):
        same = distributed.agree(group, 12345)
        side = distributed._SIDE_GROUPS[group]
        differ = distributed.agree(group, 7 + dist.get_rank())
    assert side is not group and dist.get_process_group_ranks(side) == list(
        range(dist.get_world_size())
    )
    # and a disagreement's report gathers the signatures there too, not on the NCCL group
    # (whose objects travel on the current GPU: shared by ranks that never set theirs)
    gathered_on = []
    gather = distributed.dist.all_gather_object

    def recorded(out, obj, group=None):
        gathered_on.append(group)
        return gather(out, obj, group=group)

    with (
        mock.patch.object(distributed.dist, "get_backend", return_value="nccl"),
        mock.patch.object(distributed.dist, "all_gather_object", recorded),
    ):
        try:
            distributed.require_agreement(group, ("call", dist.get_rank()))
        except ValueError:
            pass
        else:
            raise AssertionError("no error")
    assert gathered_on == [side], gathered_on
    return same, differ


def first_call_checks_only_skip_the_agreement():
    """``check_every_call = False``: a signature's later calls post no collective of the check
    (counted through ``distributed.agree``)."""
    from unittest import mock

    module = _small_module()
    module.check_every_call = False
    q = torch.randn(1, 16, 2, 8)
    with mock.patch.object(distributed, "agree", wraps=distributed.agree) as agree:
        for _ in range(3):
            module(q, q, q)
        first_only = agree.call_count
        module.check_every_call = True
        module(q, q, q)
    return first_only, agree.call_count


def first_backward_checks_only_skip_the_agreement():
    """``check_every_call = False`` holds for the backward too: a signature's later backwards
    post no collective of their check (``check_backward_across_ranks``), counted through
    ``distributed.agree`` as the forward's are."""
    from unittest import mock

    module = _small_module()
    module.check_every_call = False
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    with mock.patch.object(distributed, "agree", wraps=distributed.agree) as agree:
        for _ in range(3):
            module(q, q, q).sum().backward()
        first_only = agree.call_count  # the first forward's and the first backward's
        module.check_every_call = True
        module(q, q, q).sum().backward()
    return first_only, agree.call_count


def a_bad_input_on_one_rank_raises_everywhere():
    """A rank passing a non-tensor is named on every rank (the ranks agree before any rank's own
    validation, which would otherwise raise on that rank alone and leave the others waiting);
    that rank's own error says what is wrong with its argument."""
    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    return _messages_of(lambda: module(q.tolist() if dist.get_rank() == 1 else q, q, q))


def a_nested_input_on_one_rank_raises_everywhere():
    """As a non-tensor: rank 1 passing a nested tensor (which has no ``.shape``) is described
    to the other ranks as one, and named on every rank, before any rank's own validation."""
    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    nested = torch.nested.nested_tensor([q[0]])
    return _messages_of(lambda: module(nested if dist.get_rank() == 1 else q, q, q))


def a_sequence_parallel_module_refuses_its_own_compiled_frame(compile_mode: str) -> str:
    """A sequence-parallel module cannot run in a compiled frame of its own (another
    compile_mode than the default): refused at construction, naming the way out."""
    return _messages_of(
        lambda: ringattn.DilatedAttention(
            (8, 16), (1, 2), strategy=ringattn.Strategy(communicator="ring"), compile=True,
            compile_mode=compile_mode,
        )
    )  # fmt: skip


def a_functional_call_refused_on_one_rank_raises_everywhere(what: str) -> str:
    """The functional form over a sequence-parallel strategy, rank 1 alone passing a bad
    argument: its own check (q, k, v's plain rules, the options') raised there alone, and the
    other ranks waited in the call's agreement until the group's timeout."""
    odd = dist.get_rank() == 1
    q = torch.randn(1, 16, 2, 8)
    k = {"list": q.tolist(), "shape": torch.randn(1, 16, 1, 8)}.get(what, q) if odd else q
    scale = 0.0 if odd and what == "scale" else 0.5
    ring = ringattn.Strategy(communicator="ring")
    return _messages_of(
        lambda: ringattn.dilated_attention(
            q, k, q, segment_lengths=(8,), dilation_rates=(2,), scale=scale, strategy=ring,
            compile=False,
        )
    )  # fmt: skip


def a_loss_on_the_gathered_output_trains_the_inputs(layout: str, grad: str = "shard"):
    """A loss on ``gather(out)``: with ``grad="shard"`` the same loss on every rank, with
    ``"sum"`` a loss of each rank's own (its weight scaled by rank + 1, so the ranks' losses
    differ). The shards' gradients, summed over the ranks, are the oracle's for the loss trained
    (one rank's loss, or the sum of all ranks'). (gather returned a tensor without a graph: no
    gradient reached q, k, v, silently.)"""
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(1, 32 * world, 2, 8, generator=gen) for _ in range(4))
    module = ringattn.DilatedAttention(
        (8, 16), (1, 2), strategy=ringattn.Strategy(communicator="ring"), compile=False,
        layout=layout,
    )  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    shards = [distributed.shard(x, layout=layout) for x in leaves]
    full = distributed.gather(module(*shards), layout=layout, grad=grad)
    mine = w * (rank + 1) if grad == "sum" else w
    (full * mine).sum().backward()
    grads = [x.grad for x in leaves]
    for g in grads:
        dist.all_reduce(g)
    trained = w * sum(range(1, world + 1)) if grad == "sum" else w
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(*ref_in, segment_lengths=(8, 16), dilation_rates=(1, 2))
    ref_grads = torch.autograd.grad((ref * trained.double()).sum(), ref_in)
    errors = [float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, ref_grads)]
    return full.requires_grad, errors


def gather_sum_leaves_the_callers_gradient_alone():
    """``gather(grad="sum")``'s backward given the caller's own gradient (``autograd.grad``'s
    ``grad_outputs``), twice: the all-reduce summed it in place, so the caller's tensor came back
    as the ranks' sum and the second backward summed that sum again (p + 1 times too large with
    2 ranks). Returns (the caller's tensor unchanged, the two gradients equal, the first one
    the ranks' sum)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(1, 4, 2, requires_grad=True)
    full = distributed.gather(x, grad="sum")
    mine = torch.full(full.shape, float(rank + 1))  # a gradient of each rank's own
    kept = mine.clone()
    (first,) = torch.autograd.grad(full, x, mine, retain_graph=True)
    (second,) = torch.autograd.grad(full, x, mine)
    summed = float(sum(range(1, world + 1)))
    return torch.equal(mine, kept), torch.equal(first, second), bool((first == summed).all())


def gather_sum_of_bf16_rounds_once(layout: str) -> tuple[str, int, int]:
    """``gather(grad="sum")`` of a bf16 shard, each rank's gradient whole numbers in [0, 256)
    (exact in bf16; their sum exact in float32): this rank's shard of the sum must be the exact
    sum rounded once to bf16. Returns the gradient's dtype, the count of its elements off that
    and the count of elements."""
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.zeros(2, 16, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    full = distributed.gather(x, layout=layout, grad="sum")
    mine = [
        torch.randint(0, 256, full.shape, generator=torch.Generator().manual_seed(r)).double()
        for r in range(world)
    ]
    (got,) = torch.autograd.grad(full, x, mine[rank].to(torch.bfloat16))
    want = distributed.shard(sum(mine), layout=layout).to(torch.bfloat16)
    return str(got.dtype), int((got != want).sum()), got.numel()


def gather_shard_with_a_graph_on_some_ranks():
    """``grad="shard"``: each rank's backward is local (no collective), so a graph on rank 1
    only is fine (unlike ``"sum"``, where the others would not join its all-reduce). Returns
    (the result has a graph, its gradient is this rank's shard of the ones')."""
    x = torch.randn(1, 4, 2, requires_grad=dist.get_rank() == 1)
    full = distributed.gather(x)
    if not full.requires_grad:
        return False, x.grad is None
    (grad,) = torch.autograd.grad(full, x, torch.arange(full.numel()).view(full.shape).float())
    want = distributed.shard(torch.arange(full.numel()).view(full.shape).float())
    return True, torch.equal(grad, want)


def gather_with_another_grad_on_one_rank_raises_everywhere():
    """``grad`` differing across ranks: one rank's backward would all-reduce while the others'
    did not (a hang); the forward's agreement names it on every rank instead."""
    x = torch.randn(1, 4, 2, 3, requires_grad=True)
    grad = "sum" if dist.get_rank() == 1 else "shard"
    return _messages_of(lambda: distributed.gather(x, grad=grad))


def gather_refusals_raise_everywhere() -> dict[str, str]:
    """Each rank's message for gather calls that must raise on every rank, by case (before:
    an odd zigzag shard was scrambled silently; a layout, a 1-D tensor or a graph under
    ``grad="sum"`` on one rank only gave wrong rows, a raise on that rank alone, or a backward
    all-reduce paired with another collective)."""
    rank = dist.get_rank()
    odd = torch.arange(3.0)[None] + 10 * rank
    return {
        "odd zigzag shard": _messages_of(lambda: distributed.gather(odd, layout="zigzag")),
        "layout on one rank": _messages_of(
            lambda: distributed.gather(
                torch.randn(1, 4), layout="zigzag" if rank == 1 else "contiguous"
            )
        ),
        "unknown layout on one rank": _messages_of(
            lambda: distributed.gather(torch.randn(1, 4), layout="zz" if rank == 1 else "zigzag")
        ),
        "1-D on one rank": _messages_of(
            lambda: distributed.gather(torch.randn(4) if rank == 1 else torch.randn(1, 4))
        ),
        "graph on one rank": _messages_of(
            lambda: distributed.gather(torch.randn(1, 4, requires_grad=rank == 1), grad="sum")
        ),
        "1-D shard": _messages_of(lambda: distributed.shard(torch.randn(8))),
        "list shard": _messages_of(lambda: distributed.shard([1, 2])),  # type: ignore[arg-type]
    }


def gather_with_an_unknown_grad_raises():
    """The same unknown ``grad`` on every rank: each raises the ValueError naming it."""
    return _messages_of(lambda: distributed.gather(torch.randn(1, 4, 2, 3), grad="mean"))


def a_dual_tensor_on_one_rank_raises_everywhere():
    """A forward-mode AD dual tensor on one rank: that rank's refusal (a TypeError) raised there
    alone, and the other ranks waited in the exchange, or, calling again, paired with its next
    call."""
    import torch.autograd.forward_ad as fwAD

    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    with fwAD.dual_level():
        mine = fwAD.make_dual(q, torch.ones_like(q)) if dist.get_rank() == 1 else q
        return _messages_of(lambda: module(mine, q, q))


def a_dtensor_on_one_rank_raises_everywhere():
    """A DTensor on one rank (as a tensor-parallel layer would pass): that rank's refusal names
    to_local(), and the other ranks, instead of waiting for it in the ring, name its error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    module = _small_module()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    q = torch.randn(1, 16, 2, 8)
    mine = DTensor.from_local(q, mesh, [Shard(1)], run_check=False) if dist.get_rank() == 1 else q
    return _messages_of(lambda: module(mine, q, q))


def a_bad_input_on_every_rank_is_named_everywhere():
    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    try:
        module(q.tolist(), q, q)
    except TypeError as exc:
        return str(exc)
    raise AssertionError("no error")


def _value_error_of(call) -> str:
    """The message of the ValueError ``call()`` raises (AssertionError if none)."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    raise AssertionError("no error")


def _messages_of(call) -> str:
    """``call()``'s exception as ``"TypeName: message"`` (AssertionError if none): a rank's
    answer in the one-rank-differs cases."""
    try:
        call()
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("no error")


def a_rank_with_another_option_raises_everywhere(field: str) -> str:
    """Rank 1 alone calls with another strategy, layout or grad mode. The config here is
    shard-local in either layout, so nothing travels and, unchecked, every rank returns: rank 1's
    rows meant other positions (layout), or its ring and its peers' all-gather would have posted
    different collectives on a spanning config (strategy). Only the agreement can tell."""
    odd = dist.get_rank() == 1
    fields = {"communicator": "all_gather" if odd and field == "strategy" else "ring"}
    module = ringattn.DilatedAttention(
        (4, 8),
        (1, 2),
        strategy=ringattn.Strategy(**fields),
        compile=False,
        layout="zigzag" if odd and field == "layout" else "contiguous",
    )
    q = torch.randn(1, 16, 2, 8)
    with torch.set_grad_enabled(not (odd and field == "grad mode")):
        return _value_error_of(lambda: module(q, q, q))


def a_rank_with_another_switch_raises_everywhere(switch: str, backward: bool) -> str:
    """Rank 0 alone sets ``pattern.BLOCK_SPLIT = 64`` or ``launches.FUSE_OFFSETS = False`` (a
    notebook on one rank), before the forward or, ``backward``, between it and its backward. The
    ``(16p, 4)`` config spans every rank; with 8 heads its 4 offsets travel as 2 runs, or as 4
    blocks (1-2 parts each) with the switch flipped: unchecked, rank 0's ring messages met its
    peers' of other sizes and gloo aborted rank 1's process ("Received data size doesn't match
    expected size"). Returns this rank's ValueError."""
    from ringattn import launches, pattern

    module = ringattn.DilatedAttention(
        (16 * dist.get_world_size(), 8),
        (4, 1),
        strategy=ringattn.Strategy(communicator="ring"),
        compile=False,
    )
    q = torch.randn(1, 16, 8, 8, requires_grad=backward)
    defaults = pattern.BLOCK_SPLIT, launches.FUSE_OFFSETS

    def flip() -> None:
        if dist.get_rank() == 0:
            pattern.BLOCK_SPLIT, launches.FUSE_OFFSETS = (
                (64, True) if switch == "BLOCK_SPLIT" else (8, False)
            )

    try:
        if not backward:
            flip()
            return _value_error_of(lambda: module(q, q, q))
        out = module(q, q, q)
        flip()
        return _value_error_of(lambda: out.sum().backward())
    finally:
        pattern.BLOCK_SPLIT, launches.FUSE_OFFSETS = defaults


def a_rank_whose_inputs_alone_require_grad_raises_everywhere() -> str:
    """Rank 1 alone trains (its inputs require grad, its peers' do not; grad mode on
    everywhere). The segment spans every rank, so unchecked every forward returns alike and
    rank 1's backward then waits in the ring for peers that never call theirs."""
    module = ringattn.DilatedAttention(
        (16 * dist.get_world_size(),),
        (1,),
        strategy=ringattn.Strategy(communicator="ring"),
        compile=False,
    )
    q = torch.randn(1, 16, 2, 8).requires_grad_(dist.get_rank() == 1)
    return _value_error_of(lambda: module(q, q, q))


def ranks_under_different_autocasts_raise_everywhere():
    """Rank 0 under bf16 autocast, rank 1 under fp16: float32 inputs agreed on, then each cast
    to its own dtype, exchanged each other's bytes (relative error 1.7, no error)."""
    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    dtype = torch.bfloat16 if dist.get_rank() == 0 else torch.float16
    with torch.autocast("cpu", dtype=dtype):
        return _messages_of(lambda: module(q, q, q))


def a_sparse_input_on_one_rank_raises_everywhere():
    """A sparse q of the right shape and dtype on one rank: the ranks agreed, then that rank's
    own check raised while the other waited in the ring. Now the ranks disagree (the layout is
    in the call's signature) and that rank's own check names the rule."""
    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    mine = q.to_sparse() if dist.get_rank() == 1 else q
    return _messages_of(lambda: module(mine, q, q))


def _layer(layout: str = "contiguous", rotary: bool = False):
    from ringattn.nn import MultiheadDilatedAttention

    torch.manual_seed(0)
    strategy = ringattn.Strategy(communicator="ring")
    return MultiheadDilatedAttention(
        16, 2, (8, 16), (1, 2), strategy=strategy, compile=False, layout=layout,
        rotary_embedding=rotary, causal=True,
    )  # fmt: skip


def a_layers_bad_input_on_one_rank_raises_everywhere(case: str):
    """A layer's own checks (before its projections and the attention's agreement) failing on
    one rank: every rank raises, the failing one its own error, instead of the others waiting
    in the ring. ``case``: what rank 1 passes."""
    from ringattn.models import LongNet, LongNetConfig

    bad = dist.get_rank() == 1
    if case == "layer_dtype":
        layer = _layer()
        x = torch.randn(1, 16, 16, dtype=torch.float64 if bad else torch.float32)
        return _messages_of(lambda: layer(x))
    if case == "layer_embed_dim":
        layer = _layer()
        return _messages_of(lambda: layer(torch.randn(1, 16, 12 if bad else 16)))
    if case == "layer_device":  # (the projection's RuntimeError stayed on that rank)
        layer = _layer()
        return _messages_of(lambda: layer(torch.randn(1, 16, 16, device="meta" if bad else None)))
    if case == "zigzag_odd_shard":  # rotary's positions of an odd zigzag shard
        layer = _layer("zigzag", rotary=True)
        return _messages_of(lambda: layer(torch.randn(1, 15 if bad else 16, 16)))
    config = LongNetConfig(
        vocab_size=32, dim=16, depth=2, num_heads=2, segment_lengths=(8, 16),
        dilation_rates=(1, 2), strategy=ringattn.Strategy(communicator="ring"), compile=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LongNet(config)
    tokens = torch.randint(0, 32, (1, 16))
    if case == "model_float_tokens":
        return _messages_of(lambda: model(tokens.float() if bad else tokens))
    if case == "model_token_out_of_range":
        return _messages_of(lambda: model(tokens + 32 if bad else tokens))
    if case == "model_loss_float_targets":
        return _messages_of(lambda: model.loss(tokens, tokens.float() if bad else tokens))
    if case == "model_loss_target_out_of_range":  # (rank 0 waited in the ring's backward)
        return _messages_of(lambda: model.loss(tokens, tokens + 32 if bad else tokens))
    raise AssertionError(case)


def a_sequence_parallel_module_copies_and_pickles():
    """deepcopy (an EMA model) shares the process group; pickle / torch.save over the world
    group resolves it again on load, with the loading rank's place in it; all compute what the
    original does. (Both raised "cannot pickle 'ProcessGroup' object"; one saved by rank 0 had
    every rank call itself rank 0.)"""
    import copy
    import io
    import pickle

    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    want = module(q, q, q)
    copied = copy.deepcopy(module)
    assert copied.communicator.group is module.communicator.group
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    pickled = pickle.loads(pickle.dumps(module))
    # saved by rank 0 only and loaded on every rank (torch.save(model) on rank 0, torch.load
    # everywhere): each rank takes its own place, not rank 0's
    saved = [pickle.dumps(module) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    from_rank0 = pickle.loads(saved[0])
    assert from_rank0.communicator.rank == dist.get_rank(), from_rank0.communicator.rank
    assert from_rank0.communicator.world_size == dist.get_world_size()
    q = torch.randn(1, 16, 2, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    want = module(q, q, q)
    return [bool(torch.equal(m(q, q, q), want)) for m in (copied, loaded, pickled, from_rank0)]


def a_sub_group_module_refuses_to_pickle():
    """A module over a sub-group (half the world) is refused by pickle and torch.save, and still
    deep-copies over its group. Without the refusal it pickled, and loaded over the world group
    (``__setstate__`` resolves the world): a module of another function (its segments spread
    over every rank's shards, not its group's), with no error until a call hung or mixed the
    groups' shards."""
    import copy
    import io
    import pickle

    world, rank = dist.get_world_size(), dist.get_rank()
    size = world // 2
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
    group = groups[rank // size]
    strategy = ringattn.Strategy(communicator="ring")
    module = ringattn.DilatedAttention((8, 16), (1, 2), strategy=strategy, group=group)
    messages = []
    for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        try:
            save(module)
        except TypeError as exc:
            messages.append(str(exc))
        else:
            messages.append("pickled")
    copied = copy.deepcopy(module).communicator.group is group
    for g in groups:
        dist.destroy_process_group(g)
    return messages, copied


def a_tensor_parallel_layer(rates, mixing):
    """torch's tensor parallelism on a MultiheadDilatedAttention (ColwiseParallel q/k/v,
    RowwiseParallel out): each rank's projections give it num_heads / p heads. Its output
    against the unsharded layer's (relative error), or the ValueError it raised: split by
    num_heads, each head's channels were cut across pseudo-heads (0.3-0.6 off, silently)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from ringattn.nn import MultiheadDilatedAttention

    torch.manual_seed(0)  # (the same weights and x on every rank)
    layer = MultiheadDilatedAttention(
        64, 8, (8, 16), rates, mixing=mixing, num_kv_heads=4, compile=False, sub_layer_norm=False
    )
    x = torch.randn(1, 16, 64)
    want = layer(x)
    plan = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(layer, mesh, {**plan, "out_proj": RowwiseParallel()})
    try:
        got = layer(x)
    except ValueError as exc:
        return str(exc)
    return float(((got - want).norm() / want.norm()).item())


def a_device_mesh_names_the_group():
    """A 1-D DeviceMesh passed as ``group`` gives its process group; a 2-D one and a name are
    refused naming ``group`` (torch's "Group ... is not registered" before)."""
    from torch.distributed.device_mesh import init_device_mesh

    p = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, p), mesh_dim_names=("dp", "sp"))
    # a segment over every rank's 16 rows: a group resolved wrongly (the mesh's dp dim, size
    # 1, or none) would attend within each shard and give another output
    configs, strategy = ((8, 16 * p), (1, 2)), ringattn.Strategy(communicator="ring")
    module = ringattn.DilatedAttention(*configs, strategy=strategy, compile=False, group=mesh["sp"])
    world = ringattn.DilatedAttention(*configs, strategy=strategy, compile=False)
    q = torch.randn(1, 16, 2, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    same = torch.equal(module(q, q, q), world(q, q, q))
    local = ringattn.DilatedAttention(*configs, compile=False)  # the shard alone
    same = same and not torch.allclose(module(q, q, q), local(q, q, q))
    errors = []
    for group in (mesh, "sp"):
        try:
            ringattn.DilatedAttention((8,), (1,), strategy=module.strategy, group=group)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    return same, errors


def _two_block_longnet(strategy, group=None, dtype=torch.float64):
    """A LongNet of two blocks in ``dtype``, one segment spanning 64 positions, seeded alike
    everywhere (over ``group``'s shards where ``strategy`` is sequence-parallel)."""
    from ringattn.models import LongNet, LongNetConfig

    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=32, dim=16, depth=2, num_heads=2, segment_lengths=(8, 64),
        dilation_rates=(1, 2), strategy=strategy, group=group,
    )  # fmt: skip
    return LongNet(config).to(dtype)


def _rotary_layer(strategy, group=None):
    """A causal MultiheadDilatedAttention with rotary positions, width 16, two heads, one
    segment spanning 32 positions (seed it first for the same weights everywhere). Rotary:
    without it K's bias gets no gradient, 0 up to rounding, whose relative error is noise."""
    from ringattn.nn import MultiheadDilatedAttention

    return MultiheadDilatedAttention(
        16, 2, (8, 32), (1, 2), causal=True, rotary_embedding=True, strategy=strategy,
        compile=False, group=group,
    )  # fmt: skip


def longnet_groups_side_by_side_match_the_full_model(size):
    """Data parallel x sequence parallel through ``LongNetConfig.group``: each group of ``size``
    ranks runs its own tokens; every rank's logits are its shard of the one-process model's.
    (w = 64 > n = 32: over the world the segment would span both groups' tokens.)"""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
    group = groups[rank // size]

    seed = torch.Generator().manual_seed(rank // size)  # one problem per group
    tokens = torch.randint(0, 32, (1, 32), generator=seed)
    full = _two_block_longnet(ringattn.Strategy(computer="math"))(tokens)
    sharded = _two_block_longnet(ringattn.Strategy(computer="math", communicator="ring"), group)
    logits = sharded(distributed.shard(tokens, group))
    error = float((logits - distributed.shard(full, group)).abs().max())
    for g in groups:
        dist.destroy_process_group(g)
    return error


# docs/semantics.md's "Parameter gradients under data parallelism": its DDP block, then its FSDP2
# block, each run as written; and the mistakes it warns of, each one change to what is written
RECIPE_VARIANTS = {
    "as written": (),
    "mesh['dp'] alone": (
        ("DDP(Loss(model))", 'DDP(Loss(model), process_group=mesh["dp"].get_group())'),
        ("fully_shard(model, mesh=mesh)", 'fully_shard(model, mesh=mesh["dp"])'),
        ("fully_shard(block, mesh=mesh, mp", 'fully_shard(block, mesh=mesh["dp"], mp'),
        ("fully_shard(model, mesh=mesh, mp", 'fully_shard(model, mesh=mesh["dp"], mp'),
    ),
    "ddp.module": (("ddp(inputs, targets)", "ddp.module(inputs, targets)"),),
}


def _recipe_blocks() -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "semantics.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    ddp = [b for b in blocks if "class Loss(" in b]
    fsdp = [b for b in blocks if "import fully_shard" in b]
    mixed = [b for b in blocks if "MixedPrecisionPolicy(" in b]
    assert len(ddp) == len(fsdp) == len(mixed) == 1, (len(ddp), len(fsdp), len(mixed))
    return [ddp[0], fsdp[0], mixed[0]]


def the_data_parallel_recipe_trains_the_batch(variant: str) -> list[float]:
    """The recipe's blocks on a (dp, sp) = (2, 2) mesh of the 4 ranks: each block's largest
    relative error of a parameter's gradient against one process's, the replicas' mean loss
    (DDP's) on the whole batch; for the mixed-precision block, the largest ratio of that error
    to bf16's bound or 4x one bf16 process's error (the test's bound for FSDP2 in bf16).
    ``variant`` (RECIPE_VARIANTS) changes what is written first."""
    from torch.distributed.tensor import DTensor

    blocks = _recipe_blocks()
    for old, new in RECIPE_VARIANTS[variant]:  # (a variant the docs outgrew: as written)
        assert sum(block.count(old) for block in blocks) == 1, (old, variant)
        blocks = [block.replace(old, new) for block in blocks]
    errors, scope = [], {}
    for block in blocks:
        exec(block, scope)
        grads = [
            g.full_tensor() if isinstance(g, DTensor) else g
            for g in (p.grad for p in scope["model"].parameters())
        ]
        wants = _one_process_grads(scope, torch.float32)
        if "MixedPrecisionPolicy(" not in block:
            errors.append(max(_rel(g, want) for g, want in zip(grads, wants, strict=True)))
            continue
        bf16 = _one_process_grads(scope, torch.bfloat16)
        bound = [max(TOL["bfloat16"], 4 * _rel(low, want)) for low, want in zip(bf16, wants)]
        errors.append(max(_rel(g, w) / b for g, w, b in zip(grads, wants, bound, strict=True)))
    return errors


def _one_process_grads(scope: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """The recipe's model's gradients in one process of ``dtype``: the replicas' mean loss."""
    from dataclasses import replace

    from ringattn.models import LongNet

    torch.manual_seed(0)
    whole = LongNet(replace(scope["config"], strategy=ringattn.Strategy(), group=None)).to(dtype)
    replicas = scope["tokens"].chunk(2)
    sum(whole.loss(rows[:, :-1], rows[:, 1:]) for rows in replicas).div(2).backward()
    return [p.grad for p in whole.parameters()]


def a_layer_under_ddp_over_dp_x_sp_trains_the_batch(loss: str, reduce: str) -> float:
    """A MultiheadDilatedAttention (causal, rotary) sequence-parallel over ``mesh["sp"]`` of a
    (2, 2) mesh, under DDP: the largest relative error of a parameter's gradient against one
    process's mean loss over the whole batch. ``loss``: each rank's own output shard's mean
    ("shard mean") or the mean of its replica's output gathered with ``grad="sum"``
    ("gathered"); ``reduce``: DDP over the world ("world"), or over ``mesh["dp"]`` and then an
    average over ``mesh["sp"]`` ("dp then sp"), docs/semantics.md's three recipes' two others."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    sp = mesh["sp"]

    def layer(strategy, group=None):
        torch.manual_seed(0)
        return _rotary_layer(strategy, group).double()

    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = layer(ringattn.Strategy(computer="math"))
    whole(x).square().mean().backward()
    model = layer(ringattn.Strategy(computer="math", communicator="ring"), sp)
    group = None if reduce == "world" else mesh["dp"].get_group()
    ddp = DistributedDataParallel(model, process_group=group)  # (kept: a reducer gone
    # with its wrapper before the backward reduces nothing)
    out = ddp(distributed.shard(x.chunk(2)[mesh.get_local_rank("dp")], sp))
    if loss == "gathered":
        out = distributed.gather(out, sp, grad="sum")
    out.square().mean().backward()
    if reduce == "dp then sp":
        for param in model.parameters():
            dist.all_reduce(param.grad, dist.ReduceOp.AVG, group=sp.get_group())
    return max(_rel(p.grad, w.grad) for p, w in zip(model.parameters(), whole.parameters()))


def a_fully_sharded_checkpointed_longnet_trains_its_sequence(communicator: str) -> float:
    """FSDP2 alone: one sequence-parallel group of every rank, ``fully_shard`` over the same
    1-D mesh (each block, then the model), each block's activations checkpointed (its
    recompute runs the attention's exchanges again inside the backward). The largest relative
    error of a parameter's gradient, in the second of two steps, against one process's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, x, use_reentrant=False)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tokens = torch.randint(0, 32, (2, 65), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    whole = _two_block_longnet(ringattn.Strategy(computer="math"))
    whole.loss(inputs, targets).backward()
    sharded = _two_block_longnet(
        ringattn.Strategy(computer="math", communicator=communicator), mesh
    )
    for i, block in enumerate(sharded.blocks):
        sharded.blocks[i] = fully_shard(Checkpointed(block), mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    for _ in range(2):
        sharded.zero_grad()
        sharded.loss(*(distributed.shard(x, mesh) for x in (inputs, targets))).backward()
    grads = [p.grad.full_tensor() for p in sharded.parameters()]
    return max(_rel(g, w.grad) for g, w in zip(grads, whole.parameters(), strict=True))


def a_module_over_a_destroyed_group_says_so():
    """After destroy_process_group(group) a module over that sub-group, and a module made with
    it, raised torch's "... is not initialized in the world group map" / "is not registered";
    both now name the rule. The world, and a module over it, still run."""
    group = dist.new_group(list(range(dist.get_world_size())))
    strategy = ringattn.Strategy(communicator="ring")
    module = ringattn.DilatedAttention((8, 16), (1, 2), strategy=strategy, group=group)
    q = torch.randn(1, 16, 2, 8)
    module(q, q, q)
    dist.destroy_process_group(group)
    messages = []
    for make in (
        lambda: module,
        lambda: ringattn.DilatedAttention((8, 16), (1, 2), strategy=strategy, group=group),
    ):
        try:
            make()(q, q, q)
        except ValueError as exc:
            messages.append(str(exc))
        else:
            raise AssertionError("no error")
    return messages, tuple(_small_module()(q, q, q).shape)


def a_module_over_a_destroyed_world_says_so():
    """After destroy_process_group (and a new init) a module made over the old world raised
    torch's "Process group <object at 0x...> is not initialized in the world group map"; a
    module made after the new init runs."""
    from datetime import timedelta

    from dist_pool import _free_port

    module = _small_module()
    q = torch.randn(1, 16, 2, 8)
    want = module(q, q, q)

    def functional():
        strategy = ringattn.Strategy(communicator="ring")
        return ringattn.dilated_attention(
            q, q, q, segment_lengths=(8, 16), dilation_rates=(1, 2), strategy=strategy
        )

    assert torch.equal(functional(), want)
    rank, world = dist.get_rank(), dist.get_world_size()
    port = [_free_port() if rank == 0 else None]  # the new world's rendezvous
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60),
        init_method=f"tcp://127.0.0.1:{port[0]}",
    )  # fmt: skip
    message = _value_error_of(lambda: module(q, q, q))
    # a torch without the private group map (is_live then says True): the module still tells
    # the old world from the new one by the world object itself
    from unittest import mock

    with mock.patch.object(distributed, "is_live", lambda group: True):
        message_without_map = _value_error_of(lambda: module(q, q, q))
    # the functional form makes its module again over the new world (it raised "build the
    # module again", a module the user never built, for the rest of the process)
    runs = torch.equal(_small_module()(q, q, q), want) and torch.equal(functional(), want)
    return message, message_without_map, bool(runs)


def bench_max_over_ranks() -> list[float]:
    """experiments.distributed_bench's largest error over ranks: column 0 is the rank, each
    other column NaN on some ranks only (the last rank; all but the last; rank 0)."""
    from experiments.distributed_bench import max_over_ranks

    rank, last, nan = dist.get_rank(), dist.get_world_size() - 1, float("nan")
    values = [
        float(rank),
        nan if rank == last else 0.5,
        0.5 if rank == last else nan,
        nan if rank == 0 else 2.0,
    ]
    return max_over_ranks(torch.tensor(values)).tolist()


def flop_counts(communicator: str, causal: bool) -> tuple[list[int], list[int], bool]:
    """A ``FlopCounterMode`` around a forward+backward on rank 0 alone, then on every rank: the
    counts of the ranks that counted (a rank's share of the whole sequence's useful FLOPs), and
    whether the counted calls' outputs and gradients equal an uncounted call's, bit for bit.
    Rank 0 alone counting hangs (gloo's timeout) if a counted call makes a collective its
    peers do not."""
    from torch.utils.flop_counter import FlopCounterMode

    module = ringattn.DilatedAttention(
        (8, 32, 64), (1, 2, 4), causal=causal, strategy=ringattn.Strategy(communicator=communicator)
    )
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(1, 32, 2, 8, generator=gen).requires_grad_() for _ in range(3))

    def step() -> list[torch.Tensor]:
        # (.backward: FlopCounterMode's module tracker refuses autograd.grad of leaf inputs)
        for x in (q, k, v):
            x.grad = None
        out = module(q, k, v)
        out.square().sum().backward()
        return [out.detach(), *(x.grad for x in (q, k, v))]

    plain = step()
    counts: list[list[int]] = [[], []]
    same = True
    for i, counting in enumerate((dist.get_rank() == 0, True)):
        with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as counter:
            result = step()
        if counting:
            counts[i].append(counter.get_total_flops())
        same = same and all(torch.equal(x, y) for x, y in zip(result, plain))
    return counts[0], counts[1], same


class _Stack(torch.nn.Module):
    """Two residual MultiheadDilatedAttention blocks (causal, rotary) of width 16, one segment
    spanning 32 positions: a model whose blocks take float inputs, not token ids."""

    def __init__(self, strategy, group=None) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_rotary_layer(strategy, group) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def a_mixed_precision_fsdp2_model_trains_its_batch(model: str, communicator: str, precision: str):
    """FSDP2 the torchtitan way (``fully_shard`` on each block, then the root) over the 1-D
    mesh of every rank (2 ranks) or the (dp, sp) = (2, 2) mesh (4 ranks, HSDP), float32
    parameters, computing in bf16: ``precision`` "bf16 params" (``MixedPrecisionPolicy(
    param_dtype=bf16, reduce_dtype=float32)``, inputs cast by FSDP2, LongNet's through its
    embedding's bf16 output), "autocast" (float32 parameters under ``torch.autocast("cpu",
    bf16)``) or "inputs not cast" (the policy with ``cast_forward_inputs=False``). ``model``:
    "longnet" (its ``loss``) or "layers" (:class:`_Stack`, its output shard's mean square).
    Returns each parameter's (relative error, one process's in bf16) against one float64
    process on the whole batch (the replicas' mean loss), or the error raised."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    replicas = 1 if world == 2 else 2
    mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("dp", "sp"))
    mesh = mesh if replicas > 1 else mesh["sp"]
    sp = mesh["sp"] if replicas > 1 else mesh

    def build(strategy, group=None):
        if model == "layers":
            torch.manual_seed(0)
            return _Stack(strategy, group)
        return _two_block_longnet(strategy, group, torch.float32)

    def loss_of(net, batch):
        if model == "layers":
            return net(batch[0]).float().square().mean()
        return net.loss(*batch)

    gen = torch.Generator().manual_seed(1)
    if model == "layers":
        rows = torch.randn(2 * replicas, 32, 16, generator=gen)
        batches = [(mine,) for mine in rows.chunk(replicas)]
    else:
        tokens = torch.randint(0, 32, (2 * replicas, 65), generator=gen).chunk(replicas)
        batches = [(rows[:, :-1], rows[:, 1:]) for rows in tokens]

    def one_process(dtype):
        whole = build(ringattn.Strategy(computer="math")).to(dtype)
        cast = [[t.to(dtype) if t.is_floating_point() else t for t in b] for b in batches]
        sum(loss_of(whole, batch) for batch in cast).div(replicas).backward()
        return [p.grad for p in whole.parameters()]

    exact, bf16 = one_process(torch.float64), one_process(torch.bfloat16)
    sharded = build(ringattn.Strategy(computer="math", communicator=communicator), sp)
    policy = MixedPrecisionPolicy(
        param_dtype=None if precision == "autocast" else torch.bfloat16,
        reduce_dtype=torch.float32,
        cast_forward_inputs=precision != "inputs not cast",
    )
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    replica = mesh.get_local_rank("dp") if replicas > 1 else 0
    batch = [distributed.shard(t, sp) for t in batches[replica]]
    region = torch.autocast("cpu", torch.bfloat16) if precision == "autocast" else None
    try:
        with region or contextlib.nullcontext():
            loss = loss_of(sharded, batch)
        loss.backward()
    except TypeError as exc:
        return f"TypeError: {exc}"
    grads = [p.grad.full_tensor() for p in sharded.parameters()]
    return [
        (_rel(g, want), _rel(low, want)) for g, want, low in zip(grads, exact, bf16, strict=True)
    ]


def a_loss_on_the_gathered_output_under_dp_x_sp(grad: str, scale: int) -> tuple[float, float]:
    """A MultiheadDilatedAttention sequence-parallel over ``mesh["sp"]`` of a (2, 2) mesh, then
    ``distributed.gather(out, grad=grad)`` and a Linear head on the gathered sequence (every
    rank of a replica computes it), under DDP over the world; the loss, the replica's mean
    square times ``scale``. Returns the largest relative error of a parameter's gradient
    against one process's mean loss over the batch: (the layer's, before the gather; the
    head's, after it). (Rotary: without it K's bias has no gradient, 0 up to rounding, and
    its relative error is noise.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    sp = mesh["sp"]

    class Model(torch.nn.Module):
        def __init__(self, strategy, group=None) -> None:
            super().__init__()
            self.attn = _rotary_layer(strategy, group)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.attn(x)
            if self.attn.attention.communicator.distributed:
                out = distributed.gather(out, sp, grad=grad)
            return self.head(out)

    def build(strategy, group=None):
        torch.manual_seed(0)
        return Model(strategy, group).double()

    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = build(ringattn.Strategy(computer="math"))
    sum(whole(rows).square().mean() for rows in x.chunk(2)).div(2).backward()
    model = build(ringattn.Strategy(computer="math", communicator="ring"), sp)
    ddp = DistributedDataParallel(model)
    out = ddp(distributed.shard(x.chunk(2)[mesh.get_local_rank("dp")], sp))
    (out.square().mean() * scale).backward()
    errors = [
        (name.startswith("head."), _rel(p.grad, w.grad))
        for (name, p), w in zip(model.named_parameters(), whole.parameters(), strict=True)
    ]
    before = max(e for after, e in errors if not after)
    return before, max(e for after, e in errors if after)


def pooled_memory_follows_the_recent_calls(communicator):
    """A pooled module's held bytes after forward+backward calls at batch sizes 1..4 (the
    communicator's buffers grow with b), what one call at b = 4 alone keeps, and the misses
    of two calls more at b = 4."""

    def module():
        return ringattn.DilatedAttention(
            (8, 32, 64),
            (1, 2, 4),
            causal=True,
            strategy=ringattn.Strategy(communicator=communicator),
            compile=False,
        )

    def step(attention, b):
        gen = torch.Generator().manual_seed(b)
        q, k, v = (
            distributed.shard(torch.randn(b, 64, 2, 8, generator=gen)).requires_grad_()
            for _ in range(3)
        )
        attention(q, k, v).sum().backward()

    attention = module()
    for b in range(1, 5):
        step(attention, b)
    held = attention.memory.held_bytes()
    fresh = module()
    step(fresh, 4)
    before = attention.memory.stats()
    for _ in range(2):
        step(attention, 4)
    after = attention.memory.stats()
    misses = sum(after[key] - before[key] for key in ("buffer_misses", "pattern_misses"))
    return held, fresh.memory.held_bytes(), misses, after["buffer_hits"] - before["buffer_hits"]
