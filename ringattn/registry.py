"""Name → class registries for the four component kinds.

``register(kind, name)`` is a class decorator; ``names(kind)`` lists what is registered and
``get(kind, name)`` looks a class up (``ValueError`` naming the valid choices otherwise). Importing
``ringattn`` registers every built-in strategy; ``docs/catalog.md`` (generated from these
registries) maps each name to its class and file.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import TypeVar

KINDS = ("dilation", "computer", "communicator", "memory")

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}

T = TypeVar("T", bound=type)

# what a class registered under each kind must derive from (module, classes): read when a class
# is registered, since those modules import this one's users
_BASES = {
    "dilation": ("ringattn.dilation.base", ("DilationProcessor",)),
    "computer": ("ringattn.computers.base", ("BlockComputer", "LayoutComputer")),
    "communicator": ("ringattn.communicators.base", ("Communicator",)),
    "memory": ("ringattn.memory.base", ("MemoryManager",)),
}


def _check_kind(kind: str) -> None:
    """A ``ValueError`` naming the kinds unless ``kind`` is one (compared, not hashed: a list
    raised "unhashable type")."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def register(kind: str, name: str) -> Callable[[T], T]:
    """Register a component class under ``kind`` / ``name``; the class gets ``.name = name``.

    The class must derive from the kind's base class and define each of its abstract methods
    (checked here: a class missing one registered and failed deep inside a call, unnamed), be
    buildable with the keywords every module passes (:data:`CONSTRUCTOR_KEYWORDS`) and, for a
    computer, have an ``unsupported()`` that takes every keyword the module passes: else a
    ``TypeError``. ``kind`` and ``name`` (letters, digits, ``_``, ``-`` or ``.``) are checked
    when ``register`` is called (a ``ValueError``). A class defined again under its registered
    name (a notebook cell re-run) replaces the old one; any other class under a taken name is
    refused (a ``ValueError``), as is a class already registered under another name
    (registering it again renamed it, built-ins included)."""
    _check_kind(kind)
    # '/' separates Strategy.label's parts, ',' the names of ablate's filters; a newline would
    # split a row of its Markdown and CSV tables, a space a name on its command lines
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(
            "name must be a non-empty str of letters, digits, '_', '-' or '.' (it is part of "
            f"Strategy.label and of ablate's filters and tables), got {name!r}"
        )

    def decorate(cls: T) -> T:
        module, base_names = _BASES[kind]
        bases = tuple(getattr(importlib.import_module(module), base) for base in base_names)
        if not (isinstance(cls, type) and issubclass(cls, bases)):
            raise TypeError(
                f"a {kind} strategy must be a subclass of "
                f"{' or '.join(f'{module}.{base}' for base in base_names)}, got {cls!r}"
            )
        missing = sorted(
            attr for attr in dir(cls) if getattr(getattr(cls, attr), "__isabstractmethod__", False)
        )
        if missing:
            raise TypeError(f"{kind} strategy {name!r} ({cls.__name__}) must define {missing}")
        if kind == "computer":
            base = importlib.import_module(module).AttentionComputer
            _check_unsupported_keywords(cls, name, base)
        _check_constructor(cls, kind, name)
        own_name = cls.__dict__.get("name")
        if own_name not in (None, name) and _REGISTRY[kind].get(own_name) is cls:
            raise ValueError(
                f"{cls.__name__} is already the {kind} strategy {own_name!r}: register a "
                f"subclass under {name!r} instead"
            )
        existing = _REGISTRY[kind].get(name)
        redefined = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if existing is not None and existing is not cls and not redefined:
            raise ValueError(
                f"{kind} strategy {name!r} is already registered by {existing!r}: pick another "
                + (
                    "name (a built-in strategy stays registered)"
                    if _built_in(existing)
                    else f"name, or ringattn.registry.unregister({kind!r}, {name!r}) first"
                )
            )
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[kind][name] = cls
        return cls

    return decorate


# the keywords each kind's class is built with (ringattn.api.DilatedAttention.__init__)
CONSTRUCTOR_KEYWORDS = {
    "dilation": (),
    "computer": (),
    "memory": (),
    "communicator": ("group", "memory", "layout"),
}


def _check_constructor(cls: type, kind: str, name: str) -> None:
    """A ``TypeError`` where the module could not build the class: every module builds each
    component with :data:`CONSTRUCTOR_KEYWORDS` alone (a communicator without ``group`` or a
    memory manager needing an argument registered, and failed at its first module, unnamed)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        # a signature inspect cannot read (a C type's; a ``__signature__`` that is no
        # Signature, as a property for the instances is on the class): nothing to check
        return
    try:
        signature.bind(**dict.fromkeys(CONSTRUCTOR_KEYWORDS[kind]))
    except TypeError as exc:
        keywords = ", ".join(CONSTRUCTOR_KEYWORDS[kind]) or "no arguments"
        raise TypeError(
            f"{kind} strategy {name!r} ({cls.__name__}): every module builds it with "
            f"{keywords}, which its __init__ does not take ({exc})"
        ) from None


def _check_unsupported_keywords(cls: type, name: str, base: type) -> None:
    """A ``TypeError`` naming the keywords an ``unsupported()`` override cannot take.

    The module passes every keyword of ``AttentionComputer.unsupported`` on each first call,
    and that list grows between releases (``backend=`` came last): an override written against
    an older one failed only at its first call, with Python's "unexpected keyword argument"."""
    ours = inspect.signature(base.unsupported).parameters  # type: ignore[attr-defined]
    theirs = inspect.signature(cls.unsupported).parameters  # type: ignore[attr-defined]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in theirs.values()):
        return
    takes = {p.name for p in theirs.values() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    keywords = [p.name for p in ours.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    lacking = [word for word in keywords if word not in takes]
    if lacking:
        raise TypeError(
            f"computer strategy {name!r} ({cls.__name__}): unsupported() must take the keyword "
            f"arguments {lacking} (the module passes {keywords}); add them, or end its "
            "signature with **kwargs"
        )


def _built_in(cls: type) -> bool:
    """Whether ``cls`` is one of ``ringattn``'s own strategies (which stay registered)."""
    return cls.__module__.split(".")[0] == "ringattn"


def unregister(kind: str, name: str, *, missing_ok: bool = False) -> None:
    """Remove a registration (for tests and notebooks that add a temporary strategy).

    A name that is not registered is a ``ValueError`` unless ``missing_ok`` (a ``finally`` that
    may run before the registration did); so is a built-in strategy's (``ringattn``'s own: the
    defaults, ``Strategy.all()`` and the ablations' baseline name them; register a subclass under
    another name instead)."""
    _check_kind(kind)
    if not isinstance(name, str):  # (a list raised "unhashable type", an int passed missing_ok)
        raise TypeError(f"name must be a strategy name (str), got {type(name).__name__}")
    cls = _REGISTRY[kind].get(name)
    if cls is None:
        if missing_ok:
            return
        raise ValueError(
            f"no {kind} strategy {name!r} to unregister; registered: {', '.join(names(kind))}"
        )
    if _built_in(cls):
        raise ValueError(
            f"{kind} strategy {name!r} is built in ({cls.__module__}.{cls.__qualname__}) and "
            "stays registered: register a subclass under another name instead"
        )
    del _REGISTRY[kind][name]


def names(kind: str) -> tuple[str, ...]:
    """The names registered under ``kind``, in registration order."""
    _check_kind(kind)
    return tuple(_REGISTRY[kind])


def get(kind: str, name: str) -> type:
    """The class registered under ``kind`` / ``name``: a ``ValueError`` naming the registered
    ones (and the kind a name belongs to, where it is another's) otherwise, a ``TypeError``
    where ``name`` is no str."""
    _check_kind(kind)
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a strategy name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        # Strategy("sdpa") sets the dilation (the first field): say where the name belongs
        elsewhere = [other for other in KINDS if other != kind and name in _REGISTRY[other]]
        hint = f" ({name!r} is a {elsewhere[0]}: {elsewhere[0]}={name!r})" if elsewhere else ""
        raise ValueError(
            f"unknown {kind} strategy {name!r}{hint}; registered: {', '.join(names(kind))}"
        ) from None
