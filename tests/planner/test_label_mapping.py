"""Class names travel with trained weights and are checked wherever they meet a task: an
artifact trained with ids ('negative', 'positive') meets a task whose ClassLabel runs
('positive', 'negative') — `pp.load`, `pp.train` and the task's metric refuse it, naming both
orders and the fix, with the model left as it was; and `peftplan apply` records the mapping
and the recipe the artifact was really trained with."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftplan as pp
from peftplan.backends import PlanError
from peftplan.cli import main
from tests.backends.adapters import plan_for, snapshot
from tests.e2e.test_data_cli import MODEL, write_reviews
from tests.zoo import CHARS, char_tokenizer

datasets = pytest.importorskip("datasets")
VOCAB = 4 + len(CHARS)  # char_tokenizer's ids


class CharCounts(nn.Module):
    """A classifier whose logits are a linear head over each character's count."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(VOCAB, 2, bias=False)
        self.config = SimpleNamespace(num_labels=2)

    def forward(self, input_ids, attention_mask, **_):  # (B, T) -> logits (B, 2)
        counts = (F.one_hot(input_ids, VOCAB).float() * attention_mask[..., None]).sum(1)  # (B, VOCAB)
        return SimpleNamespace(logits=self.head(counts))


REVIEWS = ["good film", "bad plot", "a good cast", "so bad", "good", "bad end"]  # each has a 'g' or a 'b', not both
GOOD = [("g" in text) for text in REVIEWS]


@pytest.fixture
def artifact(tmp_path):
    """Adapters trained (here: set by hand) to read 'b' as class 0, 'negative', and 'g' as class 1, 'positive'."""
    model = CharCounts()
    plan = plan_for(model, {"head": {"method": "full"}})
    plan.provenance["labels"] = ["negative", "positive"]
    pp.apply(model, plan)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, char_tokenizer().convert_tokens_to_ids("b")] = 1.0
        model.head.weight[1, char_tokenizer().convert_tokens_to_ids("g")] = 1.0
    pp.save(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def reviews(order: list[str]):
    """The reviews with a ClassLabel whose ids run in ``order``."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=order)})
    labels = [order.index("positive" if good else "negative") for good in GOOD]
    return datasets.Dataset.from_dict({"text": REVIEWS, "label": labels}, features=features)


def task_of(order, **kw):
    return pp.Task.for_sequence_classification(
        CharCounts(), char_tokenizer(), reviews(order), reviews(order), validation=None, **kw
    )


MISMATCH = (
    r"was trained with the classes \['negative', 'positive'\] \(ids 0, 1, …\), the task names them \['positive', "
    r"'negative'\]: every prediction would be read as the wrong class. Build the task with labels=\['negative', "
    r"'positive'\]"
)


def test_an_artifact_meeting_a_task_with_the_classes_in_another_order_is_refused(artifact):
    crossed = task_of(["positive", "negative"])
    assert crossed.labels == ("positive", "negative")
    model = pp.load(CharCounts(), artifact)
    with pytest.raises(PlanError, match=MISMATCH):  # it used to score 0.0: every prediction read crossed
        crossed.metric(model, crossed.eval_batches)
    before = snapshot(model)
    with pytest.raises(PlanError, match=MISMATCH):
        pp.train(model, crossed, pp.Recipe(steps=1))
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())

    fresh = CharCounts()
    untouched = snapshot(fresh)
    with pytest.raises(PlanError, match=f"the artifact {artifact} " + MISMATCH):
        pp.load(fresh, artifact, labels=crossed.labels)
    assert not hasattr(fresh, "peftplan_plan") and all(torch.equal(v, untouched[k]) for k, v in snapshot(fresh).items())

    fixed = task_of(["positive", "negative"], labels=["negative", "positive"])  # the fix the message gives
    assert fixed.metric(model, fixed.eval_batches) == 1.0  # by hand: every review has its class's letter alone
    assert pp.load(CharCounts(), artifact, labels=fixed.labels) is not None


def test_a_fresh_plan_trains_on_any_classes_and_records_them():
    model = CharCounts()
    plan = plan_for(model, {"head": {"method": "full"}})
    plan.provenance["labels"] = ["neg", "pos"]  # the task the plan was searched on: its adapters are not trained yet
    pp.apply(model, plan)
    task = task_of(["positive", "negative"])
    pp.train(model, task, pp.Recipe(lr=1e-2, steps=2))
    applied = model.peftplan_plan
    assert applied.provenance["labels"] == ["positive", "negative"] and applied.provenance["trained_on"] == task.name
    assert applied.recipe == pp.Recipe(lr=1e-2, steps=2) and plan.provenance["labels"] == ["neg", "pos"]  # a copy
    task.metric(model, task.eval_batches)  # the mapping it was trained with: no complaint
    with pytest.raises(PlanError, match=r"trained with the classes \['positive', 'negative'\]"):
        task_of(["negative", "positive"]).metric(model, task.eval_batches)


def test_a_hugging_face_models_named_classes_are_its_trained_mapping():
    from peftplan.backends.labels import trained_labels
    from tests.zoo import bert_classifier

    model = bert_classifier()
    assert trained_labels(model)[0] is None  # transformers' LABEL_0, LABEL_1 placeholders name nothing
    model.config.id2label = {0: "negative", 1: "positive"}
    with pytest.raises(
        PlanError,
        match=r"BertForSequenceClassification \(its config's id2label\) was trained with the "
        r"classes \['negative', 'positive'\]",
    ):
        pp.train(
            pp.apply(model, plan_for(model, {"classifier": {"method": "full"}})), task_of(["positive", "negative"])
        )


def test_cli_apply_records_the_classes_and_the_recipe_it_trained_with(tmp_path):
    from peftplan.models import load_model

    plan = pp.search(load_model(MODEL), "1%")
    plan.provenance["labels"] = ["neg", "pos"]  # found on other data
    plan.recipe = pp.Recipe(lr=1e-3, steps=2)
    plan.save(tmp_path / "plan.json")
    stored = (tmp_path / "plan.json").read_bytes()
    data = write_reviews(tmp_path / "reviews.csv", 24)  # classes 'bad', 'good'
    argv = [
        "apply",
        MODEL,
        "--plan",
        str(tmp_path / "plan.json"),
        "--task",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--tokenizer",
        "minilm",
        "--batch-size",
        "8",
        "--lr",
        "0.002",
        "--steps",
        "3",
        "-q",
        "-o",
        str(tmp_path / "adapter"),
    ]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "adapter" / "plan.json").read_text())
    assert saved["provenance"]["labels"] == ["bad", "good"]  # it used to keep the plan's ['neg', 'pos']
    assert saved["recipe"]["lr"] == 0.002 and saved["recipe"]["steps"] == 3  # the overrides it was trained by
    assert (tmp_path / "plan.json").read_bytes() == stored
    with pytest.raises(PlanError, match=r"trained with the classes \['bad', 'good'\]"):
        pp.load(load_model(MODEL), tmp_path / "adapter", labels=["good", "bad"])
