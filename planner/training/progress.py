"""`ProgressLine`: on a terminal one rich progress bar with extra fields; elsewhere (a log file,
``nohup``, a notebook) a plain line on stderr at every tenth of the work; nothing when disabled.

    >>> line = ProgressLine(False, "training", total=10, fields={"loss": float("nan")}, text="loss {loss:.3f}")
    >>> line.update(advance=1, loss=0.5); line.close()
    >>> duration(0.42), duration(75.4), duration(4000)
    ('0.4 s', '75 s', '1 h 7 min')
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any


def on_terminal() -> bool:
    """Whether stderr, where progress goes, is a terminal a live bar can redraw."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def say(line: str) -> None:
    """Print one line of progress on stderr, flushed (a log file shows it at once)."""
    print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """Seconds as a person reads them: "0.4 s", "42 s", "12 min", "1 h 7 min"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 100:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def remaining(elapsed: float, done: int, total: int) -> str:
    """ "about 3 min left" at the pace so far, or "" before anything finished."""
    return f"about {duration(elapsed / done * (total - done))} left" if done and total > done else ""


class ProgressLine:
    """Description, bar, done/total, ``text`` (formatted from ``fields``), time remaining — or,
    off a terminal, the same as a plain line at every tenth of ``total`` (``lines=False``: none,
    for a caller that prints its own)."""

    def __init__(
        self,
        enabled: bool,
        description: str,
        total: int,
        *,
        fields: dict[str, Any],
        text: str,
        transient: bool = False,
        lines: bool = True,
    ):
        self.bar = None
        self.description, self.total, self.fields, self.text = description, total, dict(fields), text
        self.completed, self.start, self.lines = 0, time.monotonic(), enabled and lines and not on_terminal()
        if enabled and on_terminal():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            # "loss {loss:.3f}" -> "loss {task.fields[loss]:.3f}", rich's column syntax
            column = TextColumn(re.sub(r"\{(\w+)((?::[^}]*)?)\}", r"{task.fields[\1]\2}", text))
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                column,
                TimeRemainingColumn(),
                transient=transient,
                console=Console(stderr=True),
            )
            self.bar.start()
            self.id = self.bar.add_task(description, total=total, **fields)

    @property
    def enabled(self) -> bool:
        return self.bar is not None or self.lines

    def update(
        self, *, advance: int = 0, completed: int | None = None, total: int | None = None, **fields: Any
    ) -> None:
        before = self.completed
        self.completed = self.completed + advance if completed is None else completed
        self.total = self.total if total is None else total
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(self.id, completed=self.completed, total=self.total, **fields)
        elif self.lines and self.total and self.completed * 10 // self.total > before * 10 // self.total:
            elapsed = time.monotonic() - self.start
            said = [
                f"{self.description}: {self.completed} of {self.total}",
                self.text.format(**self.fields),
                f"{duration(elapsed)} elapsed",
                remaining(elapsed, self.completed, self.total),
            ]
            say(" · ".join(s for s in said if s))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
