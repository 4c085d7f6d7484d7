"""Recipes, users' own loops and devices under bad input: each case an exception of a stated
type whose message names the field, the trial's reason or the model and the fix, with the
base model and the files on disk left as they were."""

from __future__ import annotations

import copy
import json

import optuna
import pytest
import torch

import peftplan as pp
from peftplan.cli import main
from peftplan.models import load_model
from peftplan.planner.study import StudyError
from peftplan.planner.training.train import train
from tests.backends.adapters import plan_for, snapshot
from tests.planner.trials import tiny_task, write_task
from tests.zoo import bert_classifier

MODEL = "tests.zoo:minilm_vocab_classifier"


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("lr", True, r"Recipe\(lr=True\): the learning rate must be a positive number, at most 10"),
        ("lr", 1e300, r"Recipe\(lr=1e\+300\): the learning rate must be a positive number, at most 10"),
        ("epochs", "3", r"Recipe\(epochs='3'\): epochs must be a positive number"),
        ("steps", 2.5, r"Recipe\(steps=2.5\): steps must be a positive int"),
        ("warmup", "0.1", r"Recipe\(warmup='0.1'\): the warm-up is a share of the steps in \[0, 1\)"),
        ("weight_decay", None, r"Recipe\(weight_decay=None\): weight decay must be a non-negative number"),
        ("clip", "1", r"Recipe\(clip='1'\): the gradient-norm limit must be a positive number, or None"),
    ],
)
def test_a_recipe_field_of_the_wrong_kind_is_named(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        pp.Recipe(**{field: value})


def test_a_plan_whose_recipe_is_bad_names_the_file_and_field_and_apply_writes_nothing(tmp_path, capsys):
    task = write_task(tmp_path / "task", n_train=24, n_dev=8)
    stored = pp.search(load_model(MODEL), "1%").to_dict()
    for recipe, problem in [
        ({"lr": 1e300, "steps": 2}, r"Recipe\(lr=1e\+300\)"),
        ({"epochs": "3"}, r"Recipe\(epochs='3'\)"),
    ]:
        (tmp_path / "plan.json").write_text(json.dumps({**stored, "recipe": recipe}))
        with pytest.raises(pp.PlanError, match=f"plan.json: plan field 'recipe': {problem}"):
            pp.Plan.load(tmp_path / "plan.json")
        argv = [
            "apply",
            MODEL,
            "--plan",
            str(tmp_path / "plan.json"),
            "--task",
            str(task),
            "--tokenizer",
            "minilm",
            "-q",
            "--batch-size",
            "8",
            "-o",
            str(tmp_path / "adapter"),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "peftplan apply: error:" in err and "plan field 'recipe'" in err and "Traceback" not in err
        assert not (tmp_path / "adapter").exists()


def test_training_that_diverges_says_at_which_rate_and_what_to_do():
    model = pp.apply(bert_classifier(), plan_for(bert_classifier(), {"classifier": {"method": "full"}}))
    task = tiny_task()
    nan_loss = copy.copy(task)
    nan_loss.loss = lambda m, b: task.loss(m, b) * float("nan")
    with pytest.raises(
        FloatingPointError, match=r"training diverged: loss is nan at step 1 \(lr 0.005\): lower the learning rate"
    ):
        train(model, nan_loss, pp.Recipe(lr=5e-3, steps=2))


def test_an_fp16_model_under_cpu_bf16_is_refused_before_training():
    model = pp.apply(bert_classifier().half(), plan_for(bert_classifier(), {"classifier": {"method": "full"}}))
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"bf16=True on the CPU with BertForSequenceClassification's float16 weights.*"
        r"model.float\(\).*or drop bf16",
    ):
        train(model, tiny_task(), pp.Recipe(steps=1), bf16=True, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    with pytest.raises(ValueError, match="float16 weights"):
        pp.search(
            bert_classifier().half(),
            "5%",
            tiny_task(),
            strategy="random",
            trials=1,
            bf16=True,
            device="cpu",
            progress=False,
        )


# -- the user's own loop --------------------------------------------------------------------


def search_with(evaluate, **kw):
    base = bert_classifier()
    before = snapshot(base)
    storage = optuna.storages.InMemoryStorage()
    with pytest.warns(UserWarning, match="evaluations failed"), pytest.raises(StudyError) as raised:
        pp.search(
            base,
            "5%",
            tiny_task(),
            evaluate=evaluate,
            strategy="random",
            trials=2,
            progress=False,
            seeds=0,
            storage=storage,
            study_name="s",
            **kw,
        )
    assert all(torch.equal(v, before[k]) for k, v in snapshot(base).items())  # the base is untouched
    failed = [t.user_attrs["failed"] for t in optuna.load_study(study_name="s", storage=storage).trials]
    return str(raised.value), failed


def test_a_loop_returning_a_tensor_of_two_values_fails_its_trials_saying_so():
    message, failed = search_with(lambda model, fidelity: torch.tensor([0.5, 0.6]))
    assert failed and all(
        f == "ValueError: evaluate returned Tensor of shape (2,) as the metric: return one number "
        "(higher is better), e.g. value.item() or value.mean().item()"
        for f in failed
    )
    assert "evaluate returned Tensor of shape (2,)" in message


def test_a_loop_that_unfreezes_the_base_fails_its_trials_naming_what_it_made_trainable():
    counts = []

    def unfreeze(model, fidelity):
        planned = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.requires_grad_(True)
        counts.append((planned, sum(p.numel() for p in model.parameters()) - planned))
        return 0.5

    _, failed = search_with(unfreeze)
    assert len(failed) == len(counts) >= 3
    for reason, (planned, added) in zip(failed, counts):
        assert f"evaluate made {added:,} more parameters trainable than the plan's {planned:,} " in reason
        assert "bert.embeddings.word_embeddings.weight" in reason and "leave requires_grad as the plan set it" in reason


transformers = pytest.importorskip("transformers")


def test_trainer_loop_checks_compute_metrics_and_labels(tmp_path):
    from peftplan.integrations.transformers import TrainerLoop
    from tests.planner.test_trainer_loop import arguments, token_data

    loop = TrainerLoop(
        arguments(tmp_path), token_data(32, 0), token_data(8, 1), compute_metrics=lambda p: None, metric="accuracy"
    )
    message, failed = search_with(loop)
    assert failed and all(
        f.startswith(
            'TypeError: compute_metrics returned None: return a dict of metric names to numbers, e.g. {"accuracy": 0.9}'
        )
        for f in failed
    )
    unlabelled = TrainerLoop(arguments(tmp_path), token_data(32, 0).remove_columns("labels"), token_data(8, 1))
    with pytest.raises(
        ValueError,
        match=r"TrainerLoop: the train_dataset's batches have no 'labels' \(their keys are "
        r"\['attention_mask', 'input_ids'\]\).*add a 'labels' column",
    ):
        pp.search(bert_classifier(), "5%", evaluate=unlabelled, strategy="random", trials=1, progress=False)


def test_a_task_loss_that_gives_no_tensor_is_named_when_scoring_sites():
    from peftplan.planner.proxy.scores import grad2_scores
    from peftplan.planner.training.task import Task

    model = bert_classifier()
    batch = {k: v for k, v in tiny_task().train_batches[0].items() if k != "labels"}
    with pytest.raises(
        ValueError,
        match=r"task 'mine': its loss gave NoneType, not a tensor, for a batch with keys "
        r"\['attention_mask', 'input_ids'\]: a batch needs its labels",
    ):
        grad2_scores(model, pp.lower(model), Task([batch], [], lambda m, b: None, None, name="mine"), progress=False)
