"""Experiments on ringattn: ``python -m experiments.ablate`` sweeps every registered strategy."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import argparse

    from torch import Tensor

    class _Line(Protocol):
        # matplotlib's Line2D.get_ydata is ArrayLike, which mypy cannot iterate
        def get_ydata(self) -> Any: ...

    class _Panel(Protocol):
        # what data_range reads of a matplotlib Axes
        def get_lines(self) -> Sequence[_Line]: ...


def require_cuda(prog: str) -> None:
    """Exit with an argparse-style error where a tool that times CUDA kernels finds no GPU (it
    failed inside torch with "Torch not compiled with CUDA enabled")."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{prog}: error: this tool times CUDA kernels; CUDA is not available here")


def fixed_cublas_workspace() -> None:
    """``CUBLAS_WORKSPACE_CONFIG`` set (unless given): without it cuBLAS refuses to run under
    ``torch.use_deterministic_algorithms`` (the float64 oracle's matmuls, and any model's). Call
    it before any CUDA work: the workspace is chosen when CUDA first makes a cuBLAS handle."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextmanager
def deterministic_algorithms(flag: bool = True, warn_only: bool = False) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(flag, warn_only=...)`` inside the block, the mode of
    before (its ``warn_only`` too) after it."""
    import torch

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(flag, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def bits(x: Tensor) -> Tensor:
    """``x``'s elements as integers of their width: equal where the values are equal bit for
    bit (NaN equals the same NaN, and -0.0 is not 0.0)."""
    import torch

    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(width[x.element_size()])


def same_bits(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> bool:
    """Whether ``xs`` and ``ys`` are equal pair by pair, bit for bit (see :func:`bits`)."""
    import torch

    return all(torch.equal(bits(x), bits(y)) for x, y in zip(xs, ys, strict=True))


def require_torchrun(prog: str) -> None:
    """Exit with an argparse-style error where a tool that needs several ranks runs outside
    torchrun (it failed inside torch.distributed's env:// rendezvous: "RANK expected")."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"{prog}: error: launch with torchrun --nproc_per_node=P")


def make_out(parser: argparse.ArgumentParser, folder: Path, flag: str = "--out") -> None:
    """Make the output folder ``folder`` (given as ``flag``) before any work, or exit with the
    parser's one-line error (made at the end, a bad ``--out`` failed after the whole run, its
    results lost)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"{flag}: cannot make {str(folder)!r}: {exc.strerror}")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: cuda (the default where there is one) or cpu; :func:`require_device`
    checks it after parsing."""
    import torch

    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (the default where there is one) or cpu",
    )


def require_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with the parser's one-line error where ``--device cuda`` has no CUDA here."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here")


def require_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str
) -> None:
    """Exit with the parser's one-line error where an option among ``names`` (dests, one value
    or a list) is below 1: a count or a size of 0 or less failed on the GPU, after CUDA started
    and often after other rows had run (a ZeroDivisionError, an empty median, torch's errors)."""
    for name in names:
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {values}")


def require_distinct(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str
) -> None:
    """Exit with the parser's one-line error where a list option among ``names`` repeats a value
    whose rows would repeat under one label (not for A/B lists whose repeats are turns)."""
    for name in names:
        values = getattr(args, name)
        if repeated := sorted({str(v) for v in values if values.count(v) > 1}):
            flag = f"--{name.replace('_', '-')}"
            parser.error(f"{flag}: {', '.join(repeated)} given more than once (same rows twice)")


def require_mixings(parser: argparse.ArgumentParser, mixings: list[str]) -> None:
    """Exit with the parser's one-line error where ``--mixing`` names an unknown mixing (the
    library raised once the rows before it had run)."""
    from ringattn.config import MIXINGS

    if bad := sorted(set(mixings) - set(MIXINGS)):
        parser.error(f"--mixing must be among {MIXINGS}, got {bad}")


# The options several scripts share, with one wording (each script picks its own defaults).


def add_lengths(parser: argparse.ArgumentParser, default: list[int]) -> None:
    """``--n``: the sequence lengths timed."""
    help_text = "sequence lengths (default: %(default)s)"
    parser.add_argument("--n", type=int, nargs="+", default=default, help=help_text)


def add_mixings(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """``--mixing``: the mixings timed."""
    help_text = "mixings, lse and/or head_groups (default: %(default)s)"
    parser.add_argument("--mixing", nargs="+", default=default, help=help_text)


# issue 5's segment lengths and dilation rates (the LongNet configs every GPU tool times)
ISSUE_LENGTHS = (2048, 4096, 8192, 16384, 32768)
ISSUE_RATES = (1, 2, 4, 8, 16)


def issue_configs(n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Issue 5's segment lengths and rates that fit ``n`` (the first, cut to ``n``, if none)."""
    keep = [i for i, w in enumerate(ISSUE_LENGTHS) if w <= n] or [0]
    return tuple(min(ISSUE_LENGTHS[i], n) for i in keep), tuple(ISSUE_RATES[i] for i in keep)


# ``--causal``'s choices, as the causal flags of the rows each one times
CAUSALITY = {"no": (False,), "yes": (True,), "both": (False, True)}


def add_causality(parser: argparse.ArgumentParser) -> None:
    """``--causal no|yes|both``: which rows are causal."""
    help_text = "causal rows, non-causal rows or both (default: both)"
    parser.add_argument("--causal", choices=list(CAUSALITY), default="both", help=help_text)


def add_heads(parser: argparse.ArgumentParser, dim_flag: str = "--dim") -> None:
    """``--heads`` and the head dim (``dim_flag``), at issue 5's 16 and 128 by default."""
    parser.add_argument("--heads", type=int, default=16, help="heads h (default: 16)")
    parser.add_argument(dim_flag, type=int, default=128, help="head dim d (default: 128)")


def worst(errors: Iterable[float]) -> float:
    """The largest of ``errors``, NaN if any is NaN. Python's ``max`` keeps a NaN only where it
    comes first (``nan > x`` is False), so a NaN gradient after a finite one passed the checks
    that took ``max`` of their errors."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def data_range(ax: _Panel) -> tuple[float, float]:
    """The lowest and highest finite value a matplotlib panel's lines draw, for its limits
    (fixed limits hid a ratio of 1.17 and would hide a memory peak above 1.45; an inf made the
    limits raise)."""
    values = [float(y) for line in ax.get_lines() for y in line.get_ydata()]
    finite = [y for y in values if math.isfinite(y)]
    return min(finite, default=1.0), max(finite, default=1.0)
