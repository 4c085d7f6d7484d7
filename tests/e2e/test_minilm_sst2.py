"""End to end on the real model and real data (slow): plan by sensitivity on SST-2, apply,
train, and check the artifact against the model it came from."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import peftplan as pp
from peftplan.models import load_minilm, minilm_dir
from peftplan.planner.training.task import accuracy
from peftplan.planner.training.train import train

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text" / "sst2"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "train.tsv").exists(), reason=f"shared data not found at {DATA}"),
]


@pytest.fixture(scope="module")
def task():
    return pp.Task.for_sequence_classification(
        minilm_dir(), None, DATA / "train.tsv", DATA / "dev.tsv", batch_size=16, max_train=1600, max_dev=400, seed=0
    )


def test_sensitivity_plan_trains_and_round_trips(task, tmp_path):
    torch.manual_seed(0)
    model = load_minilm(num_labels=2)
    untouched = copy.deepcopy(model)
    budget = pp.Budget(params=40_000)
    plan = pp.search(model, budget, task=task, strategy="proxy", train_modules=["classifier"])
    assert 0.95 * 40_000 <= plan.objectives["params"] <= 40_000
    assert plan.provenance["scores"] == "grad2"

    pp.apply(model, plan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.objectives["params"]
    chance = accuracy(model, task.eval_batches)
    run = train(model, task, pp.Recipe(lr=2e-3, steps=80, warmup=0.0, schedule="constant", clip=None), seed=0)
    first, last = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
    acc = accuracy(model, task.eval_batches)
    assert acc > max(0.65, chance + 0.1), (chance, acc)

    # frozen base: every parameter outside the plan's sites is bit-identical to the original
    tuned = dict(model.named_parameters())
    for name, p in untouched.named_parameters():
        site = name.rsplit(".", 1)[0]
        if site not in plan.sites:
            key = name if name in tuned else f"{site}.base.{name.rsplit('.', 1)[1]}"
            assert torch.equal(tuned[key], p), name

    pp.save(model, tmp_path)
    fresh = pp.load(copy.deepcopy(untouched), tmp_path)
    # the artifact carries the LoRA weights and the fully trained head
    batch = {k: v for k, v in task.eval_batches[0].items() if k != "labels"}
    with torch.no_grad():
        model.eval(), fresh.eval()
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
        merged_before = model(**batch).logits
        pp.merge(model)
        assert torch.allclose(model(**batch).logits, merged_before, atol=1e-5)
