"""Training and scoring plans: `Task` (batches, loss, metric), `train`, and `evaluate` at a `Fidelity`."""

from .classification import accuracy, classification_loss, mcc
from .evaluate import Evaluation, Fidelity, evaluate
from .task import Task
from .train import TrainResult, train

__all__ = [
    "Evaluation",
    "Fidelity",
    "Task",
    "TrainResult",
    "accuracy",
    "classification_loss",
    "evaluate",
    "mcc",
    "train",
]
