"""torch.compile: the core captures as one graph (fullgraph=True), matches the oracle, and a
second call with the same shapes does not recompile.

Block computers (``sdpa``, ``math``) are captured the way a compiled model captures them: an
enclosing ``torch.compile`` around the module (their ``compile=True`` module opens no frame of its
own, see ``DilatedAttention.compiled_frame``); ``flex`` through the module's own compiled core.

Per combination the graph is captured with the ``aot_eager`` backend (Dynamo + AOTAutograd, the
part that decides fullgraph-ability and recompiles) because Inductor's C++ compile costs tens of
seconds per graph on CPU; Inductor itself runs for the sdpa computer on both layouts, forward and
backward, where it found a real stride bug (see ringattn/computers/sdpa.py).
"""

from __future__ import annotations

import array
import collections
import inspect

import numpy as np
import pytest
import torch
from conftest import NEEDS_COMPILED_CPU_FLEX, TOLERANCE, make_qkv, options, rel_err
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import ringattn
from ringattn import core, reference, registry
from ringattn.computers.base import LayoutComputer

pytestmark = pytest.mark.compile

PROBLEM = {
    "b": 2,
    "n": 20,
    "h": 3,
    "d": 8,
    "segment_lengths": (4, 16),
    "dilation_rates": (1, 2),
    "causal": True,
    "mixing": "lse",
}


def run_and_grad(module, q, k, v, grad_out):
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = module(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def oracle(p, q, k, v, grad_out):
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(*inputs, **options(p))
    return ref, torch.autograd.grad(ref, inputs, grad_out.double())


def check_compiled(strategy, backend, p=PROBLEM, dtype=torch.float32):
    torch._dynamo.reset()
    q, k, v = make_qkv(p, dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    module = ringattn.DilatedAttention(
        p["segment_lengths"],
        p["dilation_rates"],
        causal=p["causal"],
        mixing=p["mixing"],
        strategy=strategy,
        compile=True,
        compile_backend=backend,
    )
    ref, ref_grads = oracle(p, q, k, v, grad_out)
    if not module.compiled_frame:
        with torch.no_grad():
            eager_out = module(q, k, v)  # the first call registers the core's ops
        module = torch.compile(module, fullgraph=True, backend=backend)
        counters.clear()
        with torch.no_grad():
            assert torch.equal(module(q, k, v), eager_out)
        assert counters["stats"]["unique_graphs"] == 1  # captured, not run eagerly
    computer = strategy.component("computer")()
    kwargs = {
        "compiled": True,
        "dilation": strategy.dilation,
        "mixing": p["mixing"],
        "backend": backend,
    }
    if computer.unsupported(dtype, q.device, False, **kwargs):
        # flex + global on CPU: compiled flex cannot return the LSE (documented in flex.py)
        with pytest.raises(ValueError, match="cannot run"), torch.no_grad():
            module(q, k, v)
        return
    if computer.unsupported(dtype, q.device, True, **kwargs):
        # forward-only on this device (flex on CPU): fullgraph + no recompiles, no backward
        with torch.no_grad():
            out = module(q, k, v)
        assert rel_err(out, ref) <= TOLERANCE[dtype]
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            assert torch.equal(module(q, k, v), out)
        return
    out, grads = run_and_grad(module, q, k, v, grad_out)
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref) <= tol
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= 10 * tol
    # the oracle's bound above is loose (10x: ill-conditioned gradients, gradient_bounds.py);
    # compiling changes no maths, so the gradients are also eager's, within float rounding
    eager = ringattn.DilatedAttention(**options(p), strategy=strategy, compile=False)
    _, eager_grads = run_and_grad(eager, q, k, v, grad_out)
    # (bitwise equal on torch 2.13's CPU: the core runs as registered ops, compiled around)
    assert all(rel_err(g, e) <= tol / 100 for g, e in zip(grads, eager_grads))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out2, _ = run_and_grad(module, q, k, v, grad_out)
    assert torch.equal(out, out2)
    with torch.no_grad():  # inference is its own graph (no autograd.Function) ...
        module(q, k, v)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        module(q, k, v)  # ... compiled once as well


@pytest.mark.parametrize("strategy", ringattn.Strategy.single_device(), ids=lambda s: s.label)
def test_every_combination_captures_fullgraph_without_recompiles(strategy):
    check_compiled(strategy, "aot_eager")


@pytest.mark.parametrize("dilation", ["segment_local", "global"])
def test_inductor_sdpa_forward_and_backward(dilation):
    check_compiled(ringattn.Strategy(dilation=dilation, computer="sdpa"), "inductor")


@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_inductor_in_bfloat16(mixing):
    """What GPU users compile: half inputs, the core ops' LSE in float32 between them (the
    cases above run float32 only; opcheck, below, holds the ops' fake outputs' dtypes)."""
    p = {**PROBLEM, "mixing": mixing, "causal": True}
    check_compiled(ringattn.Strategy(computer="sdpa"), "inductor", p, torch.bfloat16)


def test_head_groups_gradients_leave_the_compiled_op_unaliased():
    """Under head_groups the eager backward hands out its three zero-started gradients as views
    of one buffer; the compiled backward is a custom op, whose results may not share storage, so
    it must not (torch.library raises on aliased results)."""
    p = {**PROBLEM, "mixing": "head_groups", "segment_lengths": (4, 8), "dilation_rates": (2, 4)}
    check_compiled(ringattn.Strategy(computer="sdpa"), "aot_eager", p)


# torch.library.opcheck's checks (its default test_utils)
OPCHECKS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_the_core_ops_pass_torchs_opcheck(mixing, dtype):
    """``torch.library.opcheck`` of the two opaque ops a compiled graph holds: their schemas,
    autograd registration, AOT dispatch, and fake implementations against the real ops. What
    Inductor plans from a fake output must be what the op returns: the forward's LSE is in the
    accumulation dtype (float32 for half inputs), not q's; the checks above, in float32 and
    float64, could not tell the two apart.

    Under ``head_groups`` the forward leaves the LSE of the (row, head) pairs that no config
    selects unwritten (one fill less; the backward never reads them, held below), so its AOT
    dispatch check, which compares every element of two calls, is made on the selected pairs."""
    p = {**PROBLEM, "mixing": mixing, "causal": True}
    module = ringattn.DilatedAttention(**options(p), strategy=ringattn.Strategy(computer="sdpa"))
    q, k, v = make_qkv(p, dtype)
    tag = module._number
    forward, backward = torch.ops.ringattn.dilated_forward, torch.ops.ringattn.dilated_backward
    out, lse = forward(q, k, v, tag)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    dout = torch.randn_like(out)
    unwritten = ("test_aot_dispatch_dynamic",) if mixing == "head_groups" else ()
    checks = [check for check in OPCHECKS if check not in unwritten]
    torch.library.opcheck(forward.default, (q, k, v, tag), test_utils=checks)
    torch.library.opcheck(backward.default, (dout, q, k, v, out, lse, tag))
    if not unwritten:
        return
    selected = reference.selection(
        p["n"], p["h"], p["segment_lengths"], p["dilation_rates"], mixing
    )
    selected = selected.any(0).T  # [n, h]: some config selects the pair
    assert not selected.all()  # (else this case could not tell)
    traced = torch.compile(lambda *x: forward(*x, tag), backend="aot_eager", fullgraph=True)
    out_traced, lse_traced = traced(q, k, v)
    assert torch.equal(out_traced, out)
    assert torch.equal(lse_traced[:, selected], lse[:, selected])
    # the unselected pairs' LSE, whatever it holds, changes no gradient
    poisoned = lse.masked_fill(~selected, float("nan"))
    for grad, grad_poisoned in zip(
        backward(dout, q, k, v, out, lse, tag), backward(dout, q, k, v, out, poisoned, tag)
    ):
        assert torch.equal(grad, grad_poisoned)


@pytest.mark.parametrize(
    "dilation, computer, mixing, causal",
    [  # each (dilation, computer) once; mixing and causal take turns (~10 s each on 2 cores)
        ("segment_local", "math", "lse", True),
        ("segment_local", "sdpa", "head_groups", False),
        ("global", "math", "head_groups", True),
        ("global", "sdpa", "lse", False),
    ],
)
def test_outer_compile_of_the_whole_module_is_one_graph(dilation, computer, mixing, causal):
    """A user's torch.compile(model, fullgraph=True) traces through the eager boundary (the
    checks fold into guards instead of breaking the graph), with no eager call first: one graph
    holding the core as the opaque ops, the oracle's values and gradients, for every block
    computer, layout and mixing. (Traced inline instead, as a first call inside a trace was
    before: 0.6x the eager speed on an H200, +50% memory, minutes of Inductor on CPU.)"""
    torch._dynamo.reset()
    p = {**PROBLEM, "mixing": mixing, "causal": causal}
    module = ringattn.DilatedAttention(
        **options(p),
        strategy=ringattn.Strategy(dilation=dilation, computer=computer),
        compile=False,
    )
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(
            gm, example_inputs
        )

    compiled = torch.compile(module, fullgraph=True, backend=backend)
    q, k, v = make_qkv(p, torch.float32)
    grad_out = torch.randn(q.shape)
    counters.clear()
    out, grads = run_and_grad(compiled, q, k, v, grad_out)
    run_and_grad(compiled, q, k, v, grad_out)  # no recompile once the ops' eager side ran
    assert counters["stats"]["unique_graphs"] == 1
    assert "ringattn.dilated_forward.default" in targets, sorted(targets)[:20]
    ref, ref_grads = oracle(p, q, k, v, grad_out)
    assert rel_err(out, ref) <= 1e-5
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= 1e-4


def test_outer_compile_of_new_lengths_keeps_the_oracle():
    """A user's torch.compile (fullgraph, automatic dynamic shapes) called with new sequence
    lengths: the first is static, the second makes n dynamic, and that graph serves every later
    length (the opaque ops make their plan at run time); still the oracle's values. The sizes
    made dynamic broke a first version of the ops' registration from the trace."""
    torch._dynamo.reset()
    p = dict(PROBLEM)
    module = ringattn.DilatedAttention(**options(p))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    counters.clear()
    for n in (20, 33, 48, 57, 71):
        q, k, v = make_qkv({**p, "n": n}, torch.float32)
        ref, _ = oracle({**p, "n": n}, q, k, v, torch.zeros(q.shape))
        assert rel_err(compiled(q, k, v), ref) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("compile_core", [False, True])
def test_module_compile_is_torchs_in_place_compile(compile_core):
    """``module.compile()`` is ``nn.Module.compile`` (torch.compile in place), as for any module:
    the constructor's ``compile`` flag, kept as ``self.compile``, hid it ("'bool' object is not
    callable"). Compiled so, the module is one graph and still the oracle's function."""
    torch._dynamo.reset()
    p = PROBLEM
    module = ringattn.DilatedAttention(**options(p), compile=compile_core)
    assert f"compile={compile_core}" in repr(module)
    module.compile(fullgraph=True, backend="aot_eager")
    q, k, v = make_qkv(p, torch.float32)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    counters.clear()
    out, grads = run_and_grad(module, q, k, v, grad_out)
    ref, ref_grads = oracle(p, q, k, v, grad_out)
    assert counters["stats"]["unique_graphs"] == 1
    assert rel_err(out, ref) <= 1e-5
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("dilation", ["segment_local", "global"])
def test_dynamic_lengths_are_one_graph_whatever_their_tails(dilation):
    """``torch.compile(dynamic=True, fullgraph=True)`` over lengths with 12 different tails
    (``n mod w``), forward and backward: one graph, each call the oracle's values and gradients.
    A plan built in the trace from the symbolic ``n`` guarded the graph on ``n mod w``, so every
    new tail recompiled and the ninth hit Dynamo's recompile limit (under fullgraph, an error)."""
    torch._dynamo.reset()
    p = {**PROBLEM, "segment_lengths": (4, 16), "dilation_rates": (1, 2), "causal": True}
    module = ringattn.DilatedAttention(
        **options(p), strategy=ringattn.Strategy(dilation=dilation, computer="sdpa")
    )
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    counters.clear()
    for n in range(33, 45):
        q, k, v = make_qkv({**p, "n": n}, torch.float32)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        dout = torch.randn(q.shape)
        ref, ref_grads = oracle({**p, "n": n}, q, k, v, dout)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        assert rel_err(out, ref) <= 1e-5, n
        for g, g_ref in zip(grads, ref_grads):
            assert rel_err(g, g_ref) <= 1e-4, n
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
@pytest.mark.parametrize("dilation", ["segment_local", "global"])
def test_outer_compile_with_dynamic_shapes_keeps_the_oracle(mixing, dilation):
    """``torch.compile(dynamic=True)``, and automatic dynamic shapes after a change of h or d:
    the plan is made from symbolic sizes. ``divmod`` on them (head_groups' head ranges,
    global's tail) raised Dynamo's Unsupported under fullgraph=True."""
    torch._dynamo.reset()
    strategy = ringattn.Strategy(dilation=dilation, computer="sdpa")
    p = {**PROBLEM, "mixing": mixing}
    module = ringattn.DilatedAttention(**options(p), strategy=strategy)
    for dynamic in (True, None):
        compiled = torch.compile(module, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for b, n, h, d in ((1, 20, 3, 8), (2, 33, 3, 8), (1, 20, 4, 8), (1, 20, 4, 4)):
            shape = {**p, "b": b, "n": n, "h": h, "d": d}
            q, k, v = make_qkv(shape, torch.float32)
            ref, _ = oracle(shape, q, k, v, torch.zeros(q.shape))
            assert rel_err(compiled(q, k, v), ref) <= 1e-5, (dynamic, b, n, h, d)


_DRAWN_MODULES: dict = {}


@settings(max_examples=15)
@given(
    case=st.sampled_from(
        [  # (dilation, computer, mixing, causal, configs): each layout, computer, mixing once
            ("segment_local", "sdpa", "lse", True, ((4, 16), (1, 2))),
            ("global", "math", "lse", False, ((3, 6, 24), (1, 3, 4))),
            ("segment_local", "math", "head_groups", False, ((4, 8, 32), (1, 2, 8))),
            ("global", "sdpa", "head_groups", True, ((6, 12), (2, 3))),
        ]
    ),
    # (no size 1: Dynamo specializes sizes 0 and 1 even with dynamic=True, so each would be a
    # graph of its own and the four modules' share of forward's recompile limit, 8, ran out;
    # size-1 shapes are test_strategies' edge shapes)
    shape=st.tuples(
        st.integers(2, 3), st.integers(2, 70), st.integers(2, 6), st.sampled_from([2, 4, 8])
    ),
)
# a tail in which some head selects no row (none of CI's 15 draws had one): n = 13, head 1's
# (12, 3) at offset 1 past the tail [12, 13); n = 17, head 1's (16, 2) at offset 1 past [16, 17)
@example(case=("global", "sdpa", "head_groups", True, ((6, 12), (2, 3))), shape=(2, 13, 2, 4))
@example(case=("segment_local", "sdpa", "lse", True, ((4, 16), (1, 2))), shape=(2, 17, 3, 8))
def test_outer_dynamic_compile_of_drawn_shapes_keeps_the_oracle(case, shape):
    """A user's ``torch.compile(dynamic=True, fullgraph=True)`` around the module, called with
    drawn ``(b, n, h, d)``: every call the oracle's values and gradients. One compiled module
    per case for the whole run, its plan made from symbolic sizes (a size that breaks a guard
    recompiles; only the values are held here: test_dynamic_lengths_are_one_graph_whatever_
    their_tails counts graphs)."""
    dilation, computer, mixing, causal, (lengths, rates) = case
    if case not in _DRAWN_MODULES:
        if not _DRAWN_MODULES:  # (earlier tests' modules hold entries of forward's cache)
            torch._dynamo.reset()
        module = ringattn.DilatedAttention(
            lengths,
            rates,
            causal=causal,
            mixing=mixing,
            strategy=ringattn.Strategy(dilation=dilation, computer=computer),
        )
        _DRAWN_MODULES[case] = torch.compile(
            module, fullgraph=True, dynamic=True, backend="aot_eager"
        )
    b, n, h, d = shape
    p = {"b": b, "n": n, "h": h, "d": d, "segment_lengths": lengths, "dilation_rates": rates}
    p.update(causal=causal, mixing=mixing)
    q, k, v = make_qkv(p, torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(n))
    out, grads = run_and_grad(_DRAWN_MODULES[case], q, k, v, dout)
    ref, ref_grads = oracle(p, q, k, v, dout)
    assert rel_err(out, ref) <= 1e-5
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref, 0.1 * float(dout.norm())) <= 1e-4


@pytest.mark.parametrize("fullgraph", [True, False])
def test_the_functional_form_compiles_inside_a_users_function(fullgraph):
    """``ringattn.dilated_attention`` in a function given to torch.compile, before any eager call
    of its option sets: beartype's wrapper raised inside Dynamo (Unsupported under fullgraph, its
    DesynchronizationException without), and then the module's constructor could not be traced
    (Dynamo's "sourceless builder inspect.Signature" under fullgraph), so fullgraph needed an
    eager call first. Traced, it now makes the modules at trace time, calls them and captures the
    opaque ops, gradients included; a later eager call reuses the module the trace made."""
    torch._dynamo.reset()
    p = dict(PROBLEM)
    # option sets no other test uses (the scales), so no module exists for them yet
    scales = (0.3125 + fullgraph, 0.40625 + fullgraph)
    strategy = ringattn.Strategy(computer="sdpa")
    sets = [{**options(p), "scale": scale, "strategy": strategy} for scale in scales]
    made_before = len(vars(ringattn.functional._EVERY_MODULE))

    def attention(q, k, v):
        first = ringattn.dilated_attention(q, k, v, **sets[0])
        return first, ringattn.dilated_attention(q, k, v, **sets[1])

    q, k, v = make_qkv(p, torch.float32, requires_grad=True)
    outs = torch.compile(attention, fullgraph=fullgraph, backend="aot_eager")(q, k, v)
    assert len(vars(ringattn.functional._EVERY_MODULE)) == made_before + 2
    grad_out = torch.randn(q.shape)
    for out, scale in zip(outs, scales, strict=True):
        ref, ref_grads = oracle({**p, "scale": scale}, q, k, v, grad_out)
        assert rel_err(out, ref) <= 1e-5, scale
        grads = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
        assert all(rel_err(g, r) <= 1e-5 for g, r in zip(grads, ref_grads, strict=True)), scale
    torch.testing.assert_close(ringattn.dilated_attention(q, k, v, **sets[0]), outs[0])
    assert len(vars(ringattn.functional._EVERY_MODULE)) == made_before + 2


def test_the_functional_form_traced_hands_the_module_maker_plain_constants(monkeypatch):
    """Dynamo converts every argument of an ``assume_constant_result`` call to a Python constant
    before it runs it at trace time, and torch 2.11 (the GPU machines') cannot convert a frozen
    dataclass: the Strategy among the options failed every trace of the functional form on CUDA
    and every one before an eager call there, "currently can't reconstruct arbitrary frozen
    dataclass instances" (h200_perf.md step 68). Torch 2.13 converts it, so this holds the rule
    itself: what the trace hands ``_made_while_tracing`` is numbers, strings, bools, None,
    classes, devices and tuples of them; the module it makes has the caller's strategy."""
    handed: list = []
    made_while_tracing = ringattn.functional._made_while_tracing

    @torch._dynamo.assume_constant_result
    def spy(*args, **kwargs):
        handed.extend([*args, *kwargs.values()])
        return made_while_tracing(*args, **kwargs)

    monkeypatch.setattr(ringattn.functional, "_made_while_tracing", spy)
    torch._dynamo.reset()
    strategy = ringattn.Strategy(dilation="global", memory="none")
    options_ = {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "scale": 0.71875}
    attention = _functional_call({**options_, "strategy": strategy, "compile": False})
    q = torch.randn(1, 16, 2, 8)
    out = torch.compile(attention, fullgraph=True, backend="eager")(q)

    def plain(value) -> bool:
        if isinstance(value, tuple):
            return all(plain(x) for x in value)
        return value is None or isinstance(value, (int, float, str, type, torch.device))

    assert handed and all(plain(value) for value in handed), handed
    assert torch.equal(out, ringattn.dilated_attention(q, q, q, **options_, strategy=strategy))
    kept = [m for m in vars(ringattn.functional._EVERY_MODULE).values() if m.functional_key]
    assert any(m.strategy == strategy and m.config.scale == 0.71875 for m in kept)


def _functional_call(options_: dict):
    # (the options a closure's constants: as a default argument Dynamo treats them as inputs)
    def attention(q):
        return ringattn.dilated_attention(q, q, q, **options_)

    return attention


@pytest.mark.parametrize("fullgraph", [True, False])
def test_the_functional_form_traced_refuses_bad_options(fullgraph):
    """Bad options of an option set first met in a trace get the constructor's own error:
    raised by the trace (fullgraph: inside Dynamo's report of it, which names it; without:
    the frame falls back to eager, which raises it), not Dynamo's internal error around it."""
    torch._dynamo.reset()
    q = torch.randn(1, 16, 2, 8)
    bad = [
        (
            ValueError,
            "dilation_rates[1]=3 must divide segment_lengths[1]=8",
            {"segment_lengths": (4, 8), "dilation_rates": (1, 3)},
        ),
        (
            TypeError,
            "segment_lengths",
            {"segment_lengths": (4, 8.0), "dilation_rates": (1, 2)},
        ),
        # refused by the constructor, which the trace runs in plain Python (_made_while_tracing)
        # and whose error type it raises again
        (
            TypeError,
            "parameter 'causal'",
            {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "causal": 1},
        ),
    ]
    for error, words, options_ in bad:
        attention = _functional_call(options_)
        with pytest.raises(RuntimeError if fullgraph else error) as caught:
            # (dynamic=False: one code object traced again with other ints in its closure makes
            # them symbolic, no constants; README's known limitation)
            torch.compile(attention, fullgraph=fullgraph, dynamic=False, backend="eager")(q)
        assert words in str(caught.value), str(caught.value)[:400]
        if fullgraph:  # Dynamo's report names the error the trace raised, with its type
            assert f"raised exception {error.__name__}(" in str(caught.value)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_the_functional_form_with_lengths_from_a_dynamic_shape(fullgraph):
    """Lengths computed from a symbolic ``n`` (``n // 2`` under ``dynamic=True``) are taken as
    constants by the trace, which guards on them: each length keeps the oracle's values, under
    fullgraph too. Before, Dynamo refused them (torch 2.13: "assume_constant_result argument
    conversion failed", a graph break; torch 2.11: its internal error, even without fullgraph)."""
    torch._dynamo.reset()

    def attention(q):
        n = q.shape[1]
        return ringattn.dilated_attention(q, q, q, segment_lengths=(n // 2,), dilation_rates=(2,))

    compiled = torch.compile(attention, fullgraph=fullgraph, dynamic=True, backend="eager")
    for n in (16, 24, 40):
        q = torch.randn(1, n, 2, 8)
        ref = reference.dilated_attention(q, q, q, segment_lengths=(n // 2,), dilation_rates=(2,))
        assert rel_err(compiled(q), ref) <= 1e-5, n


@pytest.mark.parametrize("fullgraph", [True, False])
def test_the_functional_form_with_a_length_argument_that_changes(fullgraph):
    """An int argument of the compiled function, new on each call, turns symbolic under Dynamo's
    automatic dynamic shapes at its first change: the trace takes its value as the shape case
    does, and each length keeps the oracle's values (under fullgraph, refused before)."""
    torch._dynamo.reset()

    def attention(q, w):
        return ringattn.dilated_attention(q, q, q, segment_lengths=(w,), dilation_rates=(2,))

    compiled = torch.compile(attention, fullgraph=fullgraph, backend="eager")
    q = torch.randn(1, 32, 2, 8)
    for w in (4, 8, 16):
        ref = reference.dilated_attention(q, q, q, segment_lengths=(w,), dilation_rates=(2,))
        assert rel_err(compiled(q, w), ref) <= 1e-5, w


@pytest.mark.parametrize("fullgraph", [True, False])
def test_the_functional_form_with_a_scale_argument_that_changes(fullgraph):
    """A float scale, new on each call, turns symbolic at its first change, as a length does:
    the trace takes its value as a constant and guards on it (under fullgraph Dynamo raised
    "assume_constant_result argument conversion failed", which names no argument)."""
    torch._dynamo.reset()

    def attention(q, scale):
        return ringattn.dilated_attention(
            q, q, q, segment_lengths=(4, 8), dilation_rates=(1, 2), scale=scale
        )

    compiled = torch.compile(attention, fullgraph=fullgraph, backend="eager")
    q = torch.randn(1, 16, 2, 8)
    for scale in (0.5, 0.25, 0.125, 3):
        ref = reference.dilated_attention(
            q, q, q, segment_lengths=(4, 8), dilation_rates=(1, 2), scale=scale
        )
        assert rel_err(compiled(q, scale), ref) <= 1e-5, scale


def test_the_functional_form_with_a_scale_from_a_dynamic_shape():
    """``d ** -0.5`` of a symbolic head dim is a symbolic float, taken as a constant too."""
    torch._dynamo.reset()

    def attention(q):
        scale = q.shape[-1] ** -0.5 * 2
        return ringattn.dilated_attention(
            q, q, q, segment_lengths=(8,), dilation_rates=(2,), scale=scale
        )

    compiled = torch.compile(attention, fullgraph=True, dynamic=True, backend="eager")
    for d in (4, 8, 16):
        q = torch.randn(1, 16, 2, d)
        ref = reference.dilated_attention(
            q, q, q, segment_lengths=(8,), dilation_rates=(2,), scale=d**-0.5 * 2
        )
        assert rel_err(compiled(q), ref) <= 1e-5, d


def _bad_calls(q: torch.Tensor) -> list[tuple[str, tuple]]:
    """Calls the boundary must refuse, each with the words its error must contain."""
    q8 = q.to(torch.float8_e4m3fn)
    return [
        ("k.dtype must equal q.dtype", (q, q.double(), q)),
        ("must have b >= 1", (q[:0], q[:0], q[:0])),
        ("k.shape must equal q.shape", (q, q[:, :, :1], q[:, :, :1])),
        ("v.shape must equal q.shape", (q, q, q[:, :8])),
        ("parameter 'k' must be a floating [b, n, h, d] tensor", (q, q[0], q)),
        ("parameter 'q' must be a floating [b, n, h, d] tensor", (q[..., None],) * 3),
        ("must have h >= 1", (q[:, :, :0],) * 3),
        ("parameter 'q' must be float16, bfloat16, float32 or float64", (q8, q8, q8)),
    ]


@pytest.mark.parametrize("fullgraph", [True, False])
def test_outer_compile_raises_the_boundary_errors(fullgraph):
    """Traced by a user's torch.compile, a bad call still raises the boundary's own error before
    any work (fullgraph: inside Dynamo's report of it), whether or not a good call compiled
    first; before, a head mismatch killed the process (SIGFPE) and b = 0 returned an empty
    tensor."""
    torch._dynamo.reset()
    module = ringattn.DilatedAttention((4, 8), (1, 2), compile=False)
    compiled = torch.compile(module, fullgraph=fullgraph, backend="eager")
    q = torch.randn(1, 16, 2, 8)
    compiled(q, q, q)
    for words, call in _bad_calls(q):
        with pytest.raises((TypeError, ValueError, RuntimeError)) as caught:
            compiled(*call)
        assert words in str(caught.value), (words, str(caught.value)[:300])


@pytest.mark.parametrize("fullgraph", [True, False])
def test_outer_compile_refuses_a_scale_past_float32s_range(fullgraph):
    """Traced, the scale's float32 range is checked as eagerly (a NaN output before)."""
    torch._dynamo.reset()
    module = ringattn.DilatedAttention((4, 8), (1, 2), causal=True, scale=1e39, compile=False)
    compiled = torch.compile(module, fullgraph=fullgraph, backend="eager")
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises((ValueError, RuntimeError)) as caught:
        compiled(q, q, q)
    assert "scale=1e+39 is inf in float32" in str(caught.value), str(caught.value)[:300]


def test_outer_compile_of_what_its_computer_cannot_compile():
    """flex with the global layout merges configs by LSE, which Inductor's CPU flex_attention
    cannot return. Under a user's torch.compile (compile=False module) it used to fail inside
    Inductor's lowering; now fullgraph=True gets the boundary's UnsupportedError (as
    compile=True does) and fullgraph=False runs those calls eagerly, with the eager result."""
    strategy = ringattn.Strategy(dilation="global", computer="flex")

    def fresh():
        torch._dynamo.reset()
        return ringattn.DilatedAttention((4, 16), (1, 2), compile=False, strategy=strategy)

    q, k, v = make_qkv(PROBLEM, torch.float32)
    with torch.no_grad():
        # first calls of fresh modules: the frame Dynamo gives back to eager runs the boundary's
        # beartype check, which Dynamo once traced there (a TypeCheckError for good input)
        traced = torch.compile(fresh())(q, k, v)
        traced_self = torch.compile(fresh())(q, q, q)
        with pytest.raises(Exception) as caught:
            torch.compile(fresh(), fullgraph=True)(q, k, v)
        assert "cannot return the LSE" in str(caught.value), str(caught.value)[:300]
        eager = fresh()
        torch.testing.assert_close(traced, eager(q, k, v))
        torch.testing.assert_close(traced_self, eager(q, q, q))


@NEEDS_COMPILED_CPU_FLEX
def test_outer_compile_of_flex_on_the_cpu():
    """A torch.compile around a flex module (segment_local, its own frame's one kernel) builds
    flex's masks inside the outer graph, which Inductor's CPU FlexAttention cannot lower: it
    failed there with a NoValidChoicesError, fullgraph or not. Now fullgraph=True gets the
    boundary's UnsupportedError and fullgraph=False runs the module in its own compiled frame,
    with its result."""

    def fresh():
        torch._dynamo.reset()
        return ringattn.DilatedAttention((4, 16), (1, 2), strategy=FLEX)

    q, k, v = make_qkv(PROBLEM, torch.float32)
    with torch.no_grad():
        own_frame = fresh()(q, k, v)
        torch.testing.assert_close(torch.compile(fresh())(q, k, v), own_frame)
        with pytest.raises(Exception) as caught:
            torch.compile(fresh(), fullgraph=True)(q, k, v)
        assert "cannot lower" in str(caught.value), str(caught.value)[:300]


def test_compiled_flex_refuses_float64_on_the_cpu_before_any_work():
    """Inductor's CPU FlexAttention takes float32, float16 and bfloat16: float64 failed inside
    Inductor's lowering; eager flex (compile=False) computes it."""
    q, k, v = make_qkv(PROBLEM, torch.float64)
    with pytest.raises(ringattn.UnsupportedError, match="float32, float16 and bfloat16 only"):
        ringattn.DilatedAttention((4, 16), (1, 2), strategy=FLEX)(q, k, v)
    eager = ringattn.DilatedAttention((4, 16), (1, 2), strategy=FLEX, compile=False)
    with torch.no_grad():
        out = eager(q, k, v)
    ref = reference.dilated_attention(q, k, v, segment_lengths=(4, 16), dilation_rates=(1, 2))
    assert rel_err(out, ref) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("computer", ["sdpa", "math"])
def test_copied_and_pickled_modules_run_their_own_core(computer):
    """A used module, deep-copied or pickled, with the original gone: its copies compute their
    own configs, eagerly and under a user's torch.compile. Before, a pickled used module failed
    (its prepared launches are closures), a deep copy's compiled call found no core of its
    serial, and a module loaded in another process ran whichever module held its serial there."""
    import copy
    import gc
    import pickle

    torch._dynamo.reset()
    q, k, v = make_qkv(PROBLEM, torch.float32)
    ref = reference.dilated_attention(q.double(), k.double(), v.double(), **options(PROBLEM))
    strategy = ringattn.Strategy(computer=computer)
    used = ringattn.DilatedAttention(**options(PROBLEM), strategy=strategy)
    used(q, k, v)
    copies = [copy.deepcopy(used), pickle.loads(pickle.dumps(used))]
    del used
    gc.collect()
    for module in copies:
        assert rel_err(module(q, k, v), ref) < TOLERANCE[torch.float32]
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        assert rel_err(compiled(q, k, v), ref) < TOLERANCE[torch.float32]


def test_identical_layers_compiled_one_by_one_share_one_graph():
    """Regional compilation (``torch.compile`` per layer) of ten identical layers: one graph,
    forward and backward. The opaque ops' module number was an int attribute, which Dynamo makes
    a guarded constant: each layer recompiled, and the ninth raised FailOnRecompileLimitHit
    under fullgraph=True (ran eagerly without it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layers = [ringattn.DilatedAttention((4, 8), (1, 2)) for _ in range(10)]
    compiled = [torch.compile(m, fullgraph=True, backend="aot_eager") for m in layers]
    x = torch.randn(1, 8, 2, 4, requires_grad=True)
    y, y_eager = x, x
    for layer, eager in zip(compiled, layers, strict=True):
        y, y_eager = layer(y, y, y), eager(y_eager, y_eager, y_eager)
    y.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(y, y_eager)


def test_modules_of_one_config_share_their_own_frames_graph():
    """A module with its own compiled frame (another compile_mode, or flex) shares one compiled
    core per config; with the module's number an int in the spec, each new instance recompiled
    it, and the 65th raised FailOnRecompileLimitHit though the others were gone."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(1, 8, 2, 4)
    for _ in range(10):
        module = ringattn.DilatedAttention(
            (4, 8),
            (1, 2),
            strategy=ringattn.Strategy(computer="math"),
            compile_mode="max-autotune-no-cudagraphs",
            compile_backend="aot_eager",
        )
        module(x, x, x)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_module_with_a_compiled_frame_of_its_own_pickles():
    """Its compiled core (a renamed copy of run_core, which pickle cannot name) stays behind and
    the copy makes its own: pickle and torch.save raised PicklingError before."""
    import io
    import pickle

    q, k, v = make_qkv(PROBLEM, torch.float32)
    ref = reference.dilated_attention(q.double(), k.double(), v.double(), **options(PROBLEM))
    module = ringattn.DilatedAttention(
        **options(PROBLEM),
        strategy=ringattn.Strategy(computer="math"),
        compile_mode="max-autotune-no-cudagraphs",
        compile_backend="aot_eager",
    )
    assert module.compiled_frame
    module(q, k, v)
    saved = io.BytesIO()
    torch.save(module, saved)
    saved.seek(0)
    for copy in (pickle.loads(pickle.dumps(module)), torch.load(saved, weights_only=False)):
        assert copy.compiled_frame and copy._core is module._core  # (one per config, shared)
        assert rel_err(copy(q, k, v), ref) < TOLERANCE[torch.float32]


# the computer whose module keeps a compiled frame of its own (forward-only on CPU)
FLEX = ringattn.Strategy(computer="flex")


def test_block_computers_open_no_frame_of_their_own():
    """compile=True with sdpa runs the same ops as eager without a Dynamo frame (which would add
    only host time), and gives the same result bit for bit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = make_qkv(PROBLEM, torch.float32)
    compiled = ringattn.DilatedAttention((4, 16), (1, 2), compile=True)
    eager = ringattn.DilatedAttention((4, 16), (1, 2), compile=False)
    assert not compiled.compiled_frame
    assert ringattn.DilatedAttention((4, 16), (1, 2), strategy=FLEX).compiled_frame
    assert ringattn.DilatedAttention((4, 16), (1, 2), compile_mode="reduce-overhead").compiled_frame
    assert torch.equal(compiled(q, k, v), eager(q, k, v))
    assert counters["stats"]["unique_graphs"] == 0


def test_pool_allocating_reads_the_cudagraph_tree_internals_it_names():
    """``ringattn.capture`` tells a cudagraph tree's warm-up by Inductor's internals (h200_perf.md
    step 63: caches made there were pool tensors no output held). Where they moved, it would say
    False for ever, silently: so their names are checked here, with each torch."""
    from torch._inductor import cudagraph_trees

    assert callable(torch._C._is_key_in_tls) and callable(cudagraph_trees.get_obj)
    assert hasattr(cudagraph_trees, "local")
    manager = cudagraph_trees.CUDAGraphTreeManager
    assert isinstance(manager.in_warmup, property) and isinstance(manager.in_recording, property)
    assert "self.stream = " in inspect.getsource(manager.__init__)
    assert "tree_manager" in inspect.getsource(cudagraph_trees.TreeManagerContainer.__init__)


@pytest.mark.parametrize("state", ["warmup", "recording", "execution", "other stream", "none"])
def test_pool_allocating_in_a_cudagraph_tree(state, monkeypatch):
    """True while this thread runs a tree's warm-up or recording on the tree's stream; not
    after (the caller's stream), nor while it replays. (CUDA played by stand-ins.)"""
    from types import SimpleNamespace

    from torch._inductor import cudagraph_trees

    from ringattn import capture

    tree_stream, caller_stream = object(), object()
    manager = SimpleNamespace(
        in_warmup=state in ("warmup", "other stream"),
        in_recording=state == "recording",
        stream=tree_stream,
    )
    containers = {0: SimpleNamespace(tree_manager=None if state == "none" else manager)}
    monkeypatch.setattr(torch._C, "_is_key_in_tls", lambda key: True)
    monkeypatch.setattr(cudagraph_trees, "get_obj", lambda local, name: containers)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    current = caller_stream if state == "other stream" else tree_stream
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *_: current)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert capture.pool_allocating() == (state in ("warmup", "recording"))
    assert not capture.pool_allocating(torch.zeros(1))  # (a CPU tensor's call: never)


def test_pooled_manager_keeps_nothing_made_in_a_graph_pool(monkeypatch):
    """Patterns and scratch made in a cudagraph tree's warm-up are the call's alone: kept, they
    would be pool tensors no output holds (ringattn.capture)."""
    from ringattn.memory import pooled

    pool = pooled.PooledMemory(4)
    monkeypatch.setattr(pooled, "pool_allocating", lambda: True)
    first = pool.cached("key", lambda: torch.zeros(2))
    assert pool.cached("key", lambda: torch.ones(2)) is not first and not pool.patterns.items
    assert pool.held_bytes() == 0
    monkeypatch.setattr(pooled, "pool_allocating", lambda: False)
    kept = pool.cached("key", lambda: torch.zeros(2))
    assert pool.cached("key", lambda: torch.ones(2)) is kept and pool.patterns.misses == 3


def test_a_module_on_the_cpu_names_itself_by_its_cpu_tag():
    """Only a CUDA device gets a tag of its own (core.device_tag: a CPU tensor among a CUDA
    graph's outputs is refused); elsewhere the module's CPU tag, stored nowhere else, so a
    trace's guard on the CUDA tags sees no change (storing it recompiled a traced model)."""
    from ringattn.core import _module_number, device_tag

    module = ringattn.DilatedAttention((4, 16), (1, 2))
    for device in ("cpu", "meta"):
        module.to(device)
        assert module._device_tag(torch.device(device)) is module._number
        assert device_tag(module._number, torch.device(device)) is module._number
    assert module._device_tags == {}
    assert core._MODULES[_module_number(module._number)] is module


def test_a_module_built_or_moved_on_cuda_makes_its_cuda_tag_once(monkeypatch):
    """A model compiled around the module traces its CUDA tag (a trace cannot make one): so the
    module makes it when built under ``torch.device("cuda")`` and when moved there
    (``model.to("cuda")``), one per device. (CUDA played by stand-ins.)"""
    from types import SimpleNamespace

    from ringattn import api

    made = []
    monkeypatch.setattr(api, "device_tag", lambda tag, device: made.append(device) or tag + 0)
    monkeypatch.setattr(api, "pool_allocating", lambda *_: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cuda"))
    built = ringattn.DilatedAttention((4, 16), (1, 2))
    assert made == [cuda0] and list(built._device_tags) == [cuda0]
    monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cpu"))
    moved = ringattn.DilatedAttention((4, 16), (1, 2))
    for device in (cuda1, cuda1, torch.device("cpu")):
        assert moved._apply(lambda t, device=device: SimpleNamespace(device=device)) is moved
    assert made == [cuda0, cuda1] and list(moved._device_tags) == [cuda1]
    assert built._device_tag(torch.device("cuda")) is built._device_tags[cuda0]


def test_no_cuda_tag_is_made_in_a_graph_pool(monkeypatch):
    """A module's first call inside a CUDA graph capture (or a cudagraph tree's warm-up) keeps
    its CPU tag: a CUDA one made then would be a tensor of the graph's pool kept by the module,
    and its copy from the host is refused while capturing. (CUDA played by the check.)"""
    from ringattn import api

    module = ringattn.DilatedAttention((4, 16), (1, 2))
    monkeypatch.setattr(api, "pool_allocating", lambda *_: True)
    assert module._device_tag(torch.device("cuda", 0)) is module._number
    assert module._device_tags == {}


@pytest.mark.parametrize("frame", ["own", "model"])
def test_the_module_tensor_is_a_static_graph_input(frame, caplog):
    """CUDA-graph trees hold every non-static graph input to their memory pool, which the
    opaque ops' CPU module tensor never is (h200_perf.md step 62): it is marked static, so in
    the module's own frame AOTAutograd hands it to Inductor as one (read from its cudagraph
    static-inputs log; the tensors are not). In a model traced around the module it was one
    already, as a module attribute: that case guards against losing it there."""
    import logging

    torch._dynamo.reset()
    own = frame == "own"
    mode = "max-autotune-no-cudagraphs" if own else "default"
    module = ringattn.DilatedAttention(
        (4, 16), (1, 2), compile=own, compile_backend="aot_eager", compile_mode=mode
    )
    call = module if own else torch.compile(module, backend="aot_eager", fullgraph=True)
    q = torch.randn(1, 32, 2, 8)
    torch._logging.set_logs(cudagraph_static_inputs=True)
    try:
        with caplog.at_level(logging.DEBUG):
            call(q, q, q)
    finally:
        torch._logging.set_logs()
    lines = sorted({r.getMessage() for r in caplog.records if "static input pos" in r.getMessage()})
    static = [line for line in lines if line.startswith("Adding static input")]
    assert len(lines) >= 2 and len(static) == 1, lines
    assert ("module" if own else "_number") in static[0], static


def test_identical_layers_share_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = make_qkv(PROBLEM, torch.float32)
    for _ in range(3):
        layer = ringattn.DilatedAttention(
            (4, 16), (1, 2), compile=True, compile_backend="eager", strategy=FLEX
        )
        with torch.no_grad():
            layer(q, k, v)
    assert counters["stats"]["unique_graphs"] == 1


def test_new_sequence_length_compiles_a_new_graph_once():
    """Documented behaviour: static shapes. A new n is a new graph; repeating it is free."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = ringattn.DilatedAttention(
        (4, 16), (1, 2), compile=True, compile_backend="eager", strategy=FLEX
    )
    for n in (20, 24, 20, 24):
        q, k, v = make_qkv({**PROBLEM, "n": n}, torch.float32)
        with torch.no_grad():
            layer(q, k, v)
    assert counters["stats"]["unique_graphs"] == 2


def test_self_attention_with_one_tensor_compiles():
    """q is k is v: Dynamo's autograd.Function refuses duplicate inputs; the boundary aliases."""
    torch._dynamo.reset()
    layer = ringattn.DilatedAttention((4, 16), (1, 2), compile=True)
    x = make_qkv(PROBLEM, torch.float32)[0].requires_grad_()
    with torch.no_grad():
        layer(x, x, x)  # registers the core's ops; the model below captures them
    model = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = model(x, x, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    ref_x = x.detach().double().requires_grad_()
    ref = reference.dilated_attention(
        ref_x, ref_x, ref_x, segment_lengths=(4, 16), dilation_rates=(1, 2)
    )
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4


def test_more_than_eight_sequence_lengths_stay_compiled():
    """Dynamo's default recompile limit (8) would make fullgraph raise on the 9th shape."""
    torch._dynamo.reset()
    layer = ringattn.DilatedAttention(
        (4,), (2,), compile=True, compile_backend="eager", strategy=FLEX
    )
    for n in range(4, 16):
        q, k, v = make_qkv({**PROBLEM, "n": n}, torch.float32)
        with torch.no_grad():
            layer(q, k, v)


def test_the_compiled_frames_recompile_limit_is_named_and_never_lowered(monkeypatch):
    """The module's own frame ran under a patch of Dynamo's limit to 64 made at import: a
    higher limit the user set was put back to 64 on every call, a lower RECOMPILE_LIMIT set
    later was ignored, and the 65th shape raised Dynamo's FailOnRecompileLimitHit, which
    blames a fullgraph=True the user never passed. The limit is read per call now, the larger
    of the two, and its overflow says what to raise or turn off."""
    monkeypatch.setattr(ringattn.api, "RECOMPILE_LIMIT", 2)

    def run(layer, lengths):
        for n in lengths:
            with torch.no_grad():
                layer(*make_qkv({**PROBLEM, "n": n}, torch.float32))

    # (not monkeypatch: its undo deletes a config module's entry, which then does not exist)
    for users, lengths in ((1, (4, 5)), (4, (4, 5, 6, 7))):  # RECOMPILE_LIMIT's 2; the user's 4
        torch._dynamo.reset()
        layer = ringattn.DilatedAttention((4,), (2,), compile_backend="eager", strategy=FLEX)
        with torch._dynamo.config.patch(recompile_limit=users):
            run(layer, lengths)
            with pytest.raises(RuntimeError, match=rf"its {len(lengths)} are spent: raise torch"):
                run(layer, (8,))
            assert torch._dynamo.config.recompile_limit == users  # (put back)


def test_a_module_built_on_the_meta_device_runs_its_core_when_compiled():
    """Built under ``torch.device("meta")`` and materialised with ``to_empty`` (torchtitan's
    recipe): the opaque ops' module tag stayed on meta, so compiled calls dispatched to the ops'
    fake kernels and returned uninitialised memory (NaN, 1e21), silently."""
    with torch.device("meta"):
        attention = ringattn.DilatedAttention(
            (4, 8), (1, 2), causal=True, strategy=ringattn.Strategy(computer="sdpa")
        )
    attention = attention.to_empty(device="cpu")
    p = {"b": 1, "n": 16, "h": 2, "d": 8, "segment_lengths": (4, 8), "dilation_rates": (1, 2)}
    q, k, v = make_qkv(p | {"causal": True, "mixing": "lse"})
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    ref = reference.dilated_attention(
        q.double(), k.double(), v.double(), segment_lengths=(4, 8), dilation_rates=(1, 2),
        causal=True,
    )  # fmt: skip
    assert rel_err(compiled(q, k, v), ref) < TOLERANCE[torch.float32]


def test_module_numbers_differ_between_processes():
    """A graph names its module by number; an exported program loaded in another process ran
    that process's module of the same number (another config, relative error 0.99) while each
    process counted from 0. Each process now starts at its own random offset."""
    import subprocess
    import sys

    script = "import ringattn.core as c, torch; print(int(c.register_module(torch.nn.Module())))"
    numbers = [
        int(subprocess.check_output([sys.executable, "-c", script], text=True)) for _ in range(2)
    ]
    assert numbers[0] != numbers[1] and min(numbers) > 0


# Sequences of ints, as a user may pass segment_lengths and dilation_rates: the module takes
# any collections.abc.Sequence of ints (config.int_sequence) and refuses byte strings and str
# (read as the codes of their characters) and what is no Sequence (a numpy array). The
# functional form caches its modules by these: hashed as given, a UserList or a deque failed as
# "unhashable type", and a numpy array did so inside a user's torch.compile, naming nothing.
SEQUENCES = {
    "list": list,
    "tuple": tuple,
    "UserList": collections.UserList,
    "range": lambda values: range(values[0], values[-1] + 1, values[-1] - values[0]),
    "torch.Size": torch.Size,
    "deque": collections.deque,
    "array": lambda values: array.array("q", values),
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": lambda values: memoryview(bytes(values)),
    "str": lambda values: "".join(map(chr, values)),
    "numpy": np.array,
    "numpy ints": lambda values: [np.int64(x) for x in values],
}


@pytest.mark.parametrize("kind", SEQUENCES)
def test_the_functional_form_takes_the_sequences_the_module_takes(kind):
    """The functional form, eager and traced by a user's torch.compile(fullgraph=True), takes
    the segment lengths and dilation rates the module takes, with its result, and refuses the
    others with the module's error type naming the argument (traced: inside Dynamo's report,
    the eager call's message)."""
    torch._dynamo.reset()
    make = SEQUENCES[kind]
    lengths, rates = make([4, 8]), make([1, 2])
    q = torch.randn(1, 16, 2, 8)
    try:
        expected = ringattn.DilatedAttention(lengths, rates, compile=False)(q, q, q)
    except (TypeError, ValueError) as error:
        expected = error

    def attention(q):
        return ringattn.dilated_attention(
            q, q, q, segment_lengths=lengths, dilation_rates=rates, compile=False
        )

    # (Dynamo cannot take len() of an array.array: a graph break, so not under fullgraph)
    compiled = torch.compile(attention, fullgraph=kind != "array", backend="eager")
    if isinstance(expected, Exception):
        assert "segment_lengths" in str(expected), str(expected)[:300]
        # the same kind, TypeError or ValueError (beartype's violations subclass TypeError)
        kind_of_error = TypeError if isinstance(expected, TypeError) else ValueError
        with pytest.raises(kind_of_error) as eager:
            attention(q)
        assert str(eager.value).startswith("segment_lengths"), str(eager.value)
        with pytest.raises(RuntimeError) as traced:
            compiled(q)
        words = str(eager.value)
        if kind == "numpy ints":  # (traced, Dynamo holds a numpy int as an array: "got ndarray")
            words = words.split(" got ")[0]
        assert words in str(traced.value), str(traced.value)[:400]
    else:
        torch.testing.assert_close(attention(q), expected, rtol=0, atol=0)
        torch.testing.assert_close(compiled(q), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"segment_lengths": np.array([4, 8])}, "segment_lengths must be a list or tuple of ints"),
        ({"segment_lengths": bytearray(b"\x04\x08")}, "segment_lengths must be a list or tuple"),
        ({"scale": np.array(0.5)}, "scale must be float | int | None, got ndarray"),
        ({"causal": np.array(False)}, "causal must be bool, got ndarray"),
        ({"compile_backend": bytearray(b"eager")}, "compile_backend must be str, got bytearray"),
        ({"compile_backend": b"eager"}, "compile_backend must be str, got bytes"),
    ],
)
def test_the_functional_form_traced_names_an_option_of_no_plain_type(overrides, error, fullgraph):
    """An option of no plain type (an unhashable one, which the functional form's cache cannot
    key, or bytes) gets the same TypeError naming it in a user's torch.compile (fullgraph: inside
    Dynamo's report; without, the frame falls back to eager, which raises it) as eagerly: traced,
    hashing a numpy array raised "unhashable type: 'numpy.ndarray'", naming nothing, and under
    torch 2.11 a bytearray raised Dynamo's internal error (bytes: beartype's error, eagerly)."""
    torch._dynamo.reset()
    q = torch.randn(1, 16, 2, 8)
    attention = _functional_call({"segment_lengths": (4, 8), "dilation_rates": (1, 2), **overrides})
    with pytest.raises(TypeError) as eager:
        attention(q)
    assert str(eager.value).startswith(error), str(eager.value)
    with pytest.raises(RuntimeError if fullgraph else TypeError) as traced:
        torch.compile(attention, fullgraph=fullgraph, backend="eager")(q)
    assert str(eager.value) in str(traced.value), str(traced.value)[:400]


def test_the_functional_form_traced_refuses_a_numpy_scalar():
    """Held limitation: a numpy float is a float to the eager call, but Dynamo holds it as a
    0-d array, no constant to make the module of; under fullgraph the trace refuses it naming
    the option and why, and without, the call runs through a graph break, with the eager
    result."""
    torch._dynamo.reset()
    q = torch.randn(1, 16, 2, 8)
    attention = _functional_call(
        {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "scale": np.float64(0.5)}
    )
    eager = attention(q)
    with pytest.raises(RuntimeError, match=r"scale must be .* got ndarray \(traced by torch.com"):
        torch.compile(attention, fullgraph=True, backend="eager")(q)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(attention, backend="eager")(q), eager)


def _scaled(base: type, factor: float) -> type:
    """A subclass of the computer ``base`` whose output is ``factor`` times its own."""
    if issubclass(base, LayoutComputer):

        class Scaled(base):
            def attend(self, *args):
                return factor * super().attend(*args)

    else:

        class Scaled(base):
            def forward(self, q, k, v, causal, scale):
                out, lse = super().forward(q, k, v, causal, scale)
                return factor * out, lse

    return Scaled


@pytest.mark.parametrize("computer, mode", [("flex", "default"), ("math", "reduce-overhead")])
def test_a_compiled_core_runs_a_re_registered_class(computer, mode):
    """``compiled_core`` keeps one compiled function per (config, strategy names, backend,
    mode), whichever classes the names stood for: a strategy re-registered under its name (a
    notebook cell re-run with a fix) must not run the old class's graph. Each module with a
    compiled frame of its own: flex, whose class is traced into the graph (its guards see the
    new class), and a block computer in another mode, whose graph holds the opaque ops (they
    ask the module for its computer at run time). The new class's module runs the new class,
    and a module made before keeps the old one (a module is fixed at construction)."""
    from ringattn.computers.flex import FlexComputer
    from ringattn.computers.math import MathComputer

    torch._dynamo.reset()
    base = {"flex": FlexComputer, "math": MathComputer}[computer]
    name = f"{computer}_fixed_later"
    q = torch.randn(1, 8, 2, 4)
    ref = reference.dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))

    def module():
        strategy = ringattn.Strategy(computer=name)
        return ringattn.DilatedAttention(
            (4,), (1,), strategy=strategy, compile_backend="eager", compile_mode=mode
        )

    registry.register("computer", name)(_scaled(base, 2.0))
    try:
        with torch.no_grad():
            old = module()
            assert old.compiled_frame
            assert rel_err(old(q, q, q), 2 * ref) <= 1e-5
            registry.unregister("computer", name)
            registry.register("computer", name)(_scaled(base, 1.0))
            new = module()
            assert new._core is old._core  # (the key holds names: one function for both)
            assert rel_err(new(q, q, q), ref) <= 1e-5
            assert rel_err(old(q, q, q), 2 * ref) <= 1e-5
    finally:
        registry.unregister("computer", name, missing_ok=True)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_a_users_compile_of_the_functional_form_runs_a_re_registered_class(fullgraph):
    """The functional form traced by a user's torch.compile finds its module by a key that holds
    the strategy's classes: after a re-registration under the same name the compiled function
    retraces and runs the new class (a graph kept over the old module ran the old one)."""
    from ringattn.computers.math import MathComputer

    torch._dynamo.reset()
    q = torch.randn(1, 8, 2, 4)
    ref = reference.dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))
    name = f"math_fixed_later_{fullgraph}"
    registry.register("computer", name)(_scaled(MathComputer, 2.0))
    try:
        strategy = ringattn.Strategy(computer=name)
        options_ = {"segment_lengths": (4,), "dilation_rates": (1,), "strategy": strategy}
        attention = torch.compile(
            _functional_call(options_), fullgraph=fullgraph, backend="aot_eager"
        )
        with torch.no_grad():
            assert rel_err(attention(q), 2 * ref) <= 1e-5
            registry.unregister("computer", name)
            registry.register("computer", name)(_scaled(MathComputer, 1.0))
            assert rel_err(attention(q), ref) <= 1e-5
    finally:
        registry.unregister("computer", name, missing_ok=True)


@torch.library.custom_op("ringattn_test::graphs_compiling", mutates_args=())
def _graphs_compiling_probe(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_graphs_compiling_probe.register_fake
def _(x):
    return torch.empty_like(x)


_GRAPHS_COMPILING_SEEN: list[bool] = []


def _probe_setup_context(ctx, inputs, output) -> None:
    # (where ringattn's op checks it; a fake kernel's result may come from the fake cache)
    from ringattn import capture

    _GRAPHS_COMPILING_SEEN.append(capture.graphs_compiling())


_graphs_compiling_probe.register_autograd(lambda ctx, g: g, setup_context=_probe_setup_context)


@pytest.mark.parametrize(("mode", "seen"), [("reduce-overhead", True), ("default", False)])
def test_graphs_compiling_is_true_while_inductor_traces_for_cuda_graphs(mode, seen):
    """capture.graphs_compiling reads Inductor's config as the mode patches it while AOTAutograd
    traces (an op's autograd context sees it; Dynamo's own trace does not): the name it reads
    is still Inductor's, and the patch still reaches the op."""
    import torch._functorch.config
    import torch._inductor.config

    from ringattn import capture

    _GRAPHS_COMPILING_SEEN.clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: _graphs_compiling_probe(x) * 2, mode=mode)
    # (a cached compile, from disk too, would skip the trace that reads it; the configs' own
    # patch: monkeypatch's undo of a config module's attribute deleted it)
    no_caches = (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    )
    with no_caches[0], no_caches[1]:
        compiled(torch.randn(4, requires_grad=True)).sum().backward()
    assert _GRAPHS_COMPILING_SEEN and _GRAPHS_COMPILING_SEEN[-1] is seen
    assert not capture.graphs_compiling()  # (outside a compile)


def test_reduce_overhead_without_a_cuda_tag_is_refused_clearly():
    """A forward+backward traced for CUDA graphs on CUDA inputs with the module's CPU tag (the
    module neither built on nor moved to the GPU, no eager call there) would fail in Inductor's
    cudagraph trees ("Expected all cuda outputs"); the op's autograd context refuses it first,
    saying what to do. The same trace without CUDA graphs, or on CPU inputs, is not refused."""
    from types import SimpleNamespace

    import torch._inductor.config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    def setup(device: str) -> None:
        q, k, v, out = (torch.empty(1, 8, 2, 4, device=device) for _ in range(4))
        lse = torch.empty(1, 8, 2, device=device)
        ctx = SimpleNamespace(save_for_backward=lambda *tensors: None)
        core._setup_context(ctx, (q, k, v, torch.tensor(3)), (out, lse))

    with FakeTensorMode():
        setup("cuda")  # (default mode: the CPU tag is fine)
        with inductor_config.patch({"triton.cudagraphs": True}):
            setup("cpu")
            with pytest.raises(RuntimeError, match=r"reduce-overhead.*model\.to\('cuda'\)"):
                setup("cuda")


def test_reduce_overhead_forward_backward_on_cpu_inputs_is_eagers():
    """The refusal above is for a CPU tag with CUDA inputs only: on the CPU the mode's trace
    (Inductor's CUDA graphs patched on, then skipped for CPU inputs) runs forward and backward
    through the ops, and gives the eager module's output and gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=gen) for _ in range(3))
    results = []
    for mode in ("reduce-overhead", None):
        module = ringattn.DilatedAttention(
            (4, 8), (1, 2), compile=mode is not None, compile_mode=mode or "default"
        )
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = module(*leaves)
        out.square().sum().backward()
        results.append([out.detach(), *(x.grad for x in leaves)])
    for compiled, eager in zip(*results):
        assert rel_err(compiled, eager) <= 1e-5


def test_the_functional_form_traced_on_cuda_makes_its_modules_cuda_tag(monkeypatch):
    """Traced on CUDA inputs, the functional form has its option set's module make its CUDA tag
    at trace time in plain Python (``_made_while_tracing``), as an eager call there would: a
    compile for CUDA graphs needs one and a trace cannot make it (its CPU tag was refused,
    ``test_reduce_overhead_without_a_cuda_tag_is_refused_clearly``). Also for a module kept
    from before; where the tag cannot be made, the trace goes on with the CPU tag. Off CUDA,
    nothing is made. (The CUDA tag itself: ``core.device_tag``, on a GPU only.)"""
    made: list[torch.device] = []

    def stand_in(self, device):
        made.append(device)
        if len(made) == 3:
            raise RuntimeError("CUDA error: out of memory")
        return self._number

    monkeypatch.setattr(ringattn.DilatedAttention, "_device_tag", stand_in)
    args = ((4, 8), (1, 2))  # (an option set of its own: the scale)
    others = {"causal": False, "mixing": "lse", "scale": 0.59375, "strategy": ringattn.Strategy()}
    others |= {"compile": True, "compile_backend": "inductor"}
    cuda = torch.device("cuda", 0)
    for device in (cuda, cuda, cuda, torch.device("cpu"), None):
        constants = ringattn.functional._as_constants(others)
        attribute, refusal, _ = ringattn.functional._made_while_tracing(
            *args, device=device, **constants
        )
        assert attribute and not refusal
    assert made == [cuda] * 3  # (the third raised: swallowed, the CPU tag serves)
    assert getattr(ringattn.functional._EVERY_MODULE, attribute).functional_key is not None


def test_a_refused_compiled_call_needs_dynamos_reset_as_the_readme_says():
    """README's Known limitations: a call refused under a torch.compile without fullgraph makes
    Dynamo skip ``DilatedAttention.forward`` (a code object every module shares) for the rest of
    the process, so a later ``torch.compile(attn, fullgraph=True)`` of another module raised
    Dynamo's ``Unsupported`` naming ``is_fake``; ``torch._dynamo.reset()`` heals it. If a torch
    release stops skipping the frame, the README's note goes."""
    torch._dynamo.reset()
    q, k, v = make_qkv(PROBLEM, torch.float32)
    bad = ringattn.DilatedAttention(**options(PROBLEM))
    with pytest.raises(TypeError, match="must equal q"):
        torch.compile(bad, backend="aot_eager")(q, k[:, :4], v)
    good = ringattn.DilatedAttention(**options(PROBLEM))
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported, match="is_fake"):
            torch.compile(good, backend="aot_eager", fullgraph=True)(q, k, v)
    finally:
        torch._dynamo.reset()  # (the skip would outlive this test in its worker)
    counters.clear()
    out = torch.compile(good, backend="aot_eager", fullgraph=True)(q, k, v)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(out, good(q, k, v))
