"""`Plan`: per-site PEFT choices as versioned, human-readable JSON (no pickle).

    >>> plan = Plan(sites={"encoder.layer.0.attention.self.query":
    ...                    {"method": "lora", "rank": 8, "alpha": 16, "role": "attn.q", "depth": 0.0}})
    >>> Plan.from_dict(plan.to_dict()).sites == plan.sites
    True

Site entries spell hyper-parameters flat next to ``method``; ``role``, ``depth``, ``op`` and
``shape`` describe the site (for checking and re-targeting) and are not hyper-parameters.
``recipe`` is how the plan was trained when it was found (`Recipe`), so that whoever applies it
trains it the same way. Version 1 files (before recipes) are read as plans without one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.atomic import write_atomic
from .backends.base import PlanError, get_method
from .backends.lora import START_LABELS
from .backends.peft_config import axolotl_yaml, lora_entries, peft_config
from .describe import provenance
from .recipe import Recipe

# `write_atomic` and `provenance` were first defined here; they stay importable from here
__all__ = ["FORMAT", "READS", "SITE_KEYS", "VERSION", "Plan", "provenance", "write_atomic"]

FORMAT = "peftplan.plan"
VERSION = 2
READS = (1, 2)  # versions from_dict understands: 1 had no recipe
SITE_KEYS = ("method", "role", "depth", "op", "shape")  # everything else in an entry is a hyper-parameter


@dataclass
class Plan:
    """What to tune where. ``sites`` maps a site name to its entry; sites not listed are left
    untouched (the same as ``{"method": "none"}``)."""

    sites: dict[str, dict[str, Any]]
    model: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    front: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, entry in self.sites.items():
            _check_entry(name, entry)

    @staticmethod
    def hyper(entry: dict[str, Any]) -> dict[str, Any]:
        """The hyper-parameters of a site entry (``{"rank": 8, "alpha": 16}``)."""
        return {k: v for k, v in entry.items() if k not in SITE_KEYS}

    def tuned(self) -> dict[str, dict[str, Any]]:
        """Entries whose method is not ``none``."""
        return {n: e for n, e in self.sites.items() if e["method"] != "none"}

    def summary(self) -> str:
        """One line per method: how many sites, which hyper-parameter values."""
        by: dict[str, list[dict]] = {}
        for e in self.tuned().values():
            by.setdefault(e["method"], []).append(self.hyper(e))
        parts = []
        for m, hps in sorted(by.items()):
            ranks = sorted({h["rank"] for h in hps if "rank" in h})
            extra = "" if not ranks else f", rank {ranks[0]}" if len(ranks) == 1 else f", ranks {ranks[0]}–{ranks[-1]}"
            for init, label in START_LABELS.items():  # adapters that start from the weights or their gradients
                started = sum(h.get("init", "zero") == init for h in hps)
                extra += f", {started} from a {label} start" if started else ""
            parts.append(f"{m}: {len(hps)} site{'s' if len(hps) != 1 else ''}{extra}")
        obj = ", ".join(
            f"{k}={int(v):,}" if float(v).is_integer() else f"{k}={v:.4g}" for k, v in self.objectives.items()
        )
        return "; ".join(parts) + (f" ({obj})" if obj else "")

    def to_peft_config(self) -> Any:
        """The one peft config that trains this plan under ``peft.get_peft_model``: the same
        sites, ranks, alphas and trainable parameters as ``apply`` (`PlanError` listing the
        sites it cannot express, and what `as_lora` would change, otherwise).

        >>> Plan(sites={"fc": {"method": "lora", "rank": 4, "alpha": 8}}).to_peft_config().r
        4
        """
        return peft_config(self)

    def as_lora(self) -> Plan:
        """The nearest plan one peft config expresses (`peftplan.backends.peft_config.lora_entries`):
        each site peft cannot express becomes LoRA at no more parameters, a norm ``full``; what
        changed is in ``provenance["as_lora"]``; the objectives, measured for this plan, are dropped.

        >>> plan = Plan(sites={"fc": {"method": "sparse", "density": 0.5, "shape": [8, 8]}}).as_lora()
        >>> plan.sites["fc"], plan.provenance["as_lora"]
        ({'shape': [8, 8], 'method': 'lora', 'rank': 2, 'alpha': 4}, ['fc: sparse → lora rank 2 (at most its 32 params)'])
        """
        entries, changes = lora_entries(self)
        return Plan(
            sites=entries,
            model=dict(self.model),
            budget=self.budget,
            recipe=self.recipe,
            provenance={**self.provenance, "as_lora": changes},
        )

    def to_axolotl(self) -> str:
        """This plan and its recipe as an axolotl config fragment (YAML text), for the LoRA
        plans `to_peft_config` expresses (`peftplan.backends.peft_config.axolotl_yaml`).

        >>> print(Plan(sites={"fc": {"method": "lora", "rank": 4, "alpha": 8}}).to_axolotl().splitlines()[1])
        lora_r: 4
        """
        return axolotl_yaml(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": dict(self.model),
            "budget": self.budget,
            "objectives": dict(self.objectives),
            "sites": {n: dict(e) for n, e in self.sites.items()},
            "provenance": dict(self.provenance),
            "recipe": None if self.recipe is None else self.recipe.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Read a plan dict, checking format, version, fields and every site's method."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan is a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise PlanError(f"not a peftplan plan: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") not in READS:
            raise PlanError(
                f"plan format version {d.get('version')!r} is not supported by this peftplan "
                f"(reads versions {list(READS)}); upgrade peftplan or re-create the plan"
            )
        missing = [k for k in ("model", "sites") if k not in d]
        if missing:
            raise PlanError(f"plan is missing field(s) {missing}")
        if not isinstance(d["sites"], dict):
            raise PlanError("plan field 'sites' must map site names to entries")
        return cls(
            sites={n: dict(e) if isinstance(e, dict) else e for n, e in d["sites"].items()},
            model=dict(d["model"]),
            budget=d.get("budget"),
            objectives=dict(d.get("objectives") or {}),
            provenance=dict(d.get("provenance") or {}),
            recipe=_recipe(d.get("recipe")),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically (a crash never leaves a half-written file)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan file written by `save` (`PlanError` naming the file when it is not one)."""
        path = Path(path)
        if path.is_dir():
            raise PlanError(
                f"{path} is a directory, not a plan file; an artifact written by peftplan.save "
                "is read with peftplan.load(model, directory)"
            )
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no plan file at {path}") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: str | bytes, source: str | os.PathLike = "<plan>") -> Plan:
        """Parse a plan's JSON text; ``source`` names it in errors.

        >>> Plan.from_json(b"\\x89PNG", "plan.json")
        Traceback (most recent call last):
        peftplan.backends.base.PlanError: plan.json is not a plan file: it is not UTF-8 text
        """
        try:
            text = data.decode() if isinstance(data, bytes) else data
        except UnicodeDecodeError:
            raise PlanError(f"{source} is not a plan file: it is not UTF-8 text") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source} is not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None


def _recipe(d: Any) -> Recipe | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise PlanError(
            f"plan field 'recipe' must be an object like {{'lr': 0.001, 'steps': 600}}, got {type(d).__name__}"
        )
    try:
        return Recipe.from_dict(d)
    except (TypeError, ValueError) as e:
        raise PlanError(f"plan field 'recipe': {e}") from None


def _check_entry(name: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise PlanError(f"site {name!r}: entry must be an object like {{'method': 'lora', 'rank': 8}}")
    if "method" not in entry:
        raise PlanError(f"site {name!r}: entry has no 'method' (e.g. {{'method': 'lora', 'rank': 8}})")
    method = get_method(entry["method"])
    _check_description(name, entry)
    unknown = set(Plan.hyper(entry)) - set(method.hyper)
    if unknown:
        raise PlanError(
            f"site {name!r}: method {method.name!r} has no hyper-parameter(s) {sorted(unknown)}; "
            f"it takes {sorted(method.hyper)}"
        )


def _check_description(name: str, entry: dict[str, Any]) -> None:
    """``role``/``op`` are strings, ``depth`` a number in [0, 1], ``shape`` two positive ints."""
    shape, depth = entry.get("shape", [1, 1]), entry.get("depth", 0.0)
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise PlanError(
            f"site {name!r}: 'shape' must be [in_features, out_features] (two positive ints), got {shape!r}"
        )
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise PlanError(f"site {name!r}: 'depth' must be a number in [0, 1] (relative depth), got {depth!r}")
    for key in ("role", "op"):
        if key in entry and not isinstance(entry[key], str):
            raise PlanError(f"site {name!r}: {key!r} must be a string like 'attn.q' or 'linear', got {entry[key]!r}")
