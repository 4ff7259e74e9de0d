"""A small generic name → class registry with entry-point plug-ins.

Cells, wrappers and tasks each keep one :class:`Registry`. Names are
registered with a decorator; third-party packages can add entries through an
``importlib.metadata`` entry-point group, loaded lazily on first lookup. A
plug-in that fails to import becomes a warning, and an unknown name is a
:class:`~rnnsearch.errors.ConfigError` that lists the valid names
(the pattern of timm's model registry and MLflow's plug-in loaders).
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from rnnsearch.errors import ConfigError, choice_error

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes (or factories) of one kind."""

    def __init__(self, kind: str, entry_point_group: str | None = None,
                 check: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self.group = entry_point_group
        self.check = check  # what is wrong with an object offered for registration (None: nothing)
        self._items: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Class decorator adding the class under ``name``; a second use of a name is an error unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"A {self.kind} name must be a non-empty string, got {name!r}.")

        def deco(obj: T) -> T:
            problem = self.check(obj) if self.check is not None else None
            if problem:
                raise TypeError(f"Cannot register {_qualname(obj)} as {self.kind} {name!r}: {problem}")
            if name in self._items and self._items[name] is not obj and not replace:
                raise ConfigError(
                    f"A {self.kind} named {name!r} is already registered ({_qualname(self._items[name])}); "
                    f"pick another name or pass replace=True to override it."
                )
            self._items[name] = obj
            try:
                setattr(obj, "registry_name", name)
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue
            before = len(self._items)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not break the registry
                warnings.warn(f"Could not load {self.kind} plug-in {ep.name!r} ({ep.value}): {exc}", stacklevel=2)
                continue
            # Importing the module usually registers the object itself; otherwise register what was loaded.
            if ep.name not in self._items and inspect.ismodule(obj):  # a module is never a cell/task itself
                if len(self._items) == before:
                    warnings.warn(f"The {self.kind} plug-in {ep.name!r} imported {ep.value} but it registered no "
                                  f"{self.kind}; decorate the class or point the entry point at it "
                                  f"('{ep.value}:ClassName').", stacklevel=2)
            elif ep.name not in self._items:
                problem = self.check(obj) if self.check is not None else None
                if problem:
                    warnings.warn(f"The {self.kind} plug-in {ep.name!r} ({ep.value}) is not registered: {problem}",
                                  stacklevel=2)
                    continue
                self._items[ep.name] = obj
                try:
                    setattr(obj, "registry_name", ep.name)
                except (AttributeError, TypeError):
                    pass

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the fnmatch ``pattern``."""
        self._load_plugins()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> T:
        """The class registered under ``name``; an unknown name lists the valid ones."""
        self._load_plugins()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise choice_error(self.kind, name, self._items) from None

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._items

    def unregister(self, name: str) -> None:
        """Remove ``name`` (mainly for tests)."""
        self._items.pop(name, None)


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def accepted_options(factory: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[str] | None:
    """Keyword names ``factory`` accepts (None when it takes ``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in skip and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def check_options(kind: str, name: str, factory: Callable[..., Any], options: Mapping[str, Any],
                  skip: tuple[str, ...] = ()) -> None:
    """Raise ConfigError if ``options`` has keys ``factory`` does not take, listing the valid ones."""
    valid = accepted_options(factory, skip=skip)
    if valid is None:
        return
    bad = [k for k in options if k not in valid]
    if bad:
        raise ConfigError(
            f"The {kind} {name!r} does not take option(s) {', '.join(map(repr, bad))}; "
            f"valid options: {', '.join(valid) or '(none)'}."
        )
