"""`apply`, `merge`, `unmerge`, `remove` on whole models, checked against the unmodified model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from peftplan.backends import (
    PlanError,
    applied_plan,
    apply,
    count_trainable,
    get_method,
    merge,
    remove,
    trainable_parameters,
    unmerge,
)
from peftplan.ir.modules import module_op, static_site, tunable_modules
from peftplan.plan import Plan
from tests.backends.adapters import plan_for, randomize, snapshot
from tests.zoo import bert_eager, embedding_mlp, gpt2_eager, llama_eager, pointwise_cnn, token_ids


def _bert_plan(model):
    entries = {
        n: {"method": "lora", "rank": 2 + i % 3}
        for i, (n, _, op) in enumerate(tunable_modules(model))
        if op == "linear"
    }
    entries["embeddings.word_embeddings"] = {"method": "lora", "rank": 4, "alpha": 1}
    entries["pooler.dense"] = {"method": "full"}
    entries["encoder.layer.0.output.LayerNorm"] = {"method": "full"}
    entries["encoder.layer.1.output.dense"] = {"method": "none"}
    return plan_for(model, entries)


def _expected_count(model, plan: Plan) -> int:
    """Sum of each method's param_count over the plan, from the untouched model's sites."""
    total = 0
    for name, entry in plan.sites.items():
        module = model.get_submodule(name)
        site = static_site(name, module, module_op(module))
        total += get_method(entry["method"]).param_count(site, **plan.hyper(entry))
    return total


def test_output_equals_base_at_init_and_structure():
    model = bert_eager()
    expected = model(token_ids()).last_hidden_state
    plan = _bert_plan(model)
    apply(model, plan)
    assert torch.equal(model(token_ids()).last_hidden_state, expected)
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "LoRALinear"
    assert type(model.encoder.layer[1].output.dense) is nn.Linear  # "none"
    assert applied_plan(model) is plan


@pytest.mark.parametrize(
    "make, inputs",
    [
        (bert_eager, token_ids),
        (llama_eager, token_ids),
        (gpt2_eager, token_ids),
        (pointwise_cnn, lambda: torch.randn(2, 3, 8, 8)),
        (embedding_mlp, lambda: torch.randint(0, 20, (2, 5))),
    ],
)
def test_trainable_count_is_sum_of_param_count_and_only_adapters_get_grads(make, inputs):
    model = make()
    entries = {
        n: {"method": "lora", "rank": 1 + i % 4}
        for i, (n, _, op) in enumerate(tunable_modules(model))
        if op in ("linear", "conv2d", "embedding")
    }
    last = list(entries)[-1]
    entries[last] = {"method": "full"}
    plan = plan_for(model, entries)
    expected = _expected_count(model, plan)
    apply(model, plan)
    assert count_trainable(model) == expected > 0
    out = model(inputs())
    outs = [out] if isinstance(out, torch.Tensor) else [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]
    sum(t.float().pow(2).mean() for t in outs).backward()
    with_grad = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert set(with_grad) == set(trainable_parameters(model))
    full = {id(p) for p in model.get_submodule(last).parameters()}  # may be tied (GPT-2's lm_head)
    assert all(".lora_" in n or id(p) in full for n, p in with_grad.items())


def test_merge_equals_unmerged_and_unmerge_restores_weights():
    model = bert_eager()
    before = snapshot(model)
    apply(model, _bert_plan(model))
    randomize(model)
    unmerged = model(token_ids()).last_hidden_state
    report = merge(model)
    assert set(report.merged) == set(applied_plan(model).tuned()) and not report.left
    torch.testing.assert_close(model(token_ids()).last_hidden_state, unmerged, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(token_ids()).last_hidden_state, unmerged, atol=1e-5, rtol=1e-5)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    full = ("pooler.dense.", "encoder.layer.0.output.LayerNorm.")  # trained in place, randomised above
    for k, v in before.items():
        if not k.startswith(full):
            torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("merged", [False, True])
def test_remove_restores_original_model_exactly(merged):
    model = llama_eager()
    reference = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = plan_for(
        model,
        {n: {"method": "lora", "rank": 2} for n, _, op in tunable_modules(model) if op in ("linear", "embedding")},
    )
    apply(model, plan)
    randomize(model)
    if merged:
        merge(model)
    assert remove(model) is model
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "peftplan_plan")
    got, expected = model(token_ids()).logits, reference(token_ids()).logits
    assert torch.equal(got, expected) if not merged else torch.allclose(got, expected, atol=1e-5)
    apply(model, plan)  # can be applied again after remove


def test_generate_keeps_working():
    model = gpt2_eager()
    ids = token_ids()[:1]
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    apply(model, plan_for(model, {f"transformer.h.{i}.attn.c_attn": {"method": "lora", "rank": 2} for i in range(2)}))
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_trainer_step_updates_only_adapters(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = llama_eager()
    apply(
        model, plan_for(model, {f"model.layers.{i}.self_attn.q_proj": {"method": "lora", "rank": 2} for i in range(2)})
    )
    before = snapshot(model)
    data = [{"input_ids": token_ids()[0], "labels": token_ids()[0]} for _ in range(4)]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)


def test_fingerprint_mismatch_lists_sites():
    model = bert_eager()
    plan = _bert_plan(model)
    plan.sites["encoder.layer.7.attention.self.query"] = {"method": "lora", "rank": 2}
    plan.sites["pooler.dense"]["shape"] = [64, 32]
    plan.sites["embeddings.word_embeddings"]["op"] = "linear"
    plan.model["fingerprint"] = "0123456789abcdef"
    before = snapshot(model)
    with pytest.raises(PlanError) as err:
        apply(model, plan)
    msg = str(err.value)
    assert "0123456789abcdef" in msg
    for name in ("encoder.layer.7.attention.self.query", "pooler.dense", "embeddings.word_embeddings"):
        assert name in msg
    assert "encoder.layer.0.attention.self.key" not in msg
    _assert_untouched(model, before)


def test_fingerprint_mismatch_elsewhere_needs_check_false():
    model, other = embedding_mlp(), nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 9))
    plan = plan_for(model, {"1": {"method": "lora", "rank": 2}})
    with pytest.raises(PlanError, match="check=False"):
        apply(other, plan)
    apply(other, plan, check=False)
    assert count_trainable(other) == 2 * (16 + 32)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "lora", "rank": 0}, "positive int"),
        ({"method": "lora", "rank": 2.5}, "positive int"),
        ({"method": "lora", "rank": 2, "alpha": -1}, "alpha"),
        ({"method": "lora"}, "needs 'rank'"),
        ({"method": "lora", "rank": 2, "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_hyper_parameters_fail_before_any_change(bad, match):
    model = bert_eager()
    plan = _bert_plan(model)
    plan.sites["encoder.layer.1.attention.self.key"] = bad
    before = snapshot(model)
    with pytest.raises(PlanError, match=match) as err:
        apply(model, plan)
    assert "encoder.layer.1.attention.self.key" in str(err.value)
    _assert_untouched(model, before)


def test_unknown_hyper_parameter_method_and_op_fail_before_any_change():
    model = bert_eager()
    before = snapshot(model)
    plan = _bert_plan(model)
    plan.sites["pooler.dense"] = {"method": "lora", "rank": 2, "ranks": 3}  # edited after Plan checked it
    with pytest.raises(PlanError, match="no hyper-parameter"):
        apply(model, plan)
    plan.sites["pooler.dense"] = {"method": "dora2"}
    with pytest.raises(PlanError, match="unknown method 'dora2'"):
        apply(model, plan)
    plan = _bert_plan(model)
    plan.sites["encoder.layer.0.output.LayerNorm"] = {"method": "lora", "rank": 2}
    with pytest.raises(PlanError, match="tunes only"):
        apply(model, plan)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(PlanError, match="groups=2"):
        apply(grouped, Plan(sites={"0": {"method": "lora", "rank": 2}}))
    with pytest.raises(PlanError, match="not a tunable module"):
        apply(model, Plan(sites={"encoder": {"method": "full"}}))
    _assert_untouched(model, before)


def test_failing_wrap_leaves_model_unchanged(monkeypatch):
    model = bert_eager()
    before = snapshot(model)
    lora = get_method("lora")
    calls = []

    def wrap_then_fail(module, site, **hp):
        calls.append(site.name)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return type(lora).wrap(lora, module, site, **hp)

    monkeypatch.setattr(lora, "wrap", wrap_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply(model, _bert_plan(model))
    _assert_untouched(model, before)


def test_merge_failing_half_way_leaves_the_model_as_before(monkeypatch):
    model = bert_eager()
    apply(model, _bert_plan(model))
    randomize(model)
    x = token_ids()
    with torch.no_grad():
        expected = model(x).last_hidden_state
    before = snapshot(model)
    third = applied_plan(model).tuned()
    third = [n for n in third if hasattr(model.get_submodule(n), "merge")][2]

    def fail():
        raise RuntimeError("device lost")

    monkeypatch.setattr(model.get_submodule(third), "merge", fail)
    with pytest.raises(RuntimeError, match="device lost"):
        merge(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, expected, atol=1e-6, rtol=0)


def test_apply_twice_is_an_error():
    model = embedding_mlp()
    plan = plan_for(model, {"1": {"method": "lora", "rank": 2}})
    apply(model, plan)
    with pytest.raises(PlanError, match="remove"):
        apply(model, plan)


def test_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = llama_eager()
    plan = plan_for(model, {n: {"method": "lora", "rank": 4} for n, _, op in tunable_modules(model) if op == "linear"})
    expected = _expected_count(model, plan)
    apply(model, plan)
    assert all(p.is_meta for p in model.parameters())
    assert count_trainable(model) == expected


def test_bf16_model():
    model = llama_eager().to(torch.bfloat16)
    expected = model(token_ids()).logits
    apply(
        model,
        plan_for(model, {n: {"method": "lora", "rank": 2} for n, _, op in tunable_modules(model) if op == "linear"}),
    )
    assert all(p.dtype == torch.bfloat16 for p in trainable_parameters(model).values())
    assert torch.equal(model(token_ids()).logits, expected)


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not hasattr(model, "peftplan_plan")
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
