"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) for the blocks, where it is installed.

Why: on an H200, FA4's SM90 backward (a port of FlashAttention-3's) runs issue 5's 2048-row blocks
10-14% faster than the cuDNN backward torch calls, contiguous or as ``segment_local``'s strided
views, causal or not (``experiments/fa4_probe.py``; ``docs/benchmarks/h200_perf.md``, step 19).
FA4's forward measured between 9% slower and 3% faster than cuDNN's on those blocks at the kernel
level (steps 19-20), but through the whole module, with its launches replayed (:func:`_launch`),
3-8% faster from 1M tokens and never consistently slower below, causal or not (step 21), and it
passes the GPU oracle check. So ``sdpa`` hands both directions here where this module is available
(``SDPAComputer.cuda_forward`` / ``cuda_backward``). The two libraries agree on what the backward
needs: the output and the natural-log LSE of the rows (the core passes the *merged* ones), so mixing
them changes no definition, only rounding.

What FA4 takes: ``[B, L, H, d]`` q/k/v/out/dout with any 16-byte-aligned strides (our blocks and
offset runs are views of that form), the LSE as ``[B, H, L]`` float32, and optional
preallocated ``out`` and ``dq``/``dk``/``dv`` of any such strides, which it writes (placed blocks
land in place). Its LSE output must be contiguous along ``L``, which our ``[b, n, h]`` rows are
not, so a placed forward's LSE is copied (``B * L * H`` floats). The backward computes
``rowsum(dO * O)`` itself and accumulates dQ in a float32 workspace of the block's size, like
cuDNN.

Optional: :func:`available` is false without the package (CPU installs, CI), off SM90/SM100
GPUs, for other dtypes or head dims, and while tracing; callers then use torch's kernels. The
package is imported on first use, not with ``ringattn`` (the CuTe DSL's import takes seconds).
Each new (dtype, head dim, causal) compiles once per process, ~2-10 s on an H200.

FA4's Python launcher (it re-derives its configuration, checks every operand and rebuilds its
compile key on every call) took ~0.1-0.2 ms of host time per call, more than the small blocks'
kernels take; so each block signature's first call is recorded and later calls replay its kernel
launches (``ringattn.kernels.replay``; ``REPLAY = False`` is the A/B). Nothing is recorded while
a CUDA graph is captured (a recording's check syncs the host).

Under ``torch.use_deterministic_algorithms(True)`` FA4 runs its deterministic backward (it
otherwise adds dQ with atomics, so gradients may differ in the last bits between runs). That one
zeroes semaphores in Python, so it keeps calling the launcher instead of a replay.
"""

from __future__ import annotations

import importlib
import math
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from functools import cache, partial
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from ringattn import capture
from ringattn.kernels import replay

_DTYPES = (torch.float16, torch.bfloat16)
# compute capability majors whose FA4 backward this was measured on (9: H100/H200) or is built
# for (10/11: Blackwell)
_ARCHS = (9, 10, 11)


# a fused kernel's registry key (its signature: dtype, head dim, causality, ...)
_Key = TypeVar("_Key", bound=Hashable)

# the packages whose absence means "flash-attn-4 is not installed" (the optional extra)
_NOT_INSTALLED = ("flash_attn", "flash_attn.cute")


# FA4's SM90 backward tiles: the fields of ``flash_attn.cute.interface.BwdConfig`` in order, ints
# and bools (:data:`BACKWARD_CONFIG`)
BackwardTiles = tuple[int, ...]


class Kernels(NamedTuple):
    forward: Callable[..., Any]  # FA4's _flash_attn_fwd (untyped)
    backward: Callable[..., Any]  # FA4's _flash_attn_bwd (untyped)
    # the compile caches (owner -> attribute name) through which they launch their kernels, for
    # ringattn.kernels.replay
    caches: Mapping[Any, str]
    # backward_tiles(config): a context manager under which FA4's SM90 backward takes the tiles
    # ``config`` (BACKWARD_CONFIG's fields; None: FA4's own)
    backward_tiles: Callable[[BackwardTiles | None], AbstractContextManager[None]]


@cache
def _kernels() -> Kernels | None:
    """FA4's launchers and compile caches, or None where they cannot be imported.

    Not installed: None, quietly (an optional extra). Installed but failing to load (a missing
    dependency, a CUDA DSL that does not run here): None and a warning that says why, once; sdpa
    then runs torch's kernels, which compute the same function more slowly, and nobody should
    have to find that out from a benchmark."""
    try:
        interface = importlib.import_module("flash_attn.cute.interface")
    except ImportError as exc:
        if exc.name not in _NOT_INSTALLED:
            _warn_unusable(exc)
        return None
    except Exception as exc:
        _warn_unusable(exc)
        return None
    caches = {
        owner: "compile_cache"
        for owner in vars(interface).values()
        if callable(owner) and hasattr(owner, "compile_cache")
    }
    return Kernels(
        interface._flash_attn_fwd, interface._flash_attn_bwd, caches, partial(_tiles, interface)
    )


@contextmanager
def _tiles(interface: Any, config: BackwardTiles | None) -> Iterator[None]:  # (FA4's, untyped)
    """FA4's SM90 backward launcher takes its tiles from ``_tile_size_bwd_sm90`` and no
    argument: swapped for the call (under the launchers' lock; FA4's compile key holds them)."""
    if config is None:
        yield
        return
    with _LAUNCHER_LOCK:
        own = interface._tile_size_bwd_sm90
        interface._tile_size_bwd_sm90 = lambda *args, **kwargs: interface.BwdConfig(*config)
        try:
            yield
        finally:
            interface._tile_size_bwd_sm90 = own


def _loaded() -> Kernels:
    """:func:`_kernels` where a caller has checked :func:`available`."""
    kernels = _kernels()
    assert kernels is not None, "FA4 called where fa4.available() is false"
    return kernels


@cache
def swapped_cache(name: str) -> Any:  # FA4's JIT cache (untyped), or a dict
    """A compile cache for FA4's kernels compiled with a swap of ringattn's (``fa4_add``,
    ``fa4_dpsum``), apart from FA4's own caches, one per ``name``: FA4's JIT cache under that
    name (on disk where FA4's cache is, FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1), or a dict
    where FA4 has no such cache (its stand-in in the tests; ``cache`` keeps one per name)."""
    try:
        cache_utils = importlib.import_module("flash_attn.cute.cache_utils")
    except ImportError:
        return {}
    return cache_utils.get_jit_cache(name)


@contextmanager
def swapped_kernels(
    launcher: str, cache_name: str, module: str, attribute: str, replace: Callable[[Any], Any]
) -> Iterator[None]:
    """While inside: FA4's launcher ``interface.<launcher>`` compiles into and finds its kernels
    in a compile cache of ringattn's (:func:`swapped_cache` ``(cache_name)``), with
    ``<module>.<attribute>`` (something FA4's kernel code reads while it compiles) set to
    ``replace(<its value>)``: the swaps of ``fa4_add`` and ``fa4_dpsum``. The caller holds
    the launchers' lock (``_launch``'s ``kernels``)."""
    interface: Any = importlib.import_module("flash_attn.cute.interface")
    owner, where = getattr(interface, launcher), importlib.import_module(module)
    saved_cache, own = owner.compile_cache, getattr(where, attribute)
    owner.compile_cache = swapped_cache(cache_name)
    setattr(where, attribute, replace(own))
    try:
        yield
    finally:
        owner.compile_cache = saved_cache
        setattr(where, attribute, own)


def _warn_unusable(exc: BaseException) -> None:
    warnings.warn(
        f"flash-attn-4 is installed but cannot be loaded ({type(exc).__name__}: {exc}); "
        "sdpa runs torch's attention kernels instead",
        RuntimeWarning,
        stacklevel=3,
    )


def refuse(
    registry: MutableMapping[_Key, Any], key: _Key, why: str, kernel: str, instead: str
) -> str:
    """A fused kernel's first-call guard (``fa4_merge``, ``fa4_zero``, ``fa4_add``,
    ``fa4_group``, ``fa4_group_bwd``) refusing ``kernel`` for ``key``: marked refused in its
    ``registry`` (never tried again), and a warning of what it is, why, and what runs instead
    (the same function). Returns ``why`` (the module's ``last_refusal``, for probes)."""
    registry[key] = False
    warnings.warn(
        f"ringattn: {kernel} is not used for {key}: {why}; {instead}", RuntimeWarning, stacklevel=5
    )
    return why


def call_guarded(
    compiled: Mapping[_Key, Any],
    lock: AbstractContextManager[Any],
    key: _Key,
    q: Tensor,
    first_call: Callable[[], bool],
    run: Callable[[Any], None],
) -> bool:
    """``run(kernel)`` with the kernel ``compiled`` keeps for ``key`` (a fused kernel's registry,
    ``fa4_merge`` / ``fa4_zero``: the kernel, or False once refused). A key's first call runs
    ``first_call()`` instead, once, under ``lock``: it compiles, checks and keeps or refuses the
    kernel, and its return is the call's; never while a CUDA graph is captured (it syncs). False
    where no kernel ran (nothing written; the caller takes the plain path)."""
    kernel = compiled.get(key)
    if kernel is None:
        if capturing(q):
            return False
        with lock:
            if key not in compiled:
                return first_call()
        kernel = compiled[key]
    if kernel is False:
        return False
    run(kernel)
    return True


def output_agrees(got: Tensor, want: Tensor) -> tuple[bool, float]:
    """Whether a fused kernel's output ``got`` is the plain path's ``want`` within 4 units in the
    last place of its dtype at ``want``'s largest magnitude (at least 1), and the largest error.

    In their own dtype, with one temporary of their size: the difference, exact where the two
    are within a factor of 2 of each other (Sterbenz), and a larger one fails anyway. Float32
    copies of whole blocks (four of them alive at once) were most of a first forward's peak,
    1.26-1.44x of (q, k, v, out) at 2M tokens (h200_perf.md step 70)."""
    if not want.numel():
        return True, 0.0
    err = torch.linalg.vector_norm(got - want, ord=math.inf).item()  # (NaN where one is)
    largest = torch.linalg.vector_norm(want, ord=math.inf).item()
    return err <= 4 * torch.finfo(want.dtype).eps * max(largest, 1.0), err


def lse_agrees(got: Tensor, want: Tensor) -> bool:
    """Whether a fused kernel's LSE ``got`` is ``want``: infinite in the same places, within
    float32 fast-math error (1e-3) elsewhere."""
    finite = torch.isfinite(want)
    return torch.equal(finite, torch.isfinite(got)) and (
        not finite.any() or (got[finite] - want[finite]).abs().max().item() < 1e-3
    )


@cache
def _arch_ok(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] in _ARCHS


def installed() -> bool:
    """Whether ``flash_attn.cute`` imports in this process."""
    return _kernels() is not None


def available(q: Tensor) -> bool:
    """Whether FA4 can take blocks like ``q`` (``[B, L, H, d]``) here and now."""
    return (
        q.is_cuda
        and q.dtype in _DTYPES
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and not capture.compiling()
        and _arch_ok(q.device)
        and installed()
    )


# FA4's SM90 backward rounds the head dim up to a multiple of 32 for its dQ workspace; at other
# head dims (40, 80 on an H200, fp16 and bf16) its dQ came out wrong for blocks of 128 rows or more
# (relative error 0.5-0.9; dK, dV and the forward right), silently: experiments/gpu_fuzz.py found
# it. Those head dims take torch's backward (cuDNN).
BACKWARD_HEAD_DIM_MULTIPLE = 32


def backward_available(q: Tensor) -> bool:
    """:func:`available` for the backward: also a head dim FA4's backward computes right."""
    return available(q) and q.shape[-1] % BACKWARD_HEAD_DIM_MULTIPLE == 0


def sm90(q: Tensor) -> bool:
    """:func:`available` on an SM90 GPU (H100/H200): where the fused variants of FA4's SM90
    kernels (``fa4_merge``, ``fa4_zero``, ``fa4_add``) apply."""
    return q.is_cuda and available(q) and torch.cuda.get_device_capability(q.device)[0] == 9


# FA4's SM90 forward tile configuration per causality, ``(tile_m, tile_n, mma_pv_is_rs,
# intra_wg_overlap)``, or None for FA4's own choice: the A/B of ``experiments/fa4_probe.py --part
# config``. Read by every forward call (its replays are keyed by it) and by the compiled merging
# and zeroing forwards (``fa4_merge.compile_forward``: their compile keys include it). A sweep on
# 2048-row causal blocks had ``(128, 128, False, True)`` 4% faster than the default (step 20).
ForwardTiles = tuple[int, int, bool, bool]
FORWARD_CONFIG: dict[bool, ForwardTiles | None] = {False: None, True: None}

# FA4's SM90 backward tile configuration per ``(head dim, causal)``: the fields of
# ``flash_attn.cute.interface.BwdConfig`` in order (tile_m, tile_n, Q / dO / PdS stages, SdP /
# dKV / dQ swapAB, atom layouts M-SdP / N-dKV / M-dQ[, num_wg, dQ_single_wg]); one not here takes
# FA4's own (C++ FA3's choice on an H100). Read by every backward call (FA4's launcher through
# Kernels.backward_tiles, the replays' keys, the adding backward's and the grouped backward's
# keys and workspaces): the A/B of experiments/overheads.py --bwd-tiles; fa4_probe --part
# bwd_sweep times them on 2048-row blocks.
BACKWARD_CONFIG: dict[tuple[int, bool], BackwardTiles] = {}


def backward_config(head_dim: int, causal: bool) -> BackwardTiles | None:
    """:data:`BACKWARD_CONFIG`'s entry for these blocks (None: FA4's own)."""
    config = BACKWARD_CONFIG.get((head_dim, causal))
    if config is not None and not (isinstance(config, tuple) and 11 <= len(config) <= 13):
        raise ValueError(
            "fa4.BACKWARD_CONFIG's entries must be tuples of BwdConfig's 11 to 13 fields, got "
            f"{config!r} for {(head_dim, causal)}"
        )
    return config


# the blocks' leading (batch and segment) entries a fused kernel's first call is checked on
# (ringattn.kernels.fa4_add, fa4_dpsum, fa4_merge, fa4_zero, fa4_group), two so that an entry
# past the first is checked too: the kernels compile for the layouts, not the count, and the
# whole of a 2M-token block took GBs of temporaries there: on an 80 GB H100 the first
# forward+backward of lse at 2M ran out of memory in that check, where every later call fits,
# and the forward checks' copies took a first forward to 1.11-1.13x of (q, k, v, out)
# (h200_perf.md steps 70-71)
CHECKED_BATCH = 2


def first_entries(*blocks: Tensor | None) -> tuple[Any, ...]:
    """The blocks' first :data:`CHECKED_BATCH` entries (views; None stays None): what a fused
    kernel's first call is checked on before the call's own launch."""
    return tuple(None if x is None else x[:CHECKED_BATCH] for x in blocks)


# what FA4's backward is compiled and scheduled for (:func:`backward_signature`)
BackwardSignature = tuple[torch.dtype, int, bool, bool, BackwardTiles | None]


def backward_signature(q: Tensor, causal: bool) -> BackwardSignature:
    """What FA4's backward is compiled and scheduled for with blocks like ``q``: dtype, head dim,
    causality, the deterministic order (``torch.use_deterministic_algorithms``) and
    :data:`BACKWARD_CONFIG`'s tiles. The key of the swapped backwards' first-call guards
    (``fa4_add``, ``fa4_dpsum``)."""
    head_dim = q.shape[-1]
    deterministic = torch.are_deterministic_algorithms_enabled()
    return q.dtype, head_dim, causal, deterministic, backward_config(head_dim, causal)


# the choices of the fused kernels' switches that say which calls take them: causal ones, all,
# or none (fa4_group.PERSISTENT and fa4_group_bwd.ZEROING)
WHEN = ("causal", "always", "never")


def takes(setting: str, name: str, causal: bool) -> bool:
    """Whether a switch set to ``setting`` (one of :data:`WHEN`; ``name``: the switch, for the
    ``ValueError`` a stray value gets) takes a call of this causality."""
    if setting not in WHEN:
        raise ValueError(f"{name} must be one of {WHEN}, got {setting!r}")
    return setting == "always" or (setting == "causal" and causal)


# replays of FA4's recorded calls by signature (None: that signature calls FA4's launcher);
# REPLAY = False always calls the launcher (the A/B: experiments/fa4_probe.py --part replay)
REPLAY = True
_REPLAYS: dict[tuple[str, Hashable], replay.Replay | None] = {}
# recording, and the adding backward's launches (ringattn.kernels.fa4_add), swap FA4's module
# state
_LAUNCHER_LOCK = threading.RLock()
_MAX_REPLAYS = 4096  # a bound, not a working set: a plan has a handful of block signatures


def _launch(
    kind: str,
    launcher: Callable[[], Any],
    operands: tuple[Tensor | None, ...],
    flags: tuple[object, ...],
    results: Callable[[Any], tuple[Tensor, ...]],
    accumulating: tuple[int, ...] = (),
    kernels: Callable[[], AbstractContextManager[None]] | None = None,
    memo: dict[str, Any] | None = None,
) -> tuple[Tensor, ...]:
    """``results(launcher())``, through the replay of its signature's first call where there is
    one (FA4's Python launcher costs more host time than a small block's kernel takes).
    ``kernels``: entered around every call of the launcher (not around replays), under which it
    compiles and finds other kernels (``ringattn.kernels.fa4_add``); ``accumulating``: the
    operands those add into (``ringattn.kernels.replay.record``). ``memo``: a prepared
    launch's own dict, where its operands' layouts (the same in every call) are kept."""
    key = None
    if REPLAY:
        layouts = None if memo is None else memo.get("layouts")
        if layouts is None:
            layouts = replay.operand_layouts(operands)
            if memo is not None:
                memo["layouts"] = layouts
        key = (kind, replay.signature(operands, *flags, layouts=layouts))
    known = _REPLAYS.get(key) if key is not None else None
    if known is not None:
        return known(operands)
    if kernels is not None:  # they swap FA4's module state: no other launcher runs beside them
        with _LAUNCHER_LOCK, kernels():
            return _launch(kind, launcher, operands, flags, results, accumulating, memo=memo)
    # recording swaps FA4's compile caches for the call, and the adding kernels its module
    # state: no launcher runs beside either (a graph captured in one thread while another
    # recorded or added ran the adding kernel into uninitialised gradients)
    with _LAUNCHER_LOCK:
        if capturing(operands[0]):  # a recording syncs to check its replay: capture forbids it
            return results(launcher())
        if key is None or key in _REPLAYS:
            return results(launcher())
        result, recorded = replay.record(
            launcher, _loaded().caches, operands, results, accumulating
        )
        if len(_REPLAYS) >= _MAX_REPLAYS:
            _REPLAYS.clear()
        _REPLAYS[key] = recorded
        return results(result)


def capturing(q: Tensor | None) -> bool:
    """Whether a CUDA graph is being captured on ``q``'s stream (a replay may be captured, a
    recording may not: ``compile_mode="reduce-overhead"`` or a user's ``torch.cuda.graph``)."""
    return q is not None and q.is_cuda and capture.capturing()


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    out: Tensor | None = None,
    memo: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [B, L, H, d], lse [B, L, H])`` of the blocks; ``out`` written into when given.
    ``memo``: a dict of the caller's, kept between calls with operands of the same layouts (a
    prepared launch's), in which the launch's replay key is partly kept."""
    flash_fwd = _loaded().forward
    config = FORWARD_CONFIG.get(causal)
    tiles: dict[str, Any] = {}
    if config is not None:
        tiles.update(zip(("mma_pv_is_rs", "intra_wg_overlap"), config[2:]))
        tiles["tile_mn"] = config[:2]

    def launcher() -> Any:  # (FA4's result, untyped)
        return flash_fwd(
            q, k, v, softmax_scale=scale, causal=causal, return_lse=True, out=out, **tiles
        )

    flags = (causal, scale, config)
    result, lse = _launch("fwd", launcher, (q, k, v, out), flags, lambda r: r[:2], memo=memo)
    return result, lse.transpose(1, 2)


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    grads: tuple[Tensor | None, Tensor, Tensor] | None = None,
    kernels: Callable[[], AbstractContextManager[None]] | None = None,
    memo: dict[str, Any] | None = None,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the blocks ``[B, L, H, d]`` given their (merged) ``out`` and ``lse``
    ``[B, L, H]``; written into ``grads`` (views of the same shapes; a None one is allocated)
    when given. ``kernels``: a context manager under which FA4's launcher compiles and finds
    other kernels of the same signatures, which add into the gradients they are given instead of
    writing them (``ringattn.kernels.fa4_add``); its calls are recorded and replayed under a key
    of their own. ``memo``: as :func:`forward`'s. ``dlse``: the rows' ``−rowsum(out∘dout)``
    ``[B, L, H]``, which FA4's preprocess then takes instead of reading ``out`` and ``dout``
    (``ringattn.kernels.fa4_dpsum``, whose kernels are entered inside ``kernels``)."""
    flash_bwd = _loaded().backward
    dq, dk, dv = grads if grads is not None else (None, None, None)
    out, dout = out.to(q.dtype), dout.to(q.dtype)
    # FA4 wants it [B, H, L] contiguous; copied here rather than inside FA4's launcher, whose
    # calls can then be replayed (B * L * H floats either way; none where the core gathered
    # them so: launches.packed)
    lse_bhl = lse.transpose(1, 2).float().contiguous()
    # the gradients the adding kernels add into (ringattn.kernels.fa4_add; none otherwise)
    adds = (
        ()
        if kernels is None
        else tuple(i for i, g in zip((6, 7, 8), (dq, dk, dv)) if g is not None)
    )
    given: dict[str, Tensor] = {}
    if dlse is not None:
        given["dlse"] = dlse.transpose(1, 2).float().contiguous()
        from ringattn.kernels import fa4_dpsum  # (it imports this module)

        kernels = fa4_dpsum.with_given_dpsum(kernels)
        if memo is not None:  # (its layouts are of ten operands then, not nine)
            memo = memo.setdefault("dlse", {})
    # FA4 accumulates dQ with atomics; its deterministic schedule orders them (slower)
    deterministic = torch.are_deterministic_algorithms_enabled()
    config = backward_config(q.shape[-1], causal)

    def launcher() -> Any:  # (FA4's result, untyped)
        with _loaded().backward_tiles(config):
            return flash_bwd(
                q,
                k,
                v,
                out,
                dout,
                lse_bhl,
                scale,
                causal,
                dq=dq,
                dk=dk,
                dv=dv,
                deterministic=deterministic,
                **given,
            )

    operands = (q, k, v, out, dout, lse_bhl, dq, dk, dv, *given.values())
    flags = (causal, scale, deterministic, config)
    if kernels is None:
        computed = _launch("bwd", launcher, operands, flags, lambda r: r[:3], memo=memo)
    else:
        kind = f"bwd:{kernels.__name__}"
        computed = _launch(kind, launcher, operands, flags, lambda r: r[:3], adds, kernels, memo)
    return computed[0], computed[1], computed[2]
