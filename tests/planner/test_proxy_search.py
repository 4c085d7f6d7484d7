import copy

import pytest
import torch

import peftplan
from peftplan.backends.base import get_method
from peftplan.planner import (
    Budget,
    BudgetError,
    Plan,
    Task,
    allocate,
    eligible_sites,
    grad2_scores,
    search,
)
from peftplan.planner.training.task import accuracy, classification_loss


def check_plan(plan: Plan, graph, limit: int) -> None:
    lora = get_method("lora")
    total = 0
    for name, entry in plan.sites.items():
        site = graph[name]
        assert entry["role"] == site.role and entry["depth"] == site.depth and entry["op"] == site.op
        assert entry["shape"] == [site.in_features, site.out_features]
        if entry["method"] == "lora":
            assert entry["alpha"] == 2 * entry["rank"]
            assert site.role.split(".")[0] in ("attn", "mlp")
            total += lora.param_count(site, rank=entry["rank"])
        else:
            assert entry["method"] == "full"
            total += site.params
    assert plan.objectives == {"params": total}
    assert 0.95 * limit <= total <= limit
    assert list(plan.sites) == [s.name for s in graph if s.name in plan.sites]  # execution order
    assert plan.model == {"fingerprint": graph.fingerprint, "class": graph.model_class, "n_sites": len(graph)}


def test_data_free_plan(tiny_bert, tiny_bert_graph, tmp_path):
    plan = search(tiny_bert, 2_000, graph=tiny_bert_graph)
    check_plan(plan, tiny_bert_graph, 2_000)
    assert plan.budget == {"params": 2_000}
    assert {k: plan.provenance[k] for k in ("strategy", "seed", "task", "scores")} == {
        "strategy": "proxy",
        "seed": 0,
        "task": None,
        "scores": "hill-alpha",
    }
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def test_budget_forms_and_determinism(tiny_bert, tiny_bert_graph):
    plans = [search(tiny_bert, b, graph=tiny_bert_graph) for b in (Budget(params=3_000), 3_000, "3k", "3,000")]
    assert all(p.sites == plans[0].sites for p in plans)
    limit = int(tiny_bert_graph.total_params * 0.01)
    check_plan(search(tiny_bert, "1%", graph=tiny_bert_graph, train_modules=[]), tiny_bert_graph, limit)


def test_lowers_the_model_when_no_graph_is_given(tiny_bert, tiny_bert_graph):
    assert search(tiny_bert, 2_000).sites == search(tiny_bert, 2_000, graph=tiny_bert_graph).sites


def test_train_modules_are_paid_first(tiny_bert, tiny_bert_graph):
    plan = search(tiny_bert, 1_000, graph=tiny_bert_graph, train_modules=["classifier"])
    assert plan.sites["classifier"] == {
        "method": "full",
        "role": "head",
        "depth": 1.0,
        "op": "linear",
        "shape": [32, 2],
    }
    check_plan(plan, tiny_bert_graph, 1_000)
    # classifier 32*2+2 = 66 params; cheapest LoRA rank 1: a 32x32 attention projection, 64 params
    with pytest.raises(BudgetError, match="raise it to at least 130") as e:
        search(tiny_bert, 129, graph=tiny_bert_graph, train_modules=["classifier"])
    assert e.value.minimum == 130
    with pytest.raises(BudgetError, match="below the 66 params of train_modules"):
        search(tiny_bert, 50, graph=tiny_bert_graph, train_modules=["classifier"])
    with pytest.raises(ValueError, match="train_modules: no site named 'clasifier'"):
        search(tiny_bert, 1_000, graph=tiny_bert_graph, train_modules=["clasifier"])


def test_clear_errors(tiny_bert, tiny_bert_graph):
    with pytest.raises(ValueError, match=r"unknown strategy 'nsga3'"):
        search(tiny_bert, 1_000, graph=tiny_bert_graph, strategy="nsga3")
    with pytest.raises(BudgetError, match="no parameter limit"):
        search(tiny_bert, Budget(), graph=tiny_bert_graph)
    with pytest.raises(BudgetError, match="ambiguous"):
        search(tiny_bert, 0.005, graph=tiny_bert_graph)
    with pytest.raises(BudgetError, match="at least 64"):
        search(tiny_bert, 10, graph=tiny_bert_graph, train_modules=[])
    with pytest.raises(BudgetError, match="below the 66 params of train_modules"):
        search(tiny_bert, 10, graph=tiny_bert_graph)  # the new head, trained by default


@pytest.fixture
def toy_task():
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1, 100, (8, 12), generator=g)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (8,), generator=g),
        }

    return Task([batch() for _ in range(3)], [batch()], classification_loss, accuracy, name="toy")


def test_task_plan_uses_grad2_and_applies(tiny_bert, tiny_bert_graph, toy_task):
    plan = search(
        tiny_bert, 4_000, toy_task, strategy="proxy", graph=tiny_bert_graph, train_modules=["classifier"], seed=1
    )
    check_plan(plan, tiny_bert_graph, 4_000)
    assert plan.provenance["task"] == "toy" and plan.provenance["scores"] == "grad2"
    assert plan.provenance["seed"] == 1
    assert (
        search(
            tiny_bert, 4_000, toy_task, strategy="proxy", graph=tiny_bert_graph, train_modules=["classifier"], seed=1
        ).sites
        == plan.sites
    )

    tuned = peftplan.apply(copy.deepcopy(tiny_bert), plan)
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert trainable == plan.objectives["params"]


def test_sensitivity_power_and_calibration_batches_by_hand(tiny_bert, tiny_bert_graph, toy_task):
    # the plan is `allocate` on grad² (over the first calibration_batches) raised to the power
    names = [s.name for s in eligible_sites(tiny_bert_graph, "lora", ("attn", "mlp"), exclude={"classifier"})]
    limit = 4_000 - 66  # the classifier (32*2+2) is paid first
    for batches, power in [(4, 0.5), (1, 0.5), (2, 1.0), (3, 0.0)]:
        mass = grad2_scores(tiny_bert, tiny_bert_graph, toy_task, names, batches=batches)
        expected = allocate(tiny_bert_graph, {n: m**power for n, m in mass.items()}, limit)
        plan = search(
            tiny_bert,
            4_000,
            toy_task,
            strategy="proxy",
            graph=tiny_bert_graph,
            train_modules=["classifier"],
            calibration_batches=batches,
            sensitivity_power=power,
        )
        assert {n: e["rank"] for n, e in plan.sites.items() if e["method"] == "lora"} == expected
        assert plan.provenance["calibration_batches"] == batches and plan.provenance["sensitivity_power"] == power
    # power 0 scores every site alike: the plan is the one for equal scores
    assert expected == allocate(tiny_bert_graph, dict.fromkeys(names, 1.0), limit)


def test_sensitivity_power_must_be_non_negative(tiny_bert, tiny_bert_graph, toy_task):
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sensitivity_power must be finite and non-negative"):
            search(tiny_bert, 4_000, toy_task, strategy="proxy", graph=tiny_bert_graph, sensitivity_power=bad)
