"""A stand-in for FlashAttention-4 (``flash-attn-4``) on the CPU, for the tests.

FA4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` contracts (they assert the layouts, compute
attention and its flash backward in float64, write ``out`` / ``dq``, ``dk``, ``dv`` when given)
and their structure (a Python launcher that allocates and launches "compiled kernels" through
compile caches, so ``ringattn.kernels.replay`` records and replays them as it does FA4's).
:func:`installed` puts it in place of the real kernels (tests/test_fa4.py, and the gloo workers of
tests/test_distributed.py).
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch

import ringattn.api
from ringattn.kernels import fa4, fa4_dpsum


def _scores(q, k, softmax_scale: float, causal: bool) -> torch.Tensor:
    """``[B, H, Lq, Lk]`` float64 scores of ``[B, L, H, d]`` blocks. Causal as FA4 defines it:
    aligned to the bottom right (query ``i`` sees keys ``j <= i + Lk - Lq``), which differs from
    torch's top-left ``is_causal`` when ``Lq != Lk``; a caller relying on either fails the oracle
    here."""
    scores = q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1) * softmax_scale
    if causal:
        rows, cols = q.shape[1], k.shape[1]
        mask = torch.ones(rows, cols, dtype=torch.bool).triu(1 + cols - rows)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


class _CompileCache:
    """An owner of a ``compile_cache``, as FA4's launcher functions are."""

    def __init__(self) -> None:
        self.compile_cache: dict = {}


class FakeFA4:
    """FA4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` contracts, computed in float64, and their
    structure: a Python launcher that checks the operands, allocates what is not given (outputs,
    the LSE, a float32 dQ workspace) and launches "compiled kernels" through compile caches (so
    ``ringattn.kernels.replay`` records and replays them as it does FA4's). Counts the launcher's
    calls and the kernels' runs."""

    def __init__(self) -> None:
        self.calls = 0  # backward launcher
        self.into = 0  # backward into given gradients
        self.forward_calls = 0
        self.forward_into = 0
        self.forward_runs = 0  # kernel runs, through the launcher or a replay
        self.forward_tiles: dict = {}  # the tile options of the latest launcher call
        self.backward_runs = 0
        self.backward_config = None  # the tiles backward_tiles swaps in, for the calls under it
        self.backward_configs: list = []  # each backward launcher call's tiles
        self.given_dlse = 0  # backward launcher calls handed a dLSE
        self.unloaded_runs = 0  # backward kernel runs that formed dPsum from the dLSE alone
        self.unloading = False  # under given_dpsum: the preprocess reads no O / dO
        self.fwd, self.bwd = _CompileCache(), _CompileCache()
        self.caches = {self.fwd: "compile_cache", self.bwd: "compile_cache"}

    def kernels(self) -> fa4.Kernels:
        return fa4.Kernels(self.forward, self.backward, self.caches, self.backward_tiles)

    @contextmanager
    def backward_tiles(self, config):
        """Records the tiles of the backward launcher calls under it (FA4's own swap them in)."""
        self.backward_config = config
        try:
            yield
        finally:
            self.backward_config = None

    @contextmanager
    def given_dpsum(self):
        """``ringattn.kernels.fa4_dpsum.given_dpsum_kernels``' stand-in: the backward launched
        under it forms dPsum from the given dLSE alone, as FA4's preprocess compiled without its
        O / dO loads does (into kernels of their own, as there: a compile key of their own)."""
        saved, self.unloading = self.unloading, True
        try:
            yield
        finally:
            self.unloading = saved

    def forward(self, q, k, v, *, softmax_scale, causal, return_lse, out=None, **tiles):
        self.forward_calls += 1
        assert set(tiles) <= {"tile_mn", "mma_pv_is_rs", "intra_wg_overlap"}, tiles
        self.forward_tiles = tiles
        b, length, h, d = q.shape
        assert k.shape == v.shape and k.shape[::2] == (b, h) and k.shape[-1] == d and return_lse
        if out is not None:
            self.forward_into += 1
            assert out.shape == q.shape and out.dtype == q.dtype
            assert out.stride(-1) == 1  # FA4 checks the layout it writes
        else:
            out = torch.empty(b, length, h, d, dtype=q.dtype)
        lse = torch.empty(b, h, length, dtype=torch.float32)
        key = ("fwd", causal)
        if key not in self.fwd.compile_cache:
            self.fwd.compile_cache[key] = self._forward_kernel
        self.fwd.compile_cache[key](q, k, v, out.detach(), lse, softmax_scale, causal)
        return out, lse, None, None, None

    def _forward_kernel(self, q, k, v, out, lse, softmax_scale, causal):
        self.forward_runs += 1
        scores = _scores(q, k, softmax_scale, causal)
        lse.copy_(torch.logsumexp(scores, dim=-1))  # [B, H, L]
        out.copy_((torch.softmax(scores, dim=-1) @ v.double().transpose(1, 2)).transpose(1, 2))

    def backward(
        self,
        q,
        k,
        v,
        out,
        dout,
        lse,
        softmax_scale,
        causal,
        *,
        dq=None,
        dk=None,
        dv=None,
        deterministic=False,
        dlse=None,
    ):
        self.calls += 1
        self.deterministic = deterministic
        self.backward_configs.append(self.backward_config)
        b, length, h, d = q.shape
        assert out.shape == dout.shape == q.shape and k.shape == v.shape
        assert k.shape[::2] == (b, h) and k.shape[-1] == d
        assert lse.shape == (b, h, length) and lse.dtype == torch.float32
        assert lse.is_contiguous()  # else FA4's launcher copies it (no replay)
        assert out.dtype == dout.dtype == q.dtype
        if any(x is not None for x in (dq, dk, dv)):  # each may be given (fa4_add: dk, dv)
            self.into += 1
        for given_, like in zip((dq, dk, dv), (q, k, v)):
            assert given_ is None or (given_.shape == like.shape and given_.dtype == like.dtype)
        dq, dk, dv = (
            torch.empty_like(like) if given_ is None else given_
            for given_, like in zip((dq, dk, dv), (q, k, v))
        )
        if dlse is not None:  # FA4's dLSE: its preprocess forms rowsum(O∘dO) - dLSE
            self.given_dlse += 1
            assert dlse.shape == lse.shape and dlse.dtype == torch.float32
            assert dlse.is_contiguous()  # else FA4's launcher copies it (no replay)
        dq_accum = torch.empty(b, h, length * d, dtype=torch.float32)
        if deterministic:  # FA4 zeroes its dQ semaphores in Python: work a replay would skip
            torch.zeros(b, h, dtype=torch.int32)
        unloaded = self.unloading and dlse is not None
        key = ("bwd", causal, unloaded)
        if key not in self.bwd.compile_cache:
            self.bwd.compile_cache[key] = partial(self._backward_kernel, unloaded=unloaded)
            self.bwd.compile_cache["postprocess"] = self._postprocess_kernel
        self.bwd.compile_cache[key](
            q, k, v, out, dout, lse, dlse, dq_accum, dk, dv, softmax_scale, causal
        )
        self.bwd.compile_cache["postprocess"](dq_accum, dq)
        return dq, dk, dv, None  # FA4 may return more than the three

    def _backward_kernel(
        self, q, k, v, out, dout, lse, dlse, dq_accum, dk, dv, softmax_scale, causal, unloaded=False
    ):
        self.backward_runs += 1
        b, length, h, d = q.shape
        qf, kf, vf, of, dof = (x.double().transpose(1, 2) for x in (q, k, v, out, dout))
        scores = _scores(q, k, softmax_scale, causal)
        probs = torch.exp(scores - lse.double().unsqueeze(-1))
        dv.copy_((probs.transpose(-1, -2) @ dof).transpose(1, 2))
        dp = dof @ vf.transpose(-1, -2)
        self.unloaded_runs += unloaded
        dpsum = 0.0 if unloaded else (dof * of).sum(-1, keepdim=True)
        if dlse is not None:
            dpsum = dpsum - dlse.double().unsqueeze(-1)
        ds = probs * (dp - dpsum)
        dq_accum.copy_((ds @ kf * softmax_scale).reshape(b, h, length * d))
        dk.copy_((ds.transpose(-1, -2) @ qf * softmax_scale).transpose(1, 2))

    def _postprocess_kernel(self, dq_accum, dq):
        b, length, h, d = dq.shape
        dq.copy_(dq_accum.view(b, h, length, d).transpose(1, 2))


@contextmanager
def installed(kernel: FakeFA4) -> Iterator[FakeFA4]:
    """Routes ``ringattn.kernels.fa4`` to ``kernel`` inside the block (CPU tensors stand in for
    CUDA ones; float64 stays on torch's kernels as on a GPU), and back after it. The functional
    API's cached modules are fresh inside too: a module prepares its launches once, so one made
    elsewhere (without FA4, or under other switches) would never offer the block's kernels."""
    names = ("_kernels", "_REPLAYS", "available", "BACKWARD_HEAD_DIM_MULTIPLE")
    saved = {name: getattr(fa4, name) for name in names}
    saved_modules = ringattn.functional._MODULES, ringattn.functional._EVERY_MODULE
    saved_given = fa4_dpsum.given_dpsum_kernels
    fa4_dpsum.given_dpsum_kernels = kernel.given_dpsum
    fa4._kernels = kernel.kernels
    fa4._REPLAYS = {}  # replays launch the kernels they recorded
    fa4.available = lambda q: q.dtype != torch.float64
    fa4.BACKWARD_HEAD_DIM_MULTIPLE = 1  # the stand-in's backward is right at every head dim
    ringattn.functional._MODULES, ringattn.functional._EVERY_MODULE = (
        OrderedDict(),
        types.SimpleNamespace(),
    )
    try:
        yield kernel
    finally:
        for name, value in saved.items():
            setattr(fa4, name, value)
        fa4_dpsum.given_dpsum_kernels = saved_given
        ringattn.functional._MODULES, ringattn.functional._EVERY_MODULE = saved_modules
