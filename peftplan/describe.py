"""What a plan records beside its entries' hyper-parameters: each site's description
(`describe`), the model it was made for (`model_header`) and who made it (`provenance`).

    >>> sorted(provenance("proxy", seed=0, task="sst2"))
    ['created', 'peftplan', 'seed', 'strategy', 'task']
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


def provenance(strategy: str, seed: int | None, task: str | None = None) -> dict[str, Any]:
    """Who made a plan: peftplan's version, the strategy, seed, task and time."""
    return {
        "peftplan": __version__,
        "strategy": strategy,
        "seed": seed,
        "task": task,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
