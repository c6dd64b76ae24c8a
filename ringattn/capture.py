"""Is a CUDA graph's memory pool taking this thread's allocations now?

Then a tensor made and kept in a cache for later calls is wrong twice over: made while a stream is
captured (``torch.cuda.graph``, the recording of Inductor's cudagraph trees), its kernels are only
recorded, so it holds its values in the graph's replays alone; made in a cudagraph tree's warm-up
(``compile_mode="reduce-overhead"``: the graph's code run eagerly once, every allocation of the
thread routed to the tree's pool), it is a pool tensor that no output holds, which the tree refuses
("Detected 1 tensor(s) in the cudagraph pool not tracked as outputs", h200_perf.md step 63: the
backward's packed LSE index and grouped launch). Callers build such a tensor for the call and keep
none of it.

Also here: whether Inductor is compiling a graph for its cudagraph trees (:func:`graphs_compiling`),
for the checks that must refuse, with a clear message, what those trees would reject with an
obscure one; and whether this thread traces (:func:`compiling`, ``torch.compiler.is_compiling()``
less another thread's compile).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compiling() -> bool:
    """``torch.compiler.is_compiling()`` for this thread: whether a ``torch.compile`` or
    ``torch.export`` traces the calling code. From torch 2.13 that function returns a flag of the
    process that every compile session holds for its whole length (Inductor's included: seconds
    on the CPU), so while one thread compiled anything, another thread's eager calls took their
    traced path: a flex module was refused ("traced by a torch.compile around the module"), a
    forward-mode AD dual input was not (its tangent dropped, silently), and no call kept its
    caches. A flag set while this thread has no compile or tracing context of its own (which
    Dynamo and export enter in the thread that traces) is another thread's."""
    return torch.compiler.is_compiling() and not _another_threads_flag()


@torch._dynamo.assume_constant_result  # (traced: read once, in the tracing thread, as a constant)
def _another_threads_flag() -> bool:
    return (
        bool(getattr(torch.compiler, "_is_compiling_flag", False))
        and torch._guards.CompileContext.try_get() is None
        and torch._guards.TracingContext.try_get() is None
    )


# Neither is ever a frame of its own to Dynamo (a trace of a caller inlines them): a
# torch.compile that gives a frame back to eager converts each frame that one calls, and
# compiling(), traced alone, was folded to True there, in eager code
for _code in (compiling.__code__, _another_threads_flag.__code__):
    torch._dynamo.eval_frame.skip_code(_code)


def capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing a graph (never without CUDA
    initialised, which costs nothing to ask)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def pool_allocating(x: Tensor | None = None) -> bool:
    """Whether a CUDA graph's pool takes this thread's allocations (``x``: a tensor of the call;
    off CUDA, never). Costs a few µs: ask it when about to keep something, not on every call."""
    if x is not None and not x.is_cuda:
        return False
    if not torch.cuda.is_initialized():  # (asking would initialise CUDA)
        return False
    return capturing() or _in_tree_warmup()


def _in_tree_warmup() -> bool:
    """Whether this thread runs a cudagraph tree's warm-up (or recording) now: its manager for
    the current device is in that state and the current stream is the tree's own (the warm-up
    switches to it; a call after, on the caller's stream, keeps its caches). Inductor's
    internals (torch 2.11-2.13): where they are not as read here, False, as before this check."""
    try:
        if not torch._C._is_key_in_tls("tree_manager_containers"):
            return False  # (no tree was made on this thread, nor handed to it by autograd)
        from torch._inductor import cudagraph_trees

        containers = cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers")
        container = containers.get(torch.cuda.current_device())
        manager = None if container is None else container.tree_manager
        if manager is None or not (manager.in_warmup or manager.in_recording):
            return False
        ours: bool = torch.cuda.current_stream() == manager.stream
        return ours
    except (AttributeError, ImportError, KeyError, TypeError):
        return False


def graphs_compiling() -> bool:
    """Whether Inductor compiles the graph being traced now for its CUDA graphs
    (``compile_mode="reduce-overhead"``, or its ``triton.cudagraphs`` set by hand): true while
    AOTAutograd traces under the mode's config patch (an op's fake kernel and autograd context
    see it), false while Dynamo traces. Inductor's config (torch 2.11-2.13; a test checks the
    name): where it is not as read here, False."""
    try:
        from torch._inductor import config

        return bool(config.triton.cudagraphs)
    except (AttributeError, ImportError):
        return False
