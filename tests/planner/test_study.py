"""The study engine: failures, successive halving, a real trial, resume after SIGKILL, and two
workers sharing a PostgreSQL study. Evaluations are stand-ins unless said otherwise."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch

import peftplan as pp
from peftplan.planner.space import default_space
from peftplan.planner.study import StudyConfig, StudyError, open_storage, run_search
from peftplan.planner.study.halving import nondominated_ranks, promote
from peftplan.planner.study.policy import workload
from peftplan.planner.training.evaluate import Evaluation, Fidelity
from peftplan.recipe import Recipe
from tests.planner.trials import stand_in, tiny_task, write_task
from tests.zoo import bert_classifier

ROOT = Path(__file__).resolve().parents[2]
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(storage, trials=6, **kw):
    """A search of one rung unless told otherwise: every trial is one evaluation."""
    options = {
        "strategy": "random",
        "study_name": "s",
        "progress": False,
        "evaluator": stand_in,
        "threads": 1,
        "fidelities": [Fidelity()],
        **kw,
    }
    return run_search(bert_classifier(), "5%", tiny_task(), trials=trials, storage=storage, **options)


def test_failed_trials_are_recorded_and_the_study_goes_on():
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            return Evaluation(None, 0, 0.1, "training diverged: loss is nan at step 3")
        if len(calls) == 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return stand_in(*args, **kw)

    storage = optuna.storages.InMemoryStorage()
    plan = run(storage, trials=5, evaluator=flaky)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    failed = {t.user_attrs["failed"] for t in trials if t.state == FAIL}
    assert failed == {
        "training diverged: loss is nan at step 3",
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    }
    assert sum(t.state == COMPLETE for t in trials) == 5 and len(calls) == 7
    assert all("costs" in t.user_attrs and "plan" in t.user_attrs for t in trials if t.state == COMPLETE)
    assert len(plan.front) >= 1 and plan.objectives["params"] <= pp.Budget(params="5%").param_limit(36_322)


def test_rerun_finishes_only_the_remainder_and_checks_settings():
    storage = optuna.storages.InMemoryStorage()
    run(storage, trials=3)
    calls = []
    run(storage, trials=5, evaluator=lambda *a, **k: calls.append(1) or stand_in(*a, **k))
    assert len(calls) == 2  # trials=N counts completed trials: only the two missing ones ran
    with pytest.raises(StudyError, match="other settings.*strategy"):
        run(storage, trials=5, strategy="nsga2")


def test_a_study_stored_by_an_earlier_version_goes_on_as_it_ran():
    storage = optuna.storages.InMemoryStorage()
    run(storage, trials=3, strategy="tpe", seeds=1)
    study = optuna.load_study(study_name="s", storage=storage)
    earlier = {k: v for k, v in study.user_attrs["peftplan"].items() if k not in ("tell", "followers")}
    assert StudyConfig.from_dict(study.user_attrs["peftplan"]).tell == "screened"  # today's default
    study.set_user_attr("peftplan", earlier)  # as written before the two fields existed
    for trials in (5, 7):  # the same call, twice: today's defaults for the fields it lacks
        run(storage, trials=trials, strategy="tpe", seeds=1)
        study = optuna.load_study(study_name="s", storage=storage)
        config = StudyConfig.from_dict(study.user_attrs["peftplan"])
        assert (config.trials, config.tell, config.followers) == (trials, "metric", ())  # as it ran
        assert sum(t.state == COMPLETE for t in study.trials) == trials
    with pytest.raises(StudyError, match=r"other settings \(strategy\)"):  # a stored field must still agree
        run(storage, trials=6, strategy="random", seeds=1)


def test_a_plan_already_evaluated_is_reused_not_trained_again():
    model, task = bert_classifier(), tiny_task()
    space = default_space(model, "5%", task)
    same = space.proxy_params(1.0)
    other_knobs = {**same, "none_share": 0.5 / len(space.sites)}  # cuts floor(0.5) = 0 sites: the same plan
    assert other_knobs != same and space.plan_from_params(other_knobs).sites == space.plan_from_params(same).sites
    storage, calls = optuna.storages.InMemoryStorage(), []

    def counted(*a, **k):
        calls.append(a[1].provenance["knobs"])
        return stand_in(*a, **k)

    run(
        storage, trials=1, space=space, strategy="proxy", evaluator=counted
    )  # trial 0: the proxy plan at the full budget
    study = optuna.load_study(study_name="s", storage=storage)
    study.enqueue_trial(other_knobs)
    run(storage, trials=2, space=space, strategy="proxy", evaluator=counted)
    first, second = optuna.load_study(study_name="s", storage=storage).trials
    assert len(calls) == 1 and first.params == same and second.params == other_knobs
    assert second.state == COMPLETE and second.values == first.values and second.user_attrs["reused"] == 0
    assert second.user_attrs["plan"]["provenance"]["reused"] == 0 and second.user_attrs["seconds"] == 0.0


def test_nondominated_ranks_by_hand():
    assert nondominated_ranks([(1, 1), (2, 2), (0, 3), (0, 0), (2, 2)]) == [1, 0, 0, 2, 0]


def test_halving_promotes_exactly_the_non_dominated():
    senses = {"metric": "max", "params": "min"}
    # 2, 5 and 7 are non-dominated; every other point is beaten by one of them in both objectives
    values = {
        0: (0.60, 400),
        1: (0.80, 950),
        2: (0.90, 900),
        3: (0.50, 200),
        4: (0.65, 500),
        5: (0.70, 300),
        6: (0.85, 1000),
        7: (0.50, 100),
        8: (0.40, 150),
    }
    cands = {c: {"metric": m, "params": p} for c, (m, p) in values.items()}
    assert promote(cands, senses, eta=3) == [2, 7, 5]  # extremes first (infinite crowding), then by number


def test_halving_breaks_ties_in_a_rank_by_crowding():
    senses = {"metric": "max", "params": "min"}
    # four non-dominated points, three places: crowding (metric gap/0.5 + params gap/900) is
    # B = 0.15/0.5 + 550/900 = 0.91 and C = 0.4/0.5 + 400/900 = 1.24, so C beats B
    front = {0: (1.0, 1000), 1: (0.9, 500), 2: (0.85, 450), 3: (0.5, 100)}
    rest = {4: (0.4, 1000), 5: (0.3, 900), 6: (0.2, 800), 7: (0.1, 700), 8: (0.0, 600)}
    cands = {c: {"metric": m, "params": p} for c, (m, p) in {**front, **rest}.items()}
    assert promote(cands, senses, eta=3) == [0, 3, 2]


def test_successive_halving_study_is_deterministic_and_fronts_the_top_rung():
    rungs = [Fidelity(steps=1, train_batches=2), Fidelity(steps=3, train_batches=6)]
    storages = [optuna.storages.InMemoryStorage() for _ in range(2)]
    plans = [run(s, trials=9, fidelities=rungs, eta=3, refine=2, runs=None) for s in storages]
    studies = [optuna.load_study(study_name="s", storage=s) for s in storages]
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]  # same seed, same study
    trials = studies[0].trials
    rung0 = {t.number: t for t in trials if t.user_attrs["rung"] == 0}
    rung1 = [t for t in trials if t.user_attrs["rung"] == 1 and "refines" not in t.user_attrs]  # promoted
    refined = [t for t in trials if "refines" in t.user_attrs]  # the top's best plan at two more rates
    assert len(rung0) == 9 and len(trials) == workload(_config(studies[0])).total == 9 + 3 + 2 and len(refined) == 2
    chosen = promote(
        {n: dict(zip(("metric", "params"), t.values)) for n, t in rung0.items()}, plans[0].front.senses, eta=3
    )
    assert [t.user_attrs["candidate"] for t in rung1] == chosen
    for t in rung1:  # same plan, longer run: the stand-in's metric triples
        assert (
            t.params == rung0[t.user_attrs["candidate"]].params and t.user_attrs["fidelity"] == "3 steps on 6 batches"
        )
        assert t.values[0] == pytest.approx(3 * rung0[t.user_attrs["candidate"]].values[0])
    assert {p.info["rung"] for p in plans[0].front} == {1}
    assert {p.info["trial"] for p in plans[0].front} <= {t.number for t in rung1 + refined}


def _config(study):
    from peftplan.planner.study import StudyConfig

    return StudyConfig.from_dict(study.user_attrs["peftplan"])


def test_a_real_search_trains_tiny_plans():
    torch.set_num_threads(1)
    base = bert_classifier()
    plan = run_search(
        base,
        "5%",
        tiny_task(),
        strategy="tpe",
        trials=3,
        fidelities=[Fidelity(steps=8, train_batches=4)],
        recipe=Recipe(lr=5e-3, steps=8),
        progress=False,
        threads=1,
        seeds=3,
    )
    assert len(plan.front) >= 1 and plan.provenance["strategy"] == "tpe"
    assert plan.recipe == Recipe(lr=plan.provenance["knobs"]["lr"], steps=8)  # the recipe it was found with travels
    assert 0 <= plan.objectives["metric"] <= 1
    limit = pp.Budget(params="5%").param_limit(sum(p.numel() for p in base.parameters()))
    assert all(p.values["params"] <= limit for p in plan.front)
    tuned = pp.apply(bert_classifier(), plan)
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == plan.objectives["params"]


RESUME = """
import torch; torch.set_num_threads(1)
from peftplan.planner.study import open_storage, run_search
from peftplan.planner.training.evaluate import Fidelity
from tests.planner.trials import slow_stand_in, tiny_task
from tests.zoo import bert_classifier
run_search(bert_classifier(), "5%", tiny_task(), strategy="random", trials={trials}, storage=open_storage({url!r}, heartbeat=1),
           study_name="resume", evaluator=slow_stand_in, progress=False, threads=1, fidelities=[Fidelity()])
"""


def _spawn(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).trials
    except KeyError:
        return []


def test_a_search_killed_mid_run_resumes_without_rerunning(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'study.db'}", 6
    proc = _spawn(RESUME.format(url=url, trials=n))
    deadline = time.time() + 120
    while sum(t.state == COMPLETE for t in _trials(url, "resume")) < 2:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the search did not complete two trials in 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.params, t.values) for t in _trials(url, "resume") if t.state == COMPLETE}
    killed = [t.number for t in _trials(url, "resume") if t.state == optuna.trial.TrialState.RUNNING]

    calls = []
    run_search(
        bert_classifier(),
        "5%",
        tiny_task(),
        strategy="random",
        trials=n,
        storage=open_storage(url, heartbeat=1),
        study_name="resume",
        evaluator=lambda *a, **k: calls.append(1) or stand_in(*a, **k),
        progress=False,
        threads=1,
        fidelities=[Fidelity()],
    )
    after = {t.number: t for t in _trials(url, "resume")}
    assert sum(t.state == COMPLETE for t in after.values()) == n
    assert {k: (after[k].params, after[k].values) for k in before} == before  # kept as they were
    assert len(calls) == n - len(before)  # nothing completed was run again
    for k in killed:  # the trial that died is failed by its silence and re-run with its parameters
        assert after[k].state == FAIL
        retry = [t for t in after.values() if t.system_attrs.get("failed_trial") == k]
        assert len(retry) == 1 and retry[0].state == COMPLETE
        # the retry keeps every parameter the dead trial had drawn (all of them when it died
        # training; some or none when it died while sampling) and draws the rest
        assert after[k].params.items() <= retry[0].params.items()


@pytest.fixture
def postgres_url():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.skip(
            f"PostgreSQL is unreachable at 127.0.0.1:5432 as user postgres ({str(e).strip()}); start it to test workers"
        )
    conn.autocommit = True
    name = f"peftplan_test_{secrets.token_hex(4)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


SEARCH = """
import time, optuna, torch; torch.set_num_threads(1)
from optuna.trial import TrialState
from peftplan.planner.study import Source, open_storage, run_search
from peftplan.planner.training.evaluate import Fidelity
from tests.planner.trials import slow_stand_in
source = Source("tests.zoo:minilm_vocab_classifier", {task!r}, tokenizer="minilm", batch_size=8)
model, task = source.load()
storage = open_storage({url!r}, heartbeat=2)
held = []

def evaluate(*args, **kwargs):  # the first trial waits until the worker trains one too: both surely take a share
    deadline = time.time() + 120
    while not held and time.time() < deadline:
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
        if sum(t.state == TrialState.RUNNING for t in trials) >= 2:  # this process runs one trial at a time
            break
        time.sleep(0.2)
    held.append(True)
    return slow_stand_in(*args, **kwargs)

run_search(model, "1%", task, strategy="random", trials={trials}, storage=storage,
           study_name="shared", source=source, evaluator=evaluate, progress=False, threads=1, fidelities=[Fidelity()])
"""
WORKER = """
import time, optuna
from peftplan.planner.study import open_storage, run_worker
from tests.planner.trials import slow_stand_in
storage = open_storage({url!r}, heartbeat=2)
deadline = time.time() + 120
while "shared" not in optuna.get_all_study_names(storage):
    assert time.time() < deadline, "the search never created its study"
    time.sleep(0.2)
run_worker(storage, "shared", evaluator=slow_stand_in, progress=False, threads=1, allow=["tests.zoo:minilm_vocab_classifier"])
"""


def test_two_workers_share_a_postgres_study_without_duplicates(tmp_path, postgres_url):
    n, task = 8, write_task(tmp_path / "task")
    procs = [_spawn(SEARCH.format(task=str(task), trials=n, url=postgres_url)), _spawn(WORKER.format(url=postgres_url))]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError([p.communicate()[0][-3000:] for p in procs]) from None
    assert [p.returncode for p in procs] == [0, 0], outputs
    done = [t for t in _trials(postgres_url, "shared") if t.state == COMPLETE]
    assert len(done) == n
    assert len({tuple(sorted(t.params.items())) for t in done}) == n  # distinct plans, none evaluated twice
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both took a share


def _random_search(base, budget, space, trials, **options):
    """A random search of ``trials`` one-rung trials in ``space`` by the stand-in: (the plans it
    trained, every trial of the study)."""
    trained, storage = [], optuna.storages.InMemoryStorage()
    run_search(
        base,
        budget,
        tiny_task(),
        strategy="random",
        trials=trials,
        space=space,
        storage=storage,
        study_name="s",
        evaluator=lambda b, plan, *a, **k: trained.append(plan) or stand_in(b, plan, *a, **k),
        progress=False,
        fidelities=[Fidelity()],
        **options,
    )
    return trained, optuna.load_study(study_name="s", storage=storage).trials


def _scored_alike(base):
    """``base``'s graph and a score of 1 on each of its LoRA sites."""
    from peftplan.planner.proxy.allocate import eligible_sites

    graph = pp.lower(base)
    return graph, {s.name: 1.0 for s in eligible_sites(graph, "lora", ("attn", "mlp"))}


def test_plans_over_a_limit_are_never_trained():
    from peftplan.planner.space import AllocatorSpace

    base = bert_classifier()
    graph, scores = _scored_alike(base)
    probe = AllocatorSpace(graph, scores, "5%", train_modules=["classifier"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    memory = []
    for _ in range(8):
        trial = study.ask()
        probe.suggest(trial)
        memory.append(probe.costs(trial.params)["memory"])
    memory.sort()
    limit = memory[4]  # about half of the random plans are over it
    space = AllocatorSpace(graph, scores, "5%", train_modules=["classifier"], limits={"memory": limit})
    trained, trials = _random_search(base, "5%", space, 4, propose="front")  # random plans, half over the limit
    assert all(space.costs(p.provenance["knobs"])["memory"] <= limit for p in trained) and len(trained) == 4
    skipped = [t.user_attrs["infeasible"] for t in trials if "infeasible" in t.user_attrs]
    assert skipped and all("memory" in r and "> limit" in r for r in skipped)


def test_proposals_over_a_limit_at_the_whole_budget_are_followed_by_a_drawn_budget_share():
    from peftplan.planner.space import AllocatorSpace

    base = bert_classifier()
    graph, scores = _scored_alike(base)
    space = AllocatorSpace(graph, scores, "5%", train_modules=["classifier"])
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    whole = [space.costs({**draws.ask(space.distributions()).params, **space.whole_budget()}) for _ in range(40)]
    limit = 0.95 * min(c["memory"] for c in whole)  # below every plan that spends the budget
    space = AllocatorSpace(graph, scores, "5%", train_modules=["classifier"], limits={"memory": limit})
    trained, trials = _random_search(base, "5%", space, 4)  # propose="budget"
    assert len(trained) == 4 and all(space.costs(p.provenance["knobs"])["memory"] <= limit for p in trained)
    over = [t for t in trials if "infeasible" in t.user_attrs]
    assert over and all(t.params["budget"] == 1.0 for t in over)  # each followed by a drawn share
    assert all(p.provenance["knobs"]["budget"] < 1.0 for p in trained)


def test_plans_that_place_no_site_are_never_trained():
    """A budget share below the cheapest site's rank-1 cost places no site: such seeds are left
    out and such proposals pruned untrained (they once failed as "no trainable parameter")."""
    from peftplan.backends import get_method
    from peftplan.planner.proxy.allocate import eligible_sites
    from peftplan.planner.space import AllocatorSpace

    base = bert_classifier()
    sites = eligible_sites(pp.lower(base), "lora", ("attn", "mlp"))
    space = AllocatorSpace(pp.lower(base), {s.name: 1.0 for s in sites}, 200)
    cheapest = min(get_method("lora").param_count(s, rank=1) for s in sites)
    shares = [space.min_share ** ((4 - i) / 4) for i in range(5)]  # the five seeds' budget shares
    too_small = sum(share * 200 < cheapest for share in shares)
    assert 0 < too_small < 5 and len(space.seeds(5)) == 5 - too_small
    trained, trials = _random_search(base, 200, space, 8, propose="front")  # random budget shares
    assert sum(t.state == COMPLETE for t in trials) == 8 and not [t for t in trials if t.state == FAIL]
    assert trained and all(plan.sites for plan in trained)  # (plans repeated under other knobs are not retrained)
    assert any("places no site" in t.user_attrs.get("skipped", "") for t in trials)  # random shares below it


def test_a_study_where_everything_fails_stops_with_the_reason():
    def broken(*args, **kw):
        return Evaluation(None, 0, 0.0, "training diverged: loss is inf at step 1")

    with pytest.warns(UserWarning, match="3 evaluations failed"), pytest.raises(StudyError, match="diverged"):
        run(optuna.storages.InMemoryStorage(), trials=2, evaluator=broken)


def test_a_trial_that_died_before_its_first_heartbeat_is_retried(tmp_path):
    from peftplan.planner.study.engine import fail_dead_trials

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1)
    study = optuna.create_study(storage=storage, study_name="silent")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # never beats: its worker "died"
    fail_dead_trials(study)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # still within the grace period
    time.sleep(2.5)
    fail_dead_trials(study)
    states = [t.state for t in study.trials]
    assert states == [FAIL, optuna.trial.TrialState.WAITING]  # failed, and queued again with its params
    assert study.trials[1].params == trial.params


@pytest.mark.parametrize("propose", ["budget", "front"])
def test_a_proposal_that_repeats_a_screened_plan_is_pruned_and_the_next_drawn_at_random(propose):
    """A sampler stuck on the seed's knobs (as the GP sampler stuck on the best-screened seed):
    under propose="budget" each repeat is pruned untrained and the next proposal is a random
    allocation at the whole budget; over the front the repeats stall the study."""
    from peftplan.planner.proxy.allocate import eligible_sites
    from peftplan.planner.space import AllocatorSpace
    from peftplan.planner.study import open_study
    from peftplan.planner.study.engine import Context, work
    from peftplan.planner.study.policy import DUPLICATE

    base = bert_classifier()
    graph = pp.lower(base)
    space = AllocatorSpace(graph, {s.name: 1.0 for s in eligible_sites(graph, "lora", ("attn", "mlp"))}, "5%")
    config = StudyConfig(
        "tpe", 4, ("metric", "params"), dict(space.objectives), (Fidelity(),), dict(space.limits), {"params": "5%"},
        recipe=Recipe(lr=5e-3, steps=2).to_dict(), seeds=1, propose=propose,
    )  # fmt: skip
    study = open_study(optuna.storages.InMemoryStorage(), "stuck", config, space)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stuck = optuna.samplers.PartialFixedSampler(space.seeds(1)[0], optuna.samplers.RandomSampler(seed=0))
        study.sampler = stuck
        work(study, Context(config, base, tiny_task(), space, stand_in), progress=False)
    done = [t for t in study.trials if t.state == COMPLETE]
    pruned = [t.user_attrs["skipped"] for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(reason.startswith(DUPLICATE) for reason in pruned)
    if propose == "budget":
        assert len(done) == 4 and [t.user_attrs.get("origin") for t in done] == [None, "random", "random", "random"]
        assert all(t.params["budget"] == 1.0 for t in done) and len({repr(t.params) for t in done}) == 4
        assert len(pruned) == 3  # one repeat before each random draw
    else:
        assert len(done) == 1 and any("space looks exhausted" in str(w.message) for w in caught)
