"""What defines a study, stored in its user_attrs so workers and restarts agree: `StudyConfig`
and the `Source` a worker rebuilds the model and task from."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch.nn as nn

from ...backends.base import DEFAULT_METHODS, PlanError, get_method, shorten
from ...plan import Plan
from ...recipe import Recipe
from ..budget import Budget
from ..proxy.options import ProxyOptions
from ..space.default import default_space
from ..strategies import STRATEGIES
from ..training.evaluate import Fidelity
from ..training.task import Task
from .halving import top_slots

ATTR = "peftplan"  # the study user_attr holding its StudyConfig
PROPOSALS = ("budget", "front")  # where a study's sampler proposes (`StudyConfig.propose`)
KINDS = ("classification", "causal-lm")


class StudyError(RuntimeError):
    """A study that cannot be opened, joined or summarised; the message says why."""


@dataclass(frozen=True)
class Source:
    """Where a worker finds the model and task: a `load_model` spec and the task's data — a
    folder with ``train.tsv`` and ``dev.tsv``, or a data file (CSV, JSON/JSONL, Parquet) with
    its ``text_column``, ``pair_column`` and ``label_column`` — giving the training and, carved
    from them by ``validation`` and ``seed``, validation examples; ``eval`` is the evaluation
    file (default: the folder's ``dev.tsv``; a search never scores on it); ``space`` is
    ``package.module:factory`` called like `default_space` (the default). With ``kind``
    "causal-lm" the model loads as a causal language model and the task is
    `Task.for_causal_lm` over ``text_column``, ``prompt_column`` and ``response_column``, or
    ``messages_column``, scored by ``metric`` (over ``choices``).

    ``Source("minilm", "data/text/sst2", max_train=256)`` is MiniLM on SST-2's folder; below, a
    tiny model (a factory, with its tokenizer's folder) on a CSV file and its evaluation file:

    >>> from pathlib import Path
    >>> char_tokenizer().save_pretrained("tokenizer")  # doctest: +ELLIPSIS
    (...)
    >>> rows = ["review,label"] + [f"{'a good' if i % 2 else 'a dull'} film {i},{i % 2}" for i in range(24)]
    >>> _ = Path("reviews.csv").write_text("\\n".join(rows[:17]))  # a header and 16 reviews
    >>> _ = Path("test.csv").write_text("\\n".join(rows[:1] + rows[17:]))  # a header and 7 more
    >>> source = Source("tests.zoo:bert_classifier", "reviews.csv", tokenizer="tokenizer", eval="test.csv",
    ...                 text_column="review", batch_size=4)
    >>> model, task = source.load()
    >>> type(model).__name__, len(task.train_batches), len(task.validation_batches), len(task.eval_batches)
    ('BertForSequenceClassification', 4, 1, 2)

    A causal language model on chat data, one conversation a line:

    >>> import json
    >>> chat_tokenizer().save_pretrained("chat-tokenizer")  # doctest: +ELLIPSIS
    (...)
    >>> chats = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
    ...          for a in range(10)]
    >>> _ = Path("chat.jsonl").write_text("".join(json.dumps(c) + "\\n" for c in chats))
    >>> model, task = Source("tests.zoo:llama", "chat.jsonl", tokenizer="chat-tokenizer", kind="causal-lm",
    ...                      messages_column="messages", batch_size=4).load()
    >>> type(model).__name__, len(task.train_batches), task.metric_name
    ('LlamaForCausalLM', 2, 'minus loss per token')
    """

    model: str
    task: str
    tokenizer: str | None = None
    num_labels: int = 2
    batch_size: int = 16
    max_train: int | None = None
    max_dev: int | None = None
    space: str | None = None
    validation: float | int = 0.2
    seed: int = 0
    eval: str | None = None
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None
    kind: str = "classification"  # or "causal-lm": `Task.for_causal_lm` over text or prompt/response columns
    prompt_column: str | None = None
    response_column: str | None = None
    max_length: int | None = None  # tokens per example (None: the task's default, 64 or 128 for a causal LM)
    messages_column: str | None = None  # chat data (a causal LM): lists of {role, content} messages
    metric: str = "loss"  # a causal LM's: "loss", "choice" (over `choices`) or "exact_match"
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.choices is not None:  # a stored study gives a JSON list: the same choices
            object.__setattr__(self, "choices", tuple(self.choices))

    def factories(self) -> list[str]:
        """The ``package.module:factory`` specs `load` and `build_space` would import and call.

        >>> Source("tests.zoo:llama", "data", space="my.spaces:grouped").factories()
        ['tests.zoo:llama', 'my.spaces:grouped']
        """
        return [s for s in (self.model, self.space) if s is not None and is_factory(s)]

    def check_trusted(self, allow: Iterable[str], study: str) -> None:
        """Refuse a source that names code not in ``allow``: whoever can write a study's
        database chooses its `Source`, so a worker runs only the factories its own command line
        names (``peftplan worker URL --allow package.module:factory``)."""
        untrusted = [s for s in self.factories() if s not in set(allow)]
        if untrusted:
            flags = " ".join(f"--allow {s}" for s in untrusted)
            raise StudyError(
                f"study {study!r} asks its workers to import and run {untrusted}; a worker runs only the "
                f"factories its own command line allows. If you trust that code, run `peftplan worker URL {flags}` "
                f"(run_worker(..., allow={untrusted!r}))"
            )

    def load(self) -> tuple[nn.Module, Task]:
        from ...models import load_model

        length = {} if self.max_length is None else {"max_length": self.max_length}
        if self.kind == "causal-lm":
            model = load_model(self.model, causal_lm=True)
            task = Task.for_causal_lm(
                model,
                load_tokenizer(self.tokenizer or self.model),
                self.task,
                self.eval,
                text_column=self.text_column,
                prompt_column=self.prompt_column,
                response_column=self.response_column,
                messages_column=self.messages_column,
                metric=self.metric,
                choices=self.choices,
                batch_size=self.batch_size,
                max_train=self.max_train,
                max_dev=self.max_dev,
                validation=self.validation,
                seed=self.seed,
                **length,
            )
            return model, task
        model = load_model(self.model, num_labels=self.num_labels)
        task = Task.for_sequence_classification(
            model,
            load_tokenizer(self.tokenizer or self.model),
            self.task,
            self.eval,
            text_column=self.text_column,
            pair_column=self.pair_column,
            label_column=self.label_column,
            batch_size=self.batch_size,
            max_train=self.max_train,
            max_dev=self.max_dev,
            validation=self.validation,
            seed=self.seed,
            **length,
        )
        return model, task

    def build_space(self, model: nn.Module, task: Task, config: StudyConfig) -> Any:
        options = {"seed": config.seed, "objectives": config.objectives, "methods": config.methods}
        if self.space is None:
            return default_space(
                model,
                Budget.from_dict(config.budget),
                task,
                proxy=ProxyOptions.from_dict(config.proxy),
                lr=config.lr_range,
                **options,
            )
        module, _, name = self.space.partition(":")
        return getattr(importlib.import_module(module), name)(model, task, Budget.from_dict(config.budget), **options)


def stored_plan(trial: Any) -> Plan:
    """The plan a completed trial stored; `StudyError` naming the trial when it is damaged.

    >>> from types import SimpleNamespace
    >>> stored_plan(SimpleNamespace(number=3, user_attrs={"plan": {"format": "peftplan.plan"}}))
    Traceback (most recent call last):
    ...
    peftplan.planner.study.config.StudyError: trial 3's stored plan: plan format version None is not supported by this peftplan (reads versions [1, 2]); upgrade peftplan or re-create the plan
    """
    try:
        return Plan.from_dict(trial.user_attrs["plan"])
    except (PlanError, TypeError, ValueError) as e:
        raise StudyError(f"trial {trial.number}'s stored plan: {e}") from None


def is_factory(spec: str) -> bool:
    """Whether a model or space spec names Python code (``package.module:factory``), not a
    directory or ``minilm``."""
    return ":" in spec and not Path(spec).exists()


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a bundled model (``minilm``, ``smollm2``), a ``.gguf`` file or a local or
    hub model directory."""
    from transformers import AutoTokenizer

    from ...models import model_dir

    if is_factory(spec):
        raise ValueError(
            f"model {spec!r} is a factory: name its tokenizer (a model directory, a .gguf file, 'minilm' or 'smollm2')"
        )
    return AutoTokenizer.from_pretrained(model_dir(spec))


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
    recipe: dict[str, Any] | None = None  # the Recipe every trial trains by (at its rung's fidelity)
    seeds: int = 14  # run_search's default: 5 (a study stored before `followers` existed had 14)
    methods: tuple[str, ...] = DEFAULT_METHODS
    proxy: dict[str, Any] | None = None  # the ProxyOptions of the default space
    source: Source | None = None
    lr_range: tuple[float, float] | None = None  # the default space's learning-rate knob (None: the recipe's rate)
    screen_by: str = "metric"  # what promotion ranks candidates by (run_search's default: "loss"; a study stored
    # before the field existed promoted by the metric)
    refine: int = 0  # top-rung trainings of the best plan at neighbouring learning rates (a study stored before the
    # field existed made none)
    runs: float | None = None  # the study's cost cap in final-run equivalents, which sizes its top rung
    # (`halving.top_slots`; run_search's default: 3; a study stored before the field existed had none)
    tell: str = "metric"  # what a trial below the top rung tells the sampler: its "metric", or the signal promotion
    # ranks it by, "screened" (run_search's default; a study stored before the field existed told its metric)
    followers: tuple[dict[str, Any], ...] = ()  # baselines screened once, at the rate the seeds' baseline screened
    # best at: {"baseline": name, "params": knobs at the recipe's rate} (`Space.followers`; a study stored before the
    # field existed screened every baseline at every seed rate)
    propose: str = "front"  # where the sampler's proposals lie: every knob its choice ("front"), or at the whole
    # budget and the rate the seeds' baseline screened best at ("budget", run_search's default;
    # `policy.proposal_knobs`; a study stored before the field existed proposed over the front)
    extend: int = 0  # screens of the seeds' baseline added past its best-screened edge rate, at most (run_search's
    # default: `policy.EXTEND`; a study stored before the field existed added none)

    def top_slots(self) -> int | None:
        """How many candidates the top rung trains under the cost cap (None: no cap, the eta rule)."""
        recipe = Recipe.from_dict(self.recipe) if self.recipe else Recipe()
        refine = self.refine if refinable(self) else 0
        return top_slots(self.runs, self.trials, self.fidelities, recipe, self.eta, refine)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fidelities"] = [asdict(f) for f in self.fidelities]
        for k in ("objectives", "methods", "lr_range", "followers"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Any) -> StudyConfig:
        """A stored config read back, every field checked: a study's database may have been
        edited by hand or written by another program, so a bad field is a `StudyError` naming it
        (fields added since a study was stored take their defaults, what that study ran with).

        >>> StudyConfig.from_dict({"strategy": "tpe", "trials": "8"})
        Traceback (most recent call last):
        ...
        peftplan.planner.study.config.StudyError: the study's config field 'trials' is '8': expected an int >= 1
        """
        if not isinstance(d, dict):
            raise StudyError(
                f"the study's config is {type(d).__name__} {shorten(repr(d))}, not an object of fields "
                f"{sorted(READERS)}"
            )
        unknown = sorted(map(str, set(d) - set(READERS)))
        if unknown:
            raise StudyError(
                f"the study's config has unknown field(s) {shorten(str(unknown))}: it was written by another "
                "program or peftplan version"
            )
        out = {}
        for name, value in d.items():
            try:
                out[name] = READERS[name](value)
            except (TypeError, ValueError, KeyError) as e:
                raise StudyError(f"the study's config field {name!r} is {shorten(repr(value))}: {e}") from None
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in out]
        if missing:
            raise StudyError(f"the study's config has no field(s) {missing}")
        if set(out["objectives"]) - set(out["senses"]):
            raise StudyError(
                f"the study's config field 'senses' {out['senses']} does not cover its objectives {out['objectives']}"
            )
        config = cls(**out)
        try:
            config.top_slots()
        except ValueError as e:
            raise StudyError(f"the study's config field 'runs': {e}") from None
        return config

    def default_name(self, task: Task, model: nn.Module) -> str:
        """Stable across calls with the same settings (``trials`` aside), so a rerun resumes."""
        key = {**self.to_dict(), "trials": None, "model": type(model).__name__, "task": task.name}
        return f"{task.name}-{self.strategy}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}"


def refinable(config: StudyConfig) -> bool:
    """Whether the study refines its best plan's learning rate at the top rung: it asks for
    refinements, searches the rate, and has rungs below the top (one rung has no screen to
    correct: its sampler chose every rate at full length already)."""
    return config.refine > 0 and config.lr_range is not None and len(config.fidelities) > 1


def _int(low: int) -> Callable[[Any], int]:
    def read(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"expected an int >= {low}")
        return v

    return read


def _strings(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected a list of names")
    return tuple(v)


def _fidelities(v: Any) -> tuple[Fidelity, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(f, dict) for f in v):
        raise ValueError("expected a list of fidelities, one per rung")
    return tuple(Fidelity(**f) for f in v)


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A reader that keeps the stored value once ``check`` accepts it (None stays None)."""
    return lambda v: None if v is None else (check(v), v)[1]


def _limits(v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and _finite(x) for k, x in v.items()):
        raise ValueError("expected limits as {cost name: number}")
    return v


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(v: Any) -> float:
    if not (_finite(v) and v > 0):
        raise ValueError("expected a positive number of final-run equivalents, or null")
    return v


def _lr_range(v: Any) -> tuple[float, float] | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and all(_finite(x) and x > 0 for x in v) and v[0] <= v[1]):
        raise ValueError("expected [low, high], two positive learning rates")
    return tuple(v)


def _followers(v: Any) -> tuple[dict[str, Any], ...]:
    ok = lambda f: (  # noqa: E731
        isinstance(f, dict)
        and set(f) == {"baseline", "params"}
        and isinstance(f["baseline"], str)
        and isinstance(f["params"], dict)
        and all(isinstance(k, str) and isinstance(x, (int, float, str)) for k, x in f["params"].items())
    )
    if not isinstance(v, list) or not all(map(ok, v)):
        raise ValueError('expected a list of {"baseline": name, "params": {knob: value}}')
    return tuple(v)


def _choice(*options: str) -> Callable[[Any], str]:
    def read(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {list(options)}")
        return v

    return read


READERS: dict[
    str, Callable[[Any], Any]
] = {  # each stored field: its value read back, or an error saying what it must be
    "strategy": _choice(*STRATEGIES),
    "trials": _int(1),
    "objectives": _strings,
    "senses": lambda v: {k: _choice("max", "min")(x) for k, x in dict(v).items()},
    "fidelities": _fidelities,
    "limits": _limits,
    "budget": _checked(lambda v: Budget.from_dict(dict(v))),
    "eta": _int(2),
    "seed": _int(-(2**63)),
    "recipe": _checked(lambda v: Recipe.from_dict(dict(v))),
    "seeds": _int(0),
    "methods": lambda v: tuple(get_method(m).name for m in _strings(v)),
    "proxy": _checked(lambda v: ProxyOptions.from_dict(dict(v))),
    "source": lambda v: None if v is None else Source(**dict(v)),
    "lr_range": _lr_range,
    "screen_by": _choice("metric", "loss"),
    "refine": _int(0),
    "extend": _int(0),
    "runs": lambda v: None if v is None else _positive(v),
    "followers": _followers,
    "tell": _choice("metric", "screened"),
    "propose": _choice(*PROPOSALS),
}
