"""Studies: multi-objective search as an optuna study that survives crashes and is shared by
workers — its config, storage, trial engine, promotion and refinement policy, progress display,
successive halving and entry points."""

from .config import Source, StudyConfig, StudyError, load_tokenizer
from .halving import halving_rungs, promote
from .run import best_plan, run_search, run_worker, study_front
from .storage import only_study, open_storage, open_study, resumed_config, stored_config, study_names

__all__ = [
    "Source",
    "StudyConfig",
    "StudyError",
    "best_plan",
    "halving_rungs",
    "load_tokenizer",
    "only_study",
    "open_storage",
    "open_study",
    "promote",
    "resumed_config",
    "run_search",
    "run_worker",
    "stored_config",
    "study_front",
    "study_names",
]
