"""The demo's table is fair to peft: peft's LoRA is tuned over a grid of learning rates chosen on
validation (never on the reported split), each row says its cost in trainings, and the note says
how much of the searched plan's gain is the learning rate."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

import peftplan as pp
from peftplan.planner.front import FrontPoint, ParetoFront
from peftplan.planner.training.evaluate import Fidelity
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("sst2_demo", ROOT / "examples" / "sst2_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peft_is_tuned_on_validation_over_the_grid(demo):
    task, recipe = tiny_task(), pp.Recipe(lr=1e-3, steps=30, batch_size=16)
    args = argparse.Namespace(seed=0, peft_lrs=[1e-4, 1e-3, 3e-2])
    (untuned, tuned), params = demo.peft_rows(bert_classifier(), task, recipe, args)
    runs = {}
    for lr in (1e-4, 1e-3, 3e-2):  # each rate trained again, from the same start, as a reference
        base = bert_classifier()
        torch.manual_seed(0)
        model = demo.peft_baseline(base)
        runs[lr] = demo.train_and_score(model, task, pp.Recipe(lr=lr, steps=30, batch_size=16), args, "reference")
    assert untuned[2:6] == (1e-3, 1, runs[1e-3][3], runs[1e-3][4])  # the recipe's rate, one training
    assert runs[3e-2][3] > max(runs[1e-4][3], runs[1e-3][3])  # on this task the highest rate learns in 30 steps
    assert tuned[2:6] == (3e-2, 3, runs[3e-2][3], runs[3e-2][4]) and tuned[0].endswith("lr tuned")
    assert params == runs[1e-3][0] == untuned[1]


def test_the_search_costs_its_screens_by_their_share(demo):
    recipe = pp.Recipe(lr=1e-3, steps=200)
    short, full = str(Fidelity(share=0.05)), str(Fidelity())
    front = ParetoFront([], {"metric": "max", "params": "min"})
    front.evaluated = [
        FrontPoint({"metric": 0.5, "params": 1}, None, {"fidelity": f}) for f in [short] * 16 + [full] * 7
    ]
    assert demo.search_cost(front, recipe) == pytest.approx(16 * 0.05 + 7)  # the README's 7.8 trainings


def test_the_note_says_the_gain_of_peft_s_own_plan_is_its_learning_rate(demo):
    base = bert_classifier()
    qv = [n for n, _ in base.named_modules() if n.endswith(("attention.self.query", "attention.self.value"))]
    plan = pp.Plan(sites={**{n: {"method": "lora", "rank": 8} for n in qv}, "classifier": {"method": "full"}})
    rows = [
        ("peft untuned", 100, 1e-3, 1, 0.80, 0.78, 1.0, "-"),
        ("peft tuned", 100, 3e-3, 3, 0.84, 0.83, 1.0, "-"),
        ("proxy", 100, 1e-3, 1, 0.81, 0.80, 1.0, "0s"),
        ("searched", 100, 2.5e-3, 8.8, 0.85, 0.84, 1.0, "60s"),
    ]
    note = demo.gain_note(rows, plan, base)
    assert (
        "= +0.0600" in note
        and "(the best of 3 rates on validation, 0.003) gives +0.0500" in note
        and "beyond that +0.0100" in note
    )
    assert "cost 8.8 trainings" in note and "what it adds is its learning rate" in note
    other = pp.Plan(sites={qv[0]: {"method": "lora", "rank": 4}})
    assert "what it adds" not in demo.gain_note(rows, other, base)
