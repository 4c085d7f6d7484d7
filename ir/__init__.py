"""peftplan.ir — lowering: what CAN be tuned (model → `SiteGraph`)."""

from .lower import lower
from .modules import fingerprint, module_op, static_site, tunable_modules
from .site import Block, Site, SiteGraph

__all__ = ["Block", "Site", "SiteGraph", "fingerprint", "lower", "module_op", "static_site", "tunable_modules"]
