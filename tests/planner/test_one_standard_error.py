"""The plan a search returns when validation cannot tell its best full runs apart: the best
baseline within one standard error of a searched best (Breiman's rule), by a hand computation
of that standard error on `tiny_task`'s 32 validation examples."""

import math

import optuna
import pytest

from peftplan.planner.front.plot import returned
from peftplan.planner.training.classification import mcc
from peftplan.planner.training.evaluate import Evaluation
from tests.planner.trials import tiny_task, tpe_search

optuna.logging.set_verbosity(optuna.logging.WARNING)

VALIDATION = 32  # tiny_task's two validation batches of 16


def scored(searched: float, baseline: float):
    """An evaluator whose full runs score ``searched`` for the sampler's plans and ``baseline``
    for the seed plans (those at the whole budget); screens rank the searched plans first."""

    def evaluate(base, plan, task, fidelity, *, recipe, seed):
        seed_plan = plan.provenance["knobs"]["budget"] == 1.0
        metric = (baseline if seed_plan else searched) if fidelity.share is None else 0.5
        loss = 0.5 if seed_plan else 0.4
        return Evaluation(metric, int(plan.objectives["params"]), 0.0, loss=loss)

    return evaluate


def _top(study):
    return [t for t in study.trials if t.user_attrs.get("rung") == 1 and t.state.name == "COMPLETE"]


def test_a_baseline_within_one_standard_error_of_the_searched_best_is_returned():
    searched, baseline = 0.80, 0.74
    assert searched - baseline < math.sqrt(searched * (1 - searched) / VALIDATION)  # 0.06 < 0.0707
    plan, study = tpe_search(scored(searched, baseline))
    top = _top(study)
    assert sorted("baseline" in t.user_attrs for t in top) == [False, True]
    seed_trial = next(t for t in top if "baseline" in t.user_attrs)
    assert plan.provenance["trial"] == seed_trial.number and plan.objectives["metric"] == baseline
    assert plan.provenance["pick"].startswith(
        f"baseline {seed_trial.user_attrs['baseline']!r} (trial {seed_trial.number}"
    )
    assert returned(plan.front).info["trial"] == seed_trial.number  # the plot's star is the plan returned
    assert plan.front.best().values["metric"] == searched  # the front itself is unchanged


def test_a_searched_plan_validation_tells_apart_is_returned():
    searched, baseline = 0.80, 0.72
    assert searched - baseline > math.sqrt(searched * (1 - searched) / VALIDATION)  # 0.08 > 0.0707
    plan, study = tpe_search(scored(searched, baseline))
    assert plan.objectives["metric"] == searched and "pick" not in plan.provenance
    assert "baseline" not in study.trials[plan.provenance["trial"]].user_attrs


def test_a_metric_that_is_no_share_of_the_examples_keeps_the_best(monkeypatch):
    task = tiny_task()
    task.metric = mcc  # MCC has no binomial standard error
    assert task.proportion_of() is None
    monkeypatch.setattr("tests.planner.trials.tiny_task", lambda: task)
    plan, _ = tpe_search(scored(0.80, 0.79))
    assert plan.objectives["metric"] == pytest.approx(0.80) and "pick" not in plan.provenance
