"""``none``: leave the site as it is (frozen, no parameters added). A plan may list a site as
``{"method": "none"}`` to say so explicitly; unlisted sites are treated the same way.

    >>> import torch.nn as nn
    >>> from peftplan.ir.modules import static_site
    >>> fc = nn.Linear(4, 2)
    >>> NoTuning().wrap(fc, static_site("fc", fc, "linear")) is fc
    True
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..ir.site import OPS, Site
from .base import Method, register


@register
class NoTuning(Method):
    name = "none"
    ops = frozenset(OPS)
    mergeable = True
    hyper: dict[str, Any] = {}

    def param_count(self, site: Site, **hp: Any) -> int:
        return 0

    def overhead_flops(self, site: Site, **hp: Any) -> int:
        return 0

    def extra_ops(self, site: Site, **hp: Any) -> int:
        return 0

    def saved_activations(self, site: Site, tokens: int, **hp: Any) -> int:
        return 0

    def wrap(self, module: nn.Module, site: Site, **hp: Any) -> nn.Module:
        return module
