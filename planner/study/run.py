"""Multi-objective search as an optuna study that survives crashes and is shared by workers.

    >>> from collections import Counter
    >>> from peftplan.planner.study import halving_rungs
    >>> model, task = tiny_bert(), tiny_task()
    >>> rungs = halving_rungs(Fidelity(steps=9, train_batches=3), rungs=2)  # 3 steps on 1 batch, then 9 on 3
    >>> plan = run_search(model, "5%", task, strategy="nsga2", trials=3, storage="sqlite:///study.db", fidelities=rungs,
    ...                   recipe=Recipe(lr=5e-3, steps=9), seeds=0, refine=0, progress=False)
    >>> plan.provenance["rung"], sorted(plan.objectives)  # chosen at the top rung
    (1, ['metric', 'params'])
    >>> plan.objectives["params"] <= Budget(params="5%").param_limit(sum(p.numel() for p in model.parameters()))
    True
    >>> def trainings():
    ...     study = optuna.load_study(study_name=plan.provenance["study"], storage="sqlite:///study.db")
    ...     return sorted(Counter(t.user_attrs["rung"] for t in study.trials if t.state.is_finished()).items())
    >>> trainings()  # three screened at a third of the recipe (1 run): the cap of 3 runs leaves 2 full runs
    [(0, 3), (1, 2)]
    >>> plan = run_search(model, "5%", task, strategy="nsga2", trials=4, storage="sqlite:///study.db", fidelities=rungs,
    ...                   recipe=Recipe(lr=5e-3, steps=9), seeds=0, refine=0, progress=False)
    >>> trainings()  # the same study, one more trial: only that one ran (its screen ranked below the two)
    [(0, 4), (1, 2)]

Each trial evaluates one plan of the `Space` at one rung of `fidelities` (successive
halving, see `peftplan.planner.study.halving`); `trials` counts completed rung-0 trials, so calling
again with the same storage and study name after a crash runs only what is left. A trial
killed outright stops sending heartbeats and is re-queued with the same parameters.

The study's user_attrs hold its `StudyConfig` — with a `Source` (model spec and task folder)
when started from the command line — so `run_worker(storage)` on another machine rebuilds
the model, task and space and takes its share of the trials.

`run_search`'s options: the default space is `default_space` over ``objectives`` and ``methods``,
with the proxy's ``proxy`` options (sites, scores, rank cap, fully trained sites) and ``graph`` (the
model's lowering, when already at hand); a given ``space`` brings all of that itself, with its own
objectives and limits (its ``limits``: plans over them are never trained). ``seeds`` seed plans
start seeded strategies: first the swept baseline (`Space.baselines`: uniform LoRA on
query/value) at three learning rates, then proxy plans at smaller budget shares; where the sweep
screens best at its highest (lowest) rate it goes on once, half its spacing (1.58x) beyond
(`peftplan.planner.study.policy.EXTEND`); once the sweep is screened, the other baselines
(`Space.followers`: LoRA on every linear layer, the one-shot allocations) are screened once each
at its best rate (the default 5 seeds and 3 followers leave 8 of 16 screens to the sampler, 7
where the sweep is extended). ``propose`` says where those proposals lie: "budget" (the
default) at the whole budget and at the rate the swept baseline screened best at, the sampler
choosing the allocation, and a proposal that repeats a screened plan pruned untrained, the next
one drawn at random (`peftplan.planner.study.policy.explore_next`); "front" every knob the
sampler's, the rate and the budget share included (`peftplan.planner.study.policy.proposal_knobs`).
``runs`` caps what the search costs, in final-run equivalents (trainings
weighted by their share of the recipe's steps; default 3, about one learning-rate sweep of one
placement): the top rung trains what the cap leaves once the screens and refinements are paid
(`peftplan.planner.study.halving.top_slots`; 16 screens at 5% leave 2 full runs): the
best-screened baseline and the best-screened searched candidate, then by turns (`mixed`, each
kind by the screened first objective); ``runs=None`` lifts the cap, and then the best rate
of each baseline goes on to every rung whatever its rank, beside 1/``eta`` of the others. Every trial trains by ``recipe``
(default `Recipe()`) compressed to its rung's `Fidelity`, at the learning rate the default space
searches in ``lr_range`` ("auto": a tenth to ten times ``recipe.lr``, log scale — tuned LoRA
baselines end 3-12x above a 1e-3 recipe —; None: ``recipe.lr`` for all); ``fidelities`` (default
`default_rungs`: 5% of the recipe, then the full recipe) are the rungs of successive halving by
``eta``, promotion ranking candidates by ``screen_by`` ("loss": the validation loss, which ranks
short runs like their final results where the metric does not yet, benchmarks/fidelity.py; or
"metric"; a screen tells the sampler the same signal, its measured metric kept with the trial:
`peftplan.planner.study.policy.told`), the returned plan chosen by the metric at the top rung, after the best plan there is
trained ``refine`` more times at the full recipe at neighbouring learning rates (2.5x up, or down,
from the best so far, see `peftplan.planner.study.policy.next_rate`; default 0: in the four
searches of benchmarks/RESULTS.md none of the eight refinements beat the rate it refined); the returned plan carries its recipe (`Plan.recipe`). Candidates are scored
on ``task.validation_batches``, never on its evaluation batches; ``threads`` sets torch's thread
count for each trial; ``source`` records how workers rebuild the model and task (without it, none
can join). Trials train on ``device`` (None: CUDA when available, else the CPU; each trial's copy of
the model moves there, ``model`` stays where it is), with ``bf16`` autocast or not and gradient
``checkpointing`` or not; these are this process's choice, not the study's: each worker gives its
own, and so is ``trial_timeout``, the seconds a trial may run before it is stopped and recorded as
failed (None: no limit; `peftplan.planner.study.watch`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import optuna
import torch.nn as nn

from ...backends.base import DEFAULT_METHODS
from ...ir.site import SiteGraph
from ...plan import Plan
from ...recipe import Recipe
from ..budget import Budget
from ..front import ParetoFront
from ..proxy.options import ProxyOptions
from ..space.default import default_space
from ..strategies import seeded
from ..training.device import check_bf16, resolve
from ..training.evaluate import Fidelity, evaluate
from ..training.task import Task
from .config import ATTR, PROPOSALS, Source, StudyConfig, StudyError, stored_plan
from .engine import Context, Evaluator, work
from .halving import default_rungs
from .policy import EXTEND, front_of, one_standard_error
from .storage import (
    check_url,
    damaged,
    only_study,
    open_storage,
    open_study,
    resumed_config,
    stored_config,
    writing,
)
from .watch import check_timeout


def run_search(
    model: nn.Module,
    budget: Budget | int | str,
    task: Task,
    *,
    strategy: str,
    trials: int,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    objectives: Iterable[str] = ("metric", "params"),
    fidelities: Iterable[Fidelity] | None = None,
    eta: int = 3,
    space: Any = None,
    progress: bool = True,
    recipe: Recipe | None = None,
    seeds: int = 5,
    methods: Iterable[str] = DEFAULT_METHODS,
    proxy: ProxyOptions | None = None,
    graph: SiteGraph | None = None,
    threads: int | None = None,
    source: Source | None = None,
    evaluator: Evaluator = evaluate,
    heartbeat: int = 30,
    lr_range: tuple[float, float] | str | None = "auto",
    screen_by: str = "loss",
    refine: int = 0,
    runs: float | None = 3.0,
    propose: str = "budget",
    device: str | Any = None,
    bf16: bool = False,
    checkpointing: bool = False,
    trial_timeout: float | None = None,
) -> Plan:
    """Search ``space`` with an optuna ``strategy`` for ``trials`` completed candidates; return the best plan within
    budget, with ``plan.front``. The module docstring describes the options.

    >>> plan = run_search(tiny_bert(), "5%", tiny_task(), strategy="tpe", trials=2, recipe=Recipe(lr=5e-3, steps=6),
    ...                   fidelities=[Fidelity()], seeds=2, refine=1, progress=False)
    >>> plan.provenance["strategy"], plan.recipe.steps
    ('tpe', 6)
    >>> plan.front.to_csv("front.csv").name
    'front.csv'
    >>> len(open("front.csv").read().splitlines()) == 1 + len(plan.front)  # a header, a row per point
    True
    """
    budget, trial_timeout = Budget.coerce(budget), check_timeout(trial_timeout)
    fidelities = tuple(fidelities) if fidelities is not None else default_rungs()
    _check_settings(trials, refine, screen_by, propose, fidelities, task, evaluator)
    methods, proxy, recipe = tuple(methods), proxy or ProxyOptions(), recipe or Recipe()
    space = _search_space(space, model, budget, task, seed, objectives, methods, proxy, graph, lr_range, recipe)
    evaluator = placed(evaluator, model, device, bf16, checkpointing)
    options = (strategy, trials, fidelities, eta, seed, seeds, methods, source, screen_by, refine, propose)
    config = _capped(_study_config(space, budget, recipe, proxy, *options), runs)
    name, store = study_name or config.default_name(task, model), open_storage(storage, heartbeat=heartbeat)
    config = resumed_config(store, name, config)
    with writing(store, name):
        study = open_study(store, name, config, space)
        work(study, Context(config, model, task, space, evaluator, threads, trial_timeout), progress=progress)
        return best_plan(study, task)


def _search_space(
    space: Any,
    model: nn.Module,
    budget: Budget,
    task: Task,
    seed: int,
    objectives: Iterable[str],
    methods: tuple[str, ...],
    proxy: ProxyOptions,
    graph: SiteGraph | None,
    lr_range: tuple[float, float] | str | None,
    recipe: Recipe,
) -> Any:
    """``space`` as given, or the default space of the proxy options, graph and learning-rate range."""
    if space is None:
        lr_range = (recipe.lr / 10, recipe.lr * 10) if lr_range == "auto" else lr_range
        return default_space(
            model,
            budget,
            task,
            seed=seed,
            objectives=objectives,
            methods=methods,
            proxy=proxy,
            graph=graph,
            lr=lr_range,
        )
    if proxy != ProxyOptions() or graph is not None or lr_range != "auto":
        raise ValueError(
            "a given space brings its own sites, scores, fully trained modules and learning-rate knob: the "
            f"proxy options {proxy.to_dict()}, graph and lr_range apply only to the default space; drop them "
            "or the space"
        )
    return space


def _study_config(
    space: Any,
    budget: Budget,
    recipe: Recipe,
    proxy: ProxyOptions,
    strategy: str,
    trials: int,
    fidelities: tuple[Fidelity, ...],
    eta: int,
    seed: int,
    seeds: int,
    methods: tuple[str, ...],
    source: Source | None,
    screen_by: str,
    refine: int,
    propose: str,
) -> StudyConfig:
    """What the study stores so that restarts and workers agree: the space's objectives and limits, the options."""
    return StudyConfig(
        strategy,
        trials,
        tuple(space.objectives),
        dict(space.objectives),
        fidelities,
        {k: float(v) for k, v in space.limits.items()},
        budget.to_dict(),
        eta,
        seed,
        recipe.to_dict(),
        seeds,
        methods,
        proxy.to_dict(),
        source,
        space.lr,
        screen_by,
        refine,
        tell="screened",
        propose=propose,
        extend=EXTEND,
        followers=tuple(
            {"baseline": name, "params": params}
            for name, params in (space.followers() if seeded(strategy) and seeds else ())
        ),
    )


def _check_settings(
    trials: int,
    refine: int,
    screen_by: str,
    propose: str,
    fidelities: tuple[Fidelity, ...],
    task: Task,
    evaluator: Evaluator,
) -> None:
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a count of top-rung trainings >= 0 (0: none), got {refine!r}")
    if screen_by not in ("metric", "loss"):
        raise ValueError(f"screen_by must be 'metric' or 'loss', got {screen_by!r}")
    if propose not in PROPOSALS:
        raise ValueError(f"propose must be 'budget' or 'front', got {propose!r}")
    if not fidelities:
        raise ValueError("fidelities is empty: give at least one Fidelity")
    if evaluator is evaluate and not task.validation_batches:  # another evaluator brings its own validation data
        raise ValueError(
            f"task {task.name!r} has no validation batches: a search scores candidates on a validation "
            "split carved from the training data, never on the evaluation split; build the task with "
            "validation=0.2 (or task.with_validation(0.2))"
        )


def _capped(config: StudyConfig, runs: float | None) -> StudyConfig:
    """``config`` with its cost cap ``runs``, once that is a positive number (or None) leaving the
    top rung at least one candidate (else a ValueError saying what the cap leaves)."""
    if runs is not None and (isinstance(runs, bool) or not isinstance(runs, (int, float)) or not runs > 0):
        raise ValueError(
            f"runs is the search's cost cap in final-run equivalents, a positive number or None; got {runs!r}"
        )
    config = replace(config, runs=runs)
    config.top_slots()
    return config


def run_worker(
    storage: str | optuna.storages.BaseStorage,
    study_name: str | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
    evaluator: Evaluator = evaluate,
    heartbeat: int = 30,
    allow: Iterable[str] = (),
    device: str | Any = None,
    bf16: bool = False,
    checkpointing: bool = False,
    trial_timeout: float | None = None,
) -> Plan:
    """Join a study started by ``peftplan search`` (on this machine or another): rebuild its
    model, task and space from the stored `Source` and take trials until it is done.

    The database does not choose what code runs: a `Source` naming a ``package.module:factory``
    (model or space) is refused unless that spec is in ``allow`` (`StudyError` saying so).
    ``device``, ``bf16``, ``checkpointing`` and ``trial_timeout`` as in `run_search`: one worker per GPU
    (``device="cuda:1"``) puts every GPU of a machine on one study.

    ``run_worker("postgresql://host/db", "sst2-nsga2-1a2b3c4d", device="cuda:1")`` joins a shared
    study on a second GPU. Below, a study of a tiny classifier on a CSV file, started with its
    `Source`; a worker joining it once it is done trains nothing and returns the same plan:

    >>> from pathlib import Path
    >>> char_tokenizer().save_pretrained("tokenizer")  # doctest: +ELLIPSIS
    (...)
    >>> rows = ["text,label"] + [f"{'a good' if i % 2 else 'a dull'} film {i},{i % 2}" for i in range(40)]
    >>> _ = Path("reviews.csv").write_text("\\n".join(rows))
    >>> source = Source("tests.zoo:bert_classifier", "reviews.csv", tokenizer="tokenizer", batch_size=8)
    >>> model, task = source.load()
    >>> plan = run_search(model, "5%", task, strategy="random", trials=2, storage="sqlite:///study.db", source=source,
    ...                   recipe=Recipe(lr=5e-3, steps=6), fidelities=[Fidelity()], seeds=2, refine=0, progress=False)
    >>> run_worker("sqlite:///study.db", progress=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    peftplan.planner.study.config.StudyError: study '...' asks its workers to import and run ['tests.zoo:bert_classifier']; ...
    >>> joined = run_worker("sqlite:///study.db", allow=["tests.zoo:bert_classifier"], progress=False)
    >>> joined.sites == plan.sites, joined.objectives == plan.objectives
    (True, True)
    """
    trial_timeout = check_timeout(trial_timeout)
    if isinstance(storage, str):
        check_url(storage, exists=True, writable=True)
    store = open_storage(storage, heartbeat=heartbeat)
    name = study_name or only_study(store)
    config = _worker_config(store, name)
    config.source.check_trusted(allow, name)
    model, task = config.source.load()
    evaluator = placed(evaluator, model, device, bf16, checkpointing)
    space = config.source.build_space(model, task, config)
    worker_seed = config.seed + 1 + os.getpid()  # workers must not replay the coordinator's proposals
    context = Context(config, model, task, space, evaluator, threads, trial_timeout)
    with writing(store, name):
        study = open_study(store, name, config, space, worker_seed, worker=True)
        work(study, context, progress=progress, joining=True)
        return best_plan(study, task)


def _worker_config(store: optuna.storages.BaseStorage, name: str) -> StudyConfig:
    """The stored config of study ``name`` (waited for), which must name a `Source` workers rebuild from."""
    _wait_for_config(store, name)
    config = stored_config(store, name)
    if config.source is None:
        raise StudyError(
            f"study {name!r} was started from Python objects, so workers cannot rebuild its model: "
            "start it with `peftplan search` (or run_search(source=Source(...)))"
        )
    return config


def placed(evaluator: Evaluator, model: nn.Module, device: Any, bf16: bool, checkpointing: bool = False) -> Evaluator:
    """``evaluator`` training on ``device`` with ``bf16`` and ``checkpointing``, checked now (a
    device this machine lacks is one error, not a failed trial each); a loop of the user's own
    places the model itself."""
    if evaluator is not evaluate:
        if device is not None or bf16 or checkpointing:
            raise ValueError(
                "device, bf16 and checkpointing are for peftplan's own trainer; your evaluate function "
                "places and casts the model itself (a Trainer by its TrainingArguments): drop them"
            )
        return evaluator
    device = resolve(device, model)
    if bf16:
        check_bf16(device, model)
    return functools.partial(evaluate, device=device, bf16=bf16, checkpointing=checkpointing)


def _wait_for_config(storage: optuna.storages.BaseStorage, name: str, seconds: float = 30.0) -> None:
    """A coordinator creates its study, then stores its config: a worker started at the same
    moment waits for the config (``seconds`` at most; then `stored_config` says what is missing)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ATTR in optuna.load_study(study_name=name, storage=storage).user_attrs:
                return
        except KeyError:  # not created yet either
            pass
        time.sleep(0.25)


def study_front(storage: optuna.storages.BaseStorage | str, study_name: str | None = None) -> ParetoFront:
    """The front of a stored study (its highest completed rung), plans included.

    >>> plan = run_search(tiny_bert(), "5%", tiny_task(), strategy="random", trials=2, storage="sqlite:///study.db",
    ...                   recipe=Recipe(lr=5e-3, steps=6), fidelities=[Fidelity()], seeds=2, refine=0, progress=False)
    >>> front = study_front("sqlite:///study.db")  # the only study there
    >>> front.senses, [p.values for p in front.points] == [p.values for p in plan.front.points]
    ({'metric': 'max', 'params': 'min'}, True)
    """
    if isinstance(storage, str):
        check_url(storage, exists=True)
        storage = open_storage(storage, writable=False)  # a file that is not a database is said as such
    name = study_name or only_study(storage)
    config = stored_config(storage, name)
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        return front_of(study.get_trials(deepcopy=False), config)
    except StudyError as e:  # a trial's stored plan, edited by hand
        raise damaged(storage, name, e) from None


def best_plan(study: optuna.Study, task: Task | None = None) -> Plan:
    """The best plan within budget of the study's front (highest first "max" objective),
    with ``plan.front`` set; the front's plans record ``task``'s class names (`Task.provenance`)."""
    try:
        config = StudyConfig.from_dict(study.user_attrs[ATTR])
        front = front_of(study.get_trials(deepcopy=False), config, task.metric_name if task is not None else None)
    except StudyError as e:
        raise damaged(study._storage, study.study_name, e) from None
    if not len(front):
        reasons = sorted(
            {
                t.user_attrs.get("failed", "killed")
                for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.FAIL
            }
        )
        if not reasons:
            raise StudyError(
                f"study {study.study_name!r}: no trial completed and none failed: plans over the limits "
                f"{config.limits} are never trained, so no plan the space proposed fits them; raise the "
                "limits (--memory, --latency, --adapter-bytes) or the budget"
            )
        raise StudyError(f"study {study.study_name!r}: no trial completed; failures: {reasons[:5]}")
    for point in front.points:
        if point.plan is not None and task is not None:
            point.plan.provenance.update(task.provenance())
    within = {k: v for k, v in config.limits.items() if k in front.senses}
    best = front.best(within=within)
    plan = replace(best.plan)
    steadier = _steadier(study, config, best.info["trial"], task)
    if steadier is not None:
        kept = stored_plan(steadier)
        task_said = task.provenance() if task is not None else {}
        plan = replace(kept, provenance={**kept.provenance, **task_said, **steadier_note(steadier, plan)})
        front.picked = steadier.number
    plan.front = front
    return plan


def _steadier(
    study: optuna.Study, config: StudyConfig, best: int, task: Task | None
) -> optuna.trial.FrozenTrial | None:
    """`one_standard_error`'s baseline instead of the searched best, where ``task``'s metric is a share of its
    validation examples."""
    examples = task.proportion_of() if task is not None else None
    return one_standard_error(study.get_trials(deepcopy=False), config, best, examples) if examples else None


def steadier_note(trial: optuna.trial.FrozenTrial, searched: Plan) -> dict[str, str]:
    """What a plan returned by the one-standard-error rule records of the pick."""
    mine, theirs = trial.user_attrs.get("measured", trial.values)[0], searched.objectives.get("metric")
    return {
        "pick": f"baseline {trial.user_attrs['baseline']!r} (trial {trial.number}, {mine:.4g}) within one standard "
        f"error of the searched best ({theirs:.4g}), which validation does not tell apart from it"
    }
