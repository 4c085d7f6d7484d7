"""`Site` and `SiteGraph`: what lowering produces and every later stage reads.

A site is one tunable module that the model actually calls (a module called twice is one site
with ``calls == 2``). Sites are kept in execution order; their names are module paths, unique.

    >>> import torch.nn as nn, peftplan as pp
    >>> g = pp.lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [(s.name, s.op, s.role, s.params) for s in g]
    [('0', 'linear', 'mlp.up', 40), ('2', 'linear', 'mlp.down', 18)]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import networkx as nx

OPS = ("linear", "conv1d", "conv2d", "embedding", "norm")


@dataclass(frozen=True)
class Site:
    """One tunable module call site.

    ``in_features``/``out_features`` are the channel sizes the site maps between (for an
    embedding: vocabulary size and embedding size; for a norm: the normalised size twice).
    ``in_shape``/``out_shape`` are the shapes seen with the example inputs, ``flops`` the
    forward multiply-adds x2 of all its calls at those shapes.
    """

    name: str
    op: str
    role: str
    module_type: str
    in_features: int
    out_features: int
    params: int
    block: int | None = None
    stack: str | None = None
    depth: float = 0.0
    kernel: tuple[int, ...] = ()
    groups: int = 1
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    flops: int = 0
    calls: int = 1
    bias: bool = False
    tied: tuple[str, ...] = ()
    affine_norm: bool = False  # a torch LayerNorm/GroupNorm with a bias: normalised · weight + bias

    @property
    def tokens(self) -> int:
        """Positions per call at the example shape: output elements per output channel
        (batch x sequence for a linear layer, batch x height x width for a convolution)."""
        numel = 1
        for d in self.out_shape:
            numel *= d
        return numel // self.out_features if self.out_shape and self.out_features else 0

    def tokens_at(self, batch: int, length: int, example: tuple[int, int]) -> int:
        """Positions per call for inputs of ``batch`` sequences of ``length``, the site having
        been measured on inputs of shape ``example`` (batch, length): the output's leading
        dimension scales with the batch and a dimension equal to the example's length with the
        length; a pooled output (a classification head's) scales with the batch alone.

        >>> s = Site(name="q", op="linear", role="attn.q", module_type="Linear", in_features=8, out_features=8,
        ...          params=72, out_shape=(1, 16, 8))
        >>> s.tokens_at(32, 64, (1, 16)), Site(**{**s.to_dict(), "out_shape": (1, 8)}).tokens_at(32, 64, (1, 16))
        (2048, 32)
        """
        if not self.out_shape:
            return 0
        b0, l0 = example
        dims = list(self.out_shape)
        channel = 1 if self.op.startswith("conv") and len(dims) > 2 else len(dims) - 1
        rest = [d for i, d in enumerate(dims) if i != channel]
        n = 1
        for i, d in enumerate(rest):
            n *= d * batch // b0 if i == 0 else (d * length // l0 if l0 > 1 and d == l0 else d)
        return n

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("kernel", "in_shape", "out_shape", "tied"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Site:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Site fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for k in ("kernel", "in_shape", "out_shape", "tied"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class Block:
    """One instance of a repeated block: ``stack`` is the container path, ``index`` its slot."""

    stack: str
    index: int
    size: int
    type_name: str

    @property
    def prefix(self) -> str:
        return f"{self.stack}.{self.index}" if self.stack else str(self.index)


@dataclass
class SiteGraph:
    """Sites in execution order plus their dataflow graph.

    Invariants: site names are unique; ``graph`` has exactly one node per site; an edge
    ``a -> b`` means an output of ``a`` reaches an input of ``b`` without passing another site.
    """

    sites: list[Site]
    graph: nx.DiGraph
    blocks: list[Block]
    capture: str
    fingerprint: str
    model_class: str
    total_params: int
    notes: list[str] = field(default_factory=list)
    example_shape: tuple[int, int] = (1, 1)  # (batch, sequence) of the example the sites were measured on
    kernels: int = 0  # tensor kernels one forward of the example runs (`ir.kernels`); 0: not counted

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.sites}
        if len(self._by_name) != len(self.sites):
            raise ValueError("site names must be unique")

    def annotate(self, field: str, values: Mapping[str, Any]) -> None:
        """Write a pass's result onto the sites: ``field`` of each site named in ``values`` (the
        others keep theirs), as a torch.fx pass writes ``node.meta``.

        >>> import torch.nn as nn, peftplan as pp
        >>> g = pp.lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> g.annotate("role", {"2": "head"}); [s.role for s in g]
        ['mlp.up', 'head']
        """
        if field not in {f.name for f in fields(Site)} - {"name"}:
            raise ValueError(
                f"Site has no field {field!r} to annotate; its fields are {[f.name for f in fields(Site)]}"
            )
        unknown = [n for n in values if n not in self._by_name]
        if unknown:
            raise KeyError(f"no site named {unknown[0]!r}; see graph.names() for the {len(self)} sites")
        self.sites = [replace(s, **{field: values[s.name]}) if s.name in values else s for s in self.sites]
        self._by_name = {s.name: s for s in self.sites}

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Site:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no site named {name!r}; see graph.names() for the {len(self)} sites") from None

    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def select(
        self,
        role: str | Iterable[str] | None = None,
        op: str | Iterable[str] | None = None,
        block: int | Iterable[int] | None = None,
        name: str | None = None,
    ) -> list[Site]:
        """Sites matching every given filter; a role ``"attn"`` matches all ``attn.*`` roles.

        >>> import peftplan as pp
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> graph = pp.lower(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
        ...                                              num_attention_heads=2, vocab_size=32)))
        >>> [s.name for s in graph.select(role="attn", block=0)]  # doctest: +NORMALIZE_WHITESPACE
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj',
         'model.layers.0.self_attn.v_proj', 'model.layers.0.self_attn.o_proj']
        """
        import re

        roles = _as_set(role)
        ops = _as_set(op)
        blocks = _as_set(block)
        pattern = re.compile(name) if name else None

        def keep(s: Site) -> bool:
            if roles is not None and s.role not in roles and s.role.split(".")[0] not in roles:
                return False
            if ops is not None and s.op not in ops:
                return False
            if blocks is not None and s.block not in blocks:
                return False
            return pattern is None or pattern.search(s.name) is not None

        return [s for s in self.sites if keep(s)]

    @property
    def site_params(self) -> int:
        """Parameters held by sites, each shared weight counted once."""
        seen: set[str] = set()
        total = 0
        for s in self.sites:
            if s.tied and any(t in seen for t in s.tied):
                continue
            seen.add(s.name)
            total += s.params
        return total

    def table(self, max_rows: int | None = None) -> str:
        """A plain-text table, one row per site (what ``print(graph)`` shows)."""
        head = ("site", "op", "role", "block", "depth", "in", "out", "params", "MFLOPs", "calls")
        rows = [
            (
                s.name,
                s.op,
                s.role,
                "" if s.block is None else str(s.block),
                f"{s.depth:.2f}",
                str(s.in_features),
                str(s.out_features),
                f"{s.params:,}",
                f"{s.flops / 1e6:,.2f}",
                str(s.calls),
            )
            for s in self.sites
        ]
        if max_rows is not None and len(rows) > max_rows:
            half = max_rows // 2
            rows = rows[:half] + [("…",) + ("",) * (len(head) - 1)] + rows[-half:]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (
            f"{self.model_class}: {len(self.sites)} sites, {len(self.blocks)} blocks, "
            f"{self.graph.number_of_edges()} dataflow edges, {self.total_params:,} params, "
            f"captured by {self.capture}"
        )
        batch, length = self.example_shape
        shape = f"batch {batch} × sequence length {length}" if length > 1 else f"batch {batch}"
        notes = [
            f"MFLOPs: each site's forward FLOPs on the example input the model was lowered with ({shape}); "
            "they grow in proportion to both",
            *self.notes,
        ]
        return "\n".join([summary, *lines, *(f"note: {n}" for n in notes)])

    def __str__(self) -> str:
        return self.table(max_rows=60)

    def to_dict(self) -> dict:
        return {
            "format": "peftplan.sitegraph",
            "version": 1,
            "model_class": self.model_class,
            "fingerprint": self.fingerprint,
            "capture": self.capture,
            "total_params": self.total_params,
            "example_shape": list(self.example_shape),
            "notes": list(self.notes),
            "blocks": [asdict(b) for b in self.blocks],
            "sites": [s.to_dict() for s in self.sites],
            "edges": [[a, b] for a, b in self.graph.edges],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> SiteGraph:
        if d.get("format") != "peftplan.sitegraph" or d.get("version") != 1:
            raise ValueError(
                f"not a peftplan site graph (format={d.get('format')!r}, version={d.get('version')!r}); "
                "expected format 'peftplan.sitegraph', version 1"
            )
        sites = [Site.from_dict(s) for s in d["sites"]]
        g = nx.DiGraph()
        g.add_nodes_from(s.name for s in sites)
        g.add_edges_from(tuple(e) for e in d["edges"])
        return cls(
            sites=sites,
            graph=g,
            blocks=[Block(**b) for b in d["blocks"]],
            capture=d["capture"],
            fingerprint=d["fingerprint"],
            model_class=d["model_class"],
            total_params=d["total_params"],
            notes=list(d.get("notes", [])),
            example_shape=tuple(d.get("example_shape", (1, 1))),
        )


def _as_set(x):
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return {x}
    return set(x)
