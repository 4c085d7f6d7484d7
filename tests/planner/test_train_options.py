"""Training options that must not change what is learned: gradient checkpointing (the same
losses as without it) and an optimizer of the user's (peft's LoRA+ optimizer: its two learning
rates, driven by the recipe's schedule)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftplan as pp
from tests.planner.test_chat import QA, conversation
from tests.zoo import chat_tokenizer, llama


def lora_qv(model):
    graph = pp.lower(model)
    sites = {s.name: {"method": "lora", "rank": 4, "alpha": 8} for s in graph.sites if s.role in ("attn.q", "attn.v")}
    return pp.apply(model, pp.Plan(sites=sites))


def task_of(model):
    return pp.Task.for_causal_lm(
        model, chat_tokenizer(), [{"messages": conversation(q, a)} for q, a in QA], validation=None, batch_size=4
    )


def test_checkpointing_trains_to_the_same_losses_and_is_switched_off_after():
    torch.manual_seed(0)
    base = lora_qv(llama())
    task, recipe = task_of(base), pp.Recipe(lr=1e-2, steps=6)
    plain, checked = copy.deepcopy(base), copy.deepcopy(base)
    a = pp.train(plain, task, recipe, seed=0).losses
    b = pp.train(checked, task, recipe, seed=0, checkpointing=True).losses
    assert a == pytest.approx(b, rel=1e-5) and a[-1] < a[0]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in checked.modules())  # switched off after
    with pytest.raises(ValueError, match="does not support Hugging Face gradient checkpointing"):
        pp.train(torch.nn.Sequential(torch.nn.Linear(4, 4)), task, recipe, checkpointing=True)


def test_a_users_optimizer_trains_with_the_recipes_schedule():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    task, recipe = task_of(model), pp.Recipe(lr=1e-2, steps=4, warmup=0.5, schedule="linear")
    seen = []

    def loraplus(m, r):
        opt = create_loraplus_optimizer(m, torch.optim.AdamW, lr=r.lr, loraplus_lr_ratio=16)
        seen.append(opt)
        return opt

    run = pp.train(
        model,
        task,
        recipe,
        make_optimizer=loraplus,
        on_step=lambda step: seen.append(sorted({g["lr"] for g in seen[0].param_groups if g["params"]})),
    )
    assert run.steps == 4 and run.losses[-1] < run.losses[0]
    first = seen[1]  # the rates during step 1 (warm-up: half the peak), A's and B's 16x apart
    assert first == pytest.approx([recipe.lr * 0.5, recipe.lr * 0.5 * 16])
