"""`apply` a plan to a model in place, and the verbs that undo it: `merge`, `unmerge`, `remove`.

``apply`` checks the whole plan against the model before it touches anything, then freezes
every base parameter and swaps each tuned module for its wrapper on the parent module, so HF
model classes, ``generate()`` and ``Trainer`` keep working on the same object:

    >>> import torch.nn as nn
    >>> from peftplan.plan import Plan
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = apply(model, Plan(sites={"0": {"method": "lora", "rank": 2}, "2": {"method": "full"}}))
    >>> count_trainable(model)  # 2 * (8 + 8) for the LoRA, 8 * 2 + 2 for the head
    50
    >>> remove(model)[0]
    Linear(in_features=8, out_features=8, bias=True)
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..ir import lower
from ..ir.modules import fingerprint, module_features, module_op, static_site
from ..ir.site import Site
from ..plan import Plan
from .base import Method, PlanError, get_method, listing
from .retarget import by_base_model, retarget
from .wrapper import Wrapper

log = logging.getLogger("peftplan")
PLAN_ATTR = "peftplan_plan"  # the applied Plan, public: `save` and users read it
UNDO_ATTR = "_peftplan_undo"  # what `remove` needs to restore the model exactly


@dataclass
class _Undo:
    swapped: list[str]  # names (sites and their aliases) whose module was replaced by a wrapper holding it as `.base`
    trainable_before: set[str]  # parameter names that required grad before `apply`
    watch: list = field(default_factory=list)  # hooks checking that the first forward calls every tuned site
    trained: bool = False  # the adapters hold trained values (`load`, `train`), not a fresh plan's
    said: set[str] = field(default_factory=set)  # sites already warned about as never called (at apply)


@dataclass
class MergeReport:
    """What `merge` did: sites folded into the base weights, and sites left as they were."""

    merged: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # site -> why it was not merged

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} site(s), left {len(self.left)}"]
        lines += [f"  left {name}: {why}" for name, why in self.left.items()]
        return "\n".join(lines)


def apply(
    model: nn.Module,
    plan: Plan | dict | str | os.PathLike,
    *,
    check: bool = True,
    scores: dict[str, torch.Tensor] | None = None,
    match: str = "name",
) -> nn.Module:
    """Tune ``model`` in place as ``plan`` says and return it.

    ``match="name"`` (default) applies each entry to the site of that name, on a model whose
    fingerprint matches the plan's. ``match="role+depth"`` re-targets the plan onto a model of
    the same family with another depth: each site takes the entry of the same role at the
    nearest relative depth; the mapping is logged and kept in
    ``applied_plan(model).provenance["mapping"]``.

    Every site entry is resolved and validated first, so a bad plan raises `PlanError` with the
    model untouched. ``check=False`` skips the fingerprint and the per-site op/shape comparison
    (sites must still exist and suit their method).

    ``scores`` maps site names to per-element scores shaped like the site's weight (grad² from
    the planner, say), for methods that choose entries by them (``sparse`` with
    ``selection="sensitivity"``): where `Method.needs_scores` says so, ``wrap`` receives
    ``scores=<tensor>``; a site that needs scores and has none is a `PlanError`. Scores for
    other sites are ignored.

    >>> qv = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    >>> Plan(sites={name: {"method": "lora", "rank": 4} for name in qv}).save("plan.json")
    PosixPath('plan.json')
    >>> model = apply(tiny_bert(), Plan.load("plan.json"))
    >>> count_trainable(model)  # 4 sites * rank 4 * (32 in + 32 out)
    1024

    Sparse entries chosen by grad² of one labelled batch:

    >>> model, site = tiny_bert(), "bert.encoder.layer.0.output.dense"
    >>> model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([1])).loss.backward()
    >>> grad2 = model.get_submodule(site).weight.grad ** 2
    >>> sparse_plan = Plan(sites={site: {"method": "sparse", "density": 0.01, "selection": "sensitivity"}})
    >>> model = apply(model, sparse_plan, scores={site: grad2})
    >>> count_trainable(model)  # round(0.01 * 64 * 32) entries of the 64-in, 32-out weight
    20
    >>> sorted(model.get_submodule(site).indices.tolist()) == sorted(grad2.flatten().topk(20).indices.tolist())
    True
    """
    if match == "role+depth":
        plan, mapping = retarget(_as_plan(plan), lower(model))
        plan.provenance["mapping"] = mapping
        log.info("re-targeted %d sites by role and depth: %s", len(mapping), mapping)
    elif match != "name":
        raise PlanError(f"match must be 'name' or 'role+depth', got {match!r}")
    return _apply(model, plan, check=check, scores=scores or {}, restoring=False)


def _apply(model: nn.Module, plan: Any, *, check: bool, scores: dict[str, torch.Tensor], restoring: bool) -> nn.Module:
    """`apply`; ``restoring`` (from `load`) gives sites that need scores a placeholder of zeros,
    as their selection is about to be overwritten from the artifact."""
    plan = _as_plan(plan)
    if hasattr(model, PLAN_ATTR):
        raise PlanError("this model already has a plan applied; call peftplan.remove(model) first")
    moved = by_base_model(plan, model)
    if moved is not None:
        plan = moved
        log.info("%s", plan.provenance["retargeted"])
    resolved = _resolve(model, plan, check)
    errors, todo = [], []
    for name, (module, site) in resolved.items():
        entry = plan.sites[name]
        try:
            method = get_method(entry["method"])
            hp = method.validate(site, **plan.hyper(entry))
            extra = _scores_for(name, module, method, hp, scores, restoring)
        except PlanError as e:
            errors.append(str(e))
            continue
        if method.name != "none":
            todo.append((name, module, site, method, {**hp, **extra}))
    if errors:
        raise PlanError(listing(f"{len(errors)} site entr(ies) of the plan are invalid", errors))

    uncalled = _uncalled_tied(model, plan, [name for name, *_ in todo]) if not restoring else []
    if uncalled:
        _warn(
            model,
            uncalled,
            f"peftplan: the plan tunes {len(uncalled)} site(s) the model's forward never calls; their "
            "adapters would change nothing and get no gradient",
            stacklevel=4,
        )
    trainable_before = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, PLAN_ATTR, plan)
    setattr(model, UNDO_ATTR, _Undo([], trainable_before, said=set(uncalled)))
    undo = getattr(model, UNDO_ATTR)
    names = _names_by_module(model)
    try:
        for _name, module, site, method, hp in todo:
            wrapped = method.wrap(module, site, **hp)
            if wrapped is not module:
                for alias in names[id(module)]:  # `self.b = self.a`: every name calls the adapter
                    parent, _, child = alias.rpartition(".")
                    if getattr(model.get_submodule(parent), child) is module:
                        setattr(model.get_submodule(parent), child, wrapped)
                        undo.swapped.append(alias)
    except BaseException:
        remove(model)  # a method failing half-way must not leave a half-tuned model
        raise
    undo.watch = [model.get_submodule(name).register_forward_pre_hook(_mark_called) for name, *_ in todo]
    undo.watch.append(model.register_forward_hook(_warn_uncalled))
    return model


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is reachable by (one module held as two attributes has two)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out.setdefault(id(module), []).append(name)
    return out


CALLED_ATTR = "_peftplan_called"


def _mark_called(module: nn.Module, args: Any) -> None:
    module.__dict__[CALLED_ATTR] = True


def _warn_uncalled(model: nn.Module, args: Any, output: Any) -> None:
    """After the first forward: warn about tuned sites it never called (T5's ``shared``,
    reached only through its tied copies), whose adapters change nothing and get no gradient."""
    undo = getattr(model, UNDO_ATTR, None)
    if undo is None or not undo.watch:
        return
    for handle in undo.watch:
        handle.remove()
    undo.watch = []
    uncalled = [
        n
        for n in applied_plan(model).tuned()
        if not model.get_submodule(n).__dict__.pop(CALLED_ATTR, False) and n not in undo.said
    ]
    if uncalled:
        _warn(
            model,
            uncalled,
            f"peftplan: the model's first forward never called {len(uncalled)} tuned site(s); their "
            "adapters change nothing and get no gradient",
            stacklevel=3,
        )


def _uncalled_tied(model: nn.Module, plan: Plan, names: list[str]) -> list[str]:
    """Of the tuned sites whose weight is tied to another module (T5's ``shared``), those that
    lowering finds the forward never calls. Only entries written by hand (without the ``role``
    lowering gives) are checked: a plan made by lowering this model holds called sites alone, so
    applying it never lowers again."""
    suspects = [n for n in names if "role" not in plan.sites[n] and _tied(model, n)]
    if not suspects:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            called = {site.name for site in lower(model).sites}
    except Exception:  # a model lowering cannot trace: the first forward still checks
        return []
    return [n for n in suspects if n not in called]


def _warn(model: nn.Module, uncalled: list[str], head: str, stacklevel: int) -> None:
    notes = [
        f"{n} (its weight is tied to {_tied(model, n)[:5]}, which the forward calls instead)" if _tied(model, n) else n
        for n in uncalled
    ]
    warnings.warn(
        listing(head, notes) + "\nTune the modules the forward calls instead (peftplan.lower(model) lists them).",
        stacklevel=stacklevel,
    )


def _tied(model: nn.Module, name: str) -> list[str]:
    """The other modules holding ``name``'s weight (tied weights)."""
    module = model.get_submodule(name)
    weight = getattr(getattr(module, "base", module), "weight", None)
    return [
        n
        for n, m in model.named_modules()
        if n != name and not n.startswith(name + ".") and any(p is weight for p in m.parameters(recurse=False))
    ]


def applied_plan(model: nn.Module) -> Plan:
    """The plan `apply` put on ``model``; `PlanError` when there is none.

    >>> plan = Plan(sites={"classifier": {"method": "full"}})
    >>> applied_plan(apply(tiny_bert(), plan)) is plan
    True
    >>> applied_plan(tiny_bert())
    Traceback (most recent call last):
    ...
    peftplan.backends.base.PlanError: this model has no peftplan plan applied; call peftplan.apply(model, plan) first
    """
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise PlanError("this model has no peftplan plan applied; call peftplan.apply(model, plan) first")
    return plan


def merge(model: nn.Module) -> MergeReport:
    """Fold every mergeable site's delta into its base weight (forward no longer adds it).

    A site is left, with the reason in the report, when its method's ``can_merge`` says no
    for these hyper-parameters or when its weight is tied to another module (GPT-2's ``wte``
    and ``lm_head``): folding the delta in would change that module too.

    All or nothing, like `apply`: if a site's ``merge()`` raises, every site merged so far is
    unmerged again before the error propagates, so the model computes what it did before.

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


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of every tuned site, keyed ``"<site>.<name>"``: parameters and
    buffers (a sparse delta's indices, say), base weights of wrapped sites excluded; merged
    sites still give their adapter values.

    >>> query = "bert.encoder.layer.0.attention.self.query"
    >>> model = apply(tiny_bert(), Plan(sites={query: {"method": "lora", "rank": 2}}))
    >>> sorted(adapter_tensors(model))
    ['bert.encoder.layer.0.attention.self.query.lora_A', 'bert.encoder.layer.0.attention.self.query.lora_B']
    >>> sum(t.numel() for t in adapter_tensors(model).values())  # rank 2 * (32 in + 32 out)
    128
    """
    swapped = set(getattr(model, UNDO_ATTR).swapped) if hasattr(model, UNDO_ATTR) else set()
    out = {}
    for name in applied_plan(model).tuned():
        module = model.get_submodule(name)
        for pname, t in [*module.named_parameters(), *module.named_buffers()]:
            if name in swapped and pname.startswith("base."):
                continue
            out[f"{name}.{pname}"] = t
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the model without peftplan would have it: each wrapped
    site's base module under the site's own name, the adapters' tensors left out. After
    `merge`, the merged weights: what a plain checkpoint of the tuned model holds.

    >>> model = apply(nn.Sequential(nn.Linear(4, 4)), Plan(sites={"0": {"method": "lora", "rank": 1}}))
    >>> sorted(model.state_dict()), sorted(base_state_dict(model))
    (['0.base.bias', '0.base.weight', '0.lora_A', '0.lora_B'], ['0.bias', '0.weight'])
    """
    swapped = getattr(model, UNDO_ATTR).swapped if hasattr(model, UNDO_ATTR) else []
    out = {}
    for key, t in model.state_dict().items():
        site = next((s for s in swapped if key.startswith(s + ".")), None)
        if site is None:
            out[key] = t
        elif key.startswith(site + ".base."):
            out[site + key[len(site) + len(".base") :]] = t
    return out


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the auxiliary losses of the last forward (a MoE-LoRA router's load-balancing
    loss, say), to add to the task loss while training; 0.0 when no site has one.

    Each site's `Wrapper.aux_loss` gives its own (None by default).

    >>> moe = {"method": "moe_lora", "experts": 2, "rank": 2, "top_k": 2}
    >>> model = apply(tiny_bert(), Plan(sites={f"bert.encoder.layer.{i}.attention.self.query": moe for i in (0, 1)}))
    >>> aux_loss(model)  # no forward yet
    0.0
    >>> task_loss = model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([1])).loss
    >>> loss = task_loss + 0.01 * aux_loss(model)
    >>> round(aux_loss(model).item(), 4)  # each token uses both experts: each site's balance loss is at its minimum, 1
    2.0
    """
    total: torch.Tensor | float = 0.0
    for module in model.modules():
        if isinstance(module, Wrapper) and module is not model and (value := module.aux_loss()) is not None:
            total = total + value
    return total


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require grad, each shared tensor once (what to give the optimizer).

    >>> query = "bert.encoder.layer.0.attention.self.query"
    >>> plan = Plan(sites={query: {"method": "lora", "rank": 2}, "classifier": {"method": "full"}})
    >>> model = apply(tiny_bert(), plan)
    >>> sorted(trainable_parameters(model))  # doctest: +NORMALIZE_WHITESPACE
    ['bert.encoder.layer.0.attention.self.query.lora_A', 'bert.encoder.layer.0.attention.self.query.lora_B',
     'classifier.bias', 'classifier.weight']
    >>> opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3)
    >>> len(opt.param_groups[0]["params"])
    4
    """
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameter elements, each shared tensor once.

    >>> count_trainable(nn.Linear(4, 2))
    10
    """
    return sum(p.numel() for p in trainable_parameters(model).values())


def _as_plan(plan: Any) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise TypeError(f"apply() needs a Plan, a plan dict or a path to plan.json, got {type(plan).__name__}")


def _scores_for(
    name: str, module: nn.Module, method: Method, hp: dict[str, Any], scores: dict[str, torch.Tensor], restoring: bool
) -> dict[str, torch.Tensor]:
    """``{"scores": tensor}`` for a site whose method needs scores, ``{}`` otherwise."""
    if not method.needs_scores(**hp):
        return {}
    weight = module.weight
    if name not in scores:
        if restoring:
            return {"scores": torch.zeros(weight.shape, device=weight.device)}
        raise PlanError(
            f"site {name!r}: method {method.name!r} with these hyper-parameters selects entries by "
            f"per-element scores; pass apply(..., scores={{{name!r}: tensor shaped {tuple(weight.shape)}}}) "
            "or use selection='magnitude'"
        )
    if tuple(scores[name].shape) != tuple(weight.shape):
        raise PlanError(
            f"site {name!r}: scores have shape {tuple(scores[name].shape)}, the weight {tuple(weight.shape)}"
        )
    return {"scores": scores[name]}


def _resolve(model: nn.Module, plan: Plan, check: bool) -> dict[str, tuple[nn.Module, Site]]:
    """Each plan site's module and static `Site`; `PlanError` listing every site that does not fit."""
    resolved, problems = {}, []
    for name, entry in plan.sites.items():
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        op = module_op(module) if module is not None else None
        if module is None or op is None:
            what = "not found in the model" if module is None else f"a {type(module).__name__}, not a tunable module"
            if "quantized" in type(module).__module__:
                what = (
                    f"a quantized {type(module).__name__} ({type(module).__module__}), which adapters cannot wrap: plan "
                    "and apply on the floating-point model, then quantize"
                )
            problems.append(f"{name or '<root>'}: {what}")
            continue
        shape = list(module_features(module))
        if check and entry.get("op", op) != op:
            problems.append(f"{name}: plan says op {entry['op']!r}, model has {op!r} ({type(module).__name__})")
            continue
        if check and list(entry.get("shape", shape)) != shape:
            problems.append(f"{name}: plan says shape {list(entry['shape'])}, model has {shape} (in, out)")
            continue
        known = {k: entry[k] for k in ("role", "depth") if k in entry}
        resolved[name] = (module, static_site(name, module, op, **known))
    expected = plan.model.get("fingerprint")
    actual = fingerprint(model) if check and expected else expected
    if problems or actual != expected:
        head = "the plan does not fit this model"
        if actual != expected:
            head += f" (plan fingerprint {expected}, model {actual})"
        if "retargeted" in plan.provenance:
            head += f"; {plan.provenance['retargeted']}"
        if not problems:
            problems = ["every plan site matches, but the model's other tunable modules differ"]
        hint = "Apply a plan made for this model" + (
            ", or pass check=False to apply to matching sites anyway." if check else "."
        )
        raise PlanError(listing(head, problems) + "\n" + hint)
    return resolved
