"""A plan made on a bare base model applies to the same base model inside a task head, and back.

The reference is the plan written by hand with the head model's own names: re-targeting must
give exactly the model that plan gives, and still refuse a plan whose sites do not fit."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

import peftplan as pp
from peftplan.backends.base import PlanError
from peftplan.backends.inspection import applied_plan, count_trainable, trainable_parameters
from peftplan.ir import fingerprint
from peftplan.plan import Plan

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**CONFIG))


def bare_plan() -> Plan:
    return pp.search(BertModel(BertConfig(**CONFIG)), 2_000, strategy="proxy")


def test_bare_plan_applies_inside_the_classifier_as_the_prefixed_plan_would(caplog):
    plan = bare_plan()
    assert all(name.startswith("encoder.") for name in plan.sites), plan.sites  # made on the bare encoder
    by_hand = Plan(
        sites={**{f"bert.{n}": e for n, e in plan.sites.items()}, "classifier": {"method": "full"}},
        model={"fingerprint": fingerprint(classifier())},
    )
    with caplog.at_level(logging.INFO, logger="peftplan"):
        moved = pp.apply(classifier(), plan)
    expected = pp.apply(classifier(), by_hand)

    assert sorted(applied_plan(moved).sites) == sorted(by_hand.sites)
    assert count_trainable(moved) == count_trainable(expected)
    for (name, a), (_, b) in zip(trainable_parameters(moved).items(), trainable_parameters(expected).items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        assert torch.equal(moved.eval()(input_ids=ids).logits, expected.eval()(input_ids=ids).logits)
    note = applied_plan(moved).provenance["retargeted"]
    assert (
        "BertModel" in note and "BertForSequenceClassification (bert.…)" in note and "classifier trained fully" in note
    )
    assert note in caplog.text


def test_classifier_plan_of_encoder_sites_applies_to_the_bare_encoder():
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    plan = Plan(
        sites={n: {"method": "lora", "rank": 2} for n in names}, model={"class": "BertForSequenceClassification"}
    )
    model = pp.apply(BertModel(BertConfig(**CONFIG)), plan)
    assert sorted(applied_plan(model).sites) == [n.removeprefix("bert.") for n in names]
    assert count_trainable(model) == 2 * (16 + 16) + 2 * (32 + 16)  # rank 2 on query (16→16) and output.dense (32→16)


def test_another_encoder_is_still_refused():
    plan = bare_plan()
    wider = BertForSequenceClassification(BertConfig(**{**CONFIG, "intermediate_size": 48}))
    with pytest.raises(PlanError, match="the plan does not fit this model") as e:
        pp.apply(wider, plan)
    assert "inside BertForSequenceClassification" in str(e.value)  # says what it tried
    assert not any(p.requires_grad is False for p in wider.parameters())  # untouched


def test_sites_missing_under_the_prefix_are_refused():
    plan = Plan(sites={"encoder.layer.7.attention.self.query": {"method": "lora", "rank": 2}})
    with pytest.raises(PlanError, match="encoder.layer.7.attention.self.query: not found in the model"):
        pp.apply(classifier(), plan)
