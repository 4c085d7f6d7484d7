"""``peftplan front STORAGE``: the Pareto front of a stored study, printed, exported, plotted."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("front", help="export and plot the Pareto front of a stored study")
    p.add_argument("storage", help="the study's storage URL")
    p.add_argument("--study", help="study name (default: the storage's only study)")
    p.add_argument("--csv", help="write the front as CSV")
    p.add_argument("--trials-csv", help="write every trial as CSV (learning rate, run length, on the front or not)")
    p.add_argument("--json", help="write the front (plans included) as JSON")
    p.add_argument("--png", help="plot the front (matplotlib)")
    p.add_argument("--html", help="plot the front (plotly, interactive)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftplan.planner.study import study_front

    front = study_front(args.storage, args.study)
    print_front(front)
    for path, write in (
        (args.csv, front.to_csv),
        (args.trials_csv, lambda path: front.to_csv(path, every_trial=True)),
        (args.json, front.to_json),
        (args.png, front.plot),
        (args.html, front.plot),
    ):
        if path:
            print(f"wrote {write(path)}")
    return 0


def print_front(front) -> None:
    print(f"Pareto front: {len(front)} plan{'s' if len(front) != 1 else ''}")
    for p in front:
        values = "  ".join(f"{k}={v:,.4g}" for k, v in p.values.items())
        where = f"trial {p.info.get('trial')}, rung {p.info.get('rung')}"
        print(f"  {values}  ({where}) {p.plan.summary().split(' (')[0] if p.plan else ''}")
