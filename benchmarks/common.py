"""What the training benchmarks (fidelity.py, quality.py) share: the real tasks, a store that
keeps every finished training as JSON the moment it ends (so a rerun skips it and a study
spans sittings), rank correlations, and a writer for their section of RESULTS.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = ROOT.parent / "shared" / "data" / "text"
METRICS = {"sst2": "accuracy", "mr": "accuracy", "subj": "accuracy", "cola": "mcc"}
METRIC_NAMES = {"accuracy": "accuracy", "mcc": "Matthews correlation"}
BATCH, MAX_LENGTH = 32, 64  # the final recipe's batch and the tokeniser's cut, for every contender
VALIDATION = 0.2  # the share of train.tsv held out (stratified) that searches and lr choices score on


def load_task(
    name: str,
    *,
    seed: int = 0,
    validation: float | int = VALIDATION,
    max_train: int | None = None,
    max_dev: int | None = None,
):
    """MiniLM-L6 with a fresh 2-way head (initialised from ``seed``), and the task ``name`` of
    ../shared/data/text: its train.tsv split into training and validation batches, dev.tsv as
    the evaluation batches (what results are reported on; never seen by a search)."""
    import torch
    from transformers import AutoTokenizer

    from peftplan.models import load_minilm, minilm_dir
    from peftplan.planner.training.task import Task

    folder = DATA / name
    if not (folder / "train.tsv").exists():
        raise SystemExit(f"no {folder / 'train.tsv'}: the benchmark needs ../shared/data/text/{name}")
    torch.manual_seed(seed)
    model = load_minilm(num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    task = Task.for_sequence_classification(
        model,
        tokenizer,
        folder / "train.tsv",
        folder / "dev.tsv",
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        metric=METRICS[name],
        seed=0,
        validation=validation,
        max_train=max_train,
        max_dev=max_dev,
    )
    task.name = name
    return model, task


def all_linear_ranks(model, budget: int) -> dict[str, int]:
    """LoRA ranks on every linear layer at the largest rank that fits ``budget`` (the fresh head
    trained in full and paid first): the default space's ``uniform`` baseline, peft's
    ``rank_pattern`` for it."""
    from peftplan import lower
    from peftplan.planner.proxy.options import ProxyOptions
    from peftplan.planner.space import AllocatorSpace

    graph, options = lower(model), ProxyOptions()
    uniform = {n: 1.0 for n in options.tuned_sites(graph)}
    space = AllocatorSpace(graph, uniform, budget, train_modules=options.full_sites(graph), priors={"uniform": uniform})
    plan = space.plan_from_params(space.prior_params("uniform"))
    return {n: e["rank"] for n, e in plan.tuned().items() if e["method"] == "lora"}


def fully_trainable(base):
    """A copy of ``base`` with every weight trainable: full fine-tuning, the studies' ceiling."""
    import copy

    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def examples(batches: list) -> int:
    return sum(len(b["labels"]) for b in batches)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class RunStore:
    """One JSON file per finished training under ``root``: `get` returns the record stored for
    ``key`` if its ``spec`` (what was trained: plan, recipe, seed…) is the same, else None;
    `put` writes it atomically. A changed spec under an old key is trained again."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.@=-]+", "_", key)
        return self.root / f"{safe}.json"

    def get(self, key: str, spec: dict) -> dict | None:
        p = self.path(key)
        if not p.exists():
            return None
        record = json.loads(p.read_text())
        return record if record.get("spec_digest") == digest(spec) else None

    def put(self, key: str, spec: dict, result: dict) -> dict:
        record = {"key": key, "spec": spec, "spec_digest": digest(spec), **result}
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return record

    def all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.root.rglob("*.json"))] if self.root.exists() else []

    def rename(self, key: str, new: str) -> None:
        """Keep ``key``'s record as ``new`` (written first, then the old file removed), so a
        rerun trains ``key`` again and the old result stays readable under its new key."""
        if self.path(new).exists():
            raise FileExistsError(f"{self.path(new)} exists: {key!r} cannot be kept as {new!r}; choose another label")
        record = json.loads(self.path(key).read_text())
        self.put(new, record.pop("spec"), {k: v for k, v in record.items() if k not in ("key", "spec_digest")})
        self.path(key).unlink()


def rank_correlations(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Spearman's rho and Kendall's tau (tau-b) of two equally long lists (nan below 3 points)."""
    from scipy import stats

    if len(xs) < 3:
        return float("nan"), float("nan")
    return float(stats.spearmanr(xs, ys).statistic), float(stats.kendalltau(xs, ys).statistic)


def standard_error_said(accuracy: float, n: int) -> str:
    """One binomial standard error of an accuracy near ``accuracy`` on ``n`` examples, said in points.

    >>> standard_error_said(0.87, 500)
    'one standard error of dev accuracy is 1.50 points (n = 500)'
    """
    return (
        f"one standard error of dev accuracy is {100 * (accuracy * (1 - accuracy) / n) ** 0.5:.2f} points (n = {n:,})"
    )


def screens_said(record: dict) -> str | None:
    """What a search record's screens (rung 0) could tell by validation loss, the signal they
    are promoted by: their span, and the span of the seed placements at the best-screened seed's
    learning rate (the choice among placements), beside the top rung's losses; None for a
    record stored before trials kept their loss.

    >>> screens_said({"trials": [
    ...     {"rung": 0, "baseline": "uniform", "lr": 1e-3, "validation_loss": 0.69},
    ...     {"rung": 0, "baseline": "proxy", "lr": 1e-3, "validation_loss": 0.68},
    ...     {"rung": 0, "baseline": None, "lr": 3e-3, "validation_loss": 0.70},
    ...     {"rung": 1, "baseline": "proxy", "lr": 1e-3, "validation_loss": 0.3}]})
    '3 screens span 0.0200 (0.6800-0.7000), the 2 seed placements at lr 0.001 0.0100; the full runs 0.3000'

    A baseline screened at several rates shows its sweep; a record that marks the sampler's own
    proposals says where they went:

    >>> screens_said({"trials": [
    ...     {"rung": 0, "baseline": "uniform", "lr": 1e-3, "validation_loss": 0.69, "params": 900, "proposed": False},
    ...     {"rung": 0, "baseline": None, "lr": 3e-3, "validation_loss": 0.70, "params": 50, "proposed": True},
    ...     {"rung": 0, "baseline": "uniform", "lr": 4e-3, "validation_loss": 0.65, "params": 900, "proposed": False},
    ...     {"rung": 1, "baseline": "uniform", "lr": 1e-3, "validation_loss": 0.3}]}).split("; ")[-2:]
    ['the sweep of uniform at lr 0.001, 0.004 (best 0.004)', "the sampler's 1 proposals at 50-50 trainable params, lr 0.003-0.003"]
    """
    trials = [t for t in record["trials"] if t.get("validation_loss") is not None]
    top_rung = max((t["rung"] for t in trials), default=0)
    screens = [t for t in trials if t["rung"] == 0]
    seeds = [t for t in screens if t["baseline"]]
    if top_rung == 0 or not seeds:
        return None
    losses = [t["validation_loss"] for t in screens]
    lr = min(seeds, key=lambda t: t["validation_loss"])["lr"]
    placements = [t["validation_loss"] for t in seeds if t["lr"] == lr]
    top = sorted(t["validation_loss"] for t in trials if t["rung"] == top_rung)
    proposed = [t for t in screens if t.get("proposed")]
    swept = [t for t in seeds if t["baseline"] == seeds[0]["baseline"]]
    rates = ", ".join(f"{t['lr']:g}" for t in swept)
    sweep = (
        f"; the sweep of {seeds[0]['baseline']} at lr {rates} "
        f"(best {min(swept, key=lambda t: t['validation_loss'])['lr']:g})"
        if len(swept) > 1
        else ""
    )
    where = (
        f"; the sampler's {len(proposed)} proposals at {min(t['params'] for t in proposed):,.0f}-"
        f"{max(t['params'] for t in proposed):,.0f} trainable params, lr {min(t['lr'] for t in proposed):.3g}-"
        f"{max(t['lr'] for t in proposed):.3g}"
        if proposed
        else ""
    )
    return (
        f"{len(screens)} screens span {max(losses) - min(losses):.4f} ({min(losses):.4f}-{max(losses):.4f}), "
        f"the {len(placements)} seed placements at lr {lr:g} {max(placements) - min(placements):.4f}; "
        f"the full runs {', '.join(f'{v:.4f}' for v in top)}{sweep}{where}"
    )


def write_section(results: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` of
    ``results`` (appended when absent) by ``text``, stamped with today's date."""
    from peftplan.plan import write_atomic

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n\nGenerated {date.today().isoformat()} by the command above.\n{end}"
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    write_atomic(results, new)
