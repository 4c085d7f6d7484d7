"""Multi-objective search as an optuna study that survives crashes and is shared by workers.

    >>> plan = run_search(model, "1%", task, strategy="nsga2", trials=27,
    ...                   storage="sqlite:///study.db",
    ...                   fidelities=halving_rungs(Fidelity(steps=90, train_batches=27)))  # doctest: +SKIP
    >>> len(plan.front), plan.objectives  # doctest: +SKIP
    (4, {'metric': 0.86, 'params': 71424.0})

Each trial evaluates one plan of the `Space` at one rung of `fidelities` (successive
halving, see `peftplan.planner.fidelity`); `trials` counts completed rung-0 trials, so calling
again with the same storage and study name after a crash runs only what is left. A trial
killed outright stops sending heartbeats and is re-queued with the same parameters.

The study's user_attrs hold its `StudyConfig` — with a `Source` (model spec and task folder)
when started from the command line — so `run_worker(storage)` on another machine rebuilds
the model, task and space and takes its share of the trials.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch.nn as nn

from peftplan.planner.budget import Budget
from peftplan.planner.evaluate import Fidelity, evaluate
from peftplan.planner.front import ParetoFront
from peftplan.planner.plan import Plan
from peftplan.planner.task import Task
from peftplan.planner.trial_loop import Context, Evaluator, front_of, work

ATTR = "peftplan"  # the study user_attr holding its StudyConfig


class StudyError(RuntimeError):
    """A study that cannot be opened, joined or summarised; the message says why."""


@dataclass(frozen=True)
class Source:
    """Where a worker finds the model and task: a `load_model` spec and a folder with
    ``train.tsv``/``dev.tsv``; ``space`` is ``package.module:factory`` called like
    `default_space` (the default).

    >>> model, task = Source("minilm", "data/text/sst2", max_train=256).load()  # doctest: +SKIP
    """

    model: str
    task: str
    tokenizer: str | None = None
    num_labels: int = 2
    batch_size: int = 16
    max_train: int | None = None
    max_dev: int | None = None
    space: str | None = None

    def load(self) -> tuple[nn.Module, Task]:
        from peftplan.models import load_model

        folder = Path(self.task)
        model = load_model(self.model, num_labels=self.num_labels)
        task = Task.for_sequence_classification(model, load_tokenizer(self.tokenizer or self.model), folder / "train.tsv",
                                                folder / "dev.tsv", batch_size=self.batch_size, max_train=self.max_train,
                                                max_dev=self.max_dev)  # fmt: skip
        return model, task

    def build_space(self, model: nn.Module, task: Task, config: StudyConfig) -> Any:
        options = {"seed": config.seed, "objectives": config.objectives, "methods": config.methods,
                   "train_modules": config.train_modules}  # fmt: skip
        if self.space is None:
            return default_space(model, Budget.from_dict(config.budget), task, **options)
        import importlib

        module, _, name = self.space.partition(":")
        return getattr(importlib.import_module(module), name)(model, task, Budget.from_dict(config.budget), **options)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of ``minilm`` or of a local or hub model directory."""
    from transformers import AutoTokenizer

    from peftplan.models import minilm_dir

    if ":" in spec and not Path(spec).exists():
        raise ValueError(f"model {spec!r} is a factory: name its tokenizer (a model directory or 'minilm')")
    return AutoTokenizer.from_pretrained(minilm_dir() if spec == "minilm" else spec)


@dataclass
class StudyConfig:
    """Everything that defines a study; stored in its user_attrs so workers and restarts
    agree. ``limits`` are the budget as exact costs no plan may exceed."""

    strategy: str
    trials: int
    objectives: tuple[str, ...]
    senses: dict[str, str]
    fidelities: tuple[Fidelity, ...]
    limits: dict[str, float]
    budget: dict[str, Any]
    eta: int = 3
    seed: int = 0
    lr: float = 1e-3
    seeds: int = 4
    methods: tuple[str, ...] = ("lora",)
    train_modules: tuple[str, ...] | None = None
    source: Source | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fidelities"] = [asdict(f) for f in self.fidelities]
        for k in ("objectives", "methods", "train_modules"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        tuples = {k: None if d[k] is None else tuple(d[k]) for k in ("objectives", "methods", "train_modules")}
        return cls(**{**d, **tuples, "fidelities": tuple(Fidelity(**f) for f in d["fidelities"]),
                      "source": Source(**d["source"]) if d.get("source") else None})  # fmt: skip

    def default_name(self, task: Task, model: nn.Module) -> str:
        """Stable across calls with the same settings (``trials`` aside), so a rerun resumes."""
        key = {**self.to_dict(), "trials": None, "model": type(model).__name__, "task": task.name}
        return f"{task.name}-{self.strategy}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}"


def open_storage(storage: str | optuna.storages.BaseStorage | None, *, heartbeat: int = 30) -> optuna.storages.BaseStorage:
    """In memory (None), or an RDB URL (``sqlite:///study.db``, ``postgresql://…``) with
    heartbeats every ``heartbeat`` seconds: a trial silent for twice that is failed and
    re-queued with the same parameters (at most 3 times)."""
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
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
        except DBAPIError:  # processes starting together on a new database race to create its tables
            time.sleep(0.5 * (attempt + 1))
    return connect()


def open_study(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig, space: Any,
               sampler_seed: int | None = None, *, worker: bool = False) -> optuna.Study:  # fmt: skip
    """Create the study (enqueuing the space's seed plans once; never by a ``worker``, which
    could race its creator) or reopen it, checking it was made with the same settings; a
    different ``trials`` extends or shortens it.

    The sampler is seeded with ``sampler_seed`` (default ``config.seed``) on a new study and
    with a seed moved on by the trial count on a resumed one, so it does not replay the
    proposals it made before the crash."""
    from peftplan.planner.strategies import enqueue_seeds, make_sampler

    directions = ["maximize" if config.senses[k] == "max" else "minimize" for k in config.objectives]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())  # replaced below, once the history is known  # fmt: skip
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        study.set_user_attr(ATTR, config.to_dict())
    else:
        new = config.to_dict()
        differ = sorted(k for k in new if k != "trials" and new[k] != stored.get(k))
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


def run_search(
    model: nn.Module,
    budget: Budget | int | str,
    task: Task,
    *,
    strategy: str,
    trials: int,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    objectives: Iterable[str] = ("metric", "params"),
    fidelities: Iterable[Fidelity] | None = None,
    eta: int = 3,
    space: Any = None,
    progress: bool = True,
    lr: float = 1e-3,
    seeds: int = 4,
    methods: Iterable[str] = ("lora",),
    train_modules: Iterable[str] | None = None,
    threads: int | None = None,
    source: Source | None = None,
    evaluator: Evaluator = evaluate,
    heartbeat: int = 30,
) -> Plan:
    """Search ``space`` with an optuna ``strategy`` for ``trials`` completed candidates;
    return the best plan within budget, with ``plan.front``.

    The default space is `default_space` over ``objectives``, ``methods`` and
    ``train_modules``; a given ``space`` brings its own objectives and limits (its
    ``limits``: plans over them are never trained). ``seeds`` proxy plans start seeded
    strategies. ``fidelities`` (default: one rung of ``task.steps`` steps) are the rungs of
    successive halving by ``eta``; ``threads`` sets torch's thread count for each trial; ``source``
    records how workers rebuild the model and task (without it, none can join).

    >>> plan = run_search(model, "1%", task, strategy="tpe", trials=16)  # doctest: +SKIP
    >>> plan.front.to_csv("front.csv")  # doctest: +SKIP
    """
    from peftplan.planner.search import as_budget

    budget = as_budget(budget)
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    methods, train_modules = tuple(methods), None if train_modules is None else tuple(train_modules)
    if space is None:
        space = default_space(model, budget, task, seed=seed, objectives=objectives, methods=methods, train_modules=train_modules)
    fidelities = tuple(fidelities) if fidelities is not None else (Fidelity(steps=task.steps),)
    if not fidelities:
        raise ValueError("fidelities is empty: give at least one Fidelity")
    config = StudyConfig(strategy, trials, tuple(space.objectives), dict(space.objectives), fidelities,
                         {k: float(v) for k, v in space.limits.items()}, budget.to_dict(), eta, seed, lr, seeds,
                         methods, train_modules, source)  # fmt: skip
    name = study_name or config.default_name(task, model)
    study = open_study(open_storage(storage, heartbeat=heartbeat), name, config, space)
    work(study, Context(config, model, task, space, evaluator, threads), progress=progress)
    return best_plan(study)


def run_worker(storage: str | optuna.storages.BaseStorage, study_name: str | None = None, *, progress: bool = True,
               threads: int | None = None, evaluator: Evaluator = evaluate, heartbeat: int = 30) -> Plan:
    """Join a study started by ``peftplan search`` (on this machine or another): rebuild its
    model, task and space from the stored `Source` and take trials until it is done.

    >>> plan = run_worker("postgresql://host/db", "sst2-nsga2-1a2b3c4d")  # doctest: +SKIP
    """
    store = open_storage(storage, heartbeat=heartbeat)
    name = study_name or only_study(store)
    config = stored_config(store, name)
    if config.source is None:
        raise StudyError(f"study {name!r} was started from Python objects, so workers cannot rebuild its model: "
                         "start it with `peftplan search` (or run_search(source=Source(...)))")  # fmt: skip
    model, task = config.source.load()
    space = config.source.build_space(model, task, config)
    worker_seed = config.seed + 1 + os.getpid()  # workers must not replay the coordinator's proposals
    study = open_study(store, name, config, space, worker_seed, worker=True)
    work(study, Context(config, model, task, space, evaluator, threads), progress=progress)
    return best_plan(study)


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


def study_front(storage: optuna.storages.BaseStorage | str, study_name: str | None = None) -> ParetoFront:
    """The front of a stored study (its highest completed rung), plans included.

    >>> study_front("sqlite:///peftplan-study.db").to_csv("front.csv")  # doctest: +SKIP
    """
    name = study_name or only_study(storage)
    config = stored_config(storage, name)
    study = optuna.load_study(study_name=name, storage=storage)
    return front_of(study.get_trials(deepcopy=False), config.senses, config.objectives)


def best_plan(study: optuna.Study) -> Plan:
    """The best plan within budget of the study's front (highest first "max" objective),
    with ``plan.front`` set."""
    config = StudyConfig.from_dict(study.user_attrs[ATTR])
    front = front_of(study.get_trials(deepcopy=False), config.senses, config.objectives)
    if not len(front):
        reasons = sorted({t.user_attrs.get("failed", "killed") for t in study.get_trials(deepcopy=False)
                          if t.state == optuna.trial.TrialState.FAIL})  # fmt: skip
        raise StudyError(f"study {study.study_name!r}: no trial completed; failures: {reasons[:5] or 'none'}")
    within = {k: v for k, v in config.limits.items() if k in front.senses}
    plan = replace(front.best(within=within).plan)
    plan.front = front
    return plan


def default_space(model: nn.Module, budget: Budget | int | str, task: Task, *, seed: int = 0,
                  objectives: Iterable[str] = ("metric", "params"), methods: Iterable[str] = ("lora",),
                  train_modules: Iterable[str] | None = None, calibration_batches: int = 4,
                  sensitivity_power: float = 0.5) -> Any:  # fmt: skip
    """An `AllocatorSpace` over the sites ``search(strategy="proxy")`` scores, with the same
    scores (grad² on ``task``'s first batches, to ``sensitivity_power``), so its seeds are the
    proxy plans. ``train_modules`` default to a classification head (``classifier``/``score``).

    >>> space = default_space(model, "1%", task, methods=("lora", "ia3"))  # doctest: +SKIP
    """
    from peftplan.ir import lower
    from peftplan.planner.allocate import eligible_sites
    from peftplan.planner.scores import grad2_scores
    from peftplan.planner.space import AllocatorSpace

    graph = lower(model)
    if train_modules is None:
        train_modules = [s.name for s in graph if s.name.split(".")[0] in ("classifier", "score")]
    heads = list(train_modules)
    names = [s.name for s in eligible_sites(graph, "lora", ("attn", "mlp"), exclude=set(heads))]
    mass = grad2_scores(model, graph, task, names, batches=calibration_batches, seed=seed, progress=False)
    scores = {n: m**sensitivity_power for n, m in mass.items()}
    return AllocatorSpace(graph, scores, budget, methods=tuple(methods), objectives=tuple(objectives), train_modules=heads)

