"""A trial under watch: while it runs, heartbeats tell an RDB storage that its worker is alive
— a worker that dies goes silent, and the other workers fail its trial and queue it again
(`engine.fail_dead_trials`), so a shared study never waits on a trial RUNNING forever — and a
time limit stops a trial that runs too long (a user's loop that never returns), which is then
recorded as failed, with the reason, like a trial that diverged.

The limit interrupts the trial where it is: in the main thread by SIGALRM, which also wakes a
sleep or a wait; in another thread by an exception raised asynchronously in it, which takes
effect at its next Python instruction (not inside a blocking call). A trial stuck past its
limit inside one native call stops sending heartbeats one interval later, so the other
workers treat its worker as dead.

    >>> import optuna
    >>> from peftplan.planner.study import open_storage
    >>> storage = open_storage("sqlite:///study.db", heartbeat=1)
    >>> study = optuna.create_study(storage=storage, study_name="s")
    >>> trial_id = storage.create_new_trial(storage.get_study_id_from_name("s"))  # RUNNING, as study.ask() makes it
    >>> watched(storage, trial_id, 60.0, lambda: Evaluation(0.75, 1_536, 0.1))  # in time: its own result
    Evaluation(metric=0.75, params=1536, seconds=0.1, failed=None, loss=None, train_seconds=None)
    >>> result = watched(storage, trial_id, 0.5, lambda: time.sleep(600))  # a loop that never returns
    >>> result.metric, result.failed  # doctest: +ELLIPSIS
    (None, 'timed out: the trial ran past its time limit of 0.5 s and was stopped; raise the limit ...')
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..training.evaluate import Evaluation


class TrialTimeout(BaseException):
    """Raised inside a trial past its time limit. A BaseException, like KeyboardInterrupt, so
    that the ``except Exception`` of the trial's own code does not swallow it."""


def check_timeout(seconds: Any) -> float | None:
    """``trial_timeout`` as seconds (None: no limit); anything else is an error naming it.

    >>> check_timeout(90), check_timeout(None)
    (90.0, None)
    >>> check_timeout(0)
    Traceback (most recent call last):
    ...
    ValueError: trial_timeout=0: give the seconds a trial may run (a positive number), or None for no limit
    """
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"trial_timeout={seconds!r}: give the seconds a trial may run (a positive number), or None for no limit"
        )
    return float(seconds)


def watched(storage: Any, trial_id: int, seconds: float | None, run: Callable[[], Evaluation]) -> Evaluation:
    """``run()``'s evaluation, with heartbeats for ``trial_id`` in ``storage`` meanwhile; past
    ``seconds`` (None: no limit) the trial is stopped and comes back failed, saying why."""
    start = time.monotonic()
    beats = _heartbeats(storage, trial_id, None if seconds is None else start + seconds)
    try:
        with time_limit(seconds):
            return run()
    except TrialTimeout:
        return Evaluation(
            None,
            0,
            time.monotonic() - start,
            f"timed out: the trial ran past its time limit of {seconds:g} s "
            "and was stopped; raise the limit (trial_timeout=, --trial-timeout) or make trials shorter",
        )
    finally:
        beats.set()


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """`TrialTimeout` inside the block once it has run ``seconds`` (again every second, should
    the block swallow one), and at its end where it swallowed every one (code that catches
    BaseException, or a callback whose errors are dropped, may), never after it ends."""
    if seconds is None:
        yield
        return
    fired: list[bool] = []
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def alarm(signum: int, frame: Any) -> None:
            fired.append(True)
            raise TrialTimeout()

        previous = signal.signal(signal.SIGALRM, alarm)
        before = signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if before[0]:  # someone else's timer was running: it goes on
                signal.setitimer(signal.ITIMER_REAL, *before)
    else:
        with _async_limit(seconds, fired):
            yield
    if fired:  # it ran past its limit and went on: a result after the limit is no result
        raise TrialTimeout()


@contextlib.contextmanager
def _async_limit(seconds: float, fired: list[bool]) -> Iterator[None]:
    """`time_limit` for a thread other than the main one (no signals reach it); ``fired`` gets
    an entry once the limit is reached."""
    target, done = threading.get_ident(), threading.Event()

    def fire() -> None:
        if not done.wait(seconds):
            fired.append(True)
            while not done.is_set():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(TrialTimeout))
                done.wait(1.0)

    timer = threading.Thread(target=fire, name="peftplan-trial-limit", daemon=True)
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.join()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)  # one still pending: dropped


def _heartbeats(storage: Any, trial_id: int, deadline: float | None) -> threading.Event:
    """Record heartbeats of ``trial_id`` every interval the storage asks for (none without
    heartbeats: in memory), until the returned event is set or one interval past ``deadline``;
    the first is recorded before this returns."""
    stop = threading.Event()
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if interval is None:
        return stop
    storage.record_heartbeat(trial_id)

    def beat() -> None:
        while not stop.wait(interval):
            if deadline is not None and time.monotonic() > deadline + interval:
                return  # stuck past its limit where the limit cannot reach: let the others see it as dead
            storage.record_heartbeat(trial_id)

    threading.Thread(target=beat, name=f"peftplan-heartbeat-{trial_id}", daemon=True).start()
    return stop
