"""The ``proxy`` strategy as an optuna sampler: trial ``i`` is the proxy allocation at the
``i``-th budget share of a log-scale van der Corput sequence."""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from ..space.base import Space


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
