"""One registry type for every extension point (criteria, MLP kinds, model families).

Lookup order is the rule that makes extension work: entries a user registers are tried
before the built-ins (the latest registration first), so a user's MLP kind or family wins
over a permissive built-in. A name that is already taken is refused unless the caller
says ``replace=True``: registering ``l2`` by accident must not silently swap the
built-in. Generic fallbacks (the generic family, the generic Linear->act->Linear MLP)
are not entries: their owners try them after every registered entry.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

from .errors import DgmrError

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
    """A read-only mapping of name -> entry, iterated in lookup order."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._builtin: dict[str, T] = {}
        self._user: dict[str, T] = {}

    def add(self, name: str, entry: T, *, replace: bool = False, builtin: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise DgmrError(f"a {self.what} needs a non-empty name, got {name!r}")
        if name in self and not replace:
            raise DgmrError(f"a {self.what} named {name!r} is already registered (pass replace=True to replace it)")
        self._user.pop(name, None)
        self._builtin.pop(name, None)
        (self._builtin if builtin else self._user)[name] = entry
        return entry

    def decorator(self, name: str, *, replace: bool = False, builtin: bool = False) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            return self.add(name, entry, replace=replace, builtin=builtin)

        return deco

    def remove(self, name: str) -> T:
        """Unregister ``name`` (a user entry or a built-in); returns the entry."""
        if name in self._user:
            return self._user.pop(name)
        if name in self._builtin:
            return self._builtin.pop(name)
        raise self.unknown(name)

    def get_or_fail(self, name: str) -> T:
        if name not in self:
            raise self.unknown(name)
        return self[name]

    def unknown(self, name: str) -> DgmrError:
        return DgmrError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self)}")

    def __getitem__(self, name: str) -> T:
        if name in self._user:
            return self._user[name]
        return self._builtin[name]

    def __iter__(self) -> Iterator[str]:
        yield from reversed(list(self._user))
        yield from self._builtin

    def __len__(self) -> int:
        return len(self._user) + len(self._builtin)

    def __contains__(self, name: object) -> bool:
        return name in self._user or name in self._builtin

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self)})"
