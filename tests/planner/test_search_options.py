"""One set of proxy options for both search paths; memory costed at the task's batch; the CLI's
calibration batches. Each test here failed before its fix."""

from __future__ import annotations

import optuna
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import peftplan as pp
from peftplan.cli import main
from peftplan.models import minilm_dir
from peftplan.planner.cost import plan_cost
from peftplan.planner.space import default_space
from peftplan.planner.study import run_search
from tests.planner.trials import stand_in, tiny_task
from tests.zoo import bert_classifier

OPTIONS = {"roles": ("attn",), "max_rank": 2, "sensitivity_power": 1.0, "calibration_batches": 2}


def test_the_training_path_uses_every_proxy_option_and_seeds_with_the_proxy_plan():
    model, task = bert_classifier(), tiny_task()
    proxy = pp.search(model, "5%", task, strategy="proxy", **OPTIONS)
    searched = pp.search(
        model, "5%", task, strategy="tpe", trials=3, evaluator=stand_in, progress=False, threads=1, **OPTIONS
    )
    graph = pp.lower(model)
    first = min(searched.front.points + [], key=lambda p: p.info["trial"]) if searched.front else None
    assert first is not None
    for point in searched.front:
        for name, entry in point.plan.tuned().items():
            assert entry["method"] == "full" or (graph[name].role.startswith("attn") and entry["rank"] <= 2)
    # a seeded strategy's baselines include the proxy plan at the whole budget: same sites, same head
    storage = optuna.storages.InMemoryStorage()
    pp.search(
        model,
        "5%",
        task,
        strategy="tpe",
        trials=9,  # query-value at 3 rates (and once past its edge, where it screens best), 2 cheaper proxy
        # plans, then the 3 other baselines
        evaluator=stand_in,
        progress=False,
        threads=1,
        storage=storage,
        study_name="s",
        **OPTIONS,
    )
    baselines = {
        t.user_attrs["baseline"]: t
        for t in optuna.load_study(study_name="s", storage=storage).trials
        if "baseline" in t.user_attrs and t.user_attrs.get("rung") == 0
    }
    assert sorted(baselines) == ["activation", "proxy", "query-value", "uniform"]
    assert baselines["proxy"].user_attrs["plan"]["sites"] == proxy.sites
    assert proxy.sites["classifier"]["method"] == "full"  # one head rule in both paths


def test_an_option_a_path_cannot_use_is_an_error():
    model, task = bert_classifier(), tiny_task()
    with pytest.raises(TypeError, match=r"cannot use \['storage', 'trials'\]"):
        pp.search(model, "5%", trials=8, storage="sqlite:///x.db")
    space = default_space(model, "5%", task)
    with pytest.raises(ValueError, match="a given space brings its own"):
        run_search(
            model,
            "5%",
            task,
            strategy="random",
            trials=1,
            space=space,
            proxy=pp.planner.proxy.options.ProxyOptions(max_rank=2),
            evaluator=stand_in,
            progress=False,
        )
    with pytest.raises(ValueError, match="sensitivity_power must be finite"):
        pp.search(model, "5%", task, strategy="random", trials=1, sensitivity_power=-1.0, evaluator=stand_in)


def test_training_memory_is_costed_at_the_tasks_batch_shape():
    model, task = bert_classifier(), tiny_task(batch=16)  # 16 x 8 positions per step; the lowering saw 1 x 16
    space = default_space(model, "5%", task)
    plan = space.plan_from_params(space.seeds(1)[0])
    at_batch = pp.lower(model, example_inputs={k: v for k, v in task.train_batches[0].items() if k != "labels"})
    assert space.costs(space.seeds(1)[0])["memory"] == plan_cost(at_batch, plan).train_bytes  # the real shape, lowered
    assert (
        plan_cost(at_batch, plan).train_bytes > plan_cost(pp.lower(model), plan).train_bytes
    )  # what was costed before


def test_the_proxy_checks_a_memory_limit_at_the_tasks_batch_shape():
    model, task = bert_classifier(), tiny_task(batch=16)
    plan = pp.search(model, "5%", task, strategy="proxy")
    at_example = plan_cost(pp.lower(model), plan).train_bytes
    at_batch = plan_cost(
        pp.lower(model, example_inputs={k: v for k, v in task.train_batches[0].items() if k != "labels"}), plan
    ).train_bytes
    between = (at_example + at_batch) // 2
    with pytest.raises(pp.BudgetError, match="other limits"):
        pp.search(model, pp.Budget(params="5%", memory=between), task, strategy="proxy")
    assert pp.search(model, pp.Budget(params="5%", memory=at_batch), task, strategy="proxy").sites == plan.sites
    with pytest.raises(pp.BudgetError, match="memory limit depends on the training batch"):
        pp.search(model, pp.Budget(params="5%", memory=at_batch))


def test_cli_plan_batches_sets_the_calibration_batches(tmp_path, capsys):
    model_dir, data = tmp_path / "model", tmp_path / "data"
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(model_dir)
    data.mkdir()
    rows = "".join(f"{i % 2}\tthis is example number {i}\n" for i in range(64))
    (data / "train.tsv").write_text(rows)
    (data / "dev.tsv").write_text(rows)
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                str(model_dir),
                "--task",
                str(data),
                "--budget",
                "5%",
                "--batches",
                "3",
                "--batch-size",
                "8",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    plan = pp.Plan.load(out)
    assert plan.provenance["scores"] == "grad2" and plan.provenance["calibration_batches"] == 3
    assert plan.sites["classifier"]["method"] == "full"
