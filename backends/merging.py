"""The verbs that undo `apply`: `merge` folds the adapters' deltas into the base weights,
`unmerge` takes them back out, `remove` restores the model as it was before `apply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.nn as nn

from ..ir.modules import module_op, static_site
from .base import get_method
from .inspection import PLAN_ATTR, UNDO_ATTR, _names_by_module, applied_plan
from .uncalled import CALLED_ATTR

if TYPE_CHECKING:
    from .apply import _Undo


@dataclass
class MergeReport:
    """What `merge` did: sites folded into the base weights, and sites left as they were."""

    merged: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # site -> why it was not merged

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} site(s), left {len(self.left)}"]
        lines += [f"  left {name}: {why}" for name, why in self.left.items()]
        return "\n".join(lines)


def merge(model: nn.Module) -> MergeReport:
    """Fold every mergeable site's delta into its base weight (forward no longer adds it).

    A site is left, with the reason in the report, when its method's ``can_merge`` says no
    for these hyper-parameters or when its weight is tied to another module (GPT-2's ``wte``
    and ``lm_head``): folding the delta in would change that module too.

    All or nothing, like `apply`: if a site's ``merge()`` raises, every site merged so far is
    unmerged again before the error propagates, so the model computes what it did before.

    >>> import torch
    >>> from peftplan import Plan, apply
    >>> model, query = tiny_bert().eval(), "bert.encoder.layer.0.attention.self.query"
    >>> plan = Plan(sites={query: {"method": "lora", "rank": 2},
    ...                     "bert.encoder.layer.0.output.dense": {"method": "adapter", "bottleneck": 4}})
    >>> model = apply(model, plan)
    >>> _ = nn.init.normal_(model.get_submodule(query).lora_B)  # as if trained: a nonzero delta
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> before = model(ids).logits
    >>> print(merge(model))  # doctest: +ELLIPSIS
    merged 1 site(s), left 1
      left bert.encoder.layer.0.output.dense: an adapter's activation is nonlinear, ...
    >>> torch.allclose(model(ids).logits, before, atol=1e-5)
    True
    """
    report = MergeReport(left=unmergeable(model))
    todo = [(name, model.get_submodule(name)) for name in applied_plan(model).tuned() if name not in report.left]
    done = []
    try:
        for name, module in todo:
            if hasattr(module, "merge") and not module.merged:
                module.merge()
                done.append(module)
            report.merged.append(name)
    except BaseException:
        for module in reversed(done):
            module.unmerge()
        raise
    return report


def unmergeable(model: nn.Module) -> dict[str, str]:
    """The tuned sites `merge` leaves unmerged, each with why: its method's ``can_merge`` says
    no for these hyper-parameters, or its weight is tied to another module.

    >>> from peftplan import Plan, apply
    >>> plan = Plan(sites={"bert.encoder.layer.0.attention.self.query": {"method": "lora", "rank": 2},
    ...                     "bert.encoder.layer.0.output.dense": {"method": "adapter", "bottleneck": 4}})
    >>> unmergeable(apply(tiny_bert(), plan))  # doctest: +ELLIPSIS
    {'bert.encoder.layer.0.output.dense': "an adapter's activation is nonlinear, so its delta cannot fold ..."}
    """
    plan, left = applied_plan(model), {}
    owners: dict[int, set[str]] = {}  # parameter -> every module holding it (tied weights: several)
    names = _names_by_module(model)
    for mname, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    for name, entry in plan.tuned().items():
        method = get_method(entry["method"])
        module = model.get_submodule(name)
        base = getattr(module, "base", module)
        why = method.can_merge(static_site(name, base, module_op(base)), **plan.hyper(entry))
        own = set(names[id(base)]) | set(names[id(module)])  # the site under each of its aliases
        shared = sorted({o for p in base.parameters(recurse=False) for o in owners[id(p)]} - own)
        if why is None and shared and hasattr(module, "merge"):
            why = f"its weight is shared with {shared} (tied); merging would change them too"
        if why is not None:
            left[name] = why
    return left


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged deltas back out of the base weights; returns ``model``.

    >>> import torch
    >>> from peftplan import Plan, apply
    >>> model, query = tiny_bert(), "bert.encoder.layer.0.attention.self.query"
    >>> model = apply(model, Plan(sites={query: {"method": "lora", "rank": 2}}))
    >>> _ = nn.init.normal_(model.get_submodule(query).lora_B)  # as if trained: a nonzero delta
    >>> weight = model.get_submodule(query).base.weight
    >>> original = weight.detach().clone()
    >>> _ = merge(model)
    >>> torch.allclose(weight, original)
    False
    >>> unmerge(model) is model, torch.allclose(weight, original, atol=1e-6)
    (True, True)
    """
    for name in applied_plan(model).tuned():
        module = model.get_submodule(name)
        if hasattr(module, "unmerge"):
            module.unmerge()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: unmerge, put the original modules back, restore ``requires_grad``.

    Sites tuned with ``full`` keep their trained weights (they are the module's own).

    >>> from peftplan import Plan, apply
    >>> from peftplan.backends import count_trainable
    >>> model, name = tiny_bert(), "bert.encoder.layer.0.attention.self.query"
    >>> query = model.get_submodule(name)
    >>> plan = Plan(sites={name: {"method": "lora", "rank": 2}})
    >>> remove(apply(model, plan)) is model, model.get_submodule(name) is query  # the original module back
    (True, True)
    >>> count_trainable(model) == sum(p.numel() for p in model.parameters())  # all trainable again, as before
    True
    """
    unmerge(model)
    undo: _Undo = getattr(model, UNDO_ATTR)
    for handle in undo.watch:
        handle.remove()
    for name in getattr(model, PLAN_ATTR).tuned():
        model.get_submodule(name).__dict__.pop(CALLED_ATTR, None)
    for name in undo.swapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(name).base)
    for n, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(n in undo.trainable_before)
    delattr(model, PLAN_ATTR)
    delattr(model, UNDO_ATTR)
    return model
