"""`search`: model + budget (+ task) → `Plan`.

With a task, the default is a multi-objective search (``strategy="gp"``, optuna's GP sampler;
also ``botorch``, ``tpe``, ``nsga2``, ``random``) that trains candidate plans and returns the best one
within the budget, with ``plan.front`` holding the Pareto front (see `peftplan.planner.study`).

The ``proxy`` strategy (the default without a task) trains nothing: it scores each eligible site
(weight statistics with no task, grad² sensitivity with one) and allocates LoRA ranks under the
budget with `allocate` — the default space's point at the whole budget
(`peftplan.planner.strategies.proxy.proxy_plan`).

Both paths read one `ProxyOptions` (roles, max_rank, train_modules, calibration_batches,
sensitivity_power): the proxy allocates with it, and a task search builds its default space
from it, so the plans that seed the search are the proxy's plans. An option the chosen path
cannot use is an error, never silently dropped.

With a task the scores are grad² (Fisher mass) raised to ``sensitivity_power``. The mass
spans orders of magnitude across depth, so as-is (power 1) it puts most of the budget on a
few sites of the last layers; its square root (0.5, the default: the gradient's Frobenius
norm) keeps the ordering but spreads ranks over more sites, and trained better at equal
params on MiniLM (SST-2 +0.3 pt, MR +4.3 pt). 0 scores every site alike.

`search`'s other options: ``evaluate`` replaces peftplan's trainer in trials with your own
loop: ``fn(model, fidelity[, recipe])`` returning the metric or ``{"metric", "loss"}``
(`peftplan.planner.training.user_loop`), or a ready one such as
`peftplan.integrations.transformers.TrainerLoop`. Without a task, sites are scored from their
weights (Hill alpha); with one, by grad² on its first ``calibration_batches`` training batches,
raised to ``sensitivity_power``; ``calibration`` (your own batches instead of a task: dicts with
labels, a DataLoader; the first ``calibration_batches`` are read) gives grad² scores without a
peftplan task. ``train_modules`` (site names) are fully trained, their parameters paid from the
budget first; by default the model's new classification head
(`peftplan.planner.proxy.options.heads`). ``roles``, ``max_rank``: which sites get ranks and how
large (`ProxyOptions`). ``graph`` skips lowering.

    >>> plan = search(tiny_bert(), Budget(params="5%"))
    >>> plan.summary()
    'full: 1 site; lora: 12 sites, ranks 1–2 (params=1,762)'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn

from ..ir.site import SiteGraph
from ..plan import Plan
from .budget import Budget
from .proxy.options import ProxyOptions
from .strategies import DEFAULT, get_strategy
from .training.task import Task
from .training.user_loop import calibration_task, own_loop_options

# candidates a training strategy screens when not told: 16 x 5% + 2 full runs = 2.8 final runs (`runs`: 3)
TRIALS = 16


def search(
    model: nn.Module,
    budget: Budget | int | str,
    task: Task | None = None,
    *,
    strategy: str | None = None,
    seed: int = 0,
    graph: SiteGraph | None = None,
    roles: Iterable[str] | None = None,
    max_rank: int | None = None,
    train_modules: Iterable[str] | None = None,
    calibration_batches: int | None = None,
    sensitivity_power: float | None = None,
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    evaluate: Callable[..., Any] | None = None,
    calibration: Iterable[Any] | None = None,
    **study_options: Any,
) -> Plan:
    """A plan for ``model`` within ``budget`` (a `Budget`, an int count or ``"0.5%"``, ``"250k"``).

    ``strategy`` defaults to ``"gp"`` with a task or ``evaluate`` and ``"proxy"`` without. A training
    strategy runs ``trials`` (default 16) completed candidates in an optuna study (in memory
    unless ``storage`` is given; ``study_name`` resumes one) and passes ``study_options`` on to
    `peftplan.planner.study.run_search` (objectives, fidelities, methods, lr, ``device``,
    ``bf16``, …). The other options are described in the module docstring.

    >>> plan = search(tiny_bert(), 5_000, train_modules=["classifier"])
    >>> plan.sites["classifier"]["method"], plan.objectives["params"] <= 5_000
    ('full', True)
    """
    budget = Budget.coerce(budget)
    options = ProxyOptions.build(
        roles=roles,
        max_rank=max_rank,
        train_modules=train_modules,
        calibration_batches=calibration_batches,
        sensitivity_power=sensitivity_power,
    )
    task, study_options = _scoring_task(model, task, options, evaluate, calibration, study_options)
    can_train = evaluate is not None or (task is not None and calibration is None)  # a loop or a task trains candidates
    strategy = strategy or (DEFAULT if can_train else "proxy")
    study = {"trials": trials, "storage": storage, "study_name": study_name, **study_options}
    if not get_strategy(strategy).trains:
        _trains_nothing(strategy, study)
        from .strategies.proxy import proxy_plan  # optuna: loaded when a space is built

        return proxy_plan(model, budget, task, options, graph=graph, seed=seed)
    if not can_train:
        raise ValueError(
            f"strategy {strategy!r} trains candidate plans: pass task=... or evaluate=your_loop (calibration= "
            "batches only score sites); without either use strategy='proxy'"
        )
    return _run_study(model, budget, task, strategy, options, graph, seed, study)


def _run_study(
    model: nn.Module,
    budget: Budget,
    task: Task | None,
    strategy: str,
    options: ProxyOptions,
    graph: SiteGraph | None,
    seed: int,
    study: dict[str, Any],
) -> Plan:
    """A training strategy's search: an optuna study of ``trials`` (default `TRIALS`) candidates."""
    from .study import run_search  # optuna: loaded only when a search trains

    trials = study["trials"]
    rest = {k: v for k, v in study.items() if k != "trials"}
    trials = TRIALS if trials is None else trials
    return run_search(
        model, budget, task, strategy=strategy, trials=trials, seed=seed, proxy=options, graph=graph, **rest
    )


def _scoring_task(
    model: nn.Module,
    task: Task | None,
    options: ProxyOptions,
    evaluate: Callable[..., Any] | None,
    calibration: Iterable[Any] | None,
    study_options: dict[str, Any],
) -> tuple[Task | None, dict[str, Any]]:
    """The task that scores (and maybe trains) candidates, from ``calibration`` batches or ``evaluate``'s loop."""
    if calibration is not None:
        if task is not None:
            raise TypeError("give task= or calibration= (your own batches, scored in place of a task's), not both")
        task = calibration_task(calibration, options.calibration_batches)
    if evaluate is not None:
        task, study_options = own_loop_options(evaluate, task, study_options, model)
    return task, study_options


def _trains_nothing(strategy: str, options: dict[str, Any]) -> None:
    unused = sorted(k for k, v in options.items() if v is not None)
    if unused:
        raise TypeError(
            f"strategy {strategy!r} trains nothing, so it cannot use {unused}: drop them, or pass a task "
            f"and a training strategy (e.g. strategy={DEFAULT!r})"
        )
