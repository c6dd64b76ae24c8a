"""The cuDNN frontend's graphs (ringattn.kernels.cudnn_graphs) are built once per everything a
graph bakes in, and a build that failed for want of memory is not remembered as declined. The
frontend itself needs CUDA: the builds here are stand-ins."""

from __future__ import annotations

import pytest
import torch

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
