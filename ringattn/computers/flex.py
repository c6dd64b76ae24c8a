"""``flex``: dilated attention as FlexAttention block-sparse kernels.

Depends on the dilation layout (both are the same function, see ``docs/flex.md``):

* ``global``: per config, the sequence is permuted (``global_permutation``) so each segment's
  rows of one residue form a contiguous run; one ``flex_attention`` call whose BlockMask visits
  only the tiles on those diagonal runs (and below the diagonal when causal). Configs are merged
  by LSE. Under ``head_groups`` a group's heads use one residue of one config, so its call takes
  just those rows (the strided view ``o::r``, which that permutation would have gathered) and
  heads, and the groups' outputs sit side by side with no merge.
* ``segment_local`` (unpermuted): the *single-kernel* form. One call over the whole sequence with
  ``mask_mod = m > 0`` and ``score_mod = score + log m``, m = how many configs let q see k; its
  softmax *is* the merged mixture, no merge needed. Tiles can only be skipped outside segments, so
  configs with r > 1 waste work that the permuted layout avoids.

Block masks and permutations are built eagerly by :meth:`FlexComputer.prepare` and cached by the
memory manager, keyed by (n, h, configs, mixing, causal, device, block size). Gradients flow through
``flex_attention`` (its LSE included) by autograd; FlexAttention has no CPU backward, which
:meth:`FlexComputer.unsupported` reports before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.attention.flex_attention as flex_attention_module
from einops import rearrange
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ringattn import masks
from ringattn.capture import compiling
from ringattn.computers.base import LayoutComputer, accumulation_dtype
from ringattn.dilation.global_perm import global_permutation
from ringattn.memory.base import MemoryManager
from ringattn.merge import merge
from ringattn.pattern import Job, Plan, jobs_for
from ringattn.registry import register

if TYPE_CHECKING:
    from ringattn.strategy import Strategy

# torch >= 2.9 asks for auxiliary outputs this way; older releases take return_lse
AuxRequest: Any = getattr(flex_attention_module, "AuxRequest", None)


# Inductor's CPU FlexAttention kernel returns garbage or NaN rows for head dims 8 and 16 (torch
# 2.13, float32 and bfloat16: at lengths such as 8, 24, 40, 136, differently from run to run, as
# memory it never wrote would; head dims 1-4, 12, 20, 24 and from 32 up were right). Compiled on
# the CPU, head dims below this run zero-padded to it: the zeros add nothing to any logit, and
# the padded output columns are dropped.
CPU_COMPILED_MIN_HEAD_DIM = 32


def inductor_compiles_flex_on_cpu() -> bool:
    """Whether Inductor lowers FlexAttention for this CPU: torch's own test (x86 with AVX2, not
    ``ATEN_CPU_CAPABILITY=default``, not macOS, no XPU). Where it fails, Inductor raised a
    NotImplementedError deep inside the compile (torch 2.11 and 2.13); the module now refuses
    before any work. A torch without the test is taken at its word at compile time."""
    try:
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except ImportError:  # pragma: no cover (a torch that moved it)
        return True
    return bool(check_cpu_supported())


def _flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score_mod: masks.ScoreMod | None,
    block_mask: BlockMask,
    scale: float,
) -> Tensor:
    """``flex_attention`` on ``[b, n, h, d]`` tensors, output only."""
    d = q.shape[-1]
    pad = CPU_COMPILED_MIN_HEAD_DIM - d
    if pad > 0 and q.device.type == "cpu" and compiling():
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    q, k, v = (rearrange(x, "b n h d -> b h n d") for x in (q, k, v))
    # (output only: a Tensor by torch 2.13's overloads, where cast(Tensor, ...) is a redundant
    # cast; torch 2.11's annotations give a union: Any satisfies both releases' mypy)
    out: Tensor = cast(
        Any, flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    )
    return rearrange(out[..., :d], "b h n d -> b n h d")


def _flex_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score_mod: masks.ScoreMod | None,
    block_mask: BlockMask,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``flex_attention`` on ``[b, n, h, d]`` tensors, returning ``([b, n, h, d], [b, n, h])``."""
    q, k, v = (rearrange(x, "b n h d -> b h n d") for x in (q, k, v))
    if AuxRequest is not None:
        out, aux = cast(
            tuple[Tensor, Any],  # (output and AuxOutput; 2.11's annotations give a union)
            flex_attention(
                q,
                k,
                v,
                score_mod=score_mod,
                block_mask=block_mask,
                scale=scale,
                return_aux=AuxRequest(lse=True),
            ),
        )
        lse = aux.lse
    else:  # pragma: no cover
        out, lse = flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=True
        )
    return rearrange(out, "b h n d -> b n h d"), rearrange(lse, "b h n -> b n h")


# Inductor's CPU lowering of flex_attention cannot return the LSE, so on CPU the global layout's
# calls always run eagerly: under a user's torch.compile (fullgraph=False; with fullgraph=True
# the boundary refuses, see ``unsupported``) Dynamo gives them back to eager instead of failing
# inside Inductor. (Keyed on the device alone: Dynamo may run this frame eagerly after a break.)
_flex_with_lse_eager: Callable[
    [Tensor, Tensor, Tensor, masks.ScoreMod | None, BlockMask, float], tuple[Tensor, Tensor]
] = torch.compiler.disable(
    _flex_with_lse, reason="Inductor's CPU flex_attention cannot return the LSE"
)


@register("computer", "flex")
class FlexComputer(LayoutComputer):
    """``flex``: FlexAttention's block-sparse kernels over the whole sequence (this module's
    docstring); ``block_size``: its block masks' tile. One device only (``communicator=
    'local'``), no backward on the CPU: :meth:`unsupported` says which inputs it cannot run."""

    block_size: int = 128

    # the layouts whose mask functions flex has (ringattn.masks); any other dilation processor
    # would have run as "global" here, its own ``read`` never called
    dilations = ("segment_local", "global")

    @classmethod
    def incompatible_with(cls, strategy: Strategy) -> str | None:
        if strategy.communicator != "local":
            return "flex runs on one device (communicator='local') for now"
        if strategy.dilation not in cls.dilations:
            return (
                f"flex has mask functions for dilation in {cls.dilations} only; a new "
                f"dilation={strategy.dilation!r} needs its own (ringattn.masks, "
                "FlexComputer.prepare) before flex can run it"
            )
        return None

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
        if device.type == "meta":  # (global raised a RuntimeError from its index math)
            return "FlexAttention has no meta-device kernel; computer='math' runs on meta"
        if compiled and device.type == "cpu" and dilation == "global" and mixing != "head_groups":
            # (head_groups' calls each give their rows' output whole: nothing to merge)
            return (
                "compiled FlexAttention on CPU cannot return the LSE that merging configs needs; "
                "use dilation='segment_local' (the single-kernel form), or compile=False "
                "outside any torch.compile"
            )
        if device.type == "cpu" and traced:
            # (the module's own compiled frame takes them prepared, as its inputs)
            return (
                "traced by a torch.compile around the module, flex's masks are built inside the "
                "outer graph, which Inductor's CPU FlexAttention cannot lower (NoValidChoicesError "
                "in torch 2.13); leave the module to its own compiled frame: fullgraph=False "
                "breaks the outer graph there by itself; under fullgraph=True on CPU use "
                "computer='sdpa' or 'math'"
            )
        if compiled and device.type == "cpu" and dtype == torch.float64:
            return (
                "compiled FlexAttention on CPU takes float32, float16 and bfloat16 only; use "
                "compile=False (outside any torch.compile), or computer='sdpa' or 'math'"
            )
        if needs_grad and device.type != "cuda":
            return (
                "FlexAttention has no backward on CPU; run on CUDA, call under torch.no_grad(), "
                "or pick computer='sdpa'/'math' for training on CPU"
            )
        # (after the traced rule: torch's test reads the environment, which no trace should; last
        # of the CPU rules, whose own fixes name compile=False too)
        inductor = compiled and backend == "inductor"  # ("eager" / "aot_eager" lower nothing)
        if inductor and device.type == "cpu" and not inductor_compiles_flex_on_cpu():
            return (
                "Inductor compiles FlexAttention on the CPU only on x86 with AVX2, not on macOS "
                "nor with ATEN_CPU_CAPABILITY=default (torch's check_cpu_supported), and this "
                "machine fails that test; use compile=False (outside any torch.compile: flex then "
                "runs eagerly), or computer='sdpa' or 'math'"
            )
        if device.type == "cuda" and dtype == torch.float64:
            return "FlexAttention's CUDA kernels have no float64; use computer='math'"
        return None

    def prepare(
        self, plan: Plan, causal: bool, dilation: str, device: torch.device, memory: MemoryManager
    ) -> tuple[Any, ...]:
        key = (plan.n, plan.h, plan.configs, plan.mixing, causal, str(device), self.block_size)
        offsets = memory.cached(
            ("flex_offsets", *key), lambda: torch.tensor(plan.head_offsets(), device=device)
        )
        if dilation == "segment_local":
            block_mask = memory.cached(
                ("flex_mixture_mask", *key),
                lambda: self._mixture_mask(plan, causal, offsets),
            )
            return (block_mask, offsets)
        if plan.disjoint:
            return self._group_calls(plan, causal, device, memory, key)
        # (lse: every config has every head; head_groups, whose configs may have none, took
        # _group_calls above)
        configs = []
        for i, (w, r) in enumerate(plan.configs):
            perm = memory.cached(
                ("global_permutation", plan.n, w, r, str(device)),
                partial(global_permutation, plan.n, w, r, device),
            )
            inverse = memory.cached(
                ("global_permutation_inverse", plan.n, w, r, str(device)),
                partial(torch.argsort, perm),
            )
            block_mask = memory.cached(
                ("flex_run_mask", i, *key),
                partial(self._run_mask, plan.n, w, r, offsets[i], causal, device),
            )
            configs.append((perm, inverse, block_mask))
        return tuple(configs)

    def _group_calls(
        self,
        plan: Plan,
        causal: bool,
        device: torch.device,
        memory: MemoryManager,
        key: tuple[Hashable, ...],
    ) -> tuple[tuple[Job, BlockMask | None], ...]:
        """``head_groups`` under ``global``: one call per head group on its own heads and rows.

        A group's heads all use one config ``(w, r)`` and one offset ``o``, and since ``r``
        divides ``w`` their rows are ``p ≡ o (mod r)``: the strided view ``x[:, o::r, lo:hi]``,
        in which the config is plain segment-local attention over runs of ``w / r`` rows (what
        ``global_permutation`` makes of residue ``o``, with no gather). Each call is
        ``(job, block_mask)``; a group without rows (its offset past the last row) is all zeros
        (``block_mask`` None). Before, every group's call gathered and attended over all ``n``
        rows and ``h`` heads, masked down to its own, and the calls were LSE-merged."""
        calls: list[tuple[Job, BlockMask | None]] = []
        for job in jobs_for(plan.h, plan.configs, plan.mixing):
            n_rows = len(range(job.offset, plan.n, job.r))
            block_mask: BlockMask | None = None
            if n_rows:
                block_mask = memory.cached(
                    ("flex_group_mask", job.config, *key),
                    partial(
                        self._group_mask, n_rows, job.w // job.r, job.num_heads, causal, device
                    ),
                )
            calls.append((job, block_mask))
        return tuple(calls)

    def _group_mask(
        self, n_rows: int, run: int, heads: int, causal: bool, device: torch.device
    ) -> BlockMask:
        # runs of `run` rows, every head on them: one config (run, 1) at offset 0
        offsets = torch.zeros(heads, dtype=torch.long, device=device)
        return self._run_mask(n_rows, run, 1, offsets, causal, device)

    def _mixture_mask(self, plan: Plan, causal: bool, offsets: Tensor) -> BlockMask:
        mask_mod, _ = masks.multiplicity_mod(plan, causal, offsets)
        lo, hi = masks.mixture_kv_ranges(plan, offsets, self.block_size)
        return masks.block_mask_from_ranges(lo, hi, plan.n, self.block_size, mask_mod, causal)

    def _run_mask(
        self, n: int, w: int, r: int, head_offset: Tensor, causal: bool, device: torch.device
    ) -> BlockMask:
        run_id, run_residue = masks.run_layout(n, w, r, device)
        mask_mod = masks.run_mask_mod(run_id, run_residue, head_offset, causal)
        lo, hi = masks.run_kv_ranges(run_id, run_residue, head_offset, self.block_size)
        return masks.block_mask_from_ranges(lo, hi, n, self.block_size, mask_mod, causal)

    def attend(
        self,
        plan: Plan,
        causal: bool,
        scale: float,
        dilation: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        aux: tuple[Any, ...],
    ) -> Tensor:
        if not torch.is_grad_enabled():
            # FlexAttention refuses inputs that require grad on CPU even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        if dilation == "segment_local":
            block_mask, offsets = aux
            _, score_mod = masks.multiplicity_mod(plan, causal, offsets)
            return _flex(q, k, v, score_mod, block_mask, scale).to(q.dtype)
        if plan.disjoint:
            return self._attend_groups(q, k, v, aux, scale)
        outs, lses = [], []
        flex_with_lse = _flex_with_lse_eager if q.device.type == "cpu" else _flex_with_lse
        for perm, inverse, block_mask in aux:
            q_perm, k_perm, v_perm = (x.index_select(1, perm) for x in (q, k, v))
            out_perm, lse_perm = flex_with_lse(q_perm, k_perm, v_perm, None, block_mask, scale)
            outs.append(out_perm.index_select(1, inverse))
            lses.append(lse_perm.index_select(1, inverse))
        return merge(outs, lses, accumulation_dtype(q.dtype)).to(q.dtype)

    @staticmethod
    def _attend_groups(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        aux: tuple[tuple[Job, BlockMask | None], ...],
        scale: float,
    ) -> Tensor:
        """The groups' outputs side by side on the heads (the groups tile them in order); rows a
        group does not select stay 0, as ``head_groups`` defines them."""
        b, n, _, d = q.shape
        outs = []
        for job, block_mask in aux:
            out_group = q.new_zeros(b, n, job.num_heads, d)
            if block_mask is not None:
                q_group, k_group, v_group = (
                    x[:, job.offset :: job.r, job.heads] for x in (q, k, v)
                )
                # (into the same strided rows it read: no index to make or keep)
                out_group[:, job.offset :: job.r] = _flex(
                    q_group, k_group, v_group, None, block_mask, scale
                )
            outs.append(out_group)
        return torch.cat(outs, dim=2)
