"""`allocate`: turn per-site scores and a parameter limit into per-site ranks (a knapsack).

Each site's utility is ``score * log2(1 + rank)``: concave, so a second rank on one site is
worth less than a first rank on another of equal score. Costs are the backend's exact
``param_count``. Three passes, each keeping the total at or below the limit:

1. greedy: a heap of next steps on a coarsening rank grid (`rank_grid`), best marginal
   utility per marginal parameter first;
2. fill: single-rank increments while any fits;
3. repair, only if the plan still uses under 95% of the limit: a dynamic programme over
   exact costs that returns the best-utility plan using at least 95% when one exists.

    >>> from collections import OrderedDict
    >>> import torch.nn as nn, peftplan as pp
    >>> graph = pp.lower(nn.Sequential(OrderedDict(q=nn.Linear(10, 10), k=nn.Linear(10, 10))))
    >>> allocate(graph, {"q": 3.0, "k": 1.0}, 80)  # two 10x10 sites: 20 params per rank
    {'q': 3, 'k': 1}
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from functools import reduce

import numpy as np

from ...backends.base import get_method
from ...ir.site import Site, SiteGraph
from ..budget import BudgetError

MIN_USE = 0.95  # the share of the limit a plan should use when some plan can
DP_CELLS = 4_000_000  # sites x cost cells the repair pass may hold; coarser cost units beyond


def rank_grid(max_rank: int) -> list[int]:
    """Ranks the greedy pass steps through: 1..8 by 1, 8..16 by 2, 16..32 by 4, …, then max_rank.

    >>> rank_grid(40)
    [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40]
    """
    grid, r = [], 1
    while r < max_rank:
        grid.append(r)
        r += max(1, (1 << (r.bit_length() - 1)) // 4)  # a quarter of the power of two below r
    return [*grid, max_rank]


def eligible_sites(graph: SiteGraph, method: str, roles: Iterable[str], exclude: Iterable[str] = ()) -> list[Site]:
    """Sites whose role matches ``roles`` (``"attn"`` matches every ``attn.*``) and whose op
    ``method`` can tune, minus ``exclude``, in graph order."""
    ops = get_method(method).ops
    skip = set(exclude)
    return [s for s in graph.select(role=list(roles)) if s.op in ops and s.name not in skip]


def allocate(
    graph: SiteGraph,
    scores: Mapping[str, float],
    limit: int,
    *,
    method: str = "lora",
    roles: Iterable[str] = ("attn", "mlp"),
    max_rank: int = 64,
) -> dict[str, int]:
    """Ranks for the eligible sites that have a score, costing at most ``limit`` parameters.

    A site's rank is capped at ``min(max_rank, in_features, out_features)``. Sites left at rank 0
    are omitted. Ties go to the site earlier in the graph, so the result depends only on the
    inputs (nothing here is random).
    Raises `BudgetError` naming the minimum when not even rank 1 on the cheapest site fits.

    >>> from collections import OrderedDict
    >>> import torch.nn as nn, peftplan as pp
    >>> graph = pp.lower(nn.Sequential(OrderedDict(q=nn.Linear(10, 10), k=nn.Linear(10, 10))))
    >>> allocate(graph, {"q": 3.0, "k": 1.0}, 80, max_rank=2)  # q alone would take rank 3
    {'q': 2, 'k': 2}
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    roles = tuple(roles)
    sites = [s for s in eligible_sites(graph, method, roles) if s.name in scores]
    if not sites:
        raise ValueError(
            f"no site to allocate: none of the {len(graph)} sites has a role in {list(roles)}, an op "
            f"that {method!r} tunes ({sorted(get_method(method).ops)}) and a score"
        )
    for s in sites:
        v = scores[s.name]
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"score of site {s.name!r} is {v}; scores must be finite and non-negative")

    m = get_method(method)
    caps = [max(1, min(max_rank, s.in_features, s.out_features)) for s in sites]
    costs = [[0] + [m.param_count(s, rank=r) for r in range(1, cap + 1)] for s, cap in zip(sites, caps, strict=True)]
    weights = [float(scores[s.name]) for s in sites]

    cheapest = min(range(len(sites)), key=lambda i: (costs[i][1], i))
    if limit < costs[cheapest][1]:
        need = costs[cheapest][1]
        raise BudgetError(
            f"budget {limit:,} params is below the cheapest plan ({need:,} params: rank 1 on "
            f"{sites[cheapest].name}); raise it to at least {need:,}",
            minimum=need,
        )

    ranks = _greedy(weights, costs, caps, limit, rank_grid(max_rank))
    used = _fill(weights, costs, caps, limit, ranks)
    if used < MIN_USE * limit and any(r < c for r, c in zip(ranks, caps, strict=True)):
        better = _repair(weights, costs, limit)
        if better is not None:
            ranks = better
    return {s.name: r for s, r in zip(sites, ranks, strict=True) if r > 0}


def _utility(weight: float, rank: int) -> float:
    return weight * math.log2(1 + rank)


def _greedy(weights, costs, caps, limit, grid) -> list[int]:
    ranks = [0] * len(weights)
    used = 0
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        nxt = next((r for r in grid if r > ranks[i]), None)
        nxt = min(nxt, caps[i]) if nxt is not None else None
        if nxt is None or nxt <= ranks[i]:
            return
        gain = _utility(weights[i], nxt) - _utility(weights[i], ranks[i])
        heapq.heappush(heap, (-gain / (costs[i][nxt] - costs[i][ranks[i]]), i, nxt))

    for i in range(len(weights)):
        push(i)
    while heap:
        _, i, nxt = heapq.heappop(heap)
        extra = costs[i][nxt] - costs[i][ranks[i]]
        if used + extra <= limit:
            used += extra
            ranks[i] = nxt
            push(i)
    return ranks


def _fill(weights, costs, caps, limit, ranks) -> int:
    """Add single ranks, best marginal utility per parameter first, while any fits; in place."""
    used = sum(c[r] for c, r in zip(costs, ranks, strict=True))
    while True:
        best, pick = -1.0, None
        for i, r in enumerate(ranks):
            if r < caps[i] and used + costs[i][r + 1] - costs[i][r] <= limit:
                ratio = (_utility(weights[i], r + 1) - _utility(weights[i], r)) / (costs[i][r + 1] - costs[i][r])
                if ratio > best:
                    best, pick = ratio, i
        if pick is None:
            return used
        used += costs[pick][ranks[pick] + 1] - costs[pick][ranks[pick]]
        ranks[pick] += 1


def _repair(weights, costs, limit) -> list[int] | None:
    """Best-utility ranks among plans using ≥ MIN_USE of ``limit`` (None when no plan does).

    Costs are counted in units of their greatest common divisor, or in coarser units
    (rounded up, so the limit still holds) when that table would be too large."""
    unit = reduce(math.gcd, (c for cs in costs for c in cs[1:]))
    unit = max(unit, math.ceil(limit * len(costs) / DP_CELLS))
    cells = limit // unit
    floor_cells = math.ceil(MIN_USE * limit / unit)
    best = np.full(cells + 1, -np.inf)
    best[0] = 0.0
    choices = []
    for w, cs in zip(weights, costs, strict=True):
        new = best.copy()
        choice = np.zeros(cells + 1, dtype=np.int32)
        for r in range(1, len(cs)):
            k = math.ceil(cs[r] / unit)
            if k > cells:
                break
            cand = best[: cells + 1 - k] + _utility(w, r)
            better = cand > new[k:]
            new[k:][better] = cand[better]
            choice[k:][better] = r
        best = new
        choices.append((choice, [math.ceil(c / unit) for c in cs]))
    reachable = np.flatnonzero(np.isfinite(best))
    ok = reachable[reachable >= floor_cells]
    if ok.size == 0:
        return None
    at = int(ok[np.argmax(best[ok])])
    ranks = []
    for choice, ks in reversed(choices):
        r = int(choice[at])
        ranks.append(r)
        at -= ks[r]
    ranks.reverse()
    used = sum(cs[r] for cs, r in zip(costs, ranks, strict=True))
    return ranks if MIN_USE * limit <= used <= limit else None
