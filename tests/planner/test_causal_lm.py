"""Causal language-model tasks: what is predicted (checked by hand), the loss against the HF
model's own ``labels=`` loss, data sources and their errors, and a search on Llama, GPT-2 and
Qwen2 whose plan trains, saves, exports to peft and generates before and after merging."""

from __future__ import annotations

import json
import math

import pytest
import torch

import peftplan as pp
from peftplan.planner.training import lm
from peftplan.planner.training.evaluate import validation_loss
from tests.zoo import char_tokenizer, gpt2, llama, qwen2

TEXTS = [
    "the cat sat on the mat.",
    "a dog ran far away!",
    "birds fly south",
    "it rains",
    "sun, then rain",
    "we walk to the park",
    "the moon is bright",
    "fish swim deep",
]
PAIRS = [{"prompt": f"q: {t[:6]}", "response": t[6:]} for t in TEXTS]


def ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_a_text_is_predicted_whole_and_a_pair_only_from_its_response():
    tok = char_tokenizer()
    x, y = lm.encode(tok, "ab", 16)
    assert x == y == [1, 5, 6, 2]  # BOS a b EOS
    x, y = lm.encode(tok, ("ab", "cd"), 16)
    assert x == [1, 5, 6, 7, 8, 2] and y == [-100, -100, -100, 7, 8, 2]
    # too long: the response keeps its start (half the length), the prompt its BOS and its end
    x, y = lm.encode(tok, ("abcdefgh", "ijklmnop"), 8)
    assert x == [1, 10, 11, 12, 13, 14, 15, 16] and y == [-100] * 4 + [13, 14, 15, 16]  # <s> f g h | i j k l


def test_batches_pad_with_eos_when_there_is_no_pad_token_and_mask_it():
    tok = char_tokenizer(bos=False, pad=False)  # GPT-2-like
    (batch,) = lm.lm_batches(tok, ["ab", "abcd"], 4, 32)
    assert batch["input_ids"].tolist() == [[5, 6, 2, 2, 2], [5, 6, 7, 8, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 2, -100, -100], [5, 6, 7, 8, 2]]


@pytest.mark.parametrize("family", [llama, gpt2, qwen2])
def test_the_loss_and_metric_match_the_models_own_labels_loss(family):
    torch.manual_seed(0)
    model, tok = family().eval(), char_tokenizer()
    task = pp.Task.for_causal_lm(model, tok, PAIRS, batch_size=3, validation=None)
    with torch.no_grad():
        for batch in task.train_batches:
            theirs = model(**batch).loss  # HF shifts the labels itself and averages over the non -100 ones
            torch.testing.assert_close(lm.causal_lm_loss(model, batch), theirs)
        per_batch = [(model(**b).loss.item(), lm.predicted_tokens(b)) for b in task.train_batches]
    mean = sum(loss * n for loss, n in per_batch) / sum(n for _, n in per_batch)
    assert lm.negative_token_loss(model, task.train_batches) == pytest.approx(-mean, rel=1e-5)
    assert validation_loss(model, task, task.train_batches) == pytest.approx(mean, rel=1e-5)  # weighted by tokens


def test_sources_columns_and_the_validation_split(tmp_path):
    tok, model = char_tokenizer(), llama()
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"question": p["prompt"], "answer": p["response"]}) + "\n" for p in PAIRS))
    task = pp.Task.for_causal_lm(
        model, tok, path, prompt_column="question", response_column="answer", validation=2, batch_size=4
    )
    assert task.kind == "causal-lm" and task.name == tmp_path.name and task.provenance() == {"kind": "causal-lm"}
    assert sum(len(b["input_ids"]) for b in task.validation_batches) == 2
    assert sum(len(b["input_ids"]) for b in task.train_batches) == len(PAIRS) - 2
    (n,) = {len(ids(tok, p["prompt"])) for p in PAIRS}  # every prompt is "q: " and 6 characters after BOS
    for b in task.train_batches:  # the prompt's tokens are never predicted, the response's first one is
        for labels in b["labels"]:
            assert (labels[:n] == -100).all() and labels[n] != -100
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(TEXTS) + "\n\n")
    plain = pp.Task.for_causal_lm(model, tok, text, validation=0.25, max_train=3)
    assert sum(len(b["input_ids"]) for b in plain.train_batches) == 3
    assert sum(len(b["input_ids"]) for b in plain.validation_batches) == 2
    table = pp.Task.for_causal_lm(model, tok, PAIRS, validation=None)  # prompt/response found by name
    assert table.train_batches[0]["labels"][0, 0] == -100


def test_bad_sources_and_columns_are_named(tmp_path):
    tok, model = char_tokenizer(), llama()
    with pytest.raises(ValueError, match="needs both prompt_column and response_column"):
        pp.Task.for_causal_lm(model, tok, PAIRS, prompt_column="prompt")
    with pytest.raises(ValueError, match="has no response column 'reply'"):
        pp.Task.for_causal_lm(model, tok, PAIRS, prompt_column="prompt", response_column="reply")
    with pytest.raises(ValueError, match="none of 'messages', 'text', or 'prompt' and 'response'"):
        pp.Task.for_causal_lm(model, tok, [{"body": "x"}, {"body": "y"}])
    with pytest.raises(ValueError, match="is a folder"):
        pp.Task.for_causal_lm(model, tok, tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="has no examples"):
        pp.Task.for_causal_lm(model, tok, tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="column 'text' holds NoneType"):
        pp.Task.for_causal_lm(model, tok, [{"text": "a"}, {"text": None}])


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", [llama, gpt2, qwen2])
def test_a_search_plans_trains_saves_exports_and_generates(family, tmp_path):
    from peft import PeftModel

    tok = char_tokenizer(bos=family is not gpt2, pad=family is not gpt2)
    torch.manual_seed(0)
    base = family()
    task = pp.Task.for_causal_lm(base, tok, TEXTS * 4, batch_size=4, validation=8, max_length=32)
    plan = pp.search(
        base,
        "5%",
        task,
        strategy="random",
        trials=3,
        seeds=2,
        recipe=pp.Recipe(lr=3e-3, steps=10),
        fidelities=[pp.Fidelity(steps=4), pp.Fidelity()],
        progress=False,
    )
    assert plan.provenance["kind"] == "causal-lm" and plan.sites and plan.front
    assert all(
        math.isfinite(p.values["metric"]) and p.values["metric"] < 0 for p in plan.front
    )  # minus a loss per token
    assert not any(s.startswith("lm_head") and plan.sites[s].method == "full" for s in plan.sites)  # no full LM head
    model = pp.apply(_copy_of(base), plan)
    before = validation_loss(model, task, task.validation_batches)
    pp.train(model, task, plan.recipe.with_steps(20))
    assert validation_loss(model, task, task.validation_batches) < before
    batch = task.validation_batches[0]
    tuned = _logits(model, batch)
    prompt = torch.tensor([ids(tok, "the ")])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id
    )
    assert out.shape == (1, prompt.shape[1] + 5) and torch.equal(out[:, : prompt.shape[1]], prompt)

    pp.save(model, tmp_path / "artifact")
    torch.testing.assert_close(
        _logits(pp.load(_copy_of(base), tmp_path / "artifact"), batch), tuned, atol=1e-5, rtol=1e-5
    )
    pp.export_peft(model, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(_copy_of(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(theirs, batch), tuned, atol=1e-5, rtol=1e-5)

    pp.merge(model)
    torch.testing.assert_close(_logits(model, batch), tuned, atol=1e-4, rtol=1e-4)
    merged = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id
    )
    assert torch.equal(merged, out)  # greedy decoding is the same after merging


def _copy_of(model):
    import copy

    return copy.deepcopy(model)
