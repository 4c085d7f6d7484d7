"""`search(..., evaluate=fn)`: the user's own loop scores each trial, on a fresh copy of the
base with the trial's plan applied, at the trial's steps and learning rate."""

from __future__ import annotations

import optuna
import pytest
import torch

import peftplan as pp
from peftplan.planner.study import StudyError
from peftplan.planner.training.task import Task
from peftplan.planner.training.user_loop import model_loss
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
        frozen = all(
            not p.requires_grad for n, p in model.named_parameters() if "lora" not in n and "classifier" not in n
        )
        calls.append((trainable, frozen, fidelity.steps, recipe.steps, recipe.lr))
        torch.nn.init.normal_(
            next(p for p in model.parameters() if p.requires_grad)
        )  # "training" touches the copy only
        return {"metric": recipe.lr * fidelity.steps, "loss": 1.0 / fidelity.steps}

    url = f"sqlite:///{tmp_path / 's.db'}"
    plan = pp.search(
        model,
        "5%",
        task,
        evaluate=my_loop,
        strategy="random",
        trials=4,
        recipe=pp.Recipe(lr=1e-3, steps=20),
        storage=url,
        progress=False,
        seeds=0,
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the base is untouched
    trials = optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
    evaluated = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "reused" not in t.user_attrs]
    assert len(calls) == len(evaluated) >= 4
    for (trainable, frozen, steps, recipe_steps, lr), t in zip(calls, sorted(evaluated, key=lambda t: t.number)):
        assert frozen and trainable == t.user_attrs["costs"]["params"]  # the trial's plan, applied
        assert steps == recipe_steps == (1 if t.user_attrs["rung"] == 0 else 20)  # 5% of the recipe, then all of it
        assert lr == pytest.approx(t.user_attrs["plan"]["recipe"]["lr"])  # the rate the search chose for the trial
        metric = t.user_attrs.get("measured", t.values)[0]  # a screen tells the sampler minus its loss
        assert metric == pytest.approx(lr * steps) and t.user_attrs["validation_loss"] == pytest.approx(1 / steps)
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
    plan = pp.search(
        model, "5%", task, evaluate=score, strategy="random", trials=3, progress=False, storage=url, seeds=0
    )
    trials = optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
    assert [t.user_attrs["failed"] for t in trials if t.state == optuna.trial.TrialState.FAIL] == [
        "RuntimeError: my loop broke"
    ]
    assert {t.user_attrs["plan"]["recipe"]["lr"] for t in trials if "plan" in t.user_attrs} == {pp.Recipe().lr}

    with pytest.raises(
        StudyError, match=r"no trial completed; failures: \[\"ValueError: evaluate returned \{'acc': 1\}"
    ):
        pp.search(
            model, "5%", task, evaluate=lambda m, f: {"acc": 1}, strategy="random", trials=1, progress=False, seeds=0
        )
    with pytest.raises(TypeError, match="not both"):
        pp.search(model, "5%", task, evaluate=score, evaluator=lambda *a, **k: None)


def trial_plans(plan, url) -> list[dict]:
    """The LoRA ranks of each plan the study trained."""
    trials = optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
    return [
        {n: e["rank"] for n, e in t.user_attrs["plan"]["sites"].items() if e["method"] == "lora"}
        for t in trials
        if "plan" in t.user_attrs
    ]


def ranks(plan) -> dict:
    return {n: e["rank"] for n, e in plan.sites.items() if e["method"] == "lora"}


def test_a_loop_without_a_task_scores_sites_from_weights_and_says_so_once(tmp_path):
    model = bert_classifier()
    seen = []

    def score(model, fidelity):  # a loop that trains its own way: here, a score that improves with length
        seen.append((fidelity.steps, fidelity.share))
        return fidelity.share

    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.warns(UserWarning, match="data-free") as record:
        plan = pp.search(model, "5%", evaluate=score, trials=7, progress=False, storage=url)  # 5 seeds, 2 followers
    assert sum("without a task" in str(w.message) for w in record) == 1
    assert ranks(pp.search(model, "5%")) in trial_plans(plan, url)  # the data-free proxy plan seeds the search
    # no batches count an epoch: the default recipe (one epoch) reaches the loop as shares of it
    assert {s for s in seen} == {(None, 0.05), (None, 1.0)} and plan.recipe.epochs in (None, 1.0)

    steps = []
    pp.search(
        model,
        "5%",
        evaluate=lambda m, fidelity: steps.append(fidelity.steps) or 0.5,
        trials=2,
        progress=False,
        recipe=pp.Recipe(steps=40),
        seeds=0,
        strategy="random",
    )
    assert set(steps) == {2, 40}  # a recipe in steps: 5% of it, then all of it
    with pytest.raises(ValueError, match="training memory depends on the training batch"):
        pp.search(model, pp.Budget(params="5%", memory="1MiB"), evaluate=score, trials=1, progress=False)


def test_calibration_batches_give_grad2_scores_without_a_task(tmp_path):
    model, task = bert_classifier(), tiny_task()
    read = []

    def loader():  # a DataLoader-like stream of the user's batches, of which only the first few are read
        for batch in task.train_batches:
            read.append(1)
            yield batch

    with_task = pp.search(
        model, "5%", task=Task(task.train_batches, [], model_loss, None), calibration_batches=3, strategy="proxy"
    )
    calibrated = pp.search(model, "5%", calibration=loader(), calibration_batches=3)
    assert len(read) == 3 and calibrated.provenance["scores"] == "grad2"
    assert ranks(calibrated) == ranks(with_task) != ranks(pp.search(model, "5%"))

    url = f"sqlite:///{tmp_path / 's.db'}"
    loop = pp.search(
        model,
        "5%",
        evaluate=lambda m, f: 0.5,
        calibration=torch.utils.data.DataLoader(task.train_batches, batch_size=None),
        calibration_batches=3,
        trials=7,  # the proxy plan at the whole budget follows the first baseline's rates and 2 cheaper proxy plans
        progress=False,
        storage=url,
    )
    assert ranks(calibrated) in trial_plans(loop, url)  # the grad² proxy plan seeds the search

    with pytest.raises(TypeError, match="yields Tensors"):
        pp.search(model, "5%", calibration=[torch.ones(2, 8)])
    with pytest.raises(TypeError, match="not both"):
        pp.search(model, "5%", task=task, calibration=task.train_batches)
    with pytest.raises(ValueError, match="calibration= batches only score sites"):
        pp.search(model, "5%", calibration=task.train_batches, strategy="gp")
    with pytest.raises(ValueError, match="include its labels"):
        pp.search(model, "5%", calibration=[{k: v for k, v in b.items() if k != "labels"} for b in task.train_batches])
