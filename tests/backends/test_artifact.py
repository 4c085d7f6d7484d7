"""`save` → `load` onto a fresh model with the same base weights gives the same model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftplan.backends import PlanError, adapter_tensors, apply, load, merge, save
from peftplan.ir.modules import tunable_modules
from tests.backends.adapters import plan_for, randomize
from tests.zoo import bert_eager, gpt2_eager, token_ids


def _tuned_bert():
    model = bert_eager()
    fresh = copy.deepcopy(model)
    entries = {
        n: {"method": "lora", "rank": 2 + i % 2}
        for i, (n, _, op) in enumerate(tunable_modules(model))
        if op == "linear"
    }
    entries["embeddings.word_embeddings"] = {"method": "lora", "rank": 3}
    entries["pooler.dense"] = {"method": "full"}
    apply(model, plan_for(model, entries))
    randomize(model, seed=3)
    return model, fresh


def test_save_load_is_bitwise_exact(tmp_path):
    model, fresh = _tuned_bert()
    out = model(token_ids())
    save(model, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapters.safetensors", "plan.json"]
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["format"] == "peftplan.plan"
    tensors = load_file(str(tmp_path / "run" / "adapters.safetensors"))
    assert "encoder.layer.0.attention.self.query.lora_A" in tensors and "pooler.dense.weight" in tensors
    assert not any(".base." in k for k in tensors)
    loaded = load(fresh, tmp_path / "run")
    got = loaded(token_ids())
    assert torch.equal(got.last_hidden_state, out.last_hidden_state)
    assert torch.equal(got.pooler_output, out.pooler_output)


def test_merged_model_saves_adapter_values(tmp_path):
    model, fresh = _tuned_bert()
    expected = model(token_ids()).last_hidden_state
    merge(model)
    save(model, tmp_path)
    loaded = load(fresh, tmp_path)
    assert torch.equal(loaded(token_ids()).last_hidden_state, expected)


def test_tied_weights_save(tmp_path):
    model = gpt2_eager()
    fresh = copy.deepcopy(model)
    apply(model, plan_for(model, {"lm_head": {"method": "full"}, "transformer.wte": {"method": "full"}}))
    randomize(model)
    save(model, tmp_path)
    assert torch.equal(load(fresh, tmp_path)(token_ids()).logits, model(token_ids()).logits)


def test_missing_unexpected_and_misshaped_tensors_are_errors(tmp_path):
    model, fresh = _tuned_bert()
    save(model, tmp_path)
    path = str(tmp_path / "adapters.safetensors")
    good = load_file(path)
    key = "encoder.layer.0.attention.self.query.lora_A"
    cases = {
        "missing": {k: v for k, v in good.items() if k != key},
        "unexpected": {**good, "encoder.layer.0.attention.self.query.lora_C": good[key].clone()},
        "shape mismatch": {**good, key: torch.zeros(5, 32)},
    }
    for word, tensors in cases.items():
        save_file(tensors, path)
        target = copy.deepcopy(fresh)
        with pytest.raises(PlanError, match=word):
            load(target, tmp_path)
        assert not hasattr(target, "peftplan_plan")  # left as it was
        assert all(p.requires_grad for p in target.parameters())


def test_save_needs_an_applied_plan(tmp_path):
    with pytest.raises(PlanError, match="apply"):
        save(bert_eager(), tmp_path)


def test_adapter_keys_follow_sites():
    model, _ = _tuned_bert()
    keys = set(adapter_tensors(model))
    assert "embeddings.word_embeddings.lora_B" in keys and "pooler.dense.bias" in keys
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or k.startswith("pooler.dense.") for k in keys)
