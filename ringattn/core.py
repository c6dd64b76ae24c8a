"""The compiled core: blocks → communicator → computer → LSE merge, and its backward.

Everything in this module is tensor code over a static :class:`CoreSpec`; it is what
``torch.compile(fullgraph=True)`` captures. No validation, no caches, no Python-side decisions that
depend on tensor values happen here (see ``docs/architecture.md``).

Forward: for every block (one config, one row offset, its heads; full segments or the tail) the
computer returns ``(out_i, lse_i)`` for the block's rows, which are merged into the accumulators
``[b, n, h, d]`` (q's dtype) / ``[b, n, h]`` (float32) in place, through strided views:
``lse = logaddexp(lse, lse_i)``, and ``acc`` the average of ``acc`` and ``out_i`` weighted by
``exp(lse_old - top)`` and ``exp(lse_i - top)`` (``top`` the larger LSE), normalised by their sum
— not by ``exp(· - lse)``, whose rounded ``lse`` leaves weights summing to 1 only within
ulp(|lse|) (:func:`ringattn.merge.merge_into_`; one Triton kernel per block on CUDA). A first
block that covers every row and head (a config with ``r = 1`` under ``mixing="lse"``) *becomes*
the accumulator; ``head_groups`` blocks are disjoint and copied, not merged.

Backward: every block's kernel backward is called with the *merged* output and LSE of its rows.
Because the merged result is one softmax over the union of the configs' keys (each counted as
often as configs let the query see it), ``P = exp(s - lse_merged)`` is exactly that softmax and the
per-block backwards sum to the exact gradient (the ring-attention identity).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import secrets
import threading
import weakref
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils import flop_counter
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode_stack

from ringattn import distributed
from ringattn.capture import capturing, compiling, graphs_compiling, pool_allocating
from ringattn.communicators.base import Communicator
from ringattn.computers.base import (
    AttentionComputer,
    BackwardGroup,
    BlockComputer,
    ForwardGroup,
    LayoutComputer,
    accumulation_dtype,
    place_,
)
from ringattn.dilation.base import DilationProcessor
from ringattn.flops import FORWARD_BACKWARD_FACTOR, useful_flops
from ringattn.kernels import add as add_kernel
from ringattn.kernels import dpsum as dpsum_kernel
from ringattn.kernels.unselected import fill_unselected_, shifted
from ringattn.lanes import Lanes
from ringattn.launches import Prepared, gather, layouts_of, packed, prepared, views
from ringattn.memory.base import MemoryManager
from ringattn.merge import merge_into_
from ringattn.pattern import Block, Geometry, Plan

if TYPE_CHECKING:
    from ringattn.launches import Launches, PreparedKey

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class CoreSpec:
    plan: Plan
    causal: bool
    scale: float
    dilation: DilationProcessor
    computer: AttentionComputer
    communicator: Communicator
    # Scratch-buffer owner in eager mode; under torch.compile a NoReuse manager (Inductor plans
    # temporaries itself).
    memory: MemoryManager
    # spans[i]: how many ranks config i's segments span (all 1 on one device)
    spans: tuple[int, ...] = ()
    # the number of the module that made it (``register_module``) as a CPU int64 scalar tensor:
    # the opaque custom ops (they take tensors and ints only) ask that module for the spec of
    # the shapes they see. A tensor, not an int: Dynamo makes an int attribute of a module a
    # constant of the graph, guarded, so identical layers compiled one by one (regional
    # compilation) recompiled for each and the ninth hit the recompile limit; a tensor is a
    # graph input. On CUDA a copy there (``device_tag``). None: a spec of no module (tests),
    # traced inline.
    module: Tensor | None = field(default=None, compare=False)
    # eager only: the placed blocks' prepared launches per tensor layouts (ringattn.launches)
    launches: dict[PreparedKey, Prepared] = field(default_factory=dict, compare=False, repr=False)

    @property
    def block_computer(self) -> BlockComputer:
        """:attr:`computer` on the block paths (the core runs a layout computer elsewhere)."""
        return cast(BlockComputer, self.computer)


# modules by a number given in their __init__, weakly (a module lives as long as its user keeps it)
_MODULES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# numbers start at a random multiple of 2**24 per process: a graph saved with its module's number
# (torch.export) and loaded in another process then finds no module there and says so, where
# counting from 0 in each process had it run that process's module of the same number: another
# config, silently
_NUMBERS = itertools.count(secrets.randbits(38) << 24)


def register_module(module: Any) -> Tensor:
    """A number for ``module`` (a CPU int64 scalar tensor, see ``CoreSpec.module``), whose
    ``eager_spec(q)`` the opaque ops call for their spec. On the CPU whatever the default device:
    made under ``torch.device("meta")`` (a model built there, then ``to_empty``) it stayed on
    meta, and the ops then ran their fake kernels (uninitialised outputs, no error). And a real
    tensor whatever the modes: a functional-form module made inside a non-strict
    ``torch.export`` (its FakeTensorMode) got a fake number, which a later strict export baked
    into its graph: that program returned FakeTensors, silently."""
    number = next(_NUMBERS)
    _MODULES[number] = module
    with _disable_current_modes():
        tag = torch.tensor(number, dtype=torch.int64, device="cpu")
    # a static input of the graphs that take it, unguarded (no recompile per module): CUDA-graph
    # trees copy each non-static input into their memory pool and hold it there, which a CPU
    # tensor never is (h200_perf.md step 62: "storage data ptrs are not allocated in pool")
    torch._dynamo.mark_static_address(tag, guard=False)
    return tag


# CUDA tags (``device_tag``) by (device, address): what they hold, read without a sync
_DEVICE_TAGS: dict[tuple[torch.device, int], int] = {}


def device_tag(tag: Tensor, device: torch.device) -> Tensor:
    """``tag`` (``register_module``'s) for the graphs of calls on ``device``: itself, except on
    CUDA, where a copy there. A forward graph returns each input its backward reads, the tag
    too, and CUDA-graph trees refuse a CPU tensor among a graph's outputs ("Expected all cuda
    outputs in cuda graph recording", h200_perf.md step 63). The ops find a CUDA tag's number
    by its address (``_module_number``): reading its value would sync, which a capture refuses.
    Made eagerly, once per device (``DilatedAttention._device_tag``: its eager calls, ``.to``
    and a build under ``torch.device("cuda")``), never in a trace (which cannot) nor while a
    graph's pool takes allocations (it would be the pool's, kept: ``ringattn.capture``)."""
    if device.type != "cuda":
        return tag
    with _disable_current_modes():
        on_device = tag.to(device)
    key = (on_device.device, on_device.data_ptr())
    _DEVICE_TAGS[key] = int(tag)
    weakref.finalize(on_device, _DEVICE_TAGS.pop, key, None)
    torch._dynamo.mark_static_address(on_device, guard=False)
    return on_device


def _module_number(module_tag: Tensor) -> int:
    if module_tag.device.type != "cuda":
        return int(module_tag)
    number = _DEVICE_TAGS.get((module_tag.device, module_tag.data_ptr()))
    if number is not None:
        return number
    if capturing():
        raise RuntimeError(
            "ringattn: a CUDA graph capture passed the attention op a copy of its module's tag "
            "(a graph input that must stay where the module made it, marked static); capture "
            "the module's calls themselves (torch.cuda.graph) or compile with "
            "compile_mode='reduce-overhead' on the module"
        )
    return int(module_tag)  # a copy (an exported program's constant, say): its value, synced


def _spec(module_tag: Tensor, q: Tensor) -> CoreSpec:
    """The spec an eager call of the module would use for ``q``'s shape (found, or made: a model
    compiled before any eager call reaches its first call here)."""
    module_number = _module_number(module_tag)
    module = _MODULES.get(module_number)
    if module is None:
        raise RuntimeError(
            f"ringattn: the attention module #{module_number} that this compiled call belongs "
            "to is gone (a compiled graph names its module but does not keep it alive): keep "
            "a DilatedAttention module for as long as its compiled calls and their backward run. "
            "A graph exported (torch.export) and loaded in another process has no module "
            "there: export runs in the process that made the module"
        )
    spec: CoreSpec = module.eager_spec(q)
    return spec


def _index(
    indices: tuple[Tensor, ...], i: int, block: Block | None = None, part: Block | None = None
) -> Tensor | None:
    """Block ``i``'s gather index (global dilation), or the slice of it that ``part`` reads: the
    index is segment-major, so a part's segments are one contiguous run of it."""
    if not indices:
        return None
    if part is None or block is None:
        return indices[i]
    first = (part.start - block.start) // part.job.w * part.length
    return indices[i][first : first + part.segments * part.length]


def flat_view(rows: Tensor) -> Tensor | None:
    """Block rows ``[b, S, L, ...]`` as the ``[b * S, L, ...]`` the kernels take, as a *view* (so
    writes land in the tensor the rows belong to), or None where merging the dims would copy
    (``b > 1`` and a part of the segments)."""
    if rows.shape[0] == 1 or rows.shape[1] == 1 or rows.stride(0) == rows.shape[1] * rows.stride(1):
        return rows.flatten(0, 1)
    return None


def covers_everything(block: Block, n: int, h: int) -> bool:
    """Whether ``block`` holds every (row, head) of ``[b, n, h, ...]`` in plain order.

    Then its ``[b * S, w, h, d]`` output *is* ``[b, n, h, d]`` (a reshape, free for the kernels'
    contiguous outputs) and can become the accumulator: no zero fill, no first merge.
    """
    job = block.job
    return (
        not block.tail
        and job.r == 1
        and block.segments * block.length == n
        and (job.head_start, job.head_stop, job.head_step) == (0, h, 1)
    )


def whole_first_block(spec: CoreSpec, q: Tensor, indices: tuple[Tensor, ...]) -> bool:
    """Whether the forward runs a first block that covers every row and head
    (:func:`covers_everything`) as one call whose output becomes the accumulator. Where the plan
    cuts it (``plan.parts``), only if the whole call holds no block-sized temporary beyond that
    output: the dilation reads its rows as views (no gather: ``global`` copied q, k and v whole,
    3x the output) and the computer's kernel tiles them
    (:meth:`~ringattn.computers.base.BlockComputer.whole_covering_forward`; ``math``'s scores were
    ``w`` times the output). Otherwise its parts are merged into a zeroed accumulator, as the
    other blocks' are: the parts bound the call's temporaries (``pattern.BLOCK_SPLIT``)."""
    blocks = spec.plan.blocks
    if not (blocks and covers_everything(blocks[0], q.shape[1], q.shape[2])):
        return False
    if len(spec.plan.parts[0]) == 1:
        return True
    return not indices and spec.block_computer.whole_covering_forward(q)


def for_each_block(
    spec: CoreSpec,
    device: torch.device,
    first: int,
    run: Callable[[int], None],
    backward: bool = False,
    done: frozenset[int] = frozenset(),
) -> None:
    """``run(i)`` for blocks ``first..`` except those ``done``; a disjoint plan's configs on
    concurrent streams where :class:`ringattn.lanes.Lanes` allows (blocks whose segments stay on
    this device, unless ``lanes.SPANNING``); ``backward``: the call is a backward
    (``lanes.MODE = "forward"``)."""
    blocks = spec.plan.blocks
    ids = [i for i in range(first, len(blocks)) if i not in done]
    if not ids:  # (no fan-out to pay for)
        return
    with Lanes(device, spec.plan.disjoint, backward) as fan:
        for i in ids:
            config = blocks[i].job.config
            with fan.lane(config, i, local=spec.spans[config] == 1):
                run(i)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype a user's autocast casts to on ``device_type``, or None where it is off. Meta
    tensors are never under autocast (``torch.is_autocast_enabled('meta')`` raises)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def input_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off inside the core: every strategy computes in its inputs' dtype. Under a user's
    autocast the math computer's einsums ran in bf16 while sdpa's aten calls stayed in float32
    (the same call, two functions)."""
    if autocast_dtype(device.type) is not None:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def in_input_precision(
    fn: Callable[Concatenate[CoreSpec, Tensor, P], R],
) -> Callable[Concatenate[CoreSpec, Tensor, P], R]:
    """``fn(spec, first_tensor, ...)`` run under :func:`input_precision`."""

    @functools.wraps(fn)
    def run(spec: CoreSpec, first: Tensor, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with input_precision(first.device):
            return fn(spec, first, *args, **kwargs)

    return run


# where kernel_aligned copies misaligned inputs besides CUDA (the CPU kernels read any layout)
ALIGNED_DEVICE_TYPES: tuple[str, ...] = ()


def kernel_aligned(x: Tensor) -> Tensor:
    """``x`` as CUDA's attention kernels can read it: its start and every stride a multiple of
    16 bytes, else a contiguous copy in new memory. cuDNN and FA4 read rows in 16-byte vectors and
    assume that alignment without checking it: on an H200, cuDNN's output for the last 40 of 44
    head dims (``x[..., 4:]``, fp16: rows starting 8 bytes into a vector) came out 1.4 off
    (relative), silently (experiments/gpu_fuzz.py). Head dims whose rows are not whole vectors
    are left as they are: the computer pads those (a copy either way). Host cost on an aligned
    input: a few microseconds (called for q, k, v, and dout, on every call)."""
    if not (x.is_cuda or x.device.type in ALIGNED_DEVICE_TYPES) or compiling():
        return x
    size = x.element_size()
    row_bytes = x.shape[-1] * size
    if row_bytes % 16:
        return x
    if (
        x.data_ptr() % 16 == 0
        and (
            x.is_contiguous()  # (every stride a multiple of row_bytes: the common case, fast)
            or all(s * size % 16 == 0 for s, m in zip(x.stride()[:-1], x.shape[:-1]) if m > 1)
        )
    ):
        return x
    return x.clone(memory_format=torch.contiguous_format)


@in_input_precision
def dilated_forward(
    spec: CoreSpec, q: Tensor, k: Tensor, v: Tensor, indices: tuple[Tensor, ...], keep_lse: bool
) -> tuple[Tensor, Tensor]:
    """Merged output ``[b, n, h, d]`` (q's dtype) and LSE ``[b, n, h]`` (accumulation dtype).

    The output accumulates in q's own dtype: each merge forms its weighted sum in float32 (or
    float64) and rounds once, so a bf16 result carries at most one rounding per config, and no
    float32 copy of the output (2x its size) is ever held.
    """
    b, n, h, d = q.shape
    stats_dtype = accumulation_dtype(q.dtype)
    blocks = spec.plan.blocks
    q, k, v = kernel_aligned(q), kernel_aligned(k), kernel_aligned(v)

    def inputs(block: Block, index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        read = spec.dilation.read
        return read(q, block, index), read(k, block, index), read(v, block, index)

    def attend(block: Block, index: Tensor | None) -> tuple[Tensor, Tensor]:
        return spec.communicator.attend(
            spec.block_computer,
            *inputs(block, index),
            spec.causal,
            spec.scale,
            spec.spans[block.job.config],
        )

    # disjoint blocks are placed, not merged: without a caller for the LSE it is never written
    write_lse = keep_lse or not spec.plan.disjoint
    first = 0
    if whole_first_block(spec, q, indices):
        out_block, lse_block = attend(blocks[0], _index(indices, 0))
        out_acc = out_block.reshape(b, n, h, d).to(q.dtype)
        lse_acc = lse_block.reshape(b, n, h).to(stats_dtype)
        first = 1
    else:
        # zeros go where no block writes, once the launches say which rows theirs cover (below)
        out_acc = torch.empty_like(q, memory_format=torch.contiguous_format)
        if keep_lse and spec.plan.disjoint:
            # placed blocks write their rows' LSE and the backward reads only those rows: the
            # rows no config selects are never read, so they need no -inf (one fill less)
            lse_acc = torch.empty((b, n, h), dtype=stats_dtype, device=q.device)
        elif keep_lse:
            lse_acc = torch.full((b, n, h), float("-inf"), dtype=stats_dtype, device=q.device)
        else:  # the LSE does not escape: it may come from the pool
            lse_acc = spec.memory.scratch("lse_acc", (b, n, h), stats_dtype, q.device)
            if write_lse:
                lse_acc.fill_(float("-inf"))

    tensors = (q, k, v, out_acc, lse_acc if write_lse else None)
    launches = prepared(
        spec,
        "forward",
        tensors[:3],
        tensors[3:],
        range(first, len(blocks)),
        (lambda span, part, *views: placing_launch(spec, part, *views))
        if spec.plan.disjoint
        else (lambda span, part, *views: merging_launch(spec, span, *views)),
        placed=spec.plan.disjoint,
        split=1 if spec.plan.disjoint and spec.block_computer.places_whole_blocks(q) else None,
    )
    if first == 0:
        # all of it unless the plan is disjoint; then the rows no block selects, one kernel,
        # except for configs whose launches write their own zeros (placing_launch)
        derived = launches.derived  # (the selection depends on the preparation only)
        if "fill" not in derived:
            derived["fill"] = unzeroed_selection(spec.plan, zeroing_blocks(launches))
        fill_unselected_(out_acc, derived["fill"], spec.memory)

    # head_groups: the parts of every config that share one segment length as one launch where
    # the computer has it (FA4: one kernel over all their tiles); declined, they go one by one
    grouped: frozenset[tuple[int, int]] = frozenset()
    done: frozenset[int] = frozenset()  # blocks whose every part went in that launch
    if spec.plan.disjoint and launches:
        derived = launches.derived
        if "group" not in derived:
            derived["group"] = grouped_launch(spec, launches, tensors)
        if derived["group"] is not None:
            pairs, blocks_done, geometries, launch = derived["group"]
            if launch([tuple(views(tensors, geometry)) for geometry in geometries]):
                grouped, done = pairs, blocks_done

    def forward_blocks(i: int) -> None:
        if i in launches:
            for j, (geometry, launch) in enumerate(launches[i]):
                if (i, j) not in grouped:
                    launch(*views(tensors, geometry))
            return
        for block in spec.plan.parts[i]:
            index = _index(indices, i, blocks[i], block)
            out_rows, lse_rows = block.rows(out_acc), block.rows(lse_acc)
            out_flat = flat_view(out_rows) if spec.plan.disjoint else None
            if out_flat is not None:  # placed straight into its rows (in place where it can be)
                spec.communicator.attend_into(
                    spec.block_computer,
                    *inputs(block, index),
                    spec.causal,
                    spec.scale,
                    spec.spans[block.job.config],
                    out_flat,
                    flat_view(lse_rows) if write_lse else None,
                )
            elif spec.plan.disjoint:
                out_block, lse_block = attend(block, index)
                lead = (b, block.segments)
                place_(
                    out_rows,
                    lse_rows if write_lse else None,
                    (out_block.unflatten(0, lead), lse_block.unflatten(0, lead)),
                )
            else:
                merge_result_(out_rows, lse_rows, attend(block, index))

    for_each_block(spec, q.device, first, forward_blocks, done=done)
    return out_acc, lse_acc


def grouped_launch(
    spec: CoreSpec, launches: Prepared, tensors: tuple[Tensor | None, ...]
) -> (
    tuple[
        frozenset[tuple[int, int]],
        frozenset[int],
        tuple[tuple[Geometry | None, ...], ...],
        Callable[[list[ForwardGroup]], bool],
    ]
    | None
):
    """One launch for the placed parts (:func:`placing_launch`) that share the most common
    segment length, where there are two or more and the computer has a kernel for them
    (``BlockComputer.grouped_launcher``): ``(their (block, part) pairs, the blocks all of whose
    parts are among them, their geometries, launch(views of each))``, the launch returning False
    where it declined (nothing to count on: the parts then go one by one). None where there is
    no such launch. Each part's zeros are the ones its own launch writes (``group_shifts``), so
    the fill's selection holds either way."""
    by_length: dict[int, list[tuple[int, int, tuple[Geometry | None, ...], tuple[int, ...]]]] = {}
    for i, parts in launches.items():
        for j, (geometry, part_launch) in enumerate(parts):
            shifts = getattr(part_launch, "group_shifts", None)
            if shifts is not None:  # (geometry[0]: q's view [B, L, H, d])
                length = cast(Geometry, geometry[0])[0][1]  # (a read's view: never None)
                by_length.setdefault(length, []).append((i, j, geometry, shifts))
    members = max(by_length.values(), key=len, default=[])
    if len(members) < 2:
        return None
    geometries = tuple(geometry for _, _, geometry, _ in members)
    # (q, k, v and out are always viewed; the LSE where written)
    examples = cast(
        list[ForwardGroup], [tuple(views(tensors, geometry)) for geometry in geometries]
    )
    shifts = [member[3] for member in members]
    launch = spec.block_computer.grouped_launcher(spec.causal, spec.scale, examples, shifts)
    if launch is None:
        return None
    pairs = frozenset((i, j) for i, j, _, _ in members)
    done = frozenset(i for i in launches if all((i, j) in pairs for j in range(len(launches[i]))))
    return pairs, done, geometries, launch


# the A/B of launches.packed for the backward's LSE (experiments/overheads.py --pack-lse): one
# gather per call, or a copy per launch (in ringattn.kernels.fa4.backward)
PACK_LSE = True
# the A/B of each row's dPsum formed once per backward for every launch that reads it (lse;
# BlockComputer.shares_backward_dpsum), or by each launch: used where the launches read at least
# this many times the rows the shared sums read (their O and dO once over)
SHARE_DPSUM = True
DPSUM_SHARED_FROM = 1.25


@in_input_precision
def dilated_backward(
    spec: CoreSpec,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    indices: tuple[Tensor, ...],
    stack_grads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients in q's dtype, accumulated like the forward's output (one rounding per config).
    ``stack_grads``: where they start as zeros, they may be views of one buffer."""
    b, n, h, d = q.shape
    blocks = spec.plan.blocks
    # dout and out in q's usual layout, so their block views can go to the kernels as they are
    dout, out = kernel_aligned(dout.contiguous()), out.contiguous()
    q, k, v = kernel_aligned(q), kernel_aligned(k), kernel_aligned(v)

    def backward_inputs(
        block: Block, index: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        read = spec.dilation.read
        return (
            read(dout, block, index),
            read(q, block, index),
            read(k, block, index),
            read(v, block, index),
            read(out, block, index),
            read(lse, block, index),
        )

    def attend_backward(block: Block, index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return spec.communicator.attend_backward(
            spec.block_computer,
            *backward_inputs(block, index),
            spec.causal,
            spec.scale,
            spec.spans[block.job.config],
        )

    first = 0
    covering = bool(blocks) and covers_everything(blocks[0], n, h)
    to_fill: tuple[Tensor, ...] = ()
    if covering and len(spec.plan.parts[0]) == 1:
        grads = [
            g.reshape(b, n, h, d).to(q.dtype)
            for g in attend_backward(blocks[0], _index(indices, 0))
        ]
        first = 1
    elif covering:  # every (row, head) is written once by the first block's parts: no zero fill
        grads = [torch.empty_like(q) for _ in range(3)]
    else:
        # one buffer and one fill for the three, unless they go to a caller that forbids
        # aliased results (the custom op: torch.library's outputs may not share storage); the
        # fill waits for the launches below, which may write some of its zeros themselves
        to_fill = new_grads(q, 3 if stack_grads else 1, 1 if stack_grads else 3)
        grads = [g for buffer in to_fill for g in buffer.unbind(0)]

    tensors = (dout, q, k, v, out, lse, *grads)
    layouts = layouts_of(tensors)  # (one key for the preparations below)
    # head_groups: every (row, head) belongs to one block, so its gradients are placed; under lse
    # only the parts of a covering first block are, the others add into the gradients
    placed_ids = [
        i for i in range(first, len(blocks)) if spec.plan.disjoint or (covering and i == 0)
    ]
    placed_launches = prepared(
        spec,
        "backward",
        tensors[:6],
        tensors[6:],
        placed_ids,
        lambda span, part, *views: spec.block_computer.backward_launcher(
            spec.causal, spec.scale, *views
        ),
        placed=True,
        split=spec.block_computer.placed_backward_split(q),
        layouts=layouts,
    )
    # head_groups: the placed blocks of the most common segment length as one launch where the
    # computer has it (FA4: one backward over all their key tiles, up to a size); declined, they
    # go one by one. Not while a CUDA graph is captured: the one launch saves host time, which
    # replays do not spend, and replayed it was 2-3% slower than the configs' kernels on lanes
    # (h200_perf.md step 33); nor in a cudagraph tree's warm-up, which would find it kept with
    # its packed LSE index, a tensor of the tree's pool (ringattn.capture)
    grouped: frozenset[int] = frozenset()
    group = None
    if spec.plan.disjoint and placed_launches and not pool_allocating(lse):
        whole = prepared(
            spec,
            "backward",
            tensors[:6],
            tensors[6:],
            placed_ids,
            lambda span, part, *views: spec.block_computer.backward_launcher(
                spec.causal, spec.scale, *views
            ),
            placed=True,
            split=1,
            layouts=layouts,
        )
        if "group" not in whole.derived:
            whole.derived["group"] = grouped_backward_launch(spec, whole, tensors)
        group = whole.derived["group"]
    # the zeros no launch writes (a grouped launch writes its configs' own, declined or not);
    # before the grouped launch, so the GPU starts on them while the host goes on
    fill = spec.plan.selection if group is None or group.fill is None else group.fill
    for buffer in to_fill:
        fill_unselected_(buffer.flatten(0, 1), fill, spec.memory)
    if group is not None:
        geometries = group.geometries

        def groups_of(full: bool) -> list[tuple[Tensor | None, ...]]:
            # (without out and lse unless asked: the kernels read those whole, ten views fewer
            # per call; tuples, as fa4_group_bwd.Group says)
            return [tuple(views(tensors, g)) for g in geometries[0 if full else 1]]

        if group.launch(groups_of, dout, out, lse, group.unit_index):
            grouped = group.blocks
        elif group.fill is not None:  # declined: the zeros it would have written
            for geometry, shifts in zip(geometries[0], geometries[2], strict=True):
                for grad in views(tensors, geometry)[6:]:
                    for shift in shifts:
                        shifted(cast(Tensor, grad), shift).zero_()  # (a gradient: never None)
    adding_launches = prepared(
        spec,
        "backward",
        tensors[:6],
        tensors[6:],
        (i for i in range(first, len(blocks)) if i not in placed_ids),
        lambda span, part, *views: adding_launch(spec, span, *views),
        placed=False,
        layouts=layouts,
    )
    # the placed launches' LSE rows gathered into one buffer in the layout the computer reads
    # (launches.packed), where it would copy each launch's: one kernel instead of one per launch.
    # Where the computer takes each row's dPsum as given (lse: every config's launches read the
    # merged out, so the same sums), the adding launches' too, and the sums formed once for
    # every row and gathered with the same index (ringattn.kernels.dpsum), where the launches
    # read enough rows over for that to pay
    packed_tensors, repacked = tensors, Prepared()
    computer = spec.block_computer
    sharing = SHARE_DPSUM and not spec.plan.disjoint and computer.shares_backward_dpsum(q)
    if (
        PACK_LSE
        and computer.packs_backward_lse(q)
        and (any(i not in grouped for i in placed_launches) or (sharing and adding_launches))
    ):
        source = adding_launches if sharing else placed_launches
        pack = source.derived.get(("lse", sharing))
        if pack is None:
            members = Prepared()
            members.update(placed_launches)
            if sharing:  # (not a segment spanning ranks: its communicator forms its own sums)
                members.update(
                    (i, parts)
                    for i, parts in adding_launches.items()
                    if spec.spans[blocks[i].job.config] == 1
                )
            pack = packed(members, 5, lse, twin=sharing)
            if not pool_allocating(lse):  # (ringattn.capture: kept, it would be wrong)
                source.derived[("lse", sharing)] = pack
        index, span, repacked = pack
        minus_dpsum = None
        if sharing and index.numel() >= DPSUM_SHARED_FROM * lse.numel():
            minus_dpsum = dpsum_kernel.minus_dpsum(out, dout, lse)
        packed_tensors = (*tensors[:5], gather(lse, index, span), *tensors[6:])
        if minus_dpsum is not None:  # (else the launches' tenth geometry goes unread)
            packed_tensors = (*packed_tensors, gather(minus_dpsum, index, span))
        del minus_dpsum  # (its gathered rows are what the launches read)
    # (the packed launches again, reading the gathered LSE)
    launches = {**placed_launches, **adding_launches, **repacked}

    def backward_blocks(i: int) -> None:
        if i in launches:
            operands = packed_tensors if i in repacked else tensors
            for geometry, launch in launches[i]:
                launch(*views(operands, geometry))
            return
        place = i in placed_ids
        for block in spec.plan.parts[i]:
            index = _index(indices, i, blocks[i], block)
            grad_rows = [block.rows(grad) for grad in grads]
            # (the three gradients share one layout: one view check decides for all)
            if place and flat_view(grad_rows[0]) is not None:
                spec.communicator.attend_backward_into(
                    spec.block_computer,
                    *backward_inputs(block, index),
                    spec.causal,
                    spec.scale,
                    spec.spans[block.job.config],
                    cast(tuple[Tensor, Tensor, Tensor], tuple(map(flat_view, grad_rows))),
                )
            else:
                accumulate_(grad_rows, attend_backward(block, index), place)

    for_each_block(spec, q.device, first, backward_blocks, backward=True, done=grouped)
    dq, dk, dv = grads
    return dq, dk, dv


class GroupedBackward(NamedTuple):
    """:func:`grouped_backward_launch`'s result."""

    blocks: frozenset[int]  # the plan's blocks the launch takes
    # their geometries with and without out and lse, and each block's neighbour shifts
    geometries: tuple[
        tuple[tuple[Geometry | None, ...], ...],
        tuple[tuple[Geometry | None, ...], ...],
        tuple[tuple[int, ...], ...],
    ]
    unit_index: Tensor  # their units' LSE positions (launches.packed's index)
    launch: Callable[..., bool]
    # the gradients' fill selection once the launch writes those blocks' zeros (None: the fill
    # does them all)
    fill: tuple[tuple[int, ...], tuple[int, ...]] | None


def grouped_backward_launch(
    spec: CoreSpec, whole: Prepared, tensors: tuple[Tensor | None, ...]
) -> GroupedBackward | None:
    """One backward launch for the placed blocks (launched whole: ``whole``, one part each)
    that share the most common segment length, where there are two or more and the computer
    has a kernel for them (``BlockComputer.grouped_backward_launcher``, its workspaces from the
    memory manager): ``(those blocks, their geometries (with and without out and lse, and each
    block's neighbour shifts), their units' LSE positions (launches.packed's index), launch,
    the gradients' fill selection once the launch writes those blocks' zeros)``; None where
    there is no such launch. The launch writes each block's zeros (:func:`neighbour_shifts` of
    its gradients' rows) where the computer's kernel does (``zeroes_unselected`` on the
    launcher); the last item is then the plan's selection less the configs all of whose blocks
    it takes (:func:`unzeroed_selection`), else None (the fill does them all)."""
    by_length: dict[int, list[tuple[int, Launches]]] = {}
    for i, parts in whole.items():
        if len(parts) == 1:
            q_rows = cast(Geometry, parts[0][0][1])  # (a read's view: never None)
            by_length.setdefault(q_rows[0][1], []).append((i, parts))  # q: [B, L, H, d]
    members = max(by_length.values(), key=len, default=[])
    if len(members) < 2:
        return None
    geometries = tuple(parts[0][0] for _, parts in members)
    # (launched whole: every operand viewed)
    examples = cast(
        list[BackwardGroup], [tuple(views(tensors, geometry)) for geometry in geometries]
    )
    device = examples[0][1].device

    memory = spec.memory  # (not the spec: it keeps this launch)

    def scratch(tag: str, shape: tuple[int, ...]) -> Tensor:
        return memory.scratch(tag, shape, torch.float32, device)

    # (the three gradients' rows share one layout: their shifts are dq's)
    same = all(x[6].stride() == x[7].stride() == x[8].stride() for x in examples)
    shifts = tuple(
        neighbour_shifts(spec.plan.blocks[i], x[6]) if same else ()
        for (i, _), x in zip(members, examples, strict=True)
    )
    launch = spec.block_computer.grouped_backward_launcher(
        spec.causal, spec.scale, examples, scratch, shifts
    )
    if launch is None:
        return None
    subset = Prepared()
    subset.update(members)
    unit_index = packed(subset, 5, cast(Tensor, tensors[5]))[0]  # (the LSE)
    slim = tuple((*g[:4], None, None, *g[6:]) for g in geometries)
    zeroed = None
    if getattr(launch, "zeroes_unselected", False):  # (r = 1: no rows to zero)
        writes = {i for (i, _), s in zip(members, shifts) if s or spec.plan.blocks[i].job.r == 1}
        zeroed = unzeroed_selection(spec.plan, writes)
    blocks_done = frozenset(i for i, _ in members)
    return GroupedBackward(blocks_done, (geometries, slim, shifts), unit_index, launch, zeroed)


def new_grads(q: Tensor, count: int, buffers: int) -> tuple[Tensor, ...]:
    """``buffers`` new buffers ``[count, *q.shape]`` (contiguous, q's dtype) for the gradients,
    not yet filled (their zeros come from the fill and the launches that write their own)."""
    return tuple(
        torch.empty((count, *q.shape), dtype=q.dtype, device=q.device) for _ in range(buffers)
    )


def merge_result_(out_rows: Tensor, lse_rows: Tensor, result: tuple[Tensor, Tensor]) -> None:
    """Merge a block's ``(out [b * S, L, H, d], lse [b * S, L, H])`` into its rows
    ``[b, S, L, H, ...]`` of the accumulators."""
    lead = out_rows.shape[:2]
    merge_into_(out_rows, lse_rows, result[0].unflatten(0, lead), result[1].unflatten(0, lead))


def accumulate_(grad_rows: list[Tensor], result: tuple[Tensor, ...], place: bool) -> None:
    """A block's ``(dq, dk, dv)`` (``[b * S, L, H, d]``) copied (``place``) or added into its
    rows ``[b, S, L, H, d]`` of the gradients."""
    parts = [grad_block.unflatten(0, rows.shape[:2]) for rows, grad_block in zip(grad_rows, result)]
    if place:
        for rows, part in zip(grad_rows, parts):
            rows.copy_(part)
        return
    # one Triton launch for the three adds where it runs (torch's strided add_ is ~3x slower)
    if not compiling() and add_kernel.add_rows_(grad_rows, parts):
        return
    for rows, part in zip(grad_rows, parts):
        rows.add_(part)


def placing_launch(
    spec: CoreSpec, part: Block, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None
) -> Callable[..., None]:
    """A prepared launch of a placed (``head_groups``) block part, for views of the layouts of
    these example views. Where the part's config leaves rows out (:func:`neighbour_shifts`) and
    the computer has a kernel that writes their zeros too (FA4: in its epilogue), the launch
    zeroes them, kernel or not, and says so (``zeroes_unselected``: the core's fill then skips
    the config, :func:`unzeroed_selection`)."""
    plain = spec.block_computer.forward_launcher(spec.causal, spec.scale, q, k, v, out, lse)
    shifts = neighbour_shifts(part, out)
    zeroing = shifts and spec.block_computer.zeroing_launcher(
        spec.causal, spec.scale, shifts, q, k, v, out, lse
    )
    if not zeroing:
        # (grouped_launch: it writes no zeros; a launcher that takes no attribute stays alone)
        with contextlib.suppress(AttributeError, TypeError):
            plain.group_shifts = ()  # type: ignore[attr-defined]
        return plain

    def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> None:
        if not zeroing(q, k, v, out, lse):  # declined: these write every row it would have
            plain(q, k, v, out, lse)
            for shift in shifts:
                shifted(out, shift).zero_()

    launch.zeroes_unselected = True  # type: ignore[attr-defined]
    launch.group_shifts = shifts  # type: ignore[attr-defined]
    return launch


def neighbour_shifts(part: Block, out: Tensor) -> tuple[int, ...]:
    """How far (elements) each unselected row of a selected row's stride group lies from it in
    ``out`` (the part's rows ``[b * S, L, H, d]`` of a ``[b, n, h, d]`` tensor): ``(k - o) *
    stride_n`` for ``k != o`` in ``range(r)``; () where there are none (``r = 1``) or where a
    group may end past the sequence (a tail segment: its rows are left to the fill)."""
    job = part.job
    if part.tail or job.r == 1 or job.w % job.r or out.stride(1) % job.r:
        return ()
    stride_n = out.stride(1) // job.r
    return tuple((k - job.offset) * stride_n for k in range(job.r) if k != job.offset)


def zeroing_blocks(launches: Prepared) -> frozenset[int]:
    """The blocks of these prepared launches all of whose parts zero their own unselected rows
    (:func:`placing_launch`)."""
    return frozenset(
        i
        for i, parts in launches.items()
        if parts and all(getattr(launch, "zeroes_unselected", False) for _, launch in parts)
    )


def unzeroed_selection(
    plan: Plan, zeroed: Container[int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``plan.selection`` with every head of a config all of whose blocks are among ``zeroed``
    (those whose launches write their unselected rows' zeros themselves) marked as fully
    selected (rate 1, offset 0), so the fill leaves it alone. Only configs of full segments
    qualify: a tail segment's rows are left to the fill, also where the tail has no selected row
    and so no block."""
    if plan.selection is None:
        return None
    rates, offsets = map(list, plan.selection)
    zeroing: dict[int, bool] = {}
    for i, block in enumerate(plan.blocks):
        done = plan.n % block.job.w == 0 and i in zeroed
        zeroing[block.job.config] = zeroing.get(block.job.config, True) and done
    for block in plan.blocks:
        if zeroing[block.job.config]:
            for head in range(block.job.head_start, block.job.head_stop, block.job.head_step):
                rates[head], offsets[head] = 1, 0
    return tuple(rates), tuple(offsets)


def _launch_fields(spec: CoreSpec) -> tuple[Any, Any, bool, float]:
    """What a prepared launch keeps of its spec: the spec keeps its launches, and a launch that
    kept the spec made a cycle that held the module's pooled buffers after ``del`` until
    Python's garbage collector ran."""
    return spec.computer, spec.communicator, spec.causal, spec.scale


def merging_launch(
    spec: CoreSpec, span: int, q: Tensor, k: Tensor, v: Tensor, out_rows: Tensor, lse_rows: Tensor
) -> Callable[..., None]:
    """A prepared launch (``ringattn.launches``) of a merged block part, for views of the
    layouts of these example views: its kernel (``span == 1``, the part stays on this device) or
    its communicator's exchange with the ``span`` ranks of its segment, merged into its rows."""
    computer, communicator, causal, scale = _launch_fields(spec)
    if span == 1:
        # one kernel for both where the computer has it (FA4: the merge in its epilogue)
        out_flat, lse_flat = flat_view(out_rows), flat_view(lse_rows)
        fused = None
        if out_flat is not None and lse_flat is not None:
            fused = computer.merging_launcher(causal, scale, q, k, v, out_flat, lse_flat)

        def launch(q: Tensor, k: Tensor, v: Tensor, out_rows: Tensor, lse_rows: Tensor) -> None:
            if fused is not None and fused(q, k, v, out_rows.flatten(0, 1), lse_rows.flatten(0, 1)):
                return
            merge_result_(out_rows, lse_rows, computer.forward(q, k, v, causal, scale))

    else:

        def launch(q: Tensor, k: Tensor, v: Tensor, out_rows: Tensor, lse_rows: Tensor) -> None:
            result = communicator.attend(computer, q, k, v, causal, scale, span)
            merge_result_(out_rows, lse_rows, result)

    return launch


def adding_launch(
    spec: CoreSpec,
    span: int,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dq_rows: Tensor,
    dk_rows: Tensor,
    dv_rows: Tensor,
) -> Callable[..., None]:
    """A prepared launch of a merged block part's backward (as :func:`merging_launch`): its
    gradients added into its rows. It takes ``(dout, q, k, v, out, lse, dq, dk, dv[, dlse])``
    (``dlse``: the rows' given ``−rowsum(out∘dout)``, ``BlockComputer.shares_backward_dpsum``)."""
    computer, communicator, causal, scale = _launch_fields(spec)
    if span == 1:
        # the gradients added by the backward's kernels themselves where the computer has such
        # kernels (FA4: dK and dV, and dQ in its postprocess)
        flats = [flat_view(rows) for rows in (dq_rows, dk_rows, dv_rows)]
        fused = None
        if all(flat is not None for flat in flats):
            fused = computer.adding_launcher(causal, scale, dout, q, k, v, out, lse, *flats)

        def launch(
            dout: Tensor,
            q: Tensor,
            k: Tensor,
            v: Tensor,
            out: Tensor,
            lse: Tensor,
            dq_rows: Tensor,
            dk_rows: Tensor,
            dv_rows: Tensor,
            dlse: Tensor | None = None,
        ) -> None:
            grad_rows = [dq_rows, dk_rows, dv_rows]
            if fused is not None:
                dq, dk, dv = (rows.flatten(0, 1) for rows in grad_rows)
                left = fused(dout, q, k, v, out, lse, dq, dk, dv, dlse)
                if left is not None:
                    if left:  # (dQ, where only dK and dV were added)
                        accumulate_([dq_rows], left, place=False)
                    return
            result = computer.backward(dout, q, k, v, out, lse, causal, scale)
            accumulate_(grad_rows, result, place=False)

    else:

        def launch(
            dout: Tensor,
            q: Tensor,
            k: Tensor,
            v: Tensor,
            out: Tensor,
            lse: Tensor,
            dq_rows: Tensor,
            dk_rows: Tensor,
            dv_rows: Tensor,
            dlse: Tensor | None = None,
        ) -> None:
            # (a segment spanning ranks: its communicator's kernels form their own sums)
            result = communicator.attend_backward(
                computer, dout, q, k, v, out, lse, causal, scale, span
            )
            accumulate_([dq_rows, dk_rows, dv_rows], result, place=False)

    return launch


def check_backward(spec: CoreSpec, dout: Tensor, q: Tensor, call: int | None) -> None:
    """Where sequence-parallel, the ranks' agreement on this backward (its module's
    ``check_backward_across_ranks``) before any of its messages: a rank whose backward belongs
    to another call than its peers' raises on every rank. ``call``: the forward's number
    (``distributed.next_call``), None in a compiled graph."""
    if not spec.communicator.distributed or spec.module is None:
        return
    owner = _MODULES.get(_module_number(spec.module))
    if owner is not None:
        owner.check_backward_across_ranks(dout, q, call, spec.plan.split)


class DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, spec: CoreSpec, q: Tensor, k: Tensor, v: Tensor, *indices: Tensor
    ) -> Tensor:
        communicator = cast(Any, spec.communicator)  # (a distributed one is SequenceParallel)
        # numbered before the work, as the compiled forward op numbers it: a rank whose forward
        # failed after its messages (its last block's kernel or merge raising alone, an OOM
        # caught by a training loop) left its count one behind its peers', and every later
        # backward over the group was refused on every rank ("differ in: forward call")
        ctx.call = distributed.next_call(communicator.group) if communicator.distributed else None
        out, lse = dilated_forward(spec, q, k, v, indices, keep_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, *indices)
        ctx.spec = spec
        # the three gradients as views of one buffer (one allocation, one fill) unless one goes
        # to a leaf's .grad (autograd keeps it as it is): there keeping one kept all three (3x
        # its memory; torch.save wrote them all)
        ctx.stack_grads = not any(t.is_leaf and t.requires_grad for t in (q, k, v))
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            # The backward is the merged-stats formula: a graph of it (the math computer's ops)
            # would hold the saved out/lse as constants, so second-order gradients came out wrong
            # and silently. once_differentiable would leave them None under allow_unused.
            raise RuntimeError(
                "ringattn's dilated attention has no second derivative: call backward without "
                "create_graph=True (for a gradient penalty or a Hessian, use the float64 "
                "ringattn.reference.dilated_attention, which autograd differentiates twice)"
            )
        batched = torch._C._functorch  # (is_grads_batched wraps dout as a legacy batched tensor)
        if batched.is_legacy_batchedtensor(dout) or batched.is_functorch_wrapped_tensor(dout):
            # autograd.grad(is_grads_batched=True) / jacobian(vectorize=True): vmap over the
            # backward's in-place strided writes failed deep inside torch
            raise TypeError(
                "ringattn's dilated attention has no batched backward "
                "(is_grads_batched=True, jacobian(vectorize=True)): loop over the grad outputs"
            )
        q, k, v, out, lse, *indices = ctx.saved_tensors
        check_backward(ctx.spec, dout, q, ctx.call)
        with eager_range("ringattn::dilated_backward"):
            dq, dk, dv = dilated_backward(
                ctx.spec, dout, q, k, v, out, lse, tuple(indices), stack_grads=ctx.stack_grads
            )
        return (None, dq, dk, dv, *([None] * len(indices)))


# --- the compiled form: two opaque custom ops ----------------------------------------------------
#
# Block computers call fused kernels (cuDNN / FlashAttention / the Triton merge) that Inductor
# cannot improve on, while tracing the core would make it functionalize every in-place strided
# write into a copy of the whole accumulator (measured on an H200: 0.6x the eager speed, +50%
# memory, minutes of compile time for 31 blocks). So under torch.compile the core is one opaque
# op for the forward and one for the backward: the graph around it still compiles as one graph
# (fullgraph=True holds, no breaks), and the core inside runs exactly as in eager mode, with the
# spec the module's eager side makes for the shapes the op sees (``_spec``): so a model compiled
# before any eager call captures the ops too (the core used to be traced inline then: 0.6x the
# speed on an H200, +50% memory, minutes of Inductor on CPU).


def _eager_side(module: Tensor, q: Tensor) -> tuple[CoreSpec, tuple[Tensor, ...]]:
    """The spec and the dilation's gather indices of an eager call with ``q``'s shape. Made here,
    at run time, and not in the trace: a plan built from a symbolic ``n`` guarded the graph on
    ``n mod w`` (its tails), so ``torch.compile(dynamic=True)`` recompiled for every new tail
    length and hit the recompile limit after eight."""
    spec = _spec(module, q)
    return spec, spec.dilation.indices(spec.plan, q.device, spec.memory)


def grad_state(q: Tensor, k: Tensor, v: Tensor) -> list[bool]:
    """The call's grad mode and its inputs' ``requires_grad``, for :func:`dilated_forward_op`
    (read where it is traced: inside the op autograd is off and no input requires a grad)."""
    return [torch.is_grad_enabled(), q.requires_grad, k.requires_grad, v.requires_grad]


@torch.library.custom_op("ringattn::dilated_forward", mutates_args=())
def dilated_forward_op(
    q: Tensor, k: Tensor, v: Tensor, module: Tensor, grad: list[bool] | None = None
) -> tuple[Tensor, Tensor]:
    owner = _MODULES.get(_module_number(module))
    if owner is not None and owner.communicator.distributed:
        # a compiled graph skips the eager boundary's check that the ranks make the same call;
        # the op's body runs eagerly, so the check runs here, before the spec (whose checks may
        # refuse one rank's shape alone). Without it a rank whose last batch alone was short
        # ran the ring on other sizes than its peers: gloo aborted the process. ``grad``
        # (grad_state, from the trace): in here every rank saw grad mode off, so a rank
        # compiled under no_grad passed the check and the others hung in their backward.
        # An eager call run as this op (``run_core`` under a FlopCounterMode) was checked at
        # its boundary: a second check, a collective, would be this rank's alone where only
        # one rank counts (a hang)
        if not getattr(_EAGER_AS_OP, "active", False):
            owner.check_across_ranks(q, k, v, grad=grad)
        if grad is not None and grad[0] and any(grad[1:]):
            # numbered as the eager DilatedAttentionFunction numbers it, so ranks that run a step
            # compiled and another eagerly keep one count (its backward here has no number)
            distributed.next_call(owner.communicator.group)
    spec, indices = _eager_side(module, q)
    out, lse = dilated_forward(spec, q, k, v, indices, keep_lse=True)
    return out.contiguous(), lse.contiguous()


@dilated_forward_op.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, module: Tensor, grad: list[bool] | None = None
) -> tuple[Tensor, Tensor]:
    b, n, h, d = q.shape
    return q.new_empty(b, n, h, d), q.new_empty(b, n, h, dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("ringattn::dilated_backward", mutates_args=())
def dilated_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    module: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    spec, indices = _eager_side(module, q)
    check_backward(spec, dout, q, None)  # (a graph's calls are not numbered)
    grads = dilated_backward(spec, dout, q, k, v, out, lse, indices)
    dq, dk, dv = (g.contiguous() for g in grads)
    return dq, dk, dv


@dilated_backward_op.register_fake
def _(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, module: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(
    ctx: Any,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor, list[bool] | None],
    output: tuple[Tensor, Tensor],
) -> None:
    q, k, v, module, *_ = inputs
    if module.device != q.device and graphs_compiling():
        # the forward graph returns the tag for its backward, and cudagraph trees reject a CPU
        # output ("Expected all cuda outputs in cuda graph recording", h200_perf.md step 63)
        raise RuntimeError(
            f"ringattn: compile_mode='reduce-overhead' (CUDA graphs) on {q.device} inputs needs "
            "the DilatedAttention module's CUDA tag, which a trace cannot make: build the model "
            "under torch.device('cuda') or move it there (model.to('cuda')), or call the "
            "module (or ringattn.dilated_attention with the same options) once eagerly on that "
            "device, before the compiled model's first forward+backward"
        )
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.module = module


def _backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = dilated_backward_op(dout, q, k, v, out, lse, ctx.module)
    return dq, dk, dv, None, None


dilated_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --- what torch's observability tools see -------------------------------------------------------
#
# FlopCounterMode counts each op it sees by its formula; an op it has none for, it runs with the
# counter off (a custom op is not decomposed), so the ops' formulas below count a call as one
# unit, the kernels inside never on top. Counted kernel by kernel the same call came to the math
# computer's masked einsums (a causal call: 2x its useful FLOPs) and to 0 for sdpa (torch has no
# formula for the CPU's flash kernel, nor for FA4): an MFU compared across strategies was wrong.


def _call_flops(module: Tensor, q: Tensor, factor: float) -> int:
    """``factor`` times the forward's useful FLOPs (``ringattn.flops``: what every strategy
    computes, not a kernel's padded or masked work) of the op call on ``q`` of ``module``'s
    module; sequence-parallel, this rank's equal share of the whole sequence's (the ranks' counts
    sum to the single-device count, whatever the layout's balance of work). 0 where the call's
    module cannot be read: a fake or meta tag (Inductor's estimates count an op in a graph on
    fake copies of its inputs, ``count_flops_fx``), symbolic sizes, or a module already gone."""
    if is_fake(module) or module.device.type == "meta":
        return 0
    if not all(isinstance(size, int) for size in q.shape):
        return 0
    owner = _MODULES.get(_module_number(module))
    if owner is None:
        return 0
    b, n, h, d = q.shape
    ranks: int = owner.communicator.world_size
    c = owner.config
    total = useful_flops(
        b, n * ranks, h, d, c.segment_lengths, c.dilation_rates, c.causal, c.mixing
    )
    return round(total * factor / ranks)


@flop_counter.register_flop_formula(torch.ops.ringattn.dilated_forward, get_raw=True)
def _forward_flops(q: Tensor, k: Tensor, v: Tensor, module: Tensor, *_: Any, **__: Any) -> int:
    return _call_flops(module, q, 1.0)


@flop_counter.register_flop_formula(torch.ops.ringattn.dilated_backward, get_raw=True)
def _backward_flops(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    module: Tensor,
    *_: Any,
    **__: Any,
) -> int:
    return _call_flops(module, q, FORWARD_BACKWARD_FACTOR - 1.0)


# the dispatch mode a FlopCounterMode enters (a private class of torch 2.11-2.13; where a release
# renames it, None: eager calls are counted kernel by kernel, as before)
_FLOP_COUNTER_MODE: type | None = getattr(flop_counter, "_FlopCounterMode", None)

# set while an eager call runs as the forward op (``run_core``): its boundary checked the ranks
_EAGER_AS_OP = threading.local()


def counting_flops() -> bool:
    """Whether a ``torch.utils.flop_counter.FlopCounterMode`` is active on this thread. Where no
    dispatch mode is (every call but a measured one), one C call: ~0.1 µs."""
    if not torch._C._len_torch_dispatch_stack() or _FLOP_COUNTER_MODE is None:
        return False
    return any(isinstance(mode, _FLOP_COUNTER_MODE) for mode in _get_current_dispatch_mode_stack())


def counted_forward(module: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """An eager call as the compiled graphs run it, the forward op (and its backward op), which
    a FlopCounterMode counts by their formulas, the same useful FLOPs for every strategy (see
    :func:`_call_flops`), eager or compiled. The same kernels, outputs and gradients."""
    _EAGER_AS_OP.active = True
    try:
        out: Tensor = dilated_forward_op(q, k, v, module, grad_state(q, k, v))[0]
    finally:
        _EAGER_AS_OP.active = False
    return out


def eager_range(name: str) -> contextlib.AbstractContextManager[object]:
    """Where a profiler records (``torch.profiler.profile``) and no trace runs (Dynamo, compiled
    autograd: there the ops themselves carry the names), a ``record_function`` range ``name``,
    named as the compiled graphs' ops, ``ringattn::dilated_forward`` / ``dilated_backward``, in
    which a trace shows an eager call's kernels (the no-grad forward was anonymous aten ops).
    Asked first: a range costs a few µs even when none records, this one C call ~0.1 µs."""
    if not compiling() and torch._C._autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def run_core(
    spec: CoreSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: tuple[Tensor, ...],
    aux: tuple[Any, ...],  # (a layout computer's own setup, LayoutComputer.prepare's)
) -> Tensor:
    """The function ``torch.compile`` wraps.

    A layout computer (flex) returns the merged output itself and autograd runs through it; it is
    traced, since compiling its mask functions into kernels is the point of flex. Block computers
    run the core through :class:`DilatedAttentionFunction` (merged-stats backward) when some input
    needs a gradient, and under ``torch.compile`` as the opaque ops above.
    """
    if isinstance(spec.computer, LayoutComputer):
        with input_precision(q.device):
            return spec.computer.attend(
                spec.plan, spec.causal, spec.scale, spec.dilation.name, q, k, v, aux
            )
    if compiling() and spec.module is not None:
        out: Tensor = dilated_forward_op(q, k, v, spec.module, grad_state(q, k, v))[0]
        return out
    if spec.module is not None and counting_flops() and not is_fake(q):
        # (fake inputs: the op would mix them with the real tag, which a FakeTensorMode refuses)
        return counted_forward(spec.module, q, k, v)
    # (a spec of no module, as tests make, is traced inline, as eager code)
    with eager_range("ringattn::dilated_forward"):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out = DilatedAttentionFunction.apply(spec, q, k, v, *indices)  # type: ignore[no-untyped-call]
            return out
        return dilated_forward(spec, q, k, v, indices, keep_lse=False)[0]
