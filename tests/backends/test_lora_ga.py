"""LoRA from the singular directions of the weight's mean gradient (``init="lora_ga"``) against
peft's ``init_lora_weights="lora_ga"`` after ``preprocess_loraga``: the same gradients, the same
start (up to the signs and the accuracy of peft's randomised SVD), the same function once
trained; the start's behaviour as a method (identity, gradients, merge, save and load); the
planner computing the gradients a plan needs; and its validation and exports."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

from peftplan.backends import PlanError, apply, get_method, load, merge, remove, save, unmerge
from peftplan.ir.modules import static_site
from peftplan.planner.proxy.scores import mean_gradients, plan_gradients
from peftplan.planner.training.task import Task
from tests.backends.adapters import plan_for
from tests.backends.references import assert_same_lora_function
from tests.zoo import llama_eager, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SITES = {
    f"model.layers.{i}.{m}": {"rank": 2 + i, "alpha": 3}
    for i in range(2)
    for m in ("self_attn.q_proj", "mlp.down_proj")
}


def _lm_task(n: int = 3) -> Task:
    """Next-token prediction on random ids of the tiny Llama's vocabulary."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 99, (2, 6), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    return Task(
        batches, batches[:1], lambda m, b: m(**b).loss, lambda m, b: 0.0, name="lm", validation_batches=batches[:1]
    )


def _entries(**extra) -> dict[str, dict]:
    return {n: {"method": "lora", "init": "lora_ga", **e, **extra} for n, e in SITES.items()}


def _exact_svd_lowrank(a: torch.Tensor, q: int, niter: int):
    """``torch.svd_lowrank``'s (U, S, V) from an exact SVD: peft's start without its randomness."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :q], s[:q], vh[:q].T


def _pair(monkeypatch):
    """Our LoRA-GA-started LoRA and peft's on two copies of one tiny Llama, from one task
    (peft's randomised SVD made exact)."""
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd_lowrank)
    task, model = _lm_task(), llama_eager()
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=list(SITES),
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
        rank_pattern={re.escape(n): e["rank"] for n, e in SITES.items()},
        alpha_pattern={re.escape(n): e["alpha"] for n, e in SITES.items()},
    )
    other = copy.deepcopy(model)

    def train_step():
        for batch in task.train_batches:
            other(**batch).loss.backward()

    preprocess_loraga(other, config, train_step)
    peft_grads = {n: other.get_submodule(n)._peft_loraga_grad.clone() for n in SITES}
    theirs = get_peft_model(other, config)
    gradients = mean_gradients(model, task, list(SITES), batches=len(task.train_batches), progress=False)
    ours = apply(model, plan_for(model, _entries()), gradients=gradients)
    return ours, theirs, gradients, peft_grads


def _aligned(mine: torch.Tensor, other: torch.Tensor, dim: int) -> torch.Tensor:
    """``mine`` with each row (dim 0) or column (dim 1) signed like ``other``'s: an SVD's
    singular vectors are defined up to their sign."""
    dots = (mine * other).sum(dim=1 - dim, keepdim=True)
    return mine * torch.where(dots < 0, -1.0, 1.0)


def test_the_gradients_the_start_and_the_unchanged_model_match_peft(monkeypatch):
    reference = llama_eager()
    ours, theirs, gradients, peft_grads = _pair(monkeypatch)
    for name in SITES:
        torch.testing.assert_close(gradients[name], peft_grads[name], atol=1e-6, rtol=1e-5)  # mean over the batches
        mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        a, b = other.lora_A["default"].weight, other.lora_B["default"].weight
        torch.testing.assert_close(_aligned(mine.lora_A, a, 0), a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_aligned(mine.lora_B, b, 1), b, atol=1e-7, rtol=1e-4)
        assert torch.equal(mine.lora_A0, mine.lora_A) and torch.equal(mine.lora_B0, mine.lora_B)
        assert torch.equal(mine.base.weight, reference.get_submodule(name).weight)  # ours keeps the weight
        residual = reference.get_submodule(name).weight - other.scaling["default"] * b @ a
        torch.testing.assert_close(other.base_layer.weight, residual, atol=1e-6, rtol=1e-5)  # peft changes it
    with torch.no_grad():
        expected = reference(token_ids()).logits
        torch.testing.assert_close(ours(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_trained_outputs_and_gradients_equal_peft_from_its_start(monkeypatch):
    ours, theirs, _, _ = _pair(monkeypatch)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # ours from exactly peft's start, then both moved off it alike
        for name in SITES:
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            for p, p0, q in (
                (mine.lora_A, mine.lora_A0, other.lora_A["default"].weight),
                (mine.lora_B, mine.lora_B0, other.lora_B["default"].weight),
            ):
                p.copy_(q)
                p0.copy_(q)
                step = 0.05 * torch.randn(p.shape, generator=g)
                p.add_(step)
                q.add_(step)
    assert_same_lora_function(ours, theirs, SITES, token_ids())


def _started(model: nn.Module | None = None) -> nn.Module:
    model = model or llama_eager()
    gradients = mean_gradients(model, _lm_task(), list(SITES), progress=False)
    return apply(model, plan_for(model, _entries()), gradients=gradients)


def _moved(tuned: nn.Module) -> nn.Module:
    """``tuned`` with A and B moved off their start, as training would."""
    with torch.no_grad():
        for name in SITES:
            tuned.get_submodule(name).lora_A.add_(0.05)
            tuned.get_submodule(name).lora_B.add_(0.05)
    return tuned


def test_only_the_adapters_train_and_merge_unmerge_remove_restore():
    reference = llama_eager()
    tuned = _started()
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in SITES for m in "AB"}  # the frozen start is no parameter
    with torch.no_grad():
        for name in SITES:
            tuned.get_submodule(name).lora_B.add_(0.1)
        before = tuned(token_ids()).logits
        merge(tuned)
        torch.testing.assert_close(tuned(token_ids()).logits, before, atol=1e-5, rtol=1e-5)
        unmerge(tuned)
        torch.testing.assert_close(tuned(token_ids()).logits, before, atol=1e-5, rtol=1e-5)
        merge(tuned)
    remove(tuned)
    for name in SITES:
        torch.testing.assert_close(
            tuned.get_submodule(name).weight, reference.get_submodule(name).weight, atol=1e-6, rtol=0
        )


def test_save_and_load_need_no_gradients(tmp_path):
    tuned = _moved(_started())
    save(tuned, tmp_path)
    loaded = load(llama_eager(), tmp_path)  # the saved start is copied in
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids()).logits, tuned(token_ids()).logits, atol=0, rtol=0)


def test_mean_gradients_are_the_mean_of_each_batch_gradient():
    model, task = llama_eager(), _lm_task()
    name = "model.layers.0.mlp.down_proj"
    expected = torch.zeros_like(model.get_submodule(name).weight)
    for batch in task.train_batches:
        model.zero_grad()
        model(**batch).loss.backward()
        expected += model.get_submodule(name).weight.grad / len(task.train_batches)
    model.zero_grad()
    got = mean_gradients(model, task, [name], progress=False)[name]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing left behind


def test_the_planner_computes_the_gradients_a_plan_needs_and_trains_it():
    from peftplan.planner.training.evaluate import Fidelity, evaluate

    model, task = llama_eager(), _lm_task()
    plan = plan_for(model, {**_entries(), "model.layers.0.self_attn.v_proj": {"method": "lora", "rank": 2}})
    assert sorted(plan_gradients(model, plan, task)) == sorted(SITES)  # the zero start needs none
    assert plan_gradients(model, plan.as_lora(), task) == {}
    result = evaluate(model, plan, task, Fidelity())
    assert result.ok, result.failed
    assert result.losses[-1] < result.losses[0]


def test_a_plan_without_its_gradients_is_refused_before_anything_changes():
    model = llama_eager()
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(PlanError, match=r"mean gradient; pass apply\(\.\.\., gradients=.*use init 'zero'"):
        apply(model, plan_for(model, {name: {"method": "lora", "rank": 2, "init": "lora_ga"}}))
    with pytest.raises(PlanError, match="its gradient has shape"):
        apply(
            model,
            plan_for(model, {name: {"method": "lora", "rank": 2, "init": "lora_ga"}}),
            gradients={name: torch.zeros(3, 3)},
        )
    assert not any(p.requires_grad is False for p in model.parameters())  # untouched


@pytest.mark.parametrize(
    "module, hp, match",
    [
        (nn.Embedding(10, 8), {"rank": 2, "init": "lora_ga"}, "op is embedding"),
        (nn.Linear(8, 5), {"rank": 3, "init": "lora_ga"}, "needs 6 singular directions"),
    ],
)
def test_bad_starts_are_named(module, hp, match):
    from peftplan.ir.modules import module_op

    with pytest.raises(PlanError, match=match):
        get_method("lora").validate(static_site("m", module, module_op(module)), **hp)


def test_exports_peft_config_axolotl_and_summary(tmp_path):
    from peft import PeftModel

    from peftplan.backends import export_peft, import_peft

    tuned = _moved(_started())
    export_peft(tuned, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # a plain LoRA of twice the rank on the unchanged weights
    with torch.no_grad():
        expected = tuned(token_ids()).logits
        torch.testing.assert_close(
            PeftModel.from_pretrained(llama_eager(), tmp_path)(token_ids()).logits, expected, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            import_peft(llama_eager(), tmp_path)(token_ids()).logits, expected, atol=1e-5, rtol=1e-5
        )
    plan = plan_for(llama_eager(), _entries())
    peft_config = plan.to_peft_config()
    assert peft_config.init_lora_weights == "lora_ga" and peft_config.lora_ga_config == LoraGAConfig()
    with pytest.raises(PlanError, match="axolotl does not run it"):
        plan.to_axolotl()
    assert plan.summary() == "lora: 4 sites, ranks 2–3, 4 from a LoRA-GA start"
    mixed = plan_for(llama_eager(), {**plan.sites, "model.layers.1.self_attn.v_proj": {"method": "lora", "rank": 2}})
    with pytest.raises(PlanError, match="this plan mixes zero and LoRA-GA starts"):
        mixed.to_peft_config()
    assert sorted(mixed.as_lora().provenance["as_lora"])[0].endswith(
        "lora from a LoRA-GA start → from zero (peft starts every site of one adapter alike (init_lora_weights))"
    )
