"""``ringattn.kernels.relaunch``: Triton kernels relaunched through their compiled launcher once
Triton has launched the same specialization, and through Triton otherwise. Without a GPU the
kernel is a stand-in that records which way each launch went; the real kernels' parameters are
checked to be what the fast path needs (else it would silently never engage)."""

from __future__ import annotations

import pytest
import torch

from ringattn.kernels import add, merge, relaunch, unit_stats, unselected


class FakeCompiled:
    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def run(*args):
            if self.fail:
                raise TypeError("function takes exactly 9 arguments")
            self.log.append(("direct", grid, args))

        return run


class FakeKernel:
    """A JIT function's face: ``arg_names``, and ``kernel[grid](*args, **kw)`` returning the
    compiled kernel."""

    def __init__(self, arg_names, fail: bool = False) -> None:
        self.arg_names, self.log = tuple(arg_names), []
        self.compiled = FakeCompiled(self.log, fail)

    def __getitem__(self, grid):
        def run(*args, num_warps, **constexprs):
            self.log.append(("triton", grid, args, constexprs, num_warps))
            return self.compiled

        return run


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(relaunch, "_COMPILED", {})
    monkeypatch.setattr(relaunch, "refused", None)
    monkeypatch.setattr(relaunch, "INTERPRET", False)
    monkeypatch.setattr(relaunch, "_current_device", lambda: 0)
    return monkeypatch


def test_a_specialization_goes_through_triton_once_then_direct(fresh):
    kernel = FakeKernel(("x", "n", "BLOCK", "WIDE"))
    x = torch.zeros(64)
    for n in (32, 48, 7):
        relaunch.launch(kernel, (5,), (x, n), {"BLOCK": 16, "WIDE": True}, 4)
    # 32 and 48 are both multiples of 16 (one specialization); 7 is not
    assert [entry[0] for entry in kernel.log] == ["triton", "direct", "triton"]
    assert kernel.log[1] == ("direct", (5, 1, 1), (x, 48, 16, True))
    assert kernel.log[0][3:] == ({"BLOCK": 16, "WIDE": True}, 4)


@pytest.mark.parametrize(
    "change",
    ["constexpr", "warps", "dtype", "alignment", "one", "wide int", "device"],
)
def test_any_change_of_specialization_goes_through_triton(fresh, change):
    kernel = FakeKernel(("x", "n", "BLOCK"))
    x, n, block, warps = torch.zeros(64), 32, 16, 4
    relaunch.launch(kernel, (1,), (x, n), {"BLOCK": block}, warps)
    if change == "constexpr":
        block = 32
    elif change == "warps":
        warps = 8
    elif change == "dtype":
        x = torch.zeros(64, dtype=torch.float64)
    elif change == "alignment":
        x = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "one":
        n = 1
    elif change == "wide int":
        n = 2**33
    elif change == "device":
        fresh.setattr(relaunch, "_current_device", lambda: 1)
    relaunch.launch(kernel, (1,), (x, n), {"BLOCK": block}, warps)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_constexprs_not_last_or_unknown_arguments_are_never_kept(fresh):
    kernel = FakeKernel(("x", "BLOCK", "n"))
    for _ in range(2):
        relaunch.launch(kernel, (1,), (torch.zeros(4), 3), {"BLOCK": 16}, 4)
    other = FakeKernel(("x", "s", "BLOCK"))
    for _ in range(2):
        relaunch.launch(other, (1,), (torch.zeros(4), "text"), {"BLOCK": 16}, 4)
    assert [e[0] for e in kernel.log + other.log] == ["triton"] * 4


def test_a_refusing_launcher_turns_it_off_with_a_warning(fresh):
    kernel = FakeKernel(("x", "BLOCK"), fail=True)
    relaunch.launch(kernel, (1,), (torch.zeros(4),), {"BLOCK": 16}, 4)
    with pytest.warns(RuntimeWarning, match="refused its arguments"):
        relaunch.launch(kernel, (1,), (torch.zeros(4),), {"BLOCK": 16}, 4)
    relaunch.launch(kernel, (1,), (torch.zeros(4),), {"BLOCK": 16}, 4)
    assert [e[0] for e in kernel.log] == ["triton"] * 3  # the refused launch went through Triton
    assert "exactly 9 arguments" in relaunch.refused


def test_off_or_interpreted_always_goes_through_triton(fresh):
    kernel = FakeKernel(("x", "BLOCK"))
    fresh.setattr(relaunch, "ENABLED", False)
    for _ in range(2):
        relaunch.launch(kernel, (1,), (torch.zeros(4),), {"BLOCK": 16}, 4)
    fresh.setattr(relaunch, "ENABLED", True)
    fresh.setattr(relaunch, "INTERPRET", True)
    for _ in range(2):
        relaunch.launch(kernel, (1,), (torch.zeros(4),), {"BLOCK": 16}, 4)
    assert [e[0] for e in kernel.log] == ["triton"] * 4


@pytest.mark.skipif(merge.triton is None, reason="needs triton")
def test_the_kernels_pass_their_constexprs_last_and_in_order(monkeypatch):
    # what the fast path needs of each real kernel's call, or it never engages
    seen = []
    monkeypatch.setattr(
        relaunch, "launch", lambda kernel, grid, args, cx, warps: seen.append((kernel, args, cx))
    )
    monkeypatch.setattr(add, "available", lambda x: True)
    x = torch.zeros(1, 2, 3, 2, 8)
    unselected.zero_unselected_(torch.zeros(1, 4, 2, 8), torch.ones(2, 2, dtype=torch.int32))
    unit_stats.unit_stats_(
        torch.zeros(1, 4, 2, 8),
        torch.zeros(1, 4, 2, 8),
        torch.zeros(1, 4, 2),
        torch.zeros(8, dtype=torch.int32),
        4,
        torch.zeros(2, 16),
        torch.zeros(2, 16),
    )
    assert add.add_rows_([x.clone()], [x.clone()])
    merge.merge_rows_(x.clone(), torch.zeros(1, 2, 3, 2), x.clone(), torch.zeros(1, 2, 3, 2))
    assert len(seen) == 4
    for kernel, args, constexprs in seen:
        assert tuple(kernel.arg_names[len(args) :]) == tuple(constexprs), kernel.arg_names
        assert all(relaunch._specialization(a) is not None for a in args)
