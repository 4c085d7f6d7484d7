"""The command line, run in-process through its entry point."""

from __future__ import annotations

import json

import pytest

import peftplan as pp
from peftplan.cli import main
from peftplan.ir import SiteGraph
from tests import zoo


def test_lower_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "graph.json"
    assert main(["lower", "tests.zoo:llama", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("LlamaForCausalLM: 21 sites, 2 blocks")
    assert "model.layers.1.mlp.down_proj" in text and "mlp.gate" in text
    graph = SiteGraph.from_dict(json.loads(out.read_text()))
    assert graph.fingerprint == pp.lower(zoo.llama()).fingerprint


def test_plan_writes_a_plan_that_applies(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "tests.zoo:bert", "--budget", "5%", "-o", str(out)]) == 0
    plan = pp.Plan.load(out)
    model = zoo.bert()
    limit = pp.Budget(params="5%").param_limit(pp.lower(model).total_params)
    assert 0.95 * limit <= plan.objectives["params"] <= limit
    pp.apply(model, plan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.objectives["params"]
    assert "lora:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["lower", "no.such.module:factory"], "cannot load model factory"),
        (["lower", "/nonexistent/dir"], "cannot resolve model"),
        (["plan", "tests.zoo:bert", "--budget", "0.5"], "cannot read budget"),
        (["plan", "tests.zoo:bert", "--budget", "1"], "cheapest plan"),
        (["plan", "tests.zoo:bert", "--budget", "5%", "--adapter-bytes", "100"], "other limits (adapter_bytes"),
        (["plan", "tests.zoo:bert", "--budget", "5%", "--memory", "lots"], "string with a unit"),
    ],
)
def test_errors_are_reported_not_raised(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_lower_a_local_hf_directory(tmp_path, capsys):
    zoo.bert().save_pretrained(tmp_path)
    assert main(["lower", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("BertModel: 21 sites, 2 blocks")
