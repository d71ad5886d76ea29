"""Every public name has a docstring, and every public callable with parameters documents them.

Walks ``overlaycache.__all__`` and the public names of :mod:`overlaycache.nbd`,
:mod:`overlaycache.store` and :mod:`overlaycache.retention`; for each exported class, also its
public methods and properties (those defined in overlaycache, not inherited from ``object``,
``Exception`` or ``typing.Protocol``). A callable that takes parameters (beyond ``self``/``cls``)
needs a numpydoc ``Parameters`` section naming each of them: for a class, in the class docstring
or its ``__init__``'s. Docstrings inherited from an overridden method count (as ``help()`` and
Sphinx show them).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import overlaycache
import overlaycache.nbd
import overlaycache.retention
import overlaycache.store

MODULES: tuple[ModuleType, ...] = (overlaycache, overlaycache.nbd, overlaycache.store, overlaycache.retention)

#: Classes the package constructs itself: users get them from a factory (named here), never by
#: calling the class, so their constructors' parameters are internal and not documented.
CONSTRUCTED_BY_THE_PACKAGE: dict[str, str] = {
    "Volume": "Volume.create / Volume.open",
    "Clone": "image.clone(path) / Clone.create / Volume.open_clone / Clone.open",
    "Hydration": "Volume.hydrate",
    "VirtualImage": "Volume.image (of a local snapshot)",
    "RecoveryImage": "Volume.image (of a PIT)",
}

#: Public callables exempt from the Parameters rule, each with the reason.
PARAMETERS_EXEMPT: dict[str, str] = {}


def _own_doc(obj: Any) -> str | None:
    """The docstring written for ``obj``: a class's own (not its base's, which ``inspect.getdoc``
    would give), and not the signature ``dataclasses.dataclass`` makes up from the fields."""
    raw = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not isinstance(raw, str) or not raw.strip():
        return None
    doc = inspect.cleandoc(raw)
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(") and "\n" not in doc:
        return None
    return doc


def _section(title: str) -> re.Pattern[str]:
    return re.compile(rf"^(?P<indent>[ \t]*){title}\n(?P=indent)-{{{len(title)}}}\n(?P<body>.*?)"
                      r"(?:\n\s*\n(?P=indent)\S[^\n]*\n(?P=indent)-{3,}\n|\Z)", re.S | re.M)


_PARAMETERS = _section("Parameters")
_ATTRIBUTES = _section("Attributes")


def _params_documented(doc: str, section: re.Pattern[str] = _PARAMETERS) -> set[str] | None:
    """Names listed in the ``Parameters`` section of ``doc``, or None without that section."""
    m = section.search(doc)
    if m is None:
        return None
    names: set[str] = set()
    for line in m.group("body").splitlines():
        if not line or line[0].isspace():
            continue  # a description line
        head = line.split(" : ", 1)[0]
        for part in head.split(","):
            names.add(part.strip().lstrip("*"))
    return names


def _parameters(fn: Callable[..., Any], bound: bool) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = list(sig.parameters.values())
    if bound and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p.name for p in params]


def _ours(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "") or "").startswith("overlaycache")


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties of ``cls`` defined in overlaycache (by any class of its MRO)."""
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not _ours(owner):
            continue
        yield name, inspect.getattr_static(cls, name)


def _exports() -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for mod in MODULES:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue  # constants (__version__, DEFAULT_PORT, ...) are documented beside them
            seen.add(id(obj))
            yield f"{mod.__name__}.{name}", obj


def _check_params(where: str, fn: Callable[..., Any], doc: str | None, bound: bool, problems: list[str],
                  fields: bool = False) -> None:
    """Append to ``problems`` what ``doc`` leaves out of ``fn``'s parameters; with ``fields`` (a
    dataclass's generated ``__init__``), an ``Attributes`` section naming the fields does too."""
    params = _parameters(fn, bound)
    if not params or where in PARAMETERS_EXEMPT or doc is None:
        return
    documented = _params_documented(doc)
    if documented is None and fields:
        documented = _params_documented(doc, _ATTRIBUTES)
    if documented is None:
        problems.append(f"{where}: no 'Parameters' section for {', '.join(params)}")
        return
    missing = [p for p in params if p not in documented]
    if missing:
        problems.append(f"{where}: 'Parameters' does not name {', '.join(missing)}")


def _problems() -> list[str]:
    problems: list[str] = []
    for where, obj in _exports():
        doc = _own_doc(obj)
        if doc is None:
            problems.append(f"{where}: no docstring")
        if inspect.isfunction(obj):
            _check_params(where, obj, doc, False, problems)
            continue
        # The constructor is documented where it is defined: an exception's subclasses share
        # their base's. A dataclass's generated one takes the fields its Attributes list.
        owner = next(k for k in obj.__mro__ if "__init__" in vars(k))
        init = vars(owner)["__init__"]
        if _ours(owner) and _ours(init) and obj.__name__ not in CONSTRUCTED_BY_THE_PACKAGE:
            init_doc = "\n".join(d for d in (_own_doc(owner), init.__doc__ and inspect.cleandoc(init.__doc__)) if d)
            generated = dataclasses.is_dataclass(owner) and init.__doc__ is None
            _check_params(where if owner is obj else f"{where} (from {owner.__name__})", init, init_doc or None,
                          True, problems, fields=generated)
        for name, member in _members(obj):
            what = f"{where}.{name}"
            if isinstance(member, property):
                if not _own_doc(member.fget):
                    problems.append(f"{what}: property without a docstring")
                continue
            bound = True
            if isinstance(member, (classmethod, staticmethod)):
                bound = isinstance(member, classmethod)
                member = member.__func__
            if not callable(member):
                continue  # a class attribute (a constant, a dataclass field's default)
            fn = getattr(obj, name)
            mdoc = inspect.getdoc(fn)
            if not mdoc:
                problems.append(f"{what}: no docstring")
                continue
            _check_params(what, member, mdoc, bound, problems)
    return problems


def test_the_walk_sees_the_public_api() -> None:
    names = dict(_exports())
    assert "overlaycache.Volume" in names and "overlaycache.nbd.NBDServer" in names
    assert "overlaycache.store.register_store" in names and "overlaycache.retention.parse_duration" in names
    assert {"write", "snapshot", "hydrate", "replication_lag"} <= {n for n, _ in _members(overlaycache.Volume)}


def test_the_exemptions_name_what_exists() -> None:
    names = {name for mod in MODULES for name in mod.__all__}
    assert set(CONSTRUCTED_BY_THE_PACKAGE) <= names
    for name in CONSTRUCTED_BY_THE_PACKAGE:  # still a constructor with parameters to leave out
        assert _parameters(getattr(overlaycache, name).__init__, True), name
    for where in PARAMETERS_EXEMPT:  # "overlaycache.Volume.read": each part an attribute of the last
        obj: Any = overlaycache
        for part in where.split(".")[1:]:
            obj = getattr(obj, part)


def test_the_checks_catch_what_they_are_for() -> None:
    def undocumented(a: int) -> None:
        pass

    def no_section(a: int) -> None:
        """Does something with ``a``."""

    def one_missing(a: int, b: int) -> None:
        """Does something.

        Parameters
        ----------
        a : int
            A number.

        Returns
        -------
        None
        """

    def documented(a: int, *args: int, b: int = 0, **kwargs: int) -> None:
        """Does something.

        Parameters
        ----------
        a, b : int
            Numbers.
        *args, **kwargs
            More.
        """

    class Base:
        """Documented."""

    class Derived(Base):
        pass

    @dataclasses.dataclass
    class Fields:
        a: int

    assert _own_doc(Base) == "Documented." and _own_doc(Derived) is None and _own_doc(Fields) is None

    found: list[str] = []
    for fn in (undocumented, no_section, one_missing, documented):
        _check_params(fn.__name__, fn, inspect.getdoc(fn), False, found)
    assert found == ["no_section: no 'Parameters' section for a", "one_missing: 'Parameters' does not name b"]


def test_every_public_callable_is_documented() -> None:
    problems = _problems()
    assert not problems, f"{len(problems)} public callables lack documentation:\n" + "\n".join(problems)
