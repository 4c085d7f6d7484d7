"""The backend contract: one `Method` subclass per PEFT method, registered by name.

A method says which site ops it can tune, how many trainable parameters it adds (exactly:
the contract tests check it against the module it builds), the extra forward FLOPs while
unmerged and the tensor ops (kernel launches) it adds to each call, the activations it keeps
for backward (for the training-memory cost), and how to wrap a module. The five abstract
methods are required; the other hooks have documented defaults. A method also says how a search
space sizes it (`band`, `BANDS`), so a new file is searchable without a planner edit. Adding a
method is one file:

    >>> @register
    ... class Scale(Method):
    ...     name = "scale"; ops = frozenset({"linear"}); mergeable = False; band = "vector"
    ...     def param_count(self, site, **hp): return site.out_features
    ...     def overhead_flops(self, site, **hp): return site.tokens * site.out_features * site.calls
    ...     def extra_ops(self, site, **hp): return 1  # one multiply per call
    ...     def saved_activations(self, site, tokens, **hp): return tokens * site.out_features * site.calls
    ...     def wrap(self, module, site, **hp): ...
    >>> get_method("scale").sized(None, rank=8) is None  # no size knob: on or off
    True
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

from ..ir.site import Site


class PlanError(ValueError):
    """A plan that cannot be applied as written; the message says what to change."""


def listing(head: str, lines: list[str], limit: int = 20) -> str:
    """``head`` and one indented line each for the first ``limit`` of ``lines``: how errors list sites.

    >>> print(listing("2 sites", ["a: bad", "b: worse"], limit=1))
    2 sites:
      a: bad
      … and 1 more
    """
    shown = lines[:limit] + ([f"… and {len(lines) - limit} more"] if len(lines) > limit else [])
    return head + ":\n  " + "\n  ".join(shown)


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was left out: how a name or
    message from an untrusted file (a study, a plan) is echoed.

    >>> shorten("x" * 10_000, 12)
    'xxxxxxxxxxxx… (9,988 more characters)'
    """
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


RANK_UNIT = "lora"  # ranks are counted in this method's params: `Method.sized` matches its size at a rank
DEFAULT_METHODS = (RANK_UNIT,)  # what a search space holds unless told: LoRA ranks, the plans users write by hand

BANDS = {  # how a search space sizes a method (`Method.band`)
    "rank": "by a rank, through `sized` (about LoRA's params at that rank): lora, dora, adapter, moe_lora",
    "vector": "no size: on or off, one vector per site (`sized` gives None): ia3, ssf",
    "fixed": "by its own hyper-parameter (`Method.size`), a cost paid before ranks are shared: sparse's density",
}


@dataclass(frozen=True)
class Size:
    """The hyper-parameter a ``"fixed"``-band method is sized by, and the range a space searches
    it in (log scale when ``log``); ``default`` is the size the proxy's plans use.

    >>> Size("density", 1e-3, 0.1, 0.01, log=True).default
    0.01
    """

    name: str
    low: float
    high: float
    default: float
    log: bool = False


class Method(abc.ABC):
    """Base class of every PEFT method.

    ``hyper`` maps each hyper-parameter to its default (``None``: required); ``validate``
    checks a site's hyper-parameters before any module is touched. ``band`` says how a search
    space sizes the method (a key of `BANDS`; None: never searched, like ``none`` and ``full``),
    ``size`` the hyper-parameter of a ``"fixed"`` band, and ``structure`` the name of a count a
    ``"rank"`` method takes besides its rank (MoE-LoRA's ``experts``), which `sized` and
    `fixed_params` read from their ``choices`` and a space may grow with depth.
    """

    name: ClassVar[str] = ""
    ops: ClassVar[frozenset[str]] = frozenset()
    mergeable: ClassVar[bool] = False
    hyper: ClassVar[dict[str, Any]] = {}
    example: ClassVar[dict[str, Any]] = {}  # valid hyper-parameters for docs and the contract suite
    identity_at_init: ClassVar[bool] = True  # a freshly wrapped site computes what its base computes
    band: ClassVar[str | None] = None
    size: ClassVar[Size | None] = None
    structure: ClassVar[str | None] = None

    def can_merge(self, site: Site, **hp: Any) -> str | None:
        """Why this site cannot be merged with these hyper-parameters, or None when it can.

        The one place mergeability is decided: `peftplan.backends.merge` and the cost model
        ask it, and a layer's own ``merge()`` defers to it. Default: ``mergeable``."""
        return None if self.mergeable else f"method {self.name!r} cannot be merged"

    def needs_scores(self, **hp: Any) -> bool:
        """Whether ``wrap`` needs per-element ``scores=`` shaped like the site's weight
        (`peftplan.backends.apply` passes them, or refuses the plan). Default: False."""
        return False

    def needs_gradient(self, **hp: Any) -> bool:
        """Whether ``wrap`` needs ``gradient=``, the site weight's mean gradient on a few
        training batches (`peftplan.backends.apply` passes it, or refuses the plan). Default: False."""
        return False

    def sized(self, site: Site, rank: int, **choices: Any) -> dict[str, Any] | None:
        """Hyper-parameters that make this method about as big as LoRA at ``rank`` on
        ``site``, or None when it has no size knob (on or off, like ia3/ssf). Default: None.

        Invariant (the contract suite checks it): ``param_count(site, **sized(site, r))`` is at
        most LoRA's at rank ``r`` plus `fixed_params`, for every ``1 <= r <= min(in, out)``.
        ``choices`` are a space's structural choices (``experts=``) that methods without such
        a choice ignore. Search spaces size plans through this hook alone."""
        return None

    def fixed_params(self, site: Site, **choices: Any) -> int:
        """Params `sized` costs at ``site`` beyond LoRA's at the same rank, whatever the rank
        (DoRA's magnitude vector, MoE-LoRA's router): what a planner pays before sharing ranks.
        Default: 0."""
        return 0

    def validate(self, site: Site, **hp: Any) -> dict[str, Any]:
        """Full hyper-parameters for ``site`` (defaults filled in), or a `PlanError`."""
        if site.op not in self.ops:
            raise PlanError(
                f"site {site.name!r} is a {site.op} ({site.module_type}); method {self.name!r} "
                f"tunes only {sorted(self.ops)}. Choose another method for this site."
            )
        unknown = set(hp) - set(self.hyper)
        if unknown:
            raise PlanError(
                f"site {site.name!r}: method {self.name!r} has no hyper-parameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.hyper)}"
            )
        full = {**self.hyper, **hp}
        missing = [k for k, v in full.items() if v is None]
        if missing:
            raise PlanError(f"site {site.name!r}: method {self.name!r} needs {missing}")
        self.check(site, full)
        return full

    def check(self, site: Site, hp: dict[str, Any]) -> None:
        """Method-specific checks of filled-in hyper-parameters; raise `PlanError`. Default:
        none beyond `validate`'s."""
        return None

    @abc.abstractmethod
    def param_count(self, site: Site, **hp: Any) -> int:
        """Exact number of trainable parameters this method adds at ``site``."""

    @abc.abstractmethod
    def overhead_flops(self, site: Site, **hp: Any) -> int:
        """Extra forward FLOPs at the site's example shape while unmerged."""

    @abc.abstractmethod
    def extra_ops(self, site: Site, **hp: Any) -> int:
        """Tensor ops (aten kernels; views excluded) the wrapped site adds to each of its
        calls while unmerged, in inference: what per-call overhead the latency model charges.
        A site that merges adds none after `merge`; one that cannot keeps these."""

    @abc.abstractmethod
    def saved_activations(self, site: Site, tokens: int, **hp: Any) -> int:
        """Elements this method keeps for backward beyond what the frozen model keeps, for one
        forward with ``tokens`` positions per call (e.g. batch x sequence) at this site."""

    def train_memory(
        self, site: Site, tokens: int, *, param_bytes: int = 4, act_bytes: int = 4, optimizer_states: int = 2, **hp: Any
    ) -> int:
        """Bytes this method adds while training: its parameters, their gradients and
        optimizer states (AdamW keeps 2, fp32), and the activations it saves for backward.

        >>> import torch.nn as nn
        >>> from peftplan.ir.modules import static_site
        >>> site = static_site("fc", nn.Linear(64, 32), "linear")
        >>> get_method("lora").train_memory(site, tokens=2048, rank=8)  # 768 params x 16 + 4 x 2048 x (64 in + 8 rank)
        602112
        """
        params = self.param_count(site, **hp)
        return params * (2 * param_bytes + 4 * optimizer_states) + act_bytes * self.saved_activations(
            site, tokens, **hp
        )

    def adapter_bytes(self, site: Site, *, param_bytes: int = 4, **hp: Any) -> int:
        """Bytes this site adds to ``adapters.safetensors`` (values only, unless a method also
        stores indices or other buffers)."""
        return self.param_count(site, **hp) * param_bytes

    @abc.abstractmethod
    def wrap(self, module: nn.Module, site: Site, **hp: Any) -> nn.Module:
        """A module to put in place of ``module``: the frozen base inside, a trainable delta."""


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to plans under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.__abstractmethods__:
        raise TypeError(
            f"method {cls.name!r} ({cls.__name__}) must define {sorted(cls.__abstractmethods__)} to be registered"
        )
    _check_band(cls)
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({type(_REGISTRY[cls.name]).__name__})")
    _REGISTRY[cls.name] = cls()
    return cls


def _check_band(cls: type[Method]) -> None:
    """A method's sizing declarations agree: a band from `BANDS`, a `Size` exactly with ``"fixed"``,
    a ``structure`` only with ``"rank"``."""
    where = f"method {cls.name!r} ({cls.__name__})"
    if cls.band is not None and cls.band not in BANDS:
        raise ValueError(f"{where}: band {cls.band!r} is not one of {list(BANDS)} (None: never searched)")
    if (cls.band == "fixed") != isinstance(cls.size, Size):
        raise ValueError(
            f"{where}: a 'fixed' band and a `size = Size(...)` go together (the hyper-parameter it is "
            f"sized by); got band {cls.band!r}, size {cls.size!r}"
        )
    if cls.structure is not None and cls.band != "rank":
        raise ValueError(f"{where}: a structure ({cls.structure!r}) is a count beside a rank; set band = 'rank'")


def get_method(name: str) -> Method:
    """The registered method called ``name``; a `PlanError` lists the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a hand-edited file
        raise PlanError(f"unknown method {shorten(repr(name))}; known methods: {sorted(_REGISTRY)}") from None


def methods() -> dict[str, Method]:
    """All registered methods by name."""
    return dict(_REGISTRY)
