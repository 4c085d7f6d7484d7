"""peftplan.ir — lowering: what CAN be tuned (model → `SiteGraph`)."""

from peftplan.ir.lower import lower
from peftplan.ir.modules import fingerprint, module_op, static_site, tunable_modules
from peftplan.ir.site import Block, Site, SiteGraph

__all__ = ["Block", "Site", "SiteGraph", "fingerprint", "lower", "module_op", "static_site", "tunable_modules"]
