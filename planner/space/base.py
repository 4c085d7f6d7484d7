"""Search spaces: a few knobs a sampler can turn, and the `Plan` each setting of them means.

A `Space` maps a trial's choices to a plan deterministically, so a params dict alone (an
optuna ``FixedTrial``, a stored trial) reproduces its plan, and the plan's exact costs
(trainable params; training memory and merged latency overhead on request) are known before
anything trains. Trainable params never exceed the budget: the space builds plans within it.

    >>> from peftplan import lower
    >>> from peftplan.planner.space import AllocatorSpace
    >>> graph = lower(tiny_bert())
    >>> space = AllocatorSpace(graph, {site.name: 1.0 for site in graph}, 5_000, methods=("lora", "ia3"))
    >>> sorted(space.distributions())
    ['budget', 'depth_tilt', 'max_rank', 'mlp_tilt', 'none_share', 'power', 'vector_share']
    >>> plan = space.plan_from_params(space.seeds(1)[0])  # the proxy plan at the full budget
    >>> plan.objectives["params"] <= 5_000, space.objectives
    (True, {'metric': 'max', 'params': 'min'})
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ...backends.base import get_method
from ...describe import describe, model_header
from ...ir.site import SiteGraph
from ...plan import Plan
from ...recipe import Recipe
from ..budget import Budget, BudgetError
from ..cost import plan_cost

SENSES = {"metric": "max", "params": "min", "memory": "min", "latency": "min", "adapter_bytes": "min"}


class Space(abc.ABC):
    """One space: knobs (`distributions`) → per-site entries (`site_entries`, by subclasses).

    ``objectives`` maps each objective to its sense, "metric" first; "memory" is the plan's own
    training bytes (`plan_cost` ``train_bytes`` at ``batch_shape``, (batch, length) of a training step) and "latency" its
    predicted forward-time overhead after merging (`PlanCost.latency_fraction`); "adapter_bytes" what the artifact
    stores. ``limits`` caps costs by name: every field of ``budget`` (params are enforced by
    construction, the others as constraints: plans over them are never trained), plus any
    given here. ``train_modules`` are fully trained and paid from the budget first.
    ``min_share``: the smallest budget share `seeds` starts from. ``lr``: a (low, high) range
    the learning rate is searched in (log scale, knob ``"lr"``; seeds take its geometric mean),
    so each plan comes with the rate it trains best at (`recipe`); None: the recipe's rate.
    """

    name = ""
    min_share = 0.05

    def __init__(
        self,
        graph: SiteGraph,
        budget: Budget | int | str,
        *,
        objectives: Iterable[str] = ("metric", "params"),
        limits: Mapping[str, float] | None = None,
        train_modules: Iterable[str] = (),
        batch_shape: tuple[int, int] | None = None,
        lr: tuple[float, float] | None = None,
    ):
        self.graph, self.budget, self.batch_shape = graph, Budget.coerce(budget), batch_shape
        if lr is not None:
            lr = tuple(float(x) for x in lr)
            if len(lr) != 2 or not 0 < lr[0] < lr[1] or not math.isfinite(lr[1]):
                raise ValueError(f"lr must be a (low, high) range with 0 < low < high, e.g. (2e-4, 5e-3); got {lr!r}")
        self.lr = lr
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
            raise BudgetError(
                f"budget {limit:,} params is below the {self.full_params:,} params of train_modules "
                f"{[s.name for s in self.full]}; raise it",
                minimum=self.full_params,
            )
        self._cache: dict[tuple, tuple[dict, dict]] = {}

    @property
    def directions(self) -> list[str]:
        """``optuna.create_study(directions=space.directions)``: one per objective, in order."""
        return ["maximize" if s == "max" else "minimize" for s in self.objectives.values()]

    def values(self, plan: Plan, metric: float) -> list[float]:
        """A trial's objective values in ``objectives`` order: ``metric`` and the plan's costs."""
        return [metric, *(plan.objectives[k] for k in self.objectives if k != "metric")]

    @abc.abstractmethod
    def distributions(self) -> dict[str, BaseDistribution]:
        """The knobs, by name, in a fixed order."""

    @abc.abstractmethod
    def site_entries(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-site ``{"method": …, hyper-parameters…}`` for tuned sites (train_modules aside)."""

    @abc.abstractmethod
    def proxy_params(self, fraction: float) -> dict[str, Any]:
        """Knobs reproducing (or, where the space cannot express it, approximating) the proxy
        allocation at ``fraction`` of the available budget."""

    def recipe(self, params: Mapping[str, Any], base: Recipe) -> Recipe:
        """How ``params``' plan trains: ``base`` at the knob ``"lr"`` when the space searches it.

        >>> from peftplan.planner.space import default_space
        >>> space = default_space(tiny_bert(), 5_000, None, lr=(1e-4, 1e-2))
        >>> space.recipe({**space.proxy_params(1.0), "lr": 2e-3}, Recipe(lr=1e-3, steps=200)).lr
        0.002
        """
        if self.lr is None or "lr" not in params:
            return base
        return replace(base, lr=float(params["lr"]))

    def _lr_knob(self) -> dict[str, BaseDistribution]:
        return {} if self.lr is None else {"lr": FloatDistribution(self.lr[0], self.lr[1], log=True)}

    def _lr_seed(self) -> dict[str, float]:
        """The seeds' learning rate: the range's geometric mean (the recipe's rate by default)."""
        return {} if self.lr is None else {"lr": math.sqrt(self.lr[0] * self.lr[1])}

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
        return Plan(
            sites={n: dict(e) for n, e in sites.items()},
            model=model_header(self.graph),
            budget=self.budget.to_dict(),
            objectives=dict(costs),
            provenance={"space": self.name, "knobs": dict(params)},
        )

    def costs(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Exact costs of ``params``' plan without training: params, memory, latency and
        adapter bytes (whichever are objectives or not)."""
        return dict(self._build(params)[1])

    def places(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params``' plan tunes any site: a budget share smaller than the cheapest
        site's cost places none, and such a plan has nothing to train."""
        return bool(self._build(params)[0])

    def seeds(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` params dicts for ``study.enqueue_trial``: the proxy plans at budget shares
        evenly spaced in log scale from `min_share` up to the whole available budget (n = 4:
        0.05, 0.136, 0.368, 1), less those that place no site (`places`). A front over trainable
        params spans orders of magnitude and its cheap end holds most of the hypervolume, so
        linear shares (¼ … 1) would leave it empty."""
        return self.proxy_seeds([self.min_share ** ((n - 1 - i) / max(1, n - 1)) for i in range(n)])

    def proxy_seeds(self, shares: list[float]) -> list[dict[str, Any]]:
        """The proxy plan's params at each budget share in ``shares`` that places a site (`places`)."""
        return [p for p in map(self.proxy_params, shares) if self.places(p)]

    def whole_budget(self) -> dict[str, Any]:
        """The knobs that make a plan spend the whole budget, for proposals made there
        (`peftplan.planner.study.policy.proposal_knobs`): none in a space without a budget knob."""
        return {}

    def baselines(self) -> list[str]:
        """The baseline name of each leading `seed` that is a baseline a search must be
        compared with at its top rung: of the seeds sharing a name (one plan at several
        learning rates), the best screened is promoted (without a cost cap, whatever its rank;
        under one, the best-screened baseline has a full run). None here."""
        return []

    def followers(self) -> list[tuple[str, dict[str, Any]]]:
        """Baselines screened after the seeds, each once, at the learning rate the seeds'
        baseline screened best at: (name, params at the recipe's rate). None here."""
        return []

    def _build(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        key = tuple(sorted((k, v) for k, v in params.items() if k != "lr"))  # the rate changes no site
        if key not in self._cache:
            missing = sorted(set(self.distributions()) - set(params))
            if missing:
                raise ValueError(f"{type(self).__name__}: params lack knob(s) {missing}")
            tuned = self.site_entries(params)
            full = {s.name: {"method": "full"} for s in self.full}
            sites = {
                s.name: {**full.get(s.name, tuned.get(s.name, {})), **describe(s)}
                for s in self.graph
                if s.name in full or s.name in tuned
            }
            cost = plan_cost(self.graph, Plan(sites=sites), batch_shape=self.batch_shape)
            costs = {
                "params": cost.params,
                "memory": cost.train_bytes,
                "latency": cost.latency_fraction,
                "adapter_bytes": cost.adapter_bytes,
            }
            self._cache[key] = (sites, costs)
        return self._cache[key]


def _suggest(trial: optuna.trial.BaseTrial, name: str, d: BaseDistribution) -> Any:
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    raise TypeError(f"no suggest_* for {type(d).__name__}")
