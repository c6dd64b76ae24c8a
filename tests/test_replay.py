"""``ringattn.kernels.replay``: a launcher's recorded kernel launches, re-issued on new operands.

A replay must do exactly the recorded call's work or not exist: these launchers stand in for a
kernel library's Python interface (checks, allocations, launches through a compile cache), and
each way a replay could skip work (a copy or zeroing in Python, a launch that bypasses the cache,
aliased operands, tensors hidden in containers) must leave the call on its launcher.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ringattn.kernels import replay


class Library:
    """A kernel library: ``launch(x, out=None)`` allocates a padded workspace, launches the
    "compiled" kernels through ``compile_cache`` and returns ``out`` (``2 * x + 1``)."""

    def __init__(self, python_work=None, bypass: bool = False, between: bool = False) -> None:
        self.compile_cache: dict = {}
        self.launcher_calls = self.kernel_runs = 0
        self.python_work, self.bypass, self.between = python_work, bypass, between

    def launch(self, x, out=None):
        self.launcher_calls += 1
        workspace = torch.empty(x.numel() + 8)  # the kernel writes a view at an offset
        out = torch.empty_like(x) if out is None else out
        if self.python_work is not None and not self.between:
            self.python_work(x, workspace)
        self.compile_cache.setdefault("double", self._double)
        self.compile_cache["double"](x, workspace[4 : 4 + x.numel()].view(x.shape))
        if self.python_work is not None and self.between:  # (after a launch: a combine step)
            self.python_work(x, workspace)
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


def recorded(library: Library, x, out=None, accumulating: tuple[int, ...] = ()):
    return replay.record(
        lambda: library.launch(x, out),
        {library: "compile_cache"},
        (x, out),
        lambda r: (r,),
        accumulating,
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
        lambda x, workspace: workspace[:4].zero_(),  # a buffer zeroed in Python
        lambda x, workspace: x.t().contiguous(),  # a copy to fix a layout
    ],
)
@pytest.mark.parametrize("between", [False, True], ids=["before the launches", "between them"])
def test_launcher_work_outside_kernels_means_no_replay(python_work, between):
    """Also between two launches, where the first kernel's own ops had just been set aside."""
    x = torch.randn(3, 5)
    result, rec = recorded(Library(python_work, between=between), x)
    assert rec is None and torch.equal(result, 2 * x + 1)
    assert replay.last_refusal is not None and replay.last_refusal.startswith("launcher ops")


@pytest.mark.parametrize("given", [False, True], ids=["allocated output", "given output"])
def test_launch_that_bypasses_the_cache_is_caught(given):
    """A given output (an operand) is poisoned before the check too: it still held the
    bypassing launch's result, which the check's replay (without that launch) then matched."""
    x = torch.randn(3, 5)
    out = torch.empty(3, 5) if given else None
    with pytest.warns(RuntimeWarning, match="disagreed"):
        result, rec = recorded(Library(bypass=True), x, out)
    assert rec is None and torch.equal(result, 2 * x + 1)
    assert (result is out) == given


@pytest.mark.parametrize(
    "alias",
    [lambda x: x, lambda x: x.view(x.shape), lambda x: x[:]],
    ids=["the same tensor", "a view", "a slice"],
)
def test_aliased_operands_mean_no_replay(alias):
    """Also two tensor objects of one memory: every launch argument there resolves to the first
    operand's role, so a replay on distinct operands would read the first in both places."""
    x = torch.randn(3, 5)
    library = Library()
    result, rec = replay.record(
        lambda: library.launch(x), {library: "compile_cache"}, (x, alias(x)), lambda r: (r,)
    )
    assert rec is None and torch.equal(result, 2 * x + 1)
    assert replay.last_refusal == "aliased operands"


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
    # 8-byte aligned is not aligned: the kernels are compiled for 16-byte aligned pointers
    assert flat.data_ptr() % 16 == 0
    assert replay.signature((flat[2:34].view(4, 8),)) != replay.signature((flat[:32].view(4, 8),))
    assert replay.signature((flat[4:36].view(4, 8),)) == replay.signature((flat[:32].view(4, 8),))


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
    result, rec = recorded(library, x, out, (1,))
    assert rec is not None and result is out  # the check replayed into the contents from before
    torch.testing.assert_close(out, old + 2 * x + 1)  # once, not twice
    y, into = torch.randn(3, 5), torch.ones(3, 5)
    rec((y, into))
    torch.testing.assert_close(into, 1 + 2 * y + 1)


@pytest.mark.parametrize("short", [0, 1])
def test_accumulating_operands_too_large_to_copy_beside_the_call_are_not_recorded(
    monkeypatch, short
):
    """The check copies what the launch adds into (and one difference at a time); where that
    takes more than half of the device's spare memory, the launcher's call stands alone (at 2M
    tokens on an 80 GB H100, such copies in fa4_add's check ran lse's first forward+backward
    out of memory)."""
    library, x = Adding(), torch.randn(3, 5)
    out = torch.randn(3, 5)
    old = out.clone()
    need = 2 * 2 * out.numel() * out.element_size()  # (twice: the copy, and one difference)
    monkeypatch.setattr(replay, "_spare_bytes", lambda device: need - short)
    result, rec = recorded(library, x, out, (1,))
    assert (rec is None) == bool(short) and library.launcher_calls == 1
    assert result is out
    torch.testing.assert_close(out, old + 2 * x + 1)  # added once either way
    if short:
        assert replay.last_refusal == "its check's copies would not fit beside the call"


def test_no_bound_on_spare_memory_off_cuda():
    assert replay._spare_bytes(torch.device("cpu")) is None


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
    """Its adding kernel (``out += 2x + plus``) is launched directly."""

    plus = 1.0

    def launch(self, x, out=None):
        self.launcher_calls += 1
        workspace = torch.empty(x.numel() + 8)
        self.compile_cache.setdefault("double", self._double)
        self.compile_cache["double"](x, workspace[4 : 4 + x.numel()].view(x.shape))
        out.numpy()[...] += workspace.numpy()[4 : 4 + x.numel()].reshape(x.shape) + self.plus
        return out


def test_a_bypassing_launch_that_adds_into_a_large_operand_is_caught():
    """An operand already holding large sums (gradients of earlier blocks): without the
    addition the replay's result was within the check's 1% of the launcher's, so it was kept
    (and added nothing). The check compares what each added."""
    library, x = AddingBypass(), torch.randn(3, 5)
    out = torch.full((3, 5), 1000.0)
    with pytest.warns(RuntimeWarning, match="disagreed"):
        _, rec = recorded(library, x, out, (1,))
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
    [
        Handle(torch.zeros(1)),
        (None, (torch.zeros(1),)),
        {"a": Handle(torch.zeros(1))},
        Handle((Handle(torch.zeros(1)),)),  # an options object holding tensors' handles
        functools.partial(max, Handle(torch.zeros(1))),
        functools.partial(min, key=torch.zeros(1)),
        Handle(torch.zeros(1)).__init__,  # a method bound to an object holding a tensor
        torch.zeros(1).add_,  # a tensor's own (builtin) method
    ],
    ids=[
        "object",
        "nested tuple",
        "dict of objects",
        "object of objects",
        "partial",
        "partial keyword",
        "bound method",
        "bound builtin method",
    ],
)
def test_arguments_that_hold_a_tensor_are_no_constants(argument):
    """Baked into a replay such an argument points at the recorded call's memory in every later
    call (the check, on the same operands, agreed): that recording is not replayed."""
    assert replay._holds_pointer(argument)
    constants = (None, 1, 2.0, "x", (True,), {"k": None}, torch.float32, torch.Tensor, len)
    constants += (functools.partial(max, 1), Handle(None).__init__)
    assert not replay._holds_pointer(constants)  # a class with a data_ptr method holds none
    _, rec = recorded(HandleLibrary(), torch.randn(3, 5))
    assert rec is None and "holding a tensor or pointer" in replay.last_refusal


@pytest.mark.parametrize(
    "name", ["data_ptr", "__dlpack__", "__cuda_stream__", "cuda_stream", "getPtr", "iterator"]
)
def test_objects_with_a_pointer_attribute_are_no_constants(name):
    """A cute pointer, a DLPack owner or a stream holds its memory without a tensor in its
    fields (here none: ``__slots__``); the attribute alone tells it."""
    pointer = type("Pointer", (), {"__slots__": (), name: lambda self: 0})()
    assert replay._holds_pointer(pointer)
    assert not replay._holds_pointer(type("Plain", (), {"__slots__": ()})())


def test_arguments_nested_past_the_search_are_no_constants():
    """What lies deeper than ``_holds_pointer`` searches, or in a cycle, may hold a pointer it
    never saw: it counts as one (a launcher call each time, never a stale replay); as deep a
    nest of constants within the search is still a constant."""

    def nest(inner: object, levels: int) -> object:
        for _ in range(levels):
            inner = [inner]
        return inner

    assert not replay._holds_pointer(nest(None, replay._MAX_DEPTH))
    assert not replay._holds_pointer(nest(torch.float32, replay._MAX_DEPTH + 1))  # known leaf
    assert replay._holds_pointer(nest(None, replay._MAX_DEPTH + 2))  # a list not searched
    assert replay._holds_pointer(nest(object(), replay._MAX_DEPTH + 1))
    assert replay._holds_pointer(nest(Handle(None), replay._MAX_DEPTH + 1))
    cycle = Handle(None)
    cycle.tensor = cycle  # type: ignore[assignment]
    assert replay._holds_pointer(cycle)


class Lookups(Library):
    """Finds its kernels through the cache's ``get`` and ``in`` + ``[]``, as well as
    ``setdefault``; allocates its output column-major (``empty_strided``) and splits one
    workspace into two views at different offsets (``2x`` and ``1``)."""

    def launch(self, x, out=None):
        self.launcher_calls += 1
        n = x.numel()
        workspace = torch.empty(2 * n + 8)
        out = torch.empty_strided(x.shape, (1, x.shape[0])) if out is None else out
        doubled, ones = workspace[:n].view(x.shape), workspace[n + 8 :].view(x.shape)
        if "fill" not in self.compile_cache:
            self.compile_cache["fill"] = self._fill
        self.compile_cache["fill"](x, doubled, ones)
        self.compile_cache.setdefault("add", self._add)
        self.compile_cache.get("add")(doubled, ones, out)
        return out

    def _fill(self, x, doubled, ones):
        self.kernel_runs += 1
        doubled.copy_(2 * x)
        ones.fill_(1.0)

    def _add(self, doubled, ones, out):
        self.kernel_runs += 1
        out.copy_(doubled + ones)


def test_replays_keep_the_recorded_lookups_offsets_and_strides():
    """A kernel found through ``get`` is launched by the replay (else the check disagreed and
    nothing was replayed); two views of one allocation stay at their own offsets (at one, the
    second kernel read ``1 + 1``); the output a replay allocates has the launcher's strides (a
    compiled kernel is specialised for them)."""
    library = Lookups()
    x = torch.randn(3, 5)
    result, rec = recorded(library, x)
    assert rec is not None and torch.equal(result, 2 * x + 1) and result.stride() == (1, 3)
    y = torch.randn(3, 5)
    (fresh,) = rec((y, None))
    assert torch.equal(fresh, 2 * y + 1) and fresh.stride() == result.stride()


class OperandView(Library):
    """Hands its kernel a transpose of the operand (a view with its own layout)."""

    def launch(self, x, out=None):
        self.launcher_calls += 1
        out = torch.empty_like(x) if out is None else out
        self.compile_cache.setdefault("k", self._kernel)
        self.compile_cache["k"](x.t(), out)
        return out

    def _kernel(self, xt, out):
        self.kernel_runs += 1
        out.copy_(2 * xt.t() + 1)


def test_a_view_of_an_operand_as_an_argument_means_no_replay():
    """Taken for the operand itself (same pointer), the replay would hand the kernel the
    operand in place of its transpose."""
    x = torch.randn(4, 4)
    result, rec = recorded(OperandView(), x)
    assert rec is None and torch.equal(result, 2 * x + 1)
    assert replay.last_refusal == "a tensor that is neither an operand nor an allocation"


class KeywordLibrary(Library):
    def launch(self, x, out=None):
        self.launcher_calls += 1
        out = torch.empty_like(x) if out is None else out
        self.compile_cache.setdefault("k", self._kernel)
        self.compile_cache["k"](x, out, one=1.0)
        return out

    def _kernel(self, x, out, one=0.0):
        self.kernel_runs += 1
        out.copy_(2 * x + one)


def test_keyword_arguments_to_a_kernel_mean_no_replay():
    x = torch.randn(3, 5)
    result, rec = recorded(KeywordLibrary(), x)
    assert rec is None and torch.equal(result, 2 * x + 1)
    assert replay.last_refusal == "keyword arguments to a kernel"


class ScalingBypass(Library):
    """Its last kernel scales the output in place by ``factor`` and is launched directly."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def launch(self, x, out=None):
        out = super().launch(x, out)
        out.numpy()[...] *= self.factor
        return out


@pytest.mark.parametrize("factor", [1.05, -1.0], ids=["five percent", "negated"])
def test_a_bypassing_launch_with_a_small_or_sign_only_effect_is_caught(factor):
    """The check holds a replay to 1% of the launcher's result, by rows' sums (which see a sign)
    and norms: a missing launch that changed the result by 5%, or only flipped its sign, is no
    nondeterminism."""
    x = torch.randn(3, 5).abs() + 1
    with pytest.warns(RuntimeWarning, match="disagreed"):
        result, rec = recorded(ScalingBypass(factor), x)
    assert rec is None
    torch.testing.assert_close(result, factor * (2 * x + 1))


class AddingDoubleBypass(AddingBypass):
    """Adds ``2x`` into ``out`` with a kernel launched directly, after a recorded one."""

    plus = 0.0


def test_a_missing_addition_whose_rows_sum_to_zero_is_caught():
    """What a launch adds into a gradient can have rows that sum to zero: the rows' sums of the
    addition and of none agree, their norms do not."""
    a = torch.randint(-4, 5, (3, 2)).float() + 8  # integers: the rows of [a, -a] sum to 0
    x = torch.cat((a, -a), dim=1)
    out = torch.zeros(3, 4)
    library = AddingDoubleBypass()
    with pytest.warns(RuntimeWarning, match="disagreed"):
        _, rec = recorded(library, x, out, (1,))
    assert rec is None
    assert torch.equal(out, 2 * x)  # once


class AddingAfterBypassFirst(Adding):
    """Its first kernel (``workspace = 2x``) is launched directly; the recorded second adds
    ``workspace + 1`` into ``out``."""

    launch = BypassFirst.launch


def test_a_refused_recording_puts_an_accumulated_operand_back_before_the_launcher():
    """The check's replay added its (poisoned) sums into the operand; the launcher, called
    again, must add into what the operand held before the call."""
    library, x = AddingAfterBypassFirst(), torch.randn(3, 5)
    out = torch.randn(3, 5)
    old = out.clone()
    with pytest.warns(RuntimeWarning, match="disagreed"):
        _, rec = recorded(library, x, out, (1,))
    assert rec is None
    torch.testing.assert_close(out, old + 2 * x + 1)  # once, and no NaN from the check


def test_a_launcher_that_launches_nothing_through_the_caches_is_not_replayed():
    """Its work is all outside what a replay re-issues; an integer result, which the check
    cannot poison with NaN, still held it when the check looked, and a replay would have kept
    an empty buffer."""
    x = torch.arange(15).view(3, 5)

    def launch():
        out = torch.empty_like(x)
        out.numpy()[...] = 2 * x.numpy() + 1  # a kernel launched directly
        return out

    library = Library()
    result, rec = replay.record(launch, {library: "compile_cache"}, (x, None), lambda r: (r,))
    assert rec is None and replay.last_refusal == "no launch"
    assert torch.equal(result, 2 * x + 1)
