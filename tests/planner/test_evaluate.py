"""One trial end to end on a tiny learnable task; failures become failed trials with reasons."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import peftplan as pp
from peftplan.planner.training.evaluate import Fidelity, evaluate
from peftplan.recipe import Recipe
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier


def CONSTANT(lr):  # noqa: N802  the old loop's rule: a constant rate, no warm-up, no clipping
    return Recipe(lr=lr, warmup=0.0, schedule="constant", clip=None)


def plan_for(base, rank=4):
    g = pp.lower(base)
    sites = {s.name: {"method": "lora", "rank": rank} for s in g.select(role="attn")}
    sites["classifier"] = {"method": "full"}
    return pp.Plan(sites=sites, model={"fingerprint": g.fingerprint})


def test_trial_trains_a_copy_and_scores_it():
    base, task = bert_classifier(), tiny_task()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = evaluate(base, plan_for(base), task, Fidelity(steps=60), recipe=CONSTANT(5e-3))
    assert result.ok and result.metric >= 0.9, result
    assert result.params == 8 * 4 * (32 + 32) + 32 * 2 + 2
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base untouched
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_fidelity_limits_data_and_steps():
    base, task = bert_classifier(), tiny_task()
    result = evaluate(base, plan_for(base), task, Fidelity(steps=3, train_batches=2, eval_batches=1))
    assert result.ok and len(result.losses) == 3
    assert result.metric in {i / 16 for i in range(17)}  # one validation batch of 16
    assert result.loss is not None and result.loss > 0


def test_failures_are_recorded_not_raised():
    base, task = bert_classifier(), tiny_task()
    overflowing = replace(task, loss=lambda m, b: task.loss(m, b) * float("inf"))  # a run whose loss overflows
    diverged = evaluate(base, plan_for(base), overflowing, Fidelity(steps=30), recipe=CONSTANT(1e-3))
    assert not diverged.ok and "diverged" in diverged.failed
    bad = pp.Plan(sites={"bert.encoder.layer.0.attention.self.query": {"method": "lora", "rank": 0}})
    broken = evaluate(base, bad, task, Fidelity(steps=1))
    assert not broken.ok and "PlanError" in broken.failed and "rank" in broken.failed


def forwards(model):
    """A list that grows by one on every forward call of ``model``."""
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_metric_and_loss_take_one_pass_and_equal_the_two_separate_ones():
    from dataclasses import replace

    from peftplan.planner.training.evaluate import metric_and_loss, validation_loss
    from peftplan.planner.training.task import mcc

    torch.manual_seed(0)
    model, task = bert_classifier(), tiny_task()
    batches = task.validation_batches
    for t in (task, replace(task, metric=mcc)):  # accuracy, then Matthews correlation
        reference = (t.metric(model, batches), validation_loss(model, t, batches))  # two passes, independently
        calls = forwards(model)
        got = metric_and_loss(model, t, batches)
        assert got == pytest.approx(reference, rel=1e-6) and len(calls) == len(batches)
        model._forward_hooks.clear()
    own = replace(task, metric=lambda m, b: 0.25)  # a metric of the user's: it gets its own pass
    calls = forwards(model)
    assert metric_and_loss(model, own, batches) == pytest.approx((0.25, validation_loss(model, task, batches)))
    assert len(calls) == 2 * len(batches)  # the reference loss above, and the pair's loss pass


def test_a_causal_lms_metric_and_loss_are_one_pass_and_opposite():
    from peftplan.planner.training.evaluate import metric_and_loss, validation_loss
    from tests.planner.test_causal_lm import PAIRS
    from tests.zoo import char_tokenizer, llama

    torch.manual_seed(0)
    model = llama()
    task = pp.Task.for_causal_lm(model, char_tokenizer(), PAIRS, batch_size=3, validation=None)
    loss = validation_loss(model, task, task.train_batches)
    calls = forwards(model.model)  # the decoder's passes (the output layer runs on labelled positions only)
    metric, same = metric_and_loss(model, task, task.train_batches)
    assert metric == pytest.approx(-loss, rel=1e-6) and same == pytest.approx(loss, rel=1e-6)
    assert len(calls) == len(task.train_batches)
