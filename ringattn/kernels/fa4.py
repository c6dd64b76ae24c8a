"""FlashAttention-4's backward (``flash-attn-4``, CuTe DSL) for the blocks, where it is installed.

Why: on an H200, FA4's SM90 backward (a port of FlashAttention-3's) runs issue 5's 2048-row blocks
10-14% faster than the cuDNN backward torch calls, contiguous or as ``segment_local``'s strided
views, causal or not; its forward is 9-12% *slower* than cuDNN's on the same blocks
(``experiments/fa4_probe.py``; ``docs/benchmarks/h200_perf.md``, step 19). So ``sdpa`` keeps
cuDNN's forward and, where this module is available, hands its backward here. The two kernels
agree on what the backward needs: the output and the natural-log LSE of the rows (the core passes
the *merged* ones), so mixing them changes no definition, only rounding.

What FA4 takes: ``[B, L, H, d]`` q/k/v/out/dout with any 16-byte-aligned strides (our blocks and
offset runs are views of that form), the LSE as ``[B, H, L]`` float32, and optional
preallocated ``dq``/``dk``/``dv`` of any such strides, which it writes (placed blocks land in
place). It computes ``rowsum(dO * O)`` itself and accumulates dQ in a float32 workspace of the
block's size, like cuDNN.

Optional: :func:`available` is false without the package (CPU installs, CI), off SM90/SM100
GPUs, for other dtypes or head dims, and while tracing; callers then use the cuDNN backward. The
package is imported on first use, not with ``ringattn`` (the CuTe DSL's import takes seconds).
Each new (dtype, head dim, causal) compiles once per process, ~2-10 s on an H200.
Under ``torch.use_deterministic_algorithms(True)`` FA4 runs its deterministic backward (it
otherwise adds dQ with atomics, so gradients may differ in the last bits between runs).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

_DTYPES = (torch.float16, torch.bfloat16)
# compute capability majors whose FA4 backward this was measured on (9: H100/H200) or is built
# for (10/11: Blackwell)
_ARCHS = (9, 10, 11)


@cache
def _kernel() -> Callable | None:
    try:
        from flash_attn.cute.interface import _flash_attn_bwd
    except Exception:  # not installed, or its CUDA DSL cannot load here
        return None
    return _flash_attn_bwd


@cache
def _arch_ok(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] in _ARCHS


def installed() -> bool:
    """Whether ``flash_attn.cute`` imports in this process."""
    return _kernel() is not None


def available(q: Tensor) -> bool:
    """Whether FA4's backward can take blocks like ``q`` (``[B, L, H, d]``) here and now."""
    return (
        q.is_cuda
        and q.dtype in _DTYPES
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and not torch.compiler.is_compiling()
        and _arch_ok(q.device)
        and installed()
    )


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the blocks ``[B, L, H, d]`` given their (merged) ``out`` and ``lse``
    ``[B, L, H]``; written into ``grads`` (views of the same shapes) when given."""
    kernel = _kernel()
    assert kernel is not None, "fa4.backward called where fa4.available() is false"
    dq, dk, dv = grads if grads is not None else (None, None, None)
    return kernel(
        q,
        k,
        v,
        out.to(q.dtype),
        dout.to(q.dtype),
        lse.transpose(1, 2).float(),  # FA4 copies it to [B, H, L] contiguous (B * L * H floats)
        scale,
        causal,
        dq=dq,
        dk=dk,
        dv=dv,
        # FA4 accumulates dQ with atomics; its deterministic schedule orders them (slower)
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )[:3]
