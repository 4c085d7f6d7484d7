"""Our LoRA against HF peft's as the reference: same weights in, same outputs out."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftplan.backends import apply
from tests.backends.adapters import plan_for, randomize
from tests.backends.references import copy_lora_weights
from tests.zoo import bert_eager, embedding_mlp, gpt2_eager, llama_eager, pointwise_cnn, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _peft_like(model, entries: dict[str, dict]):
    """peft's LoRA on a copy of ``model`` with per-site ranks/alphas and our adapter weights."""
    reference = copy.deepcopy(model)
    names = list(entries)
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=names,
        rank_pattern={re.escape(n): e["rank"] for n, e in entries.items()},
        alpha_pattern={re.escape(n): e.get("alpha", 2 * e["rank"]) for n, e in entries.items()},
    )
    return get_peft_model(reference, config), names


def _compare(model, entries, inputs, out=lambda o: o):
    reference, names = _peft_like(model, entries)
    with torch.no_grad():
        base = out(model(inputs))
    plan = plan_for(model, {n: {"method": "lora", **e} for n, e in entries.items()})
    ours = apply(model, plan)
    randomize(ours)
    copy_lora_weights(ours, reference, names)
    with torch.no_grad():
        expected, got = out(reference(inputs)), out(ours(inputs))
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters are live
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    reference.merge_adapter()
    torch.testing.assert_close(got, out(reference(inputs)), atol=1e-5, rtol=1e-5)


def test_bert_per_site_ranks():
    model = bert_eager()
    entries = {}
    for i in range(2):
        p = f"encoder.layer.{i}"
        entries[f"{p}.attention.self.query"] = {"rank": 2 + i}
        entries[f"{p}.attention.self.value"] = {"rank": 4, "alpha": 3}
        entries[f"{p}.intermediate.dense"] = {"rank": 1 + 2 * i, "alpha": 5}
    entries["embeddings.word_embeddings"] = {"rank": 3}
    _compare(model, entries, token_ids(), out=lambda o: o.last_hidden_state)


def test_llama_per_site_ranks():
    model = llama_eager()
    entries = {}
    for i in range(2):
        p = f"model.layers.{i}"
        for proj, r in (
            ("self_attn.q_proj", 4),
            ("self_attn.k_proj", 2),
            ("self_attn.o_proj", 1),
            ("mlp.down_proj", 3 + i),
        ):
            entries[f"{p}.{proj}"] = {"rank": r}
    entries["lm_head"] = {"rank": 2, "alpha": 7}
    _compare(model, entries, token_ids(), out=lambda o: o.logits)


def test_gpt2_conv1d():
    model = gpt2_eager()
    entries = {f"transformer.h.{i}.{m}": {"rank": 2 + i} for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")}
    _compare(model, entries, token_ids(), out=lambda o: o.logits)


def test_conv2d_and_embedding():
    _compare(
        pointwise_cnn(),
        {"stem": {"rank": 2}, "body": {"rank": 3, "alpha": 1}, "point": {"rank": 2}},
        torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(0)),
    )
    _compare(
        embedding_mlp(),
        {"0": {"rank": 3}, "1": {"rank": 2}},
        torch.randint(0, 20, (3, 4), generator=torch.Generator().manual_seed(0)),
    )
