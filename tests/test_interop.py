"""What users reach from the rest of PyTorch: autocast while decoding, forward-mode and batched
autograd, checkpoints loaded onto the meta device, the functional form's module cache under
compile and export, meta tensors, malformed KV caches, and the oracle at extreme scales. Each
test failed before its fix (found by user-side reviews)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import rel_err
from torch._subclasses.fake_tensor import is_fake

import ringattn
from ringattn import reference
from ringattn.models import LongNet, LongNetConfig
from ringattn.nn import KVCache, MultiheadDilatedAttention

CONFIG = LongNetConfig(
    vocab_size=32, dim=16, depth=1, num_heads=2, segment_lengths=(4, 8), dilation_rates=(1, 2)
)


def test_decoding_under_autocast_equals_the_full_forward():
    """``generate`` under ``torch.autocast`` raised "Index put requires the source and
    destination dtypes match" (the decode's einsums ran in bf16 into float32 buffers)."""
    torch.manual_seed(0)
    model = LongNet(CONFIG)
    prompt = torch.randint(0, 32, (1, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.generate(prompt, 3)
        full = model(tokens)
        caches = model.new_caches(1, tokens.shape[1]) if hasattr(model, "new_caches") else None
    assert tokens.shape == (1, 8)
    if caches is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stepwise = torch.cat([model(tokens[:, i : i + 1], caches) for i in range(8)], 1)
        assert rel_err(stepwise.float(), full.float()) < 3e-2


@pytest.mark.parametrize("computer", ["math", "sdpa"])
def test_forward_mode_ad_is_refused_by_every_strategy(computer):
    """sdpa raised torch's NotImplementedError, math computed tangents only without
    requires_grad, flex dropped them: now one TypeError naming the argument."""
    xs = [torch.randn(1, 8, 2, 4, dtype=torch.float64) for _ in range(3)]
    with fwAD.dual_level():
        dual = [fwAD.make_dual(x, torch.randn_like(x)) for x in xs]
        with pytest.raises(TypeError, match="parameter 'q' is a forward-mode AD dual"):
            ringattn.dilated_attention(
                *dual, segment_lengths=(4, 8), dilation_rates=(1, 2),
                strategy=ringattn.Strategy(computer=computer),
            )  # fmt: skip


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("form", ["module", "functional"])
@pytest.mark.parametrize("computer", ["math", "sdpa"])
def test_forward_mode_ad_is_refused_under_torch_compile(computer, form, fullgraph):
    """Traced by a user's ``torch.compile``, the dual-tensor check saw fake tensors (no tangent)
    and the opaque custom ops drop a tangent without a word: the compiled call returned
    ``tangent=None``, and ``torch.func.jvp`` inside a compiled function a zero tangent,
    silently (the eager refusal was skipped while tracing, and without fullgraph the eager
    boundary's own check ran as a traced frame)."""
    torch._dynamo.reset()
    options = dict(segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True)
    strategy = ringattn.Strategy(computer=computer)
    module = ringattn.DilatedAttention(**options, strategy=strategy)

    def attention(q, k, v):
        if form == "module":
            return module(q, k, v)
        return ringattn.dilated_attention(q, k, v, **options, strategy=strategy)

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=fullgraph)
    xs = [torch.randn(1, 13, 3, 8) for _ in range(3)]
    with fwAD.dual_level():
        dual = [fwAD.make_dual(x, torch.randn_like(x)) for x in xs]
        # fullgraph: Dynamo's report of the trace's TypeError; without: the eager refusal
        with pytest.raises(RuntimeError if fullgraph else TypeError) as caught:
            compiled(*dual)
    assert "forward-mode AD" in str(caught.value), str(caught.value)[:300]
    if fullgraph:
        assert "raised exception TypeError(" in str(caught.value)
    # torch.func.jvp inside the compiled function: its tangent came out all zeros, silently
    tangent = torch.randn_like(xs[0])

    def jvp(q, k, v):
        return torch.func.jvp(lambda q: attention(q, k, v), (q,), (tangent,))[1]

    torch._dynamo.reset()
    with pytest.raises(RuntimeError if fullgraph else TypeError) as caught:
        torch.compile(jvp, backend="aot_eager", fullgraph=fullgraph)(*xs)
    assert "forward-mode AD" in str(caught.value), str(caught.value)[:300]
    # outside a dual level the same compiled function runs (its graphs guard on the level)
    ref = reference.dilated_attention(*xs, **options)
    assert rel_err(compiled(*xs), ref) < 1e-5


@pytest.mark.parametrize("dilation", ["segment_local", "global"])
def test_torch_jit_trace_is_refused(dilation):
    """``torch.jit.trace`` kept one call's plan as constants: under ``head_groups`` the traced
    program was wrong even at its own shape (errors of 1-3), at other shapes for ``lse``, and
    ``global`` raised "n must be an int, got Tensor" (an argument the user never passed)."""
    options = dict(segment_lengths=(4, 8), dilation_rates=(1, 2), mixing="head_groups")
    module = ringattn.DilatedAttention(**options, strategy=ringattn.Strategy(dilation=dilation))
    q = torch.randn(1, 16, 2, 4)
    for traced in (module, lambda q, k, v: ringattn.dilated_attention(q, k, v, **options)):
        with pytest.raises(TypeError, match=r"torch\.jit\.trace cannot record ringattn"):
            torch.jit.trace(traced, (q, q, q), check_trace=False)
    # (and nothing of the attempt stays: the module's next eager call is right)
    assert rel_err(module(q, q, q), reference.dilated_attention(q, q, q, **options)) < 1e-5


@pytest.mark.parametrize("pre_dispatch", [False, True])
@pytest.mark.parametrize("mode", ["real", "symbolic"])
def test_make_fx_is_refused(mode, pre_dispatch):
    """``make_fx`` outside torch.compile / torch.export recorded one call's strided views with no
    guard: its graph, traced at n = 13, was 0.6-0.7 off at 16 and 21, silently; its symbolic
    mode failed on an unhashable SymInt in the input cache's key."""
    from torch.fx.experimental.proxy_tensor import make_fx

    module = ringattn.DilatedAttention((4, 8), (1, 2), causal=True)
    q = torch.randn(2, 13, 3, 8)
    with pytest.raises(TypeError, match=r"make_fx cannot record ringattn's dilated attention"):
        make_fx(module, tracing_mode=mode, pre_dispatch=pre_dispatch)(q, q, q)
    ref = reference.dilated_attention(
        q, q, q, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True
    )
    assert rel_err(module(q, q, q), ref) < 1e-5  # (nothing of the attempt stays)


@pytest.mark.parametrize("strategy", ringattn.Strategy.single_device(), ids=str)
def test_every_strategy_runs_under_a_fake_tensor_mode(strategy):
    """A shape / memory estimate under ``FakeTensorMode``: ``global`` with a partial tail failed
    on a data-dependent ``repeat_interleave`` (its run layout's sizes read from a tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = ringattn.DilatedAttention(
        (4, 8), (1, 2), causal=True, strategy=strategy, compile=False
    )
    with FakeTensorMode():
        out = module(*(torch.randn(2, 13, 3, 8) for _ in range(3)))
    assert out.shape == (2, 13, 3, 8)


def test_a_batched_backward_is_a_clear_error():
    """``is_grads_batched=True`` failed inside vmap ("aten::copy_ ... is not possible")."""
    attn = ringattn.DilatedAttention((4, 8), (1, 2))
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    with pytest.raises(TypeError, match="no batched backward"):
        torch.autograd.grad(out, q, torch.randn(3, *out.shape), is_grads_batched=True)


def test_a_checkpoint_loaded_onto_meta_keeps_the_head_tied():
    """``load_state_dict(assign=True)`` into a model built on meta gave the head and the
    embedding two Parameters (separate AdamW state, weight decay twice: training diverged)."""
    torch.manual_seed(0)
    source = LongNet(CONFIG)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    with torch.device("meta"):
        model = LongNet(CONFIG)
    model.load_state_dict(torch.load(buffer), assign=True)
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(list(source.parameters()))


def test_the_functional_forms_evicted_modules_still_serve_compiled_backwards():
    """A compiled call's backward names its module; the functional form's cache evicted it
    after 32 other option sets and the backward raised "module ... is gone"."""
    torch._dynamo.reset()

    def attention(q, k, v):
        return ringattn.dilated_attention(
            q, k, v, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True
        )

    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    other = torch.randn(1, 16, 2, 8)
    out = torch.compile(attention, backend="aot_eager")(q, k, v)
    for i in range(33):
        ringattn.dilated_attention(
            other, other, other, segment_lengths=(4,), dilation_rates=(1,), scale=0.1 + i
        )
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(
        *ref_in, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True
    )
    for g, g_ref in zip(grads, torch.autograd.grad(ref.sum(), ref_in)):
        assert rel_err(g, g_ref) < 1e-4


def test_a_sparse_input_after_a_dense_call_is_still_refused():
    """The once-per-signature checks keyed on shape, dtype and device, not layout: a sparse q
    after a dense call of its shape reached the kernels ("unsupported memory format")."""
    attn = ringattn.DilatedAttention((4, 8), (1, 2))
    q = torch.randn(1, 16, 2, 8)
    attn(q, q, q)
    with pytest.raises(TypeError, match="parameter 'q' must be a dense"):
        attn(q.to_sparse(), q, q)


def test_math_runs_on_meta_tensors():
    """Shape inference on meta: the autocast check raised "unknown device type for autocast";
    sdpa's refusal points to math, which must then run."""
    q = torch.randn(2, 8, 2, 4, device="meta", requires_grad=True)
    out = ringattn.dilated_attention(
        q, q, q, segment_lengths=(4,), dilation_rates=(1,),
        strategy=ringattn.Strategy(computer="math"),
    )  # fmt: skip
    assert out.shape == q.shape and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: KVCache(torch.zeros(1, 6, 2, 4, dtype=torch.long), torch.zeros(1, 6, 2, 4)),
         TypeError, "floating tensors of one shape and dtype"),
        (lambda: KVCache(torch.zeros(1, 6, 2, 4), torch.zeros(1, 5, 2, 4)),
         TypeError, "one shape and dtype"),
        (lambda: KVCache(torch.zeros(1, 6, 2, 4), torch.zeros(1, 6, 2, 4), length=-2),
         ValueError, r"cache.length must be an int in \[0, 6\]"),
    ],
)  # fmt: skip
def test_a_malformed_kv_cache_is_refused_before_any_work(make, error, match):
    """An integer cache stored K/V as zeros (logits 1.3 off, silently); a negative length or
    k/v of different capacities raised torch's errors after writing cache.k."""
    layer = MultiheadDilatedAttention(8, 2, (4,), (1,), causal=True)
    cache = make()
    before = cache.k.clone()
    with pytest.raises(error, match=match):
        layer(torch.randn(1, 2, 8), cache)
    assert torch.equal(cache.k, before)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int16])
def test_tokens_of_an_index_dtype_embedding_cannot_read_are_refused(dtype):
    with pytest.raises(TypeError, match=r"tokens must be an integer \(int64 or int32\)"):
        LongNet(CONFIG)(torch.zeros(1, 3, dtype=dtype))


def test_empty_tokens_are_named():
    with pytest.raises(ValueError, match=r"tokens must be \[b >= 1, n >= 1\]"):
        LongNet(CONFIG)(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("scale", [1e12, 1e16, 1e20])
def test_the_oracle_merges_exactly_at_extreme_scales(scale):
    """The loop-and-merge oracle's weights ``exp(LSE_i - LSE)`` stop summing to 1 once ulp(LSE)
    nears log 2: at scale 1e20 a row came out doubled. The multiplicity form is the check."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1, 4, dtype=torch.float64) for _ in range(3))
    options = {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "scale": scale}
    merged = reference.dilated_attention(q, k, v, **options)
    by_multiplicity = reference.dilated_attention_by_multiplicity(q, k, v, **options)
    assert rel_err(merged, by_multiplicity) < 1e-12


@pytest.mark.parametrize("dilation", ["segment_local", "global"])
def test_a_fake_tensor_call_leaves_the_caches_to_real_calls(dilation):
    """A shape or memory estimate under ``FakeTensorMode`` stored fake patterns in the pooled
    caches (the functional form's module is process-wide): every later real call of that shape
    raised "Please convert all Tensors to FakeTensors first"."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    options = {
        "segment_lengths": (4, 8),
        "dilation_rates": (2, 4),
        "strategy": ringattn.Strategy(dilation=dilation, memory="pooled"),
    }
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (q, k, v)]
        with torch.no_grad():
            ringattn.dilated_attention(*fake, **options)
        ringattn.dilated_attention(*fake, **options).sum().backward()
    with torch.no_grad():
        inference = ringattn.dilated_attention(q, k, v, **options)
    out = ringattn.dilated_attention(q, k, v, **options)
    ref_in = [x.detach().double() for x in (q, k, v)]
    ref = reference.dilated_attention(*ref_in, segment_lengths=(4, 8), dilation_rates=(2, 4))
    assert rel_err(out, ref) < 1e-5 and rel_err(inference, ref) < 1e-5


def test_other_option_sets_do_not_recompile_a_compiled_functional_call():
    """The functional form's cache, traced, guarded the graph on its length and order: every
    eager call with another option set recompiled it, and under fullgraph the ninth raised
    FailOnRecompileLimitHit. An evicted module comes back rather than being replaced."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()

    def attention(q, k, v):
        return ringattn.dilated_attention(q, k, v, segment_lengths=(4, 8), dilation_rates=(1, 2))

    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    attention(q, k, v)
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    counters.clear()
    for i in range(40):  # past the cache's 32: the compiled call's module is evicted, then back
        ringattn.dilated_attention(
            q, k, v, segment_lengths=(4,), dilation_rates=(1,), scale=0.5 + i
        )
        assert torch.equal(compiled(q, k, v), attention(q, k, v))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"segment_lengths": (4, 8.0)}, "segment_lengths"),
        ({"causal": 1}, "causal"),
    ],
)
def test_the_functional_cache_does_not_skip_the_option_checks(options, match):
    """Equal options of other types (8.0 == 8, 1 == True) found the module that the valid
    options made and ran with it, unchecked. (Called past the beartype entry, which samples one
    item of a sequence: the cache is what must not let them through.)"""
    q = torch.randn(1, 16, 2, 8)
    valid = {
        "segment_lengths": (4, 8),
        "dilation_rates": (1, 2),
        "causal": True,
        "mixing": "lse",
        "scale": None,
        "strategy": ringattn.Strategy(),
        "compile": True,
        "compile_backend": "inductor",
    }
    ringattn.functional._eager_functional(q, q, q, valid)
    with pytest.raises(TypeError, match=match):
        ringattn.functional._eager_functional(q, q, q, {**valid, **options})


def test_a_module_made_inside_a_non_strict_export_serves_later_exports():
    """The functional form's module first made inside a non-strict ``torch.export`` (under its
    FakeTensorMode) got a fake number tensor (core.register_module); a strict export of the same
    option set then baked it into its graph, and that program returned FakeTensors."""
    scale = 0.2317  # an option set no other test makes

    class Net(torch.nn.Module):
        def forward(self, q):
            options = {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "scale": scale}
            return ringattn.dilated_attention(q, q, q, **options)

    q = torch.randn(1, 16, 2, 8)
    ref = reference.dilated_attention(
        q.double(),
        q.double(),
        q.double(),
        segment_lengths=(4, 8),
        dilation_rates=(1, 2),
        scale=scale,
    )
    for strict in (False, True):
        out = torch.export.export(Net(), (q,), strict=strict).module()(q)
        assert not is_fake(out), strict
        assert rel_err(out, ref) <= 1e-5, strict


@pytest.mark.parametrize("grad", [False, True])
def test_a_profile_names_eager_calls_as_the_compiled_ops(grad):
    """torch.profiler shows an eager call under the names of the compiled graphs' ops,
    ``ringattn::dilated_forward`` (and ``ringattn::dilated_backward``): a no-grad forward was
    anonymous aten ops, and with gradients the names were the autograd.Function's."""
    attn = ringattn.DilatedAttention((8, 16), (1, 2), causal=True)
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=grad) for _ in range(3))
    with torch.profiler.profile() as profile:
        out = attn(q, k, v)
        if grad:
            out.sum().backward()
    names = {event.key for event in profile.key_averages()}
    want = {"ringattn::dilated_forward", "ringattn::dilated_backward"}
    assert names & want == (want if grad else {"ringattn::dilated_forward"})
