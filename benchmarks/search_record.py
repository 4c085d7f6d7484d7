"""What a benchmark keeps of a search: each completed trial (`trial_point`), the optimizer
steps it cost (`trial_steps`), the planner tree it ran under (`planner_tree`, compared by
`search_code`), and a line a minute while it runs (`tick`). Shared by the quality and the
language-model studies."""

from __future__ import annotations

import threading
import time

from common import ROOT


def trial_point(t) -> dict:
    """What a search record keeps of completed trial ``t``: its measured objectives (a screen
    tells the sampler minus its loss instead of its metric: `peftplan.planner.study.policy.told`)."""
    from peftplan.planner.study.policy import measured_values

    values = measured_values(t)
    return {
        "trial": t.number,
        "rung": t.user_attrs.get("rung", 0),
        "metric": values[0],
        "params": values[1],
        "baseline": t.user_attrs.get("baseline"),
        "lr": t.user_attrs.get("plan", {}).get("recipe", {}).get("lr"),
        "reused": "reused" in t.user_attrs,
        "refined": "refines" in t.user_attrs,
        "validation_loss": t.user_attrs.get("validation_loss"),
        "proposed": "fixed_params" not in t.system_attrs,  # the sampler's own, not queued (a seed, a promotion)
    }


NEUTRAL = {  # planner files no benchmark search's result depends on
    "front/plot.py",  # how a front is drawn
    "study/watch.py",  # heartbeats and the trial time limit, which no benchmark sets
}


def planner_tree() -> str:
    """The git tree of planner/ at HEAD, recorded with each search: one stored under a tree
    whose search code differs (`search_code`) is run again, since any such change may change
    what the default search returns, unless ``--stored`` asks for the stored results as they are."""
    return git("rev-parse", "HEAD:planner").strip() or "unknown"


def search_code(tree: str) -> str | None:
    """The files of planner tree ``tree`` (path and blob) that a search's result depends on:
    all but `NEUTRAL`; None where git does not know ``tree``."""
    listing = git("ls-tree", "-r", tree)
    return (
        "\n".join(line for line in listing.splitlines() if line.split("\t", 1)[-1] not in NEUTRAL) if listing else None
    )


def code_differs(tree: str | None) -> bool:
    """Whether a search stored under planner tree ``tree`` (None or "": unrecorded, or unknown
    to git) ran other search code than HEAD's."""
    code = search_code(tree) if tree else None
    return code is None or code != search_code(planner_tree())


def git(*args: str) -> str:
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def trial_steps(t, final: int) -> int:
    fidelity = t.user_attrs.get("fidelity", "")
    if fidelity.endswith("of the recipe"):
        return max(1, round(float(fidelity.split("%")[0]) / 100 * final))
    if fidelity.endswith(" steps"):
        return int(fidelity.split()[0])
    return final


def tick(key: str, storage, study_name: str, stop: threading.Event, start: float, every: float = 60.0) -> None:
    """Print, every ``every`` seconds until ``stop``, how many trials of the search running in
    ``storage`` are done and the best validation metric among them: a search takes half an hour."""
    import optuna

    from peftplan.planner.study.policy import measured_values

    while not stop.wait(every):
        try:
            trials = storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False)
        except KeyError:  # the study is not created yet
            continue
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f", best validation metric {max(measured_values(t)[0] for t in done):.4f}" if done else ""
        print(f"  {key}: {len(done)} trials done{best}, {(time.perf_counter() - start) / 60:.1f} min", flush=True)
