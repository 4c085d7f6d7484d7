"""The study's policy: which trials come next and what a study returns — read from the
trials alone, so every worker (and a restart after a crash) decides the same.

Each trial carries user_attrs: ``rung``, ``candidate`` (the number of the candidate's rung-0
trial), ``baseline`` on the seed plans a user would write by hand and the one-shot
allocations: the first (`Space.baselines`) screened at a few learning rates, the others
(``origin`` "follower", `Space.followers`) queued once its screens are settled, each once at
the rate it screened best at — the sweep first extended once (``origin`` "extended") where its
edge screens best. Without a cost cap the best rate of each baseline is promoted to
every rung whatever its rank (and 1/eta of the others); under one, the top rung takes the
best-screened baseline and the best-screened searched plan by turns — either way the plan a
search returns was compared with a baseline at the top rung. Once the top rung is settled, ``refines``
marks the trials that train its best plan again at the full recipe at neighbouring learning
rates (`next_rate`, ``config.refine`` of them at most): the rate a plan is returned with is
chosen on full-length results, not on the short screens, which favour high rates
(benchmarks/RESULTS.md). A trial cut off by an interrupt (``interrupted``) is queued again
with its parameters and place (``retries``: its number), so an interrupted search ends as an
uninterrupted one would.

Two workers may both decide to create the same trial (the last rung-0 slot, the same
promotion): trial numbers are handed out one at a time by the storage, so the rule "within a
slot group, the lowest-numbered live trials win" settles it — the loser is PRUNED as surplus
before it trains (`surplus`).

    >>> [next_rate(2.5e-3, [2.5e-3], 1e-4, 1e-2), promoted_count(16, eta=3)]
    [0.00625, 5]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..front import FrontPoint, ParetoFront
from .config import refinable, stored_plan
from .halving import mixed, promote, promoted_count

LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
PLACE = ("rung", "candidate", "origin", "baseline", "refines", "refined_lr")  # what a trial is for, kept by its retry


def rung_of(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("rung", 0))


def candidate_of(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("candidate", t.number))


def finished_failure(t: FrozenTrial) -> bool:
    """A failure that must not be repeated (not an interrupted run)."""
    return t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")


def _taken(t: FrozenTrial) -> bool:
    """Whether ``t`` holds its slot: run, running, queued or failed for good."""
    return t.state in LIVE or finished_failure(t)


@dataclass(frozen=True)
class Workload:
    """The trainings of a study, run or still to run: ``rungs[r]`` at rung r (promotions,
    failures included), ``refinements`` of the best plan's rate; ``done`` of them finished.

    >>> w = Workload(rungs=(4, 2), refinements=2, done=3)
    >>> w.total
    8
    >>> print(w)
    4 short runs, 2 full runs, +2 refinements of the best plan's learning rate
    """

    rungs: tuple[int, ...]
    refinements: int
    done: int

    @property
    def total(self) -> int:
        return sum(self.rungs) + self.refinements

    def __str__(self) -> str:
        top = len(self.rungs) - 1
        parts = [
            f"{n} {'full' if r == top else 'short'} run{'s' * (n != 1)}" + (f" (rung {r})" if 0 < r < top else "")
            for r, n in enumerate(self.rungs)
        ]
        if self.refinements:
            parts.append(
                f"+{self.refinements} refinement{'s' * (self.refinements != 1)} of the best plan's learning rate"
            )
        return ", ".join(parts)


def workload(config: Any, trials: Iterable[FrozenTrial] = ()) -> Workload:
    """The trainings the study runs when nothing more fails: the rung-0 candidates, each
    baseline (its best rate) and ``1/eta`` of the others promoted to every rung, and the
    refinements; counted from ``trials`` where they exist, else foreseen the way `next_step`
    will decide. A failure at rung 0 adds a training (its slot is filled again)."""
    retried = {t.user_attrs.get("retries") for t in trials}
    cut = sum(bool(t.user_attrs.get("interrupted")) and t.number not in retried and rung_of(t) == 0 for t in trials)
    trials = [t for t in trials if t.state != TrialState.PRUNED and not t.user_attrs.get("interrupted")]
    refining = [t for t in trials if "refines" in t.user_attrs]
    placed = [t for t in trials if "refines" not in t.user_attrs]
    rung0 = [t for t in placed if rung_of(t) == 0]
    seeds = [t for t in rung0 if t.state in LIVE and "baseline" in t.user_attrs][: config.trials]
    room = max(0, config.trials - sum(t.state in LIVE for t in rung0) - cut)  # a cut trial's retry takes its slot
    coming = [f["baseline"] for f in _pending_followers(trials, config)[:room]] if seeds else []
    named = len({t.user_attrs["baseline"] for t in seeds} | set(coming))
    rungs = [sum(t.state == TrialState.FAIL for t in rung0) + max(config.trials, sum(t.state in LIVE for t in rung0))]
    slots, others = config.trials, config.trials - len(seeds) - len(coming)  # the others: the sampler's proposals
    capped, top = config.top_slots(), len(config.fidelities) - 1
    for r in range(1, top + 1):
        here = [t for t in placed if rung_of(t) == r]
        if here:
            slots = len(here)
        elif capped is not None:
            slots = capped if r == top else promoted_count(slots, config.eta)
        else:
            slots = named + promoted_count(others, config.eta)
        others = slots - named
        rungs.append(slots)
    refinements = max(config.refine, len(refining)) if refinable(config) else len(refining)
    done = sum(t.state == TrialState.COMPLETE or t.state == TrialState.FAIL for t in trials)
    return Workload(tuple(rungs), refinements, done)


REFINE_STEP = 2.5  # a refinement's learning rate is the best one's times or divided by this (the seed rates' spacing)


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
    for lr in (min(best * REFINE_STEP, high), max(best / REFINE_STEP, low)):
        if not any(_near(lr, t) for t in tried):
            return float(f"{lr:.6g}")
    return None


def _near(a: float, b: float) -> bool:
    """Whether two learning rates are within a factor 1.25 (one is as good a try as the other)."""
    return abs(math.log(a / b)) < math.log(1.25)


def next_step(study: optuna.Study, trials: list[FrozenTrial], config: Any) -> str:
    """Return "ask" when a trial is waiting or a slot is free, "wait" while others run, else "done";
    queues the retries of interrupted trials, the promotions of a settled rung and the
    refinements on the way."""
    if _retry_interrupted(study, trials) or any(t.state == TrialState.WAITING for t in trials):
        return "ask"
    free = config.trials - sum(t.state in LIVE for t in trials if rung_of(t) == 0)
    extension = _extension(trials, config) if free > 0 else None
    if extension is not None:
        study.enqueue_trial(extension[0], user_attrs=extension[1])
        return "ask"
    pending = _pending_followers(trials, config)[: max(0, free)]
    if pending:
        settled, rate = _followed_rate(trials, pending[0], config)
        if not settled:  # the followed baseline's screens still run (another worker's): the slots are the followers'
            return "wait"
        for f in pending:
            params = {**f["params"], **({"lr": rate} if rate is not None else {})}
            study.enqueue_trial(params, user_attrs={"baseline": f["baseline"], "origin": "follower"})
        return "ask"
    if free > 0:
        return "ask"
    for r in range(len(config.fidelities) - 1):
        if any(t.state == TrialState.RUNNING for t in trials if rung_of(t) == r):
            return "wait"
        done: dict[int, FrozenTrial] = {}
        for t in trials:  # in number order: a candidate's first completed trial at rung r
            if rung_of(t) == r and t.state == TrialState.COMPLETE:
                done.setdefault(candidate_of(t), t)
        taken = {candidate_of(t) for t in trials if rung_of(t) == r + 1 and _taken(t)}
        missing = [c for c in _promoted(done, config, r + 1) if c not in taken]
        for c in missing:
            kept = {"baseline": done[c].user_attrs["baseline"]} if done[c].user_attrs.get("baseline") else {}
            study.enqueue_trial(
                done[c].params, user_attrs={"rung": r + 1, "candidate": c, "origin": "promoted", **kept}
            )
        if missing:
            return "ask"
    if any(t.state == TrialState.RUNNING for t in trials):
        return "wait"
    refinement = _refinement(trials, config)
    if refinement is not None:
        study.enqueue_trial(refinement[0], user_attrs=refinement[1])
        return "ask"
    return "done"


def _follows(t: FrozenTrial, baseline: str) -> bool:
    return rung_of(t) == 0 and t.user_attrs.get("origin") == "follower" and t.user_attrs.get("baseline") == baseline


def _pending_followers(trials: list[FrozenTrial], config: Any) -> list[dict[str, Any]]:
    """The study's followers (`Space.followers`) not yet at rung 0, in their order: one pruned
    over a cost limit was there (it is not queued again), a racing copy pruned as surplus not."""
    present = {
        t.user_attrs.get("baseline")
        for t in trials
        if rung_of(t) == 0 and not str(t.user_attrs.get("skipped", "")).startswith("surplus")
    }
    return [f for f in config.followers if f["baseline"] not in present]


def _followed_rate(trials: list[FrozenTrial], follower: dict[str, Any], config: Any) -> tuple[bool, float | None]:
    """Whether the seeds' baseline has settled its screens, and the learning rate ``follower``
    then screens at: the one it screened best at (`swept_rate`), else the follower's own (the
    recipe's, when every such screen failed or the space searches no rate)."""
    settled, rate = swept_rate(trials, config)
    return settled, follower["params"].get("lr") if rate is None else rate


def _swept(trials: list[FrozenTrial], config: Any) -> list[FrozenTrial]:
    """The rung-0 trials of the seeds' baseline, the one screened at several rates: the first
    rung-0 baseline that is no follower."""
    names = {f["baseline"] for f in config.followers}
    seeds = [t for t in trials if rung_of(t) == 0 and t.user_attrs.get("baseline") not in (None, *names)]
    return [t for t in seeds if t.user_attrs["baseline"] == seeds[0].user_attrs["baseline"]] if seeds else []


def _best_swept(trials: list[FrozenTrial], config: Any) -> tuple[bool, FrozenTrial | None]:
    """Whether the seeds' baseline has settled its screens, and its best-screened completed one
    by the first objective as promotion ranks it (None: every one failed, or no rate is searched)."""
    swept = _swept(trials, config)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in swept):
        return False, None
    done = [t for t in swept if t.state == TrialState.COMPLETE and "lr" in t.params]
    if not done:
        return True, None
    key = config.objectives[0]
    sign = 1 if config.senses[key] == "max" else -1
    return True, max(done, key=lambda t: (sign * _screened(t, config)[key], -t.number))


def swept_rate(trials: list[FrozenTrial], config: Any) -> tuple[bool, float | None]:
    """Whether the seeds' baseline (the first rung-0 baseline that is no follower) has settled
    its screens, its extension (`_extension`) included, and the learning rate it screened best
    at, by the first objective as promotion ranks it (None: no such screen completed, or the
    space searches no rate)."""
    settled, best = _best_swept(trials, config)
    if not settled or _extension(trials, config) is not None:
        return False, None
    return True, None if best is None else float(best.params["lr"])


EXTEND = 1  # screens a search adds past the best edge of its seed sweep, at most (`_extension`; run_search's default)
EXTEND_STEP = 2.5**0.5  # how far past it: half the sweep's spacing on a log scale


def _extension(trials: list[FrozenTrial], config: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The next screen of the seeds' baseline — (params, user_attrs) to enqueue — or None: when
    its settled screens rank best the highest (lowest) rate of its sweep, `EXTEND_STEP` above
    (below) it, clipped to ``config.lr_range``, while fewer than ``config.extend`` were added and
    the rate is new. The followers and the sampler's proposals then screen at the better of the
    edge and its extension: on SmolLM2 the sweep around the recipe's rate (4e-4-2.5e-3) stopped at
    its edge on every task, below the rate its plans' full runs are best at (benchmarks/RESULTS.md,
    learning-rate transfer); a whole step past it (6.25e-3) overshot on sst2 and subj, and on
    MiniLM it went on to 1e-2, where full runs fell to chance."""
    if not config.extend or config.lr_range is None:
        return None
    settled, best = _best_swept(trials, config)
    swept = _swept(trials, config)
    tried = {float(t.params["lr"]) for t in swept if "lr" in t.params}
    added = [t for t in swept if t.user_attrs.get("origin") == "extended"]
    if not settled or best is None or len(tried) < 2 or len(added) >= config.extend:
        return None
    lr, (low, high) = float(best.params["lr"]), config.lr_range
    edge = min(lr * EXTEND_STEP, high) if lr == max(tried) else max(lr / EXTEND_STEP, low) if lr == min(tried) else None
    if edge is None or any(_near(edge, t) for t in tried):
        return None
    return {**best.params, "lr": float(f"{edge:.3g}")}, {"baseline": best.user_attrs["baseline"], "origin": "extended"}


def proposal_knobs(trials: list[FrozenTrial], config: Any, space: Any) -> dict[str, Any]:
    """The knobs the sampler's next proposal takes as given rather than chooses: under
    ``config.propose == "budget"``, the whole budget (`Space.whole_budget`) and, once the seeds'
    baseline settled its screens, the rate it screened best at (`swept_rate`), as followers
    get; nothing under "front". Left to choose both, the GP sampler spent every proposal at the
    top of the rate range (5-step screens favour high rates, and full runs there fall apart) and
    at 5-30% of the budget (the cheap end of the front of screened loss against params), so no
    searched allocation at the budget reached a full run (the trials of the SmolLM2 and MiniLM
    searches stored under benchmarks/runs). Right after a trial pruned over a cost limit
    (``infeasible``), the budget share is drawn too: under a memory limit below every plan that
    spends the budget, a study would otherwise propose nothing it could train."""
    if config.propose != "budget":
        return {}
    settled, rate = swept_rate(trials, config)
    latest = max(trials, key=lambda t: t.number, default=None)
    whole = {} if latest is not None and "infeasible" in latest.user_attrs else space.whole_budget()
    return {**whole, **({"lr": rate} if settled and rate is not None else {})}


REPEAT = "repeats the screened plan of trial"  # why a proposal was pruned untrained: `explore_next` reads it back
DUPLICATE = "duplicate of trial"  # why a proposal of a screened trial's very knobs was pruned untrained


def explore_next(trials: list[FrozenTrial], config: Any) -> bool:
    """Whether the next trial, the sampler's (none is queued), is drawn at random instead (the
    `proposal_knobs` kept): under ``config.propose == "budget"``, when the latest trial is a
    proposal pruned for repeating a plan already screened (`REPEAT`, `DUPLICATE`). With the rate
    and budget given, the GP sampler proposed the best-screened seed's plan again for all 8
    proposals (MiniLM sst2 and subj, full scale): its acquisition starts from the incumbent, and
    a repeat told again keeps it there; a random allocation at the budget explores instead."""
    if config.propose != "budget" or any(t.state == TrialState.WAITING for t in trials):  # the next is queued
        return False
    latest = max(trials, key=lambda t: t.number, default=None)
    return latest is not None and str(latest.user_attrs.get("skipped", "")).startswith((REPEAT, DUPLICATE))


def _retry_interrupted(study: optuna.Study, trials: list[FrozenTrial]) -> bool:
    """Queue each interrupted trial again, with its parameters and place; whether any was."""
    retried = {t.user_attrs.get("retries") for t in trials}
    cut = [
        t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried
    ]
    for t in cut:
        place = {k: t.user_attrs[k] for k in PLACE if k in t.user_attrs}
        study.enqueue_trial(t.params, user_attrs={**place, "retries": t.number})
    return bool(cut)


def _promoted(done: dict[int, FrozenTrial], config: Any, rung: int) -> list[int]:
    """The candidates of a settled rung that go on to ``rung``: each baseline's best rate,
    whatever its rank, then `promote`'s choice of the others; under a cost cap, `promote`'s
    choice below the top, and at the top `top_slots` of them, baselines and searched
    candidates by turns (`mixed`), each kind by the first objective as screened (the returned
    plan is the best by it)."""
    slots = config.top_slots()
    if slots is not None:
        screened = {c: _screened(t, config) for c, t in done.items()}
        if rung < len(config.fidelities) - 1:
            return promote(screened, config.senses, config.eta)
        key = config.objectives[0]
        sign = 1 if config.senses[key] == "max" else -1
        order = sorted(screened, key=lambda c: (-sign * screened[c][key], c))
        return mixed(order, {c for c in order if done[c].user_attrs.get("baseline")})[:slots]
    named: dict[str, list[int]] = {}  # each baseline's candidates (one per seed learning rate)
    for c, t in done.items():
        if t.user_attrs.get("baseline"):
            named.setdefault(t.user_attrs["baseline"], []).append(c)
    key = next(iter(config.objectives))
    sign = 1 if config.senses[key] == "max" else -1
    baselines = [max(cs, key=lambda c: (_screened(done[c], config)[key] * sign, -c)) for cs in named.values()]
    others = {c: _screened(t, config) for c, t in done.items() if not t.user_attrs.get("baseline")}
    return baselines + promote(others, config.senses, config.eta)


def told(values: list[float], loss: float | None, rung: int, config: Any) -> list[float]:
    """What a trial with objective ``values`` and validation ``loss`` at ``rung`` tells the
    sampler: below the top rung of a study that tells what it screens by (``config.tell ==
    "screened"``, with ``screen_by == "loss"``), the metric replaced by minus the loss, the signal
    promotion ranks it by; else its values. A sampler fitting the screens' accuracy fits noise where
    a short run has not yet moved it (benchmarks/RESULTS.md: 5-step screens of SmolLM2 on sst2 at
    0.50-0.64 accuracy whatever the rate, losses 0.37-3.3), and then spends its proposals on the
    other objective alone: all 8 at the cheapest budget share.

    >>> from peftplan.planner.study.config import StudyConfig
    >>> from peftplan.planner.training.evaluate import Fidelity
    >>> config = StudyConfig("tpe", 4, ("metric", "params"), {"metric": "max", "params": "min"},
    ...                      (Fidelity(share=0.05), Fidelity()), {}, {}, screen_by="loss", tell="screened")
    >>> told([0.55, 9000.0], 0.37, 0, config), told([0.89, 9000.0], 0.14, 1, config)
    ([-0.37, 9000.0], [0.89, 9000.0])
    >>> told([0.55, 9000.0], float("nan"), 0, config)  # a loss that is no number: optuna would fail the trial
    [0.55, 9000.0]
    """
    screening = rung < len(config.fidelities) - 1 and config.tell == "screened" and config.screen_by == "loss"
    return [-loss, *values[1:]] if screening and loss is not None and math.isfinite(loss) else list(values)


def measured(t: FrozenTrial, config: Any) -> dict[str, float]:
    """A completed trial's objective values as measured (`told` may have given the sampler others)."""
    return dict(zip(config.objectives, measured_values(t)))


def measured_values(t: FrozenTrial) -> list[float]:
    """`measured`'s values in the study's objective order, for readers without its config."""
    return list(t.user_attrs.get("measured", t.values))


def _screened(t: FrozenTrial, config: Any) -> dict[str, float]:
    """A completed trial's values as promotion ranks them: its objectives, the metric replaced
    by minus its validation loss when ``config.screen_by == "loss"`` (a short run's loss moves
    before its accuracy does)."""
    values = measured(t, config)
    if config.screen_by == "loss" and "validation_loss" in t.user_attrs:
        values["metric"] = -float(t.user_attrs["validation_loss"])
    return values


def _refinement(trials: list[FrozenTrial], config: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The next refinement of a settled top rung — (params, user_attrs) to enqueue — or None:
    the best plan there by the first objective (ties: the lower validation loss), at `next_rate`, while fewer than
    ``config.refine`` refinements were made."""
    if not refinable(config):
        return None
    top = len(config.fidelities) - 1
    at_top = [t for t in trials if rung_of(t) == top and _taken(t)]
    if (
        any(t.state != TrialState.COMPLETE for t in at_top if t.state in LIVE)
        or sum("refines" in t.user_attrs for t in at_top) >= config.refine
    ):
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
    return {**best.params, "lr": lr}, {
        "rung": top,
        "origin": "refined",
        "refines": best.number,
        "refined_lr": lr,
        **kept,
    }


def one_standard_error(trials: list[FrozenTrial], config: Any, best: int, examples: int) -> FrozenTrial | None:
    """Breiman's one-standard-error rule at the top rung: where the best plan (trial ``best``)
    is a searched one and the metric a share of ``examples`` validation examples, the best
    baseline there within the limits whose metric lies within one standard error of the best's,
    ``sqrt(p (1 - p) / examples)`` — the plan a user would write by hand, or the proxy's, unless
    validation tells the searched plan apart; else None. A few hundred validation examples cannot:
    on the quick MiniLM table the search returned small plans that had beaten the proxy seed's
    full run by 1 and 7 of 256 validation examples, and the seed, trained alike by hand, scored
    1.56 and 0.19 dev points more; under this rule that table's sst2 search returns the seed, +1.17
    over the best tuned LoRA (benchmarks/RESULTS.md).

    >>> from peftplan.planner.study.config import StudyConfig
    >>> from peftplan.planner.training.evaluate import Fidelity
    >>> from optuna.trial import create_trial
    >>> config = StudyConfig("tpe", 2, ("metric", "params"), {"metric": "max", "params": "min"},
    ...                      (Fidelity(share=0.05), Fidelity()), {}, {})
    >>> trials = [create_trial(values=[0.770, 14594.0], user_attrs={"rung": 1, "plan": {}}),
    ...           create_trial(values=[0.766, 74114.0], user_attrs={"rung": 1, "plan": {}, "baseline": "proxy"})]
    >>> for i, t in enumerate(trials):
    ...     t.number = i
    >>> one_standard_error(trials, config, best=0, examples=256).user_attrs["baseline"]
    'proxy'
    >>> one_standard_error(trials, config, best=0, examples=100_000) is None  # told apart
    True
    """
    key, top = config.objectives[0], len(config.fidelities) - 1
    done = {
        t.number: t for t in trials if t.state == TrialState.COMPLETE and rung_of(t) == top and "plan" in t.user_attrs
    }
    if config.senses[key] != "max" or best not in done or done[best].user_attrs.get("baseline"):
        return None
    p = measured(done[best], config)[key]
    floor = p - math.sqrt(max(0.0, p * (1 - p)) / examples)
    near = [
        t
        for t in done.values()
        if t.user_attrs.get("baseline") and measured(t, config)[key] >= floor and _within(measured(t, config), config)
    ]
    return max(near, key=lambda t: (measured(t, config)[key], -_loss(t), -t.number), default=None)


def _within(values: dict[str, float], config: Any) -> bool:
    """Whether ``values`` keep the study's limits (an upper bound on a "min" objective, a lower one on a "max")."""
    return all(
        values[k] <= v if config.senses[k] == "min" else values[k] >= v for k, v in config.limits.items() if k in values
    )


def _loss(t: FrozenTrial) -> float:
    """A trial's validation loss, infinite where none was recorded: among trials equally good
    by the metric (a tie on a few hundred validation examples is common) the lower loss is the
    finer signal."""
    return float(t.user_attrs.get("validation_loss", math.inf))


def _without_lr(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "lr"}


def _queued_lr(t: FrozenTrial) -> float | None:
    """A trial's learning rate, also before it suggests it (a queued trial's fixed parameter)."""
    return t.params.get("lr", t.system_attrs.get("fixed_params", {}).get("lr"))


def surplus(trials: list[FrozenTrial], me: FrozenTrial, config: Any) -> str | None:
    """Why trial ``me`` must not train (another live trial holds its slot), or None."""
    r = rung_of(me)
    if me.user_attrs.get("origin") == "extended":  # two workers may extend the sweep at once: one screens it
        mine = (me.user_attrs.get("baseline"), _queued_lr(me))
        first = min(
            t.number
            for t in trials
            if t.state in LIVE
            and t.user_attrs.get("origin") == "extended"
            and (t.user_attrs.get("baseline"), _queued_lr(t)) == mine
        )
        if me.number != first:
            return f"surplus: trial {first} already screens {mine[0]!r} at lr {mine[1]:g}"
    if "refines" in me.user_attrs:  # two workers may enqueue the same refinement: one trains it
        mine = (me.user_attrs["refines"], me.user_attrs.get("refined_lr"))
        group = [
            t.number
            for t in trials
            if t.state in LIVE and (t.user_attrs.get("refines"), t.user_attrs.get("refined_lr")) == mine
        ]
        return None if me.number == min(group) else f"surplus: trial {mine[0]} is already refined at lr {mine[1]:g}"
    if me.user_attrs.get("origin") == "follower":  # two workers may enqueue the same follower: one screens it
        first = min(t.number for t in trials if t.state in LIVE and _follows(t, me.user_attrs["baseline"]))
        if me.number != first:
            return f"surplus: trial {first} already screens the baseline {me.user_attrs['baseline']!r}"
    group = [
        t.number
        for t in trials
        if t.state in LIVE and rung_of(t) == r and (r == 0 or candidate_of(t) == candidate_of(me))
    ]
    allowed = config.trials if r == 0 else 1
    if me.number in sorted(group)[:allowed]:
        return None
    return f"surplus: rung {r} already has its {allowed} trial(s) for this slot"


def front_of(trials: list[FrozenTrial], config: Any, metric_name: str | None = None) -> ParetoFront:
    """The front of the highest rung that has completed trials, with each point's plan (of
    trials equal in every objective — one plan at two learning rates that tie on validation —
    the one with the lowest validation loss); every completed trial of every rung (plans left
    out) is in ``front.evaluated``, for plots, each with the learning rate it trained at. The
    front carries the study's limits (its budget line) and ``metric_name`` (its axis)."""
    objectives, recipe_lr = config.objectives, (config.recipe or {}).get("lr")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    top = max((rung_of(t) for t in done), default=0)
    points, evaluated = [], []
    for t in done:
        info = {
            "trial": t.number,
            "rung": rung_of(t),
            "candidate": candidate_of(t),
            "fidelity": t.user_attrs.get("fidelity", ""),
            **({"lr": float(t.params.get("lr", recipe_lr))} if t.params.get("lr", recipe_lr) is not None else {}),
            **({"baseline": t.user_attrs["baseline"]} if "baseline" in t.user_attrs else {}),
            **(
                {"validation_loss": float(t.user_attrs["validation_loss"])} if "validation_loss" in t.user_attrs else {}
            ),
        }
        evaluated.append(FrontPoint(measured(t, config), None, info))
        if rung_of(t) == top:
            plan = stored_plan(t) if "plan" in t.user_attrs else None
            points.append(FrontPoint(measured(t, config), plan, dict(info)))
    points.sort(key=lambda p: p.info.get("validation_loss", math.inf))  # of equal points the front keeps the first
    front = ParetoFront.from_points(points, {k: config.senses[k] for k in objectives})
    front.evaluated = evaluated
    front.limits = {k: v for k, v in config.limits.items() if k in front.senses}
    front.metric_name = metric_name
    return front
