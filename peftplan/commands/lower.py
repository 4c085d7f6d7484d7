"""``peftplan lower MODEL``: every tunable site of a model, as a table (and JSON)."""

from __future__ import annotations

import argparse

from . import arguments


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lower", help="show every tunable site of a model")
    arguments.model(p)
    p.add_argument("--json", help="also write the site graph as JSON to this file")
    p.add_argument("--all", action="store_true", help="print every row (default: at most 60)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftplan.ir import lower
    from peftplan.models import load_model
    from peftplan.plan import write_atomic

    graph = lower(load_model(args.model))
    print(graph.table(max_rows=None if args.all else 60))
    if args.json:
        write_atomic(args.json, graph.to_json() + "\n")
        print(f"wrote {args.json}")
    return 0
