"""`Task`: what scoring and evaluating a plan needs — batches, a loss, a metric, a step budget.

    >>> task = Task.for_sequence_classification(MODEL_DIR, None, "sst2/train.tsv", "sst2/dev.tsv",
    ...                                         max_train=256, max_dev=128)  # doctest: +SKIP
    >>> len(task.train_batches), task.name  # doctest: +SKIP
    (8, 'sst2')
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backends.labels import check_model_labels
from ...ir.inputs import batch_shape
from . import answers, lm
from .data import Columns, Labels, Row, read_split, splits
from .device import inference, resolve

Batch = dict[str, torch.Tensor]


@dataclass
class Task:
    """Training, validation and evaluation batches plus how to score a model on them.

    ``loss(model, batch)`` returns a scalar tensor with an autograd graph;
    ``metric(model, batches)`` returns a float where higher is better; how long a run trains
    is its `Recipe`'s business (one pass over ``train_batches`` by default). A search scores candidates on
    ``validation_batches`` (carved from the training data); ``eval_batches`` are for the final
    report only.
    """

    train_batches: list[Batch]
    eval_batches: list[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    metric: Callable[[nn.Module, list[Batch]], float]
    name: str = "task"
    validation_batches: list[Batch] = field(default_factory=list)
    labels: tuple[str, ...] | None = None  # class names by id, when the data named its classes
    kind: str = "classification"  # or "causal-lm" (`for_causal_lm`): what the metric means
    weight: Callable[[Batch], int] | None = None  # what a batch's mean loss is over (None: its examples)

    def with_validation(self, share: float | int, seed: int = 0) -> Task:
        """A copy whose validation batches are ``share`` of the training batches (a fraction in
        (0, 1), or a count), drawn with ``seed``; the rest stay training batches. For tasks
        built from batches; `for_sequence_classification` carves examples, stratified by label.

        >>> t = Task([{"x": i} for i in range(10)], [], None, None).with_validation(0.2, seed=1)
        >>> len(t.train_batches), len(t.validation_batches)
        (8, 2)
        """
        n = len(self.train_batches)
        k = _count(share, n, "training batches")
        picked = set(random.Random(seed).sample(range(n), k))
        return replace(self, train_batches=[b for i, b in enumerate(self.train_batches) if i not in picked],
                       validation_batches=[b for i, b in enumerate(self.train_batches) if i in picked])  # fmt: skip

    def to(self, device: str | torch.device) -> Task:
        """A copy whose batches live on ``device`` (moved once here rather than at every step).

        >>> Task([{"x": torch.ones(1)}], [], None, None).to("cpu").train_batches[0]["x"].device
        device(type='cpu')
        """
        device = resolve(device)

        def moved(batches: list[Batch]) -> list[Batch]:
            return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]

        return replace(self, train_batches=moved(self.train_batches), eval_batches=moved(self.eval_batches),
                       validation_batches=moved(self.validation_batches))  # fmt: skip

    def batch_shape(self) -> tuple[int, int]:
        """(batch, length) of the largest training batch: what training memory is costed at.

        >>> Task([{"input_ids": torch.zeros(8, 20)}, {"input_ids": torch.zeros(3, 40)}], [], None, None).batch_shape()
        (8, 20)
        """
        if not self.train_batches:
            raise ValueError(f"task {self.name!r} has no training batches")
        shapes = [batch_shape((), {k: v for k, v in b.items() if k != "labels"}) for b in self.train_batches]
        return max(shapes, key=lambda s: s[0] * s[1])

    def batch_size(self) -> int:
        """Examples in the first training batch (the others have as many, but the last)."""
        if not self.train_batches:
            raise ValueError(f"task {self.name!r} has no training batches")
        return _examples(self.train_batches[0])

    def calibration(self, n: int) -> list[Batch]:
        """The first ``n`` training batches (all of them when there are fewer).

        >>> Task([{"x": 1}, {"x": 2}], [], None, None).calibration(1)
        [{'x': 1}]
        """
        if n < 1:
            raise ValueError(f"calibration needs at least one batch, got n={n}")
        if not self.train_batches:
            raise ValueError(f"task {self.name!r} has no training batches to calibrate on")
        return self.train_batches[:n]

    def provenance(self) -> dict[str, Any]:
        """What a plan records of the task beyond its name: the class names by id when the
        labels were names (``{"labels": ["neg", "pos"]}``), else nothing.

        >>> Task([], [], None, None, labels=("neg", "pos")).provenance()
        {'labels': ['neg', 'pos']}
        """
        return {**Labels(self.labels).provenance(), **({"kind": self.kind} if self.kind != "classification" else {})}

    @property
    def metric_name(self) -> str:
        """What the metric is, for tables and plot axes ("accuracy", "MCC", "minus loss per token").

        >>> Task([], [], None, mcc).metric_name
        'MCC'
        """
        if self.kind == "causal-lm":
            if self.metric is answers.choice_accuracy:
                return "choice accuracy"
            return "exact match" if isinstance(self.metric, answers.ExactMatch) else "minus loss per token"
        return {mcc: "MCC", accuracy: "accuracy"}.get(getattr(self.metric, "fn", self.metric), "metric")

    @classmethod
    def for_sequence_classification(
        cls,
        model_dir_or_model: str | os.PathLike | nn.Module,
        tokenizer: Any,
        train: Any,
        dev: Any = None,
        *,
        text_column: str | None = None,
        pair_column: str | None = None,
        label_column: str | None = None,
        labels: Sequence[str] | None = None,
        batch_size: int = 32,
        max_length: int = 64,
        max_train: int | None = None,
        max_dev: int | None = None,
        metric: str = "accuracy",
        seed: int = 0,
        validation: Any = 0.2,
        name: str | None = None,
        device: str | torch.device | None = None,
    ) -> Task:
        """A classification task: ``train`` gives the training and validation examples, ``dev``
        the evaluation examples (the final report only; None: none, or a DatasetDict's own).

        Each of them is a ``LABEL<TAB>TEXT`` file (``.tsv``, integer labels), a CSV, JSON/JSONL or
        Parquet file (read by `datasets`), or a `datasets.Dataset`; ``train`` may also be a
        folder holding ``train.tsv`` and ``dev.tsv``, or a `datasets.DatasetDict` (its
        ``train`` split; its ``validation``, else ``test``, split as ``dev``). Tables have a
        ``text_column`` (default ``text``), optionally a ``pair_column`` (the second text of
        sentence pairs) and a ``label_column`` (default ``label``) of class numbers or class
        names; names become ids in ``labels`` order (default: sorted, or a ClassLabel's order),
        kept in ``task.labels`` and in the provenance of the plans searched on it. A ``.tsv``
        whose columns are named is read as a table with a header row.

        ``tokenizer`` may be None to load it from the model directory (or, for a model, from
        ``model.config._name_or_path``). Training examples are shuffled with ``seed``; then
        ``validation`` of them (a fraction, or a count; None: none) become the validation split,
        stratified by label (`stratified_split`), unless ``validation`` is itself data (a path
        or Dataset); ``max_train`` keeps a prefix of the rest; dev keeps file order. Each batch
        is padded to its own longest text. The loss is cross-entropy on
        ``model(**inputs).logits``; ``metric`` is ``"accuracy"`` or ``"mcc"`` (Matthews
        correlation, the usual CoLA metric). ``device`` puts the batches there (None: they stay
        on the CPU and move to the model's device batch by batch).

        >>> task = Task.for_sequence_classification(
        ...     MODEL_DIR, None, "data/text/sst2/train.tsv", "data/text/sst2/dev.tsv",
        ...     max_train=64, batch_size=32)  # doctest: +SKIP
        >>> sorted(task.train_batches[0])  # doctest: +SKIP
        ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
        >>> task = Task.for_sequence_classification(MODEL_DIR, None, "mnli.parquet", text_column="premise",
        ...                                         pair_column="hypothesis")  # doctest: +SKIP
        """
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        named = (text_column, pair_column, label_column) != (None, None, None)
        columns = Columns(text_column or "text", pair_column, label_column or "label") if named else None
        default_name = name or _task_name(train)
        train, dev, given = splits(train, dev, validation)
        first = read_split(train, columns, "training data")
        table = Labels.from_values(first.labels, labels if labels is not None else first.class_names)
        column = (columns or Columns()).label

        def rows_of(split) -> list[Row]:
            return list(zip(table.ids(split.labels, split.source, column), split.texts))

        train_rows = rows_of(first)
        random.Random(seed).shuffle(train_rows)
        validation_rows: list[Row] = []
        if given is not None:
            validation_rows = rows_of(read_split(given, columns, "validation data"))
        elif validation is not None:
            train_rows, validation_rows = stratified_split(train_rows, validation, seed=seed)
        train_rows = train_rows[:max_train]
        dev_rows = [] if dev is None else rows_of(read_split(dev, columns, "evaluation data"))[:max_dev]
        _check_classes(model_dir_or_model, table, train_rows + validation_rows + dev_rows)
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model_dir_or_model)

        def batches(rows: list[Row]) -> list[Batch]:
            out = []
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                texts = [t for _, t in chunk]
                pairs = (list(zip(*texts)) if texts and isinstance(texts[0], tuple) else [texts])
                enc = tokenizer(*pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                out.append({**enc, "labels": torch.tensor([label for label, _ in chunk])})
            return out

        task = cls(
            train_batches=batches(train_rows),
            eval_batches=batches(dev_rows),
            loss=classification_loss,
            metric=ClassMetric(METRICS[metric], table.names),
            name=default_name,
            validation_batches=batches(validation_rows),
            labels=table.names,
        )
        return task if device is None else task.to(device)


    @classmethod
    def for_causal_lm(
        cls,
        model_dir_or_model: str | os.PathLike | nn.Module,
        tokenizer: Any,
        train: Any,
        dev: Any = None,
        *,
        text_column: str | None = None,
        prompt_column: str | None = None,
        response_column: str | None = None,
        messages_column: str | None = None,
        metric: str = "loss",
        choices: Sequence[str] | None = None,
        batch_size: int = 8,
        max_length: int = 128,
        max_train: int | None = None,
        max_dev: int | None = None,
        seed: int = 0,
        validation: Any = 0.2,
        name: str | None = None,
        device: str | torch.device | None = None,
    ) -> Task:
        """A causal language-model task: next-token loss over each text; with ``prompt_column``
        and ``response_column`` (instruction data) over the response alone, the prompt's tokens
        labelled -100; with ``messages_column`` (chat data: lists of ``{"role", "content"}``
        messages, rendered by the tokenizer's chat template) over the assistant turns alone.

        ``metric`` is what a search maximises on the validation split: ``"loss"`` (minus the
        loss per predicted token; the perplexity is ``exp(-metric)``), ``"choice"`` (accuracy of
        the likeliest of ``choices``, the fixed set of answers) or ``"exact_match"`` (greedy
        answers equal to the reference, normalised); `answers` has the details.

        ``train`` (and ``dev``, the evaluation data: the final report only) is a ``.txt`` file
        (one example per non-blank line), a CSV, JSON/JSONL or Parquet file, a
        `datasets.Dataset` or ``DatasetDict`` (its ``train`` split; ``validation`` or ``test`` as
        dev), or a list of strings or of dicts. Columns default to ``messages``, else ``text``,
        else ``prompt`` and ``response``. Training examples are shuffled with ``seed``; then
        ``validation`` of them (a fraction, or a count; or data of its own) become the
        validation split; ``max_train`` keeps a prefix of the rest. Each example is cut to
        ``max_length`` tokens; batches are right-padded (the pad token, else EOS) with padding
        labelled -100 and masked. ``tokenizer`` None loads the model directory's; ``device`` as in
        `for_sequence_classification`.

        >>> task = Task.for_causal_lm(tiny_llama(), chat_tokenizer(), [
        ...     {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        ...     for q, a in [("good?", "yes"), ("bad?", "no"), ("fine?", "yes"), ("ok?", "yes")]],
        ...     metric="choice", choices=["no", "yes"], validation=2)
        >>> task.kind, task.metric_name, len(task.validation_batches[0]["choice"])
        ('causal-lm', 'choice accuracy', 2)
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: a causal LM example needs at least 2 tokens (one read, one predicted)")
        columns = lm.LMColumns.of(text_column, prompt_column, response_column, messages_column)
        if isinstance(train, (str, os.PathLike)) and Path(train).is_dir():
            raise ValueError(f"{train} is a folder: a causal LM task reads a data file (.txt with one example per line, "
                             ".csv, .json, .jsonl, .parquet), a datasets.Dataset or a list of texts")  # fmt: skip
        lm.check_causal_lm(model_dir_or_model)
        default_name = name or _task_name(train)
        rows, held, dev_rows = _lm_splits(train, dev, validation, columns, seed)
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model_dir_or_model)
        score, held_batches = answers.scoring(metric, tokenizer, choices, batch_size, max_length)
        task = cls(
            train_batches=lm.lm_batches(tokenizer, rows[:max_train], batch_size, max_length),
            eval_batches=held_batches(dev_rows[:max_dev]),
            loss=lm.causal_lm_loss,
            metric=score,
            name=default_name,
            validation_batches=held_batches(held),
            kind="causal-lm",
            weight=lm.predicted_tokens,
        )
        for what, batches in (("training", task.train_batches), ("validation", task.validation_batches),
                              ("evaluation", task.eval_batches)):  # fmt: skip
            lm.check_predicts(batches, what, default_name, max_length)
        return task if device is None else task.to(device)


def _lm_splits(train: Any, dev: Any, validation: Any, columns: lm.LMColumns | None, seed: int) -> tuple[list, list, list]:
    """(training, validation, evaluation) examples of a causal-LM task: the training examples
    shuffled with ``seed``, then ``validation`` of them held out (unless it is data of its own)."""
    train, dev, given = splits(train, dev, validation)
    rows = lm.read_examples(train, columns, "training data")
    random.Random(seed).shuffle(rows)
    held: list = []
    if given is not None:
        held = lm.read_examples(given, columns, "validation data")
    elif validation is not None:
        rest, kept = stratified_split([(0, x) for x in rows], validation, seed=seed)  # one class: a seeded draw
        rows, held = [x for _, x in rest], [x for _, x in kept]
    return rows, held, [] if dev is None else lm.read_examples(dev, columns, "evaluation data")


def _task_name(train: Any) -> str:
    """A task folder's name, a data file's folder (or stem), a dataset's name, else "dataset"."""
    if isinstance(train, (str, os.PathLike)):
        path = Path(train)
        return path.name if path.is_dir() else (path.parent.name or path.stem)
    if isinstance(train, (list, tuple)):
        return "dataset"
    info = getattr(train, "info", None) or getattr(next(iter(getattr(train, "values", list)()), None), "info", None)
    return getattr(info, "dataset_name", None) or "dataset"


def _check_classes(model: Any, table: Labels, rows: list[Row]) -> None:
    """The model must have an output for every class the data has."""
    n_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if n_labels is None:
        return
    if table.names is not None and len(table.names) > n_labels:
        raise ValueError(f"the data has {len(table.names)} classes {list(table.names)} but the model has {n_labels} "
                         f"labels; load it with num_labels={len(table.names)}")  # fmt: skip
    seen = max((label for label, _ in rows), default=0)
    if seen >= n_labels and seen == n_labels and min(label for label, _ in rows) == 1:
        raise ValueError(f"the data's labels run from 1 to {seen}, but class numbers count from 0 (the model's {n_labels} "
                         f"classes are 0 to {n_labels - 1}): renumber the labels 0 to {seen - 1}, or write class names")  # fmt: skip
    if seen >= n_labels:
        raise ValueError(f"the data has label {seen} but the model has {n_labels} labels; load it with num_labels={seen + 1}")
    classes = len(table.names) if table.names is not None else seen + 1
    if classes < n_labels:
        found = list(table.names) if table.names is not None else sorted({label for label, _ in rows})
        warnings.warn(f"the model has {n_labels} labels (num_labels={n_labels}, --num-labels) but the data has "
                      f"{classes} classes (labels seen: {found}): the other outputs are never a right answer; load it "
                      f"with num_labels={classes} (--num-labels {classes})", stacklevel=4)  # fmt: skip


def stratified_split(rows: list[tuple[int, str]], share: float | int, *, seed: int = 0) -> tuple[list, list]:
    """(rest, held out): ``share`` of ``rows`` (a fraction in (0, 1), or a count) held out with
    each label in its proportion (largest remainders), drawn with ``seed``; both keep the rows'
    order.

    >>> rows = [(0, "a"), (0, "b"), (0, "c"), (0, "d"), (1, "e"), (1, "f"), (1, "g"), (1, "h")]
    >>> rest, held = stratified_split(rows, 0.25, seed=0)
    >>> sorted(label for label, _ in held), len(rest)
    ([0, 1], 6)
    """
    k = _count(share, len(rows), "training examples")
    by_label: dict[int, list[int]] = {}
    for i, (label, _) in enumerate(rows):
        by_label.setdefault(label, []).append(i)
    exact = {label: k * len(ix) / len(rows) for label, ix in by_label.items()}
    take = {label: math.floor(q) for label, q in exact.items()}
    for label in sorted(exact, key=lambda lb: (take[lb] - exact[lb], lb))[: k - sum(take.values())]:
        take[label] += 1
    rng = random.Random(seed)
    held = {i for label, ix in sorted(by_label.items()) for i in rng.sample(ix, take[label])}
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _count(share: float | int, n: int, what: str) -> int:
    """How many of ``n`` items a validation ``share`` (a fraction in (0, 1) or a count) holds out."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
        raise ValueError(f"validation must be a fraction in (0, 1) or a count, got {share!r}")
    k = share if isinstance(share, int) else round(share * n)
    if isinstance(share, float) and not 0 < share < 1:
        raise ValueError(f"validation={share}: a fraction lies in (0, 1); give a count as an int")
    if not 1 <= k < n:
        raise ValueError(f"validation={share!r} of {n} {what} leaves {'no validation' if k < 1 else 'no training'} "
                         f"example; the split needs at least one of each")  # fmt: skip
    return k


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``model(**inputs).logits`` against ``batch["labels"]``."""
    inputs, labels = on_device(model, batch)
    return F.cross_entropy(model(**inputs).logits, labels)


def predictions(model: nn.Module, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) labels over ``batches``, in eval mode and without gradients."""
    pred, true = [], []
    with inference(model):
        for batch in batches:
            inputs, labels = on_device(model, batch)
            pred.append(model(**inputs).logits.argmax(-1).cpu())
            true.append(labels.cpu())
    return torch.cat(pred), torch.cat(true)


def accuracy(model: nn.Module, batches: list[Batch]) -> float:
    """Fraction of examples whose arg-max logit is the label."""
    pred, true = predictions(model, batches)
    return (pred == true).double().mean().item()


def mcc(model: nn.Module, batches: list[Batch]) -> float:
    """Matthews correlation of the arg-max predictions (multi-class form; 0 when undefined)."""
    return matthews(*predictions(model, batches))


def matthews(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Matthews correlation coefficient from label vectors (Gorodkin's K-class form).

    >>> matthews(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    0.5773502691896258
    """
    k = int(max(pred.max(), true.max())) + 1
    cm = torch.zeros(k, k, dtype=torch.float64)
    cm.index_put_((true.long(), pred.long()), torch.ones(len(true), dtype=torch.float64), accumulate=True)
    s, c = cm.sum(), cm.trace()
    p, t = cm.sum(0), cm.sum(1)  # predicted, true counts per class
    denom = math.sqrt((s * s - p @ p).item() * (s * s - t @ t).item())
    return 0.0 if denom == 0 else ((c * s - p @ t).item() / denom)


METRICS: dict[str, Callable[[nn.Module, list[Batch]], float]] = {"accuracy": accuracy, "mcc": mcc}


@dataclass(frozen=True)
class ClassMetric:
    """A classification metric (``fn``: `accuracy`, `mcc`) that first checks that the model's
    trained weights decode class ids as the task's ``labels`` do (`peftplan.backends.labels`):
    an artifact trained with other ids would score every prediction as the wrong class."""

    fn: Callable[[nn.Module, list[Batch]], float]
    labels: tuple[str, ...] | None = None

    def __call__(self, model: nn.Module, batches: list[Batch]) -> float:
        check_model_labels(model, self.labels)
        return self.fn(model, batches)


def _examples(batch: Batch) -> int:
    return int(batch["labels"].shape[0]) if "labels" in batch else batch_shape((), dict(batch))[0]


def on_device(model: nn.Module, batch: Batch) -> tuple[Batch, torch.Tensor]:
    """A labelled batch's (inputs, labels), moved to the device of ``model``'s parameters."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"].to(device)


def _load_tokenizer(model_dir_or_model: Any):
    from transformers import AutoTokenizer

    source = model_dir_or_model
    if isinstance(model_dir_or_model, nn.Module):
        source = getattr(getattr(model_dir_or_model, "config", None), "_name_or_path", None)
        if not source:
            raise ValueError("pass a tokenizer: the model does not say where it was loaded from")
    return AutoTokenizer.from_pretrained(source)
