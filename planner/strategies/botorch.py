"""`QLogNEHVISampler`: botorch's qLogNEHVI as an optuna sampler, modelling only what is unknown.

Of a plan's objectives only the task metric needs training; its params (and memory, latency)
are exact and free (`Space.costs`). So one `SingleTaskGP` models the metric over the knobs
(each normalised to [0, 1]: floats and ints linearly or in log space, categoricals by index),
and the costs join it as a deterministic model (`GenericDeterministicModel` in a `ModelList`)
that looks them up on the points it is asked about. Limits are hard: infeasible candidates are
dropped before the acquisition sees them. The acquisition,
`qLogNoisyExpectedHypervolumeImprovement`, is maximised over a discrete set: Sobol points in
the knob space plus perturbations of the non-dominated trials, snapped to valid knob values.

    >>> from peftplan.planner.space import default_space
    >>> space = default_space(tiny_bert(), 5_000, None)
    >>> sampler = QLogNEHVISampler(space, seed=0, reference={"metric": 0.5})
    >>> study = optuna.create_study(directions=space.directions, sampler=sampler)
    >>> [d.name for d in study.directions]
    ['MAXIMIZE', 'MINIMIZE']

Reference point (all objectives maximised): the metric at ``reference["metric"]`` (e.g. chance
accuracy) or else the worst observed metric less 5% of the observed range; each cost at its
limit, or 10% beyond the largest observed without one. Until ``warmup`` trials completed, and
whenever fitting fails, trials are sampled at random. Failed trials are ignored; pending ones
(other workers') are not yet taken into account.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from ..space import Space

WARMUP = 5  # completed trials before any model fits (for every model-based strategy)


class QLogNEHVISampler(BaseSampler):
    """qLogNEHVI over ``space``; see the module docstring. ``constraints`` maps cost names to
    upper limits (None: ``space.limits``); ``candidates`` Sobol points per trial, a quarter as
    many perturbations; ``mc_samples`` QMC samples; ``threads`` torch threads while fitting."""

    def __init__(
        self,
        space: Space,
        *,
        seed: int = 0,
        constraints: Mapping[str, float] | None = None,
        warmup: int = WARMUP,
        candidates: int = 256,
        mc_samples: int = 64,
        reference: Mapping[str, float] | None = None,
        threads: int = 1,
    ) -> None:
        self.space, self.seed, self.warmup = space, seed, warmup
        self.limits = dict(space.limits if constraints is None else constraints)
        self.candidates, self.mc_samples, self.threads = candidates, mc_samples, threads
        self.reference = dict(reference or {})
        self.knobs = space.distributions()
        self.costs = [k for k in space.objectives if k != "metric"]
        if not self.costs:
            raise ValueError(
                "qLogNEHVI needs a cost objective besides the metric, e.g. objectives=('metric', 'params')"
            )
        self._random = RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.knobs)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        metric = list(self.space.objectives).index("metric")
        done = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if set(self.knobs) <= set(t.params) and t.values and math.isfinite(t.values[metric])
        ]
        if len(done) < self.warmup or set(search_space) != set(self.knobs):
            return {}  # every knob sampled at random
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # inside the loop: workers may have changed it
        try:
            return self._propose(done, [t.values[metric] for t in done], trial.number)
        except (optuna.exceptions.OptunaError, RuntimeError, ValueError):
            return {}  # botorch's ModelFittingError is a RuntimeError; sample at random then
        finally:
            torch.set_num_threads(threads)

    def _propose(self, done: list[FrozenTrial], metric: list[float], number: int) -> dict[str, Any]:
        from botorch.optim import optimize_acqf_discrete
        from botorch.utils.multi_objective.pareto import is_non_dominated

        torch.manual_seed(self.seed + number)
        X = torch.tensor([self._encode(t.params) for t in done], dtype=torch.double)
        y = torch.tensor(metric, dtype=torch.double).unsqueeze(-1)
        costs_obs = [self.space.costs(t.params) for t in done]
        scale = {k: self.limits.get(k) or max(1e-12, *(c[k] for c in costs_obs)) for k in self.costs}

        def cost_rows(costs: list[dict[str, float]]) -> torch.Tensor:  # maximised, in units of the scale
            return torch.tensor([[-c[k] / scale[k] for k in self.costs] for c in costs], dtype=torch.double).reshape(
                len(costs), -1
            )

        ok = [all(c[k] <= v for k, v in self.limits.items()) for c in costs_obs]
        baseline = X[ok] if any(ok) else X  # the front to improve on: feasible trials only
        observed = torch.cat([y, cost_rows(costs_obs)], dim=-1)[ok if any(ok) else slice(None)]
        params, rows = self._candidates(baseline[is_non_dominated(observed)], number)
        feasible = self._feasible(params, rows, X)
        if not feasible:
            return {}
        choices = rows[[i for i, _ in feasible]]
        table = torch.cat([cost_rows(costs_obs), cost_rows([c for _, c in feasible])])
        acqf = self._acquisition(X, y, baseline, torch.cat([X, choices]), table)
        picked, _ = optimize_acqf_discrete(acqf, q=1, choices=choices)
        at = int(torch.cdist(picked, choices).argmin())
        return params[feasible[at][0]]

    def _feasible(self, params: list[dict[str, Any]], rows: torch.Tensor, X: torch.Tensor) -> list[tuple[int, dict]]:
        """(index, costs) of the candidates not tried yet (not a row of ``X``) whose costs are
        within the limits."""
        seen = {tuple(r) for r in X.numpy().round(9).tolist()}
        keep = [i for i, r in enumerate(rows.numpy().round(9).tolist()) if tuple(r) not in seen]
        feasible = []
        for i in keep:
            c = self.space.costs(params[i])
            if all(c[k] <= v for k, v in self.limits.items()):
                feasible.append((i, c))
        return feasible

    def _acquisition(
        self, X: torch.Tensor, y: torch.Tensor, baseline: torch.Tensor, keys: torch.Tensor, table: torch.Tensor
    ) -> Any:
        """qLogNEHVI over a GP of the metric fitted to (``X``, ``y``) and the costs, which are
        looked up: row ``i`` of ``table`` (maximised, scaled) holds the costs at point ``keys[i]``."""
        from botorch.acquisition.multi_objective.logei import (
            qLogNoisyExpectedHypervolumeImprovement,
        )
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.deterministic import GenericDeterministicModel
        from botorch.models.model import ModelList
        from botorch.models.transforms.outcome import Standardize
        from botorch.sampling import ListSampler, SobolQMCNormalSampler
        from botorch.sampling.index_sampler import IndexSampler
        from gpytorch.mlls import ExactMarginalLogLikelihood

        gp = SingleTaskGP(X, y, outcome_transform=Standardize(m=1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))

        def known(x: torch.Tensor) -> torch.Tensor:  # (..., d) → (..., n_costs), by nearest key
            at = torch.cdist(x.reshape(-1, x.shape[-1]), keys).argmin(-1)
            return table[at].reshape(*x.shape[:-1], table.shape[-1])

        model = ModelList(gp, GenericDeterministicModel(known, num_outputs=len(self.costs)))
        worst, spread = y.min().item(), (y.max() - y.min()).item()
        ref_metric = self.reference["metric"] if "metric" in self.reference else worst - 0.05 * spread
        ref = [ref_metric, *(-(1.0 if k in self.limits else 1.1) for k in self.costs)]
        shape = torch.Size([self.mc_samples])
        return qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref,
            X_baseline=baseline,
            prune_baseline=True,
            sampler=ListSampler(SobolQMCNormalSampler(shape, seed=self.seed), IndexSampler(shape, seed=self.seed)),
        )

    def _candidates(self, best: torch.Tensor, number: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """Sobol points and perturbations of ``best``, snapped to valid knobs; unique rows."""
        d = len(self.knobs)
        sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=self.seed + number).draw(self.candidates)
        gen = torch.Generator().manual_seed(self.seed + number)
        reps = max(1, self.candidates // (4 * max(1, len(best))))
        noise = 0.1 * torch.randn(len(best) * reps, d, generator=gen, dtype=torch.double)
        raw = torch.cat([sobol.double(), (best.repeat(reps, 1) + noise).clamp(0, 1)])
        params, rows, seen = [], [], set()
        for r in raw.tolist():
            p = self._decode(r)
            e = tuple(round(v, 9) for v in self._encode(p))
            if e not in seen:
                seen.add(e)
                params.append(p)
                rows.append(e)
        return params, torch.tensor(rows, dtype=torch.double)

    def _encode(self, params: Mapping[str, Any]) -> list[float]:
        out = []
        for name, dist in self.knobs.items():
            v = params[name]
            if isinstance(dist, CategoricalDistribution):
                out.append(dist.choices.index(v) / max(1, len(dist.choices) - 1))
            else:
                lo, hi, x = _span(dist, v)
                out.append(0.0 if hi == lo else (x - lo) / (hi - lo))
        return out

    def _decode(self, row: list[float]) -> dict[str, Any]:
        params = {}
        for (name, dist), u in zip(self.knobs.items(), row):
            if isinstance(dist, CategoricalDistribution):
                params[name] = dist.choices[round(u * (len(dist.choices) - 1))]
                continue
            lo, hi, _ = _span(dist, dist.low)
            x = lo + u * (hi - lo)
            v = float(np.exp(x)) if dist.log else x
            step = dist.step
            if step is not None:
                v = dist.low + round((v - dist.low) / step) * step
            if isinstance(dist, IntDistribution):
                v = int(round(v))
            params[name] = min(dist.high, max(dist.low, v))
        return params


def _span(dist: FloatDistribution | IntDistribution, value: float) -> tuple[float, float, float]:
    """Low, high and ``value`` where the knob is linear: in log space for log knobs."""
    f = math.log if dist.log else float
    return f(dist.low), f(dist.high), f(value)
