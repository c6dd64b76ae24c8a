"""A/B of head_groups' zero fill on one GPU: only the unselected pairs (the Triton kernel of
``ringattn.kernels.unselected``) vs the whole tensor (``torch.zeros_like``), same run, interleaved.

    python -m experiments.fill_ab            # 131K and 1M, causal and not, two rounds each

Prints one line per (n, causal, round, fill): forward and forward+backward ms, peak memory
relative to the tensors the call cannot avoid (as ``experiments.bench``).
"""

from __future__ import annotations

import argparse

import torch

import ringattn
import ringattn.core as core
from experiments.bench import ISSUE_LENGTHS, ISSUE_RATES, fwd_and_fwdbwd, time_and_memory


def whole_tensor_zeros(like: torch.Tensor, selection) -> torch.Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    device, kernel_zeros = torch.device("cuda"), core.zeros_for
    try:
        for n in args.n:
            q, k, v, dout = (
                torch.randn(1, n, 16, 128, device=device, dtype=torch.bfloat16) for _ in range(4)
            )
            unit = q.numel() * q.element_size()
            for causal in (False, True):
                for rep in range(args.rounds):
                    for name, zeros in (("kernel", kernel_zeros), ("zeros", whole_tensor_zeros)):
                        core.zeros_for = zeros
                        attention = ringattn.DilatedAttention(
                            ISSUE_LENGTHS,
                            ISSUE_RATES,
                            causal=causal,
                            mixing="head_groups",
                            compile=False,
                        )
                        fwd, fwdbwd = fwd_and_fwdbwd(attention, q, k, v, dout)
                        repeats = 10 if n < 2**20 else 5
                        stats = time_and_memory(fwd, fwdbwd, unit, device, 3, repeats)
                        print(
                            f"n={n} causal={causal} rep={rep} fill={name:6s} "
                            f"fwd {stats['fwd_ms']:.3f} ms  fwdbwd {stats['fwdbwd_ms']:.3f} ms  "
                            f"mem {stats['fwd_mem_vs_io']:.3f}/{stats['fwdbwd_mem_vs_io']:.3f}",
                            flush=True,
                        )
            del q, k, v, dout
            torch.cuda.empty_cache()
    finally:
        core.zeros_for = kernel_zeros


if __name__ == "__main__":
    main()
