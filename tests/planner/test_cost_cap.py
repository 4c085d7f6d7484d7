"""The search's cost cap (``runs``, in final-run equivalents): the top rung trains what the
screens and refinements leave, the best-screened baselines and searched candidates by turns."""

import zlib

import optuna
import pytest
from optuna.trial import TrialState

from peftplan.planner.study import StudyConfig, StudyError
from peftplan.planner.study.halving import cost_share, top_slots
from peftplan.planner.study.policy import workload
from peftplan.planner.training.evaluate import Fidelity
from peftplan.recipe import Recipe
from tests.planner.trials import stand_in, tpe_search

optuna.logging.set_verbosity(optuna.logging.WARNING)


def with_loss(base, plan, task, fidelity, *, recipe, seed):
    """`stand_in` with a validation loss that ranks plans otherwise than its metric does."""
    result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
    result.loss = zlib.crc32(repr(sorted(plan.provenance["knobs"].items())).encode()[::-1]) % 997 / 997
    return result


def search(evaluator=with_loss, **options):
    return tpe_search(evaluator, **options)


def cost(trials, recipe_steps=20):
    """Final-run equivalents of ``trials``, counted by hand from each one's recorded fidelity."""
    shares = {"5% of the recipe": 1 / recipe_steps, "the full recipe": 1.0}  # 5% of 20 steps is one step
    return sum(shares[t.user_attrs["fidelity"]] for t in trials)


def best_screened(trials, baseline: bool):
    """The number of the best rung-0 trial of one kind by validation loss (screen_by="loss"), by hand."""
    kind = [t for t in trials if t.user_attrs["rung"] == 0 and ("baseline" in t.user_attrs) == baseline]
    return min(kind, key=lambda t: (t.user_attrs["validation_loss"], t.number)).number


def searched_screen_better(base, plan, task, fidelity, *, recipe, seed):
    """`with_loss` halved, and above a half for the baselines: the two best screens are searched plans."""
    result = with_loss(base, plan, task, fidelity, recipe=recipe, seed=seed)
    result.loss = result.loss / 2 + 0.5 * (plan.provenance["knobs"]["budget"] == 1.0)  # baselines: the whole budget
    return result


def test_the_default_cap_trains_the_best_screened_baseline_and_searched_plan_in_full():
    plan, study = search(searched_screen_better)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    screened = [t for t in done if t.user_attrs["rung"] == 0]
    top = [t for t in done if t.user_attrs["rung"] == 1]
    assert len(screened) == 16 and len(top) == 2
    assert cost(done) == pytest.approx(16 * 0.05 + 2) and cost(done) <= 3
    assert {t.user_attrs["candidate"] for t in top} == {best_screened(done, True), best_screened(done, False)}
    by_loss = sorted(screened, key=lambda t: (t.user_attrs["validation_loss"], t.number))
    assert {t.number for t in by_loss[:2]} != {t.user_attrs["candidate"] for t in top}  # not the two best overall
    assert workload(StudyConfig.from_dict(study.user_attrs["peftplan"]), study.trials).total == len(done)
    assert plan.provenance["trial"] in {t.number for t in top}  # chosen on full-length results


@pytest.mark.parametrize("worst", ["baselines", "searched"])
def test_each_kind_has_its_full_run_however_badly_it_screens_under_the_cap(worst):
    def one_kind_screens_badly(base, plan, task, fidelity, *, recipe, seed):
        result = with_loss(base, plan, task, fidelity, recipe=recipe, seed=seed)
        seed_plan = plan.provenance["knobs"]["budget"] == 1.0  # the baselines take the whole budget
        if fidelity.share is not None and seed_plan == (worst == "baselines"):
            result.loss = 1e6
        return result

    _, study = search(one_kind_screens_badly)
    top = [t for t in study.trials if t.user_attrs["rung"] == 1]
    assert len(top) == 2 and sorted("baseline" in t.user_attrs for t in top) == [False, True]
    assert {t.user_attrs["candidate"] for t in top} == {best_screened(study.trials, k) for k in (True, False)}


def test_a_larger_cap_buys_more_full_runs_and_refinements_are_paid_from_it():
    _, study = search(runs=5.0)
    assert sum(t.user_attrs["rung"] == 1 for t in study.trials) == 4  # 5 - 0.8 leaves 4 full runs
    _, study = search(runs=5.0, refine=2)
    top = [t for t in study.trials if t.user_attrs["rung"] == 1]
    refined = sum("refines" in t.user_attrs for t in top)
    assert len(top) - refined == 2 and 1 <= refined <= 2  # 5 - 0.8 - 2 refinements leaves 2 promotions
    assert cost([t for t in study.trials if t.state == TrialState.COMPLETE]) <= 5


@pytest.mark.parametrize(
    "runs, says",
    [(0.5, "runs=0.5 leaves no full run: 16 screens cost 0.8 runs"), (0, "positive number"), (True, "positive")],
)
def test_a_cap_that_leaves_no_full_run_is_refused_before_anything_trains(runs, says):
    calls = []
    with pytest.raises(ValueError, match=says):
        search(lambda *a, **k: calls.append(1) or stand_in(*a, **k), runs=runs)
    assert calls == []


def test_cost_shares_and_slots_by_hand():
    recipe = Recipe(lr=1e-3, steps=90)
    rungs = (Fidelity(steps=10), Fidelity(steps=30), Fidelity())
    assert [cost_share(f, recipe) for f in rungs] == pytest.approx([1 / 9, 1 / 3, 1])
    # 9 screens at 1/9 (1 run) + 9 // 3 = 3 at 1/3 (1 run) leave 1 of 3 runs: 1 full run
    assert top_slots(3.0, 9, rungs, recipe, eta=3, refine=0) == 1
    assert top_slots(None, 9, rungs, recipe, eta=3, refine=0) is None
    assert top_slots(3.0, 9, (Fidelity(),), recipe, eta=3, refine=0) is None  # one rung: trials are the cost
    assert cost_share(Fidelity(steps=10), Recipe(epochs=2)) == 1.0  # unknown length: counted at the most


def test_a_stored_cap_is_read_back_and_a_bad_one_named():
    _, study = search()
    stored = dict(study.user_attrs["peftplan"])
    assert StudyConfig.from_dict(stored).runs == 3.0
    assert StudyConfig.from_dict({k: v for k, v in stored.items() if k != "runs"}).runs is None  # stored before
    with pytest.raises(StudyError, match="'runs'"):
        StudyConfig.from_dict({**stored, "runs": 0.1})
    with pytest.raises(StudyError, match="'runs'"):
        StudyConfig.from_dict({**stored, "runs": "3"})
