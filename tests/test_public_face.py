"""What importing and using peftplan leaves alone: the heavy libraries, torch's random state,
matplotlib's backend."""

from __future__ import annotations

import subprocess
import sys

import torch

import peftplan as pp
from tests import zoo


def test_import_peftplan_loads_no_optuna_botorch_or_matplotlib():
    code = "import sys, peftplan; print(sorted(m for m in ('optuna', 'botorch', 'matplotlib', 'plotly') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lower_leaves_the_global_random_state_alone():
    for model in (zoo.bert(), zoo.MLP(), zoo.CNN()):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        pp.lower(model)
        assert torch.equal(torch.get_rng_state(), before), type(model).__name__


def test_plotting_a_front_keeps_the_matplotlib_backend(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
from peftplan.planner.front import FrontPoint, ParetoFront
front = ParetoFront.from_points([FrontPoint({{"metric": 0.8, "params": 10.0}}, None, {{}})], {{"metric": "max", "params": "min"}})
front.plot({str(tmp_path / "f.png")!r})
print(matplotlib.get_backend())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
