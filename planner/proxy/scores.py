"""Per-site scores that say where tuning pays: higher means "more to gain here".

`score_sites` scores the sites `ProxyOptions` chooses, for the proxy plan and the default
space alike, from three proxies, each returning ``{site name: float}`` and deterministic:

- `alpha_scores` (data-free): the heavy-tailed self-regularisation exponent of each weight
  matrix (AlphaLoRA, WeightWatcher). Well-trained layers have heavy-tailed spectra (small
  alpha); a large alpha means a layer that training has shaped less, so more to gain.
- `grad2_scores` (needs a `Task`): the Fisher mass ``sum(grad(W)**2)`` of each site's weight
  summed over a few calibration batches, as in SPT.
- `activation_scores` (needs a `Task`): the share of each site's input variance its top
  ``rank`` singular directions hold, over a few calibration batches — EVA's rule (rank goes
  where a few input directions explain most of the activations), one shot, no gradients.

    >>> import torch
    >>> hill_alpha(torch.tensor([1.0, 1.0, 2.0, 4.0]))  # xmin = median = 1.5, tail [2, 4]
    2.576651276068987
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ...backends.base import get_method
from ...ir.modules import is_hf_conv1d
from ...ir.site import Site, SiteGraph
from ..training.task import Task
from .options import ProxyOptions

QUERY_VALUE = ("attn.q", "attn.v", "attn.qkv")  # peft's default LoRA targets: query and value, or the fused qkv

log = logging.getLogger("peftplan.planner")

MATRIX_OPS = ("linear", "conv1d", "conv2d", "embedding")


def hill_alpha(eigenvalues: torch.Tensor) -> float:
    """Hill estimate of the power-law exponent of an eigenvalue density ``p(λ) ∝ λ^-alpha``,
    fitted on the tail at or above the median eigenvalue: ``1 + n / Σ log(λ_i / λ_min)``.

    A flat spectrum (no tail above the median) gives ``inf``.

    >>> hill_alpha(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # xmin = 3.5, tail [4, 5, 6]
    3.914877312116626
    """
    lam = eigenvalues.detach().double().flatten()
    lam = lam[lam > 0].sort().values
    if lam.numel() < 2:
        return math.inf
    xmin = lam.median() if lam.numel() % 2 else (lam[lam.numel() // 2 - 1] + lam[lam.numel() // 2]) / 2
    tail = lam[lam >= xmin]
    logs = torch.log(tail / xmin).sum().item()
    if logs <= 0:
        return math.inf
    return 1.0 + tail.numel() / logs


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a linear/conv/embedding module as a 2-D (out, in) matrix."""
    w = module.weight
    if is_hf_conv1d(module):
        return w.t()
    return w.reshape(w.shape[0], -1)


def alpha_scores(model: nn.Module, graph: SiteGraph, names: Iterable[str] | None = None) -> dict[str, float]:
    """Hill alpha of each weight's eigenvalues (of ``W^T W``), per linear/conv/embedding site.

    ``names`` restricts the sites scored (default: every matrix site). A site whose spectrum
    is flat (alpha = inf) gets the largest finite alpha found, so that it still counts as the
    least trained. Weights on the meta device cannot be scored: materialise them first.

    >>> from peftplan import lower
    >>> model = tiny_bert()
    >>> scores = alpha_scores(model, lower(model))
    >>> 0 < scores["bert.encoder.layer.0.attention.self.query"] < math.inf
    True
    """
    sites = _matrix_sites(graph, names)
    out: dict[str, float] = {}
    with torch.no_grad():
        for site in sites:
            module = model.get_submodule(site.name)
            w = weight_matrix(module)
            if w.is_meta:
                raise ValueError(
                    f"site {site.name!r} has its weights on the meta device, so there are no weight "
                    "statistics to score: materialise the weights (load the checkpoint, e.g. "
                    "from_pretrained) or pass a task to score by gradient sensitivity on real weights"
                )
            w = w.detach().double()
            gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()  # (k, k), k = min(out, in)
            out[site.name] = hill_alpha(torch.linalg.eigvalsh(gram))
    finite = [a for a in out.values() if math.isfinite(a)]
    top = max(finite, default=1.0)
    return {n: (a if math.isfinite(a) else top) for n, a in out.items()}


class Scored(NamedTuple):
    """What `score_sites` gives: a score per tuned site, how it was scored (for the plan's
    provenance), and the other score vectors a default space starts from (its ``priors``)."""

    scores: dict[str, float]
    scoring: dict[str, Any]
    priors: dict[str, dict[str, float]]


def score_sites(
    model: nn.Module,
    graph: SiteGraph,
    task: Task | None,
    options: ProxyOptions,
    *,
    seed: int = 0,
    progress: bool = True,
    priors: bool = False,
) -> Scored:
    """Score the sites ``options`` tunes: weight statistics (`alpha_scores`) without a task or
    with one without training batches (a loop of the user's own), else grad² on
    ``options.calibration_batches`` raised to ``options.sensitivity_power``. With ``priors``,
    also the placements users write by hand — ``"query-value"`` (1 on the query and value
    projections, when the model has them) and ``"uniform"`` (1 on every tuned site) — and, with
    training batches, ``"activation"`` (`activation_scores`), read in the same pass over the
    calibration batches as grad².

    >>> import torch.nn as nn, peftplan as pp
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> scored = score_sites(model, pp.lower(model), None, ProxyOptions(), priors=True)
    >>> sorted(scored.scores), scored.scoring, sorted(scored.priors)
    (['0', '2'], {'scores': 'hill-alpha'}, ['uniform'])
    """
    names = options.tuned_sites(graph)
    hand = _hand_written(graph, names) if priors else {}
    if task is None or not task.train_batches:
        return Scored(alpha_scores(model, graph, names), {"scores": "hill-alpha"}, hand)
    sites = _matrix_sites(graph, names)
    grams = _InputGrams(model, sites) if priors else None
    mass = _grad2(model, task, sites, options.calibration_batches, seed, progress, grams)
    scoring = {
        "scores": "grad2",
        "calibration_batches": options.calibration_batches,
        "sensitivity_power": options.sensitivity_power,
    }
    if grams is not None:
        hand["activation"] = grams.explained(sites)
    return Scored({n: m**options.sensitivity_power for n, m in mass.items()}, scoring, hand)


def _hand_written(graph: SiteGraph, names: list[str]) -> dict[str, dict[str, float]]:
    qv = {n: 1.0 for n in names if graph[n].role in QUERY_VALUE}
    return {**({"query-value": qv} if qv else {}), "uniform": {n: 1.0 for n in names}}


def grad2_scores(
    model: nn.Module,
    graph: SiteGraph,
    task: Task,
    names: Iterable[str] | None = None,
    *,
    batches: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Fisher mass per site: ``Σ_batches Σ (∂loss/∂W)²`` over the site's weight ``W``.

    Runs ``task.loss`` on the first ``batches`` training batches with the model in eval mode
    (no dropout), gradients enabled only on the scored weights and read with
    ``torch.autograd.grad``, so ``.grad``, ``requires_grad`` and the train/eval mode are as
    before afterwards. No optimizer step is taken.

    >>> from peftplan import lower
    >>> model = tiny_bert()
    >>> scores = grad2_scores(model, lower(model), tiny_task(), batches=4, progress=False)
    >>> max(scores, key=scores.get)
    'classifier'
    """
    return _grad2(model, task, _matrix_sites(graph, names), batches, seed, progress)


def _grad2(
    model: nn.Module,
    task: Task,
    sites: list[Site],
    batches: int,
    seed: int,
    progress: bool,
    grams: _InputGrams | None = None,
) -> dict[str, float]:
    """`grad2_scores` over ``sites``; ``grams`` records the sites' inputs in the same pass."""
    weights, unique, index = _tied_once(model, [s.name for s in sites])
    mass = [0.0] * len(unique)

    def add(j: int, g: torch.Tensor) -> None:
        mass[j] += g.detach().double().pow(2).sum().item()

    start = time.perf_counter()
    n = _gradient_pass(model, task, unique, batches, seed, progress, add, grams)
    log.info("grad² sensitivity: %d sites over %d batches in %.1fs", len(sites), n, time.perf_counter() - start)
    return {name: mass[index[id(w)]] for name, w in weights.items()}


GRADIENT_BATCHES = 8  # training batches a LoRA-GA start's gradient is averaged over (LoRA-GA: 64 examples and more)


def _tied_once(
    model: nn.Module, names: Iterable[str]
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[int, int]]:
    """The weight of each named site, the distinct ones (tied weights once) and each one's
    place among them by ``id``."""
    weights = {n: model.get_submodule(n).weight for n in names}
    unique = list({id(w): w for w in weights.values()}.values())
    return weights, unique, {id(w): i for i, w in enumerate(unique)}


def mean_gradients(
    model: nn.Module,
    task: Task,
    names: Iterable[str],
    *,
    batches: int = GRADIENT_BATCHES,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The mean gradient of each named site's weight, ``Σ_b ∂loss_b/∂W / batches`` over the
    first ``batches`` training batches of ``task`` (fp32, shaped like the weight), as
    `grad2_scores` runs them: what a LoRA-GA start is made from (``init="lora_ga"``,
    `peftplan.apply`'s ``gradients=``).

    >>> model, site = tiny_bert(), "bert.encoder.layer.0.attention.self.query"
    >>> mean_gradients(model, tiny_task(), [site], batches=2, progress=False)[site].shape
    torch.Size([32, 32])
    """
    weights, unique, index = _tied_once(model, names)
    total: list[torch.Tensor | None] = [None] * len(unique)

    def add(j: int, g: torch.Tensor) -> None:
        g = g.detach().float()
        total[j] = g if total[j] is None else total[j] + g

    n = _gradient_pass(model, task, unique, batches, seed, progress, add)
    zero = lambda w: torch.zeros(w.shape, device=w.device)  # noqa: E731  (a weight the loss never reached)
    return {
        name: total[index[id(w)]] / n if total[index[id(w)]] is not None else zero(w) for name, w in weights.items()
    }


def plan_gradients(model: nn.Module, plan: Any, task: Task, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """`mean_gradients` of the sites of ``plan`` whose method starts from one
    (`Method.needs_gradient`: LoRA ``init="lora_ga"``); ``{}`` when none does."""
    names = [
        name for name, entry in plan.tuned().items() if get_method(entry["method"]).needs_gradient(**plan.hyper(entry))
    ]
    return mean_gradients(model, task, names, seed=seed, progress=False) if names else {}


def _gradient_pass(
    model: nn.Module,
    task: Task,
    weights: list[torch.Tensor],
    batches: int,
    seed: int,
    progress: bool,
    add: Any,
    grams: _InputGrams | None = None,
) -> int:
    """Call ``add(j, ∂loss/∂weights[j])`` for each of the first ``batches`` training batches
    of ``task`` (eval mode: no dropout; gradients enabled only on ``weights`` and read with
    ``torch.autograd.grad``, so ``.grad``, ``requires_grad`` and the train/eval mode are as
    before afterwards); the number of batches run."""
    if any(w.is_meta for w in weights):
        raise ValueError("the model's weights are on the meta device: materialise them before scoring with a task")
    calib = task.calibration(batches)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    bar, start = None, time.perf_counter()
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), grams or contextlib.nullcontext():
            torch.manual_seed(seed)
            for i, batch in enumerate(calib):
                if grams is not None:
                    grams.mask = _mask(batch)
                grads = torch.autograd.grad(_loss(task, model, batch), weights, allow_unused=True)
                for j, g in enumerate(grads):
                    if g is not None:
                        add(j, g)
                bar = _advance(bar, progress, start, i + 1, len(calib))
    finally:
        if bar is not None:
            bar.stop()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return len(calib)


def _loss(task: Task, model: nn.Module, batch: Any) -> torch.Tensor:
    """``task.loss`` on ``batch``, checked to be a tensor gradients can flow back from."""
    loss = task.loss(model, batch)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            f"task {task.name!r}: its loss gave {type(loss).__name__}, not a tensor, for a batch "
            f"with keys {sorted(batch)}: a batch needs its labels for the model to give a loss"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"task {task.name!r}: loss has no autograd graph; compute it without "
            "torch.no_grad()/inference_mode so that gradients reach the weights"
        )
    return loss


def activation_scores(
    model: nn.Module,
    graph: SiteGraph,
    task: Task,
    names: Iterable[str] | None = None,
    *,
    batches: int = 4,
    rank: int = 8,
) -> dict[str, float]:
    """Per site, the explained-variance ratio of the top ``rank`` right-singular directions of
    its inputs (uncentred, as EVA's SVD): ``Σ_top λ / Σ λ`` of ``Σ_tokens x xᵀ`` over the first
    ``batches`` training batches, padding tokens left out where the batch has an
    ``attention_mask`` of the input's leading shape. Embedding sites (integer inputs) score
    the mean of the others. The model runs in eval mode without gradients.

    >>> from peftplan import lower
    >>> model = tiny_bert()
    >>> scores = activation_scores(model, lower(model), tiny_task(), batches=4)
    >>> 0 < scores["bert.encoder.layer.0.attention.self.query"] <= 1
    True
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    sites = _matrix_sites(graph, names)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _InputGrams(model, sites) as grams:
            for batch in task.calibration(batches):
                grams.mask = _mask(batch)
                task.loss(model, batch)
    finally:
        model.train(was_training)
    return grams.explained(sites, rank)


def _mask(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, dict) else None


class _InputGrams:
    """While entered, forward pre-hooks sum each non-embedding site's uncentred input Gram
    matrix ``Σ x xᵀ`` (channels last; tokens where ``mask`` is 0 left out): EVA's statistic."""

    def __init__(self, model: nn.Module, sites: list[Site]) -> None:
        self.model, self.sites = model, [s for s in sites if s.op != "embedding"]
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def __enter__(self) -> _InputGrams:
        self.handles = [
            self.model.get_submodule(s.name).register_forward_pre_hook(self._hook(s.name, s.op)) for s in self.sites
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str, op: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if op == "conv2d":  # channels are the features
                x = x.movedim(1, -1)
            m = self.mask
            if m is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.t() @ x
            self.grams[name] = self.grams[name] + g if name in self.grams else g

        return record

    def explained(self, sites: list[Site], rank: int = 8) -> dict[str, float]:
        """`activation_scores` of ``sites`` from the Gram matrices recorded."""
        out: dict[str, float] = {}
        for name, g in self.grams.items():
            lam = torch.linalg.eigvalsh(g).flip(0).clamp_min(0)
            total = lam.sum().item()
            out[name] = lam[:rank].sum().item() / total if total > 0 else 0.0
        missing = [s.name for s in self.sites if s.name not in out]
        if missing:
            raise ValueError(f"sites {missing[:3]} were never called by task.loss, so their inputs cannot be scored")
        mean = sum(out.values()) / len(out) if out else 1.0
        return {s.name: out.get(s.name, mean) for s in sites}


def _matrix_sites(graph: SiteGraph, names: Iterable[str] | None):
    if names is None:
        return graph.select(op=MATRIX_OPS)
    sites = [graph[n] for n in names]
    bad = [s.name for s in sites if s.op not in MATRIX_OPS]
    if bad:
        raise ValueError(f"sites {bad} are not weight matrices; scores cover ops {list(MATRIX_OPS)}")
    return sites


def _advance(bar, enabled: bool, start: float, done: int, total: int):
    """Show a progress bar once the pass has taken more than a second and is not finished."""
    if bar is None and enabled and done < total and time.perf_counter() - start > 1.0:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        bar.add_task("grad² sensitivity", total=total, completed=done)
    elif bar is not None:
        bar.update(bar.task_ids[0], completed=done)
    return bar
