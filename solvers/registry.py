"""The two public registries: step methods and root finders, by name."""

from __future__ import annotations

from typing import Any

from ._base import Method, RootFinder
from ._registry import Registry

METHODS: Registry[Method] = Registry("solver")
ROOT_FINDERS: Registry[RootFinder] = Registry("root finder")


def register(name: str, cls: type[Method] | None = None) -> Any:
    """Register a step method class under ``name`` (decorator or direct call)."""
    return METHODS.register(name, cls)


def get(name: str, **options: Any) -> Method:
    """A step method by name, e.g. ``get("implicit_euler", root="anderson", tol=1e-4)``."""
    return METHODS.get(name, **options)


def available() -> list[str]:
    """Names of all registered step methods."""
    return METHODS.available()


def register_root_finder(name: str, cls: type[RootFinder] | None = None) -> Any:
    """Register a root-finder class under ``name`` (decorator or direct call)."""
    return ROOT_FINDERS.register(name, cls)


def get_root_finder(name: str, **options: Any) -> RootFinder:
    """A root finder by name, e.g. ``get_root_finder("anderson", m=5, tol=1e-6)``."""
    return ROOT_FINDERS.get(name, **options)


def available_root_finders() -> list[str]:
    """Names of all registered root finders."""
    return ROOT_FINDERS.available()
