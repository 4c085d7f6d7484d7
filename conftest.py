"""Runs the docstring examples of the source folders, each module imported by its installed name.

setuptools installs ``ir/`` as ``peftplan.ir`` (``planner/`` and ``backends/`` likewise), so
``ir/site.py`` is ``peftplan.ir.site``. pytest's own ``--doctest-modules`` would import it as a
top-level ``ir.site``, where the relative imports reaching across packages
(``from ..backends.base import …``) fail and every class would exist twice. Collected here
instead: the folders as plain directories (pytest would import their ``__init__.py`` under the
folder's name) and each module through `importlib` under its installed name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from _pytest.doctest import DoctestModule

ROOT = Path(__file__).parent
PACKAGES = {"peftplan": "peftplan", "ir": "peftplan.ir", "planner": "peftplan.planner", "backends": "peftplan.backends"}


def installed_name(path: Path) -> str | None:
    """``planner/proxy/scores.py`` → ``peftplan.planner.proxy.scores``; None outside the packages."""
    parts = path.relative_to(ROOT).with_suffix("").parts if path.is_relative_to(ROOT) else ()
    if not parts or parts[0] not in PACKAGES:
        return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGES[parts[0]], *parts[1:]))


class InstalledDoctestModule(DoctestModule):
    def _getobj(self):
        return importlib.import_module(installed_name(self.path))


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.is_relative_to(ROOT) and path != ROOT and installed_name(path / "__init__.py"):
        return pytest.Dir.from_parent(parent, path=path)
    return None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".py" and installed_name(file_path) and not parent.session.isinitpath(file_path):
        return InstalledDoctestModule.from_parent(parent, path=file_path)
    return None


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """A source module named on the command line (``pytest planner/study/halving.py``), which
    pytest would import as a test module: its docstring examples, as in a folder."""
    if installed_name(module_path):
        return InstalledDoctestModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(autouse=True)
def _registrations_end_with_their_example(request: pytest.FixtureRequest):
    """A method a docstring example registers (``backends/base.py`` shows how) is gone after it,
    so that tests iterating over the registered methods do not meet it."""
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    from peftplan.backends import base

    before = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(before)


@pytest.fixture(autouse=True)
def _doctest_models(request: pytest.FixtureRequest):
    """Tiny offline stand-ins the docstring examples use: ``chat_tokenizer()`` and
    ``char_tokenizer()`` (one token per character; the first with a chat template),
    ``tiny_llama()`` (a 2-layer Llama with random weights), ``tiny_bert()`` (a seeded 2-layer
    BERT classifier whose vocabulary holds the character tokenizer's ids) and ``tiny_task()``
    (a learnable classification task of token ids for it), ``tiny_gguf(path)`` (a tiny Llama
    written as a GGUF file, the way llama.cpp's converter writes one). Examples run in an empty
    temporary folder, so that the files they write (``save(model, "adapter_dir")``) go there, and
    on one thread: tiny models train fastest so, where a busy machine's other threads contend."""
    if isinstance(request.node, pytest.DoctestItem):
        import torch

        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
        from tests import zoo
        from tests.planner.trials import tiny_task

        request.getfixturevalue("doctest_namespace").update(
            chat_tokenizer=zoo.chat_tokenizer,
            char_tokenizer=zoo.char_tokenizer,
            tiny_llama=zoo.llama,
            tiny_bert=zoo.bert_classifier,
            tiny_task=tiny_task,
            tiny_gguf=_tiny_gguf,
        )
    yield


def _tiny_gguf(path: str = "tiny.gguf") -> Path:
    from tests import gguf_files

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return gguf_files.write_llama(Path(path), gguf_files.tiny_llama())
