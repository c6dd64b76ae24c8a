"""Concurrent CUDA streams ("lanes") for blocks that write disjoint rows.

A ``head_groups`` plan's configs write disjoint (row, head) pairs of the output and of the
gradients, so nothing orders one config's kernel after another's. Issued on one stream they still
run one after the other, and each leaves the GPU partly idle twice: in its last wave, and
throughout when it is small (a config with a high dilation rate has few segments: at 131K tokens
the ``r = 16`` config of issue 5's shape is 192 query tiles on 132 SMs, and runs at half the rate
of the ``r = 1`` one). On lanes, each config's kernel starts in the last wave of the one before
it instead of after it. Not more than that: the GPU hands out CTAs in the order the kernels were
issued, so the kernels still run almost one after another (131K timelines: each starts 8–30 µs
before the previous ends, h200_perf.md steps 29–30), and side lanes of a higher stream priority
only change that order, not the packing (step 30: tried, no gain, reverted).

Config 0's blocks (``r = 1`` in issue 5's shape, the largest) run on the caller's stream; the
other blocks share the side lanes round-robin (:func:`lane_of`). Each side lane
waits for the caller's stream where the fan-out starts and the caller's stream waits for every side
lane where it ends, so the call is ordered like a one-stream call for everything around it (the
caching allocator included: tensors made before the fan-out are freed after the join; a lane's own
temporaries are made and freed on that lane). CUDA-graph capture records the fork and the join.

:data:`MODE` decides when (:func:`wanted`), and lanes are only ever used where nothing else
orders the blocks: on CUDA, for disjoint plans, not while tracing (Inductor would
have to model the streams), and for blocks that stay on this device unless :data:`SPANNING` (a
block whose segments span ranks issues collectives, which every rank must issue in the same order).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

import torch

from ringattn.capture import compiling

# how many streams the blocks of one call may use (1: no concurrency)
LANES = 4
# when: "always", "capture" (only while a CUDA graph is being captured), "forward" (also in eager
# forwards), or "never". Lanes cut the GPU's time (H200, 131K head_groups replayed from a graph:
# forward 2-8%, forward+backward 2-6% faster) for some host work per call. While each wait made a
# new event and each switch went through torch.cuda.stream's context (~70 µs of Python per
# forward), eager calls lost more than they gained (steps 13, 27, 28 of
# docs/benchmarks/h200_perf.md); with the events made once and plain set_stream switches (_Fan,
# _OnStream) they gain: 131K forward+backward 2-5% faster, single or back to back, in two runs of
# never / always turns, forward equal or up to 5% faster; at 32K, host-bound, the turns spread
# ~20% either way (step 29).
MODE = "always"
MODES = ("capture", "forward", "always", "never")
# whether blocks whose segments span ranks go on lanes too. Off: their exchanges stay on the
# caller's stream, after the local blocks were issued. On: the host still issues every rank's
# exchanges in one order and NCCL keeps that order on its own stream, so only the streams the
# exchanges wait for change; the spanning blocks' kernels then overlap the local configs. On two
# H200s at 16K per GPU, replayed from graphs (h200_perf.md step 28; the replays bitwise equal to
# the eager calls either way), head_groups' ring forward took 0.263 / 0.282 ms on and 0.295 /
# 0.254 off in two runs: the runs' own spread (the 2-GPU replays move ~10% between runs, the
# 1-GPU ones 1%), no gain to show, hence off.
SPANNING = False


def wanted(mode: str, capturing: bool, backward: bool) -> bool:
    """Whether a call's blocks go on lanes under ``mode``: ``capturing`` a CUDA graph, and
    whether the call is a ``backward``."""
    if mode not in MODES:
        raise ValueError(f"ringattn.lanes.MODE must be one of {MODES}, got {mode!r}")
    if mode in ("always", "never"):
        return mode == "always"
    return capturing or (mode == "forward" and not backward)


def lane_of(config: int, block: int, count: int) -> int:
    """The lane among ``count`` of block ``block``, of config ``config``: config 0's blocks alone
    on lane 0 (the caller's stream), the others round-robin over the side lanes, so that even with
    two lanes the large config overlaps all the small ones."""
    return 0 if config == 0 or count < 2 else 1 + block % (count - 1)


class _Fan:
    """One thread's side lanes on one device and the events that fork and join them, made once
    and re-recorded by every call: a wait takes the record made before it, so reuse is safe,
    while ``Stream.wait_stream`` made a new event per wait (with ``torch.cuda.stream``'s context,
    ~70 µs of Python per forward, h200_perf.md step 28)."""

    def __init__(self, device: torch.device, count: int) -> None:
        self.sides = [torch.cuda.Stream(device) for _ in range(count)]
        self.fork = torch.cuda.Event()
        self.joins = [torch.cuda.Event() for _ in range(count)]


# per thread: two threads' calls must not re-record each other's events between record and wait
_fans = threading.local()


def _fan(device: torch.device, count: int) -> _Fan:
    fans: dict[torch.device, _Fan] = _fans.__dict__.setdefault("by_device", {})
    fan = fans.get(device)
    if fan is None or len(fan.sides) < count:
        fan = fans[device] = _Fan(device, count)
    return fan


class _OnStream:
    """Makes ``stream`` current, and ``back`` again on exit: one call each way, where
    ``torch.cuda.stream``'s context also looks up and checks the devices' current streams."""

    __slots__ = ("back", "stream")

    def __init__(self, stream: torch.cuda.Stream, back: torch.cuda.Stream) -> None:
        self.stream, self.back = stream, back

    def __enter__(self) -> None:
        torch.cuda.set_stream(self.stream)

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_stream(self.back)


class Lanes:
    """``with Lanes(device, enabled, backward) as fan``: fans out on entry (where enabled and
    :func:`wanted`), joins on exit; ``fan.lane(config, i)`` is the context that runs block ``i`` (of
    config ``config``) on its stream."""

    def __init__(self, device: torch.device, enabled: bool, backward: bool = False) -> None:
        self.enabled = False
        # (wanted(..., capturing=True): whether MODE could want lanes for this call at all)
        if not enabled or LANES < 2 or device.type != "cuda" or not wanted(MODE, True, backward):
            return
        if compiling():  # Inductor would have to model the streams
            return
        # set_stream also makes the stream's device current: on another device than the current
        # one the switches back would leave the caller on the tensors' device
        if device.index != torch.cuda.current_device():
            return
        # made on the first eager call (making streams while capturing could break the capture)
        self.fan = _fan(device, LANES - 1)
        self.main = torch.cuda.current_stream(device)
        self.enabled = wanted(MODE, torch.cuda.is_current_stream_capturing(), backward)
        if self.enabled:
            self.switches = [_OnStream(side, self.main) for side in self.fan.sides[: LANES - 1]]

    def lane(self, config: int, block: int, local: bool = True) -> AbstractContextManager[None]:
        lane = lane_of(config, block, LANES) if self.enabled and (local or SPANNING) else 0
        return _STAY if lane == 0 else self.switches[lane - 1]

    def __enter__(self) -> Lanes:
        if self.enabled:
            # every lane starts after what the caller issued before the fan-out (the zero fill);
            # all forked here, not at first use, or a lane would wait for lane 0's blocks too
            self.fan.fork.record(self.main)
            for switch in self.switches:
                switch.stream.wait_event(self.fan.fork)
        return self

    def __exit__(self, *exc: object) -> None:  # joins also when the blocks raised
        if self.enabled:
            for switch, join in zip(self.switches, self.fan.joins, strict=False):
                join.record(switch.stream)
                self.main.wait_event(join)


_STAY = nullcontext()
