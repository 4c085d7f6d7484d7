"""The chance-level and collapse warning: a model that answers one class throughout triggers it,
one that reads the answer from its input does not; chance is the majority share, counted by hand."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from peftplan.planner.training.diagnose import diagnose, diagnose_metric, diagnose_model
from peftplan.planner.training.task import Task, accuracy, classification_loss, mcc

LABELS = [0] * 36 + [1] * 24  # majority share 0.6


class Reader(nn.Module):
    """Logits from the input's first token (token k answers class k), or one ``constant`` class."""

    def __init__(self, constant: int | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.constant = constant

    def forward(self, input_ids):
        first = input_ids[:, 0] if self.constant is None else torch.full_like(input_ids[:, 0], self.constant)
        return SimpleNamespace(logits=self.scale * nn.functional.one_hot(first, 2).float())  # (B, 2)


def task(metric=accuracy) -> Task:
    labels = torch.tensor(LABELS)
    batches = [
        {"input_ids": torch.stack([y, torch.full_like(y, 3)], 1), "labels": y} for y in labels.split(12)
    ]  # (12, 2)
    return Task(
        batches, batches, classification_loss, metric, validation_batches=batches, labels=("negative", "positive")
    )


def test_a_collapsed_classifier_is_named_with_its_class():
    t, model = task(), Reader(constant=0)
    metric = accuracy(model, t.validation_batches)
    assert metric == 36 / 60  # always class 0: the majority share
    warning = diagnose_model(model, t, "validation", t.validation_batches, metric)
    assert warning is not None
    assert "validation accuracy 0.6000 is at chance level" in warning and "(36 of 60 labels)" in warning
    assert "collapse to one class: 'negative' for 100% of the 60 validation examples" in warning
    assert "--steps" in warning and "--lr" in warning


def test_a_classifier_that_learnt_says_nothing():
    t, model = task(), Reader()
    metric = accuracy(model, t.validation_batches)
    assert metric == 1.0
    assert diagnose_model(model, t, "validation", t.validation_batches, metric) is None
    assert (
        diagnose_model(model, task(mcc), "validation", t.validation_batches, mcc(model, t.validation_batches)) is None
    )


def test_chance_is_two_standard_errors_above_the_majority_share():
    labels = torch.tensor(LABELS)
    error = (0.6 * 0.4 / 60) ** 0.5  # binomial standard error of a share measured on 60 examples
    assert diagnose("validation", "accuracy", 0.6 + 1.9 * error, labels) is not None
    assert diagnose("validation", "accuracy", 0.6 + 2.1 * error, labels) is None
    assert diagnose("validation", "MCC", 1.9 / 60**0.5, labels) is not None
    assert diagnose("validation", "MCC", 2.1 / 60**0.5, labels) is None


def test_a_search_metric_is_checked_against_the_validation_labels():
    assert "validation accuracy 0.6100 is at chance level" in diagnose_metric(task(), 0.61)
    assert diagnose_metric(task(), 0.95) is None
    assert diagnose_metric(task(), None) is None


def test_one_scoring_pass_gives_the_metric_the_loss_and_the_predictions_the_check_reads():
    from peftplan.planner.training.classification import predictions
    from peftplan.planner.training.evaluate import scores, validation_loss

    t, model, calls = task(), Reader(constant=0), []
    model.register_forward_hook(lambda *_: calls.append(1))
    scored = scores(model, t, t.validation_batches)
    assert len(calls) == len(t.validation_batches)  # one forward pass per batch
    predicted, true = predictions(model, t.validation_batches)  # the reference: a pass of its own
    assert torch.equal(scored.predicted, predicted) and torch.equal(scored.true, true)
    assert scored.metric == accuracy(model, t.validation_batches)
    assert scored.loss == validation_loss(model, t, t.validation_batches)
    calls.clear()
    warning = diagnose_model(model, t, "validation", t.validation_batches, scored.metric, scored)
    assert calls == [] and "collapse to one class" in warning  # the check reads the predictions it was given
