"""The functional form, ``ringattn.dilated_attention``: one ``DilatedAttention`` module per option
set, made at the first call with those options and kept.

The modules live in a bounded LRU (``_MODULES``, for eager lookups) and, never evicted, as
attributes of ``_EVERY_MODULE``: compiled graphs and exported programs name their module
(``core._spec``), and a trace reads it as an attribute (a traced dict lookup guarded the graph on
the dict's length). A trace makes a new option set's module in plain Python, outside the trace
(``_made_while_tracing``, an ``assume_constant_result``): Dynamo cannot trace the constructor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_scalar

from ringattn import distributed, registry
from ringattn.api import _DEFAULT_STRATEGY, DilatedAttention, autocast_inputs, check_plain
from ringattn.capture import compiling
from ringattn.config import int_sequence, type_name
from ringattn.strategy import Strategy
from ringattn.types import BNHD

if TYPE_CHECKING:
    # an option set's key (:func:`_key`): its lengths and rates, causal, mixing and scale with
    # their types, the strategy, its registered classes, compile and compile_backend with
    # their types; a tuple of so many kinds, read by position, that its items are Any
    Key = tuple[Any, ...]

_MODULES: OrderedDict[Key, DilatedAttention] = OrderedDict()
_MAX_MODULES = 32
# (threads calling the functional form: one found a key that another evicted before its
# move_to_end, KeyError; two made a module each for one new key)
_MODULES_LOCK = threading.RLock()
# the functional form's option sets seen before it warns that an option varies between calls
FUNCTIONAL_MODULES_WARNING = 256
# every option set's module, never evicted: compiled graphs and exported programs name them
# (core._spec). A trace looks them up here, as attributes: a dict's lookup, traced, guarded the
# graph on the dict's length (and the LRU's on its order), so any other option set's eager call
# recompiled it, and under fullgraph the ninth raised
_EVERY_MODULE = types.SimpleNamespace()


def clear_functional_modules() -> None:
    """Forget the functional form's modules: later calls make new ones (tests that switch
    kernels; a notebook after re-registering a strategy does not need it, its class is in the
    key). A ``torch.compile``'d function over the functional form traces again at its next call
    (its guard on the module fails) and runs with the new one; what cannot trace again, the
    backward of a call made before and an exported program (``torch.export``), raises that its
    module is gone."""
    with _MODULES_LOCK:
        _MODULES.clear()
        _EVERY_MODULE.__dict__.clear()


def _typed(name: str, option: object) -> tuple[object, ...]:
    """``option`` with its type (and, for a list or tuple, each item's), for the cache's key. A
    value of no plain type (bool, int, float, str, None), which no option takes, is refused here,
    naming ``name`` and its annotated type, eager or traced alike: traced, a numpy array failed
    as "unhashable type", naming nothing, and under torch 2.11 (whose Dynamo passed this
    module's old hashability test) a bytearray raised Dynamo's internal error and a numpy array
    reached the constructor as a tensor."""
    if isinstance(option, (list, tuple)):
        return (type(option), *(_typed(name, x) for x in option))
    if not isinstance(option, _PLAIN_TYPES):
        hint = (
            # (np.float64 is a float, eagerly; Dynamo holds it as a 0-d array, no constant)
            " (traced by torch.compile, a numpy value, even a scalar, is an array: pass a "
            "Python number or bool)"
            if compiling() and type(option).__module__ == "numpy"
            else ""
        )
        raise TypeError(f"{name} must be {_OPTION_TYPES[name]}, got {type_name(option)}{hint}")
    return (type(option), option)


_PLAIN_TYPES = (bool, int, float, str, type(None))


def _attribute(key: Key) -> str:
    return f"m{hash(key) & 0xFFFFFFFFFFFFFFFF:x}"


def _kept_module(key: Key) -> DilatedAttention | None:
    """The module ever made for ``key`` (None: none yet)."""
    module = getattr(_EVERY_MODULE, _attribute(key), None)
    return module if module is not None and module.functional_key == key else None  # collisions


def dilated_attention(
    q: BNHD,
    k: BNHD,
    v: BNHD,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    mixing: str = "lse",
    scale: float | int | None = None,
    strategy: Strategy = _DEFAULT_STRATEGY,
    compile: bool = True,
    compile_backend: str = "inductor",
) -> BNHD:
    """Functional form of :class:`DilatedAttention`: its options except ``compile_mode``,
    ``group`` and ``layout``. A sequence-parallel strategy runs over the world, contiguous; a
    call over another group or in the zigzag layout, or a CUDA-graph call, needs a module of its
    own (which holds the ranks' agreed calls and the graphs' memory).

    Modules are cached per option set, so repeated calls reuse the compiled core and the memory
    manager's patterns instead of recompiling. The 32 most recent option sets keep their patterns
    and buffers; every option set's module itself lives as long as the process, because a
    compiled graph or an exported program names it. So an option that changes from call to call
    (a float ``scale`` read with ``.item()``, ``segment_lengths=(n,)``) makes a module, and with
    ``compile=True`` a graph, every call: fold such a scale into ``q`` (``q * s`` scales the
    logits by ``s``) and keep segment lengths fixed. A warning says so past
    ``FUNCTIONAL_MODULES_WARNING`` option sets. Traced by a user's ``torch.compile`` it
    captures like the module (the opaque ops, fullgraph), also before any eager call: a trace
    makes its option set's module in plain Python. The options must be constants to Dynamo
    there (literals, closure or module attributes, as usual; a numpy value, even a scalar, is an
    array to Dynamo, and an ``array.array``'s len() it cannot take). Lengths and rates that are
    symbolic there (``n // 4`` under ``dynamic=True``, an int argument of the compiled function
    that changes between calls) are taken as their values, guarded: each new value retraces.
    """
    options: dict[str, Any] = {
        "segment_lengths": segment_lengths,
        "dilation_rates": dilation_rates,
        "causal": causal,
        "mixing": mixing,
        "scale": scale,
        "strategy": strategy,
        "compile": compile,
        "compile_backend": compile_backend,
    }
    if compiling():
        # traced by a user's torch.compile: beartype's wrapper cannot be traced (it raised
        # inside Dynamo), and the module checks its inputs itself, traced into guards
        return _traced_functional(q, k, v, **options)
    out: Tensor = _eager_functional(q, k, v, options)
    return out


# each option's type as dilated_attention annotates it ("float | int | None"), for the refusals
# of _typed (a dict of strings: a trace reads it as constants)
_OPTION_TYPES: dict[str, str] = {
    name: str(hint) for name, hint in dilated_attention.__annotations__.items()
}


@torch.compiler.disable
def _eager_functional(q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any]) -> Tensor:
    """The eager call, never traced: where a user's torch.compile gave up on a frame above it
    (options it could not treat as constants), Dynamo traced the frames this calls instead, and
    beartype's wrapper, traced, reported a good ``q`` as violating its hint.

    Checked as the module's calls are, not by a beartype wrapper of its own (which cost ~0.1 ms
    per call): q, k, v here by their plain rules and by the module's jaxtyping + beartype check
    once per input signature; the options by the module's constructor, which every option set
    new to the cache reaches (the cache's key holds each option's type, and the lengths and
    rates as int_sequence checked them)."""
    q, k, v = autocast_inputs(q, k, v)  # (first, as the module's call: F.sdpa's rule)
    try:
        check_plain(q, k, v)  # (its errors name the argument and the rule, before beartype's)
        module = _functional_module(**options)
    except (TypeError, ValueError) as exc:
        _refuse_functional_call(exc, options["strategy"], q)
    out: Tensor = module(q, k, v)
    return out


def _functional_module(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], **options: Any
) -> DilatedAttention:
    # (the options are typed by the module's constructor, which any new key reaches)
    key = _key(segment_lengths, dilation_rates, **options)
    return _module_for(key, segment_lengths, dilation_rates, **options)


def _refuse_functional_call(exc: Exception, strategy: object, q: object) -> NoReturn:
    """Raise ``exc``; where the call is sequence-parallel (over WORLD: the functional form has
    no ``group``), on every rank, as a module's refusals are: refused on one rank alone, an
    argument left the others waiting in the call's agreement until the group's timeout."""
    sequence_parallel = isinstance(strategy, Strategy) and strategy.distributed
    if sequence_parallel and dist.is_initialized() and DilatedAttention.check_every_call:
        distributed.refuse_on_every_rank(
            distributed.resolve_group(None), exc, distributed.device_of(q)
        )
    raise exc


def _traced_functional(
    q: BNHD,
    k: BNHD,
    v: BNHD,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    **options: Any,
) -> BNHD:
    """The functional form as a user's ``torch.compile`` traces it (the eager call is
    :func:`_eager_functional`, which finds or makes its module at call time)."""
    # (the options are typed by the module's constructor, which any new key reaches)
    key = _key(segment_lengths, dilation_rates, **options)
    # Found or made in plain Python at trace time, for a kept module too: torch 2.11's Dynamo
    # cannot trace hash() of a tuple (the key's attribute, _kept_module), which failed every
    # fullgraph trace there, and on CUDA the call also makes the module's CUDA tag where no
    # eager call did. (The lengths and rates as the key holds them, checked: a float among
    # them is no constant to Dynamo, which then failed to pass them on.)
    # Lengths and rates computed from a dynamic shape (n // 4 under dynamic=True) are
    # symbolic: a module is made for values, so the trace takes them as constants and
    # guards on them (a new value retraces). Handed on symbolic, torch 2.13's Dynamo broke
    # the graph there and 2.11's raised its internal error.
    lengths = tuple(guard_scalar(w) for w in key[0])
    rates = tuple(guard_scalar(r) for r in key[1])
    # a scale that changed between calls (a function's argument), or one computed from a
    # dynamic shape, is symbolic too: the same, a constant guarded on (handed on symbolic,
    # Dynamo failed: "assume_constant_result argument conversion failed", naming nothing)
    scale = options["scale"]
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        options = {**options, "scale": guard_scalar(scale)}
    attribute, refusal, reason = _made_while_tracing(
        lengths, rates, device=q.device, classes=key[6], **_as_constants(options)
    )
    if refusal:
        raise (TypeError if refusal == "TypeError" else ValueError)(reason)
    out: Tensor = getattr(_EVERY_MODULE, attribute)(q, k, v)
    return out


def _key(segment_lengths: Sequence[int], dilation_rates: Sequence[int], **options: Any) -> Key:
    strategy = options["strategy"]
    if not isinstance(strategy, Strategy):  # (read below, before the constructor's check)
        raise TypeError(f"strategy must be a ringattn.Strategy, got {type(strategy).__name__}")
    return (
        # as the config will hold them, checked by its rules (int_sequence): any sequence the
        # module takes (a UserList, a range, a torch.Size) is a key, and one it refuses (a numpy
        # array, bytes) gets its error, eager or traced, where hashing it raised "unhashable type"
        int_sequence("segment_lengths", segment_lengths),
        int_sequence("dilation_rates", dilation_rates),
        # with each value's type: equal values of other types (8.0 == 8, True == 1; compile=0
        # after compile=False) found the module of the valid ones and skipped the options' checks
        *(_typed(name, options[name]) for name in ("causal", "mixing", "scale")),
        strategy,
        # the classes too: a strategy re-registered under its name (a notebook cell re-run with
        # a fix) gets a new module, not the old class's
        tuple(strategy.component(kind) for kind in registry.KINDS),
        _typed("compile", options["compile"]),
        _typed("compile_backend", options["compile_backend"]),
    )


def _group_gone(module: DilatedAttention) -> bool:
    """Whether ``module`` is sequence-parallel over a destroyed process group: the functional
    form then makes its module again over today's (a module the user never built raised
    "build the module again" for the rest of the process, after a destroy and a new init)."""
    if not module.communicator.distributed:
        return False
    try:
        cast(Any, module.communicator).check_group()
    except ValueError:
        return True
    return False


def _module_for(key: Key, *args: Any, **options: Any) -> DilatedAttention:
    """The functional form's module of ``key``: cached (LRU), else kept, else made."""
    with _MODULES_LOCK:
        return _find_or_make(key, *args, **options)


def _find_or_make(key: Key, *args: Any, **options: Any) -> DilatedAttention:
    try:
        module = _MODULES.get(key)
    except TypeError:
        # an option whose hash raises, though its type has one (_typed refuses the unhashable
        # types), failed the lookup as "unhashable type", naming none: the constructor names it
        DilatedAttention(*args, **options)
        raise
    if module is not None and not _group_gone(module):
        _MODULES.move_to_end(key)
        return module
    # one evicted earlier comes back (a new one would leave its compiled graphs without it)
    module = _kept_module(key)
    if module is None or _group_gone(module):
        module = DilatedAttention(*args, **options)
        if len(_EVERY_MODULE.__dict__) == FUNCTIONAL_MODULES_WARNING:
            warnings.warn(
                f"ringattn.dilated_attention has made {FUNCTIONAL_MODULES_WARNING} modules, one "
                "per option set, each kept for the process's life (a compiled graph may name "
                "it): an option changes between calls (e.g. a float scale from .item() or "
                "segment_lengths that follow n). Fold a varying scale into q (q * s) and keep "
                "segment lengths fixed, or build a DilatedAttention module per setting",
                stacklevel=_caller_level(),
            )
    _MODULES[key] = module
    module.functional_key = key
    setattr(_EVERY_MODULE, _attribute(key), module)
    if len(_MODULES) > _MAX_MODULES:
        _, evicted = _MODULES.popitem(last=False)
        # its patterns and buffers go; the module itself stays alive, since a compiled graph's
        # backward or an exported program names it (core._spec) and the user holds no reference
        # to keep it: they raised "module ... is gone" after 32 other option sets
        evicted.memory.clear()
        evicted._specs.clear()
        # (it stays in _EVERY_MODULE)
    return module


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside ringattn and torch (the
    functional form's call passes through torch.compiler.disable's wrapper, whose depth is
    torch's)."""
    level, frame = 1, cast("types.FrameType | None", sys._getframe(1))
    library = tuple(os.path.dirname(str(m.__file__)) + os.sep for m in (registry, torch))
    while frame is not None and frame.f_code.co_filename.startswith(library):
        level, frame = level + 1, frame.f_back
    return level


def _as_constants(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as Dynamo can hand them to an ``assume_constant_result`` function: the
    Strategy, a frozen dataclass, as its class and its fields' names. Under torch 2.11 Dynamo
    converts each argument of such a call to a Python constant and cannot convert a frozen
    dataclass ("currently can't reconstruct arbitrary frozen dataclass instances"), so every
    trace of the functional form on CUDA, and every one before an eager call, failed there
    (torch 2.13 converts it)."""
    strategy = options["strategy"]
    names = tuple(getattr(strategy, field) for field in _STRATEGY_FIELDS)
    return {**options, "strategy": (type(strategy), names)}


_STRATEGY_FIELDS = tuple(field.name for field in dataclasses.fields(Strategy))


@torch._dynamo.assume_constant_result
def _made_while_tracing(
    *args: Any,
    device: torch.device | None = None,
    classes: tuple[type[Any], ...] = (),
    **options: Any,
) -> tuple[str, str, str]:
    """The module of a traced call's option set, made at trace time in plain Python, not traced:
    Dynamo cannot trace the constructor (beartype's signature object), so a user's
    ``torch.compile(fullgraph=True)`` of the functional form failed unless an eager call had made
    the module first. Returns its attribute in ``_EVERY_MODULE``, or the error the options get
    (its type's name and message, raised by the trace: Dynamo reported an exception raised here as
    its own internal error). On a CUDA ``device`` it also makes the module's CUDA tag there, as an
    eager call would (``core.device_tag``; the trace then reads it as a static input), which a
    compile for CUDA graphs needs and a trace cannot make. ``classes``, the strategy's
    registered classes as the trace read them, is unused here: handed in, it makes the trace
    guard on them, so a class re-registered under its name retraces (and gets its own module)."""
    del classes
    try:
        strategy_type, names = options["strategy"]  # (as _as_constants handed it)
        options = {**options, "strategy": strategy_type(**dict(zip(_STRATEGY_FIELDS, names)))}
        key = _key(*args, **options)
        module = _module_for(key, *args, **options)  # (made and kept under its key)
    except (TypeError, ValueError) as error:
        return "", "TypeError" if isinstance(error, TypeError) else "ValueError", str(error)
    if device is not None and device.type == "cuda":
        # (where it cannot be made now, the CPU tag serves as before: a compile for CUDA graphs
        # is then refused by the op with a message saying so, core._setup_context)
        with contextlib.suppress(RuntimeError):
            module._device_tag(device)
    return _attribute(key), "", ""
