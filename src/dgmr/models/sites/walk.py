"""Finding the sites of one kind in a model: every module, in module-registration order,
tried against the registered kinds of that site (a user's before the built-ins), the generic
fallback only when no registered kind matched anything. The MLP and attention finders
(:func:`~dgmr.models.sites.mlp.find_mlps`, :func:`~dgmr.models.sites.attention.find_attention`)
both call :func:`find_sites`."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator

from torch import nn

# a site kind: (path, module) -> its site, or None when the module is not one
Kind = Callable[[str, nn.Module], Any]


def walk(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module | None, str]]:
    """(path, module, parent, attribute) of every module under ``root``, each before its
    children, children in their order (an explicit stack: no recursion limit on deep models)."""
    stack: list[tuple[str, nn.Module, nn.Module | None, str]] = [(prefix, root, None, "")]
    while stack:
        path, m, parent, attr = stack.pop()
        yield path, m, parent, attr
        stack.extend(reversed([(f"{path}.{n}" if path else n, c, m, n) for n, c in m.named_children()]))


def _collect(root: nn.Module, kinds: list[Kind], exclude: re.Pattern | None,
             prefix: str) -> list[tuple[Any, nn.Module | None, str]]:
    """(site, parent, attribute) of each module one of ``kinds`` takes (the first that does);
    nothing is looked for below a site, nor below a module whose path matches ``exclude``."""
    found: list[tuple[Any, nn.Module | None, str]] = []
    skip: list[str] = []
    for path, m, parent, attr in walk(root, prefix):
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if exclude is not None and path and exclude.search(path):
            skip.append(path)
            continue
        site = next((s for s in (kind(path, m) for kind in kinds) if s is not None), None)
        if site is not None:
            found.append((site, parent, attr))
            skip.append(path)
    return found


def find_sites(root: nn.Module, registered: list[Kind], fallback: Kind, exclude: re.Pattern | None = None,
               prefix: str = "") -> list[tuple[Any, nn.Module | None, str]]:
    """(site, parent, attribute) of every site under ``root`` (paths relative to the model when
    ``prefix`` is ``root``'s path): found by the ``registered`` kinds, or, when none of them
    matches anything, by the generic ``fallback``."""
    return _collect(root, registered, exclude, prefix) or _collect(root, [fallback], exclude, prefix)
