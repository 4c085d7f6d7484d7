"""Search strategies behind one interface: a name → an optuna sampler over a `Space`.

    >>> space = AllocatorSpace(graph, scores, 250_000)  # doctest: +SKIP
    >>> study = optuna.create_study(directions=space.directions,
    ...                             sampler=make_sampler("botorch", space, seed=0))  # doctest: +SKIP
    >>> enqueue_seeds(study, space, "botorch", 4)  # proxy plans at 5%, 14%, 37%, 100% of the budget  # doctest: +SKIP
    4

- ``proxy``: no model; trial ``i`` is the proxy allocation at a budget share from a van der
  Corput sequence in log scale between the whole budget and `Space.min_share` (1, 0.22, 0.47,
  0.11, …), so its trials trace the proxy's own front, cheap end included.
- ``random``: uniform sampling, unseeded: the honest baseline.
- ``nsga2``, ``tpe`` (multivariate), ``gp``: optuna's samplers; ``gp`` is the default with a
  task (`DEFAULT`): on MiniLM + SST-2 it reached the best hypervolume early (RESULTS.md).
- ``botorch``: `QLogNEHVISampler`, a GP on the metric only with the exact costs as known
  objectives.

Model-based strategies (`seeded`) start from the proxy plans, enqueued by `enqueue_seeds`.
Limits other than params (which every space meets by construction) reach optuna's samplers as
trial constraints, ``cost - limit <= 0``, recorded by `Space.suggest`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from peftplan.planner.botorch_sampler import WARMUP, QLogNEHVISampler
from peftplan.planner.space import Space

STRATEGIES = ("proxy", "random", "nsga2", "tpe", "gp", "botorch")
DEFAULT = "gp"  # with a task: the strategy benchmarks/search.py found best early (RESULTS.md)
SEEDED = frozenset({"nsga2", "tpe", "gp", "botorch"})
POPULATION = 8  # NSGA-II generation size: a 32-trial study sees four generations


def seeded(strategy: str) -> bool:
    """Whether ``strategy`` starts from the proxy plans (model-based ones do; ``random`` stays
    the unseeded baseline and ``proxy`` makes nothing else).

    >>> seeded("tpe"), seeded("random")
    (True, False)
    """
    _check(strategy)
    return strategy in SEEDED


def make_sampler(strategy: str, space: Space, *, seed: int, constraints: Mapping[str, float] | None = None,
                 warmup: int = WARMUP, **options: Any) -> BaseSampler:  # fmt: skip
    """The sampler for ``strategy`` over ``space``.

    ``constraints`` maps cost names (``"params"``, ``"memory"``, ``"latency"``) to upper limits,
    None taking ``space.limits``: botorch drops candidates beyond them; optuna's samplers read
    the constraints `Space.suggest` records, so for them the limits belong on the space.
    ``warmup``: random trials before a model-based sampler fits (NSGA-II: its first generation
    is ``options.get("population_size", POPULATION)``). ``options`` go to the sampler's
    constructor.

    >>> make_sampler("tpe", space, seed=0)  # doctest: +SKIP
    <optuna.samplers._tpe.sampler.TPESampler object at …>
    """
    _check(strategy)
    limits = dict(space.limits if constraints is None else constraints)
    if strategy in ("nsga2", "tpe", "gp") and limits != space.limits:
        raise ValueError(f"{strategy} reads the limits Space.suggest records on each trial; give "
                         f"limits={limits} to the Space, not to make_sampler")
    if strategy == "proxy":
        return ProxySampler(space)
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed, **options)
    if strategy == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **{"population_size": POPULATION, **options})
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=warmup, **options)
    if strategy == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=warmup,
                                         **{"warn_independent_sampling": False, **options})  # fmt: skip
    return QLogNEHVISampler(space, seed=seed, constraints=limits, warmup=warmup, **options)


def enqueue_seeds(study: Study, space: Space, strategy: str, n: int) -> int:
    """Enqueue ``n`` proxy plans (`Space.seeds`) when ``strategy`` is `seeded`; how many were.

    Call it once, on a new study: a resumed one has them already.
    """
    if not seeded(strategy) or n <= 0:
        return 0
    for params in space.seeds(n):
        study.enqueue_trial(params, skip_if_exists=True)
    return n


class ProxySampler(BaseSampler):
    """Trial ``i`` gets ``space.proxy_params(share(i, space.min_share))``: no model, no
    randomness."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        params = self.space.proxy_params(share(trial.number, self.space.min_share))
        return {k: v for k, v in params.items() if k in search_space}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
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


def _check(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; available: {list(STRATEGIES)}")
