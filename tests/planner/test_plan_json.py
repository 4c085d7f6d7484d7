import json
import os

import pytest

from peftplan.backends.base import PlanError
from peftplan.plan import FORMAT, VERSION
from peftplan.planner import Plan


def a_plan() -> Plan:
    return Plan(
        sites={
            "layers.0.q": {
                "method": "lora",
                "rank": 8,
                "alpha": 16,
                "role": "attn.q",
                "depth": 0.0,
                "op": "linear",
                "shape": [32, 32],
            },
            "head": {"method": "full", "role": "head", "depth": 1.0, "op": "linear", "shape": [32, 2]},
        },
        model={"fingerprint": "abc", "class": "Toy", "n_sites": 5},
        budget={"params": "0.5%"},
        objectives={"params": 578},
        provenance={"strategy": "proxy", "seed": 0},
    )


def test_dict_round_trip():
    plan = a_plan()
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.to_dict() == plan.to_dict()
    assert plan.to_dict()["format"] == FORMAT and plan.to_dict()["version"] == VERSION


def test_save_load_is_byte_stable_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "plan.json"
    a_plan().save(path)
    first = path.read_bytes()
    Plan.load(path).save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "plan.json"]
    assert Plan.load(path) == a_plan()


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    a_plan().save(path)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    plan = a_plan()
    plan.objectives["params"] = 1
    with pytest.raises(OSError, match="disk full"):
        plan.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something.else"}, "not a peftplan plan"),
        ({"version": 99}, "version 99 is not supported"),
        ({"sites": {"q": {"method": "magic", "rank": 2}}}, "unknown method 'magic'"),
        ({"sites": {"q": {"rank": 2}}}, "has no 'method'"),
        (
            {"sites": {"q": {"method": "lora", "rank": 2, "alpha": 4, "width": 3}}},
            r"no hyper-parameter\(s\) \['width'\]",
        ),
        ({"sites": {"q": "lora"}}, "entry must be an object"),
        ({"sites": ["q"]}, "must map site names"),
    ],
)
def test_bad_plan_dicts_say_what_is_wrong(change, message):
    d = {**a_plan().to_dict(), **change}
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(d)


@pytest.mark.parametrize("field", ["model", "sites"])
def test_missing_fields_are_named(field):
    d = a_plan().to_dict()
    del d[field]
    with pytest.raises(PlanError, match=f"missing field.*{field}"):
        Plan.from_dict(d)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan file"):
        Plan.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(PlanError, match="JSON object"):
        Plan.load(tmp_path / "list.json")


def test_summary_lists_methods_and_ranks():
    assert a_plan().summary() == "full: 1 site; lora: 1 site, rank 8 (params=578)"
