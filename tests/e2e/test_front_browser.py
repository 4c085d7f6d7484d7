"""The front as people look at it: ``front.html`` rendered by headless Chromium (its points
drawn inside the plot area, its data in the page), and a stored study read by optuna-dashboard
through its WSGI app, as ``optuna-dashboard sqlite:///study.db`` would serve it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from wsgiref.util import setup_testing_defaults

import pytest

import peftplan as pp
from tests.planner.trials import tiny_task
from tests.zoo import bert_classifier

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
RETURNED_RED = (214, 39, 40)  # the star of the returned plan (planner/front/plot.py)
FRONT_BLUE = (31, 119, 180)  # the front's markers (plot.py)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{folder / 'study.db'}"
    plan = pp.search(
        bert_classifier(),
        "5%",
        tiny_task(),
        strategy="random",
        trials=5,
        seeds=0,
        storage=url,
        recipe=pp.Recipe(lr=3e-3, steps=6),
        progress=False,
    )
    return folder, url, plan


def browser(*args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium here (apt-get install chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1000,700",
        "--virtual-time-budget=10000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow  # starts a browser
def test_front_html_draws_every_point_in_a_real_browser(study):
    from PIL import Image

    folder, _, plan = study
    front = plan.front
    page = front.plot(folder / "front.html", markers={"hand-tuned LoRA": {"metric": 0.5, "params": 1200}})
    dom = browser("--dump-dom", page.as_uri()).stdout
    drawn = len(re.findall(r'<path class="point"', dom))
    assert (
        drawn == len(front.evaluated) + 2
    )  # each evaluated trial once (the front's in its own layer), the returned plan's star, the marker
    area = re.search(
        r'<rect class="nsewdrag drag"[^>]*?x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', dom
    )
    assert area, "the page has no plot area: plotly did not render"
    x0, y0, w, h = (float(v) for v in area.groups())
    html = page.read_text()
    for p in front:  # the plot's data is in the page
        assert re.search(rf"[\[,]{p.values['params']:g}[\],]", html.replace(".0,", ",").replace(".0]", "]"))

    browser(f"--screenshot={folder / 'shot.png'}", page.as_uri())
    shot = Image.open(folder / "shot.png").convert("RGB")
    inside = [shot.getpixel((x, y)) for x in range(int(x0), int(x0 + w)) for y in range(int(y0), int(y0 + h))]
    blue = sum(all(abs(c - t) < 30 for c, t in zip(px, FRONT_BLUE)) for px in inside)
    red = sum(all(abs(c - t) < 30 for c, t in zip(px, RETURNED_RED)) for px in inside)
    assert red > 60  # the returned plan's star (18 px across), drawn over its front marker
    assert blue >= 40 * (len(front) - 1)  # every other front marker (10 px across) drawn inside the axes
    background = sum(px == (255, 255, 255) for px in inside)
    assert background > 0.5 * len(inside)  # and the page is a plot, not a blue page


def _get(app, path: str) -> tuple[str, bytes]:
    env: dict = {}
    setup_testing_defaults(env)
    env["PATH_INFO"], _, env["QUERY_STRING"] = path.partition("?")
    status = {}

    def start(line, headers, exc_info=None):
        status["line"] = line

    body = b"".join(app(env, start))
    return status["line"], body


def test_a_stored_study_opens_in_optuna_dashboard(study):
    import optuna
    import optuna_dashboard

    _, url, plan = study
    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(url))
    line, body = _get(app, "/api/studies")
    assert line == "200 OK"
    (summary,) = json.loads(body)["study_summaries"]
    assert summary["study_name"] == plan.provenance["study"] and summary["directions"] == ["maximize", "minimize"]
    line, body = _get(app, f"/api/studies/{summary['study_id']}?after=0")
    detail = json.loads(body)
    stored = optuna.load_study(study_name=summary["study_name"], storage=url)
    assert line == "200 OK" and len(detail["trials"]) == len(stored.trials)
    assert detail["objective_names"] == ["metric", "params"]  # named axes, not "Objective 0"
    best = {tuple(t["values"]) for t in detail["best_trials"]}
    assert {(p.values["metric"], p.values["params"]) for p in plan.front} <= best
    assert _get(app, "/dashboard")[0] == "200 OK"  # the page itself is served
