"""Name -> class registries for step methods and root finders, with strict option checking."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def option_names(cls: type) -> list[str]:
    """Keyword options accepted by ``cls.__init__`` (its whole MRO of explicit keyword arguments)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        for param in params:
            keyword = param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
            if keyword and param.name != "self" and param.name not in names:
                names.append(param.name)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


class Registry(Generic[T]):
    """A public, extensible mapping from names to classes.

    ``kind`` names what is registered (used in error messages only).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T] | None = None) -> Any:
        """Register ``cls`` under ``name``; usable as ``register(name, cls)`` or ``@register(name)``."""

        def add(klass: type[T]) -> type[T]:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
            if name in self._entries and self._entries[name] is not klass:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered to {self._entries[name].__name__}"
                )
            self._entries[name] = klass
            klass.name = name  # type: ignore[attr-defined]
            return klass

        return add if cls is None else add(cls)

    def available(self) -> list[str]:
        """Sorted list of registered names."""
        return sorted(self._entries)

    def lookup(self, name: str) -> type[T]:
        """The class registered under ``name``; ``ValueError`` listing valid names otherwise."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        choices = self.available()
        hint = suggest(name, choices) if isinstance(name, str) else ""
        raise ValueError(f"Unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(choices)}")

    def get(self, name: str, **options: Any) -> T:
        """Instantiate ``name`` with validated ``options`` (unknown options are a ``ValueError``)."""
        cls = self.lookup(name)
        valid = option_names(cls)
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"Unknown option {key!r} for {self.kind} {name!r}.{suggest(key, valid)} "
                    f"Valid options: {', '.join(valid) if valid else '(none)'}"
                )
        return cls(**options)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def items(self) -> list[tuple[str, type[T]]]:
        return sorted(self._entries.items())
