"""Re-target a plan onto another model: the same base model inside a task head (`by_base_model`,
always tried), or a model of the same family with another depth (``match="role+depth"``).

Each site of the target model takes the entry of the plan site with the same role and op at
the nearest relative depth, so a plan made on a 6-layer model applies to a 12-layer one.
Entries with method ``none`` count as sites too: a plan that leaves the lower blocks alone
leaves the target's lower blocks alone.

    >>> from peftplan import lower, search
    >>> plan2 = search(tiny_llama(), "2%")
    >>> plan4, mapping = retarget(plan2, lower(tiny_llama(layers=4)))
    >>> mapping["model.layers.3.self_attn.v_proj"]
    'model.layers.1.self_attn.v_proj'
"""

from __future__ import annotations

import torch.nn as nn

from ..describe import describe, model_header
from ..ir.modules import HEAD_NAMES, fingerprint, module_op, static_site, tunable_modules
from ..ir.site import SiteGraph
from ..plan import Plan
from .base import PlanError, get_method


def by_base_model(plan: Plan, model: nn.Module) -> Plan | None:
    """``plan`` re-named for ``model`` when it was made for the same base model one level in or
    out (transformers' ``base_model_prefix``), else None (the plan's names stand as they are).

    A plan for a bare encoder (``encoder.layer.0…``) applied to its classifier gets the prefix
    (``bert.encoder.layer.0…``) and trains the classifier's new head (``classifier``, ``score``)
    fully, as every plan made on a classifier does; it is re-named only when the encoder inside
    has the plan's fingerprint. A plan made on the classifier whose every site lies in the
    encoder loses the prefix on the bare encoder. The note in ``provenance["retargeted"]``
    says what was done.

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> clf = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                                                 intermediate_size=8, vocab_size=10))
    >>> bare = Plan(sites={"encoder.layer.0.attention.self.query": {"method": "lora", "rank": 2}},
    ...             model={"fingerprint": fingerprint(clf.bert)})
    >>> sorted(by_base_model(bare, clf).sites)
    ['bert.encoder.layer.0.attention.self.query', 'classifier']
    """
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or all(_site(model, n) is not None for n in plan.sites):
        return None
    inner = getattr(model, prefix, None)
    names = {n: f"{prefix}.{n}" for n in plan.sites}  # into the head model
    if not (isinstance(inner, nn.Module) and inner is not model):
        names = {n: n[len(prefix) + 1 :] for n in plan.sites if n.startswith(prefix + ".")}  # out, onto the bare model
        inner = None
    if len(names) < len(plan.sites) or any(_site(model, n) is None for n in names.values()):
        return None
    sites = {names[n]: e for n, e in plan.sites.items()}
    fits = inner is None or plan.model.get("fingerprint") in (None, fingerprint(inner))
    heads = (
        {n: m for n, m, _ in tunable_modules(model) if n.split(".")[0] in HEAD_NAMES}
        if inner is not None and fits
        else {}
    )
    sites.update({n: {"method": "full", **describe(static_site(n, m, module_op(m)))} for n, m in heads.items()})
    added = sum(get_method("full").param_count(static_site(n, m, module_op(m))) for n, m in heads.items())
    where = f"inside {type(model).__name__} ({prefix}.…)" if inner is not None else f"of {type(model).__name__}"
    note = (
        f"the plan names the sites of {plan.model.get('class') or 'another model'}; applied to the same sites {where}"
        + (f", its new head {', '.join(heads)} trained fully" if heads else "")
    )
    header = {
        **plan.model,
        "class": type(model).__name__,
        "fingerprint": fingerprint(model) if fits else plan.model["fingerprint"],
    }
    objectives = dict(plan.objectives)
    if "params" in objectives:
        objectives["params"] += added
    return Plan(
        sites=sites,
        model=header,
        budget=plan.budget,
        objectives=objectives,
        recipe=plan.recipe,
        provenance={**plan.provenance, "retargeted": note},
    )


def _site(model: nn.Module, name: str) -> nn.Module | None:
    """The tunable module ``name`` of ``model``, or None."""
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        return None
    return module if module is not None and module_op(module) is not None else None


def retarget(plan: Plan, graph: SiteGraph) -> tuple[Plan, dict[str, str]]:
    """The plan for ``graph``'s model, and which plan site each target site copied.

    Target sites whose role and op no plan entry has stay untuned; a plan without role or depth
    on its entries cannot be re-targeted (`PlanError`)."""
    lacking = [n for n, e in plan.sites.items() if "role" not in e or "depth" not in e]
    if lacking:
        raise PlanError(
            f"cannot match by role and depth: entries {lacking[:5]} have no 'role'/'depth'; re-create the plan with peftplan.search"
        )
    by_kind: dict[tuple[str, str | None], list[tuple[float, str]]] = {}
    for name, e in plan.sites.items():
        by_kind.setdefault((e["role"], e.get("op")), []).append((float(e["depth"]), name))
    sites, mapping = {}, {}
    for s in graph:
        candidates = by_kind.get((s.role, s.op)) or by_kind.get((s.role, None))
        if not candidates:
            continue
        _, source = min(candidates, key=lambda c: (abs(c[0] - s.depth), c[0]))
        entry = plan.sites[source]
        mapping[s.name] = source
        if entry["method"] != "none":
            sites[s.name] = {**entry, **describe(s)}
    if not sites:
        raise PlanError(
            f"no site of {graph.model_class} matches the plan's roles "
            f"{sorted({r for r, _ in by_kind})}; is it a model of the same family?"
        )
    params = sum(get_method(e["method"]).param_count(graph[n], **Plan.hyper(e)) for n, e in sites.items())
    provenance = {**plan.provenance, "retargeted_from": plan.model.get("fingerprint"), "match": "role+depth"}
    return Plan(
        sites=sites, model=model_header(graph), budget=plan.budget, objectives={"params": params}, provenance=provenance
    ), mapping
