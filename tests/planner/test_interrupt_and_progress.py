"""A search says what it does and loses nothing to Ctrl-C: the planned total counts every
training (promoted baselines, refinements), off a terminal each finished trial is one plain
line, and an interrupt stops with one line and exit status 130; the rerun says it resumes and
trains the trial the interrupt cut off again, ending as an uninterrupted search does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from peftplan.planner.study import run_search
from peftplan.planner.study.engine import SearchInterrupted
from peftplan.planner.training.evaluate import Evaluation, Fidelity
from peftplan.planner.training.progress import duration
from peftplan.recipe import Recipe
from tests.planner.trials import stand_in, tiny_task, write_task
from tests.zoo import bert_classifier

ROOT = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)
RUNGS = [Fidelity(steps=2), Fidelity(steps=6)]


def search(storage, evaluator=stand_in, progress=False):
    """4 seed plans (the space's baselines), each baseline promoted to the full run, then two
    refinements of the best plan's learning rate."""
    return run_search(
        bert_classifier(),
        "5%",
        tiny_task(),
        strategy="tpe",
        trials=4,
        storage=storage,
        study_name="s",
        fidelities=RUNGS,
        evaluator=evaluator,
        progress=progress,
        recipe=Recipe(lr=1e-3, steps=6),
        refine=2,
        runs=None,
    )


def trained(trials):
    """What a study trained: (rung, sites, recipe) of each completed trial."""
    return sorted(
        (
            t.user_attrs["rung"],
            json.dumps([t.user_attrs["plan"]["sites"], t.user_attrs["plan"]["recipe"]], sort_keys=True),
        )
        for t in trials
        if t.state == TrialState.COMPLETE
    )


def ran(trials) -> int:
    """How many trainings a study ran: its completed and failed trials."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)


def test_off_a_terminal_each_finished_trial_is_one_line_and_the_total_is_what_ran(capsys):
    storage = optuna.storages.InMemoryStorage()
    search(storage, progress=True)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    ran = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    seeds = [t for t in trials if "baseline" in t.user_attrs and t.user_attrs["rung"] == 0]
    baselines = {t.user_attrs["baseline"] for t in seeds}
    full = len(baselines) + max(1, (4 - len(seeds)) // 3)  # every baseline at its best rate, 1/eta of the others
    refined = [t for t in ran if "refines" in t.user_attrs]
    assert len(refined) == 2 and len(ran) == 4 + full + 2  # then 2 refinements
    lines = capsys.readouterr().err.splitlines()
    planned = re.fullmatch(r"study s: (\d+) trainings planned \((.*)\)", lines[0])
    assert planned and int(planned[1]) == len(ran), lines[0]  # counted before the first training, from the seeded study
    assert planned[2] == f"4 short runs, {full} full runs, +2 refinements of the best plan's learning rate"
    per_trial = [line for line in lines if line.startswith("trial ")]
    assert len(per_trial) == len(ran) and lines[-1].startswith(f"study done: {len(ran)} trainings")
    for i, (t, line) in enumerate(zip(ran, per_trial, strict=True)):
        fields = line.split(" · ")
        run = "short run (2 steps)" if t.user_attrs["rung"] == 0 else "full run (6 steps)"
        assert fields[:3] == [
            f"trial {t.number}",
            run + (", refining the best plan's learning rate" if t in refined else ""),
            f"{t.values[1]:,.0f} trainable params",
        ]
        assert fields[3] == f"metric {t.values[0]:.4g}" and fields[4] == f"lr {t.params['lr']:.3g}"
        assert re.fullmatch(r"\d+\.\d s", fields[5])  # the trial's own time
        left = r", about [\d.]+ (s|min) left" if i + 1 < len(ran) else ""  # never 100% while trainings remain
        assert re.fullmatch(rf"{i + 1} of {len(ran)} done{left}", fields[6]), line


def test_a_failed_screen_grows_the_total_and_says_so(capsys):
    calls = []

    def flaky(base, plan, task, fidelity, *, recipe, seed):  # the second screen diverges: its slot is filled by
        calls.append(1)  # another plan, one training more
        if len(calls) == 2:
            return Evaluation(None, 0, 0.0, "training diverged: loss is nan at step 1")
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        result.loss = recipe.lr  # the lowest rate left screens best: no extension (below it is the failed rate)
        return result

    storage = optuna.storages.InMemoryStorage()
    search(storage, flaky, progress=True)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial ")]
    assert len(lines) == ran(trials) == len(calls)
    failed = lines[1].split(" · ")
    assert failed[3] == "failed: training diverged: loss is nan at step 1"
    assert re.fullmatch(rf"2 of {len(calls)} done, about [\d.]+ (s|min) left", failed[4])
    # the refilled slot goes to a follower, a baseline promoted at its rate: one full run more as well
    assert failed[5] == "2 more planned: 5 short runs, 3 full runs, +2 refinements of the best plan's learning rate"
    assert all("more planned" not in line for line in lines[2:])
    assert lines[-1].endswith(f"{len(calls)} of {len(calls)} done")


def interrupting(after: int):
    """`stand_in`, but Ctrl-C arrives during evaluation number ``after + 1`` (once)."""
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(args[1].provenance["knobs"])
        if len(calls) == after + 1:
            raise KeyboardInterrupt
        return stand_in(*args, **kwargs)

    return evaluate, calls


def test_an_interrupted_search_retries_the_cut_trial_and_ends_as_an_uninterrupted_one():
    whole = optuna.storages.InMemoryStorage()
    plan = search(whole)
    storage = optuna.storages.InMemoryStorage()
    evaluate, calls = interrupting(after=1)
    with pytest.raises(KeyboardInterrupt) as stopped:
        search(storage, evaluate)
    assert isinstance(stopped.value, SearchInterrupted)
    assert (
        str(stopped.value)
        == f"stopped after 1 of {len(trained(optuna.load_study(study_name='s', storage=whole).trials))} "
        "trainings; rerun the same command to resume"
    )
    cut = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert cut.state == TrialState.FAIL and cut.user_attrs["interrupted"] is True
    resumed = search(storage, evaluate)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    retry = [t for t in trials if t.user_attrs.get("retries") == cut.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == cut.params
    assert {k: retry[0].user_attrs[k] for k in ("rung", "candidate", "baseline")} == {
        k: cut.user_attrs[k] for k in ("rung", "candidate", "baseline")
    }
    assert trained(trials) == trained(optuna.load_study(study_name="s", storage=whole).trials)
    assert (resumed.sites, resumed.recipe) == (plan.sites, plan.recipe)


def _db_state(db: Path) -> tuple[int, list[int]]:
    """Completed trials, and the RUNNING ones already training (their first heartbeat is
    recorded just before the evaluation starts)."""
    if not db.exists():
        return 0, []
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as c:
        try:
            done = c.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
            running = c.execute(
                "SELECT t.number FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING'"
            ).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return 0, []
    return done, [n for (n,) in running]


def cli_search(task: Path, tmp_path: Path, name: str) -> list[str]:
    """``peftplan search`` of a slow tiny classifier on ``task``: 4 tpe candidates, 2 rungs,
    its study in ``name``.db and its plan in ``name``.json."""
    options = {
        "--task": str(task),
        "--tokenizer": "minilm",
        "--budget": "1%",
        "--trials": "4",
        "--strategy": "tpe",
        "--steps": "30",
        "--rungs": "2",
        "--batch-size": "8",
        "--threads": "1",
        "--storage": f"sqlite:///{tmp_path / name}.db",
        "-o": str(tmp_path / f"{name}.json"),
    }
    flags = [x for pair in options.items() for x in pair]
    return [sys.executable, "-m", "peftplan.cli", "search", "tests.zoo:slow_minilm_vocab_classifier", *flags]


def start_search(task: Path, tmp_path: Path, name: str, env: dict) -> subprocess.Popen:
    """`cli_search` in the background, its stderr in ``name``.err, with Ctrl-C's default action as
    on a terminal: a shell starts background jobs with SIGINT ignored, which their children
    inherit (then Python installs no KeyboardInterrupt handler at all)."""
    return subprocess.Popen(
        cli_search(task, tmp_path, name),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / f"{name}.err").open("w"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_on_the_command_line_stops_with_one_line_and_the_rerun_resumes(tmp_path):
    task = write_task(tmp_path / "task")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = lambda name: cli_search(task, tmp_path, name)  # noqa: E731
    start = lambda name: start_search(task, tmp_path, name, env)  # noqa: E731

    reference, proc = start("whole"), start("cut")  # side by side: the same search, uninterrupted
    deadline = time.time() + 240
    while True:
        done, running = _db_state(tmp_path / "cut.db")
        if done >= 1 and running:
            break
        assert proc.poll() is None, (tmp_path / "cut.err").read_text()
        assert time.time() < deadline, "the search did not complete a trial in 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "cut.err").read_text()
    assert reference.wait(timeout=240) == 0, (tmp_path / "whole.err").read_text()
    whole = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'whole.db'}").trials
    cut = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'cut.db'}").trials
    stopped = sum(t.state == TrialState.COMPLETE for t in cut)
    assert (
        "Traceback" not in err
        and err.splitlines()[-1]
        == f"peftplan search: stopped after {stopped} of {ran(whole)} trainings; rerun the same command to resume"
    )
    interrupted = [t for t in cut if t.user_attrs.get("interrupted")]
    assert [t.number for t in interrupted] == running and interrupted[0].state == TrialState.FAIL

    rerun = subprocess.run(command("cut"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {stopped} of {ran(whole)} trainings done" in rerun.stderr
    assert "Using an existing study" not in rerun.stderr and "Traceback" not in rerun.stderr
    after = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'cut.db'}").trials
    retry = [t for t in after if t.user_attrs.get("retries") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == interrupted[0].params
    assert trained(after) == trained(whole)  # the same trainings as the uninterrupted search
    plans = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("whole", "cut")]
    assert [(p["sites"], p["recipe"]) for p in plans[:1]] == [(p["sites"], p["recipe"]) for p in plans[1:]]


def test_a_training_off_a_terminal_says_each_tenth_in_a_plain_line(capsys):
    from peftplan.planner.training.train import train

    result = train(bert_classifier(), tiny_task(), Recipe(lr=1e-3, steps=20), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    for i, line in enumerate(lines):
        step = 2 * (i + 1)
        left = r" · about [\d.]+ (s|min) left" if step < 20 else ""
        assert re.fullmatch(
            rf"training: {step} of 20 · loss {result.losses[step - 1]:.3f} · [\d.]+ (s|min) elapsed{left}", line
        ), line


def test_time_left_counts_a_full_run_by_its_steps_not_as_a_short_one(capsys):
    """Each trial says 1 s of scoring plus 10 s per training step: after the first screen (2 steps)
    the rest is 3 screens and the full runs (6 steps each) and refinements, counted by hand."""

    def timed(base, plan, task, fidelity, *, recipe, seed):
        result = stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed)
        steps = fidelity.recipe(recipe, len(task.train_batches)).total_steps(len(task.train_batches))
        result.seconds, result.train_seconds = 1.0 + 10.0 * steps, 10.0 * steps
        return result

    storage = optuna.storages.InMemoryStorage()
    search(storage, timed, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial ")]
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    full = sum(t.user_attrs["rung"] == 1 for t in trials)  # promoted and refined, all 6 steps
    expected = 3 * (1 + 10 * 2) + full * (1 + 10 * 6)
    assert lines[0].endswith(f"about {duration(expected)} left"), lines[0]
    assert "about" not in lines[-1]  # nothing left after the last
