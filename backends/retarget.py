"""Re-target a plan onto another model of the same family (``match="role+depth"``).

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

from ..describe import describe, model_header
from ..ir.site import SiteGraph
from ..plan import Plan
from .base import PlanError, get_method


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
