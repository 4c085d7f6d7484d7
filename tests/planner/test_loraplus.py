"""LoRA+ (``Recipe.lr_ratio``): LoRA's B matrices train at ``lr * lr_ratio``, the rest at ``lr``;
checked against peft's ``create_loraplus_optimizer`` and by hand on AdamW's first step."""

import pytest
import torch

import peftplan as pp
from peftplan.backends.peft_config import axolotl_yaml
from peftplan.planner.training.train import _optimizer, trainable
from peftplan.recipe import Recipe
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier

QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]


def lora_qv():
    return pp.apply(bert_classifier(), pp.Plan(sites={n: {"method": "lora", "rank": 4} for n in QV}))


def test_the_groups_are_peft_loraplus_groups():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    model = get_peft_model(bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"]))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)  # no trained 1-D tensors,
    # which peft's LoRA+ would also put in B's group
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ours = _optimizer(model, trainable(model), Recipe(lr=1e-3, lr_ratio=16), None)
    lr_of = lambda opt: {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}  # noqa: E731
    assert lr_of(ours) == lr_of(theirs) and sorted(set(lr_of(ours).values())) == [1e-3, 1.6e-2]


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_adams_first_step_moves_b_by_lr_times_the_ratio(ratio):
    model, task = lora_qv(), tiny_task()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    recipe = Recipe(lr=1e-3, steps=1, warmup=0.0, schedule="constant", clip=None, lr_ratio=ratio)
    pp.train(model, task, recipe)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
    # B starts at zero, so A's first gradient is zero; Adam's first step is lr * g / (|g| + eps) ~ lr per entry
    assert all(v == 0 for n, v in moved.items() if n.endswith("lora_A"))
    # (within 5%: where |g| is near eps, the step is a little shorter)
    assert all(v == pytest.approx(1e-3 * ratio, rel=5e-2) for n, v in moved.items() if n.endswith("lora_B"))


def test_the_ratio_travels_with_the_plan_and_to_axolotl():
    assert "lr_ratio" not in Recipe(lr=1e-3).to_dict()  # recipes without LoRA+ read as before
    recipe = Recipe(lr=2e-4, steps=10, lr_ratio=16)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    plan = pp.Plan(sites={n: {"method": "lora", "rank": 4, "alpha": 8} for n in QV}, recipe=recipe)
    assert pp.Plan.from_dict(plan.to_dict()).recipe.lr_ratio == 16
    assert "loraplus_lr_ratio: 16" in axolotl_yaml(plan)
    with pytest.raises(ValueError, match="lr_ratio=0.5"):
        Recipe(lr_ratio=0.5)
