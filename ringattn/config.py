"""The static description of one dilated attention: configs, causality, mixing and scale.

Everything here is validated once, eagerly, with errors that name the argument and the rule; the
compiled core then only ever sees a well-formed, hashable :class:`DilatedConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ringattn.capture import compiling

MIXINGS = ("lse", "head_groups")
# a float rounds to float32 as 0 at or below half the smallest subnormal, and as inf from
# float32's largest value plus half its ulp (both ties round to the even 0 / inf)
FLOAT32_ZERO_BELOW = 2.0**-150
FLOAT32_INF_FROM = (2.0 - 2.0**-24) * 2.0**127
# the longest segment: w rows times a row stride must fit int64 strides (2**40 tokens would not
# fit any machine's memory anyway)
MAX_SEGMENT_LENGTH = 2**40


def type_name(value: object) -> str:
    """``value``'s type's name for an error message, with its module where the bare name is a
    builtin's that it is not (numpy 2's ``np.True_`` is a ``bool``: "causal must be bool, got
    bool" read as a contradiction)."""
    kind = type(value)
    if kind.__module__ != "builtins" and kind.__name__ in ("bool", "int", "float", "str"):
        return f"{kind.__module__}.{kind.__name__}"
    return kind.__name__


def an_int(name: str, value: object) -> int:
    """``value`` if it is an int, else a ``TypeError`` naming ``name`` (the type half of
    :func:`checked_int`, for ints whose range rule is another's, such as a rank's)."""
    # bool is an int subclass and numpy/torch scalars are not ints: refuse rather than coerce
    if isinstance(value, bool) or not isinstance(value, int):
        # (no repr where torch.compile traces it: Dynamo holds a numpy int as an array, whose
        # repr it cannot trace, and failed with that instead of this error)
        shown = "" if compiling() else f" {value!r}"
        raise TypeError(f"{name} must be an int, got {type_name(value)}{shown}")
    return value


def checked_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum``: else a ``TypeError`` (not an int) or
    ``ValueError`` (too small) naming ``name`` and the rule. Every size the library takes from
    a user goes through here, so they all refuse alike."""
    value = an_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def int_sequence(name: str, values: object) -> tuple[int, ...]:
    # (byte strings and buffers are sequences of ints: b"48" or memoryview(b"48") read as
    # (52, 56))
    if isinstance(values, (str, bytes, bytearray, memoryview)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list or tuple of ints, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    return tuple(checked_int(f"{name}[{i}]", value) for i, value in enumerate(values))


@dataclass(frozen=True)
class DilatedConfig:
    """Validated, hashable options of dilated attention (see ``docs/semantics.md``)."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool = False
    mixing: str = "lse"
    scale: float | None = None

    def __post_init__(self) -> None:
        w = int_sequence("segment_lengths", self.segment_lengths)
        r = int_sequence("dilation_rates", self.dilation_rates)
        if len(w) != len(r):
            raise ValueError(
                "segment_lengths and dilation_rates must have the same length, "
                f"got {len(w)} and {len(r)}"
            )
        for i, (wi, ri) in enumerate(zip(w, r)):
            if wi > MAX_SEGMENT_LENGTH:
                # (strides of w rows overflow int64; beyond the sequence, any length >= n is the
                # same single segment)
                raise ValueError(
                    f"segment_lengths[{i}]={wi} must be <= 2**40 (a segment at least as long as "
                    "the sequence is one segment, whatever its length)"
                )
            if wi % ri:
                raise ValueError(f"dilation_rates[{i}]={ri} must divide segment_lengths[{i}]={wi}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type_name(self.causal)}")
        if not isinstance(self.mixing, str):
            raise TypeError(f"mixing must be a str, got {type_name(self.mixing)}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise TypeError(f"scale must be a float or None, got {type_name(self.scale)}")
            try:
                float(self.scale)
            except OverflowError:  # (an int past float's range: math.isfinite raised it, unnamed)
                bits = int(self.scale).bit_length()
                message = f"scale must be finite (a float), got an int of {bits} bits"
                raise ValueError(message) from None
            if not math.isfinite(self.scale):
                raise ValueError(f"scale must be finite, got {self.scale}")
            if self.scale <= 0:  # torch's causal CPU flash kernel returns NaN rows for them
                raise ValueError(f"scale must be > 0 (a softmax temperature), got {self.scale}")
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)
        if self.scale is not None:
            object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def of(
        cls,
        segment_lengths: object,
        dilation_rates: object,
        causal: object = False,
        mixing: object = "lse",
        scale: object = None,
    ) -> DilatedConfig:
        """From a user's values as given: ``__post_init__`` checks and converts them (a
        ``tuple()`` before it read ``b"48"`` as the lengths (52, 56), and an int as "not
        iterable", unnamed)."""
        return cls(segment_lengths, dilation_rates, causal, mixing, scale)  # type: ignore[arg-type]

    @property
    def configs(self) -> tuple[tuple[int, int], ...]:
        """``((w_0, r_0), (w_1, r_1), ...)``."""
        return tuple(zip(self.segment_lengths, self.dilation_rates))

    def scale_for(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)

    def check_scale_for(self, dtype: torch.dtype) -> None:
        """A ``ValueError`` where inputs of ``dtype`` cannot compute with the given scale:
        inputs other than float64 form their logits in float32, where a scale past float32's
        range is 0 or inf (causal sdpa on CPU then returned NaN rows, as for ``scale=0``;
        beyond float32's largest value every strategy returned NaN), silently. The default
        ``1 / sqrt(d)`` is always in range. Plain comparisons: traced, they fold into guards."""
        if self.scale is None or dtype == torch.float64:
            return
        if self.scale <= FLOAT32_ZERO_BELOW or self.scale >= FLOAT32_INF_FROM:
            rounded = "0" if self.scale <= FLOAT32_ZERO_BELOW else "inf"
            # (the bounds as the comparisons take them: the message said [1.4e-45, 3.4e38],
            # float32's smallest subnormal and its largest value rounded, where a scale between
            # 2**-150 and 1.4e-45, or between 3.4e38 and the second bound, was taken)
            raise ValueError(
                f"scale={self.scale} is {rounded} in float32, which {dtype} inputs compute in: "
                f"it must be > 2**-150 = {FLOAT32_ZERO_BELOW!r} and < (2 - 2**-24) * 2**127 = "
                f"{FLOAT32_INF_FROM!r}, which float32 rounds to 0 and inf (or use float64 inputs)"
            )
