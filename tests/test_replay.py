"""``ringattn.kernels.replay``: a launcher's recorded kernel launches, re-issued on new operands.

A replay must do exactly the recorded call's work or not exist: these launchers stand in for a
kernel library's Python interface (checks, allocations, launches through a compile cache), and
each way a replay could skip work (a copy or zeroing in Python, a launch that bypasses the cache,
aliased operands, tensors hidden in containers) must leave the call on its launcher.
"""

from __future__ import annotations

import pytest
import torch

from ringattn.kernels import replay


class Library:
    """A kernel library: ``launch(x, out=None)`` allocates a padded workspace, launches the
    "compiled" kernels through ``compile_cache`` and returns ``out`` (``2 * x + 1``)."""

    def __init__(self, python_work=None, bypass: bool = False) -> None:
        self.compile_cache: dict = {}
        self.launcher_calls = self.kernel_runs = 0
        self.python_work, self.bypass = python_work, bypass

    def launch(self, x, out=None):
        self.launcher_calls += 1
        workspace = torch.empty(x.numel() + 8)  # the kernel writes a view at an offset
        out = torch.empty_like(x) if out is None else out
        if self.python_work is not None:
            self.python_work(x, workspace)
        self.compile_cache.setdefault("double", self._double)
        self.compile_cache["double"](x, workspace[4 : 4 + x.numel()].view(x.shape))
        if self.bypass:  # a kernel launched directly: as on a GPU, no aten op shows it
            add_one = self._add_one_raw
        else:
            add_one = self.compile_cache.setdefault("add", self._add_one)
        add_one(workspace[4 : 4 + x.numel()].view(x.shape), out, 1.0)
        return out

    def _double(self, x, into):
        self.kernel_runs += 1
        into.copy_(2 * x)

    def _add_one(self, y, out, one):
        self.kernel_runs += 1
        out.copy_(y + one)

    def _add_one_raw(self, y, out, one):
        self.kernel_runs += 1
        out.numpy()[...] = y.numpy() + one


def recorded(library: Library, x, out=None):
    return replay.record(
        lambda: library.launch(x, out), {library: "compile_cache"}, (x, out), lambda r: (r,)
    )


def test_replay_reissues_the_launches_on_new_operands():
    library = Library()
    x = torch.randn(3, 5)
    result, rec = recorded(library, x)
    assert rec is not None and torch.equal(result, 2 * x + 1)
    calls = library.launcher_calls
    y = torch.randn(3, 5)
    (fresh,) = rec((y, None))  # the output the launcher allocated is allocated again
    assert torch.equal(fresh, 2 * y + 1) and fresh is not result
    assert library.launcher_calls == calls


def test_replay_writes_given_outputs_in_place():
    library = Library()
    x, out = torch.randn(3, 5), torch.empty(6, 5)[::2]  # a strided output view
    result, rec = recorded(library, x, out)
    assert rec is not None and result is out and torch.equal(out, 2 * x + 1)
    y, into = torch.randn(3, 5), torch.zeros(6, 5)
    (replayed,) = rec((y, into[::2]))
    assert torch.equal(replayed, 2 * y + 1) and torch.equal(into[::2], 2 * y + 1)
    assert not into[1::2].any()  # nothing outside the view


@pytest.mark.parametrize(
    "python_work",
    [
        lambda x, workspace: workspace.zero_(),  # a buffer zeroed in Python
        lambda x, workspace: x.t().contiguous(),  # a copy to fix a layout
    ],
)
def test_launcher_work_outside_kernels_means_no_replay(python_work):
    x = torch.randn(3, 5)
    result, rec = recorded(Library(python_work), x)
    assert rec is None and torch.equal(result, 2 * x + 1)


def test_launch_that_bypasses_the_cache_is_caught():
    x = torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="disagreed"):
        result, rec = recorded(Library(bypass=True), x)
    assert rec is None and torch.equal(result, 2 * x + 1)


def test_aliased_operands_mean_no_replay():
    x = torch.randn(3, 5)
    library = Library()
    result, rec = replay.record(
        lambda: library.launch(x), {library: "compile_cache"}, (x, x), lambda r: (r,)
    )
    assert rec is None and torch.equal(result, 2 * x + 1)


def test_tensor_inside_a_container_means_no_replay():
    class Boxed(Library):
        def _add_one(self, y, out, one):
            super()._add_one(y[0], out, one)

        def launch(self, x, out=None):
            workspace = torch.empty_like(x)
            out = torch.empty_like(x)
            self.compile_cache.setdefault("double", self._double)
            self.compile_cache.setdefault("add", self._add_one)
            self.compile_cache["double"](x, workspace)
            self.compile_cache["add"]((workspace,), out, 1.0)
            return out

    x = torch.randn(3, 5)
    result, rec = recorded(Boxed(), x)
    assert rec is None and torch.equal(result, 2 * x + 1)


def test_signature_tells_layouts_alignment_and_flags_apart():
    base = torch.randn(4, 8)
    key = replay.signature((base, None), True, 0.5)
    assert key == replay.signature((torch.randn(4, 8), None), True, 0.5)
    assert key != replay.signature((base.t().contiguous().t(), None), True, 0.5)  # strides
    assert key != replay.signature((base, None), False, 0.5)
    assert key != replay.signature((base, None), True, 0.25)
    assert key != replay.signature((base, base), True, 0.5)
    assert key != replay.signature((base.double(), None), True, 0.5)  # dtype
    assert key != replay.signature((base.to("meta"), None), True, 0.5)  # device
    for other in (base.double(), base.to("meta"), base[:, :4], base.t()):
        assert replay.layout(other) != replay.layout(base)
    flat = torch.randn(40)
    assert replay.signature((flat[1:33].view(4, 8),)) != replay.signature((flat[:32].view(4, 8),))


class Adding(Library):
    """A library whose last kernel adds into ``out`` instead of writing it (``out += 2x + 1``),
    as FA4's backward compiled with reduce-add stores does into given gradients."""

    def _add_one(self, y, out, one):
        self.kernel_runs += 1
        out.add_(y + one)


def test_accumulating_operands_are_added_into_once():
    library, x = Adding(), torch.randn(3, 5)
    out = torch.randn(6, 5)[::2]
    old = out.clone()
    result, rec = replay.record(
        lambda: library.launch(x, out), {library: "compile_cache"}, (x, out), lambda r: (r,), (1,)
    )
    assert rec is not None and result is out  # the check replayed into the contents from before
    torch.testing.assert_close(out, old + 2 * x + 1)  # once, not twice
    y, into = torch.randn(3, 5), torch.ones(3, 5)
    rec((y, into))
    torch.testing.assert_close(into, 1 + 2 * y + 1)


def test_undeclared_accumulation_is_not_replayed():
    library, x, out = Adding(), torch.randn(3, 5), torch.zeros(3, 5)
    with pytest.warns(RuntimeWarning, match="disagreed"):
        _, rec = recorded(library, x, out)
    assert rec is None


class BypassFirst(Library):
    """Its first kernel (``workspace = 2x``) is launched directly, writing only the workspace
    that the recorded second kernel reads."""

    def launch(self, x, out=None):
        self.launcher_calls += 1
        workspace = torch.empty(x.numel() + 8)
        out = torch.empty_like(x) if out is None else out
        workspace.numpy()[4 : 4 + x.numel()] = 2 * x.numpy().reshape(-1)  # no aten op
        self.compile_cache.setdefault("add", self._add_one)
        self.compile_cache["add"](workspace[4 : 4 + x.numel()].view(x.shape), out, 1.0)
        return out


def test_a_bypassing_launch_that_writes_only_a_workspace_is_caught():
    """The check replays into the launcher's own workspace, which still held the bypassing
    kernel's values: the replay was kept, and later replays on fresh workspaces were wrong."""
    x = torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="disagreed"):
        result, rec = recorded(BypassFirst(), x)
    assert rec is None and torch.equal(result, 2 * x + 1)


class AddingBypass(Adding):
    """Its adding kernel (``out += 2x + 1``) is launched directly."""

    def launch(self, x, out=None):
        self.launcher_calls += 1
        workspace = torch.empty(x.numel() + 8)
        self.compile_cache.setdefault("double", self._double)
        self.compile_cache["double"](x, workspace[4 : 4 + x.numel()].view(x.shape))
        out.numpy()[...] += workspace.numpy()[4 : 4 + x.numel()].reshape(x.shape) + 1.0
        return out


def test_a_bypassing_launch_that_adds_into_a_large_operand_is_caught():
    """An operand already holding large sums (gradients of earlier blocks): without the
    addition the replay's result was within the check's 1% of the launcher's, so it was kept
    (and added nothing). The check compares what each added."""
    library, x = AddingBypass(), torch.randn(3, 5)
    out = torch.full((3, 5), 1000.0)
    with pytest.warns(RuntimeWarning, match="disagreed"):
        _, rec = replay.record(
            lambda: library.launch(x, out),
            {library: "compile_cache"},
            (x, out),
            lambda r: (r,),
            (1,),
        )
    assert rec is None
    torch.testing.assert_close(out, 1000 + 2 * x + 1)  # once


class Handle:
    """A kernel argument that holds a tensor without being one (a cute tensor, a pointer)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class HandleLibrary(Library):
    def launch(self, x, out=None):
        self.launcher_calls += 1
        out = torch.empty_like(x) if out is None else out
        self.compile_cache.setdefault("k", self._kernel)
        self.compile_cache["k"](Handle(x), Handle(out), 1.0, (None, 3))
        return out

    def _kernel(self, x, out, one, options):
        self.kernel_runs += 1
        out.tensor.copy_(2 * x.tensor + one)


@pytest.mark.parametrize(
    "argument",
    [Handle(torch.zeros(1)), (None, (torch.zeros(1),)), {"a": Handle(torch.zeros(1))}],
    ids=["object", "nested tuple", "dict of objects"],
)
def test_arguments_that_hold_a_tensor_are_no_constants(argument):
    """Baked into a replay such an argument points at the recorded call's memory in every later
    call (the check, on the same operands, agreed): that recording is not replayed."""
    assert replay._holds_pointer(argument)
    assert not replay._holds_pointer((None, 1, 2.0, "x", (True,), {"k": None}, torch.float32))
    _, rec = recorded(HandleLibrary(), torch.randn(3, 5))
    assert rec is None and "holding a tensor or pointer" in replay.last_refusal
