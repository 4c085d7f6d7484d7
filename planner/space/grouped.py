"""`GroupedSpace`: a method and a rank per group of sites (role × depth, block, role, all)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from ...backends.base import DEFAULT_METHODS, RANK_UNIT, get_method
from ...ir.site import Site, SiteGraph
from ...plan import Plan
from ..budget import Budget, BudgetError
from ..proxy.allocate import allocate, rank_grid
from .base import Space


class GroupedSpace(Space):
    """A method and a rank per group of sites: ``group_by="role+depth"`` (role × ``buckets``
    depth buckets), ``"block"``, ``"role"`` or ``"global"``.

    Knobs ``method:<group>`` (when there is more than one method) and ``rank:<group>``, an index
    into ``levels = [0, *rank_grid(max_rank)]``: level 0 is "none", so a group is switched off
    by its rank, not by a separate switch. A rank sizes each method by its `Method.sized`
    (LoRA/DoRA rank, adapter bottleneck, sparse density with the params of LoRA at that rank);
    a method with a `Method.structure` gets a rank's worth per unit of it (``experts`` of them);
    methods of the ``"vector"`` band (ia3/ssf) are on at any rank above 0. Ranks are capped by each site's size. Over the budget, the costliest group steps down a level until the plan fits.
    Given ``scores``, `proxy_params` rounds the proxy allocation's mean rank per group down to a
    level (uniform scores otherwise): an approximation, as groups share one rank.

    >>> from peftplan import lower
    >>> space = GroupedSpace(lower(tiny_bert()), 5_000, methods=("lora", "ia3"), group_by="block")
    >>> sorted(space.distributions())
    ['method:block0', 'method:block1', 'rank:block0', 'rank:block1']
    >>> knobs = {**space.proxy_params(1.0), "method:block0": "lora", "rank:block0": 3}
    >>> plan = space.plan_from_params(knobs)
    >>> plan.sites["bert.encoder.layer.0.attention.self.query"]
    {'method': 'lora', 'rank': 3, 'alpha': 6, 'role': 'attn.q', 'depth': 0.0, 'op': 'linear', 'shape': [32, 32]}
    """

    name = "grouped"
    GROUPINGS = ("role+depth", "block", "role", "global")

    def __init__(
        self,
        graph: SiteGraph,
        budget: Budget | int | str,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        roles: Iterable[str] = ("attn", "mlp"),
        group_by: str = "role+depth",
        buckets: int = 3,
        max_rank: int = 64,
        experts: int = 2,
        scores: Mapping[str, float] | None = None,
        **kwargs: Any,
    ):
        super().__init__(graph, budget, **kwargs)
        if group_by not in self.GROUPINGS:
            raise ValueError(f"group_by must be one of {list(self.GROUPINGS)}, got {group_by!r}")
        self.methods, self.roles, self.max_rank, self.experts = tuple(methods), tuple(roles), max_rank, experts
        unsized = [
            m for m in self.methods if get_method(m).band is None
        ]  # unknown names fail here, listing the known ones
        if not self.methods or unsized:
            raise ValueError(
                f"GroupedSpace methods are PEFT methods a planner can size (Method.band; 'none' is rank 0), "
                f"got {list(self.methods)}"
            )
        skip = {s.name for s in self.full}
        ops = set().union(*(get_method(m).ops for m in self.methods))
        self.sites = [s for s in graph.select(role=list(self.roles), op=ops) if s.name not in skip]
        if not self.sites:
            raise ValueError(f"no site has a role in {list(self.roles)} and an op that {list(self.methods)} tune")
        self.groups: dict[str, list[Site]] = {}
        for s in self.sites:
            self.groups.setdefault(_group(s, group_by, buckets), []).append(s)
        self.levels = [0, *rank_grid(max_rank)]
        self.scores = dict(scores) if scores is not None else {s.name: 1.0 for s in self.sites}

    def distributions(self) -> dict[str, BaseDistribution]:
        d: dict[str, BaseDistribution] = {}
        for g in self.groups:
            if len(self.methods) > 1:
                d[f"method:{g}"] = CategoricalDistribution(self.methods)
            d[f"rank:{g}"] = IntDistribution(0, len(self.levels) - 1)
        return d | self._lr_knob()

    def proxy_params(self, fraction: float) -> dict[str, Any]:
        method = RANK_UNIT if RANK_UNIT in self.methods else self.methods[0]
        limit = math.floor(min(1.0, fraction) * self.available)
        scored = {s.name: self.scores.get(s.name, 0.0) for s in self.sites if s.op in get_method(RANK_UNIT).ops}
        try:
            ranks = allocate(self.graph, scored, limit, roles=self.roles, max_rank=self.max_rank) if scored else {}
        except BudgetError:
            ranks = {}
        params: dict[str, Any] = {}
        for g, sites in self.groups.items():
            mean = sum(ranks.get(s.name, 0) for s in sites) / len(sites)
            if len(self.methods) > 1:
                params[f"method:{g}"] = method
            params[f"rank:{g}"] = max(k for k, r in enumerate(self.levels) if r <= mean)
        return params | self._lr_seed()

    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        method = {g: params.get(f"method:{g}", self.methods[0]) for g in self.groups}
        level = {g: int(params[f"rank:{g}"]) for g in self.groups}

        def entries(g: str) -> dict[str, dict[str, Any]]:
            out = {s.name: self._entry(s, method[g], self.levels[level[g]]) for s in self.groups[g]}
            return {n: e for n, e in out.items() if e is not None}

        def params_of(g: str) -> int:
            return sum(
                get_method(e["method"]).param_count(self.graph[n], **Plan.hyper(e)) for n, e in entries(g).items()
            )

        cost = {g: params_of(g) for g in self.groups}
        while sum(cost.values()) > self.available:  # the costliest group steps down first
            g = max((g for g in self.groups if level[g] > 0), key=lambda g: cost[g])
            level[g] = 0 if get_method(method[g]).band == "vector" else level[g] - 1
            cost[g] = params_of(g)
        return {n: e for g in self.groups for n, e in entries(g).items()}

    def _entry(self, site: Site, method: str, rank: int) -> dict[str, Any] | None:
        if rank == 0 or site.op not in get_method(method).ops:
            return None
        m = get_method(method)
        r = min(rank, site.in_features, site.out_features)
        if m.structure is None:
            return {"method": method, **(m.sized(site, r) or {})}
        return {"method": method, **m.sized(site, r * self.experts, **{m.structure: self.experts})}


def _group(site: Site, group_by: str, buckets: int) -> str:
    if group_by == "block":
        return "other" if site.block is None else f"block{site.block}"
    if group_by == "role":
        return site.role
    if group_by == "global":
        return "all"
    return f"{site.role}@{min(buckets - 1, math.floor(site.depth * buckets))}"
