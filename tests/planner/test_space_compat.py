"""Studies stored by earlier versions resume: a resumed or promoted trial rebuilds its plan from
its stored knobs, so each space keeps its knob names and ranges and maps stored knobs to the
same plans. ``data/stored_spaces.json`` holds what the spaces below gave before they read the
method registry (commit 6fad440, when the allocator named its methods): their knobs, and the
plans of 16 random settings and 4 seeds each. It is a record of the past, not regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.distributions import distribution_to_json

from peftplan.plan import Plan
from peftplan.planner.space import AllocatorSpace, GroupedSpace
from tests.planner.test_space import ALL, LIMIT, scores_for, small_graph

STORED = json.loads((Path(__file__).parent / "data" / "stored_spaces.json").read_text())


def spaces():
    graph = small_graph()
    scores = scores_for(graph)
    uniform = {s.name: 1.0 for s in graph if s.role != "head"}
    return {
        "allocator-all": AllocatorSpace(graph, scores, LIMIT, methods=ALL, train_modules=["head"], lr=(1e-4, 1e-2)),
        "allocator-ranked": AllocatorSpace(
            graph, scores, LIMIT, methods=("lora", "dora", "sparse", "moe_lora"), priors={"uniform": uniform}
        ),
        "allocator-lora": AllocatorSpace(graph, scores, LIMIT),
        "grouped-all": GroupedSpace(
            graph, LIMIT, methods=(*ALL, "adapter"), group_by="role+depth", train_modules=["head"]
        ),
    }


@pytest.mark.parametrize("name", sorted(STORED))
def test_stored_knobs_give_the_stored_plans(name):
    space, stored = spaces()[name], STORED[name]
    knobs = {k: json.loads(distribution_to_json(d)) for k, d in space.distributions().items()}
    assert list(knobs) == list(stored["knobs"]) and knobs == stored["knobs"]  # names, order and ranges
    methods = set()
    for record in stored["plans"]:
        plan = space.plan_from_params(record["params"])
        assert {n: {"method": e["method"], **Plan.hyper(e)} for n, e in plan.sites.items()} == record["sites"]
        methods |= {e["method"] for e in record["sites"].values()}
    assert methods >= {"lora"} | ({"dora", "sparse", "moe_lora"} if name != "allocator-lora" else set())
