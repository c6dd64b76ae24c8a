"""Experiments on ringattn: ``python -m experiments.ablate`` sweeps every registered strategy."""

from __future__ import annotations


def require_cuda(prog: str) -> None:
    """Exit with an argparse-style error where a tool that times CUDA kernels finds no GPU (it
    failed inside torch with "Torch not compiled with CUDA enabled")."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{prog}: error: this tool times CUDA kernels; CUDA is not available here")
