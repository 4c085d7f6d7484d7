"""ParetoFront against hand-computed fronts, hypervolumes and knees."""

from __future__ import annotations

import csv

import pytest

from peftplan.plan import Plan
from peftplan.planner.front import ParetoFront

SENSES = {"metric": "max", "params": "min"}
POINTS = [
    ({"metric": 0.70, "params": 500}, None),
    ({"metric": 0.80, "params": 1000}, None),
    ({"metric": 0.79, "params": 2000}, None),  # dominated by (0.80, 1000)
    ({"metric": 0.85, "params": 4000}, None),
    ({"metric": 0.85, "params": 5000}, None),  # dominated by (0.85, 4000)
    ({"metric": float("nan"), "params": 100}, None),  # a failed trial
]


def front():
    return ParetoFront.from_points(POINTS, SENSES)


def test_non_dominated_points_sorted_by_cost():
    assert [(p.values["params"], p.values["metric"]) for p in front()] == [(500, 0.7), (1000, 0.8), (4000, 0.85)]


def test_hypervolume_2d_by_hand():
    # boxes from the reference (metric 0.5, params 6000) to each point, as a union:
    # (0.70-0.5)*(6000-500) + (0.80-0.70)*(6000-1000) + (0.85-0.80)*(6000-4000)
    want = 0.2 * 5500 + 0.1 * 5000 + 0.05 * 2000
    assert front().hypervolume({"metric": 0.5, "params": 6000}) == pytest.approx(want)
    # a point that does not beat the reference adds nothing
    assert front().hypervolume({"metric": 0.75, "params": 6000}) == pytest.approx(0.05 * 5000 + 0.05 * 2000)
    assert ParetoFront([], SENSES).hypervolume({"metric": 0, "params": 1}) == 0.0


def test_hypervolume_3d_inclusion_exclusion():
    senses = {"a": "max", "b": "max", "c": "min"}
    f = ParetoFront.from_points([({"a": 2, "b": 1, "c": 1}, None), ({"a": 1, "b": 2, "c": 2}, None)], senses)
    ref = {"a": 0, "b": 0, "c": 3}
    box1, box2 = 2 * 1 * 2, 1 * 2 * 1
    overlap = 1 * 1 * 1  # min(a) * min(b) * min(3 - c)
    assert f.hypervolume(ref) == pytest.approx(box1 + box2 - overlap)


def test_knee_and_best():
    f = front()
    # scaled to [0, 1]: (500, .70) -> (1, 0); (1000, .80) -> (6/7, 2/3); (4000, .85) -> (0, 1)
    assert f.knee().values == {"metric": 0.80, "params": 1000}
    assert f.best().values["metric"] == 0.85
    assert f.best(within={"params": 2000}).values == {"metric": 0.80, "params": 1000}
    assert f.best(within={"metric": 0.75}, objective="params").values["params"] == 1000
    with pytest.raises(ValueError, match="no plan on the front is within"):
        f.best(within={"params": 100})
    with pytest.raises(ValueError, match="unknown objective"):
        f.best(within={"memory": 1})


def test_exports(tmp_path):
    plan = Plan(sites={"fc": {"method": "lora", "rank": 2}})
    f = ParetoFront.from_points([({"metric": 0.9, "params": 10}, plan), ({"metric": 0.5, "params": 5}, None)], SENSES)
    assert [p.plan for p in f] == [None, plan]  # sorted by params
    f.points[1].info["trial"] = 3
    back = ParetoFront.load(f.to_json(tmp_path / "front.json"))
    assert [(p.values, p.info) for p in back] == [(p.values, p.info) for p in f]
    assert back.points[0].plan is None and back.points[1].plan.sites == plan.sites
    rows = list(csv.reader(f.to_csv(tmp_path / "f.csv").open()))
    assert rows == [
        ["metric", "params", "lr", "run", "trial", "plan"],
        ["0.5", "5", "", "", "", ""],
        ["0.9", "10", "", "", "3", "lora: 1 site, rank 2"],
    ]
    assert f.plot(tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = f.plot(tmp_path / "f.html").read_text()
    assert "plotly" in html and "lora: 1 site" in html
    with pytest.raises(ValueError, match=".png or .html"):
        f.plot(tmp_path / "f.svg")


def test_plots_show_every_trial_the_baselines_and_given_markers(tmp_path):
    from peftplan.planner.front import FrontPoint
    from peftplan.planner.front.plot import html_figure, layers

    trials = [
        FrontPoint({"metric": 0.6, "params": 300}, None, {"trial": 0, "rung": 0}),  # screened only
        FrontPoint({"metric": 0.7, "params": 500}, None, {"trial": 1, "rung": 1}),
        FrontPoint({"metric": 0.79, "params": 80_000}, None, {"trial": 2, "rung": 1, "baseline": "query-value"}),
        FrontPoint({"metric": 0.85, "params": 40_000}, None, {"trial": 3, "rung": 1}),
        FrontPoint({"metric": 0.75, "params": 80_000}, None, {"trial": 4, "rung": 1, "baseline": "query-value"}),
    ]
    f = ParetoFront.from_points(
        [FrontPoint(dict(p.values), None, dict(p.info)) for p in trials if p.info["rung"] == 1], SENSES
    )
    f.evaluated = trials
    parts = layers(f, "params", "metric")
    assert [p.info["trial"] for p in parts["screened"]] == [0] and [p.info["trial"] for p in parts["dominated"]] == [
        2,
        4,
    ]
    assert [p.info["trial"] for p in parts["front"]] == [1, 3]
    assert [p.info["trial"] for p in parts["baselines"]] == [2]  # the seed at two learning rates: its better trial
    markers = {"peft LoRA r8 q,v": {"metric": 0.83, "params": 74_498}}
    html = f.plot(tmp_path / "f.html", labels={"metric": "validation accuracy"}, markers=markers).read_text()
    assert "validation accuracy" in html and "peft LoRA r8 q,v" in html
    fig = html_figure(
        f, "params", "metric", "t", {"params": "trainable parameters", "metric": "validation accuracy"}, markers
    )
    assert [t.name for t in fig.data] == [
        "short run",
        "off the front",
        "front",
        "Pareto front",
        "returned plan (best within the budget)",
        "search seed 'query-value' (its best trial)",
        "peft LoRA r8 q,v",
    ]
    assert list(fig.data[6].x) == [74_498] and list(fig.data[1].x) == [80_000, 80_000] and list(fig.data[0].x) == [300]
    assert list(fig.data[4].x) == [40_000]  # no limits: the best on the front
    assert list(fig.data[5].x) == [80_000] and list(fig.data[5].y) == [0.79]  # the seed at its better rate, once
    assert fig.layout.xaxis.type == "log"  # params span 267x
    assert f.plot(tmp_path / "f.png", markers=markers).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def searched_front() -> ParetoFront:
    """A front as a search leaves it: 60-step recipe, short runs at 5% of it, a budget of 111,400 params."""
    from peftplan.planner.front import FrontPoint
    from peftplan.planner.training.evaluate import Fidelity
    from peftplan.recipe import Recipe

    short, full = str(Fidelity(share=0.05)), str(Fidelity())

    def point(trial, rung, metric, params, lr, **info):
        plan = Plan(sites={"fc": {"method": "lora", "rank": 2}}, recipe=Recipe(lr=lr, steps=60)) if rung else None
        info = {"trial": trial, "rung": rung, "fidelity": full if rung else short, **info}
        return FrontPoint({"metric": metric, "params": params}, plan, {**info, **({} if rung else {"lr": lr})})

    trials = [
        point(0, 0, 0.61, 3_000, 1e-3),
        point(1, 0, 0.66, 111_400, 3e-3),
        point(2, 1, 0.80, 3_000, 2.5e-3, validation_loss=0.412345678),
        point(3, 1, 0.84, 111_400, 1e-3, baseline="uniform"),
        point(4, 1, 0.86, 150_000, 1e-3),
        point(5, 1, 0.78, 111_400, 1e-2),
    ]
    f = ParetoFront.from_points([t for t in trials if t.info["rung"]], SENSES)
    f.evaluated, f.limits, f.metric_name = trials, {"params": 111_400}, "accuracy"
    return f


def test_the_front_plot_names_its_metric_budget_returned_plan_and_short_runs(tmp_path):
    from peftplan.planner.front.plot import html_figure

    f = searched_front()
    fig = html_figure(f, "params", "metric", "sst2", {k: f.axis_label(k) for k in SENSES}, {})
    assert fig.layout.yaxis.title.text == "validation accuracy (higher is better)"
    assert fig.layout.xaxis.title.text == "trainable parameters"
    names = [t.name for t in fig.data]
    assert names == [
        "short run (3 steps)",
        "off the front",
        "front",
        "Pareto front",
        "returned plan (best within the budget)",
        "search seed 'uniform' (its best trial)",
    ]  # 5% of 60 steps
    returned = fig.data[names.index("returned plan (best within the budget)")]
    assert (list(returned.x), list(returned.y)) == ([111_400], [0.84])  # not 0.86: 150,000 params are over the budget
    assert f.best(within=f.limits).info["trial"] == 3  # the plan a search returns
    [line] = fig.layout.shapes
    assert (line.type, line.x0, line.x1, line.line.dash) == ("line", 111_400, 111_400, "dash")
    assert [a.text for a in fig.layout.annotations] == ["budget: 111k params"]
    assert all(
        "text" not in t.mode for t in fig.data
    )  # names live in the legend: nothing to overlap or run off the plot
    front_hover = fig.data[names.index("Pareto front")].hovertext
    assert front_hover[0].split("<br>")[:5] == [
        "validation accuracy (higher is better): 0.8",
        "trainable parameters: 3,000",
        "learning rate: 0.0025",
        "validation loss: 0.4123",
        "trial 2, 60 steps",
    ]
    assert "learning rate: 0.003" in fig.data[0].hovertext[1] and "trial 1, 3 steps" in fig.data[0].hovertext[1]
    page = f.plot(tmp_path / "front.html", title="MiniLM on sst2").read_text()
    assert (
        "<title>MiniLM on sst2</title>" in page
        and "trainable parameters: 111,400" in page
        and "short run (3 steps)" in page
    )
    assert "validation accuracy (higher is better)" in page
    assert f.plot(tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_of_every_trial_has_learning_rates_and_run_lengths(tmp_path):
    f = searched_front()
    rows = list(csv.DictReader(f.to_csv(tmp_path / "all.csv", every_trial=True).open()))
    assert [(r["trial"], r["lr"], r["run"], r["on_front"]) for r in rows] == [
        ("0", "0.001", "3 steps", "no"),
        ("1", "0.003", "3 steps", "no"),
        ("2", "0.0025", "60 steps", "yes"),
        ("3", "0.001", "60 steps", "yes"),
        ("4", "0.001", "60 steps", "yes"),
        ("5", "0.01", "60 steps", "no"),
    ]
    assert rows[2]["plan"] == "lora: 1 site, rank 2" and rows[0]["plan"] == ""
    front_only = list(csv.DictReader(f.to_csv(tmp_path / "front.csv").open()))
    assert [r["trial"] for r in front_only] == ["2", "3", "4"] and "on_front" not in front_only[0]
    back = ParetoFront.load(f.to_json(tmp_path / "front.json"))
    assert (back.limits, back.metric_name) == ({"params": 111_400}, "accuracy")


def test_params_take_a_log_axis_once_they_span_more_than_tenfold():
    from peftplan.planner.front.plot import html_figure

    def axis(low: int) -> str:
        f = ParetoFront.from_points(
            [({"metric": 0.77, "params": low}, None), ({"metric": 0.84, "params": 74_498}, None)], SENSES
        )
        return html_figure(f, "params", "metric", "t", {"params": "p", "metric": "m"}, {}).layout.xaxis.type

    assert axis(3_842) == "log"  # 19x: the demo's front, a rank-1 plan beside the budget
    assert axis(10_000) == "linear"  # 7x


def test_counts_are_shortened_to_three_significant_figures():
    from peftplan.planner.front.plot import short_count

    assert [short_count(v) for v in (740, 5_000, 74_498, 100_000, 22_713_986, 7e9)] == [
        "740",
        "5k",
        "74.5k",
        "100k",
        "22.7M",
        "7G",
    ]


def test_a_real_searchs_front_carries_its_budget_metric_and_every_trials_rate(tmp_path):
    """What the plots read comes from the study itself: each trial's lr (the knob's value, else the
    recipe's), the study's limits as the budget line, the task's metric on the axis."""
    from peftplan.planner.study.run import run_search, study_front
    from peftplan.planner.training.evaluate import Fidelity
    from peftplan.recipe import Recipe
    from tests import zoo
    from tests.planner.trials import tiny_task

    url = f"sqlite:///{tmp_path / 'study.db'}"
    plan = run_search(
        zoo.bert_classifier(),
        "5%",
        tiny_task(),
        strategy="random",
        trials=2,
        storage=url,
        recipe=Recipe(lr=5e-3, steps=6),
        fidelities=[Fidelity()],
        seeds=2,
        refine=0,
        progress=False,
    )
    front = plan.front
    assert front.metric_name == tiny_task().metric_name
    assert set(front.limits) == {"params"} and front.limits["params"] >= max(p.values["params"] for p in front)
    trials = front.evaluated
    assert trials and all(isinstance(p.info.get("lr"), float) for p in trials)
    rates = {p.info["trial"]: p.info["lr"] for p in trials}
    stored = {t.number: t.params.get("lr", 5e-3) for t in _trials(url) if t.state.name == "COMPLETE"}
    assert rates == pytest.approx(stored)
    assert study_front(url).limits == front.limits  # read back from the database alone
    path = front.plot(tmp_path / "front.html")
    page = path.read_text()
    assert f"validation {front.metric_name}" in page and "budget:" in page


def _trials(url: str):
    import optuna

    storage = optuna.storages.RDBStorage(url)
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)
