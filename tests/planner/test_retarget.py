"""A plan made on a 2-layer BERT re-targeted onto a 4-layer one by role and depth."""

from __future__ import annotations

import pytest
from transformers import BertConfig, BertModel

import peftplan as pp
from peftplan.backends.base import PlanError
from peftplan.backends.retarget import retarget


def bert(layers: int):
    return BertModel(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64)
    )


def test_role_and_nearest_depth():
    small = pp.lower(bert(2))
    v = "encoder.layer.{}.attention.self.value"
    plan = pp.Plan(
        sites={
            v.format(0): {"method": "lora", "rank": 2, "role": "attn.v", "depth": 0.0, "op": "linear"},
            v.format(1): {"method": "lora", "rank": 6, "role": "attn.v", "depth": 1.0, "op": "linear"},
            "encoder.layer.0.output.dense": {"method": "none", "role": "mlp.down", "depth": 0.0, "op": "linear"},
            "encoder.layer.1.output.dense": {
                "method": "lora",
                "rank": 4,
                "role": "mlp.down",
                "depth": 1.0,
                "op": "linear",
            },
        },
        model={"fingerprint": small.fingerprint},
    )
    target = bert(4)
    big = pp.lower(target)
    new, mapping = retarget(plan, big)
    # depths 0, 1/3, 2/3, 1 map to the nearest of 0 and 1
    assert [mapping[v.format(i)] for i in range(4)] == [v.format(0), v.format(0), v.format(1), v.format(1)]
    assert [new.sites[v.format(i)]["rank"] for i in range(4)] == [2, 2, 6, 6]
    assert "encoder.layer.1.output.dense" not in new.sites  # nearest source (depth 0) says none
    assert new.sites["encoder.layer.3.output.dense"]["rank"] == 4
    assert not any("query" in n for n in new.sites)  # no plan entry has that role
    assert new.objectives["params"] == 2 * 2 * 64 + 2 * 6 * 64 + 2 * 4 * (64 + 32)
    pp.apply(target, new)
    assert sum(p.numel() for p in target.parameters() if p.requires_grad) == new.objectives["params"]


def test_errors():
    big = pp.lower(bert(4))
    with pytest.raises(PlanError, match="no 'role'/'depth'"):
        retarget(pp.Plan(sites={"x": {"method": "lora", "rank": 2}}), big)
    with pytest.raises(PlanError, match="same family"):
        retarget(pp.Plan(sites={"x": {"method": "lora", "rank": 2, "role": "mlp.gate", "depth": 0.0}}), big)


def test_apply_with_role_and_depth_matching():
    small_model, big_model = bert(2), bert(4)
    plan = pp.search(small_model, "5%")
    with pytest.raises(PlanError, match="does not fit"):
        pp.apply(bert(4), plan)
    pp.apply(big_model, plan, match="role+depth")
    applied = pp.backends.applied_plan(big_model)
    mapping = applied.provenance["mapping"]
    assert mapping["encoder.layer.3.attention.self.value"] == "encoder.layer.1.attention.self.value"
    assert sum(p.numel() for p in big_model.parameters() if p.requires_grad) == applied.objectives["params"]
    with pytest.raises(PlanError, match="match must be"):
        pp.apply(bert(2), plan, match="depth")
