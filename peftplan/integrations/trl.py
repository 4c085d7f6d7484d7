"""`SFTLoop`: a search whose trials train with TRL's ``SFTTrainer``.

Give it what you would give ``SFTTrainer`` — an ``SFTConfig``, the train and eval datasets in any
format TRL reads (``text``, ``prompt``/``completion``, conversational ``messages``), the
tokenizer, optionally a ``formatting_func`` — and pass it as ``evaluate=``: each trial trains a
fresh copy of the model with the trial's plan applied, for the trial's steps (``max_steps``,
from its `Fidelity` and the recipe) at the trial's learning rate, with TRL's own data
preparation, collator and loss, and is scored by ``trainer.evaluate()`` (minus the eval loss by
default, or a metric such as ``"mean_token_accuracy"``). Everything else (batch size, packing,
completion-only loss, precision, gradient checkpointing) is your ``SFTConfig``; trials save no
checkpoints.

    >>> import peftplan
    >>> from datasets import Dataset
    >>> from trl import SFTConfig
    >>> chats = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    ...                            for q, a in [("good?", "yes"), ("bad?", "no")] * 8])
    >>> loop = SFTLoop(SFTConfig("out", max_steps=200, learning_rate=2e-4, per_device_train_batch_size=8,
    ...                          bf16=False, use_cpu=True, report_to=[]), chats, chats, chat_tokenizer())
    >>> loop.recipe.steps, loop.recipe.lr
    (200, 0.0002)
    >>> plan = peftplan.search(tiny_llama(), "2%", evaluate=loop, trials=12)  # doctest: +SKIP

The search's recipe is the config's (`SFTLoop.recipe`); its site scores and memory costs come
from the first training batches as ``SFTTrainer`` makes them (`SFTLoop.task`). TRL computes the
loss from ``lm_head.weight`` directly (its fused LM head), so a plan with an adapter on the
output layer fails its trial, saying so: keep the head out of the plan's roles (the default),
or train it whole (``train_modules``).
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from peftplan.backends.wrapper import Wrapper
from peftplan.integrations.transformers import TrainerLoop
from peftplan.planner.training.task import Task
from peftplan.planner.training.user_loop import model_loss


class SFTLoop(TrainerLoop):
    """``evaluate=`` for `peftplan.search` that trains each trial with ``trl.SFTTrainer``.

    ``metric``: the key of ``trainer.evaluate()``'s result to maximise (default: the config's
    ``metric_for_best_model``, else ``eval_loss``), negated when ``greater_is_better`` is False
    (the default for a loss); ``calibration_batches``: training batches of `task`."""

    def __init__(
        self,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any = None,
        *,
        formatting_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        metric: str | None = None,
        greater_is_better: bool | None = None,
        calibration_batches: int = 4,
    ) -> None:
        super().__init__(
            args,
            train_dataset,
            eval_dataset,
            None,
            compute_metrics,
            metric=metric,
            greater_is_better=greater_is_better,
            calibration_batches=calibration_batches,
        )
        self.processing_class, self.formatting_func = processing_class, formatting_func

    def trainer(self, model: nn.Module, args: Any, train_dataset: Any, eval_dataset: Any) -> Any:
        """The ``SFTTrainer`` of one trial, on ``model`` with its plan applied.

        >>> from datasets import Dataset
        >>> from trl import SFTConfig
        >>> texts = Dataset.from_list([{"text": "a good film"}, {"text": "a bad film"}])
        >>> loop = SFTLoop(SFTConfig("out", bf16=False, use_cpu=True, report_to=[]), texts, texts, chat_tokenizer())
        >>> type(loop.trainer(tiny_llama(), loop.trial_arguments("trial", 20, 1e-3), texts, texts)).__name__
        'SFTTrainer'
        """
        from trl import SFTTrainer

        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        if isinstance(head, Wrapper):
            raise ValueError(
                "TRL's SFTTrainer computes the loss from lm_head.weight directly, so an adapter on the output "
                "layer would never train: keep the head out of the plan (roles without 'head') or train it "
                "whole (train_modules=['lm_head'])"
            )
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.processing_class,
            formatting_func=self.formatting_func,
            compute_metrics=self.compute_metrics,
        )

    def task(self, model: nn.Module) -> Task:
        """The first ``calibration_batches`` training batches as ``SFTTrainer`` prepares and
        collates them (tokenized, labels masked as TRL masks them), with the model's own loss:
        what the proxy scores sites on and memory is costed at. The trainer that makes them
        gets a copy of ``model`` (TRL patches the model it is given).

        >>> from datasets import Dataset
        >>> from trl import SFTConfig
        >>> texts = Dataset.from_list([{"text": "a good film"}, {"text": "a bad film"}])
        >>> loop = SFTLoop(SFTConfig("out", bf16=False, use_cpu=True, report_to=[]), texts, texts, chat_tokenizer())
        >>> sorted(loop.task(tiny_llama()).train_batches[0])
        ['attention_mask', 'input_ids', 'labels']
        """
        with tempfile.TemporaryDirectory(prefix="peftplan-sft-") as out:
            trainer = self.trainer(
                copy.deepcopy(model), self.trial_arguments(out, 1, self.args.learning_rate), self.train_dataset, None
            )
            batches = [dict(b) for b in itertools.islice(trainer.get_train_dataloader(), self.calibration_batches)]
        return Task(batches, [], model_loss, None, name="sft")
