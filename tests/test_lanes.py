"""The lanes policy (ringattn.lanes): when a call's blocks go on concurrent streams, and which."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ringattn
from ringattn import lanes


@pytest.mark.parametrize(
    ("mode", "capturing", "backward", "expected"),
    [
        ("never", True, False, False),
        ("always", False, True, True),
        ("capture", False, False, False),
        ("capture", True, True, True),
        ("forward", False, False, True),
        ("forward", False, True, False),
        ("forward", True, True, True),
    ],
)
def test_wanted(mode: str, capturing: bool, backward: bool, expected: bool) -> None:
    assert lanes.wanted(mode, capturing, backward) is expected


def test_unknown_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="MODE must be one of"):
        lanes.wanted("sometimes", False, False)


@given(
    configs=st.lists(st.integers(0, 6), min_size=1, max_size=20).map(sorted),
    count=st.integers(1, 6),
)
def test_lane_of_keeps_the_first_config_alone_on_the_callers_stream(
    configs: list[int], count: int
) -> None:
    chosen = [lanes.lane_of(config, block, count) for block, config in enumerate(configs)]
    assert all(0 <= lane < max(count, 1) for lane in chosen)
    for config, lane in zip(configs, chosen, strict=True):
        assert (lane == 0) == (config == 0 or count < 2)
    side = [lane for config, lane in zip(configs, chosen, strict=True) if config != 0]
    if count >= 2 and len(side) >= count - 1:  # consecutive side blocks fill every side lane
        assert set(side[: count - 1]) == set(range(1, count))


def test_cpu_calls_ignore_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lanes are CUDA streams: on the CPU every mode computes the one-stream result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 4, 8, dtype=torch.float64) for _ in range(3))
    attention = ringattn.DilatedAttention((8, 16), (1, 2), mixing="head_groups")
    expected = attention(q, k, v)
    for mode in lanes.MODES:
        monkeypatch.setattr(lanes, "MODE", mode)
        torch.testing.assert_close(attention(q, k, v), expected, rtol=0, atol=0)


class _FakeStreams(lanes.Lanes):
    """An enabled fan whose side lanes are names, so the choice of lane shows without CUDA."""

    def __init__(self) -> None:
        self.enabled = True
        self.sides = [f"side {i}" for i in range(1, lanes.LANES)]


@pytest.mark.parametrize("spanning", [False, True])
def test_spanning_blocks_stay_on_the_callers_stream_unless_asked(
    monkeypatch: pytest.MonkeyPatch, spanning: bool
) -> None:
    monkeypatch.setattr(lanes, "SPANNING", spanning)
    chosen: list[str] = []
    monkeypatch.setattr(
        lanes.torch.cuda, "stream", lambda stream: chosen.append(stream) or nullcontext()
    )
    fan = _FakeStreams()
    with fan.lane(config=2, block=3, local=True):
        pass
    with fan.lane(config=2, block=3, local=False):
        pass
    with fan.lane(config=0, block=0, local=True):  # config 0: the caller's stream
        pass
    side = fan.sides[lanes.lane_of(2, 3, lanes.LANES) - 1]
    assert chosen == ([side, side] if spanning else [side])
