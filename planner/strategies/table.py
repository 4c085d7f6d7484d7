"""Search strategies behind one interface: a table from a name to a `Strategy`, whose ``make``
builds an optuna sampler over a `Space`.

    >>> sorted(STRATEGIES)
    ['botorch', 'gp', 'nsga2', 'proxy', 'random', 'tpe']
    >>> STRATEGIES["tpe"].seeded, STRATEGIES["random"].seeded
    (True, False)

- ``proxy``: no model; trial ``i`` is the proxy allocation at a budget share from a van der
  Corput sequence in log scale between the whole budget and `Space.min_share` (1, 0.22, 0.47,
  0.11, …), so its trials trace the proxy's own front, cheap end included.
- ``random``: uniform sampling, unseeded: the honest baseline.
- ``nsga2``, ``tpe`` (multivariate), ``gp``: optuna's samplers; ``gp`` is the default with a
  task (`DEFAULT`): on MiniLM + SST-2 it reached the best hypervolume early (RESULTS.md).
- ``botorch``: `QLogNEHVISampler`, a GP on the metric only with the exact costs as known
  objectives.

Model-based strategies (``seeded``) start from the space's seed plans — its baselines (the
hand-written placements, the one-shot allocations) and proxy plans — enqueued by `enqueue_seeds`.
Limits other than params (which every space meets by construction) reach optuna's samplers as
trial constraints, ``cost - limit <= 0``, recorded by `Space.suggest`; botorch drops candidates
beyond them itself (``own_limits``). The table imports no optuna: each ``make`` does, when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler
    from optuna.study import Study

    from ..space.base import Space

DEFAULT = "gp"  # with a task: the strategy benchmarks/search.py found best early (RESULTS.md)
POPULATION = 8  # NSGA-II generation size: a 32-trial study sees four generations
WARMUP = 5  # completed trials before any model fits (for every model-based strategy)


@dataclass(frozen=True)
class Strategy:
    """``make(space, seed, limits, warmup, options)`` → sampler; ``seeded``: starts from the
    space's seed plans; ``own_limits``: the sampler enforces limits itself (else it reads the
    constraints `Space.suggest` records, so limits belong on the space)."""

    make: Callable[..., BaseSampler]
    seeded: bool
    own_limits: bool = False
    trains: bool = True


def _proxy(space, seed, limits, warmup, options):
    from .proxy import ProxySampler

    return ProxySampler(space)


def _random(space, seed, limits, warmup, options):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed, **options)


def _nsga2(space, seed, limits, warmup, options):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, **{"population_size": POPULATION, **options})


def _tpe(space, seed, limits, warmup, options):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=warmup, **options)


def _gp(space, seed, limits, warmup, options):
    import optuna

    return optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=warmup, **{"warn_independent_sampling": False, **options}
    )


def _botorch(space, seed, limits, warmup, options):
    from .botorch import QLogNEHVISampler

    return QLogNEHVISampler(space, seed=seed, constraints=limits, warmup=warmup, **options)


STRATEGIES: dict[str, Strategy] = {
    "proxy": Strategy(_proxy, seeded=False, own_limits=True, trains=False),
    "random": Strategy(_random, seeded=False),
    "nsga2": Strategy(_nsga2, seeded=True),
    "tpe": Strategy(_tpe, seeded=True),
    "gp": Strategy(_gp, seeded=True),
    "botorch": Strategy(_botorch, seeded=True, own_limits=True),
}


def get_strategy(name: str) -> Strategy:
    """The `Strategy` called ``name``; a ValueError lists the known ones otherwise."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {list(STRATEGIES)}")
    return STRATEGIES[name]


def seeded(strategy: str) -> bool:
    """Whether ``strategy`` starts from the proxy plans (model-based ones do; ``random`` stays
    the unseeded baseline and ``proxy`` makes nothing else).

    >>> seeded("tpe"), seeded("random")
    (True, False)
    """
    return get_strategy(strategy).seeded


def make_sampler(
    strategy: str,
    space: Space,
    *,
    seed: int,
    constraints: Mapping[str, float] | None = None,
    warmup: int = WARMUP,
    **options: Any,
) -> BaseSampler:
    """The sampler for ``strategy`` over ``space``.

    ``constraints`` maps cost names (``"params"``, ``"memory"``, ``"latency"``) to upper limits,
    None taking ``space.limits``; only a strategy with ``own_limits`` can take limits other
    than the space's. ``warmup``: random trials before a model-based sampler fits (NSGA-II: its
    first generation is ``options.get("population_size", POPULATION)``). ``options`` go to the
    sampler's constructor.

    >>> from peftplan.planner.space import default_space
    >>> type(make_sampler("tpe", default_space(tiny_bert(), 5_000, None), seed=0)).__name__
    'TPESampler'
    """
    entry = get_strategy(strategy)
    limits = dict(space.limits if constraints is None else constraints)
    if not entry.own_limits and limits != space.limits:
        raise ValueError(
            f"{strategy} reads the limits Space.suggest records on each trial; give "
            f"limits={limits} to the Space, not to make_sampler"
        )
    return entry.make(space, seed, limits, warmup, options)


def enqueue_seeds(study: Study, space: Space, strategy: str, n: int) -> int:
    """Enqueue up to ``n`` seed plans (`Space.seeds`: those that place a site) when
    ``strategy`` is seeded; how many were.
    The first ones, the space's `Space.baselines`, carry user_attr ``baseline`` (their name):
    they are promoted to every rung.

    Call it once, on a new study: a resumed one has them already.
    """
    if not seeded(strategy) or n <= 0:
        return 0
    names, seeds = space.baselines(), space.seeds(n)
    for i, params in enumerate(seeds):
        study.enqueue_trial(params, user_attrs={"baseline": names[i]} if i < len(names) else None, skip_if_exists=True)
    return len(seeds)
