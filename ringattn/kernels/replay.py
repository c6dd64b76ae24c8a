"""Re-issue a kernel library's compiled launches without its Python launcher.

Why: FlashAttention-4's Python interface re-derives its tile configuration, validates every
operand and rebuilds its compile key on every call: ~0.1-0.2 ms of host time, more than the
small blocks' kernels take on an H200. The plan issues tens of such calls per forward, so at
32K-131K tokens the host, not the GPU, set the pace (docs/benchmarks/h200_perf.md, steps 19-21).
The compiled kernels themselves take tensors and scalars, and for operands of the same layouts
the launcher makes the same decisions. So the first call of each *signature* (the operands'
shapes, strides, dtypes, 16-byte alignment, and the flags) runs the launcher once under
:func:`record`, which notes

* every compiled launch: which cached kernel, and each argument as one of the caller's operands
  (by role), a buffer the launcher allocated (re-allocated on replay with the same layout), or a
  constant (scalars, ``None``, the library's empty option objects);
* every aten op the launcher ran (through a ``TorchDispatchMode``).

A recording becomes a :class:`Replay` only if every aten op was an allocation or a metadata-only
view, every tensor argument is an operand or an allocation (or a view of one), and no two operands
alias. Anything else (a copy made to fix a layout, a buffer zeroed in Python, a semaphore, a
combine step between launches) means the launcher does work a replay would skip: that signature
keeps calling the launcher, which computes the same thing more slowly. A launch that bypassed
the compile caches would be missing from a replay without any of that showing; so a recording is
replayed once into the launcher's own buffers, its results and the launcher's floating-point
allocations poisoned with NaN first, and held to the launcher's results (to what it added, for
operands it accumulates into) before it is kept. A kernel argument that is not a tensor but holds
one, or device memory or a stream (``_holds_pointer``; or nests deeper than it searches), is no
constant: such a recording is not replayed either. Replays are therefore the recorded call's GPU
work, on new operands, as far as those checks see: a launch that bypassed the caches and wrote
only an integer workspace would still go unnoticed (none of FA4's does).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops a launcher may run without doing work a replay would skip: allocations and views
_ALLOCATIONS = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}
_VIEWS = {
    aten.alias.default,
    aten.as_strided.default,
    aten.detach.default,
    aten.expand.default,
    aten.permute.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.squeeze.dim,
    aten.t.default,
    aten.transpose.int,
    aten.unsqueeze.default,
    aten.view.default,
    aten._unsafe_view.default,
}

# why the latest recording made no replay (for probes: experiments/fa4_probe.py --part replay)
last_refusal: str | None = None

Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]
Layouts = tuple[Layout | None, ...]
# a compiled launch as the caches' kernel was called: (kernel, args, kwargs); the arguments are
# whatever the library passes its kernels (tensors, scalars, its DSL's objects)
_Launch = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
# _plan's: (arguments with constants in place, (position, role) of each operand, (position,
# buffer index, (shape, stride, offset) or None) of each buffer view)
_BufferView = tuple[tuple[int, ...], tuple[int, ...], int]
_Plan = tuple[
    tuple[Any, ...], tuple[tuple[int, int], ...], tuple[tuple[int, int, _BufferView | None], ...]
]


def layout(x: Tensor) -> Layout:
    return tuple(x.shape), x.stride(), x.dtype, x.device


def signature(
    tensors: tuple[Tensor | None, ...], *flags: Any, layouts: Layouts | None = None
) -> tuple[object, ...]:
    """The key under which calls share one replay: every operand's layout and 16-byte alignment
    (the kernels are compiled for aligned pointers), and the call's flags. ``layouts``: the
    operands' :func:`operand_layouts`, where the caller knows them already (a prepared launch's
    views keep theirs: only the alignments are read per call)."""
    return (
        layouts if layouts is not None else operand_layouts(tensors),
        tuple(None if x is None else x.data_ptr() % 16 for x in tensors),
        *flags,
    )


def operand_layouts(tensors: Iterable[Tensor | None]) -> Layouts:
    """Each operand's :func:`layout` (None stays None)."""
    return tuple(None if x is None else layout(x) for x in tensors)


class _Watch(TorchDispatchMode):
    """Notes whether every aten op was an allocation or a view, and keeps the allocations."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (TorchDispatchMode.__init__)
        self.allocations: list[Tensor] = []
        self.other_ops: list[str] = []
        self.in_kernel = False  # a kernel's own ops (a stand-in's, on CPU) are not the launcher's

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if self.in_kernel:
            pass
        elif func in _ALLOCATIONS:
            self.allocations.append(result)
        elif func not in _VIEWS:
            self.other_ops.append(str(func))
        return result


class _RecordingCache:
    """Stands in for one compile cache while recording: lookups return the cached kernel wrapped
    so that its calls are noted; stores and membership go to the real cache."""

    def __init__(self, cache: Any, launches: list[_Launch], watch: _Watch) -> None:
        self._cache, self._launches, self._watch = cache, launches, watch

    def __contains__(self, key: object) -> bool:
        return key in self._cache

    def __setitem__(self, key: object, value: object) -> None:
        self._cache[key] = value

    def get(self, key: object, default: object = None) -> object:
        return self[key] if key in self._cache else default

    def setdefault(self, key: object, default: object) -> Callable[..., Any]:
        if key not in self._cache:
            self._cache[key] = default
        return self[key]

    def __getitem__(self, key: object) -> Callable[..., Any]:
        kernel = self._cache[key]

        def noted(*args: Any, **kwargs: Any) -> Any:
            self._launches.append((kernel, args, kwargs))
            self._watch.in_kernel = True
            try:
                return kernel(*args, **kwargs)
            finally:
                self._watch.in_kernel = False

        return noted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


@dataclass(frozen=True)
class _Operand:
    role: int  # index into the operands of the call


@dataclass(frozen=True)
class _Buffer:
    index: int  # which allocation
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset of the view


@dataclass(frozen=True)
class Replay:
    """The allocations and compiled launches of one recorded call, and where its results are."""

    allocations: tuple[Layout, ...]
    launches: tuple[tuple[Callable[..., Any], tuple[object, ...]], ...]
    results: tuple[_Operand | _Buffer, ...]
    # each launch's arguments as a template of its constants and where the operands and buffer
    # views go (made once: a replay issues ~40 arguments per FA4 backward launch, and resolving
    # each by type in every call cost more host time than the launch itself)
    _plans: tuple[tuple[Callable[..., Any] | None, _Plan], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        plans = tuple((kernel, _plan(args, self.allocations)) for kernel, args in self.launches)
        object.__setattr__(self, "_plans", (*plans, (None, _plan(self.results, self.allocations))))

    def __call__(
        self, operands: tuple[Tensor | None, ...], buffers: list[Tensor] | None = None
    ) -> tuple[Tensor, ...]:
        """The recorded launches on ``operands``, into new buffers (or the given ones)."""
        if buffers is None:
            buffers = [
                torch.empty_strided(shape, stride, dtype=dtype, device=device)
                for shape, stride, dtype, device in self.allocations
            ]
        for kernel, (template, at_operands, at_buffers) in self._plans:
            args = list(template)
            for position, role in at_operands:
                args[position] = operands[role]
            for position, index, view in at_buffers:
                buffer = buffers[index]
                args[position] = buffer if view is None else buffer.as_strided(*view)
            if kernel is None:  # the results
                return tuple(args)
            kernel(*args)
        raise AssertionError("unreachable: the results' plan comes last")


def _plan(slots: tuple[object, ...], allocations: tuple[Layout, ...]) -> _Plan:
    """``slots`` as (constants with placeholders, (position, role) of each operand, (position,
    buffer index, view or None where the slot is the whole buffer) of each buffer view)."""
    template, at_operands, at_buffers = [], [], []
    for position, slot in enumerate(slots):
        template.append(None if isinstance(slot, (_Operand, _Buffer)) else slot)
        if isinstance(slot, _Operand):
            at_operands.append((position, slot.role))
        elif isinstance(slot, _Buffer):
            whole = (slot.shape, slot.stride, slot.offset) == (*allocations[slot.index][:2], 0)
            view = None if whole else (slot.shape, slot.stride, slot.offset)
            at_buffers.append((position, slot.index, view))
    return tuple(template), tuple(at_operands), tuple(at_buffers)


class _Unreplayable(Exception):
    pass


def _result_slot(
    x: Tensor, operands: tuple[Tensor | None, ...], allocations: list[Tensor]
) -> _Operand | _Buffer:
    """:func:`_slot` of a tensor the call returns: an operand or a view of an allocation."""
    slot = _slot(x, operands, allocations)
    assert isinstance(slot, (_Operand, _Buffer))  # a tensor's slot is one or the other
    return slot


# attributes of objects that hold device memory or a stream without being a torch.Tensor
# (cute tensors and pointers, DLPack capsules' owners, CUDA streams)
_POINTER_ATTRIBUTES = (
    "data_ptr",
    "__dlpack__",
    "__cuda_stream__",
    "cuda_stream",
    "getPtr",
    "iterator",
)
# how deep _holds_pointer searches an argument's containers and fields; what lies deeper (or
# in a cycle) counts as holding a pointer: a slower launcher call, never a stale replay
_MAX_DEPTH = 4


def _holds_pointer(x: object, depth: int = 0) -> bool:
    """Whether a kernel argument other than a plain tensor carries a tensor, device memory or a
    stream anywhere in it: baked into a replay as a constant, it would point at the recorded
    call's memory (or stream) in every later call, and the check (same operands) agreed."""
    if isinstance(x, Tensor):
        return True
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, torch.dtype)):
        return False
    if depth > _MAX_DEPTH:  # not searched to the end (or a cycle): assume the worst
        return True
    if isinstance(x, (list, tuple, set, frozenset)):
        return any(_holds_pointer(y, depth + 1) for y in x)
    if isinstance(x, dict):
        return any(_holds_pointer(y, depth + 1) for y in x.values())
    # a partial's bound arguments and a bound method's object are state the call carries (the
    # checks below took them for plain callables)
    if isinstance(x, functools.partial):
        return _holds_pointer((x.func, x.args, x.keywords), depth + 1)
    if isinstance(x, (types.MethodType, types.BuiltinMethodType)):
        owner = x.__self__
        return not isinstance(owner, types.ModuleType) and _holds_pointer(owner, depth + 1)
    if isinstance(x, type) or (callable(x) and not hasattr(x, "__dict__")):
        return False
    if any(hasattr(x, name) for name in _POINTER_ATTRIBUTES):
        return True
    fields = getattr(x, "__dict__", None)
    return isinstance(fields, dict) and any(_holds_pointer(y, depth + 1) for y in fields.values())


def _slot(x: object, operands: tuple[Tensor | None, ...], allocations: list[Tensor]) -> object:
    if not isinstance(x, Tensor):
        if _holds_pointer(x):
            raise _Unreplayable(f"a {type(x).__name__} argument holding a tensor or pointer")
        return x
    for role, operand in enumerate(operands):
        if (
            operand is not None
            and x.data_ptr() == operand.data_ptr()
            and layout(x) == layout(operand)
        ):
            return _Operand(role)
    for index, buffer in enumerate(allocations):
        if x.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
            return _Buffer(index, tuple(x.shape), x.stride(), int(x.storage_offset()))
    raise _Unreplayable("a tensor that is neither an operand nor an allocation")


def record(
    launcher: Callable[[], Any],
    caches: Mapping[Any, str],
    operands: tuple[Tensor | None, ...],
    results: Callable[[Any], tuple[Tensor, ...]],
    accumulating: tuple[int, ...] = (),
) -> tuple[Any, Replay | None]:
    """Run ``launcher()`` once, noting the compiled launches it makes through the compile caches
    ``getattr(owner, name)`` for each ``owner, name`` in ``caches``; returns its result and the
    :class:`Replay` of it, or None where a replay would not do the same work (module docstring).
    ``results`` picks the tensors a replay must return from the launcher's result.
    ``accumulating``: the roles of operands the kernels add into (their contents before the
    call are kept, and put back before the check's replay and any second launch, so every
    path adds once)."""
    global last_refusal
    present = [x for x in operands if x is not None]
    if len({x.data_ptr() for x in present}) < len(present):  # roles would be ambiguous
        last_refusal = "aliased operands"
        return launcher(), None
    accumulated = [x for x in (operands[role] for role in accumulating) if x is not None]
    if not _copies_fit(accumulated):
        last_refusal = "its check's copies would not fit beside the call"
        return launcher(), None
    before = [(x, x.clone()) for x in accumulated]

    def put_back() -> None:
        for x, saved in before:
            x.copy_(saved)

    launches: list[_Launch] = []
    originals = {(owner, name): getattr(owner, name) for owner, name in caches.items()}
    watch = _Watch()
    try:
        for (owner, name), cache in originals.items():
            setattr(owner, name, _RecordingCache(cache, launches, watch))
        with watch:
            result = launcher()
    finally:
        for (owner, name), cache in originals.items():
            setattr(owner, name, cache)
    if watch.other_ops or not launches:
        last_refusal = f"launcher ops {sorted(set(watch.other_ops))}" if launches else "no launch"
        return result, None
    try:
        slotted = []
        for kernel, args, kwargs in launches:
            if kwargs:
                raise _Unreplayable("keyword arguments to a kernel")
            slotted.append((kernel, tuple(_slot(a, operands, watch.allocations) for a in args)))
        replay = Replay(
            allocations=tuple(layout(x) for x in watch.allocations),
            launches=tuple(slotted),
            results=tuple(_result_slot(x, operands, watch.allocations) for x in results(result)),
        )
    except _Unreplayable as exc:
        last_refusal = str(exc)
        return result, None

    # a launch that bypassed the compile caches would be missing from the replay. So the replay
    # runs once on the same operands, into the launcher's own buffers (no memory beyond the
    # call's: a block may be the whole [b, n, h, d] tensor), its results poisoned with NaN
    # first, and is held to the launcher's results (equal up to the kernels' own
    # nondeterminism, e.g. atomically added gradients) through small per-row statistics
    # What the launch added, for a result it accumulates into: a missing addition is then the
    # whole difference, not a fraction of the operand's earlier sums within the tolerance
    def added(x: Tensor) -> Tensor:
        for operand, saved in before:
            if x.data_ptr() == operand.data_ptr() and x.shape == operand.shape:
                return x - saved  # (the clone: the operand's shape, its own strides)
        return x

    wanted = [_row_stats(added(x)) for x in results(result)]
    for x in (*results(result), *watch.allocations):
        # the allocations too (the check replays into them): a workspace written by a launch
        # that bypassed the caches still held its values, where later replays' fresh ones
        # hold none
        if x.is_floating_point():
            x.fill_(float("nan"))
    put_back()
    got = [_row_stats(added(x)) for x in replay(operands, watch.allocations)]
    if not all(_agree(g, w) for g, w in zip(got, wanted, strict=True)):
        warnings.warn(
            "a replay of the kernel launcher's recorded call disagreed with the launcher's "
            "result; these operands keep calling the launcher",
            RuntimeWarning,
            stacklevel=3,
        )
        last_refusal = "disagreed with the launcher"
        put_back()
        return launcher(), None  # the poisoned results written again
    return result, replay


def _copies_fit(accumulated: list[Tensor]) -> bool:
    """Whether the check's copies of the operands a launch adds into (and one difference at a
    time) take at most half of what their CUDA device has spare, the rest left to the launch's
    own workspace. Where not, the signature keeps calling the launcher: a block that large
    takes milliseconds, beside which the launcher's host time is nothing, while its copies
    would be three gradient blocks more (at 2M tokens on an 80 GB H100, copies like these in
    fa4_add's check ran lse's first forward+backward out of memory, h200_perf.md step 70).
    Spare: free on the device plus what PyTorch's cache holds unused (:func:`_spare_bytes`)."""
    if not accumulated:
        return True
    spare = _spare_bytes(accumulated[0].device)
    sizes = [x.numel() * x.element_size() for x in accumulated]
    return spare is None or 2 * (sum(sizes) + max(sizes)) <= spare


def _spare_bytes(device: torch.device) -> int | None:
    """Bytes ``device`` can still allocate: free on it plus what PyTorch's cache holds unused
    (None, no bound, off CUDA)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _row_stats(x: Tensor) -> Tensor:
    """Sum and norm of each row of the last dim, in float32 without a float32 copy of ``x``."""
    if x.dim() == 0:
        x = x.reshape(1)
    return torch.stack(
        (x.sum(-1, dtype=torch.float32), torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32))
    )


def _agree(got: Tensor, want: Tensor) -> bool:
    bound = 1e-2 * torch.linalg.vector_norm(want) + 1e-6
    return bool(torch.linalg.vector_norm(got - want) <= bound)  # False for NaN
