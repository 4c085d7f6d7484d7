"""A study's database does not choose the code its workers run: a `Source` naming a
``package.module:factory`` is imported only when the worker's own caller allows that spec."""

from __future__ import annotations

import optuna
import pytest

from peftplan.planner import Budget
from peftplan.planner.study import Source, StudyError, run_worker
from peftplan.planner.study.config import ATTR, StudyConfig
from peftplan.planner.training.evaluate import Fidelity


class Imported(Exception):
    """Raised instead of loading: the worker got past the trust check."""


def _storage_naming(source: Source) -> optuna.storages.BaseStorage:
    storage = optuna.storages.InMemoryStorage()
    config = StudyConfig(
        "random",
        1,
        ("metric", "params"),
        {"metric": "max", "params": "min"},
        (Fidelity(),),
        {},
        Budget.coerce("1%").to_dict(),
        source=source,
    )
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    study.set_user_attr(ATTR, config.to_dict())
    return storage


@pytest.fixture
def no_import(monkeypatch):
    def load(self):
        raise Imported(self.factories())

    monkeypatch.setattr(Source, "load", load)


@pytest.mark.parametrize(
    "source, named",
    [
        (Source("os:system", "task"), "os:system"),
        (Source("minilm", "task", space="subprocess:run"), "subprocess:run"),
    ],
)
def test_a_worker_refuses_factories_it_was_not_told_to_trust(no_import, source, named):
    with pytest.raises(StudyError, match=f"asks its workers to import and run \\['{named}'\\].*--allow {named}"):
        run_worker(_storage_naming(source), progress=False)
    with pytest.raises(StudyError, match=named):  # allowing something else does not help
        run_worker(_storage_naming(source), progress=False, allow=["tests.zoo:llama"])


def test_an_allowed_factory_is_loaded(no_import):
    with pytest.raises(Imported, match="tests.zoo:llama"):
        run_worker(_storage_naming(Source("tests.zoo:llama", "task")), progress=False, allow=["tests.zoo:llama"])


def test_minilm_and_model_directories_need_no_allowance(no_import, tmp_path):
    with pytest.raises(Imported):
        run_worker(_storage_naming(Source("minilm", "task")), progress=False)
    with pytest.raises(Imported):
        run_worker(_storage_naming(Source(str(tmp_path), "task")), progress=False)
