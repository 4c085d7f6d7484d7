"""`peftplan.search` picks the strategy: proxy without a task, a trained search with one."""

from __future__ import annotations

import pytest

import peftplan as pp
from peftplan.cli import build_parser
from peftplan.planner.strategies import DEFAULT
from tests.planner.trials import stand_in, tiny_task
from tests.zoo import bert_classifier


def test_task_search_returns_best_plan_with_front():
    model, task = bert_classifier(), tiny_task()
    plan = pp.search(model, "5%", task, strategy="random", trials=4, evaluator=stand_in, progress=False, threads=1)
    assert plan.front is not None and len(plan.front) >= 1
    best = plan.front.best()
    assert plan.sites == best.plan.sites
    limit = pp.Budget(params="5%").param_limit(pp.lower(model).total_params)
    assert all(p.values["params"] <= limit for p in plan.front)


def test_defaults_and_errors():
    model = bert_classifier()
    assert pp.search(model, "5%").provenance["strategy"] == "proxy"
    # with a task: the strategy the search benchmark chose, which the CLI and the README name too
    with_task = pp.search(model, "5%", tiny_task(), trials=6, evaluator=stand_in, progress=False, threads=1)
    assert with_task.provenance["strategy"] == DEFAULT == "gp"
    assert build_parser().parse_args(["search", "m", "--task", "t", "--budget", "1%"]).strategy == "gp"
    with pytest.raises(ValueError, match="trains candidate plans: pass task"):
        pp.search(model, "5%", strategy="tpe")
    with pytest.raises(ValueError, match="unknown strategy 'annealing'"):
        pp.search(model, "5%", strategy="annealing")
    with pytest.raises(TypeError, match=r"trains nothing, so it cannot use \['lr'\]"):
        pp.search(model, "5%", strategy="proxy", lr=1e-3)
