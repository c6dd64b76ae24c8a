"""The public module, ``DilatedAttention`` (the functional form, ``dilated_attention``, keeps one
per option set: :mod:`ringattn.functional`).

This is the eager boundary. Here, and only here, inputs are type-checked (jaxtyping + beartype)
and validated with errors that name the argument; then the static plan and index patterns are
fetched and the (optionally compiled) core runs. When an outer ``torch.compile`` traces through
this module (``torch.compiler.is_compiling()``) the same rules run as plain Python
(:func:`check_plain`), which Dynamo folds into the graph's guards: beartype's and jaxtyping's
wrappers would break the graph.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import torch
from beartype import beartype
from jaxtyping import jaxtyped
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ringattn import distributed, launches, pattern
from ringattn.capture import compiling, pool_allocating
from ringattn.computers.base import LayoutComputer
from ringattn.config import DilatedConfig
from ringattn.core import (
    CoreSpec,
    autocast_dtype,
    device_tag,
    dilated_forward_op,
    grad_state,
    register_module,
    run_core,
)
from ringattn.lru import remember
from ringattn.memory.none import NoReuse
from ringattn.pattern import make_plan
from ringattn.strategy import Strategy
from ringattn.types import BNHD

if TYPE_CHECKING:
    from ringattn.functional import Key as FunctionalKey

K = TypeVar("K")
V = TypeVar("V")

_NO_REUSE = NoReuse()


class UnsupportedError(ValueError):
    """A valid strategy that cannot run these particular inputs (dtype, device, gradients)."""


_COMPILED: dict[tuple[DilatedConfig, Strategy, str, str], Callable[..., Tensor]] = {}
# Graphs per (config, strategy, backend): one per (b, n, h, d, dtype, grad mode) seen. Dynamo's
# default of 8 is easily hit by a sweep over n; past this, fullgraph=True raises
# FailOnRecompileLimitHit rather than silently running eagerly.
RECOMPILE_LIMIT = 64


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    """``cache[key] = value``, the oldest entry dropped first where ``cache`` holds
    ``RECOMPILE_LIMIT`` (a module's per-signature caches: specs, validated inputs, the ranks'
    agreed digests; one entry per graph a signature may compile at most)."""
    remember(cache, key, value, RECOMPILE_LIMIT)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# the compile modes whose Inductor output replays from CUDA graphs (cudagraph trees)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compiled_core(
    key: tuple[DilatedConfig, Strategy, str, str], backend: str, mode: str = "default"
) -> Callable[..., Tensor]:
    """``torch.compile(run_core)`` with a Dynamo cache of its own for each (config, strategy).

    Dynamo keeps one cache per *code object*, limited to ``RECOMPILE_LIMIT`` graphs here (with
    ``fullgraph=True`` one more raises instead of falling back to eager). Sharing ``run_core``'s
    code between all modules would let a strategy sweep or a model with varied layers exhaust that
    budget; giving
    each distinct (config, strategy, backend) its own copy of the code keeps identical layers on one
    graph and different ones out of each other's way.
    """
    fn = _COMPILED.get(key)
    if fn is None:
        code = run_core.__code__.replace(co_name=f"run_core_{len(_COMPILED)}")
        fresh = types.FunctionType(code, run_core.__globals__, code.co_name)
        fn = torch.compile(fresh, fullgraph=True, dynamic=False, backend=backend, mode=mode)
        _COMPILED[key] = fn
    return fn


_DEFAULT_STRATEGY = Strategy()

# the dtypes q, k, v may have (docs/semantics.md's tolerances; every computer has them on CPU)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q: BNHD, k: BNHD, v: BNHD) -> None:
    """q, k, v: same ``[b, n, h, d]`` shape, dtype and device; no empty dims: the rules with
    errors that name the argument (:func:`check_plain`), then jaxtyping's and beartype's
    check of the annotations."""
    check_plain(q, k, v)
    _check_annotations(q, k, v)


# never traced: a forward that a user's torch.compile gave back to eager still has its nested
# frames traced, and Dynamo ran beartype's wrapper wrongly there (a TypeCheckError for good input)
@torch.compiler.disable(reason="beartype's and jaxtyping's wrappers are eager-only")
@jaxtyped(typechecker=beartype)
def _check_annotations(q: BNHD, k: BNHD, v: BNHD) -> None:
    pass


def check_plain(q: Tensor, k: Tensor, v: Tensor) -> None:
    """:func:`check_inputs`' rules in plain Python, the path a tracing ``torch.compile`` takes:
    beartype's and jaxtyping's wrappers cannot be traced, while these comparisons fold into the
    graph's guards, so a compiled call raises the same errors before any work. Each rule is its
    own string, formed before the shapes join it: under fullgraph with symbolic shapes, torch
    2.11's Dynamo reports the message as its unjoined parts, where a rule formed with the shapes
    was split into pieces ("'v'", ".shape must equal q.shape ")."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"parameter {name!r} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided or x.is_nested:
            # (first: a strided nested tensor reports torch.strided and has no .shape, which
            # the rules below format)
            got = "a nested tensor" if x.is_nested else x.layout
            raise TypeError(f"parameter {name!r} must be a dense (strided) tensor, got {got}")
        refuse_subclass(name, x)
        if x.dim() != 4 or not x.is_floating_point():
            rule = f"parameter {name!r} must be a floating [b, n, h, d] tensor"
            raise TypeError(f"{rule}, got {x.dtype} of shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            # float8 is floating point too: it reached the kernels and failed inside them
            # (math: "Promotion for Float8 Types is not supported", sdpa: NotImplementedError,
            # flex: an InductorError after its compile)
            raise TypeError(
                f"parameter {name!r} must be float16, bfloat16, float32 or float64, got {x.dtype}"
            )
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            grouped = x.shape[:2] == q.shape[:2] and x.shape[3] == q.shape[3]
            hint = (
                f" (grouped-query K/V: repeat its heads to q's, "
                f"{name}.repeat_interleave(h // h_kv, dim=2), or use "
                "ringattn.nn.MultiheadDilatedAttention(num_kv_heads=...))"
                if grouped and x.shape[2] >= 1 and q.shape[2] % x.shape[2] == 0
                else ""
            )
            rule = f"parameter {name!r}: {name}.shape must equal q.shape"
            raise TypeError(
                f"{rule} {tuple(q.shape)} ([b, n, h, d] alike), got {tuple(x.shape)}{hint}"
            )
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}.device must equal q.device ({q.device}), got {x.device}")
    for axis, size in zip("bnhd", q.shape):
        if size < 1:
            rule = f"q, k, v must have {axis} >= 1"
            raise ValueError(f"{rule}, got shape {tuple(q.shape)}")


def refuse_subclass(name: str, x: Tensor) -> None:
    """A TypeError for a tensor subclass that wraps other tensors (``__torch_dispatch__``: a
    DTensor, a float8 or quantized wrapper), whose ops the kernels' strided views never reach:
    a DTensor failed deep in the core with torch's "as_strided not supported with DTensor", and
    a compiled call with Dynamo's UnsupportedFakeTensorException. (Fake tensors and parameters
    are not such wrappers; a nested tensor is refused by its own rule before this one.)"""
    # (isinstance too: traced, a DTensor is a wrapper to isinstance only)
    dtensor = isinstance(x, distributed.DTensor)
    if not (dtensor or is_traceable_wrapper_subclass(x)):
        return
    if dtensor:
        raise TypeError(
            f"parameter {name!r} is a DTensor, which ringattn's dilated attention does not "
            f"take: pass its local tensor ({name}.to_local()). The local tensor of a sequence "
            "shard (Shard(1)) is what a sequence-parallel DilatedAttention(group=mesh['sp'], "
            "strategy=...) takes (layout='contiguous'); "
            "a rank's heads of a head-sharded (tensor-parallel) layer are treated as heads "
            "0..h-1, which is the whole layer's function only as docs/semantics.md's "
            "'Heads split across ranks' says"
        )
    raise TypeError(
        f"parameter {name!r} must be a plain torch.Tensor, got the tensor subclass "
        f"{type(x).__name__}, "
        "which wraps other tensors (__torch_dispatch__) and which ringattn's kernels cannot "
        "take: convert it to a plain tensor first"
    )


# the dtypes torch.autocast casts (float64 it leaves alone)
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as ``F.scaled_dot_product_attention`` takes them under ``torch.autocast``: each
    dense float16 / bfloat16 / float32 input cast to autocast's dtype on its device, before the
    rules that hold q, k and v to one dtype. Cast after them, a float32 q with the bf16 k and v
    of an autocast projection was refused ("k.dtype must equal q.dtype"), where SDPA runs it.
    Nothing is cast where an input is float64 (autocast's exception), so a mismatch there is
    refused naming the dtypes passed; anything else is left for the rules to name."""
    # autocast off, every call but a user's autocast region's: one C call (this runs per call,
    # on the host-bound path; inputs on other devices than q's are refused by the rules after)
    dtype = autocast_dtype(q.device.type) if isinstance(q, Tensor) else None
    if dtype is None:
        return q, k, v
    inputs = (q, k, v)
    dense = all(
        isinstance(x, Tensor) and x.layout == torch.strided and not x.is_nested for x in inputs
    )
    if not dense or any(x.dtype == torch.float64 for x in inputs):
        return q, k, v

    def cast(x: Tensor) -> Tensor:
        return x.to(dtype) if x.dtype in _AUTOCAST_ELIGIBLE else x

    return cast(q), cast(k), cast(v)


def refuse_dual(q: object, k: object, v: object) -> None:
    """A TypeError for forward-mode AD dual tensors (``torch.autograd.forward_ad``, which
    ``torch.func.jvp`` / ``jacfwd`` make): sdpa raised torch's NotImplementedError, math computed
    the tangent only without requires_grad, flex (compiled) dropped it.

    Traced by a user's ``torch.compile`` (this frame itself too, where Dynamo gave the eager
    boundary back and traces its callees as frames of their own), the inputs are fake tensors,
    which carry no tangent: a dual input cannot be told from a plain one there, and the opaque
    custom ops have no forward-mode rule (torch's custom ops drop a tangent without a word), so
    a compiled call inside a dual level returned ``tangent=None``, silently. There any call
    inside a dual level is refused (Dynamo guards its graphs on the dual level: a graph traced
    outside one never runs inside one)."""
    if forward_ad._current_level < 0:
        return
    if compiling():
        raise TypeError(
            "ringattn's dilated attention does not support forward-mode AD "
            "(torch.autograd.forward_ad, torch.func.jvp / jacfwd), and a torch.compile'd call "
            "inside a dual level cannot tell dual inputs from plain ones (it would drop their "
            "tangents): call it outside forward_ad.dual_level(), or use reverse mode, or the "
            "float64 ringattn.reference.dilated_attention"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, Tensor) and forward_ad.unpack_dual(x).tangent is not None:
            raise TypeError(
                f"parameter {name!r} is a forward-mode AD dual tensor "
                "(torch.autograd.forward_ad), which ringattn's dilated attention does not "
                "support: use reverse mode, or the float64 ringattn.reference.dilated_attention"
            )


def refuse_functorch(q: object, k: object, v: object) -> None:
    """A TypeError for forward-mode AD dual tensors and for inputs a ``torch.func`` transform
    wrapped: inside ``vmap`` they report ``requires_grad=False``, so the core ran without its
    autograd function and a later ``backward()`` differentiated the kernels' ops as recorded, the
    LSE merge's weights as constants (dq, dk 24-39% off, silently); ``grad`` / ``jacrev`` failed
    inside torch. And a ``torch.jit.trace``: it records one call's tensor ops, with the plan
    made from that call's shapes in Python as constants; the program it returned was wrong at
    other shapes, and under ``head_groups`` at the traced shape too (errors of 1-3). And a
    wrapper subclass (:func:`refuse_subclass`), on every call."""
    # make_fx outside torch.compile / torch.export (which the caller has ruled out) alike: it
    # recorded the plan's strided views at the traced shape, with no guard, and its graph was
    # wrong at every other length; its symbolic mode failed on the input cache's key.
    # get_proxy_mode reads both mode stacks: make_fx(pre_dispatch=True) too
    tracer = (
        "torch.jit.trace"
        if torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]
        else "make_fx"
        if get_proxy_mode() is not None
        else None
    )
    if tracer is not None:
        raise TypeError(
            f"{tracer} cannot record ringattn's dilated attention (its block plan is made in "
            "Python from each call's shapes, and the recording would keep one call's as "
            "constants): use torch.compile, or torch.export for a program"
        )
    refuse_dual(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, Tensor) and not x.is_nested:  # (nested: check_plain's own rule)
            refuse_subclass(name, x)  # (every call: _validate checks a signature once)
        if isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise TypeError(
                f"parameter {name!r} comes from a torch.func transform (vmap, grad, jacrev, "
                "...), which ringattn's dilated attention does not support: loop over the "
                "batched dim, or use the float64 ringattn.reference.dilated_attention"
            )


def _unkept(q: Tensor, tracing: bool) -> bool:
    """Whether a call's specs and patterns stay out of the module's caches: traced, or on fake
    tensors (a FakeTensorMode estimate, make_fx), whose patterns kept there broke every later
    real call of that shape."""
    return tracing or is_fake(q)


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))


def _described(x: object) -> tuple[object, ...]:
    """What the ranks must agree on about one input (its device type only: ranks own devices),
    everything :func:`check_plain` reads of it: then it raises on every rank or on none."""
    if not isinstance(x, Tensor):
        return (type(x).__name__,)
    if x.is_nested:  # (no .shape)
        return ("nested", str(x.dtype), x.device.type, str(x.layout), x.requires_grad)
    return (tuple(x.shape), str(x.dtype), x.device.type, str(x.layout), x.requires_grad)


# the entries of a sequence-parallel call's signature (check_across_ranks), by name
_CALL_FIELDS = ("q, k, v", "config", "strategy", "layout", "grad mode", "switches")
# and of a backward's (check_backward_across_ranks)
_BACKWARD_FIELDS = ("what", "config", "strategy", "layout", "dout, q", "switches", "forward call")


def _switches(split: int) -> tuple[str, ...]:
    """The module-level switches that decide how many exchanges a spanning block makes, as the
    ranks' check compares them: ``split`` (the call's ``pattern.BLOCK_SPLIT``) cuts it into
    parts and ``launches.FUSE_OFFSETS`` sends a config's offsets as runs, one exchange each.
    Flipped on one rank only (a notebook on rank 0), its ring messages met its peers' of other
    sizes: gloo aborted the peer's process ("Received data size doesn't match expected size")."""
    return (f"pattern.BLOCK_SPLIT={split}", f"launches.FUSE_OFFSETS={launches.FUSE_OFFSETS}")


# (Any: three :func:`_described` tuples, then two flags and a name, read by position)
def _call_described(q: object, k: object, v: object) -> tuple[Any, ...]:
    """What the ranks must agree on about a call's inputs: each one's :func:`_described`,
    whether k and v share q's device (a rank's own devices differ from another's), and the
    autocast that casts them (a rank in bf16 and one in fp16 exchanged each other's bytes)."""
    inputs = tuple(_described(x) for x in (q, k, v))
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return inputs
    device = q.device.type
    autocast = autocast_dtype(device)
    return (*inputs, k.device == q.device, v.device == q.device, str(autocast))


def packed_rows(x: Tensor) -> Tensor:
    """``x`` with its last dim packed (stride 1), copied only if it is not: SDPA's CPU kernel
    and FA4 read each row as ``d`` consecutive elements, so a strided ``d`` (``x[..., ::2]``, a
    ``[b, n, d, h]`` tensor permuted, an ``expand`` along ``d``) would be read wrong."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


class FixedAtConstruction:
    """Mixed in before ``nn.Module``: once the constructor has set ``_built``, assigning one of
    ``FIXED`` (attributes that calls are built from; ``FIXED_BECAUSE`` says how) or ``OPTIONS``
    (the constructor's options, kept under no attribute that a call reads) raises an
    ``AttributeError``. Other names, and what calls read (``training``, hooks), are assigned."""

    FIXED: tuple[str, ...] = ()
    FIXED_BECAUSE = "the module's compiled calls are built from it and cached per shape"
    OPTIONS: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_built", False):
            if name in self.FIXED:
                why = self.FIXED_BECAUSE
            elif name in self.OPTIONS:
                why = "an option its constructor read once; no call reads such an attribute"
            else:
                why = ""
            if why:
                raise AttributeError(
                    f"{type(self).__name__}.{name} is fixed at construction ({why}); make a "
                    "new module instead"
                )
        super().__setattr__(name, value)


class DilatedAttention(FixedAtConstruction, nn.Module):
    """LongNet dilated attention over ``[b, n, h, d]`` inputs (see ``docs/semantics.md``).

    Args:
        segment_lengths: ``w_i``, one per config.
        dilation_rates: ``r_i``, one per config, each dividing its ``w_i``.
        causal: keys after the query are masked (within each segment).
        mixing: ``"lse"`` (every head uses every config, merged by LSE) or ``"head_groups"``
            (contiguous head groups, one config each).
        scale: softmax scale, default ``1 / sqrt(d)``.
        strategy: which registered components compute it; never changes the result.
        compile: run the core compiled: for ``flex`` (and any ``compile_mode`` but the default)
            under the module's own ``torch.compile(fullgraph=True, dynamic=False)``
            (``compiled_frame`` says whether). Block computers (``sdpa``, ``math``) in the
            default mode open no frame of their own (it would add only host time), so for them
            it changes nothing: eagerly they run directly, and an enclosing ``torch.compile``
            captures them as opaque custom ops with ``compile=False`` too.
        compile_backend: the ``torch.compile`` backend (``"inductor"``; tests use ``"aot_eager"``).
        compile_mode: the ``torch.compile`` mode. ``"reduce-overhead"`` and ``"max-autotune"``
            replay Inductor's output from CUDA graphs (cudagraph trees), which copy each call's
            q, k, v into their pool unless a graph before made them: on an H200
            (``h200_perf.md`` step 63) 1.6-2.6x faster than eager in 7 of 8 rows at 16K with
            torch's kernels, but not with FlashAttention-4's (cheap launches), nor at 131K.
            ``torch.cuda.graph`` / ``make_graphed_callables`` around the module copy nothing
            (131K causal ``head_groups`` forward: 0.87 ms replayed against 1.07 ms eager).
        group: the process group of a sequence-parallel communicator (default: the world), or a
            1-D ``DeviceMesh`` (``mesh["sp"]``), whose group is taken. Every
            call checks that the ranks make the same call, else all raise instead of hanging;
            ``check_every_call = False`` checks only each signature's first call (README's
            Known limitations lists the refusals that cannot reach the peers).
        layout: how a sequence-parallel communicator's inputs are sharded over the ranks
            (``ringattn.distributed``): ``"contiguous"`` (rank i holds the i-th n/p positions) or
            ``"zigzag"`` (load-balanced causal: rank i holds chunks i and 2p-1-i of 2p; shard with
            ``ringattn.distributed.shard(x, layout="zigzag")``). The result is the same function
            of the whole sequence, sharded the same way.
    """

    # the functional form's option set this module serves (None: a user's module)
    functional_key: FunctionalKey | None = None

    @jaxtyped(typechecker=beartype)
    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        causal: bool = False,
        mixing: str = "lse",
        scale: float | int | None = None,
        strategy: Strategy = _DEFAULT_STRATEGY,
        compile: bool = True,
        compile_backend: str = "inductor",
        compile_mode: str = "default",
        group: Any = None,
        layout: str = "contiguous",
    ) -> None:
        super().__init__()
        distributed.check_layout(layout)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        backends = torch.compiler.list_backends(exclude_tags=())
        if compile_backend not in backends:
            raise ValueError(f"compile_backend must be one of {backends}, got {compile_backend!r}")
        self.config = DilatedConfig.of(segment_lengths, dilation_rates, causal, mixing, scale)
        self.strategy = strategy.check()
        self.dilation = strategy.component("dilation")()
        self.computer = strategy.component("computer")()
        self.memory = strategy.component("memory")()
        self.communicator = strategy.component("communicator")(
            group=group, memory=self.memory, layout=layout
        )
        # call signatures agreed by every rank: digests
        self._checked: dict[tuple[object, ...], int] = {}
        # input signatures already validated
        self._valid_inputs: dict[tuple[object, ...], None] = {}
        # not ``self.compile``: that would hide ``nn.Module.compile()``, torch's in-place compile
        self.compile_core = compile
        # Where the module opens a compiled frame of its own. A block computer's core is opaque
        # custom ops under torch.compile (see core.py), so a frame around it in the default mode
        # holds nothing to optimise and only adds host time per call: Dynamo's guards, the ops'
        # dispatch and AOTAutograd's wrappers (~0.2 ms forward, ~0.6 ms forward+backward; H200:
        # 32K tokens ran 1.3-1.5x slower compiled than eager). Such a module runs the core
        # directly — the same kernels — and an enclosing torch.compile still captures it as the
        # ops, fullgraph. Flex (its mask functions are compiled into the kernels) and the other
        # modes (CUDA graphs, autotuning) keep the frame.
        self.compiled_frame = compile and (
            compile_mode != "default" or isinstance(self.computer, LayoutComputer)
        )
        if self.communicator.distributed and self.compiled_frame:
            raise ValueError(
                f"communicator={strategy.communicator!r} cannot run inside the module's own "
                f"compiled frame (compile_mode={compile_mode!r}): its P2P/collective calls are "
                "not captured by torch.compile; use compile_mode='default' or compile=False"
            )
        self._compile_options = (compile_backend, compile_mode)
        self._specs: dict[tuple[int, int, int, torch.device], CoreSpec] = {}
        self._register()
        self._built = True

    # what a call is built from: its specs and compiled core are cached per shape, so a later
    # assignment applied to new shapes only (and a deep copy, which rebuilds them, computed
    # another function than the original), silently
    FIXED = ("config", "strategy", "dilation", "computer", "memory", "communicator",
             "compile_core", "compiled_frame")  # fmt: skip
    # the constructor's options, read into the attributes above and kept under no name of their
    # own: assigned later, each was a new attribute that no call reads (`attn.causal = True` left
    # the module non-causal, silently)
    OPTIONS = ("segment_lengths", "dilation_rates", "causal", "mixing", "scale", "compile",
               "compile_backend", "compile_mode", "group", "layout")  # fmt: skip

    def _register(self) -> None:
        # by which the opaque ops find it (core._spec): a CPU scalar tensor (CoreSpec.module),
        # and a copy on each CUDA device its calls ran on (core.device_tag)
        self._number = register_module(self)
        self._device_tags: dict[torch.device, Tensor] = {}
        default = torch.get_default_device()
        if default.type == "cuda":  # (built under torch.device("cuda"): never moved there)
            self._device_tag(default)
        backend, mode = self._compile_options
        self._core = (
            compiled_core((self.config, self.strategy, backend, mode), backend, mode)
            if self.compiled_frame
            else run_core
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        # model.to("cuda") / .cuda(): the module has no tensors to move, but a model compiled
        # around it with a CUDA-graph mode needs its CUDA tag as the trace's graph input
        # (core.device_tag; a trace cannot make one), so made here, where it is moved
        moved = fn(self._number)
        if moved.device.type == "cuda":
            self._device_tag(moved.device)
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._register()  # a copy is a module of its own

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the caches behind: they hold what belongs to this process
        (specs naming this module's number, prepared kernel launches as closures, the ranks'
        agreed digests, the compiled core: a function pickle cannot name); the copy rebuilds
        them on its first call, its memory manager empty. A kept spec named another module's
        core in a new process: its compiled calls ran that module's configs."""
        state = self.__dict__.copy()
        state["_specs"], state["_valid_inputs"], state["_checked"] = {}, {}, {}
        state["_device_tags"] = {}
        del state["_core"]
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"segment_lengths={c.segment_lengths}, dilation_rates={c.dilation_rates}, "
            f"causal={c.causal}, mixing={c.mixing!r}, strategy={self.strategy.label}, "
            f"layout={self.communicator.layout!r}, "
            f"compile={self.compile_core}"
        )

    def _spec(self, q: Tensor, unkept: bool | None = None, graph_input: bool = True) -> CoreSpec:
        """``unkept``: traced or fake (:meth:`forward` knows; None: found out here).
        ``graph_input``: the spec may reach a compiled frame, so names the module by its tag on
        ``q``'s device (False for the opaque ops' own, which is read inside a CUDA graph's
        warm-up: a tag made there would be a pool tensor that no output holds)."""
        _b, n, h, d = q.shape
        tracing = compiling()
        if unkept is None:
            unkept = _unkept(q, tracing)
        if not (unkept or tracing):
            # a call its manager serves (pooled bounds its bytes by such calls); not in a frame
            # Dynamo converts (an eager call after a graph break), where the lock broke the
            # graph inside this method and its resumed part raised as traced
            self.memory.begin_call()
        if unkept and not self.communicator.distributed:
            # a spec for the trace alone: the opaque ops ask the module's eager side for theirs
            # (core._spec), and a dict stored from the trace would hold this one instead
            return self._new_spec(n, h, d, tracing=True, device=q.device)
        # (the shape and device alone: an eager spec depends on nothing else of the call (the
        # device names its module tag), and a key with the compile flag hid a compile=False
        # module's eager spec from a trace)
        key = (n, h, d, q.device)
        spec = self._specs.get(key)
        if spec is not None and spec.plan.split != pattern.BLOCK_SPLIT:
            spec = None  # made before BLOCK_SPLIT changed: its plan and launches are cut otherwise
        if (
            spec is not None
            and graph_input
            and not tracing
            and spec.module is not self._device_tag(q.device)
        ):
            spec = None  # the ops' own came first (a model compiled before any eager call)
        if spec is None and self.communicator.distributed and tracing:
            # traced inline, the core's P2P/collective calls would break the graph
            raise ValueError(
                "a sequence-parallel DilatedAttention must run once eagerly (on every rank) "
                "before a torch.compile'd model traces it: that call checks the ranks agree and "
                "registers the core as the opaque ops the graph captures"
            )
        if spec is None:
            spec = self._new_spec(n, h, d, tracing, q.device if graph_input else None)
            _remember(self._specs, key, spec)  # (one spec per graph at most)
        return spec

    def _new_spec(
        self, n: int, h: int, d: int, tracing: bool, device: torch.device | None
    ) -> CoreSpec:
        c = self.config
        configs, spans = c.configs, (1,) * len(c.configs)
        if self.communicator.distributed:
            # n is this rank's shard; a segment spanning shards is one local chunk of n rows
            spans = distributed.spans_for(
                c.configs, n, self.communicator.world_size, self.communicator.layout
            )
            configs = tuple((w, r) if s == 1 else (n, r) for (w, r), s in zip(c.configs, spans))
        return CoreSpec(
            spans=spans,
            plan=make_plan(n, h, configs, c.mixing),
            causal=c.causal,
            scale=c.scale_for(d),
            dilation=self.dilation,
            computer=self.computer,
            communicator=self.communicator,
            # traced (the module's compiled frame, or inline in a compiled model): Inductor
            # plans temporaries; otherwise, the opaque ops included, the core runs as in
            # eager mode and keeps the module's manager (its cached patterns: a manager
            # that rebuilds them in every call cost a compile=True module 15% at 131K)
            memory=_NO_REUSE if self.compiled_frame or tracing else self.memory,
            # (a trace's spec keeps the CPU tag: making a CUDA one there would break the graph)
            module=self._number if tracing or device is None else self._device_tag(device),
        )

    def _device_tag(self, device: torch.device) -> Tensor:
        if device.type != "cuda":
            return self._number
        if device.index is None:  # (torch.device("cuda"): the current one, as tensors have it)
            device = torch.device("cuda", torch.cuda.current_device())
        tag = self._device_tags.get(device)
        if tag is None:
            if pool_allocating():
                # a first call inside a capture: made now it would be the graph's, kept here
                # (and its copy from the host is refused while capturing); the CPU tag serves
                # until a call outside makes it
                return self._number
            tag = self._device_tags[device] = device_tag(self._number, device)
        return tag

    def eager_spec(self, q: Tensor) -> CoreSpec:
        """The spec of an eager call with ``q``'s shape (what the opaque ops run, core._spec)."""
        return self._spec(q, graph_input=False)

    # Sequence-parallel calls: every rank must make the same call, else all raise. Checked on
    # every call (one all-reduce of the call's digest on a CPU gloo group: ~130-200 µs of host
    # time on an H200 machine, experiments/rank_check_cost.py); False checks only each
    # signature's first call, which hangs if a rank repeats a call while another makes a new
    # one (an uneven last batch). Set it on a module, or on the class for every module.
    check_every_call: bool = True

    def check_across_ranks(
        self, q: Tensor, k: Tensor, v: Tensor, grad: Sequence[bool] | None = None
    ) -> None:
        """The ranks' agreement on this call (see ``check_every_call``): at the eager boundary,
        and in the opaque forward op of a compiled graph (``core.dilated_forward_op``), which
        holds no collective. ``grad``: the call's grad mode and q, k, v's ``requires_grad``
        (``core.grad_state``) where they are not the current ones (in the op)."""
        described = _call_described(q, k, v)  # before validation: all ranks agree first
        enabled = torch.is_grad_enabled()
        if grad is not None:  # (tensors, in the op: each one's description ends in requires_grad)
            enabled, *requires = grad
            described = (*((*x[:-1], r) for x, r in zip(described, requires)), *described[3:])
        signature = (
            described,
            self.config,
            self.strategy.label,
            self.communicator.layout,
            enabled,
            _switches(pattern.BLOCK_SPLIT),  # (the call's spec is cut with it: _spec)
        )
        self.communicator.check_group()
        known = self._checked.get(signature)
        if known is not None and not self.check_every_call:
            return
        digest = distributed.fingerprint(signature) if known is None else known
        try:
            distributed.require_agreement(
                self.communicator.group,
                signature,
                digest=digest,
                fields=_CALL_FIELDS,
                device=distributed.device_of(q),
            )
        except ValueError as disagreement:
            try:  # a rank whose own arguments are wrong says what is wrong with them
                check_plain(q, k, v)
            except (TypeError, ValueError) as own:
                raise own from disagreement
            raise
        if known is not None:
            return
        check_plain(q, k, v)  # the same call everywhere: it raises on every rank or on none
        _remember(self._checked, signature, digest)

    def check_backward_across_ranks(
        self, dout: Tensor, q: Tensor, call: int | None, split: int
    ) -> None:
        """The ranks' agreement on a backward of this module (``core.check_backward``), as on its
        forward calls (``check_every_call``; where it is False, each signature's first backward
        only): the same module's, of the same forward call (``call``, its number on every rank;
        None in a compiled graph). Without it, backwards run in other orders on two ranks (or
        one rank's of another call) paired their ring messages across calls: wrong gradients on
        every rank, silently; and a rank that skipped its backward for a next forward left the
        others waiting in theirs (a hang; now both are in the agreement, which raises).
        ``split``: the ``BLOCK_SPLIT`` of the forward's plan, which the backward runs."""
        tensors = (tuple(dout.shape), str(dout.dtype), tuple(q.shape), str(q.dtype))
        layout = self.communicator.layout
        switches = _switches(split)
        unnumbered = ("backward", self.config, self.strategy.label, layout, tensors, switches)
        known = self._checked.get(unnumbered)
        if known is not None and not self.check_every_call:
            return
        digest = distributed.fingerprint(unnumbered) if known is None else known
        # the number apart from the digest: a rank whose backward is a compiled graph's (no
        # number) agrees with any, since ranks may run one step compiled and another eagerly
        distributed.require_agreement(
            self.communicator.group,
            (*unnumbered, call),
            what="the backward of a dilated attention call",
            digest=digest,
            fields=_BACKWARD_FIELDS,
            device=q.device,
            call=call,
        )
        if known is None:
            _remember(self._checked, unnumbered, digest)

    def refuse_across_ranks(self, exc: Exception, device: torch.device | None = None) -> NoReturn:
        """Raise ``exc``, a rank-local failure of a call that was to reach this module (a
        layer's own argument checks, before its projections). Where the module is
        sequence-parallel the other ranks would wait for this one in the ring; so this rank
        takes part in the call's agreement (``check_every_call``) with a signature that cannot
        match theirs, and they raise a ValueError naming this rank's error instead. ``device``:
        the call's (an NCCL-only sub-group agrees on that GPU, ``distributed.nccl_device``)."""
        tracing = compiling()
        if self.communicator.distributed and self.check_every_call and not tracing:
            distributed.refuse_on_every_rank(self.communicator.group, exc, device)
        raise exc

    def _validate(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Type and shape checks (jaxtyping + beartype) and the computer's support, once per input
        signature: their outcome depends on nothing else, and the checks cost ~0.2 ms of host
        time per call, which short sequences would pay on every layer and step."""
        if not all(isinstance(x, Tensor) and not x.is_nested for x in (q, k, v)):
            check_plain(q, k, v)  # raises the TypeError naming the argument (a nested tensor
            # has no .shape: it raised torch's "NestedTensorImpl doesn't support sizes" below)
        needs_grad = _needs_grad(q, k, v)
        # (the layout too: a sparse q after a dense call of its shape skipped the check)
        signature = (*((x.shape, x.dtype, x.device, x.layout) for x in (q, k, v)), needs_grad)
        if signature in self._valid_inputs:
            return
        check_inputs(q, k, v)
        self.config.check_scale_for(q.dtype)
        self._check_supported(q, needs_grad, traced=False)
        _remember(self._valid_inputs, signature, None)

    def _check_supported(self, q: Tensor, needs_grad: bool, traced: bool) -> None:
        # traced by a user's torch.compile the computer is compiled too, whatever compile_core
        # says (the backend is not visible from inside the trace: Inductor is assumed). Not
        # is_compiling(): a frame Dynamo gave back to eager runs its callees as frames of their
        # own, so the eager boundary's checks can run compiling while the core is not traced
        reason = self.computer.unsupported(
            q.dtype,
            q.device,
            needs_grad,
            compiled=self.compile_core or traced,
            dilation=self.dilation.name,
            traced=traced,
            mixing=self.config.mixing,
            backend="inductor" if traced else self._compile_options[0],
        )
        if reason:
            raise UnsupportedError(
                f"strategy computer={self.strategy.computer!r} cannot run "
                f"{q.dtype} on {q.device.type}: {reason}"
            )

    def forward(self, q: BNHD, k: BNHD, v: BNHD) -> BNHD:
        """Dilated attention of ``q`` over ``k``, ``v`` (each ``[b, n, h, d]``, one shape, dtype
        and device), as ``docs/semantics.md`` defines it; ``[b, n, h, d]`` in q's dtype (under
        ``torch.autocast``, inputs of any dtype but float64 run in, and return, autocast's). A
        sequence-parallel module takes this rank's shard of each and returns its shard."""
        tracing = compiling()
        if not tracing:
            try:
                refuse_functorch(q, k, v)
            except TypeError as exc:  # on every rank, where sequence-parallel
                self.refuse_across_ranks(exc, distributed.device_of(q))
        # as F.scaled_dot_product_attention does under autocast, before the rules (the core
        # itself runs with autocast off, in its inputs' dtype: core.input_precision)
        q, k, v = autocast_inputs(q, k, v)
        if self.communicator.distributed and not tracing:
            self.check_across_ranks(q, k, v)
        if tracing:  # the same rules, traced into guards (no beartype frames in the graph)
            refuse_dual(q, k, v)  # (inside a dual level: refused, see there)
            check_plain(q, k, v)
            self.config.check_scale_for(q.dtype)
            self._check_supported(q, _needs_grad(q, k, v), traced=True)
        else:
            self._validate(q, k, v)
        q, k, v = packed_rows(q), packed_rows(k), packed_rows(v)
        # autograd.Function under Dynamo refuses the same tensor twice (self-attention with
        # q is k is v); distinct views of one storage are fine and cost nothing
        if k is q:
            k = k.view_as(k)
        if v is q or v is k:
            v = v.view_as(v)
        if tracing and not isinstance(self.computer, LayoutComputer):
            # a block computer's core is the opaque ops, which make their plan and gather
            # indices at run time (core._eager_side): the trace reads no value of n, so
            # dynamic shapes need no guard on it (a plan built here guarded on n mod w)
            if self.communicator.distributed:
                self._spec(q)  # raises unless an eager call has checked the ranks agree
            # (the CUDA tag of an earlier eager call on this device, if any: a model compiled
            # with reduce-overhead needs one for its backward, core.device_tag)
            tag = self._device_tags.get(q.device, self._number)
            out: Tensor = dilated_forward_op(q, k, v, tag, grad_state(q, k, v))[0]
            return out
        unkept = _unkept(q, tracing)
        spec = self._spec(q, unkept)
        memory = _NO_REUSE if unkept else self.memory
        indices = self.dilation.indices(spec.plan, q.device, memory)
        aux = (
            self.computer.prepare(spec.plan, spec.causal, self.dilation.name, q.device, memory)
            if isinstance(self.computer, LayoutComputer)
            else ()
        )
        if self.compiled_frame and not tracing:
            return self._in_compiled_frame(spec, q, k, v, indices, aux)
        return self._core(spec, q, k, v, indices, aux)

    def _in_compiled_frame(self, spec: CoreSpec, *args: Any) -> Tensor:
        """The core in the module's own compiled frame, with Dynamo's recompile limit at least
        ``RECOMPILE_LIMIT`` (read now; a higher one the user set stays: a patch made at import
        put it back to 64 on every call) and its overflow named."""
        config = torch._dynamo.config
        prior = config.recompile_limit
        config.recompile_limit = max(prior, RECOMPILE_LIMIT)
        try:
            return self._core(spec, *args)
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            # (Dynamo's own message blames a fullgraph=True the user never passed)
            raise RuntimeError(
                f"this module's compiled frame holds one graph per (b, n, h, d, dtype, grad "
                f"mode), and its {config.recompile_limit} are spent: raise "
                "torch._dynamo.config.recompile_limit (or ringattn.api.RECOMPILE_LIMIT), or "
                "pass compile=False to this module"
            ) from exc
        finally:
            config.recompile_limit = prior


# Never a frame of its own to Dynamo (a trace inlines it): a torch.compile without fullgraph
# gives a frame that raised while traced (a dual input's refusal) back to eager, and converts
# the frames that one calls; this one, traced alone, re-raised an exception made outside the
# trace, which torch 2.11's Dynamo failed on with an AssertionError of its own (TypeError lost)
torch._dynamo.eval_frame.skip_code(DilatedAttention.refuse_across_ranks.__code__)
