"""Roles pass: names first, dataflow to confirm, position last.

Name rules read the last path component in the context of its parents (``dense`` under
``attention.output`` is ``attn.o``, under ``intermediate`` ``mlp.up``), so they hold across
model families without a table per family. When the name says nothing, the role the
dataflow implies is used; when the two disagree, the dataflow wins and a note says so.

    >>> name_role("model.layers.0.self_attn.q_proj", "linear"), name_role("encoder.layer.3.output.dense", "linear")
    ('attn.q', 'mlp.down')
"""

from __future__ import annotations

LEAF = {
    "attn.q": {"q", "q_proj", "query", "wq", "to_q", "q_lin", "query_proj"},
    "attn.k": {"k", "k_proj", "key", "wk", "to_k", "k_lin", "key_proj"},
    "attn.v": {"v", "v_proj", "value", "wv", "to_v", "v_lin", "value_proj"},
    "attn.qkv": {"qkv", "qkv_proj", "c_attn", "wqkv", "query_key_value", "in_proj", "to_qkv"},
    "attn.o": {"o", "o_proj", "out_proj", "out_lin", "to_out", "attn_out"},
    "mlp.up": {"up_proj", "fc1", "c_fc", "lin1", "wi", "wi_1", "fc_in", "dense_h_to_4h", "w3", "up", "gate_up_proj"},
    "mlp.gate": {"gate_proj", "wi_0", "w1", "gate"},
    "mlp.down": {"down_proj", "fc2", "lin2", "w2", "fc_out", "dense_4h_to_h", "down"},
}
BY_LEAF = {leaf: role for role, leaves in LEAF.items() for leaf in leaves}
HEAD = {"lm_head", "classifier", "score", "qa_outputs", "head", "pooler", "cls", "predictions", "heads"}
AMBIGUOUS = {"dense", "c_proj", "wo", "proj", "out", "output"}  # meaning depends on the parent


def _is_attn(part: str) -> bool:
    return "attn" in part or "attention" in part


def name_role(name: str, op: str) -> str | None:
    """The role a site's path implies, or None when the name says nothing."""
    parts = name.lower().split(".")
    leaf, ctx = parts[-1], parts[:-1]
    if op == "norm":
        return "norm"
    if any(p in HEAD for p in parts):
        return "head"
    if op == "embedding":
        return "other" if any(_is_attn(p) for p in ctx) else "embed"
    if op == "conv2d" and any("embed" in p for p in ctx):
        return "embed"
    in_attn = any(_is_attn(p) for p in ctx)
    if leaf in BY_LEAF:
        role = BY_LEAF[leaf]
        if leaf == "o" or not in_attn or role.startswith("attn"):
            return role
    if leaf in AMBIGUOUS:
        if in_attn:
            return "attn.o"
        if "intermediate" in ctx:
            return "mlp.up"
        if (
            leaf in {"wo", "c_proj"}
            or "output" in ctx
            or any(p in ("mlp", "ffn", "feed_forward", "densereludense") for p in ctx)
        ):
            return "mlp.down"
    return None


def assign(
    sites: list[str], ops: dict[str, str], flow: dict[str, str], blocks: dict[str, int | None]
) -> tuple[dict[str, str], list[str]]:
    """Final role per site, and notes on where name and dataflow disagreed."""
    roles: dict[str, str] = {}
    notes: list[str] = []
    last_block = max((i for i, s in enumerate(sites) if blocks.get(s) is not None), default=None)
    for i, s in enumerate(sites):
        by_name, by_flow = name_role(s, ops[s]), flow.get(s)
        if by_name and by_flow and by_name != by_flow and by_name not in ("head", "norm", "embed"):
            notes.append(f"role of {s}: name says {by_name}, dataflow says {by_flow}; using {by_flow}")
            roles[s] = by_flow
        elif by_name:
            roles[s] = by_name
        elif by_flow:
            roles[s] = by_flow
        elif ops[s] == "embedding":
            roles[s] = "embed"
        elif last_block is not None and i > last_block and ops[s] in ("linear", "conv2d", "conv1d"):
            roles[s] = "head"
        else:
            roles[s] = "other"
    return roles, notes
