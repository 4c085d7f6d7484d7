"""`train`: AdamW over a `Task`'s training batches as a `Recipe` says, for demos, benchmarks,
trials and final runs alike.

Only parameters with ``requires_grad`` are optimised (after `peftplan.apply`, the adapters
and any fully-trained head). The batch order comes from ``seed``, so two models trained with
the same seed see the same data in the same order.

    >>> result = train(tiny_bert(), tiny_task(), Recipe(lr=1e-3, steps=10), seed=0)
    >>> result.steps, len(result.losses), result.losses == train(tiny_bert(), tiny_task(), Recipe(lr=1e-3, steps=10)).losses
    (10, 10, True)
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...backends.base import PlanError
from ...backends.labels import check_model_labels, record_training
from ...recipe import Recipe
from .device import autocast, check_bf16, resolve
from .progress import ProgressLine
from .task import Task


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    task: Task,
    recipe: Recipe | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    description: str = "training",
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
    bf16: bool = False,
    checkpointing: bool = False,
    make_optimizer: Callable[[nn.Module, Recipe], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train ``model`` in place by ``recipe`` (default `Recipe()`: one epoch at lr 1e-3).

    The model moves to ``device`` (None: where it is unless that is the CPU, else CUDA when
    available, else the CPU; `peftplan.planner.training.device.resolve`) and each batch with
    it; ``bf16`` runs the forward passes under bf16 autocast (weights and optimizer stay fp32);
    ``checkpointing`` recomputes each layer's activations in the backward pass instead of
    keeping them (less memory, about a third more compute; Hugging Face models).
    ``make_optimizer(model, recipe)`` replaces AdamW over the trainable parameters (peft's
    ``create_loraplus_optimizer``, say); the recipe's schedule still drives its learning rates.

    ``on_step(step)`` runs after each optimizer step (0-based), gradients still in place: the hook a
    method that reshapes itself while training needs (peft AdaLoRA's ``update_and_allocate``).

    Weights trained with other class ids than the task's (a loaded artifact, a fine-tuned
    classifier's ``id2label``) are refused (`peftplan.backends.labels`); afterwards the model's
    applied plan records the task's class names and ``recipe``, which `save` writes."""
    recipe = recipe or Recipe()
    params, device = _prepare(model, task, recipe, device, bf16)
    steps = recipe.total_steps(len(task.train_batches))
    torch.manual_seed(seed)
    optimizer = _optimizer(model, params, recipe, make_optimizer)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    bar = ProgressLine(
        progress, description, steps, fields={"loss": float("nan")}, text="loss {loss:.3f}", transient=True
    )
    try:
        with checkpointed(model) if checkpointing else contextlib.nullcontext():
            losses = _run_steps(
                model,
                task,
                recipe,
                (optimizer, params),
                _batch_order(task.train_batches, steps, seed),
                steps=steps,
                autocast_to=(device, bf16),
                on_step=on_step,
                bar=bar,
            )
    finally:
        bar.close()
        model.train(was_training)
    # what `save` writes: how it was trained
    record_training(model, {**task.provenance(), "trained_on": task.name}, recipe)
    return TrainResult(steps, time.perf_counter() - start, losses)


def _prepare(
    model: nn.Module, task: Task, recipe: Recipe, device: str | torch.device | None, bf16: bool
) -> tuple[list[nn.Parameter], torch.device]:
    """The parameters to optimise and the device, the model moved there, after checking it can train."""
    params = trainable(model)
    check_trainable(model, task, recipe)
    check_model_labels(model, task.labels)  # weights trained with other class ids would learn them crossed
    device = resolve(device, model)
    if bf16:
        check_bf16(device, model)
    model.to(device)
    return params, device


LORA_B = "lora_B"  # the name of LoRA's and DoRA's up-projection matrices, which LoRA+ trains faster


def _optimizer(
    model: nn.Module,
    params: list[nn.Parameter],
    recipe: Recipe,
    make_optimizer: Callable[[nn.Module, Recipe], torch.optim.Optimizer] | None,
) -> torch.optim.Optimizer:
    if make_optimizer is not None:
        return make_optimizer(model, recipe)
    if recipe.lr_ratio == 1.0:
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    up = {id(p) for name, p in model.named_parameters() if p.requires_grad and LORA_B in name.split(".")}
    groups = [
        {"params": [p for p in params if id(p) not in up], "lr": recipe.lr},
        {"params": [p for p in params if id(p) in up], "lr": recipe.lr * recipe.lr_ratio},  # LoRA+
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=recipe.weight_decay)


def _batch_order(batches: list, steps: int, seed: int) -> Iterator:
    """``steps`` batches: passes over ``batches``, each pass in an order drawn with ``seed``."""
    order = random.Random(seed)
    left: list = []
    for _ in range(steps):
        if not left:
            left = list(batches)
            order.shuffle(left)
        yield left.pop()


def _run_steps(
    model: nn.Module,
    task: Task,
    recipe: Recipe,
    optimized: tuple[torch.optim.Optimizer, list[nn.Parameter]],
    batches: Iterator,
    *,
    steps: int,
    autocast_to: tuple[torch.device, bool],
    on_step: Callable[[int], None] | None,
    bar: ProgressLine,
) -> list[float]:
    """One optimizer step per batch, the learning rate following ``recipe``'s schedule over
    ``steps``; the losses, step by step. ``optimized`` is the optimizer and the parameters
    whose gradient norm ``recipe.clip`` bounds. A loss that is not finite stops training."""
    optimizer, params = optimized
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: recipe.factor(step, steps))
    losses: list[float] = []
    for batch in batches:
        with autocast(*autocast_to):
            loss = task.loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training diverged: loss is {loss.item()} at step {len(losses) + 1} (lr "
                f"{recipe.lr:g}): lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        optimizer.step()
        if on_step is not None:
            on_step(len(losses))
        schedule.step()
        losses.append(loss.item())
        bar.update(advance=1, loss=losses[-1])
    return losses


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters training changes: those with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def check_trainable(model: nn.Module, task: Task, recipe: Recipe) -> None:
    """What would make training fail or train nothing, said before it starts."""
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameter: apply a plan first (peftplan.apply)")
    if any(p.is_meta for p in params):
        raise ValueError(
            "the model's weights are on the meta device (no data): materialise them (model.to_empty(device=...) "
            "and load a state dict, or peftplan.load an artifact) before training"
        )
    merged = [n for n, m in model.named_modules() if getattr(m, "merged", False) is True]
    if merged:
        raise PlanError(
            f"sites {merged[:5]} are merged, so their adapters get no gradient: call "
            "peftplan.unmerge(model) before training (merge only for inference)"
        )
    if not task.train_batches:
        raise ValueError(f"task {task.name!r} has no training batches")
    check_batch_size(task, recipe)


@contextlib.contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """``model`` with gradient checkpointing on (Hugging Face's, non-reentrant, so frozen inputs
    need no gradient), as it was afterwards."""
    new = hasattr(model, "activation_checkpointing_enable")  # transformers 5.2x's name; the old one warns there
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    enable = getattr(model, f"{name}_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"checkpointing=True: {type(model).__name__} does not support Hugging Face gradient "
            "checkpointing; train without it"
        )
    was = getattr(model, f"is_{name}")
    enable(**{f"{name}_kwargs": {"use_reentrant": False}})
    try:
        yield
    finally:
        if not was:
            getattr(model, f"{name}_disable")()


def check_batch_size(task: Task, recipe: Recipe) -> None:
    """A recipe made for one batch size trains another only by mistake: say so."""
    if recipe.batch_size is None:
        return
    size = task.batch_size()
    if size != recipe.batch_size:
        raise ValueError(
            f"the recipe was made for batches of {recipe.batch_size}, task {task.name!r} has batches of "
            f"{size}: rebuild the task with batch_size={recipe.batch_size}, or give a recipe for {size}"
        )
