"""The README's demo (`make demo`), shrunk to seconds (slow: real model, real data): every
stage runs, the files it promises exist, and no row exceeds the budget peft's LoRA sets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import peftplan as pp

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "text" / "sst2"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "train.tsv").exists(), reason=f"shared data not found at {DATA}"),
]


def test_demo_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sst2_demo", ROOT / "examples" / "sst2_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    threads = torch.get_num_threads()
    try:
        rc = demo.main(
            [
                "--steps",
                "4",
                "--max-dev",
                "32",
                "--trials",
                "5",
                "--max-train",
                "64",
                "--validation",
                "16",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("plan.json", "front.png", "front.html", "adapters/plan.json", "adapters/adapters.safetensors"):
        assert (tmp_path / name).is_file(), f"the demo did not write {name}"
    plan = pp.Plan.load(tmp_path / "plan.json")
    assert plan.objectives["params"] <= plan.budget["params"]
    assert plan.provenance["strategy"] in out and "peft LoRA r=8 on query,value" in out
    assert "peft LoRA r=8 on query,value, lr tuned" in out and "Where the gain comes from" in out
    assert plan.provenance["rung"] == 1 and plan.recipe.steps == 4  # chosen at the full recipe, which it carries
