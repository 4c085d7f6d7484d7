"""What a search says while it runs: the trainings it plans (``+N refinements`` among them),
"resuming: N of M trainings done" when the study has some already, then on a terminal a bar
(trainings done of planned, the front's size and hypervolume, time left) and elsewhere (a log
file, ``nohup``, a notebook) one plain line per finished trial:

    trial 5 · short run (12 steps) · 1,536 trainable params · metric 0.8125 · loss 0.412 · lr 0.0025 · 0.4 s · 6 of 8 done, about 3 s left

The planned total is `policy.workload`: it grows when the policy adds work (a failed screen's
slot filled again) and is the count of trainings run once the study is done.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ...recipe import Recipe
from ..training.progress import ProgressLine, duration, on_terminal, remaining, say
from ..training.task import Task
from .policy import front_of, measured, rung_of, workload


class StudyDisplay:
    """The progress of one worker on ``study``; ``verb`` says how it meets a study with
    trainings done ("resuming", "joining")."""

    def __init__(self, enabled: bool, config: Any, task: Task, study: optuna.Study, verb: str = "resuming"):
        self.enabled, self.config, self.task = enabled, config, task
        trials = study.get_trials(deepcopy=False)
        self.planned = workload(config, trials)
        self.seen = {t.number for t in trials if _finished(t)}  # said before this process started
        self.start, self.ran = time.monotonic(), 0
        self.bar = ProgressLine(
            enabled and on_terminal(),
            study.study_name,
            self.planned.total,
            lines=False,
            fields={"front": 0, "hv": "–"},
            text="{front} on the front · hypervolume {hv}",
        )
        if not enabled:
            return
        if self.planned.done:
            say(f"{verb}: {self.planned.done} of {self.planned.total} trainings done ({self.planned})")
        else:
            say(f"study {study.study_name}: {self.planned.total} trainings planned ({self.planned})")

    def show(self, trials: list[FrozenTrial], *, final: bool = False) -> None:
        """Bring the display up to ``trials``; ``final``: the study is done, the total is what ran."""
        if not self.enabled:
            return
        now = workload(self.config, trials)
        total = now.done if final else now.total
        if self.bar.enabled:
            self.bar.update(completed=now.done, total=total, **self._front(trials))
        else:
            new = [t for t in trials if _finished(t) and t.number not in self.seen]  # in number order
            for i, t in enumerate(new, start=now.done - len(new) + 1):
                self.seen.add(t.number)
                self.ran += 1
                pace = self.time_left(trials, now) or remaining(
                    time.monotonic() - self.start, self.ran, self.ran + total - i
                )
                grew = (
                    [f"{now.total - self.planned.total} more planned: {now}"] if now.total > self.planned.total else []
                )
                say(" · ".join(self.describe(t) + [f"{i} of {total} done" + (f", {pace}" if pace else "")] + grew))
                self.planned = now
        if final and not self.bar.enabled and self.ran:
            say(f"study done: {now.done} trainings, {duration(time.monotonic() - self.start)} in this run")
        self.planned = now

    def steps(self, rung: int) -> int:
        """Training steps of a run at ``rung``."""
        batches = len(self.task.train_batches)
        recipe = Recipe.from_dict(self.config.recipe)
        return self.config.fidelities[rung].recipe(recipe, batches).total_steps(batches)

    def time_left(self, trials: list[FrozenTrial], now: Any) -> str:
        """About how long the planned trainings not finished yet take, each as the scoring the
        finished ones spent outside training (the same at every rung) plus its steps at their
        training pace — a full run is not a short one; "" where no trial said its training time."""
        timed = [t for t in trials if t.state == TrialState.COMPLETE and "train_seconds" in t.user_attrs]
        if not timed:
            return ""
        per_step = sum(t.user_attrs["train_seconds"] for t in timed) / sum(self.steps(rung_of(t)) for t in timed)
        outside = sum(t.user_attrs["seconds"] - t.user_attrs["train_seconds"] for t in timed) / len(timed)
        placed = [t for t in trials if _finished(t) and "refines" not in t.user_attrs]
        top = len(now.rungs) - 1
        left = [(n - sum(rung_of(t) == r for t in placed), r) for r, n in enumerate(now.rungs)]
        left.append((now.refinements - sum(_finished(t) and "refines" in t.user_attrs for t in trials), top))
        seconds = sum(max(0, n) * (outside + self.steps(r) * per_step) for n, r in left)
        return f"about {duration(seconds)} left" if seconds > 0 else ""

    def describe(self, t: FrozenTrial) -> list[str]:
        """A finished trial in words: its rung as a run length, params, metric, lr, time."""
        config, top = self.config, len(self.config.fidelities) - 1
        run = f"{'full' if rung_of(t) == top else 'short'} run ({self.steps(rung_of(t))} steps)"
        run += ", refining the best plan's learning rate" if "refines" in t.user_attrs else ""
        run += f", trial {t.user_attrs['retries']} again (interrupted)" if "retries" in t.user_attrs else ""
        said = [f"trial {t.number}", run]
        if "params" in t.user_attrs.get("costs", {}):
            said.append(f"{t.user_attrs['costs']['params']:,.0f} trainable params")
        if t.state == TrialState.FAIL:
            return said + [f"failed: {t.user_attrs.get('failed', 'its worker died')}"]
        said += [f"{k} {v:.4g}" for k, v in measured(t, config).items() if k != "params"]
        if "validation_loss" in t.user_attrs:
            said.append(f"loss {t.user_attrs['validation_loss']:.4g}")
        said.append(f"lr {t.params.get('lr', Recipe.from_dict(config.recipe).lr):.3g}")
        reused = t.user_attrs.get("reused")
        return said + [
            f"reused trial {reused}'s result" if reused is not None else duration(t.user_attrs.get("seconds", 0.0))
        ]

    def _front(self, trials: list[FrozenTrial]) -> dict[str, Any]:
        """The front's size and hypervolume (reference: the worst of its rung, the limits)."""
        config = self.config
        front = front_of(trials, config)
        if not len(front):
            return {"front": 0, "hv": "–"}
        rung = front.points[0].info["rung"]
        seen = [measured(t, config) for t in trials if t.state == TrialState.COMPLETE and rung_of(t) == rung]
        worst = {k: (min if s == "max" else max)(v[k] for v in seen) for k, s in front.senses.items()}
        ref = {**worst, **{k: v for k, v in config.limits.items() if k in worst}}
        return {"front": len(front), "hv": f"{front.hypervolume(ref):.4g}"}

    def close(self) -> None:
        self.bar.close()


def _finished(t: FrozenTrial) -> bool:
    """A training that ended: completed, or failed for good (not cut off by an interrupt)."""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
