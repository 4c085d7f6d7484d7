"""`AllocatorSpace`: about a dozen knobs over site sensitivity scores, each plan made by
`allocate` (AutoPEFT-sized). The space knows methods only through the registry: each
`Method.band` says how a method is sized, and the space builds a band and its knobs from it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ...backends.base import DEFAULT_METHODS, RANK_UNIT, get_method
from ...ir.site import Site, SiteGraph
from ..budget import Budget, BudgetError
from ..proxy.allocate import allocate, eligible_sites
from .base import Space

HAND_WRITTEN = {"query-value": 0, "uniform": 1}  # priors users write by hand: ranks above the uniform one allowed


@dataclass(frozen=True)
class Bands:
    """A space's methods grouped by `Method.band`: the rank unit (LoRA); ``vector`` methods
    (sorted); ``fixed`` ones, each with a ``<name>_share`` knob and its `Method.size` knob;
    ``shared`` rank methods, each taking the top ``<name>_share`` of the rank band; and
    ``structured`` rank methods, each replacing the unit where ``1 + ⌊<structure>_slope *
    depth⌋`` (its `Method.structure`, e.g. experts) reaches 2.

    >>> Bands.of(("lora", "dora", "sparse", "moe_lora", "ia3")).knob_names()
    ['vector_share', 'sparse_share', 'density', 'dora_share', 'experts_slope']
    """

    vector: tuple[str, ...]
    fixed: tuple[str, ...]
    shared: tuple[str, ...]
    structured: tuple[str, ...]

    @classmethod
    def of(cls, methods: Iterable[str]) -> Bands:
        methods = tuple(methods)
        band = {m: get_method(m).band for m in methods}  # an unknown name fails here, listing the known ones
        unsized = [m for m in methods if band[m] is None]
        if RANK_UNIT not in methods or unsized:
            raise ValueError(
                f"AllocatorSpace methods must include {RANK_UNIT!r} (ranks are counted in its params) and each "
                f"declare how a planner sizes it (Method.band), got {list(methods)}"
                + (f": {unsized} declare none" if unsized else "")
            )
        ranked = [m for m in methods if band[m] == "rank" and m != RANK_UNIT]
        out = cls(
            tuple(sorted(m for m in methods if band[m] == "vector")),
            tuple(m for m in methods if band[m] == "fixed"),
            tuple(m for m in ranked if get_method(m).structure is None),
            tuple(m for m in ranked if get_method(m).structure is not None),
        )
        names = out.knob_names()
        if len(set(names)) < len(names):
            raise ValueError(f"methods {list(methods)} would share a knob name among {names}; search them separately")
        return out

    def knob_names(self) -> list[str]:
        return [
            *(["vector_share"] if self.vector else []),
            *(k for m in self.fixed for k in (f"{m}_share", get_method(m).size.name)),
            *(f"{m}_share" for m in self.shared),
            *(f"{get_method(m).structure}_slope" for m in self.structured),
        ]

    def knobs(self) -> dict[str, BaseDistribution]:
        """Each band's knobs, in `knob_names` order (``vector_method`` after ``vector_share``)."""
        d: dict[str, BaseDistribution] = {}
        if self.vector:
            d["vector_share"] = FloatDistribution(0.0, 1.0)
            if len(self.vector) > 1:
                d["vector_method"] = CategoricalDistribution(list(self.vector))
        for m in self.fixed:
            size = get_method(m).size
            d[f"{m}_share"], d[size.name] = (
                FloatDistribution(0.0, 1.0),
                FloatDistribution(size.low, size.high, log=size.log),
            )
        d |= {f"{m}_share": FloatDistribution(0.0, 1.0) for m in self.shared}
        d |= {f"{get_method(m).structure}_slope": FloatDistribution(0.0, 4.0) for m in self.structured}
        return d

    def fixed_hyper(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The hyper-parameters of the bands of fixed size: a fixed method at its size knob, a vector method as is."""
        sizes = {m: get_method(m).size for m in self.fixed}
        return {
            **{m: {s.name: params.get(s.name, s.default)} for m, s in sizes.items()},
            **{m: {} for m in self.vector},
        }


class AllocatorSpace(Space):
    """Knobs over sensitivity ``scores``, each plan made by `allocate` (AutoPEFT-sized: ≤ 12).

    Site scores become ``score**power * exp(depth_tilt * (depth - ½) ± mlp_tilt / 2)``. Sites
    ranked by that score are cut into bands (`Bands`, from each method's `Method.band`), low to
    high: ``none_share`` untouched, then ``vector_share`` of the rest on ``vector_method`` (a
    method without a size: ia3, ssf), then for each method of fixed size ``<name>_share`` of
    the rest at its size knob (sparse at ``density``), and the rest on a rank method: LoRA,
    whose top ``<name>_share`` go to each other rank method (``dora_share``) and, where a
    method's structure grows with depth, to that method (``moe_lora`` with ``1 + ⌊experts_slope
    * depth⌋`` experts). Fixed costs are paid first (the lowest-scoring fall back while they
    exceed the budget); the rank band shares the rest by `allocate` with ranks capped at
    ``max_rank``, ``budget`` being the share of the budget used. A site whose op the band's
    method cannot tune falls back to LoRA (rank methods) or is left out.

    ``priors`` name other score vectors besides ``scores`` (the proxy's, named ``"proxy"``):
    knob ``scores`` then chooses the one a plan starts from, and a site a prior scores 0 is
    left untuned by it. Hand-written placements are priors too: ``"query-value"`` (1 on the
    query and value projections) is uniform LoRA there, ``"uniform"`` (1 everywhere) LoRA on
    every linear layer at the rank that fits. With priors, `seeds` starts from each prior's
    plan at the whole budget — the plans a user would write by hand and the one-shot
    allocations — so a search is compared with them before anything else. A budget below rank
    1 on the cheapest site is a `BudgetError` naming the smallest that fits.

    >>> from peftplan.planner import search
    >>> from peftplan.planner.space import default_space
    >>> model = tiny_bert()
    >>> space = default_space(model, 5_000, None)
    >>> space.plan_from_params(space.proxy_params(1.0)).sites == search(model, 5_000, strategy="proxy").sites
    True
    """

    name = "allocator"

    def __init__(
        self,
        graph: SiteGraph,
        scores: Mapping[str, float],
        budget: Budget | int | str,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        roles: Iterable[str] = ("attn", "mlp"),
        max_rank: int = 64,
        priors: Mapping[str, Mapping[str, float]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(graph, budget, **kwargs)
        self.methods, self.roles, self.max_rank = tuple(methods), tuple(roles), max_rank
        skip = {s.name for s in self.full}
        self.sites = [s for s in eligible_sites(graph, RANK_UNIT, self.roles, exclude=skip) if s.name in scores]
        if not self.sites:
            raise ValueError(f"no site has a score and a role in {list(self.roles)}; score the eligible sites first")
        self.bands = Bands.of(self.methods)
        self._check_feasible()
        self.scores = {s.name: float(scores[s.name]) for s in self.sites}
        self.priors = {"proxy": self.scores, **self._read_priors(priors or {})}
        d: dict[str, BaseDistribution] = {}
        if len(self.priors) > 1:
            d["scores"] = CategoricalDistribution(list(self.priors))
        d |= {
            "budget": FloatDistribution(self.min_share, 1.0),
            "power": FloatDistribution(0.0, 2.0),
            "max_rank": IntDistribution(1, max_rank, log=True),
            "depth_tilt": FloatDistribution(-3.0, 3.0),
        }
        if len({s.role.split(".")[0] == "mlp" for s in self.sites}) == 2:
            d["mlp_tilt"] = FloatDistribution(-3.0, 3.0)
        d["none_share"] = FloatDistribution(0.0, 0.9)
        self._distributions = d | self.bands.knobs() | self._lr_knob()

    def _check_feasible(self) -> None:
        unit = get_method(RANK_UNIT)
        cheapest = min(self.sites, key=lambda s: unit.param_count(s, rank=1))
        need = unit.param_count(cheapest, rank=1)
        if self.available < need:
            total = need + self.full_params
            paid = (
                f"{self.full_params:,} for train_modules {[s.name for s in self.full]} plus {need:,} for "
                if self.full
                else ""
            )
            raise BudgetError(
                f"budget {self.available + self.full_params:,} params is below the cheapest plan ({total:,} "
                f"params: {paid}rank 1 on {cheapest.name}); raise it to at least {total:,}",
                minimum=total,
            )

    def _read_priors(self, priors: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        out = {}
        for name, prior in priors.items():
            if name == "proxy":
                raise ValueError(f"prior {name!r}: 'proxy' names the scores given as scores; choose another name")
            values = {s.name: float(prior.get(s.name, 0.0)) for s in self.sites}
            if not any(v > 0 for v in values.values()) or any(v < 0 or v != v for v in values.values()):
                raise ValueError(
                    f"prior {name!r} must score some site above 0 and none below (a site scored 0 is left untuned)"
                )
            out[name] = values
        return out

    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def proxy_params(self, fraction: float) -> dict[str, Any]:
        sizes = {get_method(m).size.name: get_method(m).size.default for m in self.bands.fixed}
        fixed = {
            "power": 1.0,
            "max_rank": self.max_rank,
            "scores": "proxy",
            **sizes,
            "vector_method": next(iter(self.bands.vector), None),
            **self._lr_seed(),
        }
        low = self._distributions["budget"].low
        return {k: max(low, min(1.0, fraction)) if k == "budget" else fixed.get(k, 0.0) for k in self._distributions}

    def whole_budget(self) -> dict[str, Any]:
        """The ``budget`` knob at 1 and ``max_rank`` at the space's cap: the rank band shares the
        whole budget left after fixed costs, and no drawn cap keeps it from spending it. With
        ``max_rank`` drawn, 7 of the 8 proposals of the full-scale MiniLM sst2 search (budget 1)
        spent 3-41% of the budget (at 64, any 3 of its sites can hold it), and on mr the screens
        ranked such plans by size. The allocation's shape stays the other knobs' (``power`` 0
        is uniform, ``none_share`` leaves sites out).

        >>> from peftplan.planner.space import default_space
        >>> default_space(tiny_bert(), 5_000, None).whole_budget()
        {'budget': 1.0, 'max_rank': 64}
        """
        return {"budget": 1.0, "max_rank": self.max_rank}

    def prior_params(self, name: str) -> dict[str, Any]:
        """Knobs of prior ``name``'s plan at the whole budget, taken as it is (power 1, no
        tilt, every site it scores). The hand-written placements are capped at the largest
        rank r every site they score can have at once: ``"query-value"`` at r (uniform LoRA),
        ``"uniform"`` at r + 1, so the rest goes one rank up on the cheapest sites (peft's
        ``rank_pattern``)."""
        if name not in self.priors:
            raise ValueError(f"no prior {name!r}; this space has {list(self.priors)}")
        params = {**self.proxy_params(1.0), **({"scores": name} if "scores" in self._distributions else {})}
        if name in HAND_WRITTEN:
            per_rank = sum(
                get_method(RANK_UNIT).param_count(s, rank=1) for s in self.sites if self.priors[name][s.name] > 0
            )
            params["max_rank"] = min(self.max_rank, max(1, self.available // max(1, per_rank) + HAND_WRITTEN[name]))
        return params

    def seeds(self, n: int) -> list[dict[str, Any]]:
        """With priors: the first prior's plan at the whole budget (`baselines`) at each of the
        seed learning rates (`seed_lrs`: the recipe's, then 2.5x below and above it), then the
        proxy at budget shares spread in log scale below the whole, those that place a site
        (`places`); the other priors follow at the rate those screens choose (`followers`);
        without priors: `Space.seeds`."""
        if len(self.priors) == 1:
            return super().seeds(n)
        out = [params for _, params in self._baseline_seeds()][:n]
        rest = n - len(out)
        return out + self.proxy_seeds([self.min_share ** ((rest - i) / rest) for i in range(rest)])

    def baselines(self) -> list[str]:
        """The baseline name of each leading seed: the first prior in `prior_order` (the peft
        default ``query-value`` where it is one), once per seed learning rate."""
        return [name for name, _ in self._baseline_seeds()]

    def followers(self) -> list[tuple[str, dict[str, Any]]]:
        """The other priors of `prior_order`, each a baseline (name, params at the recipe's
        rate): a study screens each once, at the learning rate the first prior screened best at
        (`peftplan.planner.study.policy`). On every search in benchmarks/RESULTS.md each prior
        screened best at the same seed rate, so screening all of them at every rate spent most
        of the screens on seeds."""
        order = self.prior_order()
        return [(p, self._at_rate(p, self.seed_lrs()[0])) for p in order[1:]]

    def prior_order(self) -> list[str]:
        """The priors a study compares as baselines, the one whose rates are swept first:
        ``query-value``, ``uniform``, ``proxy``, then the others (``activation``); none
        without priors."""
        if len(self.priors) == 1:
            return []
        order = [p for p in ("query-value", "uniform", "proxy") if p in self.priors]
        return order + [p for p in self.priors if p not in order]

    def seed_lrs(self) -> list[float | None]:
        """The learning rates baselines are screened at: the range's geometric mean (the
        recipe's rate), then 2.5x below and above it where the range reaches (None: no knob).
        The sweep is not extended past an edge that screens best: on SmolLM2 a 5-step screen's
        best rate was the full run's (benchmarks/llm_transfer.py), but on MiniLM sst2 an
        extended sweep screened best at 1e-2 by a loss difference of 0.001 and both full runs
        there fell to chance (benchmarks/runs/quality/full_sst2_search-extended.json)."""
        if self.lr is None:
            return [None]
        mid = math.sqrt(self.lr[0] * self.lr[1])
        return [mid, *(lr for lr in (mid / 2.5, mid * 2.5) if self.lr[0] <= lr <= self.lr[1])]

    def _baseline_seeds(self) -> list[tuple[str, dict[str, Any]]]:
        order = self.prior_order()
        return [(order[0], self._at_rate(order[0], lr)) for lr in self.seed_lrs()] if order else []

    def _at_rate(self, prior: str, lr: float | None) -> dict[str, Any]:
        return {**self.prior_params(prior), **({"lr": lr} if lr is not None else {})}

    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        p = {"mlp_tilt": 0.0, **params}  # no mlp_tilt knob where the sites are all attention or all MLP
        adjusted = self._adjusted(p)
        order = sorted(adjusted, key=lambda i: (adjusted[i], -i))  # ascending
        kind, choices = self._bands_of(p, order[math.floor(p["none_share"] * len(order)) :])
        hp = self.bands.fixed_hyper(p)
        extra = {i: _fixed_cost(self.sites[i], kind[i], hp.get(kind[i]), choices[i]) for i in kind}
        limit = math.floor(p["budget"] * self.available)
        fixed = sum(extra.values())
        for i in order:  # the lowest-scoring fixed costs give way first
            if fixed <= limit:
                break
            if extra.get(i):
                fixed -= extra[i]
                kind[i], extra[i] = ("none" if kind[i] in hp else RANK_UNIT), 0
        ranked = {self.sites[i].name: adjusted[i] for i in kind if kind[i] not in hp and kind[i] != "none"}
        try:
            ranks = (
                allocate(self.graph, ranked, limit - fixed, method=RANK_UNIT, roles=self.roles, max_rank=p["max_rank"])
                if ranked
                else {}
            )
        except BudgetError:
            ranks = {}
        entries = {}
        for i in sorted(kind):
            name, m = self.sites[i].name, kind[i]
            if m in hp:
                entries[name] = {"method": m, **hp[m]}
            elif name in ranks:  # the allocated rank, sized by the method (MoE-LoRA splits it among experts)
                entries[name] = {"method": m, **get_method(m).sized(self.sites[i], ranks[name], **choices[i])}
        return entries

    def _adjusted(self, p: Mapping[str, Any]) -> dict[int, float]:
        """Each site's score under the prior, power and tilts of ``p``, by index; sites the prior scores 0 left out."""
        prior = self.priors[p.get("scores", "proxy")]
        return {
            i: prior[s.name] ** p["power"]
            * math.exp(p["depth_tilt"] * (s.depth - 0.5) + p["mlp_tilt"] * (0.5 if s.role.startswith("mlp") else -0.5))
            for i, s in enumerate(self.sites)
            if prior[s.name] > 0
        }

    def _bands_of(self, p: Mapping[str, Any], rest: list[int]) -> tuple[dict[int, str], dict[int, dict[str, int]]]:
        """The method of each site of ``rest`` (ascending score) and the structure choices it is sized with."""
        b = self.bands
        bands: dict[int, str] = {}
        for share, method in (
            (p["vector_share"] if b.vector else 0.0, p.get("vector_method") or next(iter(b.vector), None)),
            *((p[f"{m}_share"], m) for m in b.fixed),
        ):
            n = math.floor(share * len(rest))
            bands.update((i, method) for i in rest[:n])
            rest = rest[n:]
        bands.update((i, RANK_UNIT) for i in rest)
        for m in b.shared:  # the top of what is left of the rank band
            n = math.floor(p[f"{m}_share"] * len(rest))
            bands.update((i, m) for i in rest[len(rest) - n :])
            rest = rest[: len(rest) - n]
        choices: dict[int, dict[str, int]] = {i: {} for i in bands}
        for m in b.structured:  # replaces the unit where its count grows to 2 or more
            structure = get_method(m).structure
            for i in rest:
                count = 1 + math.floor(p[f"{structure}_slope"] * self.sites[i].depth)
                if bands[i] == RANK_UNIT and count > 1:
                    bands[i], choices[i] = m, {structure: count}

        def fallback(i: int, m: str) -> str:  # a rank method falls back to the unit where it cannot tune the op
            return (
                m if self.sites[i].op in get_method(m).ops else (RANK_UNIT if get_method(m).band == "rank" else "none")
            )

        return {i: fallback(i, m) for i, m in bands.items()}, choices


def _fixed_cost(site: Site, method: str, hp: dict[str, Any] | None, choices: dict[str, int]) -> int:
    """Params a band's method costs before any rank: the whole of a fixed-size band's method
    (ia3/ssf, sparse at its density), `Method.fixed_params` of a ranked one (DoRA's magnitude
    vector, MoE-LoRA's router)."""
    if method == "none":
        return 0
    if hp is not None:
        return get_method(method).param_count(site, **hp)
    return get_method(method).fixed_params(site, **choices)
