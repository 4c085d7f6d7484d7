import math
import random

import optuna
import pytest
import torch
import torch.nn as nn

import peftplan
from peftplan.backends.base import get_method
from peftplan.planner import BudgetError, allocate, alpha_scores, eligible_sites, search
from peftplan.planner.cost import plan_cost
from peftplan.planner.space import AllocatorSpace, GroupedSpace
from tests.planner.graphs import graph_of, linear_site

ALL = ("lora", "dora", "ia3", "ssf", "sparse", "moe_lora")
LIMIT = 3_000


def small_graph():
    sites = []
    for b in range(3):
        for part in "qkvo":
            sites.append(linear_site(f"l{b}.{part}", f"attn.{part}", 24, 24, block=b, depth=b / 2))
        sites.append(linear_site(f"l{b}.up", "mlp.up", 24, 48, block=b, depth=b / 2))
        sites.append(linear_site(f"l{b}.down", "mlp.down", 48, 24, block=b, depth=b / 2))
    sites.append(linear_site("head", "head", 24, 3, block=None, depth=1.0))
    return graph_of(*sites)


def scores_for(graph, seed=0):
    rng = random.Random(seed)
    return {s.name: rng.uniform(0.1, 5.0) for s in graph if s.role != "head"}


def spaces(graph):
    scores = scores_for(graph)
    return [
        AllocatorSpace(graph, scores, LIMIT, methods=ALL, train_modules=["head"]),
        GroupedSpace(graph, LIMIT, methods=(*ALL, "adapter"), group_by="role+depth", train_modules=["head"]),
        GroupedSpace(graph, LIMIT, methods=("lora", "ia3"), group_by="block", scores=scores),
    ]


def random_params(space, n, seed=0):
    """``n`` params dicts drawn uniformly from the space's knobs (optuna's RandomSampler)."""
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial)
        out.append(dict(trial.params))
        study.tell(trial, [0.0] * len(space.directions))
    return out


@pytest.mark.parametrize("which", range(3))
def test_plans_validate_and_count_params_exactly(which):
    graph = small_graph()
    space = spaces(graph)[which]
    for params in random_params(space, 25) + space.seeds(3):
        plan = space.plan_from_params(params)
        total = 0
        for name, entry in plan.sites.items():
            method = get_method(entry["method"])
            hp = method.validate(graph[name], **plan.hyper(entry))
            total += method.param_count(graph[name], **hp)
        assert plan.objectives == {"params": total} == {"params": space.costs(params)["params"]}
        assert total <= LIMIT
        assert list(plan.sites) == [s.name for s in graph if s.name in plan.sites]  # execution order
        assert plan.provenance["knobs"] == params


def test_suggest_is_plan_from_params():
    space = spaces(small_graph())[0]
    params = random_params(space, 1, seed=3)[0]
    assert space.suggest(optuna.trial.FixedTrial(params)).sites == space.plan_from_params(params).sites


def test_memory_and_latency_objectives_are_the_cost_model():
    graph = small_graph()
    space = AllocatorSpace(
        graph, scores_for(graph), LIMIT, methods=ALL, objectives=("metric", "params", "memory", "latency")
    )
    assert space.objectives == {"metric": "max", "params": "min", "memory": "min", "latency": "min"}
    assert space.directions == ["maximize", "minimize", "minimize", "minimize"]
    for params in random_params(space, 5):
        plan = space.plan_from_params(params)
        cost = plan_cost(graph, plan)
        assert plan.objectives == {"params": cost.params, "memory": cost.train_bytes, "latency": cost.latency_fraction}
        assert space.values(plan, 0.7) == [0.7, cost.params, cost.train_bytes, cost.latency_fraction]


def test_allocator_seeds_reproduce_allocate():
    graph = small_graph()
    scores = scores_for(graph)
    space = AllocatorSpace(graph, scores, LIMIT, max_rank=16, train_modules=["head"])
    available = LIMIT - graph["head"].params
    shares = [0.05, 0.05 ** (2 / 3), 0.05 ** (1 / 3), 1.0]  # evenly spaced in log scale, by hand
    assert space.min_share == 0.05 and [p["budget"] for p in space.seeds(4)] == pytest.approx(shares, rel=1e-12)
    assert space.seeds(1) == [space.proxy_params(1.0)]
    for share, params in zip(shares, space.seeds(4)):
        ranks = {n: e["rank"] for n, e in space.plan_from_params(params).sites.items() if e["method"] == "lora"}
        assert ranks == allocate(graph, scores, math.floor(share * available), max_rank=16)


def test_allocator_seed_is_the_proxy_plan():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3)])
    graph = peftplan.lower(model)
    proxy = search(model, 600, graph=graph)
    scores = alpha_scores(model, graph, [s.name for s in eligible_sites(graph, "lora", ("attn", "mlp"))])
    space = AllocatorSpace(graph, scores, 600, methods=ALL)
    seed = space.seeds(2)[-1]  # the whole budget's (the 5% seed, 30 params, places no site and is left out)
    plan = space.plan_from_params(seed)
    assert seed["budget"] == 1.0 and plan.sites == proxy.sites and plan.objectives == proxy.objectives


def test_proposals_at_the_whole_budget_spend_it_whatever_the_other_knobs():
    sites = [linear_site(f"l{b}.{p}", f"attn.{p}", 128, 128, block=b, depth=b / 2) for b in range(3) for p in "qkvo"]
    sites += [linear_site(f"l{b}.up", "mlp.up", 128, 512, block=b, depth=b / 2) for b in range(3)]
    graph = graph_of(*sites)
    limit = 3 * 2 * 8 * (128 + 128)  # LoRA r8 on the query and value of every block, by hand
    space = AllocatorSpace(graph, scores_for(graph), limit)
    drawn = [space.costs(p)["params"] for p in random_params(space, 40)]
    given = [space.costs({**p, **space.whole_budget()})["params"] for p in random_params(space, 40)]
    assert min(drawn) < 0.5 * limit  # a drawn budget share or rank cap leaves most of it unspent
    assert 0.95 * limit <= min(given) and max(given) <= limit  # the knobs left to draw shape the plan only


def test_allocator_bands_follow_scores():
    graph = small_graph()
    scores = scores_for(graph)
    space = AllocatorSpace(graph, scores, LIMIT, methods=("lora", "ia3"), roles=("attn",))
    params = {**space.proxy_params(1.0), "none_share": 0.5, "vector_share": 0.5}
    plan = space.plan_from_params(params)
    ranked = sorted((s for s in graph if s.role.startswith("attn")), key=lambda s: scores[s.name])
    assert not set(plan.sites) & {s.name for s in ranked[:6]}  # the lowest half is untouched
    assert {plan.sites[s.name]["method"] for s in ranked[6:9]} == {"ia3"}
    assert {plan.sites[s.name]["method"] for s in ranked[9:] if s.name in plan.sites} == {"lora"}


def test_grouped_none_is_rank_zero():
    graph = small_graph()
    space = GroupedSpace(graph, LIMIT, methods=("lora", "dora"), group_by="block")
    dists = space.distributions()
    assert set(dists) == {f"{k}:block{b}" for k in ("method", "rank") for b in range(3)}
    assert all("none" not in d.choices for k, d in dists.items() if k.startswith("method:"))
    assert dists["rank:block0"].low == 0 and space.levels[0] == 0
    params = {
        "method:block0": "dora",
        "rank:block0": 2,
        "method:block1": "lora",
        "rank:block1": 0,
        "method:block2": "lora",
        "rank:block2": 1,
    }
    plan = space.plan_from_params(params)
    assert {graph[n].block for n in plan.sites} == {0, 2}
    assert {(e["method"], e["rank"]) for n, e in plan.sites.items() if graph[n].block == 0} == {("dora", 2)}


def test_grouped_steps_down_to_fit_the_budget():
    graph = small_graph()
    space = GroupedSpace(graph, LIMIT, methods=("lora",), group_by="global")
    top = {"rank:all": len(space.levels) - 1}
    plan = space.plan_from_params(top)
    rank = {e["rank"] for e in plan.sites.values()}
    assert plan.objectives["params"] <= LIMIT and len(rank) == 1
    up = space.levels[space.levels.index(rank.pop()) + 1]  # one level up would not fit
    assert sum(get_method("lora").param_count(graph[n], rank=up) for n in plan.sites) > LIMIT


def test_errors_say_what_to_fix():
    graph = small_graph()
    with pytest.raises(BudgetError, match="train_modules"):
        AllocatorSpace(graph, scores_for(graph), 50, train_modules=["head"])
    with pytest.raises(ValueError, match="must include 'lora'"):
        AllocatorSpace(graph, scores_for(graph), LIMIT, methods=("ia3",))
    with pytest.raises(ValueError, match="'none' is rank 0"):
        GroupedSpace(graph, LIMIT, methods=("lora", "none"))
    with pytest.raises(ValueError, match="objectives"):
        GroupedSpace(graph, LIMIT, objectives=("params",))
    with pytest.raises(ValueError, match="lack knob"):
        GroupedSpace(graph, LIMIT).plan_from_params({})


def test_every_budget_field_is_a_limit():
    from peftplan.planner import Budget

    graph = small_graph()
    budget = Budget(params=LIMIT, memory="1MiB", latency="1%", adapter_bytes=5_000)
    space = AllocatorSpace(graph, scores_for(graph), budget, methods=ALL)
    assert space.limits == {"params": LIMIT, "memory": 2**20, "latency": 0.01, "adapter_bytes": 5_000}
    params = space.proxy_params(1.0)
    costs = space.costs(params)
    assert costs["adapter_bytes"] == plan_cost(graph, space.plan_from_params(params)).adapter_bytes
