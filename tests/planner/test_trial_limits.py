"""Trials that hang and workers that die: a trial past ``trial_timeout`` is stopped and recorded
as failed with the reason (a loop blocked in a wait, one spinning in Python), and a worker
killed in the middle of its trial leaves it to the other workers, who fail it by its silence,
run it again and finish the study. The hangs and the kill run in subprocesses, each bounded
(marked slow: 20 to 30 s each, most of it starting Python and torch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest

from peftplan.cli import main
from peftplan.planner.study.watch import TrialTimeout, time_limit, watched
from peftplan.planner.training.evaluate import Evaluation
from tests.planner.trials import write_task

ROOT = Path(__file__).resolve().parents[2]
BOUND = 240  # seconds any subprocess here may take before the test fails instead of hanging


def spawn(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(*procs: subprocess.Popen) -> list[str]:
    """The processes' outputs once they exit, all within `BOUND` seconds (else killed, and the test fails)."""
    deadline, outputs = time.monotonic() + BOUND, []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"still running after {BOUND} s: {[p.communicate()[0][-3000:] for p in procs]}") from None
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    return outputs


HANGING = """
import threading, optuna, torch; torch.set_num_threads(1)
import peftplan as pp
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier
calls = []

def my_loop(model, fidelity):
    calls.append(1)
    if len(calls) == 1:
        threading.Event().wait()  # blocked for ever
    if len(calls) == 2:
        while True:  # spinning for ever
            pass
    return 0.5 + 0.01 * len(calls)

pp.search(bert_classifier(), "5%", tiny_task(), evaluate=my_loop, strategy="random", trials=3, seeds=0, progress=False,
          storage={url!r}, study_name="hang", trial_timeout=2)
"""


@pytest.mark.slow
def test_trials_that_never_return_are_stopped_and_recorded_as_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    finish(spawn(HANGING.format(url=url)))
    trials = optuna.load_study(study_name="hang", storage=url).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [0, 1]
    for t in failed:
        assert t.user_attrs["failed"].startswith(
            "timed out: the trial ran past its time limit of 2 s and was stopped; "
            "raise the limit (trial_timeout=, --trial-timeout)"
        )
        assert 2 <= t.user_attrs["seconds"] < 10
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["rung"] == 0]
    assert len(done) == 3 and not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


SEARCH = """
import os, socket, time, optuna, torch; torch.set_num_threads(1)
from peftplan.planner.study import Source, open_storage, run_search
from peftplan.planner.training.evaluate import Fidelity
from tests.planner.trials import slow_stand_in
source = Source("tests.zoo:minilm_vocab_classifier", {task!r}, tokenizer="minilm", batch_size=8)
model, task = source.load()
storage = open_storage({url!r}, heartbeat=1)
me = f"{{socket.gethostname()}}:{{os.getpid()}}"

def evaluate(*args, **kwargs):  # the first trial waits until the worker has taken one of its own
    deadline = time.time() + 120
    while time.time() < deadline:
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
        if any(t.user_attrs.get("worker") not in (None, me) for t in trials):
            break
        time.sleep(0.2)
    return slow_stand_in(*args, **kwargs)

run_search(model, "1%", task, strategy="random", trials={trials}, storage=storage, study_name="shared", source=source,
           evaluator=evaluate, progress=False, threads=1, fidelities=[Fidelity()], seeds=0)
"""
DYING = """
import os, signal, time, optuna
from peftplan.planner.study import open_storage, run_worker
storage = open_storage({url!r}, heartbeat=1)
deadline = time.time() + 120
while "shared" not in optuna.get_all_study_names(storage):
    assert time.time() < deadline, "the search never created its study"
    time.sleep(0.2)

def die(*args, **kwargs):  # killed in the middle of its first trial: no tell, no goodbye
    os.kill(os.getpid(), signal.SIGKILL)

run_worker(storage, "shared", evaluator=die, progress=False, threads=1, allow=["tests.zoo:minilm_vocab_classifier"])
"""


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_a_study_the_others_finish(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'study.db'}", 4
    search = spawn(SEARCH.format(task=str(write_task(tmp_path / "task")), url=url, trials=n))
    worker = spawn(DYING.format(url=url))
    worker.wait(timeout=BOUND)
    assert worker.returncode == -signal.SIGKILL, worker.stdout.read()
    finish(search)
    trials = optuna.load_study(study_name="shared", storage=url).trials
    (dead,) = [t for t in trials if t.user_attrs["worker"].split(":")[1] == str(worker.pid)]
    assert dead.state == optuna.trial.TrialState.FAIL  # failed by its silence, not left RUNNING
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert (
        len(retry) == 1
        and retry[0].state == optuna.trial.TrialState.COMPLETE
        and dead.params.items() <= retry[0].params.items()
    )
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == n
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def test_the_cli_limits_trials_and_checks_the_limit(tmp_path, capsys):
    task = write_task(tmp_path / "task", n_train=24, n_dev=8)
    argv = [
        "search",
        "tests.zoo:minilm_vocab_classifier",
        "--task",
        str(task),
        "--tokenizer",
        "minilm",
        "--budget",
        "1%",
        "--strategy",
        "random",
        "--trials",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "-q",
        "--storage",
        f"sqlite:///{tmp_path / 'study.db'}",
        "-o",
        str(tmp_path / "plan.json"),
    ]
    with pytest.warns(UserWarning, match="evaluations failed"):
        assert main([*argv, "--trial-timeout", "0.01"]) == 2  # no trial trains in 10 ms
    err = capsys.readouterr().err
    assert "no trial completed; failures: ['timed out: the trial ran past its time limit of 0.01 s" in err
    assert main([*argv, "--trial-timeout", "-1"]) == 2
    assert "trial_timeout=-1.0: give the seconds a trial may run (a positive number)" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def test_a_limit_in_a_thread_other_than_the_main_one_stops_python_code():
    out = []

    def spinning() -> Evaluation:
        while True:
            time.sleep(0.01)

    thread = threading.Thread(
        target=lambda: out.append(watched(optuna.storages.InMemoryStorage(), 0, 0.3, spinning)), daemon=True
    )
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and out[0].failed.startswith("timed out: the trial ran past its time limit of 0.3 s")


@pytest.mark.parametrize("thread", ["main", "other"])
def test_a_trial_that_swallows_its_time_limit_is_still_stopped(thread):
    """Code that catches BaseException swallows the interrupt; ended before the next one, its
    result came back as if in time."""

    def swallowing() -> Evaluation:
        try:
            time.sleep(5)
        except BaseException:
            pass
        return Evaluation(0.75, 1_536, 0.1)

    out = []
    run = lambda: out.append(watched(optuna.storages.InMemoryStorage(), 0, 0.1, swallowing))  # noqa: E731
    if thread == "main":
        run()
    else:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=30)
    assert out[0].metric is None and out[0].failed.startswith("timed out: the trial ran past its time limit of 0.1 s")


def test_a_trial_within_its_limit_leaves_no_alarm_behind():
    handler = signal.getsignal(signal.SIGALRM)
    with time_limit(0.2):
        pass
    time.sleep(0.5)  # a timer left running would raise TrialTimeout here
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(TrialTimeout), time_limit(0.1):
        time.sleep(5)


STUCK = """
import signal, time, torch; torch.set_num_threads(1)
from peftplan.planner.study import Source, open_storage, run_search
from peftplan.planner.training.evaluate import Fidelity
source = Source("tests.zoo:minilm_vocab_classifier", {task!r}, tokenizer="minilm", batch_size=8)
model, task = source.load()

def stuck(*args, **kwargs):  # as if inside one native call: no signal reaches it, no time limit stops it
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
    time.sleep(10**6)

run_search(model, "1%", task, strategy="random", trials={trials}, storage=open_storage({url!r}, heartbeat=1),
           study_name="shared", source=source, evaluator=stuck, progress=False, threads=1, fidelities=[Fidelity()],
           seeds=0, trial_timeout=1)
"""
WORKER = """
import time, optuna
from peftplan.planner.study import open_storage, run_worker
from tests.planner.trials import slow_stand_in
storage = open_storage({url!r}, heartbeat=1)
deadline = time.time() + 120
while "shared" not in optuna.get_all_study_names(storage) or not optuna.load_study(study_name="shared",
                                                                                   storage=storage).get_trials():
    assert time.time() < deadline, "the search never started a trial"
    time.sleep(0.2)
run_worker(storage, "shared", evaluator=slow_stand_in, progress=False, threads=1, allow=["tests.zoo:minilm_vocab_classifier"])
"""


@pytest.mark.slow
def test_a_trial_stuck_past_its_limit_goes_silent_and_the_others_run_it_again(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'study.db'}", 3
    stuck = spawn(STUCK.format(task=str(write_task(tmp_path / "task")), url=url, trials=n))
    try:
        finish(spawn(WORKER.format(url=url)))  # the worker finishes the study on its own
    finally:
        stuck.kill()
        stuck.communicate()
    trials = optuna.load_study(study_name="shared", storage=url).trials
    (held,) = [t for t in trials if t.user_attrs["worker"].split(":")[1] == str(stuck.pid)]
    assert held.state == optuna.trial.TrialState.FAIL  # its heartbeats stopped one interval past the limit
    assert any(
        t.system_attrs.get("failed_trial") == held.number and t.state == optuna.trial.TrialState.COMPLETE
        for t in trials
    )
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == n
