"""The top rung's best plan is trained again at neighbouring learning rates at the full recipe
(`refine`), so the rate a plan is returned with is chosen on full-length results."""

from __future__ import annotations

import math
import zlib

import optuna
import pytest
from optuna.trial import TrialState

from peftplan.planner.study import StudyConfig, run_search
from peftplan.planner.study.policy import next_rate, workload
from peftplan.planner.training.evaluate import Evaluation, Fidelity
from peftplan.recipe import Recipe
from tests.planner.trials import stand_in, tiny_task, tpe_search
from tests.zoo import bert_classifier

optuna.logging.set_verbosity(optuna.logging.WARNING)


def screened_loss(lr: float) -> float:
    """A screen's loss at ``lr``: lowest at 2.5e-3, the highest seed rate (its extension, 3.95e-3, screens worse)."""
    return abs(math.log(lr / 2.5e-3))


def peaked_at(peak: float):
    """Screens favour the highest seed rate, 2.5e-3; at the full recipe every plan scores best
    at ``peak`` (log distance), the whole-budget plans (the baselines) far above the others."""

    def evaluate(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        if fidelity.share is not None:
            return Evaluation(result.metric, result.params, 0.0, loss=screened_loss(recipe.lr))
        whole = plan.provenance["knobs"]["budget"] == 1.0
        metric = 1.0 - abs(math.log(recipe.lr / peak)) + 10.0 * whole + 1e-4 * (result.metric % 1)
        return Evaluation(metric, result.params, 0.0, loss=-metric)

    return evaluate


def search(evaluate, **options):
    """The baselines and 1/eta of the rest at full length, then 2 refinements (no cost cap)."""
    plan, study = tpe_search(evaluate, **{"refine": 2, "runs": None, **options})
    return plan, study.get_trials(deepcopy=False)


def test_the_best_plan_climbs_to_the_rate_that_is_best_at_full_length():
    plan, trials = search(peaked_at(6e-3))
    top = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["rung"] == 1]
    promoted = [t for t in top if "refines" not in t.user_attrs]
    refined = [t for t in top if "refines" in t.user_attrs]
    first = max(promoted, key=lambda t: (t.values[0], -t.number))
    assert first.params["lr"] == pytest.approx(2.5e-3)  # the screens' choice, the highest seed rate
    # by hand: 2.5e-3 -> 6.25e-3 (better, 2.5x up) -> 1.5625e-2 clipped to the range's 1e-2 (worse); two refinements
    assert [t.params["lr"] for t in refined] == pytest.approx([6.25e-3, 1e-2])
    assert [t.user_attrs["refines"] for t in refined] == [first.number, refined[0].number]
    assert all(
        {k: v for k, v in t.params.items() if k != "lr"} == {k: v for k, v in first.params.items() if k != "lr"}
        for t in refined
    )  # the same plan, only the rate moves
    assert {t.user_attrs["fidelity"] for t in refined} == {"the full recipe"}
    assert refined[0].user_attrs["plan"]["sites"] == first.user_attrs["plan"]["sites"]
    assert plan.recipe.lr == pytest.approx(6.25e-3) and plan.provenance["trial"] == refined[0].number
    assert (
        len([t for t in trials if t.state == TrialState.COMPLETE]) == 16 + 7 + 2
    )  # 4 baselines + 3 of the 10 others, 2 refinements


def test_a_worse_rate_above_sends_the_next_refinement_below():
    plan, trials = search(peaked_at(1e-3))
    refined = [t for t in trials if "refines" in t.user_attrs]
    assert [t.params["lr"] for t in refined] == pytest.approx([6.25e-3, 1e-3])  # up is worse: 2.5x below the best
    assert [t.user_attrs["refines"] for t in refined] == [refined[0].user_attrs["refines"]] * 2
    assert plan.recipe.lr == pytest.approx(1e-3) and plan.provenance["trial"] == refined[1].number


def test_refine_zero_trains_nothing_more_and_the_count_is_planned():
    plan, trials = search(peaked_at(6e-3), refine=0)
    assert not [t for t in trials if "refines" in t.user_attrs] and plan.recipe.lr == pytest.approx(2.5e-3)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    config = StudyConfig(
        "tpe",
        16,
        ("metric", "params"),
        {"metric": "max", "params": "min"},
        (Fidelity(share=0.05), Fidelity()),
        {},
        {},
        lr_range=(1e-4, 1e-2),
        followers=tuple({"baseline": b, "params": {}} for b in ("uniform", "proxy", "activation")),
    )
    assert len(done) == workload(config, trials).total == 16 + 7  # 4 baselines + 1/3 of the 10 others
    assert workload(StudyConfig(**{**config.__dict__, "refine": 2}), trials).total == 16 + 7 + 2
    no_knob = StudyConfig(**{**config.__dict__, "refine": 2, "lr_range": None})
    assert workload(no_knob, trials).total == 16 + 7  # no rate knob


def test_a_study_stored_before_refinements_existed_makes_none():
    stored = StudyConfig("tpe", 4, ("metric",), {"metric": "max"}, (Fidelity(),), {}, {}).to_dict()
    del stored["refine"]
    assert StudyConfig.from_dict(stored).refine == 0


def test_one_rung_and_no_rate_knob_refine_nothing():
    _, trials = search(peaked_at(6e-3), fidelities=[Fidelity()])  # the sampler chose every rate at full length already
    assert not [t for t in trials if "refines" in t.user_attrs]
    _, trials = search(peaked_at(6e-3), lr_range=None)
    assert not [t for t in trials if "refines" in t.user_attrs]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_refine_must_be_a_count(bad):
    with pytest.raises(ValueError, match="refine must be a count"):
        search(peaked_at(6e-3), refine=bad)


def test_next_rate_goes_up_then_down_and_stops_at_tried_or_clipped_rates():
    assert next_rate(1e-3, [1e-3], 1e-4, 1e-2) == pytest.approx(2.5e-3)
    assert next_rate(1e-3, [1e-3, 2.4e-3], 1e-4, 1e-2) == pytest.approx(4e-4)  # 2.4e-3 is within 1.25x of 2.5e-3
    assert next_rate(9e-3, [9e-3], 1e-4, 1e-2) == pytest.approx(3.6e-3)  # 1e-2 (clipped) is within 1.25x: down instead
    assert next_rate(1e-4, [1e-4, 2.5e-4], 1e-4, 1e-2) is None  # down is clipped onto the best itself


def test_two_workers_enqueueing_the_same_refinement_train_it_once():
    storage = optuna.storages.InMemoryStorage()
    options = {
        "strategy": "tpe",
        "trials": 16,
        "storage": storage,
        "study_name": "s",
        "evaluator": peaked_at(6e-3),
        "progress": False,
        "recipe": Recipe(lr=1e-3, steps=20),
        "refine": 1,
    }
    run_search(bert_classifier(), "5%", tiny_task(), **options)
    study = optuna.load_study(study_name="s", storage=storage)
    first = next(t for t in study.trials if "refines" in t.user_attrs)
    attrs = {**first.user_attrs, "refined_lr": 3e-3}
    for k in ("plan", "costs", "fidelity", "seconds", "worker", "candidate", "validation_loss"):
        attrs.pop(k, None)
    for _ in range(2):  # what two workers racing for the same settled rung would both enqueue
        study.enqueue_trial({**first.params, "lr": 3e-3}, user_attrs=attrs)
    run_search(bert_classifier(), "5%", tiny_task(), **options)  # resumed: waiting trials are taken whatever the count
    twins = [
        t for t in optuna.load_study(study_name="s", storage=storage).trials if t.user_attrs.get("refined_lr") == 3e-3
    ]
    assert [t.state for t in twins] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert twins[1].user_attrs["skipped"].startswith(f"surplus: trial {first.user_attrs['refines']} is already refined")


def tied_at_full(peak: float):
    """Like `peaked_at`, but at the full recipe the rate moves only the validation loss (lowest
    at ``peak``): every rate of one plan ties on the metric, as a few hundred validation
    examples often do."""

    def evaluate(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        if fidelity.share is not None:
            return Evaluation(result.metric, result.params, 0.0, loss=screened_loss(recipe.lr))
        knobs = {k: v for k, v in plan.provenance["knobs"].items() if k != "lr"}
        whole = knobs["budget"] == 1.0
        metric = 1.0 + 10.0 * whole + 1e-4 * (zlib.crc32(repr(sorted(knobs.items())).encode()) % 1000) / 1000
        return Evaluation(metric, result.params, 0.0, loss=abs(math.log(recipe.lr / peak)))

    return evaluate


def test_a_tie_on_the_metric_goes_to_the_lower_validation_loss():
    plan, trials = search(tied_at_full(6e-3))
    top = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["rung"] == 1]
    refined = [t for t in top if "refines" in t.user_attrs]
    first = max((t for t in top if "refines" not in t.user_attrs), key=lambda t: (t.values[0], -t.number))
    assert first.params["lr"] == pytest.approx(2.5e-3) and refined[0].values[0] == first.values[0]  # a tie
    # 6.25e-3 ties 2.5e-3 on the metric at a lower loss, so it is the best: the next step goes on up (to the
    # range's 1e-2), not down from 2.5e-3 to 1e-3 as when the earlier trial wins ties
    assert [t.params["lr"] for t in refined] == pytest.approx([6.25e-3, 1e-2])
    assert [t.user_attrs["refines"] for t in refined] == [first.number, refined[0].number]
    assert plan.recipe.lr == pytest.approx(6.25e-3) and plan.provenance["trial"] == refined[0].number
    front = [p for p in plan.front if p.values == dict(zip(("metric", "params"), first.values))]
    assert len(front) == 1 and front[0].info["trial"] == refined[0].number  # the front shows the plan returned
