"""The ``proxy`` strategy: the proxy allocation (`Space.proxy_params`) at budget shares, no
training needed to choose a plan. `proxy_plan` is its first point, the whole budget, on the
default space (what ``search(strategy="proxy")`` returns); as an optuna sampler over a study,
trial ``i`` is the allocation at the ``i``-th share of a log-scale van der Corput sequence.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from ...describe import provenance
from ...ir import lower
from ...ir.site import SiteGraph
from ...plan import Plan
from ..budget import Budget, BudgetError
from ..proxy.options import ProxyOptions
from ..proxy.scores import score_sites
from ..space.base import Space
from ..space.default import default_space
from ..training.task import Task


def proxy_plan(
    model: nn.Module,
    budget: Budget,
    task: Task | None,
    options: ProxyOptions,
    *,
    graph: SiteGraph | None = None,
    seed: int = 0,
) -> Plan:
    """The proxy's plan: ``space.plan_from_params(space.proxy_params(1.0))`` on the default
    space over ``options``' sites and scores (``options.train_modules`` fully trained, LoRA
    ranks by `allocate` over the scores), its provenance saying how the sites were scored. The
    budget's limits besides params are checked, not searched: a plan over them is an error.

    >>> plan = proxy_plan(tiny_bert(), Budget(params="5%"), None, ProxyOptions())
    >>> plan.provenance["strategy"], plan.provenance["scores"]
    ('proxy', 'hill-alpha')
    """
    if budget.memory is not None and task is None:
        raise BudgetError(
            "a memory limit depends on the training batch: pass the task it will be trained on "
            "(search(model, budget, task=...)), or drop Budget(memory=...)"
        )
    graph = lower(model) if graph is None else graph
    scored = score_sites(model, graph, task, options, seed=seed)
    space = default_space(model, budget, task, proxy=options, graph=graph, scored=scored)
    params = space.proxy_params(1.0)
    costs = space.costs(params)
    over = [f"{k} {costs[k]:,.4g} > {v:,.4g}" for k, v in space.limits.items() if k != "params" and costs[k] > v]
    if over:
        raise BudgetError(
            f"the proxy plan for {budget.params} params breaks the budget's other limits ({'; '.join(over)}); "
            "lower the parameter budget, or search with a task so these limits act as constraints"
        )
    plan = space.plan_from_params(params)
    plan.provenance = {
        **provenance("proxy", seed, task.name if task else None, model),
        **scored.scoring,
        **(task.provenance() if task else {}),
    }
    return plan


class ProxySampler(BaseSampler):
    """Trial ``i`` gets ``space.proxy_params(share(i, space.min_share))``: no model, no
    randomness; trial 0, the whole budget, is the point `proxy_plan` takes on the default space."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self.space.proxy_params(share(trial.number, self.space.min_share))
        return {k: v for k, v in params.items() if k in search_space}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.space.proxy_params(share(trial.number, self.space.min_share))[param_name]


def share(i: int, low: float) -> float:
    """``low ** vdc(i)`` for the base-2 van der Corput sequence: budget shares from 1 down
    towards ``low``, spread evenly in log scale, each new one halving the largest gap.

    >>> [round(share(i, 1 / 16), 4) for i in range(6)]
    [1.0, 0.25, 0.5, 0.125, 0.7071, 0.1768]
    """
    x, denom = 0.0, 1.0
    while i:
        denom *= 2
        i, bit = divmod(i, 2)
        x += bit / denom
    return low**x
