"""`ProgressLine`: one rich progress bar with extra fields, or nothing when disabled.

    >>> line = ProgressLine(False, "training", total=10, fields={"loss": float("nan")}, text="loss {loss:.3f}")
    >>> line.update(advance=1, loss=0.5); line.close()
"""

from __future__ import annotations

import re
from typing import Any


class ProgressLine:
    """Description, bar, done/total, ``text`` (formatted from ``fields``), time remaining."""

    def __init__(self, enabled: bool, description: str, total: int, *, fields: dict[str, Any], text: str,
                 transient: bool = False):  # fmt: skip
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            # "loss {loss:.3f}" -> "loss {task.fields[loss]:.3f}", rich's column syntax
            column = TextColumn(re.sub(r"\{(\w+)((?::[^}]*)?)\}", r"{task.fields[\1]\2}", text))
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), column,
                                TimeRemainingColumn(), transient=transient)  # fmt: skip
            self.bar.start()
            self.id = self.bar.add_task(description, total=total, **fields)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.id, **kwargs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
