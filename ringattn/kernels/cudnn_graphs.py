"""cuDNN attention that writes into the caller's strided views (NVIDIA's cuDNN frontend).

torch's cuDNN attention ops allocate their outputs, so every block whose result is not merged
(``head_groups`` blocks, the parts of a covering ``r = 1`` block in the backward) had to be copied
into its strided rows of ``[b, n, h, d]`` afterwards: about 15% of such a block's forward and 13% of
its backward on an H200 (``docs/benchmarks/h200_perf.md``, step 11). cuDNN itself takes any strides
for every operand, outputs included; its Python frontend (``pip install nvidia-cudnn-frontend``,
the ``cuda`` extra) builds the same fused kernels with the outputs bound to our views, so the
result lands in place and the copy disappears. Same kernels, same numbers as torch's path.
Under ``torch.use_deterministic_algorithms`` the backward graphs take cuDNN's deterministic
schedule (its dQ summed in a fixed order; otherwise two runs may differ in the last bits).

Optional: :func:`available` is false without the package (CPU installs, CI), and callers fall back
to torch's op plus a copy. A graph is built once per (shapes, strides, dtype, causal, scale) and
cached (the ``MAX_GRAPHS`` most recent); a configuration cuDNN declines is remembered as ``None``
and also falls back.

Graphs are built on a helper thread, from shapes and strides only. Building raises and catches
exceptions inside the frontend, which keeps some of them with their tracebacks; a traceback holds
every frame of the stack it was raised on, so a build on the caller's stack kept the core's frames
(whole ``[b, n, h, d]`` outputs and gradients) alive until a garbage collection (measured: 7x the
size of q held after the first call). The helper thread's stack holds no tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch
from torch import Tensor

from ringattn.capture import compiling
from ringattn.lru import remember

# the frontend is untyped: its handles, graphs, tensor nodes and enum values are Any here
try:
    import cudnn as cudnn  # (the form that re-exports it: experiments/ read the frontend here)
except ImportError:  # pragma: no cover - optional (the `cuda` extra)
    cudnn = None

# a built graph and its workspace bytes (None in the cache: declined by cuDNN)
_Entry = tuple[Any, int]

_graphs: dict[tuple[object, ...], _Entry | None] = {}
# a bound, not a working set (a plan has a handful of block signatures, each a forward and a
# backward graph): a key holds every shape, stride, dtype and scale, so a sweep over sequence
# lengths, batch sizes or scales added graphs (and their compiled kernels) for the process's life
MAX_GRAPHS = 1024
_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ringattn-cudnn-build")
_local = threading.local()  # cuDNN handles are not thread-safe: one per thread and device

# operand ids inside a graph
_Q, _K, _V, _O, _STATS, _DO, _DQ, _DK, _DV = range(1, 10)

# what a graph is built from: (shape, stride, dtype) of each operand, no tensor
Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


def available(q: Tensor) -> bool:
    """Whether the frontend can run on ``q``'s device in this process (never while tracing)."""
    return cudnn is not None and q.is_cuda and not compiling()


def _bhsd(x: Tensor) -> Tensor:  # our blocks are [B, L, H, d]; cuDNN reads [B, H, L, d]
    return x.transpose(1, 2)


def _stats(lse: Tensor) -> Tensor:  # [B, L, H] -> cuDNN's [B, H, L, 1]
    return lse.transpose(1, 2).unsqueeze(-1)


def _layout(x: Tensor) -> Layout:
    return tuple(x.shape), x.stride(), x.dtype


def _handle(device: torch.device) -> Any:
    """This thread's cuDNN handle for torch's current stream on ``device``.

    One handle a stream: the blocks of one call may run on several (``ringattn.lanes``), and
    rebinding a handle to another stream costs host time on every call. While a CUDA graph is
    being captured, creating a handle would break the capture, so a stream first met there shares
    the device's first handle, rebound when the stream changes (replays run no host code)."""
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}  # (device, stream) -> handle, and device -> first handle
        _local.bound = {}  # id(handle) -> the stream it is bound to
    # the raw pointer: torch.cuda.current_stream() builds a Stream object (~5 us a call)
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    handle = handles.get((device, stream))
    if handle is None:
        if torch.cuda.is_current_stream_capturing() and device in handles:
            handle = handles[device]
        else:
            with torch.cuda.device(device):
                handle = cudnn.create_handle()
            handles.setdefault(device, handle)
        handles[device, stream] = handle
    if _local.bound.get(id(handle)) != stream:
        cudnn.set_stream(handle=handle, stream=stream)
        _local.bound[id(handle)] = stream
    return handle


def _data_type(dtype: torch.dtype) -> Any:
    return {
        torch.float32: cudnn.data_type.FLOAT,
        torch.bfloat16: cudnn.data_type.BFLOAT16,
        torch.float16: cudnn.data_type.HALF,
    }[dtype]


class _Graph:
    """One cuDNN graph being described: operands and outputs by layout and uid."""

    def __init__(self, device: torch.device, io: torch.dtype) -> None:
        self.graph = cudnn.pygraph(
            handle=_handle(device),
            io_data_type=_data_type(io),
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
        )

    def operand(self, name: str, layout: Layout, uid: int) -> Any:
        shape, stride, dtype = layout
        return self.graph.tensor(
            name=name, dim=list(shape), stride=list(stride), data_type=_data_type(dtype), uid=uid
        )

    @staticmethod
    def output(node: Any, layout: Layout, uid: int) -> None:
        shape, stride, dtype = layout
        node.set_uid(uid).set_output(True).set_dim(list(shape)).set_stride(list(stride))
        node.set_data_type(_data_type(dtype))

    def built(self) -> Any:
        graph = self.graph
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        return graph


def _mask(causal: bool) -> dict[str, object]:
    # causal: the diagonal band ends on the diagonal, aligned top-left (query i sees keys <= i)
    return {
        "diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT,
        "diagonal_band_right_bound": 0 if causal else None,
    }


def _forward_graph(
    device: torch.device,
    causal: bool,
    scale: float,
    q: Layout,
    k: Layout,
    v: Layout,
    o: Layout,
    stats: Layout | None,
) -> Any:
    g = _Graph(device, q[2])
    o_node, stats_node = g.graph.sdpa(
        name="forward",
        q=g.operand("q", q, _Q),
        k=g.operand("k", k, _K),
        v=g.operand("v", v, _V),
        generate_stats=stats is not None,
        attn_scale=scale,
        **_mask(causal),
    )
    g.output(o_node, o, _O)
    if stats is not None:
        g.output(stats_node, stats, _STATS)
    return g.built()


def _backward_graph(
    device: torch.device,
    causal: bool,
    scale: float,
    q: Layout,
    k: Layout,
    v: Layout,
    o: Layout,
    do: Layout,
    stats: Layout,
    dq: Layout,
    dk: Layout,
    dv: Layout,
    *,
    deterministic: bool = False,
) -> Any:
    g = _Graph(device, q[2])
    nodes = g.graph.sdpa_backward(
        name="backward",
        q=g.operand("q", q, _Q),
        k=g.operand("k", k, _K),
        v=g.operand("v", v, _V),
        o=g.operand("o", o, _O),
        dO=g.operand("do", do, _DO),
        stats=g.operand("stats", stats, _STATS),
        attn_scale=scale,
        # (without it cuDNN adds dQ in no fixed order: torch.use_deterministic_algorithms asks
        # for the schedule that orders it)
        use_deterministic_algorithm=deterministic,
        **_mask(causal),
    )
    for node, grad, uid in zip(nodes, (dq, dk, dv), (_DQ, _DK, _DV)):
        g.output(node, grad, uid)
    return g.built()


_TRANSIENT = object()  # a build that failed for want of memory: tried again on the next call


def _build_or_none(build: Callable[..., Any], *args: object, **options: bool) -> object:
    # (an _Entry, None where cuDNN declines, or _TRANSIENT)
    try:
        graph = build(*args, **options)
    except Exception as exc:  # cuDNN declines this layout: the caller falls back, once per key
        text = str(exc).lower()
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "alloc" in text:
            return _TRANSIENT  # (not remembered: this layout is not declined for good)
        return None
    return graph, max(graph.get_workspace_size(), 1)


def _graph(
    build: Callable[..., Any],
    device: torch.device,
    causal: bool,
    scale: float,
    *layouts: Layout | None,
    **options: bool,
) -> _Entry | None:
    """``(graph, workspace bytes)`` for these operand layouts (and ``build``'s keyword
    ``options``), or None where cuDNN declines."""
    key = (build.__name__, device, causal, scale, *layouts, *sorted(options.items()))
    # (one lookup: another thread may drop the entry between a test and a read)
    found: object = _graphs.get(key, _TRANSIENT)
    if found is not _TRANSIENT:
        return cast("_Entry | None", found)  # (past the sentinel: an entry or a declined None)
    # built off this stack (module docstring), from layouts only
    built = _builder.submit(
        _build_or_none, build, device, causal, scale, *layouts, **options
    ).result()
    if built is _TRANSIENT:
        return None
    entry = cast("_Entry | None", built)
    remember(_graphs, key, entry, MAX_GRAPHS)  # (the oldest dropped)
    return entry


_FORWARD_UIDS = (_Q, _K, _V, _O)
_BACKWARD_UIDS = (_Q, _K, _V, _O, _DO, _STATS, _DQ, _DK, _DV)

# A launcher runs one graph for views of the layouts it was made for (the core prepares one per
# block part and layout, ``ringattn.launches``); it holds the graph, never a tensor.
ForwardLaunch = Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | None"], None]
BackwardLaunch = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], None
]


def forward_launcher(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None, causal: bool, scale: float
) -> ForwardLaunch | None:
    """A launcher of attention over ``[B, L, H, d]`` blocks of these layouts, written into ``out``
    (any strided view, q's dtype) and, if given, ``lse`` (``[B, L, H]`` float32); None if cuDNN
    declines the layouts."""
    device = q.device
    layouts = [_layout(_bhsd(x)) for x in (q, k, v, out)]
    # the LSE goes through a packed buffer: a view of it can start at any float, and it is small
    # (one float a row against d values of the output)
    stats_shape = _stats(lse).shape if lse is not None else None
    stats_layout = None
    if lse is not None and stats_shape is not None:
        stats_layout = (tuple(stats_shape), _contiguous_strides(stats_shape), lse.dtype)
    entry = _graph(_forward_graph, device, causal, scale, *layouts, stats_layout)
    if entry is None:
        return None
    graph, workspace_bytes = entry
    uids = _FORWARD_UIDS if lse is None else (*_FORWARD_UIDS, _STATS)

    def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> None:
        operands = [_bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out)]
        if lse is not None:
            assert stats_shape is not None  # (a graph made for an LSE)
            stats = torch.empty(stats_shape, dtype=lse.dtype, device=device)
            operands.append(stats)
        _execute(graph, workspace_bytes, uids, operands, device)
        if lse is not None:
            _stats(lse).copy_(stats)

    return launch


def backward_launcher(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    causal: bool,
    scale: float,
) -> BackwardLaunch | None:
    """A launcher of the flash-attention backward of ``[B, L, H, d]`` blocks of these layouts,
    with the given (merged) output and LSE, its dQ/dK/dV written into the strided views; None if
    cuDNN declines. Under ``torch.use_deterministic_algorithms`` (read now: a launcher keeps the
    mode it was made in) cuDNN's deterministic backward, which orders its dQ sums."""
    device = q.device
    operands = _backward_operands(dout, q, k, v, out, lse, dq, dk, dv)
    entry = _graph(
        _backward_graph,
        device,
        causal,
        scale,
        *(_layout(x) for x in operands),
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    if entry is None:
        return None
    graph, workspace_bytes = entry

    def launch(
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        dq: Tensor,
        dk: Tensor,
        dv: Tensor,
    ) -> None:
        operands = _backward_operands(dout, q, k, v, out, lse, dq, dk, dv)
        _execute(graph, workspace_bytes, _BACKWARD_UIDS, operands, device)

    return launch


def _backward_operands(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
) -> list[Tensor]:
    return [
        *(_bhsd(x) for x in (q, k, v, out, dout)),
        # cuDNN < 9.26 reads the LSE only as a packed [B, H, L, 1] tensor (one float a row)
        _stats(lse).contiguous(),
        *(_bhsd(g) for g in (dq, dk, dv)),
    ]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _execute(
    graph: Any,
    workspace_bytes: int,
    uids: tuple[int, ...],
    operands: list[Tensor],
    device: torch.device,
) -> None:
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
    # the ordered form (a list and its uids) is the frontend's fast path: ~16 us of host time
    # against ~44 us for a uid -> pointer dict (H200 host, h200_perf.md step 11)
    graph.execute(operands, workspace, handle=_handle(device), tensor_uids=uids)


def forward_into(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None, causal: bool, scale: float
) -> bool:
    """:func:`forward_launcher` made and run once; False if cuDNN declines (nothing written)."""
    launch = forward_launcher(q, k, v, out, lse, causal, scale)
    if launch is None:
        return False
    launch(q, k, v, out, lse)
    return True


def backward_into(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grads: tuple[Tensor, Tensor, Tensor],
    causal: bool,
    scale: float,
) -> bool:
    """:func:`backward_launcher` made and run once; False if cuDNN declines."""
    launch = backward_launcher(dout, q, k, v, out, lse, *grads, causal, scale)
    if launch is None:
        return False
    launch(dout, q, k, v, out, lse, *grads)
    return True
