"""Optuna storages and studies: open (in memory, SQLite, PostgreSQL, with heartbeats), create
or reopen with the same settings, list, read back a study's config."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from ..strategies import enqueue_seeds, make_sampler
from .config import ATTR, StudyConfig, StudyError


def open_storage(storage: str | optuna.storages.BaseStorage | None, *, heartbeat: int = 30) -> optuna.storages.BaseStorage:
    """In memory (None), or an RDB URL (``sqlite:///study.db``, ``postgresql://…``) with
    heartbeats every ``heartbeat`` seconds: a trial silent for twice that is failed and
    re-queued with the same parameters (at most 3 times)."""
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    check_url(storage)
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import DBAPIError

    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}
    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))  # fmt: skip

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
        raise StudyError(f"cannot open the study storage {storage!r}: {str(e.orig).splitlines()[0]}; "
                         "give the URL of an optuna database (a new SQLite file is created)") from None  # fmt: skip


def check_url(storage: str, *, exists: bool = False) -> None:
    """`StudyError` unless ``storage`` is a database URL (and, for SQLite, one whose folder
    exists, and with ``exists`` whose file does: reading must not create an empty database).

    >>> check_url("study.db")
    Traceback (most recent call last):
    peftplan.planner.study.config.StudyError: storage 'study.db' is not a database URL: use sqlite:///study.db or postgresql://user@host/db
    """
    if "://" not in storage:
        raise StudyError(f"storage {storage!r} is not a database URL: use sqlite:///study.db or postgresql://user@host/db")
    if not storage.startswith("sqlite:///") or storage.endswith(":memory:"):
        return
    path = Path(storage[len("sqlite:///"):])
    if not path.parent.is_dir():
        raise StudyError(f"the folder of the SQLite storage {storage!r} does not exist: create {path.parent} or give another path")
    if exists and not path.exists():
        raise StudyError(f"no SQLite database at {path}; give the storage the study was run with")


def _normalised(stored: dict) -> dict:
    """A stored config as `StudyConfig.to_dict` writes it today: fields added since it was stored
    take their defaults (what that study ran with), JSON lists their tuple form."""
    try:
        return StudyConfig.from_dict(stored).to_dict()
    except (TypeError, ValueError, KeyError):
        return stored


def open_study(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig, space: Any,
               sampler_seed: int | None = None, *, worker: bool = False) -> optuna.Study:  # fmt: skip
    """Create the study (enqueuing the space's seed plans once; never by a ``worker``, which
    could race its creator) or reopen it, checking it was made with the same settings; a
    different ``trials`` extends or shortens it.

    The sampler is seeded with ``sampler_seed`` (default ``config.seed``) on a new study and
    with a seed moved on by the trial count on a resumed one, so it does not replay the
    proposals it made before the crash."""
    directions = ["maximize" if config.senses[k] == "max" else "minimize" for k in config.objectives]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())  # replaced below, once the history is known  # fmt: skip
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        study.set_user_attr(ATTR, config.to_dict())
        with warnings.catch_warnings():  # stable since optuna 3.2, still flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(config.objectives))  # what optuna-dashboard and optuna's plots name the axes
    else:
        new, old = config.to_dict(), _normalised(stored)
        differ = sorted(k for k in new if k != "trials" and new[k] != old.get(k))
        if differ:
            raise StudyError(f"study {name!r} exists with other settings ({', '.join(differ)}): "
                             "reuse them or give another study name")  # fmt: skip
        if stored["trials"] != config.trials:
            study.set_user_attr(ATTR, new)
    if not worker and not study.user_attrs.get("seeds_enqueued"):  # once per study, not again on resume
        enqueue_seeds(study, space, config.strategy, min(config.seeds, config.trials))
        study.set_user_attr("seeds_enqueued", True)
    started = sum(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))
    seed = (config.seed if sampler_seed is None else sampler_seed) + 7919 * started
    study.sampler = make_sampler(config.strategy, space, seed=seed, constraints=config.limits)
    return study


def stored_config(storage: optuna.storages.BaseStorage | str, name: str) -> StudyConfig:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"no study named {name!r} in the storage; it has {study_names(storage)}") from None
    if ATTR not in study.user_attrs:
        raise StudyError(f"study {name!r} was not made by peftplan (no {ATTR!r} user_attr)")
    return StudyConfig.from_dict(study.user_attrs[ATTR])


def study_names(storage: optuna.storages.BaseStorage | str) -> list[str]:
    return sorted(optuna.get_all_study_names(storage=storage))


def only_study(storage: optuna.storages.BaseStorage | str) -> str:
    """The name of the storage's single study; an error naming them all when there are more."""
    names = study_names(storage)
    if len(names) != 1:
        raise StudyError(f"the storage holds {len(names)} studies {names}: choose one with --study NAME")
    return names[0]
