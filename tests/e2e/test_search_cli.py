"""`peftplan search | front | worker` on a tiny model factory and a tiny TSV task, in-process."""

from __future__ import annotations

import csv
import json

import optuna
import pytest

import peftplan as pp
from peftplan.cli import main
from tests.planner.trials import write_task
from tests.zoo import minilm_vocab_classifier

MODEL = "tests.zoo:minilm_vocab_classifier"


def test_search_writes_a_plan_and_a_front_that_front_exports(tmp_path, capsys):
    task, url = write_task(tmp_path / "task"), f"sqlite:///{tmp_path / 'study.db'}"
    options = {
        "--task": str(task),
        "--tokenizer": "minilm",
        "--budget": "1%",
        "--strategy": "random",
        "--trials": "3",
        "--steps": "4",
        "--batch-size": "8",
        "--storage": url,
        "--threads": "1",
        "-o": str(tmp_path / "plan.json"),
        "--front-png": str(tmp_path / "front.png"),
    }
    search = ["search", MODEL, "-q", *(x for pair in options.items() for x in pair)]
    assert main(search) == 0
    out = capsys.readouterr().out
    assert "Pareto front:" in out and "peftplan worker" in out and f"--allow {MODEL}" in out
    plan = pp.Plan.load(tmp_path / "plan.json")
    model = minilm_vocab_classifier()
    limit = pp.Budget(params="1%").param_limit(pp.lower(model).total_params)
    pp.apply(model, plan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.objectives["params"] <= limit
    assert (tmp_path / "front.png").stat().st_size > 0

    files = {k: tmp_path / f"front.{k}" for k in ("csv", "png", "html", "json")}
    assert main(["front", url, *(a for k, f in files.items() for a in (f"--{k}", str(f)))]) == 0
    front = pp.planner.front.ParetoFront.load(files["json"])
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == len(front) >= 1 and {"metric", "params", "trial", "rung"} <= set(rows[0])
    assert plan.objectives in [p.values for p in front]
    assert files["png"].read_bytes()[:4] == b"\x89PNG" and "plotly" in files["html"].read_text()
    every = tmp_path / "trials.csv"
    assert main(["front", url, "--trials-csv", str(every)]) == 0
    trial_rows = list(csv.DictReader(every.open()))
    done = [
        t
        for t in optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url).trials
        if t.state.name == "COMPLETE"
    ]
    assert len(trial_rows) == len(done) > len(rows) - 1 and all(float(r["lr"]) > 0 for r in trial_rows)

    n_trials = len(optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url).trials)
    assert main(search) == 0  # the same call again: the study is complete, nothing runs
    assert (
        main(["worker", url, "-q", "--threads", "1", "-o", str(tmp_path / "again.json")]) == 2
    )  # the database names code
    assert f"--allow {MODEL}" in capsys.readouterr().err and not (tmp_path / "again.json").exists()
    assert main(["worker", url, "-q", "--threads", "1", "-o", str(tmp_path / "again.json"), "--allow", MODEL]) == 0
    assert len(optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url).trials) == n_trials
    assert (
        json.loads((tmp_path / "again.json").read_text())["sites"]
        == json.loads((tmp_path / "plan.json").read_text())["sites"]
    )


def test_front_of_an_empty_storage_is_a_clear_error(tmp_path, capsys):
    from peftplan.planner.study import open_storage

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_storage(url)  # a database without studies (a missing one: tests/test_bad_inputs.py)
    assert main(["front", url, "--csv", str(tmp_path / "f.csv")]) == 2
    assert "holds 0 studies" in capsys.readouterr().err


def short_search(task_dir, folder) -> list[str]:
    """A two-trial random search on the tiny task, its study and plan.json in ``folder``."""
    return [
        "search",
        MODEL,
        "--task",
        str(task_dir),
        "--tokenizer",
        "minilm",
        "--budget",
        "1%",
        "--strategy",
        "random",
        "--trials",
        "2",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--storage",
        f"sqlite:///{folder / 'study.db'}",
        "--threads",
        "1",
        "-q",
        "-o",
        str(folder / "plan.json"),
    ]


def test_apply_trains_a_searched_plan_by_its_recipe_and_saves_it(tmp_path, capsys):
    import re

    import torch

    from peftplan.planner.training.task import accuracy

    task_dir = write_task(tmp_path / "task")
    search = short_search(task_dir, tmp_path)
    assert main(search) == 0
    plan = pp.Plan.load(tmp_path / "plan.json")
    capsys.readouterr()
    apply = [
        "apply",
        MODEL,
        "--plan",
        str(tmp_path / "plan.json"),
        "--task",
        str(task_dir),
        "--tokenizer",
        "minilm",
        "-q",
        "-o",
        str(tmp_path / "adapter"),
    ]
    assert main(apply) == 0
    out = capsys.readouterr().out
    assert f"training 4 steps at lr {plan.recipe.lr:g}" in out  # the plan's own recipe, its batch size too
    printed = float(re.search(r"evaluation accuracy (\S+),", out).group(1))
    # the saved artifact, loaded into a fresh model, scores what apply printed on the same evaluation data
    model, task = pp.planner.study.Source(MODEL, str(task_dir), "minilm", batch_size=8).load()
    tuned = pp.load(model, tmp_path / "adapter")
    assert accuracy(tuned, task.eval_batches) == pytest.approx(printed, abs=5e-5)
    assert not torch.equal(tuned.classifier.weight, minilm_vocab_classifier().classifier.weight)  # trained, not fresh
    assert main([*apply, "--steps", "2", "--lr", "1e-2"]) == 0
    assert "training 2 steps at lr 0.01" in capsys.readouterr().out


def test_search_reports_the_returned_plan_on_the_eval_data_or_says_why_not(tmp_path, capsys):
    import re

    task_dir = write_task(tmp_path / "task")
    search = short_search(task_dir, tmp_path)
    assert main(search) == 0
    out = capsys.readouterr().out
    assert f"the evaluation data ({task_dir}'s dev.tsv) is not scored" in out and "pass --eval FILE" in out
    assert (
        main([*search, "--eval", str(task_dir / "dev.tsv")]) == 0
    )  # the same study: nothing reruns, the plan is trained once more
    out = capsys.readouterr().out
    assert f"to score it on {task_dir / 'dev.tsv'}" in out
    reported = re.search(r"evaluation accuracy (\S+),", out).group(1)
    # the reference: the same plan applied and trained by `apply` (same recipe, seed, batches)
    assert (
        main(
            [
                "apply",
                MODEL,
                "--plan",
                str(tmp_path / "plan.json"),
                "--task",
                str(task_dir),
                "--tokenizer",
                "minilm",
                "--eval",
                str(task_dir / "dev.tsv"),
                "-q",
                "-o",
                str(tmp_path / "adapter"),
            ]
        )
        == 0
    )
    assert re.search(r"evaluation accuracy (\S+),", capsys.readouterr().out).group(1) == reported


def test_apply_warns_when_the_trained_model_scores_at_chance(tmp_path, capsys):
    task_dir = write_task(tmp_path / "task")
    plan = pp.search(minilm_vocab_classifier(), "1%", strategy="proxy")
    plan.save(tmp_path / "plan.json")  # trained one step at a learning rate of nothing: the fresh model's guesses
    assert (
        main(
            [
                "apply",
                MODEL,
                "--plan",
                str(tmp_path / "plan.json"),
                "--task",
                str(task_dir),
                "--tokenizer",
                "minilm",
                "--steps",
                "1",
                "--lr",
                "1e-12",
                "-q",
                "-o",
                str(tmp_path / "adapter"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: validation accuracy" in err and "is at chance level" in err and "--steps" in err
