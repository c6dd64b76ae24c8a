"""The cuDNN frontend's graphs (ringattn.kernels.cudnn_graphs) are built once per everything a
graph bakes in, and a build that failed for want of memory is not remembered as declined. The
frontend itself needs CUDA: the builds here are stand-ins."""

from __future__ import annotations

import contextlib
import math
import threading
import types

import pytest
import torch
from conftest import deterministic_algorithms

from ringattn.kernels import cudnn_graphs

LAYOUT = ((1, 8, 2, 16), (256, 32, 16, 1), torch.bfloat16)


class _Graph:
    def get_workspace_size(self) -> int:
        return 0


@pytest.fixture
def builds(monkeypatch):
    monkeypatch.setattr(cudnn_graphs, "_graphs", {})
    made: list[tuple] = []

    def _forward_graph(device, causal, scale, *layouts):
        made.append((device, causal, scale, layouts))
        return _Graph()

    return made, _forward_graph


def test_a_graph_is_built_once_per_causal_scale_layout_and_device(builds):
    """Causal masking and the scale are compiled into a graph: one keyed without either ran
    another layer's function (a second module with scale=0.05 got the first one's)."""
    made, build = builds
    cpu, other = torch.device("cpu"), torch.device("meta")
    wider = ((1, 8, 2, 16), (512, 64, 16, 1), torch.bfloat16)
    variants = [
        (cpu, False, 0.25, LAYOUT),
        (cpu, True, 0.25, LAYOUT),
        (cpu, False, 0.05, LAYOUT),
        (cpu, False, 0.25, wider),
        (other, False, 0.25, LAYOUT),
    ]
    entries = [cudnn_graphs._graph(build, d, c, s, layout) for d, c, s, layout in variants]
    again = [cudnn_graphs._graph(build, d, c, s, layout) for d, c, s, layout in variants]
    assert len(made) == len(variants)  # each once, none shared
    assert [e[0] for e in again] == [e[0] for e in entries]
    assert len({id(e[0]) for e in entries}) == len(variants)


def test_the_backward_graph_takes_the_deterministic_schedule_in_that_mode(builds, monkeypatch):
    """Without it cuDNN adds dQ in no fixed order; the mode is part of the graph's key (one
    built in the other mode is not taken), and a launcher keeps the mode it was made in."""
    made, _ = builds

    def _backward_graph(device, causal, scale, *layouts, deterministic=False):
        made.append(deterministic)
        return _Graph()

    cpu = torch.device("cpu")
    entries = [
        cudnn_graphs._graph(_backward_graph, cpu, False, 0.25, LAYOUT, deterministic=flag)
        for flag in (False, True, False, True)
    ]
    assert made == [False, True] and entries[2:] == entries[:2] and entries[0] != entries[1]
    asked: list[bool] = []
    monkeypatch.setattr(
        cudnn_graphs,
        "_graph",
        lambda build, *args, deterministic: asked.append(deterministic) or (_Graph(), 1),
    )
    x = torch.zeros(1, 8, 2, 16)
    for flag in (True, False):
        with deterministic_algorithms(flag):
            assert cudnn_graphs.backward_launcher(x, x, x, x, x, x[..., 0], x, x, x, False, 0.25)
    assert asked == [True, False]


def test_the_frontend_is_asked_for_its_deterministic_backward_in_that_mode(builds, monkeypatch):
    """What the real ``_backward_graph`` hands the frontend's ``sdpa_backward`` (a stand-in
    frontend records it): ``use_deterministic_algorithm`` as the mode was when the launcher was
    made (the test above stands in for ``_backward_graph`` itself, so it cannot see this)."""
    asked: list[object] = []

    class Node:
        def __getattr__(self, name):
            return lambda *args, **kwargs: self  # (set_uid(...).set_output(...)...)

    class PyGraph:
        def tensor(self, **kwargs):
            return Node()

        def sdpa_backward(self, **kwargs):
            asked.append(kwargs.get("use_deterministic_algorithm"))
            return Node(), Node(), Node()

        def __getattr__(self, name):  # validate, build_operation_graph, ...: nothing to do
            return lambda *args, **kwargs: None

        def get_workspace_size(self):
            return 0

    names = types.SimpleNamespace
    frontend = names(
        pygraph=lambda **kwargs: PyGraph(),
        data_type=names(FLOAT=0, BFLOAT16=1, HALF=2),
        diagonal_alignment=names(TOP_LEFT=0),
        heur_mode=names(A=0, FALLBACK=1),
    )
    monkeypatch.setattr(cudnn_graphs, "cudnn", frontend)
    monkeypatch.setattr(cudnn_graphs, "_handle", lambda device: None)
    x = torch.zeros(1, 8, 2, 16, dtype=torch.bfloat16)
    lse = torch.zeros(1, 8, 2)
    for flag in (True, False, True):
        with deterministic_algorithms(flag):
            assert cudnn_graphs.backward_launcher(x, x, x, x, x, lse, x, x, x, False, 0.25)
    assert asked == [True, False]  # (the third: the first one's graph, by its key)


def test_graphs_are_bounded_the_oldest_dropped(builds, monkeypatch):
    """A graph's key holds every shape and scale: a sweep over sequence lengths, batch sizes or
    scales kept one graph (and its kernels) per signature for the process's life, unbounded."""
    made, build = builds
    monkeypatch.setattr(cudnn_graphs, "MAX_GRAPHS", 4, raising=False)
    cpu = torch.device("cpu")
    layouts = [((1, n, 2, 16), (32 * n, 32, 16, 1), torch.bfloat16) for n in range(1, 11)]
    entries = [cudnn_graphs._graph(build, cpu, False, 0.25, layout) for layout in layouts]
    assert len(made) == len(layouts) and all(e is not None for e in entries)
    assert len(cudnn_graphs._graphs) == 4
    assert cudnn_graphs._graph(build, cpu, False, 0.25, layouts[-1]) is entries[-1]  # kept
    assert len(made) == len(layouts)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDNN_STATUS_ALLOC_FAILED")],
    ids=["torch", "cudnn"],
)
def test_a_build_that_ran_out_of_memory_is_tried_again(builds, error):
    """Remembered as None, a transient failure sent that layout to the slower path for the
    process's life; a layout cuDNN declines is still remembered."""
    made, build = builds
    failures = [error]

    def flaky(*args):
        if failures:
            raise failures.pop()
        return build(*args)

    flaky.__name__ = build.__name__
    cpu = torch.device("cpu")
    assert cudnn_graphs._graph(flaky, cpu, False, 0.25, LAYOUT) is None
    assert cudnn_graphs._graph(flaky, cpu, False, 0.25, LAYOUT) is not None
    assert len(made) == 1

    def declines(*args):
        made.append(args)
        raise RuntimeError("cudnn: no valid execution plan")

    declines.__name__ = "_backward_graph"
    assert cudnn_graphs._graph(declines, cpu, False, 0.25, LAYOUT) is None
    assert cudnn_graphs._graph(declines, cpu, False, 0.25, LAYOUT) is None
    assert len(made) == 2  # tried once


def test_graphs_are_built_on_the_helper_thread_with_a_workspace(builds):
    """Built on the caller's stack, the frontend's kept tracebacks held the core's tensors
    (module docstring); and a graph without workspace still gets one byte (a pointer, not
    null)."""
    _, build = builds
    threads = []

    def recorded(*args):
        threads.append(threading.current_thread().name)
        return build(*args)

    recorded.__name__ = build.__name__
    entry = cudnn_graphs._graph(recorded, torch.device("cpu"), False, 0.25, LAYOUT)
    assert entry is not None and entry[1] == 1
    assert threads and threads[0].startswith("ringattn-cudnn-build")


@pytest.fixture
def streams(monkeypatch):
    """cuDNN's handles and torch's streams stood in for: ``state["stream"]`` is the current
    raw stream, ``state["capturing"]`` whether it is being captured; ``bound`` records each
    ``set_stream(handle, stream)``."""
    state = {"stream": 1, "capturing": False}
    bound: list[tuple] = []
    fake = types.SimpleNamespace(
        create_handle=object,
        set_stream=lambda handle, stream: bound.append((handle, stream)),
    )
    monkeypatch.setattr(cudnn_graphs, "cudnn", fake)
    # (this thread's handles forgotten, for the test and after it)
    monkeypatch.setattr(cudnn_graphs._local, "handles", None, raising=False)
    monkeypatch.setattr(
        torch._C, "_cuda_getCurrentRawStream", lambda index: state["stream"], raising=False
    )
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return state, bound


def test_one_handle_per_thread_and_stream_shared_while_capturing(streams):
    """cuDNN handles are not thread-safe (one per thread), each stream has its own (no rebinding
    on every call), and a stream first met during a capture takes the device's first handle
    (creating one would break the capture), bound to whichever stream uses it."""
    state, bound = streams
    device = torch.device("cuda", 0)
    first = cudnn_graphs._handle(device)
    assert cudnn_graphs._handle(device) is first and bound == [(first, 1)]
    state["stream"] = 2
    second = cudnn_graphs._handle(device)
    assert second is not first and bound[-1] == (second, 2)
    state["stream"] = 1
    assert cudnn_graphs._handle(device) is first and len(bound) == 2  # still bound to 1
    state["stream"], state["capturing"] = 3, True
    assert cudnn_graphs._handle(device) is first and bound[-1] == (first, 3)
    state["stream"], state["capturing"] = 1, False
    assert cudnn_graphs._handle(device) is first and bound[-1] == (first, 1)  # bound back
    other = []
    thread = threading.Thread(target=lambda: other.append(cudnn_graphs._handle(device)))
    thread.start()
    thread.join()
    assert other[0] not in (first, second)


QKV = (cudnn_graphs._Q, cudnn_graphs._K, cudnn_graphs._V)


def _by_uid(graph, uids, operands):
    """A launch's operands by role, each checked against the layout its graph was built for
    (``graph``: the build's name and layouts, in the builder's argument order)."""
    name, layouts = graph
    order = {
        "_forward_graph": (*QKV, cudnn_graphs._O, cudnn_graphs._STATS),
        "_backward_graph": (
            *QKV,
            cudnn_graphs._O,
            cudnn_graphs._DO,
            cudnn_graphs._STATS,
            cudnn_graphs._DQ,
            cudnn_graphs._DK,
            cudnn_graphs._DV,
        ),
    }[name]
    built = {uid: layout for uid, layout in zip(order, layouts) if layout is not None}
    assert len(uids) == len(operands) == len(built)
    by_uid = dict(zip(uids, operands, strict=True))
    for uid, x in by_uid.items():
        assert cudnn_graphs._layout(x) == built[uid], uid
    return by_uid


@pytest.fixture
def executed(monkeypatch):
    """The frontend stood in for: ``_graph`` returns the layouts, causality and scale it was
    asked for, and running a graph computes attention (float64) from its operands by uid, as
    cuDNN's graphs would: the backward from the bound output and LSE (``D = rowsum(dO * O)``,
    ``P = exp(S - LSE)``), so an output or LSE bound in another's place gives other gradients."""
    monkeypatch.setattr(
        cudnn_graphs,
        "_graph",
        lambda build, device, causal, scale, *layouts, **options: (
            ((build.__name__, layouts), causal, scale),
            1,
        ),
    )

    def execute(graph, workspace_bytes, uids, operands, device):
        built, causal, scale = graph
        x = _by_uid(built, uids, operands)
        q, k, v = (x[uid] for uid in QKV)
        scores = q @ k.transpose(-1, -2) * scale
        if causal:
            later = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(later, -math.inf)
        if built[0] == "_forward_graph":
            x[cudnn_graphs._O].copy_(torch.softmax(scores, -1) @ v)
            if cudnn_graphs._STATS in x:
                x[cudnn_graphs._STATS].copy_(torch.logsumexp(scores, -1, keepdim=True))
            return
        out, dout, stats = x[cudnn_graphs._O], x[cudnn_graphs._DO], x[cudnn_graphs._STATS]
        probs = torch.exp(scores - stats)
        dscores = probs * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        grads = (dscores @ k * scale, dscores.transpose(-1, -2) @ q * scale)
        grads += (probs.transpose(-1, -2) @ dout,)
        for uid, grad in zip((cudnn_graphs._DQ, cudnn_graphs._DK, cudnn_graphs._DV), grads):
            x[uid].copy_(grad)

    monkeypatch.setattr(cudnn_graphs, "_execute", execute)


@pytest.mark.parametrize("causal, scale", [(False, 0.5), (True, 0.3)])
def test_launchers_hand_each_operand_to_its_uid(executed, causal, scale):
    """The ordered form binds operands by position: an output, its LSE or dO in another's place
    computes something else silently. Strided views of [b, n, h, d] rows, as the core's."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (
        torch.randn(2, 16, 6, 8, generator=gen, dtype=torch.float64)[:, 1::2, 1:4] for _ in range(4)
    )
    out = torch.zeros(2, 8, 6, 8, dtype=torch.float64)[:, :, 2:5]
    lse = torch.zeros(2, 8, 6, dtype=torch.float64)[:, :, ::2]
    options = {"is_causal": causal, "scale": scale}
    want = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), **options
    )
    assert cudnn_graphs.forward_into(q, k, v, out, lse, causal, scale)
    torch.testing.assert_close(out.transpose(1, 2), want)
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).transpose(1, 2))
    grads = tuple(torch.zeros(2, 8, 3, 8, dtype=torch.float64) for _ in range(3))
    assert cudnn_graphs.backward_into(dout, q, k, v, out, lse, grads, causal, scale)
    inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))
    attention = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in inputs), **options
    )
    for grad, ref in zip(grads, torch.autograd.grad(attention.transpose(1, 2), inputs, dout)):
        torch.testing.assert_close(grad, ref)
