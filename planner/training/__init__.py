"""Training and scoring plans: `Task` (batches, loss, metric), `train`, and `evaluate` at a `Fidelity`."""

from .evaluate import Evaluation, Fidelity, evaluate
from .task import Task, accuracy, classification_loss, mcc
from .train import TrainResult, train

__all__ = ["Evaluation", "Fidelity", "Task", "TrainResult", "accuracy", "classification_loss", "evaluate", "mcc",
           "train"]  # fmt: skip
