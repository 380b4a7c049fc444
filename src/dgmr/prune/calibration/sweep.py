"""Calibration in one sweep: the vision tower's blocks, one at a time, on stored hidden states.

A family names the tower's sequential blocks (:meth:`~dgmr.models.families.Family.sequential_blocks`).
The first pass over the calibration images, which also refuses what calibration cannot
handle, watches them with a :class:`Probe`: it catches the first block's input on every
batch, and every block's other arguments (rope, masks, position embeddings), and checks that
the forward really chains them (each block once, in order, on the hidden state the one before
returned, its input left unchanged). :class:`Walker` then runs one block at a time over the
stored hidden states (on the device, in the dtype the forward produced them, batch by batch):
every pass a site asks for stops inside the current block, and once the block's sites are cut
and refitted, the block runs once more to turn the states into the next block's inputs. Each
block thus runs about twice, and the calibrated prune costs a few forward passes whatever the
depth (docs/calibration.md, "Cost").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.errors import DgmrError
from .runner import Hook, Pass, Stop, set_hooks, stop


def hidden_of(out: Any) -> Any:
    """The hidden state a block returns: itself, or a tuple's first element (older HF layers)."""
    return out[0] if isinstance(out, (tuple, list)) and out else out


@dataclass
class Chain:
    """The blocks in forward order, what runs in each, and the first block's inputs."""

    names: list[str]
    blocks: list[nn.Module]
    states: list[torch.Tensor]  # per batch: the hidden state entering the block the walk is at
    extras: list[list[tuple[tuple, dict]]]  # [block][batch]: the arguments after the hidden state
    members: list[list[int]]  # [block]: the watched modules it runs, in forward order
    tail: list[int]  # watched modules that run after the last block, in forward order

    @property
    def last(self) -> int:
        """The last block that runs a watched module (-1: none does); the walk stops there."""
        return max((j for j, m in enumerate(self.members) if m), default=-1)


@dataclass
class _Batch:
    """What the probe saw on one batch (only the first block's input is held, not every block's)."""

    entered: list[int] = field(default_factory=list)  # blocks in call order
    first: torch.Tensor | None = None  # the first block's hidden state
    extras: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)  # block -> its input's version on entry
    last: tuple[int, Any, int] | None = None  # (block, hidden state it returned, that tensor's version)
    active: list[int] = field(default_factory=list)
    watched: list[tuple[int, int | None, int]] = field(default_factory=list)  # (module, its block, blocks entered)
    problem: str | None = None

    def fail(self, why: str) -> None:
        self.problem = self.problem or why


class Probe:
    """Watches the first pass (:meth:`Runner.forward_order`): catches the sweep's inputs and
    checks that the forward chains the blocks. ``broken`` says why it does not (the sweep then
    falls back to full passes); nothing it sees makes the first pass fail."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], watched: list[tuple[str, nn.Module]]) -> None:
        self.names = [n for n, _ in blocks]
        self.modules = [m for _, m in blocks]
        self.watched = watched
        self.broken: str | None = None
        self.order: list[int] | None = None
        self.where: list[tuple[int | None, int]] | None = None  # per watched module: (its block, call position)
        self.states: list[torch.Tensor] = []
        self.extras: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
        self.batch = _Batch()

    def install(self) -> list[Any]:
        handles = []
        for j, m in enumerate(self.modules):
            handles.append(m.register_forward_pre_hook(self._enter(j), with_kwargs=True))
            handles.append(m.register_forward_hook(self._exit(j), with_kwargs=True))
        handles += [m.register_forward_pre_hook(self._seen(i)) for i, (_, m) in enumerate(self.watched)]
        return handles

    def _enter(self, j: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            b, name = self.batch, self.names[j]
            if b.active:
                b.fail(f"{name} runs inside {self.names[b.active[-1]]}")
            if j in b.extras:
                b.fail(f"{name} runs more than once per forward")
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                b.fail(f"{name} does not take its hidden state as its first positional argument")
            elif b.last is None:
                b.first = x
            elif x is not b.last[1] or x._version != b.last[2]:
                b.fail(f"{name} does not run on what {self.names[b.last[0]]} returned (the forward computes "
                       "something between them)")
            b.active.append(j)
            b.entered.append(j)
            b.extras[j] = (args[1:], kwargs)
            b.versions[j] = x._version if isinstance(x, torch.Tensor) else 0
        return hook

    def _exit(self, j: int):
        def hook(_m: nn.Module, args: tuple, _kwargs: dict, out: Any) -> None:
            b = self.batch
            b.active.pop()
            h = hidden_of(out)
            x = args[0] if args else None
            if not isinstance(h, torch.Tensor):
                b.fail(f"{self.names[j]} returns a {type(out).__name__}, not a hidden state")
            elif isinstance(x, torch.Tensor) and x._version != b.versions[j]:
                b.fail(f"{self.names[j]} changes its input in place")
            b.last = (j, h, h._version if isinstance(h, torch.Tensor) else 0)
        return hook

    def _seen(self, i: int):
        def hook(_m: nn.Module, _args: tuple) -> None:
            b = self.batch
            b.watched.append((i, b.active[-1] if b.active else None, len(b.entered)))
        return hook

    def after_batch(self) -> None:
        b, self.batch = self.batch, _Batch()
        if self.broken is None:
            self.broken = b.problem or self._check(b)
        if self.broken is not None:
            self.states, self.extras = [], [[] for _ in self.modules]  # nothing kept for a sweep that will not run
            return
        assert b.first is not None
        self.states.append(b.first)
        for j, extra in b.extras.items():
            self.extras[j].append(extra)

    def _check(self, b: _Batch) -> str | None:
        """Why the forward does not chain the blocks on this batch (None: it does)."""
        missing = [self.names[j] for j in range(len(self.modules)) if j not in b.extras]
        if missing:
            return f"{missing[0]} does not run in the model's forward"
        if b.first is None or b.first._version != b.versions[b.entered[0]]:
            return f"the forward changes the input of {self.names[b.entered[0]]} in place after that block ran"
        if self.order is None:
            self.order = list(b.entered)
        elif b.entered != self.order:
            return "the blocks run in a different order from one batch to the next"
        where: list[tuple[int | None, int]] = [(None, -1)] * len(self.watched)
        for pos, (i, blk, entered) in enumerate(b.watched):
            if blk is None and entered < len(self.modules):
                return (f"{self.watched[i][0]} runs {'before' if entered == 0 else 'between'} the blocks, "
                        "outside them")
            where[i] = (blk, pos)
        if self.where is None:
            self.where = where
        return None

    def chain(self) -> Chain:
        """The blocks in forward order with the inputs caught (only when not ``broken``)."""
        assert self.broken is None and self.order is not None and self.where is not None
        pos = {j: p for p, j in enumerate(self.order)}
        members: list[list[int]] = [[] for _ in self.order]
        tail: list[int] = []
        for i in sorted(range(len(self.where)), key=lambda i: self.where[i][1]):  # in call order
            blk = self.where[i][0]
            (tail if blk is None else members[pos[blk]]).append(i)
        return Chain([self.names[j] for j in self.order], [self.modules[j] for j in self.order], self.states,
                     [self.extras[j] for j in self.order], members, tail)


def _versions(out: Any) -> tuple[int, ...]:
    """The version counters of the tensors in a module's output (a tensor or a tuple of them)."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(t._version if isinstance(t, torch.Tensor) else -1 for t in items)


def _holds_matrix(m: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in m.parameters())


class Walker:
    """Runs one block at a time over the stored hidden states (:class:`Chain`).

    The first pass a block's first step asks for also keeps the outputs of the block's
    children that hold weight matrices (attention, say) and finish before that step's module
    starts: nothing they read has changed since, so the block's later passes, the advance
    included, take those outputs back instead of computing them again (at the cost of
    holding them: about one more copy of the states)."""

    def __init__(self, chain: Chain, autocast: Any) -> None:
        self.chain, self.autocast = chain, autocast
        self.block = -1  # the block whose children's outputs ``kept`` holds
        self.kept: dict[nn.Module, list[Any]] = {}
        self.batch = 0

    def _call(self, j: int, b: int) -> Any:
        self.batch = b
        args, kwargs = self.chain.extras[j][b]
        return self.chain.blocks[j](self.chain.states[b], *args, **kwargs)

    def _keep_hooks(self, j: int, boundary: nn.Module) -> tuple[list[Hook], dict[nn.Module, list[Any]], dict]:
        """Hooks for the first pass in block ``j``: keep what its weight-holding children
        return before ``boundary`` starts (``marks`` tells the batches apart)."""
        inside = {id(m) for m in boundary.modules()}
        children = [c for c in self.chain.blocks[j].children()
                    if _holds_matrix(c) and id(c) not in inside and all(m is not boundary for m in c.modules())]
        outs: dict[nn.Module, list[Any]] = {c: [] for c in children}
        marks = {"reached": False, "calls": {c: 0 for c in children}}

        def reached(*_: Any) -> None:
            marks["reached"] = True

        def keep(c: nn.Module):
            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                marks["calls"][c] += 1
                if not marks["reached"]:
                    outs[c].append((out, _versions(out)))
            return hook

        return [(boundary, "pre", reached)] + [(c, "post", keep(c)) for c in children], outs, marks

    def _replaying(self, j: int) -> list[tuple[nn.Module, Any]]:
        """Make block ``j``'s kept children return their kept outputs (once per batch; any
        further call in the same batch computes); returns what to restore."""
        if self.block != j:
            return []
        patched = []
        for c, outs in self.kept.items():
            real = c.forward
            done = {"batch": -1}

            def replay(*args: Any, outs=outs, real=real, done=done, **kwargs: Any) -> Any:
                out, versions = outs[self.batch]
                # changed in place after it was kept (an in-place layer scale, say): compute it again
                if done["batch"] != self.batch and _versions(out) == versions:
                    done["batch"] = self.batch
                    return out
                return real(*args, **kwargs)

            patched.append((c, c.__dict__.get("forward")))
            c.forward = replay
        return patched

    @staticmethod
    def _restore(patched: list[tuple[nn.Module, Any]]) -> None:
        for c, own in patched:
            if own is None:
                del c.forward
            else:
                c.forward = own

    def run(self, j: int, stop_at: nn.Module, hooks: list[Hook], what: str) -> None:
        """A :class:`~dgmr.prune.calibration.runner.Pass` inside block ``j``: every batch
        through it until ``stop_at`` has run; the states stay as they are."""
        first = self.block != j
        keep_hooks, outs, marks = self._keep_hooks(j, stop_at) if first else ([], {}, {})
        handles = set_hooks(hooks + keep_hooks)
        handles.append(stop_at.register_forward_hook(stop))
        patched = self._replaying(j)
        try:
            with torch.no_grad(), self.autocast():
                for b in range(len(self.chain.states)):
                    if first:
                        marks["reached"] = False
                    try:
                        self._call(j, b)
                    except Stop:
                        continue
                    raise DgmrError(f"{what} does not run in {self.chain.names[j]}: cannot calibrate it; "
                                    "prune without calibration")
        finally:
            self._restore(patched)
            for h in handles:
                h.remove()
        if first:
            n = len(self.chain.states)
            self.block = j
            self.kept = {c: o for c, o in outs.items() if len(o) == n and marks["calls"][c] == n}

    def advance(self, j: int, hooks: list[Hook] = ()) -> None:
        """Every batch through all of block ``j`` (with ``hooks``): its outputs become the states."""
        handles = set_hooks(list(hooks))
        patched = self._replaying(j)
        try:
            with torch.no_grad(), self.autocast():
                for b in range(len(self.chain.states)):
                    self.chain.states[b] = hidden_of(self._call(j, b))
        finally:
            self._restore(patched)
            for h in handles:
                h.remove()
        self.block, self.kept = -1, {}


class Step(Protocol):
    """One site's calibrated cut, as :func:`walk` runs it. ``module`` runs once per forward;
    the passes the step asks for stop right after it, and the step changes nothing that runs
    before it starts. ``cut(run)`` scores, cuts and refits the site with passes ``run``
    (:class:`~dgmr.prune.calibration.runner.Pass`) over the model as it now is, everything
    before it already cut and refitted, and returns what to record. MLP sites are one kind
    of step (:class:`~dgmr.prune.calibration.cut.MlpStep`); a site kind with its own
    statistics, cut and refit is another, and the walk runs the steps of a block in the
    order the forward reaches them."""

    name: str
    module: nn.Module

    def cut(self, run: Pass) -> Any: ...


@dataclass
class SiteStep:
    """What every site kind's step holds: its site, the width it keeps (``k``: neurons or
    heads, set again by global allocation), the criterion, its seed and the settings."""

    site: Any
    k: int
    criterion: str
    seed: int
    settings: Any

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def module(self) -> nn.Module:
        return self.site.module


def walk(steps: list[Step], chain: Chain | None, walker: Walker | None, full: Pass, order: list[int],
         progress: bool, desc: str) -> list[Any]:
    """Run every step, in forward order; their results, in ``steps``' order.

    With a ``chain`` (whose watched modules are the steps' modules): block by block, each of
    its steps in forward order with passes inside the block, then the block once more to make
    the next block's inputs; steps after the last block run with full passes. Without one:
    every step with full passes ``full`` (``order``: the steps in forward order)."""
    results: list[Any] = [None] * len(steps)
    if chain is None or walker is None:
        for i in tqdm(order, desc=desc, unit="layer", disable=not progress, leave=False):
            results[i] = steps[i].cut(full)
        return results
    for j in tqdm(range(chain.last + 1), desc=desc, unit="block", disable=not progress, leave=False):
        run = functools.partial(walker.run, j)
        for i in chain.members[j]:
            results[i] = steps[i].cut(run)
        if j < chain.last:  # the last block's outputs feed no step (the tail's steps run full passes)
            walker.advance(j)
    chain.states.clear()  # free the hidden states (and what the last block kept) before the tail's passes
    walker.block, walker.kept = -1, {}
    for i in chain.tail:
        results[i] = steps[i].cut(full)
    return results
