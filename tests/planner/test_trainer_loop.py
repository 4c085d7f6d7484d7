"""A search whose trials train with the Hugging Face `Trainer` (`TrainerLoop`): four trials on
a tiny random-weight BERT, each reproduced by a plain `Trainer` run of its plan."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

import peftplan as pp

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def token_data(n, seed):
    """Label = whether token 5 appears (as `tests.planner.trials.tiny_task`), fixed length 8."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 50, (n, 8), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 3] = 5
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * n, "labels": labels.tolist()}
    )


def arguments(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=10,
        learning_rate=2e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_strategy="no",
        **kw,
    )


def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def test_a_four_trial_search_through_trainer(tmp_path):
    from peftplan.integrations.transformers import TrainerLoop
    from tests.zoo import bert_classifier

    model, train, held = bert_classifier(), token_data(64, 0), token_data(16, 1)
    loop = TrainerLoop(
        arguments(tmp_path), train, held, transformers.default_data_collator, accuracy, metric="accuracy"
    )
    assert loop.recipe == pp.Recipe(lr=2e-3, steps=10, warmup=0.0, clip=1.0)
    url = f"sqlite:///{tmp_path / 's.db'}"
    plan = pp.search(model, "5%", evaluate=loop, strategy="random", trials=4, storage=url, progress=False, seeds=0)
    trials = optuna.load_study(study_name=plan.provenance["study"], storage=url).trials
    trained = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "reused" not in t.user_attrs]
    assert sum(t.user_attrs["rung"] == 0 for t in trained) == 4 and not any("failed" in t.user_attrs for t in trials)

    top = max((t for t in trained if t.user_attrs["rung"] == 1), key=lambda t: t.number)
    torch.manual_seed(0)  # as the trial did (the search's seed) before applying its plan
    tuned = pp.apply(copy.deepcopy(model), pp.Plan.from_dict(top.user_attrs["plan"]))
    lr = top.user_attrs["plan"]["recipe"]["lr"]
    assert lr != 2e-3  # the search chose this trial's rate
    args = arguments(tmp_path)
    args.learning_rate = lr
    reference = transformers.Trainer(
        model=tuned,
        args=args,
        train_dataset=train,
        eval_dataset=held,
        compute_metrics=accuracy,
        data_collator=transformers.default_data_collator,
    )
    reference.train()
    scores = reference.evaluate()
    assert top.values[0] == pytest.approx(scores["eval_accuracy"])
    assert top.user_attrs["validation_loss"] == pytest.approx(scores["eval_loss"], rel=1e-5)


def test_the_default_score_is_minus_the_eval_loss_and_errors_are_clear(tmp_path):
    from peftplan.integrations.transformers import TrainerLoop
    from tests.zoo import bert_classifier

    train, held = token_data(16, 0), token_data(8, 1)
    loop = TrainerLoop(arguments(tmp_path), train, held)
    model = bert_classifier()
    task = loop.task(model)
    plan = pp.search(model, "5%", strategy="proxy", task=task)
    assert sorted(task.train_batches[0]) == ["attention_mask", "input_ids", "labels"] and len(task.train_batches) == 2
    out = loop(pp.apply(copy.deepcopy(model), plan), pp.Fidelity(steps=1), pp.Recipe(lr=1e-3))
    assert out["metric"] == pytest.approx(-out["loss"])
    with pytest.raises(ValueError, match="not 'eval_f1'"):
        TrainerLoop(arguments(tmp_path), train, held, metric="f1")(
            pp.apply(copy.deepcopy(model), plan), pp.Fidelity(steps=1), pp.Recipe()
        )
    with pytest.raises(ValueError, match="give a non-empty eval_dataset"):
        TrainerLoop(arguments(tmp_path), train, None)
