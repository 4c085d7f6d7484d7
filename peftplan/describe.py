"""What a plan records beside its entries' hyper-parameters: each site's description
(`describe`), the model it was made for (`model_header`) and who made it (`provenance`).

    >>> sorted(provenance("proxy", seed=0, task="sst2", model=tiny_bert()))
    ['created', 'model', 'peftplan', 'seed', 'strategy', 'task']
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .ir.site import Site
from .version import __version__


def describe(site: Site) -> dict[str, Any]:
    """A site's description in a plan entry (for checking and re-targeting; not hyper-parameters).

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> describe(static_site("fc", nn.Linear(4, 2), "linear"))
    {'role': 'other', 'depth': 0.0, 'op': 'linear', 'shape': [4, 2]}
    """
    return {"role": site.role, "depth": site.depth, "op": site.op, "shape": [site.in_features, site.out_features]}


def model_header(graph: Any) -> dict[str, Any]:
    """The plan's ``model`` field for a `SiteGraph`: what `apply` checks the target against."""
    return {"fingerprint": graph.fingerprint, "class": graph.model_class, "n_sites": len(graph)}


def provenance(strategy: str, seed: int | None, task: str | None = None, model: Any = None) -> dict[str, Any]:
    """Who made a plan: peftplan's version, the strategy, seed, task, the model's `family` and time."""
    return {
        "peftplan": __version__,
        "strategy": strategy,
        "seed": seed,
        "task": task,
        **({"model": family(model)} if model is not None else {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def family(model: Any) -> str:
    """A model's family: its config's ``model_type`` ("bert", "llama"), else its class name.

    >>> import torch
    >>> family(tiny_bert()), family(torch.nn.Linear(2, 2))
    ('bert', 'Linear')
    """
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def reuse_warnings(found: dict[str, Any], model: Any, kind: str | None = None) -> list[str]:
    """What differs between where a plan was found (its ``provenance``) and where it is applied
    (``model``, a task of ``kind``): another model family, another kind of task. Its sites carry
    over by name or role; what they are worth was measured only where it was found.

    >>> found = provenance("gp", 0, task="sst2", model=tiny_bert())
    >>> reuse_warnings(found, tiny_bert(), "classification")
    []
    >>> print(*reuse_warnings(found, tiny_llama(), "causal-lm"), sep="\\n")
    the plan was found on a bert model and is applied to a llama model: its sites carry over by role and depth, what they are worth may not (compare it with a search on this model)
    the plan was found on a classification task ('sst2') and is applied to a causal-lm task: its ranks and learning rate were chosen for the other task (compare it with a search on this one)
    """
    out = []
    if found.get("model") and found["model"] != family(model):
        out.append(
            f"the plan was found on a {found['model']} model and is applied to a {family(model)} model: its sites carry "
            "over by role and depth, what they are worth may not (compare it with a search on this model)"
        )
    was = found.get("kind", "classification") if found.get("task") else None  # a task's kind is recorded unless it
    # is classification; a plan made without a task has neither
    if was and kind and was != kind:
        out.append(
            f"the plan was found on a {was} task ({found['task']!r}) and is applied to a {kind} task: its ranks and "
            "learning rate were chosen for the other task (compare it with a search on this one)"
        )
    return out
