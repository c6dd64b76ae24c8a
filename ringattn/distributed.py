"""Sequence parallelism helpers: sharding along n, process groups, cross-rank consistency.

Each rank of a process group holds the contiguous shard ``[b, n/p, h, d]`` of q, k, v: rank ``i``
holds positions ``[i·n/p, (i+1)·n/p)``. ``shard`` / ``gather`` convert between full tensors and
shards. A segment that spans ``g`` shards is computed by the ``g`` consecutive ranks holding it;
``segment_groups`` builds (collectively, once) the sub-groups the all-gather communicator needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "a sequence-parallel communicator needs torch.distributed initialised "
            "(launch with torchrun and call torch.distributed.init_process_group)"
        )
    return group if group is not None else dist.group.WORLD


def shard(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's contiguous shard of ``x: [b, n, ...]`` along n (n must divide evenly)."""
    group = resolve_group(group)
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[1]
    if n % p:
        raise ValueError(f"sequence length n={n} must be divisible by the group size p={p}")
    m = n // p
    return x[:, rank * m : (rank + 1) * m].contiguous()


def gather(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Reassemble the full ``[b, n, ...]`` tensor from every rank's shard (all ranks get it)."""
    group = resolve_group(group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def spans_for(configs, m: int, p: int) -> tuple[int, ...]:
    """How many shards each config's segments span (1: shard-local), validating the layout."""
    n = m * p
    spans = []
    for i, (w, r) in enumerate(configs):
        if w <= m:
            if m % w:
                raise ValueError(
                    f"segment_lengths[{i}]={w} must divide the shard length n/p={m} or be a "
                    f"multiple of it"
                )
            spans.append(1)
            continue
        if w % m:
            raise ValueError(
                f"segment_lengths[{i}]={w} must divide the shard length n/p={m} or be a "
                f"multiple of it"
            )
        if w < n and n % w:
            raise ValueError(
                f"segment_lengths[{i}]={w} spans shards, so it must divide n={n} (or be >= n)"
            )
        if m % r:
            raise ValueError(
                f"dilation_rates[{i}]={r} must divide the shard length n/p={m} when its segment "
                f"spans shards (each rank then holds m/r selected rows)"
            )
        spans.append(min(w // m, p))
    return tuple(spans)


_SUBGROUPS: dict[tuple, tuple[dist.ProcessGroup, ...]] = {}


def segment_groups(group: dist.ProcessGroup, span: int) -> tuple[dist.ProcessGroup, ...]:
    """Sub-groups of ``span`` consecutive ranks of ``group`` (collective: every rank calls it)."""
    ranks = dist.get_process_group_ranks(group)
    key = (tuple(ranks), span)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = tuple(
            dist.new_group(ranks[start : start + span]) for start in range(0, len(ranks), span)
        )
    return _SUBGROUPS[key]


def check_consistent(group: dist.ProcessGroup, signature: tuple) -> None:
    """Raise the same ValueError on every rank if ranks disagree on ``signature`` (no hang)."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, signature, group=group)
    if any(s != everyone[0] for s in everyone):
        lines = "; ".join(f"rank {i}: {s}" for i, s in enumerate(everyone))
        raise ValueError(f"ranks disagree on the dilated attention call: {lines}")
