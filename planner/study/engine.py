"""`work`: what every process sharing a study runs — take the next trial, evaluate it, tell the
storage, and let the policy (`peftplan.planner.study.policy`) queue what comes next; wait for
the others; stop when the study is done.

Everything is read back from the storage on each turn, so any number of workers (and a
restart after a crash) see the same state. Besides the policy's user_attrs (``rung``,
``candidate``, ``baseline``, ``origin``, ``refines``), each trial carries ``costs`` (exact, before
training), ``plan`` (on completion), ``measured`` (its objective values where it told the sampler
others: `policy.told`), ``failed`` / ``infeasible`` / ``skipped`` (reasons),
``seconds`` (``train_seconds`` of them training), ``fidelity``, ``validation_loss``, ``worker``, ``reused`` (the trial whose result a
trial with the same plan took instead of training again) and ``interrupted`` (cut off by
Ctrl-C: `SearchInterrupted`, queued again on resume).

    >>> from peftplan.planner.space import default_space
    >>> from peftplan.planner.study import StudyConfig, open_storage, open_study
    >>> from peftplan.planner.training.evaluate import evaluate
    >>> model, task = tiny_bert(), tiny_task()
    >>> space = default_space(model, "5%", task)
    >>> config = StudyConfig("random", 2, tuple(space.objectives), dict(space.objectives), (Fidelity(),),
    ...                      {k: float(v) for k, v in space.limits.items()}, {"params": "5%"},
    ...                      recipe=Recipe(lr=5e-3, steps=6).to_dict(), seeds=0)
    >>> study = open_study(open_storage("sqlite:///study.db"), "tiny", config, space)
    >>> work(study, Context(config, model, task, space, evaluate), progress=False)  # evaluations it ran
    2
    >>> [t.state.name for t in study.trials]
    ['COMPLETE', 'COMPLETE']
    >>> sorted(study.trials[0].user_attrs)
    ['candidate', 'costs', 'fidelity', 'plan', 'rung', 'seconds', 'train_seconds', 'validation_loss', 'worker']
    >>> work(study, Context(config, model, task, space, evaluate), progress=False)  # a restart: nothing left to run
    0
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import optuna
import torch
import torch.nn as nn
from optuna.trial import FrozenTrial, TrialState

from ...plan import Plan, provenance
from ...recipe import Recipe
from ..training.evaluate import Evaluation, Fidelity
from ..training.task import Task
from .display import StudyDisplay
from .policy import (
    DUPLICATE,
    REPEAT,
    explore_next,
    measured,
    next_step,
    proposal_knobs,
    rung_of,
    surplus,
    told,
    workload,
)
from .watch import watched

MAX_STALLS = 50  # asks in a row that gave nothing to train (duplicates, over budget, no site)

Evaluator = Callable[..., Evaluation]


@dataclass
class Context:
    """What one worker evaluates with; ``config`` is the study's `StudyConfig`."""

    config: Any
    base: nn.Module
    task: Task
    space: Any
    evaluator: Evaluator
    threads: int | None = None
    trial_timeout: float | None = None  # seconds a trial may run (`watch.watched`); None: no limit


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search: the trial it cut off is marked ``interrupted`` (queued again
    when the search resumes); ``done`` of ``total`` trainings are in the storage."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped after {done} of {total} trainings; rerun the same command to resume")
        self.done, self.total = done, total


def work(study: optuna.Study, ctx: Context, *, progress: bool = True, poll: float = 1.0, joining: bool = False) -> int:
    """Run trials of ``study`` until it holds ``config.trials`` completed rung-0 trials and
    every promotion is evaluated; returns how many evaluations this worker ran. It gives up,
    with a warning, once as many of its evaluations failed as the study wants (at least 3).
    On Ctrl-C it marks the trial it was running and raises `SearchInterrupted`. ``progress``:
    a bar on a terminal, else a line per finished trial; a study with trainings done already
    says so first ("resuming", or "joining" for a worker)."""
    display = StudyDisplay(progress, ctx.config, ctx.task, study, "joining" if joining else "resuming")
    held: list[optuna.Trial] = []  # the trial this worker is running, for an interrupt to mark
    try:
        return _loop(study, ctx, display, held, poll)
    except KeyboardInterrupt:
        _mark_interrupted(study, held)
        done = workload(ctx.config, study.get_trials(deepcopy=False))
        raise SearchInterrupted(done.done, done.total) from None
    finally:
        display.close()


def _loop(study: optuna.Study, ctx: Context, display: StudyDisplay, held: list[optuna.Trial], poll: float) -> int:
    evaluations = failures = stalls = 0
    while True:
        fail_dead_trials(study)  # a dead worker's trial → FAIL, re-queued
        trials = study.get_trials(deepcopy=False)
        step = next_step(study, trials, ctx.config)
        display.show(trials, final=step == "done")
        if step == "done":
            return evaluations
        if step == "wait":
            time.sleep(poll)
            continue
        outcome = _run_one(study, ctx, held)
        evaluations += outcome in ("trained", "failed")
        failures += outcome == "failed"
        if failures >= max(3, ctx.config.trials):
            reasons = sorted(
                {t.user_attrs["failed"] for t in study.get_trials(deepcopy=False) if "failed" in t.user_attrs}
            )
            warnings.warn(
                f"study {study.study_name!r}: {failures} evaluations failed ({reasons[:3]}), stopping this "
                "worker; fix the cause and run it again to go on",
                stacklevel=3,
            )
            return evaluations
        stalls = stalls + 1 if outcome == "skipped" else 0
        if outcome == "surplus":  # another worker holds the slot: let it get on
            time.sleep(poll / 10)
        if stalls >= MAX_STALLS:
            warnings.warn(
                f"study {study.study_name!r}: {stalls} proposals in a row were duplicates, over "
                "budget or placed no site; the space looks exhausted, stopping this worker",
                stacklevel=3,
            )
            return evaluations


def _mark_interrupted(study: optuna.Study, held: list[optuna.Trial]) -> None:
    """Fail the trial an interrupt cut off, marked ``interrupted``: the policy queues it again
    (`policy.next_step`) rather than counting it failed for good."""
    if not held:
        return
    trial = held[-1]
    if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def fail_dead_trials(study: optuna.Study) -> None:
    """optuna's ``fail_stale_trials``, plus the trials whose worker died before their first
    heartbeat: optuna never counts those stale, so they would stay RUNNING (and the study
    would wait on them) forever. Both are failed and handed to the storage's retry callback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage = study._storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if interval is None:
        return
    backend = getattr(storage, "_backend", storage)
    grace = getattr(backend, "grace_period", None) or 2 * interval
    silent = _without_heartbeat(backend, study._study_id)
    now = datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial._trial_id in silent and trial.datetime_start and now - trial.datetime_start > timedelta(seconds=grace):
            try:
                if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
                continue
            callback = storage.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def _without_heartbeat(backend: Any, study_id: int) -> set[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat (RDB storages)."""
    if not isinstance(backend, optuna.storages.RDBStorage):
        return set()
    from optuna.storages._rdb import models
    from sqlalchemy import orm

    with orm.Session(backend.engine) as session:
        running = (
            session.query(models.TrialModel)
            .options(orm.selectinload(models.TrialModel.heartbeats))
            .filter(models.TrialModel.state == TrialState.RUNNING, models.TrialModel.study_id == study_id)
            .all()
        )
        return {t.trial_id for t in running if not t.heartbeats}


def _run_one(study: optuna.Study, ctx: Context, held: list[optuna.Trial]) -> str:
    """Ask one trial and settle it: "trained", "failed" (FAIL, with the reason), "surplus" or
    "skipped" (a duplicate, over budget or placing no site; PRUNED untrained, with the reason); the trial
    is put in ``held`` while it is this worker's."""
    config = ctx.config
    trial, built = _ask(study, ctx, held)
    fresh = "rung" not in trial.user_attrs  # sampled now, not enqueued (seed, promotion, retry)
    r = int(trial.user_attrs.get("rung", 0))
    trial.set_user_attr("rung", r)
    trial.set_user_attr("candidate", int(trial.user_attrs.get("candidate", trial.number)))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trials = study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    sampled = "fixed_params" not in me.system_attrs  # not queued by the policy, a seed or a user
    reason = surplus(trials, me, config)
    if reason:
        return _skip(study, trial, "skipped", reason, outcome="surplus")
    if isinstance(built, str):  # a plan the space cannot build is a failed trial, not a crash
        return _fail(study, trial, built)
    plan, costs = built
    skipped = _constrained(study, trial, costs, config.limits, fresh)
    if skipped:
        return skipped
    if not plan.sites:  # a budget share below the cheapest site's cost: nothing would train
        return _skip(study, trial, "skipped", "the plan places no site (its budget share is below any site's cost)")
    fidelity: Fidelity = config.fidelities[r]
    plan.recipe = ctx.space.recipe(
        trial.params, Recipe.from_dict(config.recipe)
    )  # the trial's learning rate, if searched
    same = _same_plan(study, trial.number, r, plan)
    if same is not None and sampled and config.propose == "budget":  # a proposal that adds nothing: the next explores
        return _skip(study, trial, "skipped", f"{REPEAT} {same.number}")
    if same is not None:  # other knobs, the same plan and recipe: its evaluation would repeat, not train it again
        return _reuse(study, trial, ctx, plan, same, r, fidelity)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)  # each trial, as libraries may reset it
    # heartbeats meanwhile, and the time limit: a trial past it comes back failed, with the reason
    result = watched(
        study._storage, trial._trial_id, ctx.trial_timeout, lambda: _evaluate(ctx, plan, fidelity, plan.recipe)
    )
    try:
        trial.set_user_attr("seconds", round(result.seconds, 3))
        if not result.ok:
            trial.set_user_attr("fidelity", str(fidelity))
            return _fail(study, trial, result.failed)
        if result.loss is not None:
            trial.set_user_attr("validation_loss", float(result.loss))
        if result.train_seconds is not None:
            trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        _complete(study, trial, ctx, plan, [float(v) for v in ctx.space.values(plan, result.metric)], r, fidelity)
    except optuna.exceptions.UpdateFinishedTrialError:  # heartbeats starved: another worker re-queued it
        warnings.warn(
            f"trial {trial.number} sent no heartbeat for a grace period, so it was failed and re-queued "
            "while it ran; its result is dropped (raise the heartbeat interval)",
            stacklevel=2,
        )
        return "surplus"
    return "trained"


def _reuse(
    study: optuna.Study, trial: optuna.Trial, ctx: Context, plan: Plan, same: FrozenTrial, rung: int, fidelity: Fidelity
) -> str:
    """Complete ``trial`` with the result of ``same`` (its measured values and validation loss, so
    it is screened and told like its twin), training nothing: "reused"."""
    trial.set_user_attr("reused", same.number)
    trial.set_user_attr("seconds", 0.0)
    if "validation_loss" in same.user_attrs:
        trial.set_user_attr("validation_loss", same.user_attrs["validation_loss"])
    values = list(measured(same, ctx.config).values())
    _complete(study, trial, ctx, plan, values, rung, fidelity, reused=same.number)
    return "reused"


def _ask(study: optuna.Study, ctx: Context, held: list[optuna.Trial]) -> tuple[optuna.Trial, Any]:
    """The next trial (put in ``held``) — a queued one as it was queued, else the sampler's
    proposal (a random one, ``origin`` "random", where `explore_next` says so) with the knobs
    `proposal_knobs` gives taken as they are (optuna's `PartialFixedSampler`, there while the
    space asks for every knob) — and its (plan, exact costs), or why the space could not build them."""
    sampler, trials = study.sampler, study.get_trials(deepcopy=False)
    given, explore = proposal_knobs(trials, ctx.config, ctx.space), explore_next(trials, ctx.config)
    with warnings.catch_warnings():  # heartbeats are sent around the evaluation; PartialFixedSampler is stable
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if explore:  # seeded by the study's seed and length: a rerun draws the same
            study.sampler = optuna.samplers.RandomSampler(seed=ctx.config.seed + len(trials))
        if given:
            study.sampler = optuna.samplers.PartialFixedSampler(given, study.sampler)
        try:
            trial = study.ask()
            held[:] = [trial]
            if explore:
                trial.set_user_attr("origin", "random")
            return trial, _build(ctx, trial)
        finally:
            study.sampler = sampler


def _build(ctx: Context, trial: optuna.Trial) -> tuple[Plan, dict[str, float]] | str:
    """``trial``'s plan (the space asks it for every knob) and exact costs, or why the space
    could not build them."""
    try:
        plan = ctx.space.suggest(trial)
        return plan, {k: float(v) for k, v in ctx.space.costs(trial.params).items()}
    except Exception as e:
        return f"building the plan: {type(e).__name__}: {e}"


def _constrained(
    study: optuna.Study, trial: optuna.Trial, costs: dict[str, float], limits: dict[str, float], fresh: bool
) -> str | None:
    """Record ``costs`` and optuna's constraints on ``trial``; "skipped" (PRUNED, with the
    reason) when a ``fresh`` proposal repeats a rung-0 trial's knobs or a cost is over its limit."""
    trial.set_user_attr("costs", costs)
    with warnings.catch_warnings():  # a re-queued trial carries its constraints already
        warnings.filterwarnings("ignore", "The constraint value is ignored")
        for k, limit in limits.items():  # optuna's constraints: feasible when <= 0
            trial.set_constraint(k, costs.get(k, 0.0) - limit)
    if fresh:
        twin = next(
            (
                t.number
                for t in study.get_trials(deepcopy=False)
                if t.number != trial.number
                and rung_of(t) == 0
                and t.state != TrialState.PRUNED
                and t.params == trial.params
            ),
            None,
        )
        if twin is not None:
            return _skip(study, trial, "skipped", f"{DUPLICATE} {twin}")
    over = {k: (costs[k], limit) for k, limit in limits.items() if k in costs and costs[k] > limit}
    if over:
        return _skip(
            study, trial, "infeasible", "; ".join(f"{k} {v:,.0f} > limit {lim:,.0f}" for k, (v, lim) in over.items())
        )
    return None


def _complete(
    study: optuna.Study,
    trial: optuna.Trial,
    ctx: Context,
    plan: Plan,
    values: list[float],
    rung: int,
    fidelity: Fidelity,
    **extra: Any,
) -> None:
    """Record ``plan`` with its objective ``values`` and provenance on ``trial``, and tell it."""
    config = ctx.config
    trial.set_user_attr("fidelity", str(fidelity))
    plan.objectives = dict(zip(config.objectives, values))
    plan.recipe = plan.recipe or Recipe.from_dict(config.recipe)  # how it was trained: the final run trains it so too
    plan.provenance = {
        **plan.provenance,
        **provenance(config.strategy, config.seed, ctx.task.name, ctx.base),
        "study": study.study_name,
        "trial": trial.number,
        "rung": rung,
        "fidelity": str(fidelity),
        **extra,
    }
    trial.set_user_attr("plan", plan.to_dict())
    tell = told(values, trial.user_attrs.get("validation_loss"), rung, config)
    if tell != values:  # the sampler learns what promotion ranks by; the measured values stay with the trial
        trial.set_user_attr("measured", values)
    study.tell(trial, tell, skip_if_finished=True)


def _same_plan(study: optuna.Study, number: int, rung: int, plan: Plan) -> FrozenTrial | None:
    """A completed trial of ``rung`` whose plan has the same sites and recipe as ``plan``. Many
    knob settings map to one plan (a rank cap above every allocated rank, a share that rounds
    to no site), and samplers propose them again; training is seeded, so the result would repeat."""
    mine = json.dumps([plan.sites, plan.recipe.to_dict() if plan.recipe else None], sort_keys=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        stored = t.user_attrs.get("plan", {})
        if (
            t.number != number
            and rung_of(t) == rung
            and json.dumps([stored.get("sites"), stored.get("recipe")], sort_keys=True) == mine
        ):
            return t
    return None


def _evaluate(ctx: Context, plan: Plan, fidelity: Fidelity, recipe: Recipe) -> Evaluation:
    start = time.perf_counter()
    try:
        return ctx.evaluator(ctx.base, plan, ctx.task, fidelity, recipe=recipe, seed=ctx.config.seed)
    except Exception as e:  # an evaluator that raises still only fails its trial
        return Evaluation(None, 0, time.perf_counter() - start, f"{type(e).__name__}: {e}"[:500])


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str | None) -> str:
    trial.set_user_attr("failed", reason or "unknown")
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    return "failed"


def _skip(study: optuna.Study, trial: optuna.Trial, key: str, reason: str, outcome: str = "skipped") -> str:
    trial.set_user_attr(key, reason)
    study.tell(trial, state=TrialState.PRUNED)
    return outcome
