"""What the caches between calls keep: pooled buffers and patterns keyed by everything they
depend on (dtype, rate), the LRU's order, and the functional form's modules per option set."""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, options, rel_err
from hypothesis import given
from hypothesis import strategies as st

import ringattn
from ringattn import reference
from ringattn.memory.pooled import PooledMemory


def test_pooled_scratch_is_keyed_by_dtype():
    pool = PooledMemory()
    a = pool.scratch("lse_acc", (2, 3), torch.float32, torch.device("cpu"))
    b = pool.scratch("lse_acc", (2, 3), torch.float64, torch.device("cpu"))
    assert a.dtype == torch.float32 and b.dtype == torch.float64


def test_one_pooled_module_serves_float32_then_float64():
    """One module (the functional form keeps one per option set) called in float32 and then in
    float64 at the same shape: the float64 call must not reuse the float32 scratch LSE."""
    # (first config r = 2: no block covers every row, so the no-grad call's LSE is pooled scratch)
    p = {
        "b": 1,
        "n": 12,
        "h": 2,
        "d": 4,
        "segment_lengths": (8, 4),
        "dilation_rates": (2, 1),
        "causal": False,
        "mixing": "lse",
    }
    module = ringattn.DilatedAttention(
        p["segment_lengths"],
        p["dilation_rates"],
        strategy=ringattn.Strategy(computer="math", memory="pooled"),
        compile=False,
    )
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_qkv(p, dtype)
        with torch.no_grad():
            out = module(q, k, v)
        ref = reference.dilated_attention(*(x.double() for x in (q, k, v)), **options(p))
        assert rel_err(out, ref) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_lru_keeps_the_most_recent_entries():
    pool = PooledMemory(max_entries=3)
    for n in range(5):
        pool.cached(("key", n), lambda n=n: torch.arange(n))
    pool.cached(("key", 2), lambda: torch.zeros(0))  # a hit: 2 becomes the most recent
    pool.cached(("key", 5), lambda: torch.arange(5))  # evicts the least recent: 3
    assert set(pool.patterns.items) == {("key", 2), ("key", 4), ("key", 5)}
    assert pool.stats()["pattern_hits"] == 1


def test_an_op_call_whose_module_is_gone_is_refused():
    """A compiled graph names its module by a number and does not keep it alive (``core._spec``):
    its op run after the module was collected raises, saying so, instead of a KeyError or a
    call on no plan."""
    import gc

    attention = ringattn.DilatedAttention((4,), (1,), compile=False)
    q = torch.randn(1, 8, 2, 4)
    attention(q, q, q)
    tag = attention._device_tag(q.device)
    number = int(tag)
    del attention
    gc.collect()
    with pytest.raises(RuntimeError, match=rf"attention module #{number} .* is gone"):
        torch.ops.ringattn.dilated_forward(q, q, q, tag)


def test_dropping_the_oldest_of_an_empty_cache_drops_nothing():
    """``lru.drop_oldest`` where another thread emptied the cache first: nothing to drop, no
    ``StopIteration`` into the caller's call."""
    from ringattn.lru import drop_oldest, remember

    cache: dict[int, int] = {}
    drop_oldest(cache)
    assert cache == {}
    remember(cache, 1, 1, limit=0)  # (at its limit, and empty: the entry goes in)
    assert cache == {1: 1}


def test_global_permutation_cache_distinguishes_rates_of_one_length():
    """Two configs of one segment length and different rates, global dilation, pooled patterns."""
    p = {
        "b": 1,
        "n": 16,
        "h": 2,
        "d": 4,
        "segment_lengths": (8, 8),
        "dilation_rates": (1, 2),
        "causal": True,
        "mixing": "lse",
    }
    q, k, v = make_qkv(p, torch.float64)
    ref = reference.dilated_attention(q, k, v, **options(p))
    for computer in ("math", "sdpa"):
        strategy = ringattn.Strategy(dilation="global", computer=computer, memory="pooled")
        with torch.no_grad():
            out = ringattn.dilated_attention(
                q, k, v, **options(p), strategy=strategy, compile=False
            )
        assert rel_err(out, ref) <= 1e-10, computer


P = {
    "b": 1,
    "n": 12,
    "h": 2,
    "d": 4,
    "segment_lengths": (4, 8),
    "dilation_rates": (1, 2),
    "causal": True,
    "mixing": "lse",
}


def test_functional_calls_that_differ_only_in_scale():
    q, k, v = make_qkv(P, torch.float64)
    for scale in (None, 0.3, 1.7):
        p = {**P, "scale": scale}
        out = ringattn.dilated_attention(
            q, k, v, **options(p), strategy=ringattn.Strategy(computer="math"), compile=False
        )
        assert rel_err(out, reference.dilated_attention(q, k, v, **options(p))) <= 1e-10, scale


def test_one_module_serves_two_head_dims():
    module = ringattn.DilatedAttention(
        P["segment_lengths"],
        P["dilation_rates"],
        causal=True,
        strategy=ringattn.Strategy(computer="math"),
        compile=False,
    )
    for d in (4, 16, 4):
        q, k, v = make_qkv({**P, "d": d}, torch.float64)
        ref = reference.dilated_attention(q, k, v, **options(P))  # scale 1 / sqrt(d)
        assert rel_err(module(q, k, v), ref) <= 1e-10, d


def test_nothing_is_kept_or_reused_while_a_cuda_graph_captures(monkeypatch):
    """During capture a pattern's kernels are only recorded (a kept one held no values until the
    graph replayed: eager calls of that shape gathered with garbage) and a kept tensor the graph
    uses would be freed on eviction while the replays still read it. So the pooled manager
    builds everything afresh and keeps none of it. (Capture itself needs CUDA: the check that
    decides is stood in for.)"""
    from ringattn.memory import pooled

    pool = PooledMemory()
    kept = pool.cached(("pattern",), lambda: torch.arange(4))
    scratch = pool.scratch("acc", (4,), torch.float32, torch.device("cpu"))
    monkeypatch.setattr(pooled, "capturing", lambda: True)
    built = pool.cached(("pattern",), lambda: torch.arange(4) * 10)
    assert torch.equal(built, torch.arange(4) * 10)  # made in the capture, not the kept one
    assert pool.cached(("new",), lambda: torch.ones(2)) is not pool.cached(("new",), lambda: None)
    assert pool.scratch("acc", (4,), torch.float32, torch.device("cpu")) is not scratch
    assert set(pool.patterns.items) == {("pattern",)} and pool.patterns.items[("pattern",)] is kept
    assert len(pool.buffers.items) == 1
    monkeypatch.undo()
    assert not pooled.capturing()  # (no CUDA here: never capturing)
    assert pool.cached(("pattern",), torch.zeros) is kept


def test_clear_and_held_bytes_wait_for_a_call_in_another_thread():
    """``clear`` between another thread's lookup and its move_to_end raised KeyError there, and
    ``held_bytes`` iterating while a call added an entry raised "mutated during iteration": both
    take the caches' lock."""
    import threading

    pool = PooledMemory()
    pool.cached(("pattern",), lambda: torch.arange(4))
    for work in (pool.clear, pool.held_bytes):
        done = threading.Event()
        with pool.lock:  # a call in another thread, mid-lookup
            worker = threading.Thread(target=lambda work=work, done=done: (work(), done.set()))
            worker.start()
            assert not done.wait(0.2), f"{work.__name__} ran while a lookup held the lock"
        worker.join(5)
        assert done.is_set()


def test_held_bytes_count_what_a_global_flex_modules_masks_close_over():
    """A global-dilation flex module's block masks' mask functions close over the run layout
    (two int64 tensors of n rows per config): 40% of what the module keeps was uncounted."""
    import warnings

    configs = ((8, 16, 32), (1, 2, 4))
    module = ringattn.DilatedAttention(
        *configs, strategy=ringattn.Strategy(dilation="global", computer="flex"), compile=False
    )
    q = torch.randn(1, 64, 4, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (flex runs eagerly here)
        module(q, q, q)
    masks_and_patterns = {
        id(x): x.untyped_storage().nbytes()
        for value in module.memory.patterns.items.values()
        for x in (value.as_tuple() if hasattr(value, "as_tuple") else (value,))
        if isinstance(x, torch.Tensor)
    }
    run_layouts = 2 * 64 * 8 * len(configs[0])  # run_id and run_residue, int64, per config
    assert module.memory.held_bytes() >= sum(masks_and_patterns.values()) + run_layouts


def test_functional_form_warns_when_an_option_varies_between_calls(monkeypatch):
    """Every option set's module is kept for the process's life (a compiled graph may name it):
    a scale that changes every call made a module per call, silently."""
    import warnings

    from ringattn import functional

    made = len(functional._EVERY_MODULE.__dict__)
    monkeypatch.setattr(functional, "FUNCTIONAL_MODULES_WARNING", made + 2)
    q = torch.randn(1, 16, 2, 4)
    warned_at = []  # the calls that warned: exactly the one that finds made + 2 modules made
    for i in range(5):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ringattn.dilated_attention(  # (a scale no other test uses: a new option set each)
                q, q, q, segment_lengths=(8,), dilation_rates=(1,), scale=0.1237 + 0.0011 * i
            )
        ours = [w for w in caught if "dilated_attention has made" in str(w.message)]
        assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]
        warned_at += [i] * len(ours)
    assert len(functional._EVERY_MODULE.__dict__) == made + 5
    assert warned_at == [2], warned_at


def test_global_permutation_cache_distinguishes_sequence_lengths():
    """One pooled global module over two sequence lengths with the same configs: each length
    gathers with its own permutation (a pattern key without ``n`` handed the second length the
    first one's permutation: rows of another length gathered, or an index past the end)."""
    module = ringattn.DilatedAttention(
        (4, 8),  # P's configs
        (1, 2),
        causal=True,
        strategy=ringattn.Strategy(dilation="global", computer="math", memory="pooled"),
        compile=False,
    )
    for n in (12, 20, 16, 12):  # tails of different lengths, a whole one, a repeat (a hit)
        q, k, v = make_qkv({**P, "n": n}, torch.float64)
        with torch.no_grad():
            out = module(q, k, v)
        assert rel_err(out, reference.dilated_attention(q, k, v, **options(P))) <= 1e-10, n


def _functional_modules(monkeypatch):
    """A call of the functional form per segment length (an option set each), in an LRU of 2;
    returns the option set's module."""
    from collections import OrderedDict

    from ringattn import functional

    monkeypatch.setattr(functional, "_MODULES", OrderedDict())  # (none of other tests' option sets)
    monkeypatch.setattr(functional, "_MAX_MODULES", 2)
    monkeypatch.setattr(functional, "FUNCTIONAL_MODULES_WARNING", 10**9)
    q = torch.randn(1, 16, 2, 4)
    strategy = ringattn.Strategy(computer="math", memory="pooled")

    def call(w: int):
        with torch.no_grad():
            ringattn.dilated_attention(
                q, q, q, segment_lengths=(w,), dilation_rates=(2,), strategy=strategy
            )
        return next(reversed(functional._MODULES.values()))

    return call


def test_functional_forms_evicted_module_drops_its_buffers(monkeypatch):
    """A module the functional form's LRU evicts stays alive (a compiled graph may name it), so
    its patterns and buffers must be dropped on eviction: kept, every option set ever used held
    its memory for the process's life."""
    from ringattn import functional

    call = _functional_modules(monkeypatch)
    modules = []
    for w in (4, 8, 16):  # (the third option set evicts the first)
        modules.append(call(w))
        assert modules[-1].memory.held_bytes() > 0, w  # (it did keep something)
    assert modules[0] not in functional._MODULES.values()
    assert modules[0].memory.held_bytes() == 0
    assert modules[1].memory.held_bytes() > 0  # the cached ones keep theirs


def test_clearing_the_functional_forms_modules_retraces_a_compiled_caller(monkeypatch):
    """``clear_functional_modules``: a compiled function over the functional form traces again
    at its next call and is right (its docstring said such graphs raise); the backward of a call
    made before the clear raises that its module is gone, naming it."""
    import gc
    import types
    from collections import OrderedDict

    from ringattn import functional

    # (this test's modules only: other tests' compiled callers keep theirs)
    monkeypatch.setattr(functional, "_MODULES", OrderedDict())
    monkeypatch.setattr(functional, "_EVERY_MODULE", types.SimpleNamespace())
    p = {"b": 1, "n": 8, "h": 2, "d": 4, "segment_lengths": (4, 8), "dilation_rates": (1, 2),
         "causal": True, "mixing": "lse"}  # fmt: skip
    strategy = ringattn.Strategy(computer="math")

    def attend(q):
        return ringattn.dilated_attention(q, q, q, **options(p), strategy=strategy, compile=False)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True)
    before = compiled(q)
    functional.clear_functional_modules()
    gc.collect()
    after = compiled(q)
    assert rel_err(after, reference.dilated_attention(q, q, q, **options(p))) <= 1e-10
    after.sum().backward()
    with pytest.raises(RuntimeError, match=r"attention module #\d+ .* is gone"):
        before.sum().backward()


def test_functional_forms_lru_evicts_the_least_recently_used(monkeypatch):
    """A hit moves its option set to the end: without it the LRU was first-in first-out, and
    the option set a model calls every step was evicted and rebuilt its patterns."""
    from ringattn import functional

    call = _functional_modules(monkeypatch)
    first, second = call(4), call(8)
    assert call(4) is first  # (used again: the most recent now)
    call(16)
    assert first in functional._MODULES.values() and second not in functional._MODULES.values()
    assert first.memory.held_bytes() > 0 and second.memory.held_bytes() == 0


def test_functional_forms_evicted_module_drops_its_plans_and_comes_back(monkeypatch):
    """An evicted module keeps no plans (prepared launches and their views: kept, every option set
    ever used held them for the process's life, uncounted by held_bytes), and its option set
    gets it back, not a new module: a compiled call's pending backward names it (core._spec),
    so a new one in its place failed that backward with "attention module ... is gone"."""
    call = _functional_modules(monkeypatch)
    first = call(4)
    assert first._specs  # (it had one)
    call(8), call(16)
    assert first._specs == {}
    assert call(4) is first


@pytest.mark.parametrize(
    "name, values",
    [("mixing", ("lse", "head_groups")), ("causal", (False, True)), ("scale", (0.61, 0.83))],
)
def test_functional_form_keys_every_option_that_changes_the_result(name, values):
    """Each option in turn, back and forth: a key without it served the first value's module to
    the second (mixing was caught only by chance, by another test's order)."""
    problem = {"b": 1, "n": 12, "h": 2, "d": 4, "segment_lengths": (4, 8), "scale": 0.61,
               "dilation_rates": (1, 2), "causal": True, "mixing": "lse"}  # fmt: skip
    q, k, v = make_qkv(problem, torch.float64)
    strategy = ringattn.Strategy(computer="math")
    for value in (*values, *values):
        p = {**problem, name: value}
        out = ringattn.dilated_attention(q, k, v, **options(p), strategy=strategy, compile=False)
        assert rel_err(out, reference.dilated_attention(q, k, v, **options(p))) <= 1e-10, value


def test_pooled_scratch_is_keyed_by_device():
    """Two devices (cuda:0 and cuda:1 on their default streams share thread and stream ids) must
    not share a buffer."""
    pool = PooledMemory()
    a = pool.scratch("lse_acc", (2, 3), torch.float32, torch.device("cpu"))
    b = pool.scratch("lse_acc", (2, 3), torch.float32, torch.device("meta"))
    assert (a.device.type, b.device.type) == ("cpu", "meta")


def test_pooled_scratch_is_keyed_by_tag_and_shape():
    """Two tags of one shape (a ring's two key/value buffers) must not share a buffer, and a
    later call at another shape must not get the earlier one's."""
    pool, cpu = PooledMemory(), torch.device("cpu")
    a = pool.scratch("ring_kv_0", (2, 3), torch.float32, cpu)
    assert pool.scratch("ring_kv_1", (2, 3), torch.float32, cpu) is not a
    assert pool.scratch("ring_kv_0", (3, 2), torch.float32, cpu).shape == (3, 2)
    assert pool.scratch("ring_kv_0", (2, 3), torch.float32, cpu) is a


def test_pooled_scratch_is_per_thread():
    """Threads sharing a module (the functional form's) each get their own buffers: one buffer
    shared by two concurrent calls gave wrong outputs."""
    import threading

    pool, cpu = PooledMemory(), torch.device("cpu")
    mine = pool.scratch("lse_acc", (4,), torch.float32, cpu)
    other: list = []
    worker = threading.Thread(
        target=lambda: other.append(pool.scratch("lse_acc", (4,), torch.float32, cpu))
    )
    worker.start()
    worker.join()
    assert other[0] is not mine
    assert other[0].untyped_storage().data_ptr() != mine.untyped_storage().data_ptr()


def test_another_threads_compile_is_not_this_threads_trace():
    """From torch 2.13 ``torch.compiler.is_compiling()`` is a flag of the process that any
    thread's compile session holds: while one thread compiled, another thread's eager calls took
    their traced path. A flex module was refused ("traced by a torch.compile around the
    module"), a forward-mode AD input passed with its tangent dropped (silently), and pooled
    modules kept nothing. Held here by the session torch enters (not by a timed compile)."""
    import threading

    import torch.autograd.forward_ad as fw_ad

    session = getattr(torch.compiler, "_compile_session_context", None)
    if session is None:
        pytest.skip("this torch holds no compile-session flag")
    config = {"segment_lengths": (8, 16), "dilation_rates": (1, 2), "causal": True}
    pooled = ringattn.Strategy(dilation="global", computer="math", memory="pooled")
    attn = ringattn.DilatedAttention(**config, strategy=pooled)
    flex = ringattn.DilatedAttention(
        **config, strategy=ringattn.Strategy(computer="flex"), compile=False
    )
    q, k, v = make_qkv({"b": 1, "n": 32, "h": 4, "d": 8})
    ref = reference.dilated_attention(q.double(), k.double(), v.double(), **config)
    entered, release = threading.Event(), threading.Event()

    def compiling_elsewhere() -> None:
        with session():
            entered.set()
            release.wait(60)

    worker = threading.Thread(target=compiling_elsewhere)
    worker.start()
    try:
        assert entered.wait(60) and torch.compiler.is_compiling()  # (the process's flag)
        assert rel_err(flex(q, k, v), ref) <= reference.TOLERANCE[torch.float32]
        assert rel_err(attn(q, k, v), ref) <= reference.TOLERANCE[torch.float32]
        assert rel_err(attn(q, k, v), ref) <= reference.TOLERANCE[torch.float32]
        assert attn.memory.stats()["pattern_hits"] > 0  # (the second call's permutations)
        with fw_ad.dual_level(), pytest.raises(TypeError, match="forward-mode AD"):
            attn(fw_ad.make_dual(q, torch.ones_like(q)), k, v)
    finally:
        release.set()
        worker.join()


def test_pooled_entries_made_under_inference_mode_are_normal_tensors():
    """A kept inference tensor could not be saved for backward (nor written in place) by a later
    training call."""
    pool, cpu = PooledMemory(), torch.device("cpu")
    with torch.inference_mode():
        buffer = pool.scratch("acc", (4,), torch.float32, cpu)
        pattern = pool.cached("pattern", lambda: torch.arange(4))
    assert not buffer.is_inference() and not pattern.is_inference()
    assert pool.scratch("acc", (4,), torch.float32, cpu) is buffer


def test_unselected_selection_table_is_keyed_by_device(monkeypatch):
    """The unselected-pairs fill's ``[2, h]`` selection table, a pooled pattern, is made on the
    output's device: keyed without the device, one pooled module moved from one GPU to another
    (cuda:0, then cuda:1) had the kernel read the first device's table. (The kernel runs on CUDA
    or under Triton's interpreter only: here it is a stand-in that records the table's device.)"""
    from ringattn.kernels import unselected

    tables = []
    monkeypatch.setattr(unselected, "available", lambda x: True)
    monkeypatch.setattr(unselected, "zero_unselected_", lambda x, table: tables.append(table))
    pool = PooledMemory()
    selection = ((2, 2), (0, 1))  # (rates, offsets) per head: some pairs unselected
    for device in ("cpu", "meta"):
        unselected.fill_unselected_(torch.ones(1, 4, 2, 3, device=device), selection, pool)
    assert [table.device.type for table in tables] == ["cpu", "meta"]


class _TakenMidEviction(dict):
    """A dict whose oldest key another thread pops between ``iter`` and the caller's ``pop``."""

    def __iter__(self):
        oldest = next(super().__iter__())
        super().pop(oldest)
        return iter([oldest])


@pytest.mark.parametrize("where", ["module specs", "plans"])
def test_a_bounded_cache_whose_oldest_entry_another_thread_dropped(where, monkeypatch):
    """Two threads at a bounded cache's limit chose the same oldest key and the second ``pop``
    raised KeyError into the call (1 in 80,000 insertions from 4 threads on the GIL build)."""
    from ringattn import api, pattern

    if where == "module specs":
        limit = api.RECOMPILE_LIMIT
        cache = _TakenMidEviction({i: i for i in range(limit)})
        api._remember(cache, "new", 0)
    else:
        limit = pattern._MAX_PLANS
        cache = _TakenMidEviction({i: i for i in range(limit)})
        monkeypatch.setattr(pattern, "_PLANS", cache)
        plan = pattern.make_plan(8, 2, ((4, 1),), "lse")
        assert cache[list(dict.__iter__(cache))[-1]] is plan
    assert len(cache) == limit  # (the other thread's pop made the room)


def test_the_functional_forms_modules_wait_for_a_lookup_in_another_thread():
    """A functional call between another thread's lookup and its ``move_to_end`` could evict
    that key (KeyError there), and two threads made a module each for one new option set: the
    lookup, the making and the eviction take one lock."""
    import threading

    from ringattn import functional

    q = torch.randn(1, 8, 2, 4)
    done = threading.Event()

    def call() -> None:
        ringattn.dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))
        done.set()

    with functional._MODULES_LOCK:  # a call in another thread, mid-lookup
        worker = threading.Thread(target=call)
        worker.start()
        assert not done.wait(0.2), "a functional call ran while another held its modules"
    worker.join(30)
    assert done.is_set()


def test_copies_of_a_used_module_keep_caches_of_their_own():
    """A used pooled module, deep-copied, pickled and ``torch.save``d: each copy starts with
    empty caches (nothing pooled in its pickle), fills its own manager (not the original's,
    which a kept spec would name), and the copy and the original used in turn, at other
    shapes and dtypes, with gradients, stay exact; as does the original after ``.double()``."""
    import copy
    import io
    import pickle

    p = {"segment_lengths": (8, 16), "dilation_rates": (1, 2), "causal": True, "mixing": "lse"}
    strategy = ringattn.Strategy(dilation="global", computer="sdpa", memory="pooled")
    used = ringattn.DilatedAttention(**options(p), strategy=strategy)

    def check(module, shape, dtype):
        q, k, v = make_qkv({**p, **dict(zip("bnhd", shape))}, dtype, requires_grad=True)
        wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
        out, ref = module(q, k, v), reference.dilated_attention(*wide, **options(p))
        torch.autograd.backward((out, ref), (torch.ones_like(out), torch.ones_like(ref)))
        for got, want in zip((out, q.grad, k.grad, v.grad), (ref, *(x.grad for x in wide))):
            assert rel_err(got, want) <= reference.TOLERANCE[dtype]

    check(used, (1, 32, 2, 8), torch.float32)
    kept = used.memory.stats()
    saved = io.BytesIO()
    torch.save(used, saved)
    pickled = pickle.dumps(used)
    assert len(pickled) < 4096  # (its patterns and buffers stay behind)
    saved.seek(0)
    copies = [copy.deepcopy(used), pickle.loads(pickled), torch.load(saved, weights_only=False)]
    for twin in copies:
        assert twin.memory.held_bytes() == 0
        check(twin, (1, 32, 2, 8), torch.float32)
        assert twin.memory.held_bytes() > 0 and used.memory.stats() == kept
        check(used, (2, 24, 3, 4), torch.float64)
        check(twin, (2, 24, 3, 4), torch.float32)
        check(used, (1, 32, 2, 8), torch.float32)
        kept = used.memory.stats()
    check(used.double(), (1, 40, 2, 8), torch.float64)


def _sweeping_module() -> ringattn.DilatedAttention:
    """A pooled global module (permutations per length and config, and the no-grad call's LSE
    scratch)."""
    return ringattn.DilatedAttention(
        (8, 16),
        (1, 2),
        causal=True,
        strategy=ringattn.Strategy(dilation="global", computer="math", memory="pooled"),
        compile=False,
    )


def _inference(module: ringattn.DilatedAttention, n: int) -> None:
    p = {"b": 1, "n": n, "h": 2, "d": 4, "segment_lengths": (8, 16), "dilation_rates": (1, 2),
         "causal": True}  # fmt: skip
    q, k, v = make_qkv(p, torch.float64, seed=n)
    with torch.no_grad():
        out = module(q, k, v)
    assert rel_err(out, reference.dilated_attention(q, k, v, **options(p))) <= 1e-10, n


def test_a_sweep_over_sequence_lengths_keeps_what_the_recent_calls_used():
    """One module called at eight lengths in turn kept every length's patterns and buffers (up
    to 64 entries: live tensors that an out-of-memory error cannot free, in each layer): now at
    most twice what its largest recent call used, and 16 calls at the first length again leave
    no more than twice what that length needs."""
    lengths = (16, 32, 48, 64, 80, 96, 112, 128)
    alone = {}  # what one call of each length uses
    for n in lengths:
        fresh = _sweeping_module()
        _inference(fresh, n)
        alone[n] = fresh.memory.held_bytes()
    module = _sweeping_module()
    for n in lengths:
        _inference(module, n)
        assert alone[n] <= module.memory.held_bytes() <= 2 * alone[n], n  # (the largest yet)
    assert module.memory.held_bytes() < sum(alone.values()) / 2  # (all of it, unbounded)
    for _ in range(16):
        _inference(module, lengths[0])
    assert alone[lengths[0]] <= module.memory.held_bytes() <= 2 * alone[lengths[0]]


def test_the_byte_bound_keeps_every_hit_of_a_loop_over_fixed_shapes():
    """Two lengths trained in turn (one checkpointed: its forward runs again in the backward)
    with an inference call each: the default bound hits exactly as often as no byte bound (a
    manager a module builds without arguments: a subclass registered under a name of its own)."""
    from torch.utils.checkpoint import checkpoint

    from ringattn import registry

    @registry.register("memory", "pooled_without_a_byte_bound")
    class Unbounded(PooledMemory):
        def __init__(self) -> None:
            super().__init__(max_bytes=2**62)

    stats = []
    try:
        for memory in ("pooled", "pooled_without_a_byte_bound"):
            module = ringattn.DilatedAttention(
                (8, 16),
                (1, 2),
                causal=True,
                strategy=ringattn.Strategy(dilation="global", computer="math", memory=memory),
                compile=False,
            )
            for _ in range(4):
                for n, checkpointed in ((32, True), (48, False)):
                    q, k, v = make_qkv({"b": 1, "n": n, "h": 2, "d": 4}, requires_grad=True)
                    if checkpointed:
                        checkpoint(module, q, k, v, use_reentrant=False).sum().backward()
                    else:
                        module(q, k, v).sum().backward()
                    with torch.no_grad():
                        module(q, k, v)
                stats.append(module.memory.stats())
    finally:
        registry.unregister("memory", "pooled_without_a_byte_bound")
    assert module.memory.max_bytes == 2**62
    assert stats[:4] == stats[4:]  # (step by step, as without a byte bound)
    assert stats[1]["pattern_misses"] == stats[3]["pattern_misses"] > 0  # (no miss after one)
    assert stats[1]["buffer_misses"] == stats[3]["buffer_misses"] > 0
    assert stats[3]["pattern_hits"] > stats[1]["pattern_hits"]


# one cache operation: a pattern or buffer of some size (its key by index), or a call begun
_OPS = st.one_of(
    st.tuples(st.sampled_from(["pattern", "buffer"]), st.integers(0, 4), st.integers(0, 24)),
    st.just(("call", 0, 0)),
)


@given(
    ops=st.lists(_OPS, max_size=40),
    max_bytes=st.one_of(st.none(), st.integers(0, 160)),
    max_entries=st.integers(1, 4),
)
def test_pooled_caches_evict_the_least_recently_used_by_bytes(ops, max_bytes, max_entries):
    """Against a model: an LRU over both caches, each at most ``max_entries``, together at most
    ``max_bytes`` (default: twice the most bytes one of the last 16 calls used, each entry
    counted once a call), an entry over a fixed bound not kept."""
    from collections import OrderedDict

    pool, cpu = PooledMemory(max_entries, max_bytes=max_bytes), torch.device("cpu")
    model: OrderedDict[tuple, list[int]] = OrderedDict()  # key -> [bytes, last call]
    used = [0]  # the bytes each call used
    hits = 0

    def evict() -> None:
        bound = 2 * max(used[-16:]) if max_bytes is None else max_bytes
        while sum(size for size, _ in model.values()) > bound:
            model.popitem(last=False)

    for kind, index, length in ops:
        if kind == "call":
            used.append(0)
            pool.begin_call()
            evict()
            continue
        key = (kind, index, length)
        if kind == "pattern":
            pool.cached(key[1:], lambda length=length: torch.zeros(length, dtype=torch.uint8))
        else:
            pool.scratch(f"tag{index}", (length,), torch.float32, cpu)
        size = length * (1 if kind == "pattern" else 4)
        if key in model:
            hits += 1
            model.move_to_end(key)
            if model[key][1] != len(used):
                used[-1] += size
            model[key][1] = len(used)
        elif max_bytes is None or size <= max_bytes:
            model[key] = [size, len(used)]
            used[-1] += size
            same = [k for k in model if k[0] == kind]
            if len(same) > max_entries:
                del model[same[0]]
            evict()
    kept = {("pattern", *k) for k in pool.patterns.items}
    kept |= {("buffer", int(k[0][3:]), k[1][0]) for k in pool.buffers.items}
    assert kept == set(model)
    assert pool.held_bytes() == sum(size for size, _ in model.values())
    assert pool.stats()["pattern_hits"] + pool.stats()["buffer_hits"] == hits


def test_a_fixed_byte_bound_drops_the_least_recent_of_either_cache():
    pool, cpu = PooledMemory(max_bytes=100), torch.device("cpu")
    pool.cached("old", lambda: torch.zeros(40, dtype=torch.uint8))
    buffer = pool.scratch("acc", (10,), torch.float32, cpu)  # 40 bytes
    pool.cached("view", lambda: buffer[2:])  # (its buffer's storage: counted once)
    assert pool.held_bytes() == 80
    pool.cached("old", torch.zeros)  # (a hit: the most recent now)
    pool.scratch("big", (26,), torch.float32, cpu)  # 104 bytes: over the bound, not kept
    assert pool.held_bytes() == 80 and len(pool.buffers.items) == 1
    pool.scratch("next", (8,), torch.float32, cpu)  # 32 bytes: over, so the least recent go
    # (acc, whose storage the view still holds, then the view, which frees it)
    assert [k[0] for k in pool.buffers.items] == ["next"] and list(pool.patterns.items) == ["old"]
    assert pool.held_bytes() == 40 + 32


def test_bounds_set_on_a_live_modules_manager_apply_at_once():
    """``attn.memory.max_entries = 1`` was a plain attribute that neither cache read (each kept
    its own bound, 64), so the module went on keeping every shape's entries, silently; and a
    ``max_bytes`` of -1 was taken unchecked. Both are checked and applied at once now."""
    problem = {
        "b": 1,
        "n": 32,
        "segment_lengths": (8, 16),
        "dilation_rates": (1, 2),
        "h": 2,
        "d": 4,
    }
    strategy = ringattn.Strategy(dilation="global", memory="pooled")  # (it keeps both kinds)
    module = ringattn.DilatedAttention(**options(problem), strategy=strategy, compile=False)
    pool = module.memory
    for n in (16, 32, 48):
        q, k, v = make_qkv({**problem, "n": n})
        module(q, k, v)
    assert len(pool.patterns.items) > 1 and len(pool.buffers.items) > 1
    pool.max_entries = 1
    assert len(pool.patterns.items) <= 1 and len(pool.buffers.items) <= 1
    for n in (16, 32, 48):
        q, k, v = make_qkv({**problem, "n": n})
        ref = reference.dilated_attention(q.double(), k.double(), v.double(), **options(problem))
        assert rel_err(module(q, k, v), ref) < 1e-5
        assert len(pool.patterns.items) <= 1 and len(pool.buffers.items) <= 1
    pool.max_bytes = 0
    assert pool.held_bytes() == 0 and pool.max_bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        pool.max_bytes = -1
    with pytest.raises(ValueError, match="max_entries"):
        pool.max_entries = 0
    assert (pool.max_entries, pool.max_bytes) == (1, 0)  # (a refused bound changes nothing)
