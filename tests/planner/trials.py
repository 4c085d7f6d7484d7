"""What planner tests run trials on: a tiny learnable task, a task written as TSV files, and
stand-in evaluations (deterministic scores, no training) that the study's subprocesses use too."""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path

import torch

from peftplan.planner.training.evaluate import Evaluation
from peftplan.planner.training.task import Task, accuracy, classification_loss


def tiny_task(n_batches=12, batch=16, seed=0) -> Task:
    """Label = whether token 5 appears: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(6, 50, (batch, 8), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        ids[labels == 1, 3] = 5
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return Task(batches[:8], batches[10:], classification_loss, accuracy, name="tiny", validation_batches=batches[8:10])


def write_task(folder: Path, n_train: int = 48, n_dev: int = 16) -> Path:
    """``train.tsv``/``dev.tsv`` where label 1 texts say "good" and label 0 texts say "bad"."""
    rng = random.Random(0)
    words = "movie plot actor scene story music film the a it was".split()
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            text = rng.sample(words, 4) + ["good" if label else "bad"]
            rng.shuffle(text)
            rows.append(f"{label}\t{' '.join(text)}")
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def stand_in(base, plan, task, fidelity, *, recipe, seed, sleep=0.0):
    """A deterministic score of the plan's knobs (the same in every process), scaled by the
    fidelity's steps so that rungs differ; ``sleep`` stands for training time."""
    time.sleep(sleep)
    knobs = repr(sorted(plan.provenance["knobs"].items())).encode()
    steps = fidelity.recipe(recipe, len(task.train_batches)).total_steps(len(task.train_batches))
    return Evaluation((zlib.crc32(knobs) % 1000) / 1000 * steps, int(plan.objectives["params"]), sleep)


def slow_stand_in(base, plan, task, fidelity, *, recipe, seed):
    return stand_in(base, plan, task, fidelity, recipe=recipe, seed=seed, sleep=1.0)


def tpe_search(evaluate, trials: int = 16, budget="5%", **options):
    """A 16-candidate tpe search on a tiny BERT and `tiny_task` by ``evaluate`` (a 20-step 1e-3
    recipe, in memory) within ``budget``: (plan, the study)."""
    import optuna

    from peftplan.planner.study import run_search
    from peftplan.recipe import Recipe
    from tests.zoo import bert_classifier

    storage = optuna.storages.InMemoryStorage()
    plan = run_search(
        bert_classifier(),
        budget,
        tiny_task(),
        strategy="tpe",
        trials=trials,
        storage=storage,
        study_name="s",
        evaluator=evaluate,
        progress=False,
        recipe=Recipe(lr=1e-3, steps=20),
        **options,
    )
    return plan, optuna.load_study(study_name="s", storage=storage)
