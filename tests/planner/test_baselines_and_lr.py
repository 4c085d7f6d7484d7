"""The default space's priors and seeds (the plans a user writes by hand, the one-shot
allocations), the learning rate as a knob that ends up in the plan's recipe, baselines promoted
to the top rung, the default fidelity schedule, and the activation (EVA-like) scores."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch
import torch.nn as nn

import peftplan as pp
from peftplan.backends import count_trainable
from peftplan.planner.proxy import activation_scores, grad2_scores
from peftplan.planner.proxy.allocate import eligible_sites
from peftplan.planner.proxy.options import ProxyOptions
from peftplan.planner.space import AllocatorSpace, default_space
from peftplan.planner.study import StudyConfig, run_search
from peftplan.planner.study.halving import default_rungs
from peftplan.planner.study.policy import EXTEND, front_of, measured, surplus
from peftplan.planner.training.evaluate import Evaluation, Fidelity
from peftplan.planner.training.task import Task
from peftplan.planner.training.train import train
from peftplan.recipe import Recipe
from tests.planner.trials import stand_in, tiny_task, tpe_search
from tests.zoo import bert_classifier

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def space():
    model, task = bert_classifier(), tiny_task()
    return default_space(model, "5%", task, lr=(2e-4, 5e-3))


def test_the_query_value_seed_is_uniform_lora_on_query_and_value_at_the_rank_that_fits(space):
    graph = space.graph
    qv = [s for s in graph if s.role in ("attn.q", "attn.v")]
    per_rank = sum(s.in_features + s.out_features for s in qv)
    rank = space.available // per_rank  # by hand: the budget left after the head, shared evenly
    plan = space.plan_from_params(space.seeds(1)[0])
    assert space.baselines()[0] == "query-value"
    assert {n: (e["method"], e.get("rank")) for n, e in plan.tuned().items()} == {
        **{s.name: ("lora", rank) for s in qv},
        "classifier": ("full", None),
    }
    assert (
        count_trainable(pp.apply(bert_classifier(), plan))
        == plan.objectives["params"]
        <= space.budget.param_limit(graph.total_params)
    )


def test_the_uniform_seed_is_every_linear_layer_at_the_largest_rank_that_fits(space):
    plan = space.plan_from_params(space.prior_params("uniform"))
    sites = eligible_sites(space.graph, "lora", ("attn", "mlp"), exclude={"classifier"})
    ranks = {n: e["rank"] for n, e in plan.tuned().items() if e["method"] == "lora"}
    r = space.available // sum(s.in_features + s.out_features for s in sites)
    assert set(ranks) == {s.name for s in sites}  # every linear layer
    assert set(ranks.values()) <= {r, r + 1} and min(ranks.values()) == r
    spare = space.available - sum(ranks[s.name] * (s.in_features + s.out_features) for s in sites)
    assert 0 <= spare < min(s.in_features + s.out_features for s in sites if ranks[s.name] == r)  # no site could go up


def test_seeds_are_the_query_value_baseline_at_three_rates_then_cheaper_proxy_plans(space):
    seeds = space.seeds(5)
    assert space.baselines() == ["query-value"] * 3 and space.seed_lrs() == pytest.approx([1e-3, 4e-4, 2.5e-3])
    assert [p["scores"] for p in seeds] == ["query-value"] * 3 + ["proxy", "proxy"]
    assert [p["lr"] for p in seeds[:3]] == pytest.approx([1e-3, 4e-4, 2.5e-3])  # the recipe's rate first
    assert [p["budget"] for p in seeds[3:]] == pytest.approx([0.05, 0.05**0.5])
    assert all({**p, "lr": 0} == {**seeds[0], "lr": 0} for p in seeds[:3])  # one plan at three rates
    followers = space.followers()
    assert [name for name, _ in followers] == ["uniform", "proxy", "activation"]  # the other baselines
    assert followers[1][1] == {**space.proxy_params(1.0), "lr": pytest.approx(1e-3)}  # at the recipe's rate
    assert all(params["scores"] == name for name, params in followers)
    narrow = default_space(bert_classifier(), "5%", tiny_task(), lr=(9e-4, 1.1e-3))
    assert narrow.seed_lrs() == pytest.approx([(9e-4 * 1.1e-3) ** 0.5])  # rates outside the range are left out


def test_a_prior_scoring_a_site_zero_leaves_it_untuned():
    model = bert_classifier()
    graph = pp.lower(model)
    names = [s.name for s in eligible_sites(graph, "lora", ("attn", "mlp"), exclude={"classifier"})]
    space = AllocatorSpace(
        graph, {n: 1.0 for n in names}, "5%", train_modules=["classifier"], priors={"first": {names[0]: 1.0}}
    )
    plan = space.plan_from_params({**space.proxy_params(1.0), "scores": "first", "power": 0.0})
    assert set(plan.tuned()) == {names[0], "classifier"}
    with pytest.raises(ValueError, match="must score some site above 0"):
        AllocatorSpace(graph, {n: 1.0 for n in names}, "5%", priors={"none": {}})


def test_the_learning_rate_is_a_log_knob_that_changes_the_recipe_not_the_sites(space):
    d = space.distributions()["lr"]
    assert (d.low, d.high, d.log) == (2e-4, 5e-3, True)
    knobs = space.proxy_params(1.0)
    base = Recipe(lr=1e-3, steps=40, batch_size=16)
    assert space.recipe({**knobs, "lr": 3e-3}, base) == Recipe(lr=3e-3, steps=40, batch_size=16)
    assert space.plan_from_params({**knobs, "lr": 3e-3}).sites == space.plan_from_params(knobs).sites
    with pytest.raises(ValueError, match="low < high"):
        default_space(bert_classifier(), "5%", tiny_task(), lr=(1e-2, 1e-3))


def test_each_trial_trains_at_its_own_rate_and_the_plan_records_it():
    seen = []

    def recording(base, plan, task, fidelity, *, recipe, seed):
        seen.append((plan.provenance["knobs"]["lr"], recipe.lr))
        return stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)

    storage = optuna.storages.InMemoryStorage()
    plan = run_search(
        bert_classifier(),
        "5%",
        tiny_task(),
        strategy="tpe",
        trials=8,
        storage=storage,
        study_name="s",
        fidelities=[Fidelity()],
        evaluator=recording,
        progress=False,
        recipe=Recipe(lr=1e-3, steps=6),
    )
    assert all(knob == used for knob, used in seen) and len({lr for lr, _ in seen}) > 1
    assert all(1e-3 / 10 <= lr <= 1e-3 * 10 for lr, _ in seen)  # "auto": a tenth to ten times the recipe's rate
    trials = optuna.load_study(study_name="s", storage=storage).trials
    best = next(t for t in trials if t.number == plan.provenance["trial"])
    assert plan.recipe == Recipe(lr=best.params["lr"], steps=6)


def test_the_same_sites_at_another_rate_are_trained_not_reused():
    model, task = bert_classifier(), tiny_task()
    space = default_space(model, "5%", task, lr=(1e-4, 1e-2))
    knobs = space.proxy_params(1.0)
    storage, calls = optuna.storages.InMemoryStorage(), []
    study = optuna.create_study(storage=storage, study_name="s", directions=space.directions)
    same_sites = {**knobs, "none_share": 0.5 / len(space.sites)}  # cuts floor(0.5) = 0 sites
    for params in ({**knobs, "lr": 1e-3}, {**same_sites, "lr": 2e-3}, {**same_sites, "lr": 1e-3}):  # the third: reused
        study.enqueue_trial(params)
    run_search(
        model,
        "5%",
        task,
        strategy="random",
        trials=3,
        space=space,
        storage=storage,
        study_name="s",
        fidelities=[Fidelity()],
        progress=False,
        evaluator=lambda *a, **k: calls.append(k["recipe"].lr) or stand_in(*a, **k),
    )
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert calls == [1e-3, 2e-3] and trials[2].user_attrs["reused"] == 0


def test_each_baseline_reaches_the_top_rung_at_its_best_rate_however_it_screens():
    def baselines_screen_badly(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        if fidelity.share is not None and plan.provenance["knobs"]["budget"] == 1.0:  # every baseline: the whole budget
            return Evaluation(
                -1.0 + recipe.lr, result.params, 0.0
            )  # the highest rate screens best, yet below all others
        return result

    storage = optuna.storages.InMemoryStorage()
    plan = run_search(
        bert_classifier(),
        "5%",
        tiny_task(),
        strategy="tpe",
        trials=18,
        storage=storage,
        study_name="s",
        evaluator=baselines_screen_badly,
        progress=False,
        recipe=Recipe(lr=1e-3, steps=20),
        runs=None,  # no cost cap: every baseline goes on
    )
    trials = [
        t
        for t in optuna.load_study(study_name="s", storage=storage).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
    screened = [t for t in trials if t.user_attrs["rung"] == 0]
    top = [t for t in trials if t.user_attrs["rung"] == 1 and "refines" not in t.user_attrs]  # promoted, not refined
    assert len(screened) == 18 and {t.user_attrs["fidelity"] for t in screened} == {"5% of the recipe"}
    # query-value at three rates and once past the highest (which screened best), three followers
    assert sum("baseline" in t.user_attrs for t in screened) == 7
    kept = {t.user_attrs["baseline"]: t.params["lr"] for t in top if "baseline" in t.user_attrs}
    assert kept == pytest.approx({"query-value": 3.95e-3, "uniform": 3.95e-3, "proxy": 3.95e-3, "activation": 3.95e-3})
    others = [t for t in top if "baseline" not in t.user_attrs]
    assert len(others) == (18 - 7) // 3  # and 1/eta of the rest, the best of them
    assert {t.user_attrs["fidelity"] for t in top} == {"the full recipe"}
    assert plan.provenance["rung"] == 1  # chosen on full-length results


def test_the_default_schedule_screens_at_a_twentieth_then_trains_in_full():
    screen, full = default_rungs()
    recipe = Recipe(lr=1e-3, epochs=2)
    assert screen.recipe(recipe, batches_per_epoch=50).steps == 5 and full.recipe(recipe, 50) == recipe
    assert str(screen) == "5% of the recipe"
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="share"):
            Fidelity(share=bad)
    with pytest.raises(ValueError, match="not both"):
        Fidelity(steps=3, share=0.5)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        screen.recipe(recipe)


def test_activation_scores_equal_the_explained_variance_of_the_inputs_by_hand():
    torch.manual_seed(0)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x, attention_mask=None):
            return self.b(torch.tanh(self.a(x)))

    model = Toy()
    mix = torch.randn(6, 6) * torch.tensor([3.0, 2.0, 1.0, 0.1, 0.1, 0.1])  # inputs near a 3-dim subspace
    batches = [
        {"x": torch.randn(2, 4, 6) @ mix, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
        for _ in range(3)
    ]
    task = Task(batches, [], lambda m, b: m(b["x"]).sum(), None, name="toy")
    scores = activation_scores(
        model, pp.lower(model, example_inputs=(batches[0]["x"],)), task, ["a", "b"], batches=2, rank=2
    )

    def by_hand(inputs):  # stacked real (unpadded) tokens, uncentred SVD
        s = torch.linalg.svdvals(torch.cat(inputs).double())
        return float((s[:2] ** 2).sum() / (s**2).sum())

    xs = [b["x"][b["attention_mask"].bool()] for b in batches[:2]]
    hidden = [torch.tanh(model.a(x)).detach() for x in xs]
    assert scores == pytest.approx({"a": by_hand(xs), "b": by_hand(hidden)}, rel=1e-6)  # float32 forwards
    assert scores["a"] > 0.9  # most of the variance lies in two directions


def test_one_pass_over_the_calibration_batches_gives_the_scores_and_the_activation_prior():
    model, task = bert_classifier(), tiny_task()
    read = []
    counted = dataclasses.replace(task, loss=lambda m, b: read.append(id(b)) or task.loss(m, b))
    space = default_space(model, "5%", counted)
    batches = ProxyOptions().calibration_batches
    assert read == [id(b) for b in task.train_batches[:batches]]  # each calibration batch once
    names = [s.name for s in space.sites]  # the tuned sites, each scored by the separate passes
    graph = space.graph
    grad2 = grad2_scores(model, graph, task, names, batches=batches, progress=False)
    assert space.scores == pytest.approx({n: m**0.5 for n, m in grad2.items()}, rel=1e-12)
    assert space.priors["activation"] == pytest.approx(
        activation_scores(model, graph, task, names, batches=batches), rel=1e-6
    )


def test_train_calls_on_step_after_every_optimizer_step():
    model = pp.apply(bert_classifier(), pp.search(bert_classifier(), "5%"))
    steps = []
    train(model, tiny_task(), Recipe(lr=1e-3, steps=5), on_step=steps.append)
    assert steps == [0, 1, 2, 3, 4]


def test_screening_by_loss_promotes_the_lowest_validation_loss_not_the_best_metric():
    def metric_and_loss_disagree(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        result.loss = result.metric  # the higher the metric, the worse the loss
        return result

    promoted = {}
    for screen_by in ("metric", "loss"):
        storage = optuna.storages.InMemoryStorage()
        run_search(
            bert_classifier(),
            "5%",
            tiny_task(),
            strategy="random",
            trials=9,
            storage=storage,
            study_name="s",
            evaluator=metric_and_loss_disagree,
            progress=False,
            recipe=Recipe(lr=1e-3, steps=20),
            screen_by=screen_by,
            lr_range=(2e-4, 5e-3),
            runs=None,  # no cost cap: the eta rule promotes by non-dominated rank
        )
        trials = optuna.load_study(study_name="s", storage=storage).trials
        screened = [t for t in trials if t.user_attrs.get("rung") == 0 and t.state == optuna.trial.TrialState.COMPLETE]
        promoted[screen_by] = {
            t.user_attrs["candidate"] for t in trials if t.user_attrs.get("rung") == 1 and "refines" not in t.user_attrs
        }
        by_loss = sorted(screened, key=lambda t: t.user_attrs["validation_loss"])
        by_metric = sorted(screened, key=lambda t: -t.user_attrs.get("measured", t.values)[0])  # the metric itself
        assert len(promoted[screen_by]) == 9 // 3
        if screen_by == "loss":  # the lowest losses among the cheapest plans form the first non-dominated ranks
            assert by_loss[0].number in promoted["loss"] and by_metric[0].number not in promoted["loss"]
    assert promoted["metric"] != promoted["loss"]
    with pytest.raises(ValueError, match="screen_by"):
        run_search(bert_classifier(), "5%", tiny_task(), strategy="random", trials=1, screen_by="accuracy")


def test_the_other_baselines_screen_once_at_the_rate_the_swept_one_screened_best_at():
    def the_lowest_rate_screens_best(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        result.loss = recipe.lr * 100 if plan.provenance["knobs"]["budget"] == 1.0 else 1.0  # baselines: by rate
        return result

    _, study = tpe_search(the_lowest_rate_screens_best)
    screened = sorted((t for t in study.trials if t.user_attrs["rung"] == 0), key=lambda t: t.number)
    swept = [t for t in screened if t.user_attrs.get("baseline") == "query-value"]
    followers = [t for t in screened if t.user_attrs.get("origin") == "follower"]
    # the recipe's rate and 2.5x around it, then (the lowest screened best) once more, sqrt(2.5)x below it
    assert [t.params["lr"] for t in swept] == pytest.approx([1e-3, 4e-4, 2.5e-3, 2.53e-4])
    assert [t.user_attrs.get("origin") for t in swept] == [None] * 3 + ["extended"]
    assert [t.user_attrs["baseline"] for t in followers] == ["uniform", "proxy", "activation"]
    assert [t.params["lr"] for t in followers] == pytest.approx([2.53e-4] * 3)  # the swept baseline's best screen
    assert min(t.number for t in followers) > max(t.number for t in swept)  # queued once the sweep is settled
    proposed = [t for t in screened if "baseline" not in t.user_attrs][2:]  # after the two cheaper proxy plans
    assert len(screened) == 16 and len(proposed) == 16 - 4 - 2 - 3  # the sampler proposes the other seven
    given = [(t.params["budget"], t.params["max_rank"], t.params["lr"]) for t in proposed]
    assert given == [(1.0, 64, pytest.approx(2.53e-4))] * 7  # "budget": the whole budget, at the swept rate
    limit = study.user_attrs["peftplan"]["limits"]["params"]
    assert min(t.user_attrs["costs"]["params"] for t in proposed) >= 0.95 * limit  # and each spends it
    assert len({t.params["power"] for t in proposed}) == len(proposed)  # the allocation is the sampler's


def _peaked_at(best_lr: float):
    """An evaluator whose whole-budget plans screen best at ``best_lr`` (the loss: log distance to it)."""

    def evaluate(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        result.loss = abs(math.log(recipe.lr / best_lr)) if plan.provenance["knobs"]["budget"] == 1.0 else 9.0
        return result

    return evaluate


@pytest.mark.parametrize(
    ("peak", "rates", "followed"),
    [
        (5e-3, [1e-3, 4e-4, 2.5e-3, 3.95e-3], 3.95e-3),  # past the edge, nearer the peak: followed
        (2.7e-3, [1e-3, 4e-4, 2.5e-3, 3.95e-3], 2.5e-3),  # screened worse than the edge: the edge is kept
        (1.1e-3, [1e-3, 4e-4, 2.5e-3], 1e-3),  # best inside the sweep: nothing added
    ],
)
def test_the_sweep_goes_on_once_half_a_step_past_its_edge_where_its_edge_screens_best(peak, rates, followed):
    _, study = tpe_search(_peaked_at(peak))
    screened = sorted((t for t in study.trials if t.user_attrs["rung"] == 0), key=lambda t: t.number)
    swept = [t for t in screened if t.user_attrs.get("baseline") == "query-value"]
    assert [t.params["lr"] for t in swept] == pytest.approx(rates)
    assert all({**t.params, "lr": 0} == {**swept[0].params, "lr": 0} for t in swept)  # one plan at every rate
    followers = [t for t in screened if t.user_attrs.get("origin") == "follower"]
    assert [t.params["lr"] for t in followers] == pytest.approx([followed] * 3)
    proposed = [t for t in screened if "baseline" not in t.user_attrs][2:]
    assert [t.params["lr"] for t in proposed] == pytest.approx([followed] * len(proposed))  # the sampler's too
    config = StudyConfig.from_dict(study.user_attrs["peftplan"])
    assert config.extend == EXTEND == 1
    stored = {**study.user_attrs["peftplan"]}
    del stored["extend"]
    assert StudyConfig.from_dict(stored).extend == 0  # a study stored before extended nothing, and goes on so
    if len(rates) > 3:
        extension = swept[3]
        study.enqueue_trial(extension.params, user_attrs={"baseline": "query-value", "origin": "extended"})
        copy = study.trials[-1]  # a second worker extended the sweep too
        assert surplus(study.trials, copy, config) == (
            f"surplus: trial {extension.number} already screens 'query-value' at lr 0.00395"
        )
        assert surplus(study.trials, extension, config) is None


def test_proposals_over_the_front_choose_their_rate_and_budget_share():
    def the_lowest_rate_screens_best(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        result.loss = recipe.lr * 100
        return result

    _, study = tpe_search(the_lowest_rate_screens_best, propose="front")
    screened = sorted((t for t in study.trials if t.user_attrs["rung"] == 0), key=lambda t: t.number)
    proposed = [t for t in screened if "baseline" not in t.user_attrs][2:]
    assert len(proposed) == 7 and study.user_attrs["peftplan"]["propose"] == "front"  # the sweep was extended once
    assert len({t.params["lr"] for t in proposed}) == 7 and min(t.params["budget"] for t in proposed) < 1.0
    with pytest.raises(ValueError, match="propose must be 'budget' or 'front'"):
        tpe_search(stand_in, propose="cheap")


def test_followers_without_a_rate_knob_screen_at_the_recipes_and_a_racing_copy_is_surplus():
    _, study = tpe_search(stand_in, lr_range=None)
    followers = [t for t in study.trials if t.user_attrs.get("origin") == "follower"]
    assert len(followers) == 3 and all("lr" not in t.params for t in followers)  # no knob: the recipe's rate
    config = StudyConfig.from_dict(study.user_attrs["peftplan"])
    assert [f["baseline"] for f in config.followers] == ["uniform", "proxy", "activation"]
    first = followers[0]
    study.enqueue_trial(first.params, user_attrs={"baseline": first.user_attrs["baseline"], "origin": "follower"})
    copy = study.trials[-1]  # a second worker queued the same follower
    assert (
        surplus(study.trials, copy, config) == f"surplus: trial {first.number} already screens the baseline 'uniform'"
    )
    assert surplus(study.trials, first, config) is None


def test_screens_tell_the_sampler_minus_their_loss_and_keep_their_metric():
    seen = {}

    def recording(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        result.loss = 1.0 / (1.0 + result.metric)  # a loss the metric does not give the sampler
        seen[repr(sorted(plan.provenance["knobs"].items())), str(fidelity)] = (result.metric, result.loss)
        return result

    _, study = tpe_search(recording)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "reused" not in t.user_attrs]
    config = StudyConfig.from_dict(study.user_attrs["peftplan"])
    assert config.tell == "screened" and config.screen_by == "loss"
    for t in done:
        metric, loss = seen[repr(sorted(t.user_attrs["plan"]["provenance"]["knobs"].items())), t.user_attrs["fidelity"]]
        if t.user_attrs["rung"] == 0:  # the sampler learns what promotion ranks by
            assert t.values[0] == pytest.approx(-loss) and t.user_attrs["measured"][0] == pytest.approx(metric)
        else:  # the top rung tells its metric: the returned plan is the best by it
            assert t.values[0] == pytest.approx(metric) and "measured" not in t.user_attrs
        assert measured(t, config)["metric"] == pytest.approx(metric) == t.user_attrs["plan"]["objectives"]["metric"]
    screens = [p for p in front_of(study.trials, config).evaluated if p.info["rung"] == 0]
    assert sorted(p.values["metric"] for p in screens) == pytest.approx(
        sorted(seen[k][0] for k in seen if k[1] == "5% of the recipe")
    )  # plots and the trials CSV show the measured metric
    stored = {**study.user_attrs["peftplan"]}
    del stored["tell"]
    assert StudyConfig.from_dict(stored).tell == "metric"  # a study stored before told its metric, and goes on so


def test_a_follower_over_a_cost_limit_is_pruned_once_and_the_search_goes_on():
    space = default_space(bert_classifier(), pp.Budget(params="5%"), tiny_task())
    memory = {n: space.costs(p)["memory"] for n, p in [("query-value", space.seeds(1)[0]), *space.followers()]}
    limit = (memory["query-value"] + min(v for n, v in memory.items() if n != "query-value")) / 2
    assert all(v > limit for n, v in memory.items() if n != "query-value")  # every follower over, query-value under
    _, study = tpe_search(stand_in, trials=10, budget=pp.Budget(params="5%", memory=int(limit)))
    trials = study.trials
    followers = [t for t in trials if t.user_attrs.get("origin") == "follower"]
    assert sorted(t.user_attrs["baseline"] for t in followers) == ["activation", "proxy", "uniform"]  # each once
    assert all(t.state == optuna.trial.TrialState.PRUNED and "infeasible" in t.user_attrs for t in followers)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["rung"] == 0 for t in trials) == 10
