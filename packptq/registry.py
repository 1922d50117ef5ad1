"""A tiny name -> object registry used for model families, datasets, packing policies,
bit allocators and loggers. Unknown names fail with the list of known ones."""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, Optional, TypeVar

from packptq.config import ConfigError

T = TypeVar("T")


class UnknownName(ConfigError, KeyError):
    """An unknown registry name: a ConfigError (one line for the user) that is also a KeyError."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, make: Optional[Callable[[Any], T]] = None) -> Callable[[Any], Any]:
        """A decorator that registers the definition below it as ``name``: the object itself,
        or ``make(obj)`` (e.g. an instance of a decorated class, an entry wrapping a decorated
        function); the definition is returned unchanged."""
        def deco(obj):
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj if make is None else make(obj)
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownName(f"unknown {self.kind} '{name}'; known: {known}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return sorted(self._items.items())
