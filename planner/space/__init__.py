"""Search spaces: a few knobs a sampler turns, and the `Plan` each setting of them means."""

from .allocator import AllocatorSpace
from .base import SENSES, Space
from .default import default_space
from .grouped import GroupedSpace

__all__ = ["SENSES", "AllocatorSpace", "GroupedSpace", "Space", "default_space"]
