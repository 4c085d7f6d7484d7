"""Study databases edited by hand, read-only or not databases at all: `peftplan front`,
`worker` and `search` exit with a message naming the study, the database and the field or
trial, and the fix — no traceback, no trial left RUNNING, the database as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3

import pytest

from peftplan.cli import main
from tests.planner.trials import write_task

MODEL = "tests.zoo:minilm_vocab_classifier"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A finished two-trial study (real training, 2 steps each) and the task folder it reads."""
    folder = tmp_path_factory.mktemp("study")
    task = write_task(folder / "task")
    argv = [
        "search",
        MODEL,
        "--task",
        str(task),
        "--tokenizer",
        "minilm",
        "--budget",
        "1%",
        "--strategy",
        "random",
        "--trials",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--storage",
        f"sqlite:///{folder / 'study.db'}",
        "--threads",
        "1",
        "-q",
        "-o",
        str(folder / "plan.json"),
        "--rungs",
        "1",
        "--refine",
        "0",
        "--lr-range",
        "none",
    ]
    assert main(argv) == 0
    return folder / "study.db", argv


@pytest.fixture
def db(stored, tmp_path):
    path = tmp_path / "study.db"
    shutil.copy(stored[0], path)
    return path


def edit(path, table: str, key: str, change) -> None:
    """Rewrite one stored attribute by hand, as a user with sqlite3 would."""
    with sqlite3.connect(path) as conn:
        where = "key = ?" + (
            " AND trial_id = (SELECT trial_id FROM trials WHERE number = 0)" if table.startswith("trial") else ""
        )
        (value,) = conn.execute(f"SELECT value_json FROM {table} WHERE {where}", (key,)).fetchone()
        conn.execute(f"UPDATE {table} SET value_json = ? WHERE {where}", (json.dumps(change(json.loads(value))), key))


def states(path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def run(argv, capsys) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return out.err


def method(name):
    def change(plan):
        plan["sites"][next(iter(plan["sites"]))]["method"] = name
        return plan

    return change


def test_a_trial_plan_naming_an_unknown_method_names_the_trial_and_database(db, capsys):
    edit(db, "trial_user_attributes", "plan", method("zzz"))
    before = db.read_bytes()
    err = run(["front", f"sqlite:///{db}"], capsys)
    assert f"in sqlite:///{db}: trial 0's stored plan: unknown method 'zzz'; known methods: [" in err
    assert "the database was edited or written by another program: restore it, or start a new study" in err
    assert db.read_bytes() == before


def test_a_huge_method_name_is_not_echoed_whole(db, capsys):
    edit(db, "trial_user_attributes", "plan", method("x" * 10_000_000))
    err = run(["front", f"sqlite:///{db}"], capsys)
    assert len(err) < 2_000 and "trial 0's stored plan: unknown method 'xxx" in err and "more characters)" in err


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            lambda c: {**c, "recipe": {**c["recipe"], "lr": -1}, "trials": 3},
            r"the study's config field 'recipe' is .*Recipe\(lr=-1\): the learning rate must be a positive number",
        ),
        (
            lambda c: {
                **c,
                "fidelities": [{"steps": None, "train_batches": None, "eval_batches": None, "share": float("nan")}],
                "trials": 3,
            },
            r"the study's config field 'fidelities' is .*Fidelity\(share=nan\)",
        ),
        (lambda c: "hello", r"the study's config is str 'hello', not an object of fields \['budget'"),
    ],
)
def test_a_damaged_study_config_stops_the_worker_naming_the_database_and_field(db, capsys, change, problem):
    edit(db, "study_user_attributes", "peftplan", change)
    before = states(db)
    err = run(["worker", f"sqlite:///{db}", "-q", "--allow", MODEL, "-o", str(db.parent / "w.json")], capsys)
    assert "peftplan worker: error: study 'task-random-" in err and f"in sqlite:///{db}: " in err
    assert re.search(problem, err) and "restore it, or start a new study" in err
    assert states(db) == before  # no trial asked, none left RUNNING
    assert re.search(problem, run(["front", f"sqlite:///{db}"], capsys))


def test_a_search_on_a_read_only_database_says_so(stored, db, capsys):
    before = db.read_bytes()
    argv = [a if not a.startswith("sqlite:///") else f"sqlite:///file:{db}?mode=ro&uri=true" for a in stored[1]]
    argv[argv.index("--trials") + 1] = "3"  # one more trial to write
    err = run(argv, capsys)
    assert (
        f"cannot write to the storage sqlite:///file:{db}?mode=ro&uri=true (attempt to write a readonly database)"
        in err
    )
    assert "give a storage this process may write" in err and "exceeding max length" not in err
    assert db.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a file whatever its mode; the URL test covers read-only")
def test_a_search_on_a_database_this_user_may_not_write_says_so_up_front(stored, db, capsys):
    db.chmod(0o444)
    argv = [a if not a.startswith("sqlite:///") else f"sqlite:///{db}" for a in stored[1]]
    err = run(argv, capsys)
    assert f"this process may not write {db}" in err


def test_front_on_a_file_that_is_not_a_database(tmp_path, capsys):
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    err = run(["front", f"sqlite:///{tmp_path / 'junk.db'}"], capsys)
    assert f"cannot open the study storage 'sqlite:///{tmp_path / 'junk.db'}': file is not a database" in err
