"""The ``peftplan`` command.

    peftplan lower minilm                       # the site table of the bundled real model
    peftplan lower tests.zoo:llama --json g.json
    peftplan plan minilm --budget 0.5% -o plan.json
    peftplan plan minilm --budget 75k --task ../shared/data/text/sst2 -o plan.json
    peftplan search minilm --task data/sst2 --budget 1% --strategy nsga2 --trials 27 --rungs 3
    peftplan apply minilm --plan plan.json --task data/sst2 -o adapter/   # train it by its recipe, save it
    peftplan worker sqlite:///peftplan-study.db     # another process joins the same study
    peftplan worker sqlite:///s.db --allow tests.zoo:llama   # ... whose model is a factory it trusts
    peftplan worker postgresql://host/db --device cuda:1     # one worker per GPU
    peftplan front sqlite:///peftplan-study.db --csv front.csv --trials-csv trials.csv --png front.png --html front.html
    peftplan export ./base adapter/ -o merged/                # a merged Hugging Face folder
    peftplan export ./base adapter/ --peft -o peft_adapter/   # a peft adapter
    peftplan export --config axolotl --plan plan.json -o axolotl.yml

MODEL is ``minilm``, a local Hugging Face model directory, or ``package.module:factory``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's parser, each defined in its module of `peftplan.commands`."""
    from peftplan.commands import apply, export, front, lower, plan, search

    p = argparse.ArgumentParser(
        prog="peftplan", description="Plan and apply parameter-efficient fine-tuning, per site."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in (lower.add, plan.add, apply.add, search.add, search.add_worker, export.add, front.add):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import optuna

    from peftplan.backends.base import shorten
    from peftplan.planner.study import StudyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a search says itself what it runs and resumes
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, StudyError, FloatingPointError) as e:
        print(f"peftplan {args.command}: error: {shorten(str(e), 4000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: a search says how far it got and how to go on; no traceback
        print(f"peftplan {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
