"""A merged block's forward as one FA4 kernel: attention and the LSE merge in its epilogue.

Why: under ``mixing="lse"`` every block after the first was FA4's forward into temporaries plus
:mod:`ringattn.kernels.merge` reading them back with the accumulator rows; at 131K tokens the
merges were 9.5% of the causal forward's GPU time (``docs/benchmarks/h200_perf.md``, step 22).
:mod:`ringattn.kernels.fa4_merge_sm90` folds the merge into FA4's epilogue, and this module
compiles and launches it (FA4's own launcher insists on an LSE contiguous along the rows, which
the ``[b, n, h]`` accumulator's views are not, so the kernel is compiled here, with every stride
of the LSE left to run time).

Held to the two-kernel path: the first call of each compiled kernel runs both on the same
operands, its blocks' first entries (``fa4.CHECKED_BATCH``), and keeps the kernel only if they
agree (output within bf16/fp16 rounding, LSE within float32 fast-math error), then merges the
call's blocks with it; a kernel that fails to compile or to agree is not used again in this
process, with a warning that says why, and its blocks take the two-kernel path, which computes
the same function. SM90 (H100/H200) only: the Blackwell forward is another class.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ringattn.kernels import fa4

# the A/B switch (experiments/fa4_probe.py --part merge), read on every call: False merges with
# a second kernel
ENABLED = True

# what a compiled kernel is specialised for (:func:`_key`)
Key = tuple[torch.dtype, int, bool, int | None, fa4.ForwardTiles | None]
# a compiled forward, as ``launch(q, k, v, out, lse_bhl or None, scale)``
Launch = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor | None, float], None]
_Kernel = TypeVar("_Kernel")

# compiled kernels (Launch) by _key(); False: failed to compile or to agree
_COMPILED: dict[Key, Any] = {}
_LOCK = threading.Lock()
# why the latest kernel was refused (for probes: experiments/fa4_probe.py --part merge)
last_refusal: str | None = None


def supported(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> bool:
    """Whether the fused kernel takes these blocks here: an SM90 GPU with FA4, and
    :func:`layout_ok`."""
    return fa4.sm90(q) and layout_ok(q, k, v, out, lse)


def layout_ok(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> bool:
    """``q, k, v, out [B, L, H, d]`` of one dtype with 16-byte aligned rows, and ``lse [B, L,
    H]`` float32 (any strides: the kernel writes it element by element; None: not written):
    views the kernel reads and writes by pointer and stride. Nothing broadcast, except along
    dims of size 1 (a stride 0 would be compiled in as a constant; :func:`forward_merge_`
    re-strides those)."""
    if lse is not None and (
        lse.dtype != torch.float32
        or lse.data_ptr() % 4
        or lse.shape != q.shape[:3]
        or _broadcast(lse)
    ):
        return False
    if out.shape != q.shape:
        return False
    # one key head per query head, v as wide as q (the kernel's assumptions): a grouped-heads
    # or other-width k / v would be read past or misread; keys may be as many as the block has
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] or v.shape != k.shape:
        return False
    for x in (q, k, v, out):
        if x.dtype != q.dtype or x.stride(-1) != 1 or x.data_ptr() % 16 or _broadcast(x):
            return False
        if any(stride % 8 for stride in x.stride()[:-1]):
            return False
    return True


def _broadcast(x: Tensor) -> bool:
    return any(stride == 0 and size > 1 for size, stride in zip(x.shape, x.stride()))


def _unit_dims_restrided(x: Tensor) -> Tensor:
    """``x`` with a stride of 8 (any multiple of 16 bytes will do) along its size-1 dims of
    stride 0: the same elements, and no stride the kernel would take for a constant."""
    if all(stride for stride in x.stride()):
        return x
    return x.as_strided(x.shape, tuple(stride or 8 for stride in x.stride()))


def _key(q: Tensor, causal: bool, lse: Tensor) -> Key:
    """What a compiled kernel is specialised for: the dtype, head dim, causality, which dim of
    the ``[B, H, L]`` LSE view has stride 1 (the CuTe DSL compiles a unit stride in as a
    constant; None: no such dim, every stride dynamic), and ``fa4.FORWARD_CONFIG``'s tiles."""
    unit = next((i for i, s in enumerate(lse.transpose(1, 2).stride()) if s == 1), None)
    return q.dtype, q.shape[-1], causal, unit, fa4.FORWARD_CONFIG.get(causal)


def forward_merge_(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, out: Tensor, lse: Tensor
) -> bool:
    """In place: ``(out, lse) <- merge((out, lse), attention(q, k, v))`` for blocks ``[B, L, H,
    d]`` (``lse [B, L, H]``), as one kernel. False where that kernel is not usable (nothing was
    written then; the caller merges with two kernels)."""
    if not ENABLED:
        return False
    key = _key(q, causal, lse)
    q, k, v, out, lse = (_unit_dims_restrided(x) for x in (q, k, v, out, lse))
    return fa4.call_guarded(
        _COMPILED,
        _LOCK,
        key,
        q,
        lambda: _first_call(key, q, k, v, causal, scale, out, lse),
        lambda kernel: kernel(q, k, v, out, lse.transpose(1, 2), scale),
    )


def merger(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, out: Tensor, lse: Tensor
) -> Callable[[Tensor, Tensor, Tensor, float, Tensor, Tensor], bool]:
    """:func:`forward_merge_` for views of these (example) views' layouts, as ``call(q, k, v,
    scale, out, lse)``, with the compile key and the re-striding decided here once: a prepared
    launch calls it every forward (``ringattn.core.merging_launch``)."""
    key = _key(q, causal, lse)
    restride = any(0 in x.stride() for x in (q, k, v, out, lse))

    def call(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor, lse: Tensor) -> bool:
        kernel = _COMPILED.get(key)
        if not kernel or restride or not ENABLED:  # first call, refused, off, or unusual
            return forward_merge_(q, k, v, causal, scale, out, lse)
        kernel(q, k, v, out, lse.transpose(1, 2), scale)
        return True

    return call


def _compile(key: Key, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_bhl: Tensor) -> Launch:
    sm90 = importlib.import_module("ringattn.kernels.fa4_merge_sm90")
    return compile_forward(key, q, k, v, out, lse_bhl, sm90.MergingForwardSm90, sm90.__file__)


def compile_forward(
    key: tuple[Any, ...],  # (a Key, then whatever the class is specialised for)
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse_bhl: Tensor | None,
    kernel_class: Callable[..., Any],  # (a CuTe DSL kernel class)
    source: str | None = None,
) -> Launch:
    """A subclass of FA4's SM90 forward compiled for operands like these, as ``launch(q, k, v,
    out, lse_bhl, scale)``: ``key`` starts with the dtype, head dim, causality, the LSE's
    unit-stride dim and the tile configuration or None (:func:`_key`) and holds whatever else the
    class is specialised for;
    ``kernel_class`` takes FA4's constructor arguments; ``lse_bhl`` (``[B, H, L]``) may be None
    (no LSE written). With the path of the class's ``source`` file, the compiled kernel is kept
    in FA4's JIT cache (on disk with FA4's own kernels where that cache is enabled,
    ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``: a later process loads it instead of compiling),
    under a key that changes with that file and this one."""
    cute = importlib.import_module("cutlass.cute")
    dsl_utils = importlib.import_module("flash_attn.cute.cute_dsl_utils")
    aux = importlib.import_module("flash_attn.cute.utils").AuxData(None, None)
    dtype, head_dim, causal, lse_unit_dim, config = key[:5]
    kernel = forward_kernel(kernel_class, dtype, head_dim, causal, config)
    tensors = [dsl_utils.to_cute_tensor(x) for x in (q, k, v)]
    tensors.append(dsl_utils.to_cute_tensor(out, assumed_align=16))
    tensors.append(None if lse_bhl is None else lse_tensor(lse_bhl, lse_unit_dim))
    # FA4's SM90 kernel arguments after the softmax scale, none of which the blocks use:
    # cu_seqlens q/k, seqused q/k, page table, window left/right, learnable sink, block
    # sparsity, then (empty) aux data and the two varlen scheduler hints
    unused = (*(None,) * 9, aux, None, None)
    cache = _jit_cache() if source else None
    cache_key = source and (_digest(source), _digest(__file__), *key, lse_bhl is None)
    if cache is not None and cache_key in cache:
        compiled = cache[cache_key]
    else:
        stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        compiled = cute.compile(kernel, *tensors, 1.0, *unused, stream, options="--enable-tvm-ffi")
        if cache is not None:
            cache[cache_key] = compiled

    def launch(
        q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_bhl: Tensor | None, scale: float
    ) -> None:
        compiled(q, k, v, out, lse_bhl, scale, *unused)

    return launch


def forward_kernel(
    kernel_class: Callable[..., _Kernel],
    dtype: torch.dtype,
    head_dim: int,
    causal: bool,
    config: fa4.ForwardTiles | None,
    **extra: Any,
) -> _Kernel:
    """``kernel_class`` (a subclass of FA4's SM90 forward) made as FA4's launcher makes its
    forward for these blocks: FA4's tiles for the head dim and causality, or
    ``fa4.FORWARD_CONFIG``'s ``config`` where it is not None; ``extra``: the subclass's own
    arguments."""
    dsl_utils = importlib.import_module("flash_attn.cute.cute_dsl_utils")
    interface = importlib.import_module("flash_attn.cute.interface")
    cfg = interface._tile_size_fwd_sm90(head_dim, head_dim, causal, False)
    if config is not None:
        cfg = type(cfg)(*config)
    return kernel_class(
        dsl_utils.torch2cute_dtype_map[dtype],
        head_dim,
        head_dim,
        1,
        is_causal=causal,
        is_local=False,
        pack_gqa=False,
        tile_m=cfg.m_block_size,
        tile_n=cfg.n_block_size,
        num_stages=2,
        num_threads=384,
        Q_in_regs=False,
        intra_wg_overlap=cfg.intra_wg_overlap,
        mma_pv_is_rs=cfg.mma_pv_is_rs,
        q_subtile_factor=1,
        **extra,
    )


def lse_tensor(lse_bhl: Tensor, unit_dim: int | None) -> Any:  # (a CuTe DSL tensor, untyped)
    """An ``[B, H, L]`` LSE view as the kernels' CuTe tensor: ``unit_dim`` (the dim of stride 1,
    :func:`_key`) compiled in as such, or every stride left to run time where there is none.
    (FA4's own launcher takes L contiguous; a block's rows of the ``[b, n, h]`` accumulator have
    H contiguous, or no dim at all when the block's heads are strided.)"""
    dsl_utils = importlib.import_module("flash_attn.cute.cute_dsl_utils")
    if unit_dim is None:
        return dsl_utils.to_cute_tensor(lse_bhl, assumed_align=4, fully_dynamic=True)
    return dsl_utils.to_cute_tensor(lse_bhl, assumed_align=4, leading_dim=unit_dim)


@functools.cache
def _jit_cache() -> Any:  # (FA4's JIT cache, untyped)
    return importlib.import_module("flash_attn.cute.cache_utils").get_jit_cache("ringattn_forward")


@functools.cache
def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _first_call(
    key: Key, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, out: Tensor, lse: Tensor
) -> bool:
    """Compile ``key``'s kernel, hold it to the two-kernel path on the blocks' first entries
    (:func:`_checked`) and, where kept, merge the call's blocks with it: the first call's result
    is every later call's. False where it was refused (operands untouched, for the caller's two
    kernels)."""
    kernel = _checked(key, fa4.first_entries(q, k, v, out, lse), causal, scale)
    if kernel is None:
        return False
    kernel(q, k, v, out, lse.transpose(1, 2), scale)
    return True


def _checked(
    key: Key, blocks: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], causal: bool, scale: float
) -> Launch | None:
    """``key``'s kernel compiled and run on ``blocks`` (q, k, v, out, lse: a few entries, for a
    whole block's copies here took GBs at 2M tokens), its merge held to the two-kernel path's;
    the kernel where they agree, else None (refused: recorded as False, not used again). The
    operands end as they were either way."""
    from ringattn.merge import merge_into_

    q, k, v, out, lse = blocks

    out_old, lse_old = out.clone(), lse.clone()
    try:
        kernel = _compile(key, q, k, v, out, lse.transpose(1, 2))
        kernel(q, k, v, out, lse.transpose(1, 2), scale)
    except Exception as exc:  # the CuTe DSL or this FA4 version rejects the kernel
        out.copy_(out_old), lse.copy_(lse_old)
        _refuse(key, f"it failed to compile or launch ({type(exc).__name__}: {exc})")
        return None
    out_two, lse_two = out_old.clone(), lse_old.clone()
    merge_into_(out_two, lse_two, *fa4.forward(q, k, v, causal, scale))
    out_ok, out_err = fa4.output_agrees(out, out_two)
    lse_ok = fa4.lse_agrees(lse, lse_two)
    out.copy_(out_old), lse.copy_(lse_old)
    if not (out_ok and lse_ok):
        _refuse(key, f"it disagreed with the two-kernel merge (output error {out_err:.3g})")
        return None
    _COMPILED[key] = kernel
    return kernel


def _refuse(key: Key, why: str) -> None:
    global last_refusal
    last_refusal = fa4.refuse(
        _COMPILED,
        key,
        why,
        "FA4's forward with the merge in its epilogue",
        "merged blocks take FA4's forward and a separate merge kernel",
    )
