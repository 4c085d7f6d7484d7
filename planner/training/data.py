"""Labelled examples from where users keep them: peftplan's ``LABEL<TAB>TEXT`` files, CSV,
JSON/JSONL and Parquet files (read by the `datasets` library, locally) and `datasets.Dataset`
objects, with named columns. Every source becomes rows ``(label id, text)``, where the text is
a string or, with a pair column, a ``(text, pair)`` tuple (sentence pairs as in MRPC or MNLI).

String labels become ids through a `Labels` mapping: given, or the sorted names of the
training labels; a label outside it is an error naming the source and the column.

    >>> table = Labels.from_values(["pos", "neg", "pos"])
    >>> table.names, table.ids(["neg", "pos"], "train.csv", "label")
    (('neg', 'pos'), [0, 1])
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import load_table, not_utf8, text_cell

Row = tuple[int, Any]  # (label id, text or (text, pair))


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second text of a pair, and the label."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"

    def names(self) -> list[str]:
        return [c for c in (self.text, self.pair, self.label) if c is not None]


@dataclass(frozen=True)
class Labels:
    """Class names by id (``names[i]`` is class ``i``); None names: the labels are ids already.

    >>> Labels(("neg", "pos")).ids(["pos", "meh"], "dev.csv", "label")
    Traceback (most recent call last):
    ...
    ValueError: dev.csv: column 'label' has label 'meh', which is not one of the classes ['neg', 'pos']; fix the data or pass labels=[...] naming every class
    """

    names: tuple[str, ...] | None = None

    @classmethod
    def from_values(cls, values: Sequence[Any], given: Sequence[str] | None = None) -> Labels:
        """The mapping for training labels ``values``: ``given`` names when passed, none for
        integer labels, else the sorted distinct names."""
        if given is not None:
            names = tuple(str(n) for n in given)
            if len(set(names)) != len(names) or not names:
                raise ValueError(f"labels={list(given)!r}: name each class once")
            return cls(names)
        if all(isinstance(v, str) for v in values):
            return cls(tuple(sorted(set(values))))
        return cls(None)

    def ids(self, values: Sequence[Any], source: str, column: str) -> list[int]:
        """``values`` as class ids; unknown names, missing or fractional labels are errors
        naming ``source`` and ``column``."""
        if self.names is None:
            return [_class_id(v, source, column) for v in values]
        index = {n: i for i, n in enumerate(self.names)}
        out = []
        for v in values:
            key = v if isinstance(v, str) else str(v)
            if key not in index:
                raise ValueError(
                    f"{source}: column {column!r} has label {v!r}, which is not one of the classes "
                    f"{list(self.names)}; fix the data or pass labels=[...] naming every class"
                )
            out.append(index[key])
        return out

    def provenance(self) -> dict[str, Any]:
        """What a plan records of the mapping: ``{"labels": [names…]}``, or nothing for ids."""
        return {} if self.names is None else {"labels": list(self.names)}


def _class_id(v: Any, source: str, column: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        what = "a missing label" if v is None else f"label {v!r}"
        raise ValueError(
            f"{source}: column {column!r} has {what}; labels are class numbers 0, 1, … or class names "
            "(strings), one per example"
        )
    if v < 0:
        raise ValueError(
            f"{source}: column {column!r} has label {v}: labels are class numbers 0, 1, …; renumber the "
            "classes from 0, or drop unlabelled examples (a test split often marks them -1)"
        )
    return v


@dataclass
class Split:
    """One split as read: texts (or pairs), raw labels, what to call it in errors, and the class
    names its label column declares (a ClassLabel), if any."""

    texts: list[Any]
    labels: list[Any]
    source: str
    class_names: tuple[str, ...] | None = None


def read_split(source: Any, columns: Columns | None, what: str) -> Split:
    """A split from a path (``.tsv`` as ``LABEL<TAB>TEXT``, or as a table with a header row when
    ``columns`` are named; CSV, JSON/JSONL, Parquet) or a `datasets.Dataset`; ``what`` names a
    dataset object in errors ("training data")."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() == ".tsv" and columns is None:
            rows = read_labelled_text(path)
            return Split([t for _, t in rows], [label for label, _ in rows], str(path))
        table = load_table(path, sep="\t" if path.suffix.lower() == ".tsv" else None)
        name = str(path)
    elif isinstance(getattr(source, "column_names", None), list):  # a datasets.Dataset
        table, name = source, f"the {what}"
    else:
        raise TypeError(
            f"the {what} is a {type(source).__name__}: give a path (.tsv, .csv, .json, .jsonl, .parquet), "
            "a folder with train.tsv and dev.tsv, or a datasets.Dataset"
        )
    columns = columns or Columns()
    texts, labels = table_rows(table, columns, name)
    check_label_values(labels, name, columns.label)
    names = class_names(table, columns.label)
    if names is not None:  # ids of the declared classes → their names, mapped like string labels
        labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in labels]
    return Split(texts, labels, name, names)


def splits(train: Any, dev: Any, validation: Any) -> tuple[Any, Any, Any]:
    """(train, dev, given validation) sources: a folder stands for its ``train.tsv`` and
    ``dev.tsv``; a `datasets.DatasetDict` for its ``train`` split and, without ``dev``, its
    ``validation`` (else ``test``) split as the evaluation data; ``validation`` is a source
    when it is not a share (a number) or None.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "sst2"
    >>> folder.mkdir(); _ = (folder / "train.tsv").write_text("1\\tgood\\n")
    >>> [p.relative_to(folder.parent) if p else p for p in splits(folder, None, 0.2)]
    [PosixPath('sst2/train.tsv'), PosixPath('sst2/dev.tsv'), None]
    """
    if isinstance(train, (str, os.PathLike)) and Path(train).is_dir():
        folder = Path(train)
        train, dev = folder / "train.tsv", folder / "dev.tsv" if dev is None else dev
        if not train.is_file():
            raise FileNotFoundError(
                f"{folder} has no train.tsv: a task folder holds train.tsv and dev.tsv "
                "(LABEL<TAB>TEXT); or give a data file"
            )
    elif isinstance(getattr(train, "column_names", None), dict):  # a DatasetDict: columns by split
        if "train" not in train:
            raise ValueError(f"the DatasetDict has splits {list(train)} but no 'train': pass the training split itself")
        if dev is None:
            dev = next((train[k] for k in ("validation", "test") if k in train), None)
        train = train["train"]
    if isinstance(validation, str) and not Path(validation).exists() and _number(validation) is not None:
        raise ValueError(
            f"validation={validation!r} is a string, read as the path of validation data (there is no such "
            f"file): give the number {_number(validation)!r} for a share or a count"
        )
    given = None if validation is None or isinstance(validation, (int, float)) else validation
    return train, dev, given


def _number(text: str) -> float | int | None:
    """``text`` as the number it spells, else None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def table_rows(table: Any, columns: Columns, source: str) -> tuple[list[Any], list[Any]]:
    """(texts, raw labels) of a `datasets.Dataset`; texts are ``(text, pair)`` tuples with a pair
    column. ClassLabel labels come as ids."""
    have = list(table.column_names)
    for role, name in (("text", columns.text), ("pair", columns.pair), ("label", columns.label)):
        if name is not None and name not in have:
            raise ValueError(
                f"{source} has no {role} column {name!r}; its columns are {have}: pass "
                f"{role}_column=... (--{role}-column on the command line)"
            )
    if len(table) == 0:
        raise ValueError(f"{source} has no examples")
    texts = [text_cell(v, source, columns.text) for v in table[columns.text]]
    if columns.pair is not None:
        texts = list(zip(texts, (text_cell(v, source, columns.pair) for v in table[columns.pair])))
    return texts, list(table[columns.label])


def check_label_values(labels: list[Any], source: str, column: str) -> None:
    """Every example has a label (a missing cell is said as such, not as a problem with the
    labels around it), and the labels are all class numbers or all class names.

    >>> check_label_values([1, None, 0], "train.csv", "label")
    Traceback (most recent call last):
    ...
    ValueError: train.csv: data row 2 has no label in column 'label' (an empty cell): fill it in or drop the row
    """
    for i, v in enumerate(labels):
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            raise ValueError(
                f"{source}: data row {i + 1} has no label in column {column!r} (an empty cell): fill it in "
                "or drop the row"
            )
    named = next((v for v in labels if isinstance(v, str)), None)
    number = next((v for v in labels if not isinstance(v, str)), None)
    if named is not None and number is not None:
        raise ValueError(
            f"{source}: column {column!r} mixes class numbers ({number!r}) and class names ({named!r}): "
            "write every label the same way, all numbers 0, 1, … or all names"
        )


def class_names(table: Any, column: str) -> tuple[str, ...] | None:
    """The names of a ClassLabel column (GLUE's datasets have them), else None."""
    feature = getattr(table, "features", {}).get(column)
    return tuple(feature.names) if hasattr(feature, "names") else None


def read_labelled_text(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(label, text), …]`` from a ``LABEL<TAB>TEXT`` file; blank lines are skipped. An empty
    text (``0<TAB>``) is an example like any other: it tokenises to the special tokens.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "dev.tsv"
    >>> _ = path.write_text("1\\tit 's a charming and often affecting journey .\\n\\n0\\t\\n")
    >>> read_labelled_text(path)
    [(1, "it 's a charming and often affecting journey ."), (0, '')]
    """
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            bad = next((c for c in line if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:
                raise ValueError(not_utf8(Path(path), lineno, ord(bad) - 0xDC00))
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab or not label.strip().lstrip("-").isdigit():
                raise ValueError(f"{path}:{lineno}: expected LABEL<TAB>TEXT with an integer label, got {line[:80]!r}")
            rows.append((int(label), text))
    if not rows:
        raise ValueError(f"{path} has no examples")
    return rows


def stratified_split(rows: list[tuple[int, str]], share: float | int, *, seed: int = 0) -> tuple[list, list]:
    """(rest, held out): ``share`` of ``rows`` (a fraction in (0, 1), or a count) held out with
    each label in its proportion (largest remainders), drawn with ``seed``; both keep the rows'
    order.

    >>> rows = [(0, "a"), (0, "b"), (0, "c"), (0, "d"), (1, "e"), (1, "f"), (1, "g"), (1, "h")]
    >>> rest, held = stratified_split(rows, 0.25, seed=0)
    >>> sorted(label for label, _ in held), len(rest)
    ([0, 1], 6)
    """
    k = validation_count(share, len(rows), "training examples")
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


def validation_count(share: float | int, n: int, what: str) -> int:
    """How many of ``n`` items a validation ``share`` (a fraction in (0, 1) or a count) holds out.

    >>> validation_count(0.2, 10, "training examples"), validation_count(3, 10, "training examples")
    (2, 3)
    """
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
        raise ValueError(f"validation must be a fraction in (0, 1) or a count, got {share!r}")
    k = share if isinstance(share, int) else round(share * n)
    if isinstance(share, float) and not 0 < share < 1:
        raise ValueError(f"validation={share}: a fraction lies in (0, 1); give a count as an int")
    if not 1 <= k < n:
        raise ValueError(
            f"validation={share!r} of {n} {what} leaves {'no validation' if k < 1 else 'no training'} "
            f"example; the split needs at least one of each"
        )
    return k


def task_name(train: Any) -> str:
    """A task folder's name, a data file's folder (or stem), a dataset's name, else "dataset".

    >>> task_name("data/text/sst2/train.tsv"), task_name(["a text"])
    ('sst2', 'dataset')
    """
    if isinstance(train, (str, os.PathLike)):
        path = Path(train)
        return path.name if path.is_dir() else (path.parent.name or path.stem)
    if isinstance(train, (list, tuple)):
        return "dataset"
    info = getattr(train, "info", None) or getattr(next(iter(getattr(train, "values", list)()), None), "info", None)
    return getattr(info, "dataset_name", None) or "dataset"


def load_tokenizer(model_dir_or_model: Any) -> Any:
    """The tokenizer saved beside a model: in its directory, or for a loaded model where its
    ``config._name_or_path`` says it came from."""
    import torch.nn as nn
    from transformers import AutoTokenizer

    source = model_dir_or_model
    if isinstance(model_dir_or_model, nn.Module):
        source = getattr(getattr(model_dir_or_model, "config", None), "_name_or_path", None)
        if not source:
            raise ValueError("pass a tokenizer: the model does not say where it was loaded from")
    return AutoTokenizer.from_pretrained(source)
