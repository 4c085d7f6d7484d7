"""One contract every search strategy passes, on a hand-built graph and a synthetic metric."""

import math
import random

import optuna
import pytest
import torch

from peftplan.planner.front import ParetoFront
from peftplan.planner.space import AllocatorSpace, GroupedSpace
from peftplan.planner.strategies import STRATEGIES, enqueue_seeds, make_sampler, seeded
from peftplan.planner.strategies.proxy import share
from tests.planner.graphs import graph_of, linear_site

optuna.logging.set_verbosity(optuna.logging.ERROR)
LIMIT = 2_000
FAST = {"botorch": {"candidates": 64, "mc_samples": 16}}  # the tests' candidate set, kept small
WARMUP = 3


@pytest.fixture(autouse=True)
def one_thread():
    """The GP samplers fit small models: one thread is faster than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def graph(blocks=3, mlp=True):
    sites = []
    for b in range(blocks):
        for part in "qkvo":
            sites.append(linear_site(f"l{b}.{part}", f"attn.{part}", 24, 24, block=b, depth=b / (blocks - 1)))
        if mlp:
            sites.append(linear_site(f"l{b}.up", "mlp.up", 24, 48, block=b, depth=b / (blocks - 1)))
            sites.append(linear_site(f"l{b}.down", "mlp.down", 48, 24, block=b, depth=b / (blocks - 1)))
    return graph_of(*sites)


def scores(g, seed=0):
    rng = random.Random(seed)
    return {s.name: rng.uniform(0.1, 5.0) for s in g}


def allocator_space(**kw):
    g = graph()
    return AllocatorSpace(g, scores(g), LIMIT, methods=("lora", "ia3", "ssf"), **kw)


def metric(params, plan):
    """Smooth in the knobs, rising with the params used: a two-objective trade-off."""
    q = plan.objectives["params"] / LIMIT
    return math.sqrt(q) * math.exp(-2 * (params.get("power", 0.5) - 0.5) ** 2 - params.get("none_share", 0.0))


def run(strategy, seed, n=8, space=None, storage=None, fail=(3, 5), n_seeds=2):
    """A study as the engine runs it: seeds enqueued, trial ``fail[0]`` raises, ``fail[1]`` is NaN."""
    space = space or allocator_space()
    sampler = make_sampler(strategy, space, seed=seed, warmup=WARMUP, **FAST.get(strategy, {}))
    study = optuna.create_study(directions=space.directions, sampler=sampler, storage=storage)
    enqueue_seeds(study, space, strategy, n_seeds)
    plans = []

    def objective(trial):
        plan = space.suggest(trial)
        plans.append(plan)
        if trial.number == fail[0]:
            raise RuntimeError("training diverged")
        value = math.nan if trial.number == fail[1] else metric(trial.params, plan)
        return space.values(plan, value)

    study.optimize(objective, n_trials=n, catch=(RuntimeError,))
    return study, plans, space


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reproducible_within_budget_and_survives_failures(strategy):
    study, plans, space = run(strategy, seed=0)
    again, _, _ = run(strategy, seed=0)
    assert [t.params for t in study.trials] == [t.params for t in again.trials]
    states = [t.state for t in study.trials]
    assert len(states) == 8 and states[3] == states[5] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert all(p.objectives["params"] <= LIMIT for p in plans)
    assert all(t.values[1] == space.costs(t.params)["params"] for t in study.trials if t.values)
    enqueued = [t.params for t in study.trials if "fixed_params" in t.system_attrs]
    assert enqueued == (space.seeds(2) if seeded(strategy) else [])


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory):
    """One database for every strategy's study (creating the schema is the slow part)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('storage') / 'studies.db'}"
    optuna.storages.RDBStorage(url)
    return url


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sqlite_storage(strategy, sqlite_url):
    study, plans, space = run(strategy, seed=1, n=WARMUP + 2, storage=sqlite_url, fail=(-1, -1))
    stored = optuna.load_study(study_name=study.study_name, storage=sqlite_url)
    assert [t.params for t in stored.trials] == [t.params for t in study.trials]
    assert [space.plan_from_params(t.params).sites for t in stored.trials] == [p.sites for p in plans]


@pytest.mark.parametrize("strategy", ["tpe", "botorch"])
def test_grouped_space(strategy):
    g = graph()
    space = GroupedSpace(g, LIMIT, methods=("lora", "ia3"), group_by="block", scores=scores(g))
    study, plans, _ = run(strategy, seed=0, space=space)
    assert len(study.trials) == 8 and all(p.objectives["params"] <= LIMIT for p in plans)


def test_seeds_only_for_model_based_strategies():
    assert [s for s in STRATEGIES if seeded(s)] == ["nsga2", "tpe", "gp", "botorch"]
    with pytest.raises(ValueError, match="available"):
        seeded("grid")
    with pytest.raises(ValueError, match="to the Space"):
        make_sampler("tpe", allocator_space(), seed=0, constraints={"memory": 1e6})


def test_proxy_walks_the_proxy_front():
    # 1/16 ** (0, 1/2, 1/4, 3/4, 1/8, 5/8), by hand
    assert [share(i, 1 / 16) for i in range(6)] == pytest.approx([1.0, 0.25, 0.5, 0.125, 2**-0.5, 2**-2.5])
    study, plans, space = run("proxy", seed=0, n=4, fail=(-1, -1))
    shares = [1.0, space.min_share**0.5, space.min_share**0.25, space.min_share**0.75]
    assert [t.params for t in study.trials] == [space.proxy_params(s) for s in shares]
    assert plans[0].sites == space.plan_from_params(space.seeds(1)[0]).sites


def test_botorch_keeps_memory_within_its_limit():
    space = allocator_space(objectives=("metric", "params", "memory"), limits={"memory": 8_000})
    study, plans, _ = run("botorch", seed=0, space=space, fail=(-1, -1), n_seeds=0)
    assert any(p.objectives["memory"] > 8_000 for p in plans[:WARMUP])  # random warm-up ignores it
    assert all(p.objectives["memory"] <= 8_000 for p in plans[WARMUP:])
    assert [t.constraints for t in study.trials] == [{"memory": p.objectives["memory"] - 8_000} for p in plans]


def test_botorch_after_warmup_beats_random():
    g = graph(blocks=4, mlp=False)
    space = AllocatorSpace(g, scores(g), LIMIT, roles=("attn",))  # five knobs
    reference = {"metric": 0.0, "params": LIMIT}
    volumes = {"botorch": [], "random": []}
    for seed in range(3):
        for strategy in volumes:
            study, _, _ = run(strategy, seed, n=12, space=space, fail=(-1, -1), n_seeds=0)
            if strategy == "botorch":
                proposed = [t.params for t in study.trials]
            else:  # both draw their warm-up at random from the same seed; then they part
                assert [t.params for t in study.trials[:WARMUP]] == proposed[:WARMUP]
                assert all(t.params != p for t, p in zip(study.trials[WARMUP:], proposed[WARMUP:]))
            points = [(dict(zip(space.objectives, t.values)), None) for t in study.trials]
            volumes[strategy].append(ParetoFront.from_points(points, space.objectives).hypervolume(reference))
    assert sum(volumes["botorch"]) > sum(volumes["random"]), volumes
