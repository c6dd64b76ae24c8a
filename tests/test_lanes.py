"""The lanes policy (ringattn.lanes): when a call's blocks go on concurrent streams, and which."""

from __future__ import annotations

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


class _Recorder:
    """Stands in for a CUDA stream or event: notes the fork / join calls made on it."""

    def __init__(self, name: str, log: list[tuple[str, str, str]]) -> None:
        self.name, self.log = name, log

    def record(self, stream: _Recorder) -> None:
        self.log.append(("record", self.name, stream.name))

    def wait_event(self, event: _Recorder) -> None:
        self.log.append(("wait", self.name, event.name))


def _fake_fan(monkeypatch: pytest.MonkeyPatch, mode: str = "always") -> tuple[lanes.Lanes, list]:
    """An enabled fan on recorder streams and events, so what it issues shows without CUDA."""
    log: list[tuple[str, str, str]] = []
    names = iter(f"side {i}" for i in range(1, 100))
    events = iter(["fork", *(f"join {i}" for i in range(1, 100))])
    monkeypatch.setattr(lanes, "MODE", mode)
    monkeypatch.setattr(lanes.torch.cuda, "Stream", lambda device: _Recorder(next(names), log))
    monkeypatch.setattr(lanes.torch.cuda, "Event", lambda: _Recorder(next(events), log))
    monkeypatch.setattr(lanes.torch.cuda, "current_stream", lambda device: _Recorder("main", log))
    monkeypatch.setattr(lanes.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(lanes.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(lanes, "_fans", lanes.threading.local())
    fan = lanes.Lanes(torch.device("cuda", 0), enabled=True)
    assert fan.enabled
    return fan, log


def test_fan_forks_every_side_lane_from_the_callers_stream_and_joins_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fan, log = _fake_fan(monkeypatch)
    sides = [f"side {i}" for i in range(1, lanes.LANES)]
    joins = [f"join {i}" for i in range(1, lanes.LANES)]
    for _ in range(2):  # the second call re-records the same events
        log.clear()
        with fan:
            assert log == [("record", "fork", "main"), *(("wait", s, "fork") for s in sides)]
            log.clear()
        assert log == [
            entry
            for side, join in zip(sides, joins, strict=True)
            for entry in (("record", join, side), ("wait", "main", join))
        ]
    with pytest.raises(RuntimeError), fan:  # a block that raised: the lanes still join
        log.clear()
        raise RuntimeError
    assert ("wait", "main", joins[-1]) in log


@pytest.mark.parametrize("spanning", [False, True])
def test_spanning_blocks_stay_on_the_callers_stream_unless_asked(
    monkeypatch: pytest.MonkeyPatch, spanning: bool
) -> None:
    monkeypatch.setattr(lanes, "SPANNING", spanning)
    current: list[str] = []
    monkeypatch.setattr(lanes.torch.cuda, "set_stream", lambda stream: current.append(stream.name))
    fan, _ = _fake_fan(monkeypatch)
    side = f"side {lanes.lane_of(2, 3, lanes.LANES)}"
    with fan.lane(config=2, block=3, local=True):
        assert current == [side]
    assert current == [side, "main"]  # back on the caller's stream
    current.clear()
    with fan.lane(config=2, block=3, local=False):
        pass
    with fan.lane(config=0, block=0, local=True):  # config 0: the caller's stream
        pass
    assert current == ([side, "main"] if spanning else [])


@pytest.mark.parametrize("why", ["mode", "device"])
def test_a_disabled_fan_issues_nothing(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    _, log = _fake_fan(monkeypatch)
    switches: list = []
    monkeypatch.setattr(lanes.torch.cuda, "set_stream", switches.append)
    if why == "mode":
        monkeypatch.setattr(lanes, "MODE", "capture")  # an eager call: no lanes
    else:  # tensors on another device than the current one (switching would leave it changed)
        monkeypatch.setattr(lanes.torch.cuda, "current_device", lambda: 1)
    fan = lanes.Lanes(torch.device("cuda", 0), enabled=True)
    log.clear()
    with fan, fan.lane(config=3, block=4):
        pass
    assert not fan.enabled and log == [] and switches == []


class _FakeLanes:
    """Stands in for ``Lanes`` in ``core.for_each_block``: logs the fan-out, each lane taken
    (config, block, local) and its exit, and the fan's join."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __call__(self, device, enabled, backward=False) -> _FakeLanes:
        self.log.append(("lanes", enabled, backward))
        return self

    def __enter__(self) -> _FakeLanes:
        self.log.append(("fork",))
        return self

    def __exit__(self, *exc) -> None:
        self.log.append(("join",))

    def lane(self, config: int, block: int, local: bool = True):
        log = self.log

        class _Lane:
            def __enter__(self) -> None:
                log.append(("lane", config, block, local))

            def __exit__(self, *exc) -> None:
                log.append(("back", block))

        return _Lane()


@pytest.mark.parametrize("spans", [None, (1, 1, 2)])
def test_the_core_runs_each_block_on_its_lane_inside_the_fan(monkeypatch, spans) -> None:
    """``core.for_each_block``: every block between the fork and the join, each inside its own
    lane's context (taken with its config, and ``local`` only where the config's segments stay
    on this device), in order, those already done left out."""
    import dataclasses

    from ringattn import core

    log: list = []
    monkeypatch.setattr(core, "Lanes", _FakeLanes(log))
    attention = ringattn.DilatedAttention((4, 8, 16), (1, 2, 4), mixing="head_groups")
    spec = attention.eager_spec(torch.zeros(1, 36, 4, 8))  # (tails: five blocks)
    if spans is not None:
        spec = dataclasses.replace(spec, spans=spans)
    blocks = spec.plan.blocks
    core.for_each_block(
        spec, torch.device("cpu"), 1, lambda i: log.append(("run", i)), True, frozenset({2})
    )
    ids = [i for i in range(1, len(blocks)) if i != 2]
    expected = [("lanes", spec.plan.disjoint, True), ("fork",)]
    for i in ids:
        config = blocks[i].job.config
        local = spec.spans[config] == 1
        expected += [("lane", config, i, local), ("run", i), ("back", i)]
    assert log == [*expected, ("join",)]
    assert len(ids) == 3 and spec.plan.disjoint


def test_each_thread_and_device_has_its_own_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fan's events are re-recorded by every call: two threads sharing one would wait on each
    other's records, and a device's streams cannot run another device's kernels."""
    import threading

    kind = type(lanes._fans)  # (the module's own holder: _fake_fan replaces it)
    _fake_fan(monkeypatch)
    monkeypatch.setattr(lanes, "_fans", kind())
    zero, one = torch.device("cuda", 0), torch.device("cuda", 1)
    mine = lanes._fan(zero, 3)
    assert lanes._fan(zero, 3) is mine and lanes._fan(one, 3) is not mine
    other: list = []
    worker = threading.Thread(target=lambda: other.append(lanes._fan(zero, 3)))
    worker.start()
    worker.join()
    assert other[0] is not mine and not set(map(id, other[0].sides)) & set(map(id, mine.sides))


def test_a_thread_s_lanes_grow_with_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    """LANES raised between calls: a fan made for fewer side lanes is made again, or the
    calls' blocks would index past its streams."""
    _fake_fan(monkeypatch)
    monkeypatch.setattr(lanes, "_fans", lanes.threading.local())
    zero = torch.device("cuda", 0)
    small = lanes._fan(zero, 1)
    assert len(lanes._fan(zero, 3).sides) == 3
    assert lanes._fan(zero, 1) is not small  # (the larger one serves fewer lanes too)
    monkeypatch.setattr(lanes, "LANES", 4)
    fan = lanes.Lanes(zero, enabled=True)
    assert len(fan.switches) == 3
