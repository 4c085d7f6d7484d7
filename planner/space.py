"""Search spaces: a few knobs a sampler can turn, and the `Plan` each setting of them means.

A `Space` maps a trial's choices to a plan deterministically, so a params dict alone (an
optuna ``FixedTrial``, a stored trial) reproduces its plan, and the plan's exact costs
(trainable params; training memory and merged latency overhead on request) are known before
anything trains. Trainable params never exceed the budget: the space builds plans within it.

    >>> space = AllocatorSpace(graph, scores, 5_000, methods=("lora", "ia3"))  # doctest: +SKIP
    >>> sorted(space.distributions())  # doctest: +SKIP
    ['budget', 'depth_tilt', 'max_rank', 'mlp_tilt', 'none_share', 'power', 'vector_share']
    >>> plan = space.plan_from_params(space.seeds(1)[0])  # the proxy plan at the full budget  # doctest: +SKIP
    >>> plan.objectives["params"] <= 5_000, space.objectives  # doctest: +SKIP
    (True, {'metric': 'max', 'params': 'min'})
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from peftplan.backends.base import get_method
from peftplan.backends.sparse import weight_numel
from peftplan.ir.site import Site, SiteGraph
from peftplan.planner.allocate import allocate, eligible_sites, rank_grid
from peftplan.planner.budget import Budget, BudgetError
from peftplan.planner.cost import plan_cost
from peftplan.planner.plan import Plan

SENSES = {"metric": "max", "params": "min", "memory": "min", "latency": "min", "adapter_bytes": "min"}
VECTOR = ("ia3", "ssf")  # one vector per site: their size has no knob


class Space:
    """One space: knobs (`distributions`) → per-site entries (`site_entries`, by subclasses).

    ``objectives`` maps each objective to its sense, "metric" first; "memory" is the plan's own
    training bytes (`plan_cost` ``train_bytes`` at ``tokens_scale``) and "latency" its FLOPs
    overhead after merging, as a fraction of the model's; "adapter_bytes" what the artifact
    stores. ``limits`` caps costs by name: every field of ``budget`` (params are enforced by
    construction, the others as constraints: plans over them are never trained), plus any
    given here. ``train_modules`` are fully trained and paid from the budget first.
    ``min_share``: the smallest budget share `seeds` starts from.
    """

    name = ""
    min_share = 0.05

    def __init__(self, graph: SiteGraph, budget: Budget | int | str, *, objectives: Iterable[str] = ("metric", "params"),
                 limits: Mapping[str, float] | None = None, train_modules: Iterable[str] = (), tokens_scale: float = 1.0):
        # lazy: search dispatches to the strategies, which import this module
        from peftplan.planner.search import as_budget

        self.graph, self.budget, self.tokens_scale = graph, as_budget(budget), tokens_scale
        limit = self.budget.param_limit(graph.total_params)
        if limit is None:
            raise BudgetError("the budget sets no parameter limit; give one, e.g. Budget(params='0.5%')")
        unknown = [k for k in objectives if k not in SENSES]
        if unknown or "metric" not in objectives:
            raise ValueError(f"objectives must include 'metric' and come from {list(SENSES)}, got {list(objectives)}")
        self.objectives = {"metric": "max", **{k: SENSES[k] for k in objectives if k != "metric"}}
        self.limits = {**self.budget.limits(graph.total_params), **(limits or {})}  # every Budget field
        if set(self.limits) - set(SENSES) or "metric" in self.limits:
            raise ValueError(f"limits are on costs {[k for k in SENSES if k != 'metric']}, got {sorted(self.limits)}")
        self.full = [graph[n] for n in train_modules]
        self.full_params = sum(get_method("full").param_count(s) for s in self.full)
        self.available = limit - self.full_params  # what the tuned sites may spend
        if self.available < 0:
            raise BudgetError(f"budget {limit:,} params is below the {self.full_params:,} params of train_modules "
                              f"{[s.name for s in self.full]}; raise it", minimum=self.full_params)
        self._cache: dict[tuple, tuple[dict, dict]] = {}

    @property
    def directions(self) -> list[str]:
        """``optuna.create_study(directions=space.directions)``: one per objective, in order."""
        return ["maximize" if s == "max" else "minimize" for s in self.objectives.values()]

    def values(self, plan: Plan, metric: float) -> list[float]:
        """A trial's objective values in ``objectives`` order: ``metric`` and the plan's costs."""
        return [metric, *(plan.objectives[k] for k in self.objectives if k != "metric")]

    def distributions(self) -> dict[str, BaseDistribution]:
        """The knobs, by name, in a fixed order."""
        raise NotImplementedError(f"{type(self).__name__} must define distributions")

    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-site ``{"method": …, hyper-parameters…}`` for tuned sites (train_modules aside)."""
        raise NotImplementedError(f"{type(self).__name__} must define site_entries")

    def proxy_params(self, fraction: float) -> dict[str, Any]:
        """Knobs reproducing (or, where the space cannot express it, approximating) the proxy
        allocation at ``fraction`` of the available budget."""
        raise NotImplementedError(f"{type(self).__name__} must define proxy_params")

    def suggest(self, trial: optuna.trial.BaseTrial) -> Plan:
        """Ask ``trial`` for every knob and return the plan they make. Each limit but params
        (met by construction) is recorded as ``trial.set_constraint(name, cost - limit)``,
        feasible at ≤ 0, which optuna's samplers and the front read back from the storage."""
        params = {name: _suggest(trial, name, d) for name, d in self.distributions().items()}
        costs = self.costs(params)
        for k, limit in self.limits.items():
            if k != "params":
                trial.set_constraint(k, costs[k] - limit)
        return self.plan_from_params(params)

    def plan_from_params(self, params: Mapping[str, Any]) -> Plan:
        """The plan for ``params`` (every knob of `distributions`), its costs in ``objectives``."""
        sites, costs = self._build(params)
        costs = {k: v for k, v in costs.items() if k in self.objectives}
        return Plan(sites={n: dict(e) for n, e in sites.items()},
                    model={"fingerprint": self.graph.fingerprint, "class": self.graph.model_class, "n_sites": len(self.graph)},
                    budget=self.budget.to_dict(), objectives=dict(costs),
                    provenance={"space": self.name, "knobs": dict(params)})  # fmt: skip

    def costs(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Exact costs of ``params``' plan without training: params, memory, latency and
        adapter bytes (whichever are objectives or not)."""
        return dict(self._build(params)[1])

    def seeds(self, n: int) -> list[dict[str, Any]]:
        """``n`` params dicts for ``study.enqueue_trial``: the proxy plans at budget shares
        evenly spaced in log scale from `min_share` up to the whole available budget (n = 4:
        0.05, 0.136, 0.368, 1). A front over trainable params spans orders of magnitude and its
        cheap end holds most of the hypervolume, so linear shares (¼ … 1) would leave it empty."""
        return [self.proxy_params(self.min_share ** ((n - 1 - i) / max(1, n - 1))) for i in range(n)]

    def _build(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        key = tuple(sorted(params.items()))
        if key not in self._cache:
            from peftplan.planner.search import _describe

            missing = sorted(set(self.distributions()) - set(params))
            if missing:
                raise ValueError(f"{type(self).__name__}: params lack knob(s) {missing}")
            tuned = self.site_entries(params)
            full = {s.name: {"method": "full"} for s in self.full}
            sites = {s.name: {**full.get(s.name, tuned.get(s.name, {})), **_describe(s)}
                     for s in self.graph if s.name in full or s.name in tuned}  # fmt: skip
            cost = plan_cost(self.graph, Plan(sites=sites), tokens_scale=self.tokens_scale)
            costs = {"params": cost.params, "memory": cost.train_bytes, "latency": cost.latency_fraction,
                     "adapter_bytes": cost.adapter_bytes}
            self._cache[key] = (sites, costs)
        return self._cache[key]


class AllocatorSpace(Space):
    """Knobs over sensitivity ``scores``, each plan made by `allocate` (AutoPEFT-sized: ≤ 12).

    Site scores become ``score**power * exp(depth_tilt * (depth - ½) ± mlp_tilt / 2)``. Sites
    ranked by that score are cut into bands, low to high: ``none_share`` untouched, then
    ``vector_share`` of the rest on ``vector_method`` (ia3/ssf), ``sparse_share`` of the rest on
    ``sparse`` at ``density``, and the rest on a rank method, whose top ``dora_share`` use
    ``dora`` and, deeper, ``moe_lora`` with ``1 + ⌊experts_slope * depth⌋`` experts. Fixed
    costs are paid first (the lowest-scoring fall back while they exceed the budget); the rank
    band shares the rest by `allocate` with ranks capped at ``max_rank``, ``budget`` being the
    share of the budget used. A site whose op the band's method cannot tune is left out.

    >>> space = AllocatorSpace(graph, scores, 5_000)  # doctest: +SKIP
    >>> space.plan_from_params(space.seeds(1)[0]).sites == search(..., strategy="proxy").sites  # doctest: +SKIP
    True
    """

    name = "allocator"

    def __init__(self, graph: SiteGraph, scores: Mapping[str, float], budget: Budget | int | str, *,
                 methods: Iterable[str] = ("lora",), roles: Iterable[str] = ("attn", "mlp"), max_rank: int = 64,
                 **kwargs: Any):  # fmt: skip
        super().__init__(graph, budget, **kwargs)
        self.methods, self.roles, self.max_rank = tuple(methods), tuple(roles), max_rank
        known = ("lora", "dora", *VECTOR, "sparse", "moe_lora")
        if "lora" not in self.methods or set(self.methods) - set(known):
            raise ValueError(f"AllocatorSpace methods must include 'lora' and come from {list(known)}, got {list(self.methods)}")
        skip = {s.name for s in self.full}
        self.sites = [s for s in eligible_sites(graph, "lora", self.roles, exclude=skip) if s.name in scores]
        if not self.sites:
            raise ValueError(f"no site has a score and a role in {list(self.roles)}; score the eligible sites first")
        self.scores = {s.name: float(scores[s.name]) for s in self.sites}
        families = {s.role.split(".")[0] == "mlp" for s in self.sites}
        d: dict[str, BaseDistribution] = {
            "budget": FloatDistribution(self.min_share, 1.0), "power": FloatDistribution(0.0, 2.0),
            "max_rank": IntDistribution(1, max_rank, log=True), "depth_tilt": FloatDistribution(-3.0, 3.0),
        }  # fmt: skip
        if len(families) == 2:
            d["mlp_tilt"] = FloatDistribution(-3.0, 3.0)
        d["none_share"] = FloatDistribution(0.0, 0.9)
        vector = [m for m in VECTOR if m in self.methods]
        if vector:
            d["vector_share"] = FloatDistribution(0.0, 1.0)
            if len(vector) > 1:
                d["vector_method"] = CategoricalDistribution(vector)
        if "sparse" in self.methods:
            d["sparse_share"], d["density"] = FloatDistribution(0.0, 1.0), FloatDistribution(1e-3, 0.1, log=True)
        if "dora" in self.methods:
            d["dora_share"] = FloatDistribution(0.0, 1.0)
        if "moe_lora" in self.methods:
            d["experts_slope"] = FloatDistribution(0.0, 4.0)
        self._distributions = d

    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def proxy_params(self, fraction: float) -> dict[str, Any]:
        fixed = {"power": 1.0, "max_rank": self.max_rank, "density": 0.01,
                 "vector_method": next((m for m in VECTOR if m in self.methods), None)}  # fmt: skip
        low = self._distributions["budget"].low
        return {k: max(low, min(1.0, fraction)) if k == "budget" else fixed.get(k, 0.0) for k in self._distributions}

    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        p = {"mlp_tilt": 0.0, "vector_share": 0.0, "sparse_share": 0.0, "dora_share": 0.0, "experts_slope": 0.0, **params}
        adjusted = {s.name: self.scores[s.name] ** p["power"]
                    * math.exp(p["depth_tilt"] * (s.depth - 0.5) + p["mlp_tilt"] * (0.5 if s.role.startswith("mlp") else -0.5))
                    for s in self.sites}  # fmt: skip
        order = sorted(range(len(self.sites)), key=lambda i: (adjusted[self.sites[i].name], -i))  # ascending
        cut = math.floor(p["none_share"] * len(order))
        rest = order[cut:]
        bands: dict[int, str] = {}
        for share, method in ((p["vector_share"], p.get("vector_method") or "ia3"), (p["sparse_share"], "sparse")):
            n = math.floor(share * len(rest))
            bands.update((i, method) for i in rest[:n])
            rest = rest[n:]
        n_dora = math.floor(p["dora_share"] * len(rest))
        for k, i in enumerate(rest):
            bands[i] = "dora" if k >= len(rest) - n_dora else "lora"
        experts = {i: 1 + math.floor(p["experts_slope"] * self.sites[i].depth) for i in rest}

        def method_at(i: int) -> str:  # moe_lora replaces lora where the slope gives ≥ 2 experts
            m = "moe_lora" if bands[i] == "lora" and experts[i] > 1 else bands[i]
            return m if self.sites[i].op in get_method(m).ops else ("lora" if m in ("dora", "moe_lora") else "none")

        kind = {i: method_at(i) for i in bands}
        hp = {"sparse": {"density": p.get("density", 0.01)}, "ia3": {}, "ssf": {}}
        extra = {i: _fixed_cost(self.sites[i], kind[i], hp.get(kind[i], {}), experts[i] if i in experts else 1) for i in bands}
        limit = math.floor(p["budget"] * self.available)
        fixed = sum(extra.values())
        for i in order:  # the lowest-scoring fixed costs give way first
            if fixed <= limit:
                break
            if extra.get(i):
                fixed -= extra[i]
                kind[i], extra[i] = ("none" if kind[i] in ("sparse", *VECTOR) else "lora"), 0
        ranked = {self.sites[i].name: adjusted[self.sites[i].name] for i in bands if kind[i] in ("lora", "dora", "moe_lora")}
        try:
            ranks = allocate(self.graph, ranked, limit - fixed, method="lora", roles=self.roles,
                             max_rank=p["max_rank"]) if ranked else {}  # fmt: skip
        except BudgetError:
            ranks = {}
        entries = {}
        for i in sorted(bands):
            name, m = self.sites[i].name, kind[i]
            if m in ("lora", "dora") and name in ranks:
                entries[name] = {"method": m, "rank": ranks[name], "alpha": 2 * ranks[name]}
            elif m == "moe_lora" and name in ranks:  # the allocated rank split among the experts
                e = min(experts[i], ranks[name])
                r = ranks[name] // e
                entries[name] = {"method": m, "experts": e, "rank": r, "alpha": 2 * r}
            elif m in hp:
                entries[name] = {"method": m, **hp[m]}
        return entries


def _fixed_cost(site: Site, method: str, hp: dict[str, Any], experts: int) -> int:
    """Params a band's method costs before any rank: the whole of ia3/ssf/sparse, DoRA's
    magnitude vector, MoE-LoRA's router."""
    if method in ("sparse", *VECTOR):
        return get_method(method).param_count(site, **hp)
    if method == "dora":
        return get_method("dora").param_count(site, rank=1) - get_method("lora").param_count(site, rank=1)
    if method == "moe_lora":
        return site.in_features * experts
    return 0


class GroupedSpace(Space):
    """A method and a rank per group of sites: ``group_by="role+depth"`` (role × ``buckets``
    depth buckets), ``"block"``, ``"role"`` or ``"global"``.

    Knobs ``method:<group>`` (when there is more than one method) and ``rank:<group>``, an index
    into ``levels = [0, *rank_grid(max_rank)]``: level 0 is "none", so a group is switched off
    by its rank, not by a separate switch. A rank sizes each method alike: LoRA/DoRA rank,
    MoE-LoRA rank per expert (``experts`` of them), adapter bottleneck, sparse density with the
    params of LoRA at that rank; ia3/ssf are on at any rank above 0. Ranks are capped by each
    site's size. Over the budget, the costliest group steps down a level until the plan fits.
    Given ``scores``, `proxy_params` rounds the proxy allocation's mean rank per group down to a
    level (uniform scores otherwise): an approximation, as groups share one rank.

    >>> space = GroupedSpace(graph, 5_000, methods=("lora", "ia3"), group_by="block")  # doctest: +SKIP
    >>> space.plan_from_params({"method:block0": "lora", "rank:block0": 3, ...}).sites  # doctest: +SKIP
    """

    name = "grouped"
    GROUPINGS = ("role+depth", "block", "role", "global")

    def __init__(self, graph: SiteGraph, budget: Budget | int | str, *, methods: Iterable[str] = ("lora",),
                 roles: Iterable[str] = ("attn", "mlp"), group_by: str = "role+depth", buckets: int = 3,
                 max_rank: int = 64, experts: int = 2, scores: Mapping[str, float] | None = None, **kwargs: Any):  # fmt: skip
        super().__init__(graph, budget, **kwargs)
        if group_by not in self.GROUPINGS:
            raise ValueError(f"group_by must be one of {list(self.GROUPINGS)}, got {group_by!r}")
        self.methods, self.roles, self.max_rank, self.experts = tuple(methods), tuple(roles), max_rank, experts
        for m in self.methods:
            get_method(m)  # unknown names fail here, listing the known ones
        if not self.methods or set(self.methods) & {"none", "full"}:
            raise ValueError(f"GroupedSpace methods are PEFT methods ('none' is rank 0), got {list(self.methods)}")
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
        return d

    def proxy_params(self, fraction: float) -> dict[str, Any]:
        method = "lora" if "lora" in self.methods else self.methods[0]
        limit = math.floor(min(1.0, fraction) * self.available)
        scored = {s.name: self.scores.get(s.name, 0.0) for s in self.sites if s.op in get_method("lora").ops}
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
        return params

    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        method = {g: params.get(f"method:{g}", self.methods[0]) for g in self.groups}
        level = {g: int(params[f"rank:{g}"]) for g in self.groups}

        def entries(g: str) -> dict[str, dict[str, Any]]:
            out = {s.name: self._entry(s, method[g], self.levels[level[g]]) for s in self.groups[g]}
            return {n: e for n, e in out.items() if e is not None}

        def params_of(g: str) -> int:
            return sum(get_method(e["method"]).param_count(self.graph[n], **Plan.hyper(e)) for n, e in entries(g).items())

        cost = {g: params_of(g) for g in self.groups}
        while sum(cost.values()) > self.available:  # the costliest group steps down first
            g = max((g for g in self.groups if level[g] > 0), key=lambda g: cost[g])
            level[g] = 0 if method[g] in VECTOR else level[g] - 1
            cost[g] = params_of(g)
        return {n: e for g in self.groups for n, e in entries(g).items()}

    def _entry(self, site: Site, method: str, rank: int) -> dict[str, Any] | None:
        if rank == 0 or site.op not in get_method(method).ops:
            return None
        r = min(rank, site.in_features, site.out_features)
        if method in ("lora", "dora"):
            return {"method": method, "rank": r, "alpha": 2 * r}
        if method == "moe_lora":
            return {"method": method, "experts": self.experts, "rank": r, "alpha": 2 * r}
        if method == "adapter":
            return {"method": method, "bottleneck": r}
        if method == "sparse":
            density = get_method("lora").param_count(site, rank=r) / weight_numel(site)
            return {"method": method, "density": min(1.0, density)}
        if method in VECTOR:
            return {"method": method}
        raise ValueError(f"GroupedSpace cannot size method {method!r}; it sizes {['lora', 'dora', 'moe_lora', 'adapter', 'sparse', *VECTOR]}")


def _group(site: Site, group_by: str, buckets: int) -> str:
    if group_by == "block":
        return "other" if site.block is None else f"block{site.block}"
    if group_by == "role":
        return site.role
    if group_by == "global":
        return "all"
    return f"{site.role}@{min(buckets - 1, math.floor(site.depth * buckets))}"


def _suggest(trial: optuna.trial.BaseTrial, name: str, d: BaseDistribution) -> Any:
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    raise TypeError(f"no suggest_* for {type(d).__name__}")
