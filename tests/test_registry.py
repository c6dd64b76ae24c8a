"""The registry: lookup by name, enumeration, and new strategies picked up automatically."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import ringattn
from ringattn import Strategy, registry
from ringattn.computers.math import MathComputer


def test_builtin_names():
    assert set(registry.names("dilation")) >= {"segment_local", "global"}
    assert set(registry.names("computer")) >= {"math", "sdpa"}
    assert set(registry.names("communicator")) >= {"local"}
    assert set(registry.names("memory")) >= {"none", "pooled"}


def test_get_returns_the_class_with_its_name():
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert registry.get(kind, name).name == name


def test_unknown_kind():
    """Refused with the kinds named wherever a kind is taken: ``Strategy.component`` raised
    getattr's AttributeError for it, and a list (unhashable) got "unhashable type: 'list'"."""
    for kind in ("kernel", ["computer"], None):
        with pytest.raises(ValueError, match="kind must be one of"):
            registry.names(kind)
        with pytest.raises(ValueError, match="kind must be one of"):
            registry.unregister(kind, "x")
        with pytest.raises(ValueError, match="kind must be one of"):
            ringattn.Strategy().component(kind)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("computer", "math")(type("Other", (MathComputer,), {}))


def test_registration_refuses_what_cannot_run():
    """Each of these registered and failed later: Strategy.all() raised AttributeError for
    everyone, a computer registered as memory failed only inside a call, a class missing an
    abstract method failed deep in the core unnamed, an alias renamed the built-in class, and an
    int name could never be used."""
    from ringattn.computers.base import BlockComputer
    from ringattn.memory.base import MemoryManager

    class NoBackward(BlockComputer):
        def forward(self, q, k, v, causal, scale):
            return q, q[..., 0]

    class Alias(MathComputer):
        pass

    refused = [
        (TypeError, "subclass of ringattn.computers.base.BlockComputer", "computer", "f", len),
        (TypeError, "ringattn.memory.base.MemoryManager", "memory", "m", MathComputer),
        (TypeError, "must define ['backward']", "computer", "nb", NoBackward),
        (TypeError, "must define ['cached'", "memory", "empty", type("E", (MemoryManager,), {})),
        (ValueError, "already the computer strategy 'math'", "computer", "alias", MathComputer),
        (ValueError, "non-empty str of letters, digits", "computer", "a/b", Alias),
        (ValueError, "non-empty str of letters, digits", "computer", 3, Alias),
        (ValueError, "non-empty str of letters, digits", "computer", "", Alias),
        (ValueError, "non-empty str of letters, digits", "computer", "chunk,4", Alias),
        # (before: accepted, though a newline splits a row of ablate's tables)
        (ValueError, "non-empty str of letters, digits", "computer", "a b", Alias),
        (ValueError, "non-empty str of letters, digits", "computer", "with\nnewline", Alias),
        (ValueError, "non-empty str of letters, digits", "computer", " math", Alias),
    ]
    for error, words, kind, name, cls in refused:
        with pytest.raises(error, match=re.escape(words)):
            registry.register(kind, name)(cls)
    assert MathComputer.name == "math"
    assert "alias" not in registry.names("computer") and "f" not in registry.names("computer")


def test_registration_refuses_a_class_the_module_cannot_build():
    """Every module builds a component with the same keywords (a communicator with ``group``,
    ``memory`` and ``layout``; the others with none): a communicator lacking one, or a memory
    manager needing an argument, registered and failed at the first module with Python's
    "unexpected keyword argument", unnamed. Keywords taken by name, with defaults or through
    ``**kwargs``, are accepted."""
    from ringattn.communicators.local import LocalCommunicator
    from ringattn.memory.none import NoReuse

    class NoGroup(LocalCommunicator):
        def __init__(self, memory=None, layout="contiguous"):
            pass

    class NeedsSize(NoReuse):
        def __init__(self, size):
            pass

    for kind, cls, words in [
        ("communicator", NoGroup, "group, memory, layout"),
        ("memory", NeedsSize, "no arguments"),
    ]:
        with pytest.raises(TypeError, match=re.escape(words)):
            registry.register(kind, "unbuildable")(cls)
        assert "unbuildable" not in registry.names(kind)

    class AnyKeywords(LocalCommunicator):
        def __init__(self, **options):
            pass

    class Sized(NoReuse):
        def __init__(self, size=8):
            pass

    class Described(NoReuse):  # (its __signature__ is the instances', unreadable on the class)
        @property
        def __signature__(self):
            return inspect.Signature()

    try:
        registry.register("communicator", "any_keywords")(AnyKeywords)
        registry.register("memory", "sized")(Sized)
        registry.register("memory", "described")(Described)  # (refused: "unexpected object")
        assert isinstance(
            ringattn.DilatedAttention(
                (4,), (1,), strategy=ringattn.Strategy(memory="described")
            ).memory,
            Described,
        )
    finally:
        registry.unregister("communicator", "any_keywords", missing_ok=True)
        registry.unregister("memory", "sized", missing_ok=True)
        registry.unregister("memory", "described", missing_ok=True)


def test_a_built_in_name_is_refused_without_the_unregister_hint():
    """Registering under a built-in's name suggested ``unregister(...)`` first, which refuses
    built-ins: the message says a built-in stays."""
    with pytest.raises(ValueError, match="a built-in strategy stays registered") as refused:
        registry.register("computer", "sdpa")(type("Mine", (MathComputer,), {}))
    assert "unregister" not in str(refused.value)


def test_an_unsupported_override_must_take_every_keyword_the_module_passes():
    """An override written before ``backend=`` (or any later keyword) registered and failed at
    its first call with "unexpected keyword argument"; now registration names what it lacks.
    ``**kwargs`` or every keyword by name (with or without defaults) is accepted."""
    from ringattn.computers.base import AttentionComputer

    keywords = [
        p.name
        for p in inspect.signature(AttentionComputer.unsupported).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert "backend" in keywords and "mixing" in keywords

    def override(signature: str) -> type:
        namespace: dict = {}
        exec(f"def unsupported{signature}:\n    return None", namespace)
        return type("Custom", (MathComputer,), {"unsupported": namespace["unsupported"]})

    older = "(self, dtype, device, needs_grad, *, compiled=False, dilation='', traced=False, "
    refused = {
        older + "mixing='')": ["backend"],  # written before backend= existed
        "(self, dtype, device, needs_grad)": keywords,
        "(self, dtype, device, needs_grad, *, compiled, dilation, traced)": ["mixing", "backend"],
    }
    for signature, lacking in refused.items():
        with pytest.raises(TypeError, match=re.escape(f"keyword arguments {lacking}")):
            registry.register("computer", "custom_kw")(override(signature))
        assert "custom_kw" not in registry.names("computer")
    accepted = [
        "(self, dtype, device, needs_grad, **kwargs)",
        "(self, *args, **kwargs)",
        older + "mixing='', backend='inductor')",
        "(self, dtype, device, needs_grad, compiled=False, dilation='', traced=False, "
        "mixing='', backend='')",  # positional-or-keyword is fine too
    ]
    try:
        for signature in accepted:
            cls = override(signature)
            registry.register("computer", "custom_kw")(cls)
            assert registry.get("computer", "custom_kw") is cls
            registry.unregister("computer", "custom_kw")
    finally:
        registry.unregister("computer", "custom_kw", missing_ok=True)


def test_a_taken_name_is_never_given_to_another_class_silently():
    """Only the same class, or the class defined again (same module and qualified name), keeps
    a taken name: a class of another module named like the built-in (a notebook's ``class
    MathComputer(MathComputer)``) is refused and the built-in stays; registering a class again
    under its own name changes nothing."""
    namesake = type("MathComputer", (MathComputer,), {"__module__": "notebook"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register("computer", "math")(namesake)
    assert registry.get("computer", "math") is MathComputer
    assert registry.register("computer", "math")(MathComputer) is MathComputer
    assert registry.get("computer", "math") is MathComputer and MathComputer.name == "math"


def test_a_class_defined_again_replaces_its_registration():
    """A notebook cell re-run defines the class again under its registered name: it replaces
    the old one (it raised "already registered"); another class under that name is refused
    with the way out named."""

    def define(factor):
        @registry.register("computer", "rerun")
        class Rerun(MathComputer):
            def forward(self, q, k, v, causal, scale):
                out, lse = super().forward(q, k, v, causal, scale)
                return out * factor, lse

        return Rerun

    try:
        first, second = define(2.0), define(1.0)
        assert first is not second and registry.get("computer", "rerun") is second
        with pytest.raises(ValueError, match=re.escape("unregister('computer', 'rerun') first")):
            registry.register("computer", "rerun")(type("Other", (MathComputer,), {}))
    finally:
        registry.unregister("computer", "rerun", missing_ok=True)


def test_unregister_refuses_unknown_and_built_in_names():
    """A typo used to unregister nothing, silently, and a built-in could be removed (breaking
    ``Strategy()``'s defaults for everyone in the process): both are refused, naming the rule;
    ``missing_ok`` is the ``finally`` block's way out."""
    with pytest.raises(ValueError, match="no computer strategy 'nope' to unregister; registered: "):
        registry.unregister("computer", "nope")
    registry.unregister("computer", "nope", missing_ok=True)  # nothing to do, no error
    for kind, name in [("computer", "sdpa"), ("memory", "pooled"), ("dilation", "global")]:
        with pytest.raises(ValueError, match=f"{kind} strategy '{name}' is built in"):
            registry.unregister(kind, name)
        assert name in registry.names(kind)

    @registry.register("computer", "temporary")
    class Temporary(MathComputer):
        pass

    registry.unregister("computer", "temporary")
    assert "temporary" not in registry.names("computer")
    # a package of one's own named like the library is not built in (its first dotted part is)
    extra = type("Extra", (MathComputer,), {"__module__": "ringattn_extras.kernels"})
    registry.register("computer", "extra")(extra)
    registry.unregister("computer", "extra")
    assert "extra" not in registry.names("computer")
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.unregister("computers", "temporary")
    # (a list raised "unhashable type: 'list'", and any other non-str passed missing_ok silently)
    for name in (["temporary"], 3):
        with pytest.raises(TypeError, match=r"name must be a strategy name \(str\), got"):
            registry.unregister("computer", name, missing_ok=True)


def test_incompatible_with_must_give_a_reason():
    @registry.register("computer", "sloppy")
    class Sloppy(MathComputer):
        @classmethod
        def incompatible_with(cls, strategy):
            return strategy.memory == "none"

    try:
        with pytest.raises(TypeError, match="must return a reason"):
            ringattn.Strategy(computer="sloppy", memory="none").check()
    finally:
        registry.unregister("computer", "sloppy", missing_ok=True)


def test_default_strategy_is_valid():
    assert ringattn.Strategy() in ringattn.Strategy.all()
    assert ringattn.Strategy().label == "segment_local/sdpa/local/pooled"


def test_all_with_fixed_fields():
    only_math = ringattn.Strategy.all(computer="math")
    assert only_math and all(s.computer == "math" for s in only_math)
    with pytest.raises(ValueError, match="unknown Strategy fields"):
        ringattn.Strategy.all(kernel="x")


def test_a_new_strategy_is_picked_up_by_the_property_tests():
    """One module + one register line: the property tests enumerate Strategy.all() at run time."""
    import test_strategies

    @registry.register("computer", "math_twice")
    class MathTwice(MathComputer):
        """A toy computer: the math computer on both halves of the batch separately."""

        def forward(self, q, k, v, causal, scale):
            half = q.shape[0] // 2 or 1
            parts = [
                super(MathTwice, self).forward(q[s], k[s], v[s], causal, scale)
                for s in (slice(0, half), slice(half, None))
                if q[s].shape[0]
            ]
            return torch.cat([o for o, _ in parts]), torch.cat([l for _, l in parts])

    try:
        assert any(s.computer == "math_twice" for s in test_strategies.local_strategies())
        p = {
            "b": 3,
            "n": 19,
            "h": 3,
            "d": 8,
            "segment_lengths": (4, 8),
            "dilation_rates": (1, 2),
            "causal": True,
            "mixing": "lse",
        }
        checked = [s for s in test_strategies.local_strategies() if s.computer == "math_twice"]
        test_strategies.check_against_oracle(p, torch.float32, checked)

        # and the check bites: a wrong computer fails it
        @registry.register("computer", "wrong")
        class Wrong(MathComputer):
            def forward(self, q, k, v, causal, scale):
                out, lse = super().forward(q, k, v, causal, scale)
                return out * 1.01, lse

        wrong = [s for s in test_strategies.local_strategies() if s.computer == "wrong"]
        with pytest.raises(AssertionError, match="forward rel err"):
            test_strategies.check_against_oracle(p, torch.float32, wrong)
    finally:
        registry.unregister("computer", "math_twice", missing_ok=True)
        registry.unregister("computer", "wrong", missing_ok=True)
    assert "math_twice" not in registry.names("computer")


def test_a_new_one_device_communicator_is_picked_up_by_the_property_tests():
    """The single-device tests took ``Strategy.all(communicator="local")``, by name, so a new
    one-device communicator was held to the oracle by no test (and the distributed tests took
    every other name as sequence-parallel): they select by the communicator's ``distributed``
    flag now (``Strategy.single_device`` / ``sequence_parallel``)."""
    import test_strategies

    from ringattn.communicators.local import LocalCommunicator

    @registry.register("communicator", "local_again")
    class LocalAgain(LocalCommunicator):
        pass

    try:
        local = test_strategies.local_strategies()
        assert any(s.communicator == "local_again" for s in local)
        assert not any(
            s.communicator == "local_again" for s in ringattn.Strategy.sequence_parallel()
        )
        assert {s.communicator for s in ringattn.Strategy.sequence_parallel()} >= {
            "ring",
            "all_gather",
        }
        assert set(local) | set(ringattn.Strategy.sequence_parallel()) == set(
            ringattn.Strategy.all()
        )
        # ... and the distributed tests' coverage check does not ask the pool to run it
        import test_distributed

        test_distributed.test_every_sequence_parallel_strategy_is_run()
    finally:
        registry.unregister("communicator", "local_again")


def test_the_oracle_check_has_no_loopholes():
    """``check_against_oracle`` refuses an empty selection (it checked the built-ins instead, so
    a filter that matched nothing passed any new computer), and asks a computer about gradients
    per dtype (asked for float32 alone, one that refused float32 gradients had its bf16
    gradients, zeros here, go unchecked)."""
    import test_strategies

    p = {"b": 1, "n": 12, "h": 2, "d": 8, "segment_lengths": (4, 8), "dilation_rates": (1, 2)}
    with pytest.raises(ValueError, match="at least one strategy"):
        test_strategies.check_against_oracle(p, torch.float32, [])

    @registry.register("computer", "zero_bf16_grads")
    class ZeroLowPrecisionGrads(MathComputer):
        def unsupported(self, dtype, device, needs_grad, **kwargs):
            return "no float32 gradients" if needs_grad and dtype == torch.float32 else None

        def backward(self, dout, q, k, v, out, lse, causal, scale):
            return tuple(torch.zeros_like(x) for x in (q, k, v))

    try:
        strategy = ringattn.Strategy(computer="zero_bf16_grads", dilation="segment_local")
        with pytest.raises(AssertionError, match="dq rel err"):
            test_strategies.check_against_oracle(p, torch.bfloat16, [strategy])
    finally:
        registry.unregister("computer", "zero_bf16_grads", missing_ok=True)


def test_the_functional_form_runs_a_re_registered_class():
    """A notebook cell re-run with a fix re-registers a strategy under its old name: the
    functional form runs the new class (it kept a module of the old one, keyed by names)."""
    q = torch.randn(1, 8, 2, 4)
    options = {"segment_lengths": (4,), "dilation_rates": (1,), "compile": False}
    ref = ringattn.reference.dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))

    @registry.register("computer", "fixed_later")
    class Broken(MathComputer):
        def forward(self, q, k, v, causal, scale):
            out, lse = super().forward(q, k, v, causal, scale)
            return 2 * out, lse

    strategy = ringattn.Strategy(computer="fixed_later")
    try:
        broken = ringattn.dilated_attention(q, q, q, **options, strategy=strategy)
        assert (broken.double() - ref).abs().max() > 0.1
        registry.unregister("computer", "fixed_later")

        @registry.register("computer", "fixed_later")
        class Fixed(MathComputer):
            pass

        fixed = ringattn.dilated_attention(q, q, q, **options, strategy=strategy)
        assert (fixed.double() - ref).abs().max() < 1e-5
    finally:
        registry.unregister("computer", "fixed_later", missing_ok=True)


def test_flex_refuses_a_dilation_it_has_no_masks_for():
    """A new dilation processor with flex: refused by name (flex ran it as ``global`` before,
    never calling its ``read``), and left out of the enumerated strategies."""
    from ringattn.dilation.segment_local import SegmentLocalDilation

    @registry.register("dilation", "copying")
    class Copying(SegmentLocalDilation):
        def read(self, x, block, index):
            return super().read(x, block, index).clone()

    try:
        with pytest.raises(ValueError, match="flex has mask functions for dilation"):
            ringattn.Strategy(dilation="copying", computer="flex").check()
        labels = {s.label for s in ringattn.Strategy.all(dilation="copying")}
        assert "copying/sdpa/local/pooled" in labels
        assert not any("/flex/" in label for label in labels)
    finally:
        registry.unregister("dilation", "copying", missing_ok=True)


def test_the_catalog_lists_every_built_in_strategy():
    """``docs/catalog.md`` is where a newcomer looks a name up (README and architecture.md
    point there), and it is regenerated by hand (``python docs/figures.py``): it must hold
    exactly the registered built-ins, each with its class (nothing checked it)."""
    text = (Path(__file__).parents[1] / "docs" / "catalog.md").read_text()
    rows = set(re.findall(r"^\| `([\w.-]+)` \| `(\w+)` \|", text, flags=re.MULTILINE))
    built_in = {
        (name, cls.__name__)
        for kind in registry.KINDS
        for name in registry.names(kind)
        if (cls := registry.get(kind, name)).__module__.split(".")[0] == "ringattn"
    }
    assert rows == built_in


def test_a_label_names_its_strategy():
    """``Strategy.from_label`` takes back what ``label`` prints (ablate's rows), for every valid
    combination; a label with a part missing, or an unknown name, is refused naming the rule."""
    for strategy in Strategy.all():
        assert Strategy.from_label(strategy.label) == strategy
    with pytest.raises(ValueError, match="one component per kind, dilation/computer/commun"):
        Strategy.from_label("segment_local/sdpa/local")
    with pytest.raises(ValueError, match="sdpx"):
        Strategy.from_label("segment_local/sdpx/local/pooled")
    with pytest.raises(TypeError, match="label must be a str"):
        Strategy.from_label(Strategy())  # type: ignore[arg-type]
