"""``sdpa``: PyTorch's fused attention kernels, called through the aten ops that return the LSE.

``torch.nn.functional.scaled_dot_product_attention`` hides the log-sum-exp that merging configs
needs, so this computer calls the same kernels one level down:

* CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (+ its backward), any float dtype;
* CUDA, fp16/bf16: cuDNN attention (``_scaled_dot_product_cudnn_attention``) for head dims up to
  128 — the kernel dense ``F.scaled_dot_product_attention`` itself picks on Hopper, about twice
  FlashAttention-2's TFLOP/s there (``experiments/sdpa_backends.py``) — else FlashAttention-2
  (``_scaled_dot_product_flash_attention``); ``SDPAComputer.cuda_backend = "flash"`` forces the
  latter (the benchmark's A/B row). Blocks that are placed rather than merged
  (:meth:`forward_into` / :meth:`backward_into`) go to the same cuDNN kernels through NVIDIA's
  cuDNN frontend where it is installed (``ringattn.kernels.cudnn_graphs``), which writes into
  the strided rows directly instead of allocating and copying; ``SDPAComputer.in_place = False``
  turns that off (A/B);
* CUDA, fp32: memory-efficient attention (``_scaled_dot_product_efficient_attention``).

On SM90/SM100 GPUs with fp16/bf16, where ``flash-attn-4`` is installed (the ``fa4`` extra), both
directions go to FlashAttention-4's kernels instead (``ringattn.kernels.fa4``), their launches
replayed from each block signature's first call (``ringattn.kernels.replay``: FA4's Python launcher
costs more host time than a small block's kernel). Same-process A/B on an H200
(docs/benchmarks/h200_perf.md, steps 19 and 21): the backward 10-14% faster than cuDNN's on our
blocks; the forward 3-8% faster from 1M tokens and at 131K `lse`, within the run-to-run spread at
131K `head_groups`, causal, and at 32K (host-bound). Both libraries take the merged output and LSE,
so the function is the same. ``SDPAComputer.cuda_backward = "torch"`` / ``cuda_forward = "torch"``
turn each off (A/B). Placed blocks' outputs and gradients are written in place by FA4 itself.

The kernels are chosen here, not by ``torch.nn.attention.sdpa_kernel``: its backend flags (and
``torch.backends.cuda.enable_*_sdp``) apply to ``F.scaled_dot_product_attention`` only, which this
computer does not call. For plain PyTorch matmuls use the ``math`` computer; to leave FA4 or the
in-place cuDNN graphs out, the switches above.

The kernels take ``[B, H, L, d]``; our blocks are ``[B, L, H, d]`` so the transposes are views. The
forward kernels take the strided (dilated) views as they are; torch's backward kernels get
contiguous copies of ``dout`` and ``out`` where they want them, and on the CPU of every input.

Under ``torch.use_deterministic_algorithms(True)`` every backward kernel chosen here is a
deterministic one (two runs give the same bits): FA4 and the cuDNN frontend take their
deterministic schedules; ``head_groups``' one-launch FA4 backward (``fa4_group_bwd``, which adds dQ
atomically and has no such schedule) steps aside for each config's own FA4 backward; torch's cuDNN
backward op, which has none either, is left out as torch's own dispatch leaves it out (unless
``warn_only``), for FlashAttention-2's (deterministic in that mode). The mode is part of
:meth:`SDPAComputer.launch_options`, so switching it takes effect on the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from ringattn import pattern
from ringattn.computers.base import (
    BackwardGroup,
    BlockComputer,
    ForwardGroup,
    Rows,
    RowsLSE,
    accumulation_dtype,
)
from ringattn.kernels import (
    cudnn_graphs,
    fa4,
    fa4_add,
    fa4_dpsum,
    fa4_group,
    fa4_group_bwd,
    fa4_merge,
    fa4_zero,
)
from ringattn.registry import register

aten = torch.ops.aten
# read once, eagerly: torch.backends.cudnn.is_available() cannot be traced by Dynamo
CUDNN_AVAILABLE: bool = torch.backends.cudnn.is_available()
CUDA_BACKWARDS = ("auto", "torch")
CUDA_FORWARDS = ("auto", "torch")
# where head dims that are not whole 16-byte vectors are padded (CPU kernels take any)
PADDED_DEVICE_TYPES = ("cuda",)


def _bhld(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def _bhld_contiguous(x: Tensor) -> Tensor:
    # The CPU flash backward's inputs as contiguous [b, h, L, d]. Written for a torch 2.13
    # pre-release whose Inductor fake kernel assumed contiguous gradients (rows came out
    # shifted for non-contiguous inputs). On the releases tested now (2.11, 2.13.0) such inputs
    # give the same gradients, eager and under Inductor, and no test fails without the copies
    # (a mutation audit, 2026-12-05). Kept: a copy on the CPU only, and the kernel then sees the
    # layouts it is tested with (stride-0 expanded views included).
    return x.transpose(1, 2).contiguous()


def _unpacked_head_dim(q: Tensor) -> bool:
    """Whether ``q``'s rows are not a whole number of 16 bytes on CUDA: torch's CUDA kernels
    refuse such head dims ("head_size must be a multiple of 8", FlashAttention) and cuDNN / FA4
    are not called for them; F.scaled_dot_product_attention pads them, and so does this."""
    return q.device.type in PADDED_DEVICE_TYPES and q.shape[-1] * q.element_size() % 16 != 0


def _padded_head_dim(*xs: Tensor) -> list[Tensor]:
    """``xs`` with zeros appended to their head dim up to a multiple of 16 bytes: they add
    nothing to ``q . k`` (the scale is passed explicitly) and their output columns are dropped."""
    multiple = 16 // xs[0].element_size()
    extra = -xs[0].shape[-1] % multiple
    return [torch.nn.functional.pad(x, (0, extra)) for x in xs]


def _bhl1(lse: Tensor) -> Tensor:
    # cuDNN keeps its LSE as [B, H, L, 1]
    return lse.unsqueeze(-1).contiguous()


@register("computer", "sdpa")
class SDPAComputer(BlockComputer):
    """``sdpa``: PyTorch's fused attention kernels, and FlashAttention-4's where installed (this
    module's docstring says which runs where). The class attributes below choose kernels for
    A/B runs; a change takes effect at the next call (:meth:`launch_options`)."""

    # "auto": cuDNN where it applies (CUDA, fp16/bf16, head dim <= 128), else FlashAttention-2
    cuda_backend = "auto"
    # placed blocks through the cuDNN frontend, written in place (where it is installed)
    in_place = True
    # "auto": FlashAttention-4's backward where it runs (ringattn.kernels.fa4), else torch's;
    # "torch": always torch's kernels (the A/B)
    cuda_backward = "auto"
    # "auto": FlashAttention-4's forward where it runs, else torch's; "torch": torch's kernels
    # (cuDNN; placed blocks through the frontend), the A/B
    cuda_forward = "auto"

    def launch_options(self) -> tuple[Hashable, ...]:
        return (
            self.cuda_backend,
            self.in_place,
            self.cuda_backward,
            self.cuda_forward,
            self.fa4_backward_merge,
            fa4_zero.ENABLED,
            fa4_group.ENABLED,
            fa4_group_bwd.ENABLED,
            # (read when the one launches are made: whether a plan takes one, its zeros)
            fa4_group.PERSISTENT,
            fa4_group.ALL_TILES_MAX,
            fa4_group_bwd.ZEROING,
            fa4_group_bwd.ALL_TILES_MAX,
            torch.are_deterministic_algorithms_enabled(),
        )

    def _cudnn(self, q: Tensor) -> bool:
        return (
            self.cuda_backend != "flash"
            and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 128
            and q.shape[-1] % 8 == 0
            and q.shape[1] > 1  # its backward: "s_q = s_kv = 1 is not supported" (or a crash)
            and CUDNN_AVAILABLE
        )

    def _cudnn_backward(self, q: Tensor) -> bool:
        """:meth:`_cudnn` for torch's cuDNN backward op: left out under strict deterministic
        algorithms, as torch's own dispatch does (``check_cudnn_deterministic``; that op has no
        deterministic schedule), for FlashAttention-2's backward."""
        return self._cudnn(q) and not (
            torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled()
        )

    def _in_place(self, q: Tensor) -> bool:
        return self.in_place and self._cudnn(q) and cudnn_graphs.available(q)

    def _fa4(self, choice: str, q: Tensor) -> bool:
        """Whether a direction whose setting is ``choice`` (cuda_forward / cuda_backward) runs on
        FA4 (cuda_backend "flash" is the FlashAttention-2 A/B: both directions stay on it)."""
        return choice == "auto" and self.cuda_backend != "flash" and fa4.available(q)

    def _fa4_backward(self, q: Tensor) -> bool:
        """:meth:`_fa4` for the backward (``cuda_backward``), at the head dims it is right for."""
        return self._fa4(self.cuda_backward, q) and fa4.backward_available(q)

    def unsupported(
        self,
        dtype: torch.dtype,
        device: torch.device,
        needs_grad: bool,
        *,
        compiled: bool = False,
        dilation: str = "",
        traced: bool = False,
        mixing: str = "",
        backend: str = "inductor",
    ) -> str | None:
        if self.cuda_backward not in CUDA_BACKWARDS:
            return (
                f"SDPAComputer.cuda_backward must be one of {CUDA_BACKWARDS}, "
                f"got {self.cuda_backward!r}"
            )
        if self.cuda_forward not in CUDA_FORWARDS:
            return (
                f"SDPAComputer.cuda_forward must be one of {CUDA_FORWARDS}, "
                f"got {self.cuda_forward!r}"
            )
        if device.type == "cuda" and dtype == torch.float64:
            return "the CUDA fused kernels have no float64; use computer='math'"
        if device.type not in ("cpu", "cuda"):
            return f"no fused kernel wired up for device type {device.type!r}; use computer='math'"
        return None

    def forward(
        self, q: Rows, k: Rows, v: Rows, causal: bool, scale: float
    ) -> tuple[Rows, RowsLSE]:
        if _unpacked_head_dim(q):
            q_padded, k_padded, v_padded = _padded_head_dim(q, k, v)
            out, lse = self.forward(q_padded, k_padded, v_padded, causal, scale)
            return out[..., : q.shape[-1]], lse
        if self._fa4(self.cuda_forward, q):
            return fa4.forward(q, k, v, causal, scale)
        qt, kt, vt = _bhld(q), _bhld(k), _bhld(v)
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                qt, kt, vt, 0.0, causal, scale=scale
            )
        elif self._cudnn(q):
            out, lse = aten._scaled_dot_product_cudnn_attention(
                qt, kt, vt, None, True, 0.0, causal, False, scale=scale
            )[:2]
            lse = lse.squeeze(-1)
        elif q.dtype == torch.float32:
            out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
                qt, kt, vt, None, True, 0.0, causal, scale=scale
            )
            lse = lse[..., : q.shape[1]]  # the kernel pads the row dim of its LSE to 32
        else:
            out, lse = aten._scaled_dot_product_flash_attention(
                qt, kt, vt, 0.0, causal, False, scale=scale
            )[:2]
        return _bhld(out), lse.transpose(1, 2)

    def backward(
        self,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        causal: bool,
        scale: float,
    ) -> tuple[Rows, Rows, Rows]:
        if _unpacked_head_dim(q):
            dout_p, q_p, k_p, v_p, out_p = _padded_head_dim(dout, q, k, v, out)
            dq, dk, dv = self.backward(dout_p, q_p, k_p, v_p, out_p, lse, causal, scale)
            d = q.shape[-1]
            return dq[..., :d], dk[..., :d], dv[..., :d]
        if self._fa4_backward(q):
            return fa4.backward(dout, q, k, v, out, lse, causal, scale)
        lse_bhl = lse.transpose(1, 2).to(accumulation_dtype(q.dtype))
        if q.device.type == "cpu":
            dout, q, k, v, out = (_bhld_contiguous(x.to(q.dtype)) for x in (dout, q, k, v, out))
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout,
                q,
                k,
                v,
                out,
                lse_bhl.contiguous(),
                0.0,
                causal,
                scale=scale,
            )
        elif q.dtype == torch.float32:
            b, length, h, _ = q.shape
            padded = -(-length // 32) * 32
            lse_padded = lse_bhl.new_zeros(b, h, padded)
            lse_padded[..., :length] = lse_bhl
            seed = torch.empty((), dtype=torch.int64, device=q.device)
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                _bhld(dout).contiguous(),
                _bhld(q),
                _bhld(k),
                _bhld(v),
                None,
                _bhld(out).contiguous(),
                lse_padded,
                seed,
                seed,
                0.0,
                [True, True, True, False],
                causal,
                scale=scale,
            )
        elif self._cudnn_backward(q):
            length = q.shape[1]
            seed = torch.zeros((), dtype=torch.int64, device=q.device)
            # torch <= 2.11 caches the cuDNN backward graph by q/k/v sizes and strides alone; a
            # cached graph replayed with other dout/out strides reads out of bounds (seen on an
            # H200). So dout/out strides must follow from that key: q's own strides (blocks of
            # the core's [b, n, h, d] tensors, no block-sized copies), else contiguous.
            if not dout.stride() == out.stride() == q.stride():
                dout, out = dout.contiguous(), out.contiguous()
            dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
                _bhld(dout),
                _bhld(q),
                _bhld(k),
                _bhld(v),
                _bhld(out),
                _bhl1(lse_bhl),
                seed,
                seed,
                None,
                None,
                None,
                length,
                length,
                0.0,
                causal,
                scale=scale,
            )
        else:
            length = q.shape[1]
            seed = torch.empty((), dtype=torch.int64, device=q.device)
            # FlashAttention works in [B, L, H, d] and makes dout/out contiguous in *that* layout;
            # handing it exactly that avoids a second copy inside the op.
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                _bhld(dout.contiguous()),
                _bhld(q),
                _bhld(k),
                _bhld(v),
                _bhld(out.contiguous()),
                lse_bhl.contiguous(),
                None,
                None,
                length,
                length,
                0.0,
                causal,
                seed,
                seed,
                scale=scale,
            )
        return _bhld(dq), _bhld(dk), _bhld(dv)

    def forward_into(
        self,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        out: Rows,
        lse: RowsLSE | None,
    ) -> None:
        if self._fa4(self.cuda_forward, q):
            _fa4_forward_into(q, k, v, causal, scale, out, lse)
            return
        if not (self._in_place(q) and cudnn_graphs.forward_into(q, k, v, out, lse, causal, scale)):
            super().forward_into(q, k, v, causal, scale, out, lse)

    def backward_into(
        self,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        causal: bool,
        scale: float,
        grads: tuple[Rows, Rows, Rows],
    ) -> None:
        if self._fa4_backward(q):
            fa4.backward(dout, q, k, v, out, lse, causal, scale, grads)
            return
        if not (
            self._in_place(q)
            and cudnn_graphs.backward_into(dout, q, k, v, out, lse, grads, causal, scale)
        ):
            super().backward_into(dout, q, k, v, out, lse, causal, scale, grads)

    def forward_launcher(
        self, causal: bool, scale: float, q: Rows, k: Rows, v: Rows, out: Rows, lse: RowsLSE | None
    ) -> Callable[[Rows, Rows, Rows, Rows, RowsLSE | None], None]:
        if self._fa4(self.cuda_forward, q):
            memo: dict[str, Any] = {}  # its views' layouts never change: fa4 keeps them here

            def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> None:
                _fa4_forward_into(q, k, v, causal, scale, out, lse, memo)

            return launch
        if self._in_place(q):
            graphed = cudnn_graphs.forward_launcher(q, k, v, out, lse, causal, scale)
            if graphed is not None:
                return graphed
        return super().forward_launcher(causal, scale, q, k, v, out, lse)

    def places_whole_blocks(self, q: Tensor) -> bool:
        # FA4 writes the output rows in place; its only temporary is the block's LSE (floats)
        return self._fa4(self.cuda_forward, q)

    # FA4's placed backward writes the gradients in place and keeps one block-sized temporary,
    # its float32 dQ accumulator: two bf16 blocks' worth, where pattern.BLOCK_SPLIT's parts were
    # sized for about five (cuDNN's gradients and workspace). So its parts may be this many times
    # larger for a transient no higher, in fewer launches (1: the plan's parts). H200 (h200_perf.md
    # step 29, two turns each): lse's 32K causal forward+backward 4-10% faster, 131K 1-3%,
    # head_groups within noise; forward+backward peak 1.03x (head_groups) / 1.05x (lse) -> 1.07x
    fa4_backward_merge = 2

    def placed_backward_split(self, q: Tensor) -> int | None:
        if not self._fa4_backward(q) or self.fa4_backward_merge == 1:
            return None
        return max(1, pattern.BLOCK_SPLIT // self.fa4_backward_merge)

    def packs_backward_lse(self, q: Tensor) -> bool:
        # FA4's backward copies each block's LSE to [B, H, L] contiguous (ringattn.kernels.fa4)
        return self._fa4_backward(q)

    def shares_backward_dpsum(self, q: Tensor) -> bool:
        # FA4's preprocess takes each row's dPsum as given (ringattn.kernels.fa4_dpsum)
        return fa4_dpsum.ENABLED and self._fa4_backward(q) and fa4_dpsum.supported(q)

    def merging_launcher(
        self, causal: bool, scale: float, q: Rows, k: Rows, v: Rows, out: Rows, lse: RowsLSE
    ) -> Callable[[Rows, Rows, Rows, Rows, RowsLSE], bool] | None:
        # FA4's forward with the merge in its epilogue (ringattn.kernels.fa4_merge)
        if not (self._fa4(self.cuda_forward, q) and fa4_merge.supported(q, k, v, out, lse)):
            return None

        merge = fa4_merge.merger(q, k, v, causal, out, lse)

        def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> bool:
            return merge(q, k, v, scale, out, lse)

        return launch

    def zeroing_launcher(
        self,
        causal: bool,
        scale: float,
        shifts: tuple[int, ...],
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE | None,
    ) -> Callable[[Rows, Rows, Rows, Rows, RowsLSE | None], bool] | None:
        # FA4's forward writing the rows a head_groups config leaves out (ringattn.kernels.fa4_zero;
        # its ENABLED switch also decides here, and is in launch_options: flipping it re-prepares)
        if not (
            fa4_zero.ENABLED
            and self._fa4(self.cuda_forward, q)
            and fa4_zero.supported(q, k, v, out, lse, shifts)
        ):
            return None

        zero = fa4_zero.zeroer(q, k, v, causal, out, lse, shifts)

        def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> bool:
            return zero(q, k, v, scale, out, lse)

        return launch

    def grouped_launcher(
        self,
        causal: bool,
        scale: float,
        groups: list[ForwardGroup],
        shifts: list[tuple[int, ...]],
    ) -> Callable[[list[ForwardGroup]], bool] | None:
        # every config's blocks in one FA4 kernel (ringattn.kernels.fa4_group; its ENABLED
        # switch also decides here, as fa4_zero's does)
        if not (
            fa4_group.ENABLED
            and self._fa4(self.cuda_forward, groups[0][0])
            and fa4_group.supported(groups, shifts, causal)
        ):
            return None

        group = fa4_group.grouper(groups, causal, shifts)

        def launch(groups: list[ForwardGroup]) -> bool:
            return group(groups, scale)

        return launch

    def grouped_backward_launcher(
        self,
        causal: bool,
        scale: float,
        groups: list[BackwardGroup],
        scratch: Callable[[str, tuple[int, ...]], Tensor],
        shifts: tuple[tuple[int, ...], ...] = (),
    ) -> Callable[..., bool] | None:
        # every config's backward in one FA4 kernel (ringattn.kernels.fa4_group_bwd; its ENABLED
        # switch also decides here); it adds dQ atomically, with no deterministic schedule
        if not (
            fa4_group_bwd.ENABLED
            and not torch.are_deterministic_algorithms_enabled()
            and self._fa4_backward(groups[0][1])
            and fa4_group_bwd.supported(groups)
        ):
            return None

        zeroing = any(shifts) and fa4_group_bwd.zeroing(causal)
        call = fa4_group_bwd.grouper(groups, causal, scratch, shifts if zeroing else ())

        def launch(
            groups_of: fa4_group_bwd.GroupsOf, dout: Tensor, out: Tensor, lse: Tensor, index: Tensor
        ) -> bool:
            return call(groups_of, out, dout, lse, index, scale)

        launch.zeroes_unselected = zeroing  # type: ignore[attr-defined]  # (its groups' shifts)
        return launch

    def adding_launcher(
        self,
        causal: bool,
        scale: float,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        dq: Rows,
        dk: Rows,
        dv: Rows,
    ) -> Callable[..., tuple[Tensor, ...] | None] | None:
        # FA4's backward with its dK / dV stores as TMA reduce-adds and its dQ postprocess
        # adding (ringattn.kernels.fa4_add)
        if not (self._fa4_backward(q) and fa4_add.supported(q)):
            return None

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
            dlse: Tensor | None = None,
        ) -> tuple[Tensor, ...] | None:
            return fa4_add.backward_add_(
                dout, q, k, v, out, lse, causal, scale, dq, dk, dv, dlse=dlse
            )

        return launch

    def backward_launcher(
        self,
        causal: bool,
        scale: float,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        dq: Rows,
        dk: Rows,
        dv: Rows,
    ) -> Callable[..., None]:
        if self._fa4_backward(q):
            memo: dict[str, Any] = {}  # as forward_launcher's

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
                dlse: Tensor | None = None,
            ) -> None:
                dlse = fa4_dpsum.usable(dlse, dout, q, k, v, out, lse, causal, scale)
                grads = (dq, dk, dv)
                fa4.backward(dout, q, k, v, out, lse, causal, scale, grads, memo=memo, dlse=dlse)

            return launch
        if self._in_place(q):
            graphed = cudnn_graphs.backward_launcher(
                dout, q, k, v, out, lse, dq, dk, dv, causal, scale
            )
            if graphed is not None:
                return graphed
        return super().backward_launcher(causal, scale, dout, q, k, v, out, lse, dq, dk, dv)


def _fa4_forward_into(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    out: Tensor,
    lse: Tensor | None,
    memo: dict[str, Any] | None = None,
) -> None:
    # FA4 writes the output rows in place; its LSE must be contiguous along L, ours is not
    lse_block = fa4.forward(q, k, v, causal, scale, out=out, memo=memo)[1]
    if lse is not None:
        lse.copy_(lse_block)
