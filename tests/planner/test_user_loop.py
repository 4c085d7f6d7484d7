"""`search(..., evaluate=fn)`: the user's own loop scores each trial, on a fresh copy of the
base with the trial's plan applied, at the trial's steps and learning rate."""

from __future__ import annotations

import optuna
import pytest
import torch

import peftplan as pp
from peftplan.planner.study import StudyError
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier


def params_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_function_gets_a_fresh_tuned_copy_and_the_trials_length_and_rate(tmp_path):
    model, task = bert_classifier(), tiny_task()
    before = params_of(model)
    calls = []

    def my_loop(model, fidelity, recipe):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n and "classifier" not in n)
        calls.append((trainable, frozen, fidelity.steps, recipe.steps, recipe.lr))
        torch.nn.init.normal_(next(p for p in model.parameters() if p.requires_grad))  # "training" touches the copy only
        return {"metric": recipe.lr * fidelity.steps, "loss": 1.0 / fidelity.steps}

    url = f"sqlite:///{tmp_path / 's.db'}"
    plan = pp.search(model, "5%", task, evaluate=my_loop, strategy="random", trials=4, recipe=pp.Recipe(lr=1e-3, steps=20),
                     storage=url, progress=False, seeds=0)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the base is untouched
    trials = optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
    evaluated = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "reused" not in t.user_attrs]
    assert len(calls) == len(evaluated) >= 4
    for (trainable, frozen, steps, recipe_steps, lr), t in zip(calls, sorted(evaluated, key=lambda t: t.number)):
        assert frozen and trainable == t.user_attrs["costs"]["params"]  # the trial's plan, applied
        assert steps == recipe_steps == (1 if t.user_attrs["rung"] == 0 else 20)  # 5% of the recipe, then all of it
        assert lr == pytest.approx(t.user_attrs["plan"]["recipe"]["lr"])  # the rate the search chose for the trial
        assert t.values[0] == pytest.approx(lr * steps) and t.user_attrs["validation_loss"] == pytest.approx(1 / steps)
    assert len({c[4] for c in calls}) > 1  # the learning rate is searched


def test_a_plain_function_gets_no_rate_search_and_failures_are_recorded(tmp_path):
    model, task = bert_classifier(), tiny_task()
    seen = []

    def score(model, fidelity):
        seen.append(fidelity.steps)
        if len(seen) == 2:
            raise RuntimeError("my loop broke")
        return 0.5

    url = f"sqlite:///{tmp_path / 's.db'}"
    plan = pp.search(model, "5%", task, evaluate=score, strategy="random", trials=3, progress=False, storage=url, seeds=0)
    trials = optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
    assert [t.user_attrs["failed"] for t in trials if t.state == optuna.trial.TrialState.FAIL] == ["RuntimeError: my loop broke"]
    assert {t.user_attrs["plan"]["recipe"]["lr"] for t in trials if "plan" in t.user_attrs} == {pp.Recipe().lr}

    with pytest.raises(StudyError, match=r"no trial completed; failures: \[\"ValueError: evaluate returned \{'acc': 1\}"):
        pp.search(model, "5%", task, evaluate=lambda m, f: {"acc": 1}, strategy="random", trials=1, progress=False, seeds=0)
    with pytest.raises(ValueError, match="the search still needs a task"):
        pp.search(model, "5%", evaluate=score)
    with pytest.raises(TypeError, match="not both"):
        pp.search(model, "5%", task, evaluate=score, evaluator=lambda *a, **k: None)
