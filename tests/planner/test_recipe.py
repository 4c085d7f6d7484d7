"""`Recipe`: the learning-rate schedule by hand, `train` following it, clipping, and the plan
file carrying it (version 2, version 1 still read)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import peftplan as pp
from peftplan.planner.training.train import train
from peftplan.recipe import Recipe
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier as tiny_bert


def plan_for(base):
    graph = pp.lower(base)
    return pp.Plan(sites={s.name: {"method": "lora", "rank": 2} for s in graph.select(role="attn")})


def test_schedules_by_hand():
    linear = Recipe(lr=1.0, steps=10, warmup=0.2)  # 2 warm-up steps, then 8 decaying to 0
    assert [linear.lr_at(s) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    )
    cosine = Recipe(lr=1.0, steps=5, warmup=0.0, schedule="cosine")
    assert [cosine.lr_at(s) for s in range(5)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    )
    assert {Recipe(lr=3.0, steps=4, warmup=0.0, schedule="constant").lr_at(s) for s in range(4)} == {3.0}
    assert Recipe(epochs=2.5).total_steps(batches_per_epoch=4) == 10 and Recipe().total_steps(7) == 7


def test_train_follows_the_schedule_and_clips():
    model, task = pp.apply(tiny_bert(), plan_for(tiny_bert())), tiny_task()
    seen, norms = [], []
    recipe = Recipe(lr=1e-2, steps=6, warmup=0.34, clip=1e-3)
    original = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        norms.append(
            torch.nn.utils.get_total_norm(
                [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            ).item()
        )
        return original(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        run = train(model, task, recipe)
    finally:
        torch.optim.AdamW.step = original
    assert run.steps == 6 and seen == pytest.approx([recipe.lr_at(s) for s in range(6)])
    assert max(norms) <= 1e-3 * (1 + 1e-4)  # clipped to the recipe's norm


def test_bad_recipes_and_a_batch_size_mismatch_are_errors():
    for bad, message in [
        ({"lr": 0}, "positive number"),
        ({"steps": 5, "epochs": 1}, "not both"),
        ({"warmup": 1.0}, r"\[0, 1\)"),
        ({"schedule": "step"}, "choose one of"),
        ({"clip": 0}, "positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            Recipe(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        Recipe.from_dict({"lr": 1e-3, "lr_decay": 0.1})
    model, task = pp.apply(tiny_bert(), plan_for(tiny_bert())), tiny_task()  # batches of 16
    with pytest.raises(ValueError, match="made for batches of 32, task 'tiny' has batches of 16"):
        train(model, task, Recipe(batch_size=32))


def test_a_plan_keeps_its_recipe_and_old_plans_still_load(tmp_path):
    plan = pp.Plan(sites={"0": {"method": "lora", "rank": 2}}, recipe=Recipe(lr=2e-3, steps=600, schedule="cosine"))
    plan.save(tmp_path / "plan.json")
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["version"] == 2 and stored["recipe"]["lr"] == 2e-3
    assert pp.Plan.load(tmp_path / "plan.json").recipe == plan.recipe
    old = {k: v for k, v in stored.items() if k != "recipe"} | {"version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert pp.Plan.load(tmp_path / "v1.json").recipe is None
    with pytest.raises(pp.PlanError, match="plan field 'recipe': recipe has unknown field"):
        pp.Plan.from_dict(stored | {"recipe": {"lr": 1e-3, "momentum": 0.9}})
