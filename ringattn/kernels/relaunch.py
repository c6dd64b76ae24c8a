"""Triton launches without Triton's Python launcher (the small kernels of the host-bound calls).

Why: a launch through ``JITFunction.run`` binds the arguments, specializes each one and builds a
cache key in Python: 25-84 µs of host time per launch on the H200's host against 5-9 for a torch
op (docs/benchmarks/h200_perf.md, step 31). At 32K tokens the backward's first kernels (the
gradients' fill, the grouped backward's statistics) wait for exactly that host time.

How: the first launch of a *specialization* goes through Triton (which compiles or finds the
kernel) and keeps the ``CompiledKernel`` it returns; later launches of the same specialization
call that kernel's own launcher, ``compiled[grid](*arguments)``. The key here is at least as fine
as Triton's own: the current device, the constexprs and ``num_warps``, and per argument a
tensor's dtype and whether its address is 16-byte aligned, an int's width and whether it is 1 or a
multiple of 16, a float's or bool's type. A kernel whose constexprs are not its last parameters,
an argument of another type, the interpreter (``TRITON_INTERPRET=1``: no compiled kernel) all go
through Triton; so does everything once a compiled launcher refuses its arguments (a Triton whose
launchers take them otherwise: the refusal comes before any launch, and it is warned about once).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = True
# (kernel, device, num_warps, constexprs, argument specializations) -> (compiled kernel, the
# constexprs' values in parameter order)
_COMPILED: dict[tuple, tuple[Any, tuple]] = {}
MAX_COMPILED = 256
refused: str | None = None  # why a compiled launcher refused its arguments (then always Triton)


def _current_device() -> int:
    return torch.cuda.current_device()


def _specialization(x: object) -> tuple | None:
    if isinstance(x, Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, bool):
        return (bool,)
    if isinstance(x, int):
        return int, -(2**31) <= x < 2**31, x < 2**63, x == 1, x % 16 == 0
    if isinstance(x, float):
        return (float,)
    return None


def launch(
    kernel: Any, grid: tuple[int, ...], args: tuple, constexprs: dict[str, Any], num_warps: int
) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)``, through the compiled kernel's
    own launcher where this specialization was launched before (see the module docstring)."""
    global refused
    if not ENABLED or INTERPRET or refused is not None:
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    specialization = tuple(_specialization(x) for x in args)
    key = (
        kernel,
        _current_device(),
        num_warps,
        tuple(constexprs.items()),
        specialization,
    )
    found = _COMPILED.get(key)
    if found is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        names = getattr(kernel, "arg_names", ())
        # (kept where the constexprs, given in order, are the kernel's last parameters)
        if (
            compiled is not None
            and None not in specialization
            and tuple(names[len(args) :]) == tuple(constexprs)
        ):
            if len(_COMPILED) >= MAX_COMPILED:  # bounded: drop the oldest
                _COMPILED.pop(next(iter(_COMPILED)))
            tail = tuple(constexprs[name] for name in names[len(args) :])
            _COMPILED[key] = (compiled, tail)
        return
    compiled, tail = found
    try:
        compiled[(*grid, 1, 1)[:3]](*args, *tail)
    except Exception as exc:  # this Triton's launchers take their arguments otherwise
        refused = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"ringattn: a compiled Triton launcher refused its arguments ({refused}); Triton "
            "kernels are launched through Triton from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        kernel[grid](*args, **constexprs, num_warps=num_warps)


__all__ = ["launch"]
