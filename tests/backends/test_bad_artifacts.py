"""Artifacts and model folders under bad input: saving through symbolic links, the files' modes
against another account, a quantized module, a model folder whose weights are a pickle — each
done or refused with a message naming the path and the fix, nothing left half-written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import peftplan as pp
from peftplan.backends import PlanError, export_peft
from tests.backends.adapters import plan_for, randomize


def tuned() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pp.apply(model, plan_for(model, {"0": {"method": "lora", "rank": 2}}))
    randomize(model)
    return model


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_saving_into_a_link_to_a_folder_writes_the_folder_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    model, x = tuned(), torch.randn(3, 8)
    pp.save(model, tmp_path / "link")
    pp.save(model, tmp_path / "link")  # again: the artifact there is replaced as a whole
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(tmp_path / "real")
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["adapters.safetensors", "plan.json"]
    assert torch.equal(pp.load(fresh(), tmp_path / "link")(x), model(x))


def test_saving_into_a_dangling_link_says_so_and_creates_nothing(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(
        PlanError, match=f"link is a symbolic link to {tmp_path / 'gone'}, which does not exist: create that folder"
    ):
        pp.save(tuned(), tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"] and not (tmp_path / "gone").exists()


@pytest.mark.parametrize("write", [pp.save, export_peft])
def test_artifact_files_are_as_readable_as_the_umask_says(tmp_path, write):
    old = os.umask(0o022)
    try:
        write(tuned(), tmp_path / "out")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
        assert set(modes.values()) == {0o644}, modes  # the weights were 0600 beside a 0644 plan.json
        weights = next(p for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors")
        weights.chmod(0o640)  # a mode the owner chose is kept by the next save
        write(tuned(), tmp_path / "out")
        assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_quantized_linear_is_named_as_such_and_the_model_left_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 4)
    before = model(x)
    with pytest.raises(
        PlanError,
        match=r"0: a quantized Linear \(torch.ao.nn.quantized.dynamic.*\), which adapters cannot "
        r"wrap: plan and apply on the floating-point model, then quantize",
    ):
        pp.apply(model, pp.Plan(sites={"0": {"method": "lora", "rank": 2}}))
    assert not hasattr(model, "peftplan_plan") and torch.equal(model(x), before)


PICKLE = """
import torch
class Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))
torch.save({{"weight": Payload()}}, {path!r})
"""


def test_a_model_folder_whose_weights_are_a_pickle_says_convert_to_safetensors(tmp_path, capsys):
    from peftplan.cli import main
    from tests.zoo import bert

    bert().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PICKLE.format(path=str(tmp_path / "pytorch_model.bin")))], check=True
    )
    weights = (tmp_path / "pytorch_model.bin").read_bytes()
    assert main(["lower", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert f"{tmp_path}: its weights ['pytorch_model.bin'] are a pickle checkpoint" in out.err
    assert "it asks to import print" in out.err and "Convert it to safetensors" in out.err
    assert "Traceback" not in out.err and "PAYLOAD RAN" not in out.out + out.err  # nothing was run
    assert (tmp_path / "pytorch_model.bin").read_bytes() == weights
