"""Optuna storages and studies: open (in memory, SQLite, PostgreSQL, with heartbeats), create
or reopen with the same settings (one stored by an earlier version goes on as it ran:
`resumed_config`), list, read back a study's config."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from ..strategies import enqueue_seeds, make_sampler
from .config import ATTR, StudyConfig, StudyError


def open_storage(
    storage: str | optuna.storages.BaseStorage | None, *, heartbeat: int = 30, writable: bool = True
) -> optuna.storages.BaseStorage:
    """In memory (None), or an RDB URL (``sqlite:///study.db``, ``postgresql://…``) with
    heartbeats every ``heartbeat`` seconds: a trial silent for twice that is failed and
    re-queued with the same parameters (at most 3 times). A SQLite file this process may not
    write is refused unless only read (``writable=False``)."""
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    check_url(storage, writable=writable)
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import DBAPIError

    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}

    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                storage,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )

    for attempt in range(4):
        try:
            return connect()
        except DBAPIError as e:  # processes starting together on a new database race to create its tables
            if "not a database" in str(e):
                break
            time.sleep(0.5 * (attempt + 1))
    try:
        return connect()
    except DBAPIError as e:
        raise StudyError(
            f"cannot open the study storage {storage!r}: {str(e.orig).splitlines()[0]}; "
            "give the URL of an optuna database (a new SQLite file is created)"
        ) from None


def check_url(storage: str, *, exists: bool = False, writable: bool = False) -> None:
    """`StudyError` unless ``storage`` is a database URL (and, for SQLite, one whose folder
    exists, with ``exists`` whose file does: reading must not create an empty database, and
    with ``writable`` one this process may write, file and folder).

    >>> check_url("study.db")
    Traceback (most recent call last):
    peftplan.planner.study.config.StudyError: storage 'study.db' is not a database URL: use sqlite:///study.db or postgresql://user@host/db
    """
    if "://" not in storage:
        raise StudyError(
            f"storage {storage!r} is not a database URL: use sqlite:///study.db or postgresql://user@host/db"
        )
    if not storage.startswith("sqlite:///") or storage.endswith(":memory:"):
        return
    path = Path(
        storage[len("sqlite:///") :].split("?")[0].removeprefix("file:")
    )  # sqlite:///file:x.db?mode=ro&uri=true too
    if not path.parent.is_dir():
        raise StudyError(
            f"the folder of the SQLite storage {storage!r} does not exist: create {path.parent} or give another path"
        )
    if exists and not path.exists():
        raise StudyError(f"no SQLite database at {path}; give the storage the study was run with")
    unwritable = (
        path
        if path.exists() and not os.access(path, os.W_OK)
        else path.parent
        if not os.access(path.parent, os.W_OK)
        else None
    )  # SQLite writes its journal beside the file
    if writable and unwritable is not None:
        raise StudyError(
            f"the SQLite storage {storage!r} cannot be written: this process may not write {unwritable}; a "
            f"search and its workers write every trial there: {READ_ONLY_FIX}"
        )


READ_ONLY_FIX = (
    "give a storage this process may write (copy the database somewhere writable, or fix its permissions); "
    "`peftplan front` reads a read-only study"
)


def where(storage: optuna.storages.BaseStorage | str) -> str:
    """The URL of a storage, for messages (``in memory`` for optuna's in-memory storage)."""
    if isinstance(storage, str):
        return storage
    url = getattr(storage, "url", None) or getattr(getattr(storage, "_backend", None), "url", None)
    return str(url) if url else "in memory"


@contextlib.contextmanager
def writing(storage: optuna.storages.BaseStorage, name: str) -> Iterator[None]:
    """Storage failures while study ``name`` is written, said with its database and what to do:
    optuna's own message blames "invalid data in the commit, e.g. exceeding max length"."""
    try:
        yield
    except optuna.exceptions.StorageInternalError as e:
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        said = " ".join(str(getattr(cause, "orig", None) or cause).split())[:300]
        fix = (
            READ_ONLY_FIX
            if "readonly" in said.replace("-", "").replace(" ", "").lower()
            else "check that the database server is up and its disk has room, then run again to resume"
        )
        raise StudyError(f"study {name!r}: cannot write to the storage {where(storage)} ({said}); {fix}") from None


def damaged(storage: optuna.storages.BaseStorage | str, name: str, e: StudyError) -> StudyError:
    """What to raise when a stored study's data does not read back: ``e`` with the study, its
    database and what to do."""
    return StudyError(
        f"study {name!r} in {where(storage)}: {e}; the database was edited or written by another program: "
        "restore it, or start a new study (another --study name or storage)"
    )


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    config: StudyConfig,
    space: Any,
    sampler_seed: int | None = None,
    *,
    worker: bool = False,
) -> optuna.Study:
    """Create the study (enqueuing the space's seed plans once; never by a ``worker``, which
    could race its creator) or reopen it, checking it was made with the same settings; a
    different ``trials`` extends or shortens it.

    The sampler is seeded with ``sampler_seed`` (default ``config.seed``) on a new study and
    with a seed moved on by the trial count on a resumed one, so it does not replay the
    proposals it made before the crash."""
    directions = ["maximize" if config.senses[k] == "max" else "minimize" for k in config.objectives]
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions,
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(),
    )  # replaced below, once the history is known
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        study.set_user_attr(ATTR, config.to_dict())
        with warnings.catch_warnings():  # stable since optuna 3.2, still flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(config.objectives))  # what optuna-dashboard and optuna's plots name the axes
    else:
        try:
            differ = differing(stored, config)
        except StudyError as e:
            raise damaged(storage, name, e) from None
        if differ:
            raise StudyError(
                f"study {name!r} exists with other settings ({', '.join(differ)}): "
                "reuse them or give another study name"
            )
        if stored["trials"] != config.trials:
            study.set_user_attr(ATTR, {**stored, "trials": config.trials})  # fields it lacks stay as they ran
    if not worker and not study.user_attrs.get("seeds_enqueued"):  # once per study, not again on resume
        enqueue_seeds(study, space, config.strategy, min(config.seeds, config.trials))
        study.set_user_attr("seeds_enqueued", True)
    started = sum(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))
    seed = (config.seed if sampler_seed is None else sampler_seed) + 7919 * started
    study.sampler = make_sampler(config.strategy, space, seed=seed, constraints=config.limits)
    return study


def resumed_config(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig) -> StudyConfig:
    """The settings study ``name`` goes on with: ``config`` for a new study; for one stored before
    some of ``config``'s fields existed, and agreeing with ``config`` on every field it stored,
    the stored config with ``config``'s trials, so the fields it lacks keep the values it ran with
    (`StudyConfig.from_dict`) rather than today's defaults. Otherwise ``config``, and
    `open_study` names any field that differs.

    >>> from peftplan.planner.training.evaluate import Fidelity
    >>> config = StudyConfig("tpe", 8, ("metric",), {"metric": "max"}, (Fidelity(),), {}, {}, tell="screened")
    >>> storage = optuna.storages.InMemoryStorage()
    >>> study = optuna.create_study(storage=storage, study_name="old")
    >>> study.set_user_attr(ATTR, {k: v for k, v in config.to_dict().items() if k != "tell"})  # before `tell`
    >>> resumed_config(storage, "old", replace(config, trials=12)).tell, resumed_config(storage, "new", config) is config
    ('metric', True)
    """
    try:
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(ATTR)
    except KeyError:
        return config
    if not isinstance(stored, dict) or set(config.to_dict()) <= set(stored):
        return config
    try:
        if differing(stored, config):
            return config  # open_study names the fields
    except StudyError:
        return config  # open_study says what is damaged
    return replace(StudyConfig.from_dict(stored), trials=config.trials)


def differing(stored: dict, config: StudyConfig) -> list[str]:
    """The fields a stored study config holds (its ``trials`` aside) on which ``config``
    differs; one it lacks was added since, and the study goes on with the value it ran with
    (`resumed_config`). A damaged config is a `StudyError`.

    >>> from peftplan.planner.training.evaluate import Fidelity
    >>> config = StudyConfig("tpe", 8, ("metric",), {"metric": "max"}, (Fidelity(),), {}, {})
    >>> stored = {k: v for k, v in config.to_dict().items() if k != "tell"}  # written before `tell`
    >>> differing(stored, replace(config, tell="screened", trials=12)), differing(stored, replace(config, seed=1))
    ([], ['seed'])
    """
    new, old = config.to_dict(), StudyConfig.from_dict(stored).to_dict()
    return sorted(k for k in stored if k != "trials" and new[k] != old[k])


def stored_config(storage: optuna.storages.BaseStorage | str, name: str) -> StudyConfig:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"no study named {name!r} in the storage; it has {study_names(storage)}") from None
    if ATTR not in study.user_attrs:
        raise StudyError(f"study {name!r} was not made by peftplan (no {ATTR!r} user_attr)")
    try:
        return StudyConfig.from_dict(study.user_attrs[ATTR])
    except StudyError as e:
        raise damaged(storage, name, e) from None


def study_names(storage: optuna.storages.BaseStorage | str) -> list[str]:
    return sorted(optuna.get_all_study_names(storage=storage))


def only_study(storage: optuna.storages.BaseStorage | str) -> str:
    """The name of the storage's single study; an error naming them all when there are more."""
    names = study_names(storage)
    if len(names) != 1:
        raise StudyError(f"the storage holds {len(names)} studies {names}: choose one with --study NAME")
    return names[0]
