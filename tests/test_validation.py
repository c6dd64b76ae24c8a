"""Bad input gets a clear TypeError/ValueError naming the argument, before any work."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import dilation_configs, rel_err
from hypothesis import example, given
from hypothesis import strategies as st
from torch.testing._internal.two_tensor import TwoTensor

import ringattn
from ringattn import reference
from ringattn.memory.pooled import PooledMemory
from ringattn.nn import MultiheadDilatedAttention

GOOD = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}


def qkv(shape=(1, 8, 2, 4), dtype=torch.float32):
    return tuple(torch.randn(shape, dtype=dtype) for _ in range(3))


def call(q, k, v, **overrides):
    return ringattn.dilated_attention(q, k, v, **{**GOOD, **overrides}, compile=False)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"segment_lengths": []}, ValueError, "segment_lengths must not be empty"),
        ({"dilation_rates": []}, ValueError, "dilation_rates must not be empty"),
        ({"segment_lengths": [4]}, ValueError, "same length"),
        ({"dilation_rates": [1]}, ValueError, "same length, got 2 and 1"),  # (either one short)
        ({"segment_lengths": [4, 0]}, ValueError, r"segment_lengths\[1\] must be >= 1, got 0"),
        ({"dilation_rates": [1, -2]}, ValueError, r"dilation_rates\[1\] must be >= 1, got -2"),
        ({"segment_lengths": [4, 8.0]}, TypeError, "segment_lengths"),
        ({"dilation_rates": [1, True]}, TypeError, "dilation_rates"),
        (
            {"dilation_rates": [1, 3]},
            ValueError,
            r"dilation_rates\[1\]=3 must divide segment_lengths\[1\]=8",
        ),
        ({"mixing": "softmax"}, ValueError, "mixing must be one of"),
        ({"causal": 1}, TypeError, "causal"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
        ({"scale": 0.0}, ValueError, "scale must be > 0"),
        ({"scale": -2}, ValueError, "scale must be > 0"),
        ({"scale": "0.5"}, TypeError, "scale"),
        # (an int past float's range: an OverflowError naming nothing, before)
        ({"scale": 10**400}, ValueError, "scale must be finite"),
        ({"segment_lengths": "48"}, TypeError, "segment_lengths"),
        # (as_strided's int64 overflow, a TypeError, before)
        (
            {"segment_lengths": [4, 2**62]},
            ValueError,
            r"segment_lengths\[1\]=\d+ must be <= 2\*\*40",
        ),
        (  # (the bound itself, not only far past it)
            {"segment_lengths": [4, 2**40 + 1]},
            ValueError,
            r"segment_lengths\[1\]=\d+ must be <= 2\*\*40",
        ),
    ],
)
def test_bad_options(overrides, error, match):
    with pytest.raises(error, match=match):
        call(*qkv(), **overrides)
    if "causal" not in overrides and "scale" not in overrides:
        with pytest.raises(error, match=match):
            ringattn.DilatedAttention(**{**GOOD, **overrides})


@pytest.mark.parametrize(
    "tensors, error, match",
    [
        (qkv((8, 2, 4)), TypeError, "parameter 'q'"),  # not 4-D
        ((*qkv()[:2], torch.randn(1, 8, 2, 5)), TypeError, "parameter 'v'"),  # shape differs
        ((*qkv()[:2], torch.randn(1, 9, 2, 4)), TypeError, "parameter 'v'"),
        ((qkv()[0], qkv()[1].double(), qkv()[2]), TypeError, r"k.dtype must equal q.dtype"),
        ((qkv()[0].int(), *qkv()[1:]), TypeError, "parameter 'q'"),  # not floating point
        # floating point, but no kernel's: it failed inside each computer, unnamed
        (
            (qkv()[0], qkv()[1].to(torch.float8_e4m3fn), qkv()[2]),
            TypeError,
            "parameter 'k' must be float16, bfloat16, float32 or float64, got torch.float8",
        ),
        (
            tuple(x.to(torch.float8_e5m2) for x in qkv()),
            TypeError,
            "parameter 'q' must be float16, bfloat16, float32 or float64, got torch.float8",
        ),
        (qkv((1, 0, 2, 4)), ValueError, "n >= 1"),
        # (each axis: h = 0 returned an empty output, d = 0 a ZeroDivisionError, unchecked)
        (qkv((0, 8, 2, 4)), ValueError, r"b >= 1, got shape \(0, 8, 2, 4\)"),
        (qkv((1, 8, 0, 4)), ValueError, r"h >= 1, got shape \(1, 8, 0, 4\)"),
        (qkv((1, 8, 2, 0)), ValueError, r"d >= 1, got shape \(1, 8, 2, 0\)"),
        # more dims than four: the rule in words, not jaxtyping's report of the annotation
        (qkv((1, 8, 2, 4, 1)), TypeError, r"parameter 'q' must be a floating \[b, n, h, d\]"),
        (([1.0], *qkv()[1:]), TypeError, "parameter 'q'"),
        ((qkv()[0].to_sparse(), *qkv()[1:]), TypeError, "must be a dense"),
        # (a strided nested tensor reports torch.strided: it failed at its first .shape)
        (
            (torch.nested.nested_tensor([torch.randn(8, 2, 4)]), *qkv()[1:]),
            TypeError,
            "parameter 'q' must be a dense .*got a nested tensor",
        ),
        (  # (of other dims: the shape rule's message, which formats .shape, failed)
            (torch.nested.nested_tensor([torch.randn(8, 2, 4, 1)]), *qkv()[1:]),
            TypeError,
            "parameter 'q' must be a dense .*got a nested tensor",
        ),
        (  # (a jagged one is a tensor subclass too: named as nested, by the layout rule)
            (torch.nested.nested_tensor([torch.randn(8, 2, 4)], layout=torch.jagged), *qkv()[1:]),
            TypeError,
            "parameter 'q' must be a dense .*got a nested tensor",
        ),
        # a wrapper subclass (__torch_dispatch__) failed inside the core's strided views
        (
            (qkv()[0], TwoTensor(*qkv()[1:]), qkv()[2]),
            TypeError,
            "parameter 'k' must be a plain torch.Tensor, got the tensor subclass TwoTensor",
        ),
        # grouped-query K/V (fewer heads): the rule, and the way to get it
        ((qkv()[0], *qkv((1, 8, 1, 4))[1:]), TypeError, r"k.shape must .*repeat_interleave"),
    ],
)
def test_bad_tensors(tensors, error, match):
    with pytest.raises(error, match=match):
        call(*tensors)
    module = ringattn.DilatedAttention(**GOOD, compile=False)
    with pytest.raises(error, match=match):
        module(*tensors)


def test_a_subclass_is_refused_on_every_call_of_a_module():
    """A module checks a shape's types once (its signature cache), but a subclass is refused
    on every call: a plain call of that shape first must not let a wrapper through."""
    module = ringattn.DilatedAttention(**GOOD, compile=False)
    q, k, v = qkv()
    module(q, k, v)
    with pytest.raises(TypeError, match=r"parameter 'v' must be a plain torch\.Tensor"):
        module(q, k, TwoTensor(v, v))


def test_a_dtensor_is_refused_with_the_way_to_its_local_tensor(one_gloo_rank):
    """A DTensor (any placement) failed deep in the core ("as_strided not supported with
    DTensor"), and a compiled call with Dynamo's UnsupportedFakeTensorException: now the
    boundary's TypeError, eager and traced, names to_local() and the sharded-heads caveat."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    torch.distributed.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (1,))
        q, k, v = qkv()
        q_sharded = DTensor.from_local(q, mesh, [Shard(2)], run_check=False)
        words = "parameter 'q' is a DTensor, which ringattn's dilated attention does not take"
        module = ringattn.DilatedAttention(**GOOD, compile=False)
        traced = torch.compile(module, fullgraph=True, backend="eager")
        for call_it in (lambda: call(q_sharded, k, v), lambda: module(q_sharded, k, v)):
            with pytest.raises(TypeError, match=words + r".*q\.to_local\(\).*Heads split"):
                call_it()
        torch._dynamo.reset()
        with pytest.raises(Exception, match=words) as caught:  # (inside Dynamo's report)
            traced(q_sharded, k, v)
        assert isinstance(caught.value, (TypeError, RuntimeError)), type(caught.value)
    finally:
        torch._dynamo.reset()
        torch.distributed.destroy_process_group()


def test_device_mismatch_is_named():
    q, k, v = qkv()
    meta = torch.empty_like(v, device="meta")
    with pytest.raises(ValueError, match=r"v\.device must equal q\.device"):
        call(q, k, meta)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"dilation": "diagonal"}, "unknown dilation strategy 'diagonal'; registered: "),
        ({"computer": "cuda_magic"}, "unknown computer strategy 'cuda_magic'"),
        ({"communicator": "carrier_pigeon"}, "unknown communicator strategy"),
        ({"memory": "infinite"}, "unknown memory strategy"),
        # a name of another kind says where it belongs (Strategy("sdpa") sets the dilation)
        ({"dilation": "sdpa"}, r"unknown dilation strategy 'sdpa' \('sdpa' is a computer: "),
        ({"memory": "ring"}, r"\('ring' is a communicator: communicator='ring'\)"),
    ],
)
def test_unknown_strategy_names(fields, match):
    with pytest.raises(ValueError, match=match):
        ringattn.Strategy(**fields)


def test_a_positional_name_of_another_kind_says_which_field_it_belongs_to():
    with pytest.raises(ValueError, match=r"'sdpa' is a computer: computer='sdpa'"):
        ringattn.Strategy("sdpa")


@pytest.mark.parametrize("fields", [{"computer": 3}, {"memory": None}, {"dilation": ["global"]}])
def test_strategy_names_must_be_strs(fields):
    """A TypeError naming the field (unchecked, 3 and None were "unknown" names, a ValueError,
    and a list raised "unhashable type")."""
    (kind,) = fields
    with pytest.raises(TypeError, match=re.escape(f"{kind} must be a strategy name (str), got")):
        ringattn.Strategy(**fields)


def test_strategy_must_be_a_strategy():
    with pytest.raises(TypeError, match="strategy"):
        call(*qkv(), strategy="segment_local/sdpa/local/pooled")


def test_invalid_combination_names_the_part():
    from ringattn import registry
    from ringattn.computers.math import MathComputer

    @registry.register("computer", "needs_global")
    class NeedsGlobal(MathComputer):
        @classmethod
        def incompatible_with(cls, strategy):
            if strategy.dilation != "global":
                return "needs the global layout"
            return None

    try:
        bad = ringattn.Strategy(computer="needs_global", dilation="segment_local")
        with pytest.raises(ValueError, match="computer='needs_global': needs the global layout"):
            ringattn.DilatedAttention(**GOOD, strategy=bad)
        assert bad not in ringattn.Strategy.all()
        assert (
            ringattn.Strategy(computer="needs_global", dilation="global") in ringattn.Strategy.all()
        )
    finally:
        registry.unregister("computer", "needs_global", missing_ok=True)


def test_unsupported_dtype_for_computer_is_named():
    # sdpa on CUDA has no float64 kernels; checked from the computer's own rule on a meta device
    from ringattn.computers.sdpa import SDPAComputer

    reason = SDPAComputer().unsupported(torch.float64, torch.device("cuda"), needs_grad=False)
    assert reason and "float64" in reason
    module = ringattn.DilatedAttention(**GOOD, compile=False)
    q, k, v = (torch.empty(1, 8, 2, 4, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="computer='sdpa' cannot run"):
        module(q, k, v)


@pytest.mark.parametrize("dilation", ["global", "segment_local"])
def test_flex_on_the_meta_device_is_refused_by_name(dilation):
    """flex has no meta kernel: global raised a RuntimeError from its index math, segment_local
    torch's own error from inside the call. math runs there (shape inference)."""
    q = torch.empty(1, 16, 2, 8, device="meta")

    def module(computer):
        strategy = ringattn.Strategy(dilation=dilation, computer=computer)
        return ringattn.DilatedAttention((8,), (2,), strategy=strategy, compile=False)

    with torch.no_grad(), pytest.raises(ValueError, match=r"computer='flex' cannot run .* meta"):
        module("flex")(q, q, q)
    with torch.no_grad():
        assert module("math")(q, q, q).shape == q.shape


def test_errors_come_before_any_work(monkeypatch):
    """Validation happens at the boundary: the core is never entered on bad input."""
    import ringattn.api as api

    def boom(*args, **kwargs):
        raise AssertionError("core was called")

    monkeypatch.setattr(api, "run_core", boom)
    module = ringattn.DilatedAttention(**GOOD, compile=False)
    monkeypatch.setattr(module, "_core", boom)
    q, k, v = qkv()
    with pytest.raises(TypeError):
        module(q, k, v.double())


def test_oracle_validates_too():
    with pytest.raises(ValueError, match="must divide"):
        reference.dilated_attention(*qkv(), segment_lengths=[4], dilation_rates=[3])


@pytest.mark.parametrize(
    "call, error, match",
    [
        # (before: K/V on the meta device gave zeros, silently; mixed dtypes were accepted)
        (lambda q: reference.dilated_attention(q, q.to("meta"), q, **GOOD), ValueError,
         r"k.device must equal q.device \(cpu\), got meta"),
        (lambda q: reference.dilated_attention(q, q, q.double(), **GOOD), TypeError,
         r"v.dtype must equal q.dtype"),
        (lambda q: reference.dilated_attention(q.to_sparse(), q, q, **GOOD), TypeError,
         "q must be a dense"),
        (lambda q: reference.dilated_attention_by_multiplicity(q, q, q, **GOOD, dtype="float64"),
         TypeError, "dtype must be a floating torch.dtype, got 'float64'"),
        # (before: torch's errors from zeros(), naming nothing)
        (lambda q: reference.multiplicity(8.5, 2, (4,), (1,)), TypeError, "n must be an int"),
        (lambda q: reference.multiplicity(8, -1, (4,), (1,)), ValueError, "h must be >= 1"),
    ],
)  # fmt: skip
def test_the_oracles_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(qkv()[0])


def test_a_numpy_bool_is_named_as_such():
    """numpy 2 names ``np.True_``'s type ``bool``: the message said "must be bool, got bool"."""
    with pytest.raises(TypeError, match=r"causal must be bool, got numpy\.bool"):
        call(*qkv(), causal=np.True_)
    with pytest.raises(TypeError, match=r"causal must be a bool, got numpy\.bool"):
        ringattn.DilatedConfig(segment_lengths=(4,), dilation_rates=(1,), causal=np.True_)


def test_unknown_compile_mode_is_named():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        ringattn.DilatedAttention(**GOOD, compile_mode="fast")


def test_unknown_compile_backend_is_named():
    """Checked at construction even where it is not used (sdpa runs no frame of its own):
    otherwise a typo would surface only when the strategy changes."""
    with pytest.raises(ValueError, match=r"compile_backend must be one of .*'nope'"):
        ringattn.DilatedAttention(**GOOD, compile_backend="nope")
    call(*qkv())  # (a good call first: its cached module must not serve the typo)
    with pytest.raises(ValueError, match="compile_backend must be one of"):
        call(*qkv(), compile_backend="nope")


def test_integer_scale_and_dropout_are_accepted():
    """An int is a number here, as DilatedConfig takes it: ``scale=1`` means 1.0."""
    q, k, v = qkv()
    by_int = ringattn.DilatedAttention(**GOOD, scale=1, compile=False)(q, k, v)
    by_float = ringattn.DilatedAttention(**GOOD, scale=1.0, compile=False)(q, k, v)
    assert torch.equal(by_int, by_float)
    assert torch.equal(call(q, k, v, scale=1), by_float)
    MultiheadDilatedAttention(8, 2, (4,), (1,), dropout=0, compile=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale, rounded", [(1e-46, "0"), (1e39, "inf")])
def test_a_scale_past_float32s_range_is_refused_for_inputs_that_compute_in_it(
    dtype, scale, rounded
):
    """Inputs other than float64 form their logits in float32, where such a scale is 0 (causal
    sdpa on CPU returned NaN rows, as for scale=0) or inf (every strategy returned NaN)."""
    q, k, v = qkv(dtype=dtype)
    match = re.escape(f"scale={scale} is {rounded} in float32, which {dtype} inputs compute in")
    for computer in ("sdpa", "math"):
        strategy = ringattn.Strategy(computer=computer)
        with pytest.raises(ValueError, match=match):
            call(q, k, v, scale=scale, causal=True, strategy=strategy)
        module = ringattn.DilatedAttention(**GOOD, scale=scale, causal=True, strategy=strategy)
        with pytest.raises(ValueError, match=match):
            module(q, k, v)
    # float64 inputs compute in float64, where the scale is in range: the oracle's function
    q, k, v = (x.double() for x in (q, k, v))
    out = call(q, k, v, scale=scale, causal=True)
    ref = reference.dilated_attention(q, k, v, **GOOD, scale=scale, causal=True)
    assert rel_err(out, ref) <= 1e-10
    # the range's own edges are taken: float32's smallest subnormal, and its largest value
    # (on a zero q, whose logits stay finite)
    q, k, v = qkv()
    for edge, x in ((2.0**-149, q), (3.4e38, torch.zeros_like(q))):
        out = call(x, k, v, scale=edge, causal=True)
        ref = reference.dilated_attention(x, k, v, **GOOD, scale=edge, causal=True)
        assert rel_err(out, ref) <= 1e-5, edge


def test_the_float32_range_edges_are_exact():
    """The edges themselves are refused: 2**-150 rounds to 0 in float32, and float32's largest
    value plus half its ulp to inf (both ties to even); the next float inward is taken. The
    error states those very edges (it said [1.4e-45, 3.4e38], where 1e-45 and 3.40282e38 were
    taken), so the edges here are the ones its message gives."""
    from ringattn.config import FLOAT32_INF_FROM, FLOAT32_ZERO_BELOW

    with pytest.raises(ValueError) as refused:
        ringattn.DilatedConfig((4,), (1,), scale=1e-46).check_scale_for(torch.float32)
    message = str(refused.value)
    stated = re.search(r"> 2\*\*-150 = (\S+) and < \(2 - 2\*\*-24\) \* 2\*\*127 = (\S+),", message)
    assert stated, message
    low, high = float(stated[1]), float(stated[2])
    assert (low, high) == (2.0**-150, (2 - 2.0**-24) * 2.0**127)
    assert (low, high) == (FLOAT32_ZERO_BELOW, FLOAT32_INF_FROM)
    for edge, rounded, inward in ((low, "0", math.inf), (high, "inf", 0.0)):
        assert torch.tensor(edge, dtype=torch.float32).item() == float(rounded)
        config = ringattn.DilatedConfig((4,), (1,), scale=edge)
        with pytest.raises(ValueError, match=f"is {rounded} in float32"):
            config.check_scale_for(torch.float32)
        config.check_scale_for(torch.float64)
        near = math.nextafter(edge, inward)
        assert 0 < torch.tensor(near, dtype=torch.float32).item() < math.inf
        ringattn.DilatedConfig((4,), (1,), scale=near).check_scale_for(torch.float32)
        # and every value past the edge is refused, not only the edge itself
        past = math.nextafter(edge, 0.0 if rounded == "0" else math.inf)
        with pytest.raises(ValueError, match=f"is {rounded} in float32"):
            ringattn.DilatedConfig((4,), (1,), scale=past).check_scale_for(torch.float32)


def test_the_config_checks_its_own_options():
    """``ringattn.DilatedConfig`` is public: its own checks (not only the module's beartype)
    refuse a causal or mixing of the wrong type; its defaults are the module's, and an int
    scale is kept as the float it computes with."""
    with pytest.raises(TypeError, match="causal must be a bool, got int"):
        ringattn.DilatedConfig((4,), (1,), causal=1)
    with pytest.raises(TypeError, match="mixing must be a str, got int"):
        ringattn.DilatedConfig((4,), (1,), mixing=1)
    default = ringattn.DilatedAttention((4,), (1,), compile=False).config
    assert ringattn.DilatedConfig((4,), (1,)) == default
    scale = ringattn.DilatedConfig((4,), (1,), scale=2).scale
    assert type(scale) is float and scale == 2.0


def test_the_functional_forms_defaults_are_the_modules():
    """``dilated_attention`` serves ``DilatedAttention``'s options: each default it shares with
    the module is the module's, and both are the documented ones (the default strategy is
    ``docs/catalog.md``'s; compiled, under Inductor). A functional default that drifted
    (``compile=False``) ran another module than ``DilatedAttention(w, r)`` without notice."""
    import inspect

    functional = inspect.signature(ringattn.dilated_attention).parameters
    module = inspect.signature(ringattn.DilatedAttention.__init__).parameters
    documented = {"causal": False, "mixing": "lse", "scale": None, "compile": True,
                  "compile_backend": "inductor", "compile_mode": "default", "group": None,
                  "layout": "contiguous"}  # fmt: skip
    for name, default in documented.items():
        assert module[name].default is default, name
        if name in functional:
            assert functional[name].default is default, name
    for defaults in (module, functional):
        assert defaults["strategy"].default.label == "segment_local/sdpa/local/pooled"
    assert ringattn.Strategy().label == "segment_local/sdpa/local/pooled"
    shared = set(functional) - {"q", "k", "v"}
    assert shared == set(module) - {"self", "compile_mode", "group", "layout"}


def test_shard_layouts_are_validated():
    with pytest.raises(ValueError, match="layout must be one of"):
        ringattn.DilatedAttention(**GOOD, layout="diagonal")
    # one device holds the whole sequence: there is nothing to lay out
    with pytest.raises(ValueError, match="layout='zigzag' needs a sequence-parallel communicator"):
        ringattn.DilatedAttention(**GOOD, layout="zigzag")


@pytest.mark.parametrize("make", [ringattn.DilatedAttention, MultiheadDilatedAttention])
def test_a_group_needs_a_sequence_parallel_communicator(make):
    """``group=`` with a single-device strategy (``local``, the default) is refused at
    construction: ignored, every rank of the group would attend over its own shard as if it
    were the whole sequence, with no error anywhere (no test passed a group to ``local``)."""
    group = object()  # (any group: local never resolves it)
    args = GOOD if make is ringattn.DilatedAttention else {**GOOD, "embed_dim": 8, "num_heads": 2}
    with pytest.raises(ValueError, match="group= needs a sequence-parallel communicator"):
        make(**args, group=group)


def test_repeated_calls_still_reject_bad_inputs():
    """Checks run once per input signature: a good call must not let a bad one through."""
    module = ringattn.DilatedAttention(**GOOD, compile=False)
    q, k, v = qkv()
    module(q, k, v)
    with pytest.raises(TypeError):
        module(q, k, v.double())
    with pytest.raises(TypeError):
        module(q, k, v[:, :4])  # jaxtyping: the shapes disagree
    with pytest.raises(TypeError):
        module(q, k, "v")
    # (keyed without the devices, a v on another device ran after a good call, silently)
    with pytest.raises(ValueError, match=r"v\.device must equal q\.device"):
        module(q, k, v.to("meta"))
    meta = tuple(x.to("meta") for x in (q, k, v))
    with pytest.raises(ValueError, match="computer='sdpa' cannot run"):
        module(*meta)
    # (keyed without the layouts, a sparse q of a good call's shape skipped the checks)
    with pytest.raises(TypeError, match="parameter 'q' must be a dense"):
        module(q.to_sparse(), k, v)
    module(q, k, v)


@pytest.mark.parametrize("dilation", ["segment_local", "global"])
def test_the_longest_segment_is_one_segment(dilation):
    q, k, v = qkv()
    options = {"segment_lengths": [4, 2**40], "dilation_rates": [1, 2]}
    ref = ringattn.reference.dilated_attention(q, k, v, **options)
    strategy = ringattn.Strategy(dilation=dilation, computer="sdpa")
    out = ringattn.dilated_attention(q, k, v, **options, strategy=strategy, compile=False)
    assert torch.allclose(out.double(), ref, atol=1e-6)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_transforms_are_refused(transform):
    """Inside ``vmap`` the inputs report ``requires_grad=False``: the core ran without its
    autograd function and a later backward() gave dq, dk 24-39% off, silently."""
    attention = ringattn.DilatedAttention((4, 8), (1, 2), strategy=ringattn.Strategy())
    qs = torch.randn(3, 1, 16, 2, 8, requires_grad=True)
    with pytest.raises(TypeError, match=r"parameter .q. comes from a torch\.func transform"):
        if transform == "vmap":
            torch.func.vmap(lambda q: attention(q, q, q))(qs)
        else:
            torch.func.grad(lambda q: attention(q, q, q).sum())(qs[0])
    with pytest.raises(TypeError, match=r"torch\.func transform"):
        torch.func.vmap(
            lambda q: ringattn.dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))
        )(qs)


def _kv_cache(b, capacity):
    from ringattn.nn.decode import KVCache

    return KVCache.empty(b, capacity, 2, 4, torch.float32, "cpu")


def _generate(max_new_tokens):
    from ringattn.models import LongNet, LongNetConfig

    model = LongNet(
        LongNetConfig(vocab_size=11, dim=8, depth=1, num_heads=2, segment_lengths=(4,),
                      dilation_rates=(1,), compile=False)
    )  # fmt: skip
    return model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens)


def _layer(**sizes):
    args = {"embed_dim": 8, "num_heads": 2, "segment_lengths": (4,), "dilation_rates": (1,)}
    return MultiheadDilatedAttention(**{**args, **sizes}, compile=False)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: _layer(embed_dim=0), ValueError, "embed_dim must be >= 1, got 0"),
        (lambda: _layer(num_heads=-2), ValueError, "num_heads must be >= 1, got -2"),
        (lambda: _layer(num_kv_heads=2.0), TypeError, "num_kv_heads"),  # (beartype's words)
        (lambda: PooledMemory(0), ValueError, "max_entries must be >= 1"),
        (
            lambda: ringattn.memory.pooled.PooledMemory(True),
            TypeError,
            "max_entries must be an int",
        ),
        (lambda: PooledMemory(max_bytes=-1), ValueError, "max_bytes must be >= 0, got -1"),
        (lambda: PooledMemory(max_bytes=2.0**30), TypeError, "max_bytes must be an int, got float"),
        (lambda: PooledMemory(max_bytes=False), TypeError, "max_bytes must be an int, got bool"),
        (lambda: _kv_cache(True, 4), TypeError, "batch must be an int, got bool True"),
        (lambda: _kv_cache(1, 0), ValueError, "capacity must be >= 1, got 0"),
        (lambda: _generate(-1), ValueError, "max_new_tokens must be >= 0, got -1"),
        (lambda: _generate(True), TypeError, "max_new_tokens must be an int, got bool"),
    ],
)
def test_every_size_refuses_alike(make, error, match):
    """Every size a user hands the library goes through ``config.checked_int``: a bool, a float
    or a size below the minimum is refused with the same words wherever it is given."""
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("x_dtype, layer_dtype", [(torch.float64, torch.float32),
                                                  (torch.float32, torch.float64)])  # fmt: skip
def test_a_float64_mismatch_is_refused_under_autocast_too(x_dtype, layer_dtype):
    """autocast casts float32 to bfloat16 but leaves float64 alone (before: the projection
    raised torch's "mat1 and mat2 must have the same dtype")."""
    layer = _layer().to(layer_dtype)
    x = torch.randn(1, 4, 8, dtype=x_dtype)
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(TypeError, match=r"x.dtype must equal .* where either is float64"):
            layer(x)
        assert torch.isfinite(layer(x.to(layer_dtype))).all()  # (matching dtypes run)


@pytest.mark.parametrize("name", ringattn.DilatedAttention.FIXED)
def test_what_a_module_is_built_from_cannot_be_reassigned(name):
    """Its specs and compiled core are cached per shape: before, a new config applied to new
    shapes only, a deep copy computed the new one while the original kept the old (3.3 apart),
    and a layer's decoding read the new config while its prefill ran the old one."""
    import copy

    module = ringattn.DilatedAttention((4,), (1,), compile=False)
    q = torch.randn(1, 8, 2, 4)
    out = module(q, q, q)
    with pytest.raises(AttributeError, match=f"DilatedAttention.{name} is fixed at construction"):
        setattr(module, name, getattr(module, name))
    twin = copy.deepcopy(module)
    with pytest.raises(AttributeError, match="fixed at construction"):
        setattr(twin, name, getattr(twin, name))  # (a copy is built too)
    assert torch.equal(twin(q, q, q), out)


@pytest.mark.parametrize(
    "kind, name",
    [("attention", name) for name in ringattn.DilatedAttention.OPTIONS]
    + [("layer", name) for name in MultiheadDilatedAttention.OPTIONS],
)
def test_a_constructor_option_cannot_be_assigned_after_it(kind, name):
    """An option the constructor read into its config, communicator or projections has no
    attribute of its own: before, ``module.causal = True`` added one that no call read, and
    the module went on computing non-causal attention (every option alike), silently."""
    if kind == "attention":
        module: torch.nn.Module = ringattn.DilatedAttention((4,), (1,), compile=False)
    else:
        module = MultiheadDilatedAttention(8, 2, (4,), (1,), compile=False)
    kind_name = type(module).__name__
    with pytest.raises(AttributeError, match=rf"{kind_name}\.{name} is fixed at construction"):
        setattr(module, name, True)
    assert name not in vars(module)


def test_an_unread_causal_assignment_would_have_changed_nothing():
    """What the refusal above stops: ``causal`` set on a built module (bypassing the guard, as
    the assignment used to) leaves every later call computing the constructor's function."""
    module = ringattn.DilatedAttention((4,), (1,), compile=False)
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    object.__setattr__(module, "causal", True)
    want = reference.dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))
    assert torch.allclose(module(q, q, q), want)


def test_a_training_call_after_an_inference_call_is_still_checked():
    """The once-per-signature checks are keyed on whether the call needs gradients: keyed
    without it, a training call after a no-grad call of the same shape skipped the computer's
    refusal (flex has no backward on CPU) and failed later, inside torch."""
    module = ringattn.DilatedAttention(
        **GOOD, strategy=ringattn.Strategy(computer="flex"), compile=False
    )
    q, k, v = qkv()
    with torch.no_grad():
        module(q, k, v)
    with pytest.raises(ringattn.UnsupportedError, match="no backward on CPU"):
        module(q.requires_grad_(), k, v)
    # any one input's gradient is a training call (read from q alone, a k or v that needed one
    # got flex's own NotImplementedError from inside the kernel)
    for i in (1, 2):
        inputs = [x.detach() for x in (q, k, v)]
        with pytest.raises(ringattn.UnsupportedError, match="no backward on CPU"):
            module(*inputs[:i], inputs[i].requires_grad_(), *inputs[i + 1 :])


def test_functional_form_keys_its_modules_on_compile():
    """The functional form's module cache is keyed on ``compile`` too: keyed without it, a
    ``compile=True`` call after a ``compile=False`` one ran the uncompiled module, skipping the
    compiled computer's refusal (compiled flex on CPU takes no float64) and its compiled frame."""
    q, k, v = qkv(dtype=torch.float64)
    flex = ringattn.Strategy(computer="flex")
    with torch.no_grad():
        eager = ringattn.dilated_attention(q, k, v, **GOOD, strategy=flex, compile=False)
        assert rel_err(eager, reference.dilated_attention(q, k, v, **GOOD)) <= 1e-10
        with pytest.raises(ringattn.UnsupportedError, match="compiled FlexAttention on CPU"):
            ringattn.dilated_attention(q, k, v, **GOOD, strategy=flex, compile=True)


@pytest.mark.parametrize(
    "name, good, bad", [("compile", False, 0), ("scale", 1, True), ("causal", False, 0)]
)
def test_functional_form_refuses_a_wrong_type_after_an_equal_good_value(name, good, bad):
    """``compile=0`` is refused (a bool's option) whether or not ``compile=False`` ran first:
    the cache's key held ``compile`` untyped, so ``0 == False`` found the valid call's module
    and skipped the constructor's check, which only the first such call met. The same for the
    options keyed with their types already (``scale=True`` after ``scale=1``)."""
    q, k, v = qkv()
    options = {**GOOD, "compile": False}
    with pytest.raises(TypeError, match=name):
        ringattn.dilated_attention(q, k, v, **{**options, name: bad})
    ringattn.dilated_attention(q, k, v, **{**options, name: good})
    with pytest.raises(TypeError, match=name):
        ringattn.dilated_attention(q, k, v, **{**options, name: bad})


@pytest.mark.parametrize(
    "lengths",
    [b"48", bytearray(b"48"), memoryview(b"48"), 48],
    ids=["bytes", "bytearray", "memoryview", "int"],
)
def test_byte_strings_are_not_segment_lengths(lengths):
    """bytes, bytearray and memoryview are sequences of ints: the module's and the oracle's
    ``tuple(segment_lengths)`` made ``b"48"`` the segment lengths (52, 56), silently, past the
    config's refusal of bytes, and the config took a bytearray (and a memoryview, until the
    functional form's review); the oracle's ``tuple(48)`` raised "'int' object is not
    iterable"."""
    match = "segment_lengths must be a list or tuple of ints"
    with pytest.raises(TypeError, match=match):
        ringattn.DilatedConfig(lengths, (1, 2))
    with pytest.raises(TypeError, match=match):
        reference.dilated_attention(*qkv(), segment_lengths=lengths, dilation_rates=(1, 2))
    if not isinstance(lengths, int):  # (beartype refuses an int first, naming it too)
        with pytest.raises(TypeError, match=match):
            ringattn.DilatedAttention(lengths, (1, 2), compile=False)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"segment_lengths": np.array([4, 8])}, "segment_lengths"),
        ({"segment_lengths": bytearray(b"\x04\x08")}, "segment_lengths"),
        ({"scale": np.array(0.5)}, "scale"),
        ({"causal": np.array(False)}, "causal"),
    ],
)
def test_functional_form_names_an_unhashable_option(overrides, name):
    """The functional form caches its modules by their options: an unhashable one (a numpy
    array) failed that lookup with "unhashable type: 'numpy.ndarray'", naming no argument."""
    with pytest.raises(TypeError, match=name):
        call(*qkv(), **overrides)


_ANY_VALUE = st.one_of(
    st.integers(-3, 40),
    st.integers(2**30, 2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.integers(1, 16).map(np.int64),
    st.integers(1, 16).map(torch.tensor),
    st.integers(1, 16).map(float),
)
_ANY_SEQUENCE = st.one_of(
    st.lists(st.integers(1, 64), max_size=4),
    st.lists(_ANY_VALUE, max_size=4),
    st.lists(st.integers(1, 64), max_size=4).map(tuple),
    st.lists(st.integers(1, 64), max_size=4).map(np.array),
    _ANY_VALUE,
)


@given(
    # valid (w, r) pairs half the time: drawn independently, lengths and rates almost never
    # are, and the oracle's comparison below would hardly ever run
    configs=st.one_of(dilation_configs(), st.tuples(_ANY_SEQUENCE, _ANY_SEQUENCE)),
    causal=st.one_of(st.booleans(), _ANY_VALUE),
    mixing=st.one_of(st.sampled_from(["lse", "head_groups"]), _ANY_VALUE),
    scale=st.one_of(st.none(), _ANY_VALUE),
    functional=st.booleans(),
)
@example(configs=([4, 8], [1, 2]), causal=True, mixing="head_groups", scale=0.3, functional=True)
@example(configs=((32,), (4,)), causal=False, mixing="lse", scale=None, functional=False)
def test_any_options_give_the_oracle_or_a_named_error(configs, causal, mixing, scale, functional):
    """Options drawn from any values (negative, huge, NaN, bools, strings, numpy and tensor
    scalars, ragged lists): a call either returns the oracle's output for them or raises a
    TypeError / ValueError that names the argument; nothing else (an IndexError, a
    ZeroDivisionError, an answer for options the oracle refuses)."""
    lengths, rates = configs
    q = torch.randn(1, 16, 2, 4, generator=torch.Generator().manual_seed(0))
    chosen = {"causal": causal, "mixing": mixing, "scale": scale}
    try:
        if functional:
            out = ringattn.dilated_attention(
                q, q, q, segment_lengths=lengths, dilation_rates=rates, compile=False, **chosen
            )
        else:
            out = ringattn.DilatedAttention(lengths, rates, compile=False, **chosen)(q, q, q)
    except (TypeError, ValueError) as error:
        named = (*chosen, "segment_lengths", "dilation_rates")
        assert any(name in str(error) for name in named), str(error)[:300]
        return
    ref = reference.dilated_attention(
        q.double(), q.double(), q.double(), segment_lengths=lengths, dilation_rates=rates, **chosen
    )
    assert rel_err(out, ref) <= 1e-5


class _Rate(int):
    """An int subclass (an IntEnum alike): int_sequence takes it as it is."""


@pytest.mark.parametrize(
    "values",
    [(4, 8), [4, 8], (1,), [True, 2], (0, 4), (4, -1), (4, 8.0), (4, np.int64(8)), (),
     [], (4, _Rate(8)), range(1, 3), (2**40, 1)],
)  # fmt: skip
def test_int_sequence_common_case_is_the_rules(values):
    """int_sequence (taken on every call of the functional form) returns what the item-by-item
    rules return for plain ints and for every other input (bool, 0, a float, a numpy int, an int
    subclass, an empty or other sequence): the same result, or the same error naming the item.
    (A fast path for plain int tuples, ~3 µs per call, was tried and removed: a second copy of
    the rules.)"""
    from ringattn import config

    def rules(values):  # the rules alone
        return tuple(config.checked_int(f"x[{i}]", value) for i, value in enumerate(values))

    try:
        want = rules(values) if len(values) else ValueError("x must not be empty")
    except (TypeError, ValueError) as error:
        want = error
    if isinstance(want, Exception):
        with pytest.raises(type(want), match=re.escape(str(want))):
            config.int_sequence("x", values)
    else:
        got = config.int_sequence("x", values)
        assert got == want and type(got) is tuple
        assert [type(x) for x in got] == [type(x) for x in want]
