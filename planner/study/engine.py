"""`work`: what every process sharing a study runs — take the next trial, evaluate it, tell the
storage; promote between rungs; wait for the others; stop when the study is done.

Everything is read back from the storage on each turn, so any number of workers (and a
restart after a crash) see the same state. Each trial carries user_attrs: ``rung``,
``candidate`` (the number of the candidate's rung-0 trial), ``costs`` (exact, before
training), ``plan`` (on completion), ``failed`` / ``infeasible`` / ``skipped`` (reasons),
``seconds``, ``fidelity``, ``validation_loss``, ``worker``, ``reused`` (the trial whose result a trial with the
same plan took instead of training again), and ``baseline`` on the seed plans a user would
write by hand and the one-shot allocations (`Space.baselines`), each screened at a few learning
rates: the best rate of each is promoted to every rung whatever its rank (and 1/eta of the
others), so the plan a search returns was compared with them at the top rung. Once the top
rung is settled, ``refines`` marks the trials that train its best plan again at the full
recipe at neighbouring learning rates (`next_rate`, ``config.refine`` of them at most): the
rate a plan is returned with is chosen on full-length results, not on the short screens,
which favour high rates (benchmarks/RESULTS.md).

Two workers may both decide to create the same trial (the last rung-0 slot, the same
promotion): trial numbers are handed out one at a time by the storage, so the rule "within a
slot group, the lowest-numbered live trials win" settles it — the loser is PRUNED as surplus
before it trains.

    >>> evaluations = work(study, context, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
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
from ..front import FrontPoint, ParetoFront
from ..training.evaluate import Evaluation, Fidelity
from ..training.progress import ProgressLine
from ..training.task import Task
from .config import stored_plan
from .halving import promote, promoted_count
from .watch import watched

LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
MAX_STALLS = 50  # asks in a row that gave nothing to train (duplicates, over budget)

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


def rung_of(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("rung", 0))


def candidate_of(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("candidate", t.number))


def work(study: optuna.Study, ctx: Context, *, progress: bool = True, poll: float = 1.0) -> int:
    """Run trials of ``study`` until it holds ``config.trials`` completed rung-0 trials and
    every promotion is evaluated; returns how many evaluations this worker ran. It gives up,
    with a warning, once as many of its evaluations failed as the study wants (at least 3)."""
    display = _Display(progress, planned_evaluations(ctx.config), study.study_name)
    evaluations = failures = stalls = 0
    try:
        while True:
            fail_dead_trials(study)  # a dead worker's trial → FAIL, re-queued
            trials = study.get_trials(deepcopy=False)
            display.show(trials, ctx.config)
            step = _next_step(study, trials, ctx.config)
            if step == "done":
                return evaluations
            if step == "wait":
                time.sleep(poll)
                continue
            outcome = _run_one(study, ctx)
            evaluations += outcome in ("trained", "failed")
            failures += outcome == "failed"
            if failures >= max(3, ctx.config.trials):
                reasons = sorted({t.user_attrs["failed"] for t in study.get_trials(deepcopy=False) if "failed" in t.user_attrs})
                warnings.warn(f"study {study.study_name!r}: {failures} evaluations failed ({reasons[:3]}), stopping this "
                              "worker; fix the cause and run it again to go on", stacklevel=2)  # fmt: skip
                return evaluations
            stalls = stalls + 1 if outcome == "skipped" else 0
            if outcome == "surplus":  # another worker holds the slot: let it get on
                time.sleep(poll / 10)
            if stalls >= MAX_STALLS:
                warnings.warn(f"study {study.study_name!r}: {stalls} proposals in a row were duplicates or over "
                              "budget; the space looks exhausted, stopping this worker", stacklevel=2)  # fmt: skip
                return evaluations
    finally:
        display.close()


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


def planned_evaluations(config: Any) -> int:
    """Evaluations a study plans when nothing fails: the rung-0 trials plus each promotion."""
    total = n = config.trials
    for _ in config.fidelities[1:]:
        n = promoted_count(n, config.eta)
        total += n
    return total + (config.refine if refinable(config) else 0)


REFINE_STEP = 2.5  # a refinement's learning rate is the best one's times or divided by this (the seed rates' spacing)


def refinable(config: Any) -> bool:
    """Whether the study refines its best plan's learning rate at the top rung: it asks for
    refinements, searches the rate, and has rungs below the top (one rung has no screen to
    correct: its sampler chose every rate at full length already)."""
    return config.refine > 0 and config.lr_range is not None and len(config.fidelities) > 1


def next_rate(best: float, tried: list[float], low: float, high: float) -> float | None:
    """The next learning rate to train the best plan at, or None: `REFINE_STEP` above ``best``
    (clipped to ``high``), else as far below it (clipped to ``low``) — the first of them not
    within a factor 1.25 of a rate already ``tried`` at the top rung. Up first: on every task
    measured, the full recipe's best rate lay at or above the rate the screens chose.

    >>> next_rate(2.5e-3, [2.5e-3], 1e-4, 1e-2)
    0.00625
    >>> next_rate(2.5e-3, [2.5e-3, 6.25e-3], 1e-4, 1e-2)
    0.001
    >>> next_rate(1e-2, [1e-2, 4e-3], 1e-4, 1e-2) is None  # both neighbours tried (one at the range's edge)
    True
    """
    near = lambda a, b: abs(math.log(a / b)) < math.log(1.25)  # noqa: E731
    for lr in (min(best * REFINE_STEP, high), max(best / REFINE_STEP, low)):
        if not any(near(lr, t) for t in tried):
            return float(f"{lr:.6g}")
    return None


def _refinement(trials: list[FrozenTrial], config: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The next refinement of a settled top rung — (params, user_attrs) to enqueue — or None:
    the best plan there by the first objective (ties: the lower validation loss), at `next_rate`, while fewer than
    ``config.refine`` refinements were made."""
    if not refinable(config):
        return None
    top = len(config.fidelities) - 1
    at_top = [t for t in trials if rung_of(t) == top and (t.state in LIVE or _finished_failure(t))]
    if any(t.state != TrialState.COMPLETE for t in at_top if t.state in LIVE) or sum("refines" in t.user_attrs for t in at_top) >= config.refine:
        return None
    done = [t for t in at_top if t.state == TrialState.COMPLETE and "lr" in t.params]
    if not done:
        return None
    sign = 1 if config.senses[config.objectives[0]] == "max" else -1
    best = max(done, key=lambda t: (sign * t.values[0], -_loss(t), -t.number))
    same = [t for t in at_top if _without_lr(t.params) == _without_lr(best.params)]
    lr = next_rate(best.params["lr"], [t.params["lr"] for t in same], *config.lr_range)
    if lr is None:
        return None
    kept = {"baseline": best.user_attrs["baseline"]} if "baseline" in best.user_attrs else {}
    return {**best.params, "lr": lr}, {"rung": top, "origin": "refined", "refines": best.number, "refined_lr": lr, **kept}


def _loss(t: FrozenTrial) -> float:
    """A trial's validation loss, infinite where none was recorded: among trials equally good
    by the metric (a tie on a few hundred validation examples is common) the lower loss is the
    finer signal."""
    return float(t.user_attrs.get("validation_loss", math.inf))


def _without_lr(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "lr"}


def _next_step(study: optuna.Study, trials: list[FrozenTrial], config: Any) -> str:
    """Return "ask" when a trial is waiting or a slot is free, "wait" while others run, else "done";
    enqueues the promotions of a settled rung on the way."""
    if any(t.state == TrialState.WAITING for t in trials):
        return "ask"
    if sum(t.state in LIVE for t in trials if rung_of(t) == 0) < config.trials:
        return "ask"
    for r in range(len(config.fidelities) - 1):
        if any(t.state == TrialState.RUNNING for t in trials if rung_of(t) == r):
            return "wait"
        done: dict[int, FrozenTrial] = {}
        for t in trials:  # in number order: a candidate's first completed trial at rung r
            if rung_of(t) == r and t.state == TrialState.COMPLETE:
                done.setdefault(candidate_of(t), t)
        named: dict[str, list[int]] = {}  # each baseline's candidates (one per seed learning rate)
        for c, t in done.items():
            if t.user_attrs.get("baseline"):
                named.setdefault(t.user_attrs["baseline"], []).append(c)
        key = next(iter(config.objectives))
        baselines = [max(cs, key=lambda c: (_screened(done[c], config)[key] * (1 if config.senses[key] == "max" else -1), -c))
                     for cs in named.values()]  # its best rate always goes on: compared at the top  # fmt: skip
        others = {c: _screened(t, config) for c, t in done.items() if not t.user_attrs.get("baseline")}
        chosen = baselines + promote(others, config.senses, config.eta)
        taken = {candidate_of(t) for t in trials if rung_of(t) == r + 1 and (t.state in LIVE or _finished_failure(t))}
        missing = [c for c in chosen if c not in taken]
        for c in missing:
            kept = {"baseline": done[c].user_attrs["baseline"]} if done[c].user_attrs.get("baseline") else {}
            study.enqueue_trial(done[c].params, user_attrs={"rung": r + 1, "candidate": c, "origin": "promoted", **kept})
        if missing:
            return "ask"
    if any(t.state == TrialState.RUNNING for t in trials):
        return "wait"
    refinement = _refinement(trials, config)
    if refinement is not None:
        study.enqueue_trial(refinement[0], user_attrs=refinement[1])
        return "ask"
    return "done"


def _screened(t: FrozenTrial, config: Any) -> dict[str, float]:
    """A completed trial's values as promotion ranks them: its objectives, the metric replaced
    by minus its validation loss when ``config.screen_by == "loss"`` (a short run's loss moves
    before its accuracy does)."""
    values = dict(zip(config.objectives, t.values))
    if config.screen_by == "loss" and "validation_loss" in t.user_attrs:
        values["metric"] = -float(t.user_attrs["validation_loss"])
    return values


def _finished_failure(t: FrozenTrial) -> bool:
    """A failure that must not be repeated (not an interrupted run)."""
    return t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")


def _surplus(trials: list[FrozenTrial], me: FrozenTrial, config: Any) -> str | None:
    r = rung_of(me)
    if "refines" in me.user_attrs:  # two workers may enqueue the same refinement: one trains it
        mine = (me.user_attrs["refines"], me.user_attrs.get("refined_lr"))
        group = [t.number for t in trials if t.state in LIVE and (t.user_attrs.get("refines"), t.user_attrs.get("refined_lr")) == mine]
        return None if me.number == min(group) else f"surplus: trial {mine[0]} is already refined at lr {mine[1]:g}"
    group = [t.number for t in trials if t.state in LIVE and rung_of(t) == r and (r == 0 or candidate_of(t) == candidate_of(me))]
    allowed = config.trials if r == 0 else 1
    if me.number in sorted(group)[:allowed]:
        return None
    return f"surplus: rung {r} already has its {allowed} trial(s) for this slot"


def _run_one(study: optuna.Study, ctx: Context) -> str:
    """Ask one trial and settle it: "trained", "failed" (FAIL, with the reason), "surplus" or
    "skipped" (a duplicate or over budget; both PRUNED untrained, with the reason)."""
    config = ctx.config
    with warnings.catch_warnings():  # heartbeats are sent below, around the evaluation
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    fresh = "rung" not in trial.user_attrs  # sampled now, not enqueued (seed, promotion, retry)
    r = int(trial.user_attrs.get("rung", 0))
    trial.set_user_attr("rung", r)
    trial.set_user_attr("candidate", int(trial.user_attrs.get("candidate", trial.number)))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trials = study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    reason = _surplus(trials, me, config)
    if reason:
        return _skip(study, trial, "skipped", reason, outcome="surplus")
    try:
        plan = ctx.space.suggest(trial)
        costs = {k: float(v) for k, v in ctx.space.costs(trial.params).items()}
    except Exception as e:  # a plan the space cannot build is a failed trial, not a crash
        return _fail(study, trial, f"building the plan: {type(e).__name__}: {e}")
    trial.set_user_attr("costs", costs)
    with warnings.catch_warnings():  # a re-queued trial carries its constraints already
        warnings.filterwarnings("ignore", "The constraint value is ignored")
        for k, limit in config.limits.items():  # optuna's constraints: feasible when <= 0
            trial.set_constraint(k, costs.get(k, 0.0) - limit)
    if fresh:
        twin = next((t.number for t in study.get_trials(deepcopy=False) if t.number != trial.number and rung_of(t) == 0
                     and t.state != TrialState.PRUNED and t.params == trial.params), None)  # fmt: skip
        if twin is not None:
            return _skip(study, trial, "skipped", f"duplicate of trial {twin}")
    over = {k: (costs[k], limit) for k, limit in config.limits.items() if k in costs and costs[k] > limit}
    if over:
        return _skip(study, trial, "infeasible", "; ".join(f"{k} {v:,.0f} > limit {lim:,.0f}" for k, (v, lim) in over.items()))

    fidelity: Fidelity = config.fidelities[r]
    plan.recipe = ctx.space.recipe(trial.params, Recipe.from_dict(config.recipe))  # the trial's learning rate, if searched
    same = _same_plan(study, trial.number, r, plan)
    if same is not None:  # other knobs, the same plan and recipe: its evaluation would repeat, not train it again
        trial.set_user_attr("reused", same.number)
        trial.set_user_attr("seconds", 0.0)
        _complete(study, trial, ctx, plan, list(same.values), r, fidelity, reused=same.number)
        return "reused"
    if ctx.threads:
        torch.set_num_threads(ctx.threads)  # each trial, as libraries may reset it
    try:  # heartbeats meanwhile, and the time limit: a trial past it comes back failed, with the reason
        result = watched(study._storage, trial._trial_id, ctx.trial_timeout, lambda: _evaluate(ctx, plan, fidelity, plan.recipe))
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        raise
    try:
        trial.set_user_attr("seconds", round(result.seconds, 3))
        if not result.ok:
            trial.set_user_attr("fidelity", str(fidelity))
            return _fail(study, trial, result.failed)
        if result.loss is not None:
            trial.set_user_attr("validation_loss", float(result.loss))
        _complete(study, trial, ctx, plan, [float(v) for v in ctx.space.values(plan, result.metric)], r, fidelity)
    except optuna.exceptions.UpdateFinishedTrialError:  # heartbeats starved: another worker re-queued it
        warnings.warn(f"trial {trial.number} sent no heartbeat for a grace period, so it was failed and re-queued "
                      "while it ran; its result is dropped (raise the heartbeat interval)", stacklevel=2)  # fmt: skip
        return "surplus"
    return "trained"


def _complete(study: optuna.Study, trial: optuna.Trial, ctx: Context, plan: Plan, values: list[float], rung: int,
              fidelity: Fidelity, **extra: Any) -> None:
    """Record ``plan`` with its objective ``values`` and provenance on ``trial``, and tell it."""
    config = ctx.config
    trial.set_user_attr("fidelity", str(fidelity))
    plan.objectives = dict(zip(config.objectives, values))
    plan.recipe = plan.recipe or Recipe.from_dict(config.recipe)  # how it was trained: the final run trains it so too
    plan.provenance = {**plan.provenance, **provenance(config.strategy, config.seed, ctx.task.name),
                       "study": study.study_name, "trial": trial.number, "rung": rung, "fidelity": str(fidelity), **extra}  # fmt: skip
    trial.set_user_attr("plan", plan.to_dict())
    study.tell(trial, values, skip_if_finished=True)


def _same_plan(study: optuna.Study, number: int, rung: int, plan: Plan) -> FrozenTrial | None:
    """A completed trial of ``rung`` whose plan has the same sites and recipe as ``plan``. Many
    knob settings map to one plan (a rank cap above every allocated rank, a share that rounds
    to no site), and samplers propose them again; training is seeded, so the result would repeat."""
    mine = json.dumps([plan.sites, plan.recipe.to_dict() if plan.recipe else None], sort_keys=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        stored = t.user_attrs.get("plan", {})
        if t.number != number and rung_of(t) == rung and json.dumps([stored.get("sites"), stored.get("recipe")], sort_keys=True) == mine:
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


def front_of(trials: list[FrozenTrial], senses: dict[str, str], objectives: tuple[str, ...]) -> ParetoFront:
    """The front of the highest rung that has completed trials, with each point's plan (of
    trials equal in every objective — one plan at two learning rates that tie on validation —
    the one with the lowest validation loss); every completed trial of every rung (plans left
    out) is in ``front.evaluated``, for plots."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    top = max((rung_of(t) for t in done), default=0)
    points, evaluated = [], []
    for t in done:
        info = {"trial": t.number, "rung": rung_of(t), "candidate": candidate_of(t), "fidelity": t.user_attrs.get("fidelity", ""),
                **({"baseline": t.user_attrs["baseline"]} if "baseline" in t.user_attrs else {}),
                **({"validation_loss": float(t.user_attrs["validation_loss"])} if "validation_loss" in t.user_attrs else {})}  # fmt: skip
        evaluated.append(FrontPoint(dict(zip(objectives, t.values)), None, info))
        if rung_of(t) == top:
            plan = stored_plan(t) if "plan" in t.user_attrs else None
            points.append(FrontPoint(dict(zip(objectives, t.values)), plan, dict(info)))
    points.sort(key=lambda p: p.info.get("validation_loss", math.inf))  # of equal points the front keeps the first
    front = ParetoFront.from_points(points, {k: senses[k] for k in objectives})
    front.evaluated = evaluated
    return front


class _Display(ProgressLine):
    """A rich progress line: evaluations done / planned, the front's size and hypervolume, ETA."""

    def __init__(self, enabled: bool, total: int, name: str):
        super().__init__(enabled, name, total, fields={"front": 0, "hv": "–"}, text="front {front} · hv {hv}")

    def show(self, trials: list[FrozenTrial], config: Any) -> None:
        if not self.enabled:
            return
        front = front_of(trials, config.senses, config.objectives)
        hv = "–"
        if len(front):
            rung = front.points[0].info["rung"]  # reference: the worst of that rung, the limits
            seen = [dict(zip(config.objectives, t.values)) for t in trials if t.state == TrialState.COMPLETE and rung_of(t) == rung]
            worst = {k: (min if s == "max" else max)(v[k] for v in seen) for k, s in front.senses.items()}
            ref = {**worst, **{k: v for k, v in config.limits.items() if k in worst}}
            hv = f"{front.hypervolume(ref):.4g}"
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        self.update(completed=min(done, self.bar.tasks[0].total), front=len(front), hv=hv)

