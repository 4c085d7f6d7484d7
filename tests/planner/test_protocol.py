"""The honest protocol: a search scores candidates on a validation split carved from the
training data and never touches the evaluation split its result is reported on."""

from __future__ import annotations

import pytest
import torch

import peftplan as pp
from peftplan.planner.training.task import stratified_split
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier as tiny_bert


class Untouchable(list):
    """An evaluation split that fails the test the moment anything reads it."""

    def _touched(self, *args, **kwargs):
        raise AssertionError("the search read the evaluation split")

    __iter__ = __getitem__ = __len__ = __bool__ = _touched


def test_a_search_never_touches_the_evaluation_split():
    torch.set_num_threads(1)
    task = tiny_task()
    task.eval_batches = Untouchable(task.eval_batches)
    plan = pp.search(
        tiny_bert(), "5%", task, strategy="tpe", trials=2, recipe=pp.Recipe(lr=5e-3, steps=4), progress=False, threads=1
    )
    assert len(plan.front) >= 1
    assert pp.search(tiny_bert(), "5%", task, strategy="proxy").objectives["params"] > 0


def test_a_search_without_a_validation_split_is_refused():
    task = tiny_task()
    task.validation_batches = []
    with pytest.raises(ValueError, match="no validation batches.*never on the evaluation split"):
        pp.search(tiny_bert(), "5%", task, strategy="random", trials=1)
    carved = task.with_validation(2, seed=0)
    assert len(carved.validation_batches) == 2 and len(carved.train_batches) == len(task.train_batches) - 2
    assert not any(b is v for b in carved.train_batches for v in carved.validation_batches)


def test_the_validation_split_is_stratified_seeded_and_disjoint():
    rows = [(0, f"neg {i}") for i in range(30)] + [(1, f"pos {i}") for i in range(10)]
    rest, held = stratified_split(rows, 0.2, seed=3)
    assert sorted(label for label, _ in held) == [0] * 6 + [1] * 2  # 30:10 kept in the 8 held out
    assert set(rest).isdisjoint(held) and len(rest) + len(held) == len(rows)
    assert stratified_split(rows, 0.2, seed=3) == (rest, held) and stratified_split(rows, 0.2, seed=4) != (rest, held)
    assert len(stratified_split(rows, 5)[1]) == 5
    for bad, message in [(1.5, r"lies in \(0, 1\)"), (40, "leaves no training"), (0, "leaves no validation")]:
        with pytest.raises(ValueError, match=message):
            stratified_split(rows, bad)
