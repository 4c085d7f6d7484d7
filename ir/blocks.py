"""Blocks pass: find repeated blocks, and trace deep stacks at the cost of a few blocks.

A *stack* is a container whose children are named ``0 … N-1`` with at least two of the same
class (``model.layers``, ``encoder.layer``, ``transformer.h``). Children with the same
structure (class, parameter names and shapes) are interchangeable for lowering, so capture
runs on a shortened stack — the first and last child, and the first two children of each
structure and of each neighbour pair of structures — and `expand` rebuilds the full depth.
Lowering then costs O(distinct block types), not O(depth).

    >>> import torch.nn as nn
    >>> m = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(10)])
    >>> [(s.path, s.size, s.kept) for s in find_stacks(m)]
    [('', 10, [0, 1, 9])]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import networkx as nx
import torch.nn as nn

from .modules import module_op


@dataclass
class Stack:
    path: str  # container path, "" for the root
    container: nn.Module
    size: int
    sigs: list[str]  # structure signature per child
    type_names: list[str]
    kept: list[int]  # children captured

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}" if self.path else str(i)

    def child_of(self, name: str) -> int | None:
        """Index of the child that site ``name`` lives in, or None."""
        head = f"{self.path}." if self.path else ""
        if not name.startswith(head):
            return None
        first = name[len(head) :].split(".", 1)[0]
        return int(first) if first.isdigit() and int(first) < self.size else None

    def rename(self, name: str, src: int, dst: int) -> str:
        return self.prefix(dst) + name[len(self.prefix(src)) :]

    def rep(self, i: int) -> int:
        """The captured child that stands in for child ``i``."""
        if i in self.kept:
            return i
        same = [j for j in self.kept if self.sigs[j] == self.sigs[i]]
        inner = [j for j in same if 0 < j < self.size - 1]
        return (inner or same)[0]


def _signature(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, mod in module.named_modules():
        h.update(f"{name}:{type(mod).__name__};".encode())
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


def _is_stack(module: nn.Module) -> bool:
    names = list(module._modules)
    if len(names) < 2 or not all(n.isdigit() for n in names):
        return False
    children = [m for m in module._modules.values() if m is not None]
    classes = [type(c) for c in children]
    repeated = any(classes.count(c) > 1 for c in set(classes))
    has_sites = any(module_op(c) is None and any(module_op(m) for m in c.modules()) for c in children)
    return repeated and has_sites


def _kept(sigs: list[str]) -> list[int]:
    n = len(sigs)
    if n <= 3:
        return list(range(n))
    keep = {0, 1, n - 1}
    seen: dict[str, int] = {}
    pairs: set[tuple[str, str]] = set()
    for i, s in enumerate(sigs):
        if seen.get(s, 0) < 2:
            keep.add(i)
        seen[s] = seen.get(s, 0) + 1
        if i and (sigs[i - 1], s) not in pairs:
            pairs.add((sigs[i - 1], s))
            keep.update((i - 1, i))
    return sorted(keep)


def find_stacks(model: nn.Module) -> list[Stack]:
    """The outermost repeated containers of ``model`` (stacks nested in a stack are part of it)."""
    stacks: list[Stack] = []
    for path, mod in model.named_modules():
        if any(s.path == "" or path.startswith(s.path + ".") for s in stacks):
            continue
        if _is_stack(mod):
            children = list(mod._modules.values())
            sigs = [_signature(c) for c in children]
            stacks.append(Stack(path, mod, len(children), sigs, [type(c).__name__ for c in children], _kept(sigs)))
    return stacks


@contextmanager
def shortened(stacks: list[Stack]) -> Iterator[None]:
    """Temporarily keep only each stack's captured children (their names unchanged)."""
    saved = []
    for s in stacks:
        if len(s.kept) < s.size:
            saved.append((s.container, s.container._modules))
            items = list(s.container._modules.items())
            s.container._modules = dict(items[i] for i in s.kept)
    try:
        yield
    finally:
        for container, modules in saved:
            container._modules = modules


def _locate(stacks: list[Stack], name: str) -> tuple[Stack, int] | None:
    for s in stacks:
        i = s.child_of(name)
        if i is not None:
            return s, i
    return None


def expand(order: list[str], graph: nx.DiGraph, stacks: list[Stack]) -> tuple[list[str], nx.DiGraph]:
    """Site order and dataflow of the full-depth model from those of the shortened one.

    Inside a child, sites and edges are copied from its stand-in; between neighbours
    ``i-1 -> i``, from a captured neighbour pair of the same structures; edges from outside
    the stack are copied from the stand-in. Edges between captured children that are not
    neighbours exist only because of the shortening and are dropped.
    """
    if all(len(s.kept) == s.size for s in stacks):
        return order, graph
    located = {n: _locate(stacks, n) for n in order}
    full_order = _full_order(order, located)
    g = nx.DiGraph()
    g.add_nodes_from(full_order)
    templates: dict[tuple[int, str, str], list[tuple[str, str]]] = {}
    for a, b in graph.edges:
        la, lb = located.get(a), located.get(b)
        if la and lb and la[0] is lb[0]:
            s, ia, ib = la[0], la[1], lb[1]
            if ia == ib:
                g.add_edges_from((s.rename(a, ia, i), s.rename(b, ib, i)) for i in range(s.size) if s.rep(i) == ia)
            elif ib == ia + 1:
                templates.setdefault((id(s), s.sigs[ia], s.sigs[ib]), []).append((a, b))
            continue
        g.add_edges_from((ca, cb) for ca in _copies(a, located) for cb in _copies(b, located))
    for s in stacks:  # between neighbours, from a captured pair of the same structures
        for i in range(1, s.size):
            for a, b in templates.get((id(s), s.sigs[i - 1], s.sigs[i]), []):
                ia = s.child_of(a)
                g.add_edge(s.rename(a, ia, i - 1), s.rename(b, ia + 1, i))
    return full_order, g


def _full_order(order: list[str], located: dict[str, tuple[Stack, int] | None]) -> list[str]:
    """``order`` with the sites of the children not captured inserted, each copied from its
    stand-in, before the next captured child."""
    by_child: dict[tuple[int, int], list[str]] = {}
    for n, loc in located.items():
        if loc is not None:
            by_child.setdefault((id(loc[0]), loc[1]), []).append(n)
    full_order: list[str] = []
    emitted: set[tuple[int, int]] = set()
    for n in order:
        loc = located[n]
        if loc is not None and (id(loc[0]), loc[1]) not in emitted:
            s, j = loc
            emitted.add((id(s), j))
            prev = max((k for k in s.kept if k < j), default=-1)
            for i in range(prev + 1, j):  # children between two captured ones
                r = s.rep(i)
                full_order.extend(s.rename(m, r, i) for m in by_child.get((id(s), r), []))
        full_order.append(n)
    return full_order


def _copies(name: str, located: dict[str, tuple[Stack, int] | None]) -> list[str]:
    """The sites that ``name`` stands in for: its copies in the children it represents (the
    first and last child stand for themselves alone)."""
    loc = located.get(name)
    if loc is None:
        return [name]
    s, j = loc
    if j in (0, s.size - 1):
        return [name]
    return [s.rename(name, j, i) for i in range(s.size) if s.rep(i) == j]
