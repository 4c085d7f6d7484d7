"""`TrainerLoop`: a search whose trials train with the Hugging Face `Trainer`.

Give it what you would give `Trainer` — `TrainingArguments`, the train and eval datasets, a
data collator, optionally ``compute_metrics`` — and pass it as ``evaluate=``: each trial
trains a fresh copy of the model with the trial's plan applied, for the trial's steps
(``max_steps``, from its `Fidelity` and the recipe) at the trial's learning rate (the search
chooses one per trial), and is scored by ``trainer.evaluate()``. Everything else (batch size,
schedule, warm-up, precision, logging) is your `TrainingArguments`; trials save no
checkpoints.

    >>> import peftplan
    >>> from datasets import Dataset
    >>> from transformers import DataCollatorWithPadding, TrainingArguments
    >>> tokenizer, model = char_tokenizer(), tiny_bert()
    >>> data = Dataset.from_list([{"text": t, "label": int("good" in t)} for t in ["a good film", "a bad film"] * 8])
    >>> data = data.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    >>> loop = TrainerLoop(TrainingArguments("out", max_steps=200, learning_rate=1e-3, report_to=[]), data, data,
    ...                    data_collator=DataCollatorWithPadding(tokenizer))
    >>> loop.recipe.steps, sorted(loop.task(model).train_batches[0])
    (200, ['attention_mask', 'input_ids', 'labels'])
    >>> plan = peftplan.search(model, "5%", evaluate=loop, trials=12)  # doctest: +SKIP

The search's recipe is the arguments' (`TrainerLoop.recipe`), and its task
(`TrainerLoop.task`) the first training batches, collated, for the proxy's site scores and the
memory costs. `peftplan.integrations.trl.SFTLoop` is the same loop around TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch.nn as nn

from peftplan.planner.training.evaluate import Fidelity
from peftplan.planner.training.task import Task
from peftplan.planner.training.user_loop import model_loss
from peftplan.recipe import SCHEDULES, Recipe


class TrainerLoop:
    """``evaluate=`` for `peftplan.search` that trains each trial with `transformers.Trainer`.

    ``metric``: the key of ``trainer.evaluate()``'s result to maximise (default: the arguments'
    ``metric_for_best_model``, else ``eval_loss``), negated when ``greater_is_better`` is False
    (the default for a loss); ``calibration_batches``: training batches of `task`."""

    def __init__(
        self,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        data_collator: Callable | None = None,
        compute_metrics: Callable | None = None,
        *,
        metric: str | None = None,
        greater_is_better: bool | None = None,
        calibration_batches: int = 4,
    ) -> None:
        from transformers import default_data_collator

        if eval_dataset is None or len(eval_dataset) == 0:
            raise ValueError(
                "TrainerLoop scores each trial with trainer.evaluate(): give a non-empty eval_dataset "
                "(held out of your training data, not your test set)"
            )
        if len(train_dataset) == 0:
            raise ValueError("TrainerLoop: the train_dataset has no examples")
        self.args, self.train_dataset, self.eval_dataset = args, train_dataset, eval_dataset
        self.data_collator = data_collator or default_data_collator
        self.compute_metrics = None if compute_metrics is None else checked_metrics(compute_metrics)
        key = metric or args.metric_for_best_model or "loss"
        self.metric = key if key.startswith("eval_") else f"eval_{key}"
        self.greater_is_better = (
            (self.metric != "eval_loss" if args.greater_is_better is None else args.greater_is_better)
            if greater_is_better is None
            else greater_is_better
        )
        self.calibration_batches = calibration_batches

    @property
    def batches_per_epoch(self) -> int:
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return max(1, math.ceil(len(self.train_dataset) / per_step))

    @property
    def recipe(self) -> Recipe:
        """The arguments as a `Recipe` (counted in steps): the full length trials are a share of."""
        a = self.args
        steps = a.max_steps if a.max_steps > 0 else max(1, math.ceil(a.num_train_epochs * self.batches_per_epoch))
        warmup = a.warmup_steps if a.warmup_steps < 1 else min(0.99, a.warmup_steps / steps)
        schedule = getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)
        return Recipe(
            lr=a.learning_rate,
            steps=steps,
            warmup=float(warmup),
            schedule=schedule if schedule in SCHEDULES else "linear",
            weight_decay=a.weight_decay,
            clip=a.max_grad_norm or None,
        )

    def task(self, model: nn.Module) -> Task:
        """The first ``calibration_batches`` training batches, collated, with the model's own
        loss (``model(**batch).loss``): what the proxy scores sites on and memory is costed at
        (``model``, the search's base model, is not needed to make them here)."""
        size = self.args.per_device_train_batch_size
        n = min(len(self.train_dataset), size * self.calibration_batches)
        batches = [
            self.data_collator([self.train_dataset[j] for j in range(i, min(i + size, n))]) for i in range(0, n, size)
        ]
        names = self.args.label_names or ["labels"]
        unlabelled = next((sorted(b) for b in batches if not any(k in b for k in names)), None)
        if unlabelled is not None:
            raise ValueError(
                f"TrainerLoop: the train_dataset's batches have no {' or '.join(map(repr, names))} (their keys "
                f"are {unlabelled}), and Trainer trains by the model's own loss, computed from the labels: "
                "add a 'labels' column (a 'label' column is renamed by the collator), or name yours with "
                "TrainingArguments(label_names=[...])"
            )
        return Task([dict(b) for b in batches], [], model_loss, None, name="trainer")

    def trial_arguments(self, output_dir: str, steps: int, lr: float) -> Any:
        """The arguments of a trial: the user's, at the trial's length and learning rate, saving no checkpoints.

        >>> from transformers import TrainingArguments
        >>> loop = TrainerLoop(TrainingArguments("out", max_steps=200, learning_rate=1e-3), [{}], [{}])
        >>> loop.trial_arguments("trial", 20, 1e-3).max_steps
        20
        """
        return replace(
            self.args,
            output_dir=output_dir,
            max_steps=steps,
            learning_rate=lr,
            save_strategy="no",
            load_best_model_at_end=False,
        )

    def trainer(self, model: nn.Module, args: Any, train_dataset: Any, eval_dataset: Any) -> Any:
        """The trainer of one trial: `transformers.Trainer` with the user's collator and metrics.

        >>> from transformers import TrainingArguments
        >>> loop = TrainerLoop(TrainingArguments("out", max_steps=200, learning_rate=1e-3, report_to=[]), [{}], [{}])
        >>> type(loop.trainer(tiny_bert(), loop.trial_arguments("trial", 20, 1e-3), None, None)).__name__
        'Trainer'
        """
        from transformers import Trainer

        return Trainer(
            model=model,
            args=args,
            data_collator=self.data_collator,
            compute_metrics=self.compute_metrics,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )

    def __call__(self, model: nn.Module, fidelity: Fidelity, recipe: Recipe) -> dict[str, float]:
        size = self.args.per_device_train_batch_size
        with tempfile.TemporaryDirectory(prefix="peftplan-trial-") as out:
            args = self.trial_arguments(out, fidelity.steps, recipe.lr)
            trainer = self.trainer(
                model,
                args,
                _head(self.train_dataset, fidelity.train_batches and fidelity.train_batches * size),
                _head(
                    self.eval_dataset, fidelity.eval_batches and fidelity.eval_batches * args.per_device_eval_batch_size
                ),
            )
            trainer.train()
            scores = trainer.evaluate()
        if self.metric not in scores:
            raise ValueError(
                f"trainer.evaluate() gave {sorted(scores)}, not {self.metric!r}: pass metric=... naming one "
                "(compute_metrics's keys get the eval_ prefix)"
            )
        value = float(scores[self.metric])
        return {"metric": value if self.greater_is_better else -value, "loss": scores.get("eval_loss")}


def checked_metrics(compute_metrics: Callable) -> Callable:
    """``compute_metrics`` whose result must be a dict of metric names to numbers (Trainer would
    fail on anything else with "'NoneType' object does not support item assignment").

    >>> checked_metrics(lambda prediction: None)(object())
    Traceback (most recent call last):
    ...
    TypeError: compute_metrics returned None: return a dict of metric names to numbers, e.g. {"accuracy": 0.9} (trainer.evaluate() reports it as eval_accuracy)
    """

    def checked(*args: Any, **kwargs: Any) -> Any:
        out = compute_metrics(*args, **kwargs)
        if not isinstance(out, Mapping):
            got = "None" if out is None else f"{type(out).__name__} {repr(out)[:80]}"
            raise TypeError(
                f"compute_metrics returned {got}: return a dict of metric names to numbers, e.g. "
                '{"accuracy": 0.9} (trainer.evaluate() reports it as eval_accuracy)'
            )
        return out

    return checked


def _head(dataset: Any, n: int | None) -> Any:
    """The first ``n`` examples of ``dataset`` (all of them when None)."""
    if not n or n >= len(dataset):
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(range(n))
    from torch.utils.data import Subset

    return Subset(dataset, range(n))
