"""One registry shape for every pluggable family (codecs, aggregators, datasets, transports, strategies).

Shaped like ``model_zoo``'s (and timm's ``_registry``): ``@REGISTRY.register("name")`` on a function or
class, ``REGISTRY.get(name)`` / ``REGISTRY.create(name, ...)`` to use it, ``REGISTRY.names()`` to list.
Adding a family member is one file plus one decorator; unknown names raise :class:`RegistryError`
naming the family and what is known.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown (or twice-registered) name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.family} {name!r} is already registered")
            self._entries[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RegistryError(f"unknown {self.family} {name!r}; known: {', '.join(self.names())}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
