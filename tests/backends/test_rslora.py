"""Rank-stabilised LoRA scaling (``rslora=True``: ``alpha / sqrt(rank)``) against peft's
``use_rslora=True``, for LoRA and DoRA, and its validation."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from peftplan.backends import PlanError, apply, get_method, merge
from peftplan.backends.lora_layers import LoRALinear
from peftplan.ir.modules import static_site
from tests.backends.adapters import plan_for, randomize
from tests.backends.references import compare_dora_with_peft, copy_lora_weights
from tests.zoo import bert_eager, llama_eager, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_scaling_and_default():
    assert LoRALinear(nn.Linear(8, 8), rank=4, alpha=6, rslora=True).scaling == 6 / math.sqrt(4)
    assert LoRALinear(nn.Linear(8, 8), rank=4, alpha=6).scaling == 6 / 4
    site = static_site("fc", nn.Linear(16, 16), "linear")
    assert get_method("lora").validate(site, rank=4)["rslora"] is False
    layer = get_method("lora").wrap(nn.Linear(16, 16), site, **get_method("lora").validate(site, rank=9, rslora=True))
    assert layer.scaling == 18 / 3


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_rslora_must_be_a_bool(value):
    with pytest.raises(PlanError):
        get_method("lora").validate(static_site("fc", nn.Linear(8, 8), "linear"), rank=2, rslora=value)


def _compare_lora(model: nn.Module, entries: dict[str, dict], out) -> None:
    twin = copy.deepcopy(model)
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=list(entries),
        use_rslora=True,
        rank_pattern={re.escape(n): e["rank"] for n, e in entries.items()},
        alpha_pattern={re.escape(n): e.get("alpha", 2 * e["rank"]) for n, e in entries.items()},
    )
    theirs = get_peft_model(twin, config)
    ours = apply(model, plan_for(model, {n: {"method": "lora", "rslora": True, **e} for n, e in entries.items()}))
    randomize(ours)
    copy_lora_weights(ours, theirs, list(entries))  # asserts the scalings are equal
    with torch.no_grad():
        got = out(ours(token_ids()))
        torch.testing.assert_close(got, out(theirs(token_ids())), atol=1e-5, rtol=1e-5)
        merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(out(ours(token_ids())), got, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out(theirs(token_ids())), got, atol=1e-5, rtol=1e-5)


def test_lora_equals_peft_on_bert_and_llama():
    bert_entries = {
        f"encoder.layer.{i}.{m}": {"rank": 4 + 5 * i, "alpha": 3}
        for i in range(2)
        for m in ("attention.self.query", "output.dense")
    }
    bert_entries["embeddings.word_embeddings"] = {"rank": 9}
    _compare_lora(bert_eager(), bert_entries, lambda o: o.last_hidden_state)
    llama_entries = {
        f"model.layers.{i}.{m}": {"rank": 1 + 3 * i} for i in range(2) for m in ("self_attn.v_proj", "mlp.gate_proj")
    }
    _compare_lora(llama_eager(), llama_entries, lambda o: o.logits)


def test_dora_equals_peft():
    entries = {
        f"model.layers.{i}.{m}": {"rank": 4, "rslora": True}
        for i in range(2)
        for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    compare_dora_with_peft(llama_eager(), entries, token_ids(), out=lambda o: o.logits, use_rslora=True)
