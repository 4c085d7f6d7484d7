"""`AllocatorSpace`: about a dozen knobs over site sensitivity scores, each plan made by
`allocate` (AutoPEFT-sized)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ...backends.base import get_method
from ...ir.site import Site, SiteGraph
from ..budget import Budget, BudgetError
from ..proxy.allocate import allocate, eligible_sites
from .base import Space, sizeless

HAND_WRITTEN = {"query-value": 0, "uniform": 1}  # priors users write by hand: ranks above the uniform one allowed


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

    ``priors`` name other score vectors besides ``scores`` (the proxy's, named ``"proxy"``):
    knob ``scores`` then chooses the one a plan starts from, and a site a prior scores 0 is
    left untuned by it. Hand-written placements are priors too: ``"query-value"`` (1 on the
    query and value projections) is uniform LoRA there, ``"uniform"`` (1 everywhere) LoRA on
    every linear layer at the rank that fits. With priors, `seeds` starts from each prior's
    plan at the whole budget — the plans a user would write by hand and the one-shot
    allocations — so a search is compared with them before anything else.

    >>> space = AllocatorSpace(graph, scores, 5_000)  # doctest: +SKIP
    >>> space.plan_from_params(space.seeds(1)[0]).sites == search(..., strategy="proxy").sites  # doctest: +SKIP
    True
    """

    name = "allocator"

    def __init__(self, graph: SiteGraph, scores: Mapping[str, float], budget: Budget | int | str, *,
                 methods: Iterable[str] = ("lora",), roles: Iterable[str] = ("attn", "mlp"), max_rank: int = 64,
                 priors: Mapping[str, Mapping[str, float]] | None = None, **kwargs: Any):  # fmt: skip
        super().__init__(graph, budget, **kwargs)
        self.methods, self.roles, self.max_rank = tuple(methods), tuple(roles), max_rank
        skip = {s.name for s in self.full}
        self.sites = [s for s in eligible_sites(graph, "lora", self.roles, exclude=skip) if s.name in scores]
        if not self.sites:
            raise ValueError(f"no site has a score and a role in {list(self.roles)}; score the eligible sites first")
        vector = sorted(m for m in self.methods if sizeless(m, self.sites[0]))
        known = ("lora", "dora", "sparse", "moe_lora")  # the methods the knobs below are about
        if "lora" not in self.methods or set(self.methods) - set(known) - set(vector):
            raise ValueError(f"AllocatorSpace methods must include 'lora' and come from {list(known)} or methods "
                             f"without a size knob (ia3, ssf), got {list(self.methods)}")  # fmt: skip
        self.vector = vector
        self.scores = {s.name: float(scores[s.name]) for s in self.sites}
        self.priors = {"proxy": self.scores}
        for name, prior in (priors or {}).items():
            if name in self.priors:
                raise ValueError(f"prior {name!r}: 'proxy' names the scores given as scores; choose another name")
            values = {s.name: float(prior.get(s.name, 0.0)) for s in self.sites}
            if not any(v > 0 for v in values.values()) or any(v < 0 or v != v for v in values.values()):
                raise ValueError(f"prior {name!r} must score some site above 0 and none below (a site scored 0 is left untuned)")
            self.priors[name] = values
        families = {s.role.split(".")[0] == "mlp" for s in self.sites}
        d: dict[str, BaseDistribution] = {}
        if len(self.priors) > 1:
            d["scores"] = CategoricalDistribution(list(self.priors))
        d |= {
            "budget": FloatDistribution(self.min_share, 1.0), "power": FloatDistribution(0.0, 2.0),
            "max_rank": IntDistribution(1, max_rank, log=True), "depth_tilt": FloatDistribution(-3.0, 3.0),
        }  # fmt: skip
        if len(families) == 2:
            d["mlp_tilt"] = FloatDistribution(-3.0, 3.0)
        d["none_share"] = FloatDistribution(0.0, 0.9)
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
        self._distributions = d | self._lr_knob()

    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def proxy_params(self, fraction: float) -> dict[str, Any]:
        fixed = {"power": 1.0, "max_rank": self.max_rank, "density": 0.01, "scores": "proxy",
                 "vector_method": next(iter(self.vector), None), **self._lr_seed()}  # fmt: skip
        low = self._distributions["budget"].low
        return {k: max(low, min(1.0, fraction)) if k == "budget" else fixed.get(k, 0.0) for k in self._distributions}

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
            per_rank = sum(get_method("lora").param_count(s, 1) for s in self.sites if self.priors[name][s.name] > 0)
            params["max_rank"] = min(self.max_rank, max(1, self.available // max(1, per_rank) + HAND_WRITTEN[name]))
        return params

    def seeds(self, n: int) -> list[dict[str, Any]]:
        """With priors: each prior's plan at the whole budget (`baselines`), at each of the
        seed learning rates (`seed_lrs`: the recipe's, then 2.5x below and above it), then the
        proxy at budget shares spread in log scale below the whole; without: `Space.seeds`."""
        if len(self.priors) == 1:
            return super().seeds(n)
        out = [params for _, params in self._baseline_seeds()][:n]
        rest = n - len(out)
        return out + [self.proxy_params(self.min_share ** ((rest - i) / rest)) for i in range(rest)]

    def baselines(self) -> list[str]:
        """The baseline name of each leading seed (one per prior and seed learning rate, the
        recipe's rate first): ``query-value``, ``uniform``, ``proxy``, then the others
        (``activation``). A study screens each at every seed rate and promotes its best."""
        return [name for name, _ in self._baseline_seeds()]

    def seed_lrs(self) -> list[float | None]:
        """The learning rates baselines are screened at: the range's geometric mean (the
        recipe's rate), then 2.5x below and above it where the range reaches (None: no knob)."""
        if self.lr is None:
            return [None]
        mid = math.sqrt(self.lr[0] * self.lr[1])
        return [mid, *(lr for lr in (mid / 2.5, mid * 2.5) if self.lr[0] <= lr <= self.lr[1])]

    def _baseline_seeds(self) -> list[tuple[str, dict[str, Any]]]:
        if len(self.priors) == 1:
            return []
        order = [p for p in ("query-value", "uniform", "proxy") if p in self.priors]
        order += [p for p in self.priors if p not in order]
        return [(p, {**self.prior_params(p), **({"lr": lr} if lr is not None else {})})
                for lr in self.seed_lrs() for p in order]  # fmt: skip

    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        p = {"mlp_tilt": 0.0, "vector_share": 0.0, "sparse_share": 0.0, "dora_share": 0.0, "experts_slope": 0.0, **params}
        prior = self.priors[p.get("scores", "proxy")]
        adjusted = {s.name: prior[s.name] ** p["power"]
                    * math.exp(p["depth_tilt"] * (s.depth - 0.5) + p["mlp_tilt"] * (0.5 if s.role.startswith("mlp") else -0.5))
                    for s in self.sites if prior[s.name] > 0}  # fmt: skip
        scored = [i for i, s in enumerate(self.sites) if s.name in adjusted]
        order = sorted(scored, key=lambda i: (adjusted[self.sites[i].name], -i))  # ascending
        cut = math.floor(p["none_share"] * len(order))
        rest = order[cut:]
        bands: dict[int, str] = {}
        for share, method in ((p["vector_share"], p.get("vector_method") or next(iter(self.vector), None)), (p["sparse_share"], "sparse")):
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
        hp = {"sparse": {"density": p.get("density", 0.01)}, **{m: {} for m in self.vector}}  # bands of fixed size
        extra = {i: _fixed_cost(self.sites[i], kind[i], hp.get(kind[i]), experts.get(i, 1)) for i in bands}
        limit = math.floor(p["budget"] * self.available)
        fixed = sum(extra.values())
        for i in order:  # the lowest-scoring fixed costs give way first
            if fixed <= limit:
                break
            if extra.get(i):
                fixed -= extra[i]
                kind[i], extra[i] = ("none" if kind[i] in hp else "lora"), 0
        ranked = {self.sites[i].name: adjusted[self.sites[i].name] for i in bands if kind[i] not in hp and kind[i] != "none"}
        try:
            ranks = allocate(self.graph, ranked, limit - fixed, method="lora", roles=self.roles,
                             max_rank=p["max_rank"]) if ranked else {}  # fmt: skip
        except BudgetError:
            ranks = {}
        entries = {}
        for i in sorted(bands):
            name, m = self.sites[i].name, kind[i]
            if m in hp:
                entries[name] = {"method": m, **hp[m]}
            elif name in ranks:  # the allocated rank, sized by the method (MoE-LoRA splits it among experts)
                entries[name] = {"method": m, **get_method(m).sized(self.sites[i], ranks[name], experts=experts[i])}
        return entries


def _fixed_cost(site: Site, method: str, hp: dict[str, Any] | None, experts: int) -> int:
    """Params a band's method costs before any rank: the whole of a fixed-size band's method
    (ia3/ssf, sparse at its density), `Method.fixed_params` of a ranked one (DoRA's magnitude
    vector, MoE-LoRA's router)."""
    if method == "none":
        return 0
    if hp is not None:
        return get_method(method).param_count(site, **hp)
    return get_method(method).fixed_params(site, experts=experts)
