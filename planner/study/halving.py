"""Successive halving for several objectives: short runs on data subsets first, then the
non-dominated candidates go on to longer runs.

optuna's pruners compare one objective, so promotion here sorts by non-dominated rank. The
schedule is synchronous and deterministic:

* rung 0 evaluates every candidate the sampler proposes, at ``fidelities[0]``;
* once rung r is settled (nothing running or queued at it), its n completed candidates are
  ordered by non-dominated rank, then by crowding distance (the spread of the front, larger
  first), then by candidate number; the first ``promoted_count(n, eta)`` are re-evaluated at
  ``fidelities[r + 1]`` as new trials with the same parameters;
* baselines (seed plans with user_attr ``baseline``) go on to every rung whatever their
  rank, and ``promoted_count`` of the others: the returned plan has met them at the top;
* under a cost cap (``runs``, in final-run equivalents) the top rung gets what the cap leaves
  once the rungs below and the refinements are paid (`top_slots`): baselines and searched
  candidates take turns (`mixed`), each kind in its order by the first objective as screened —
  the returned plan has met the best-screened baseline, and a searched plan has its full run;
* the front comes from the highest rung that completed: metrics of different rungs are
  never compared.

    >>> [str(f) for f in halving_rungs(Fidelity(steps=90, train_batches=27), rungs=3, eta=3)]
    ['10 steps on 3 batches', '30 steps on 9 batches', '90 steps on 27 batches']
    >>> promote({0: {"metric": 0.9, "params": 9}, 1: {"metric": 0.8, "params": 5},
    ...          2: {"metric": 0.7, "params": 7}}, {"metric": "max", "params": "min"}, eta=3)
    [0]
"""

from __future__ import annotations

import math

from ...recipe import Recipe
from ..training.evaluate import Fidelity

SCREEN = 0.05  # the first rung's share of the final recipe by default: it ranks as well as 10% at half the cost
# (benchmarks/fidelity.py, 12 plans per task: validation loss rho 0.62 on sst2, 0.81 on subj at both)


def default_rungs() -> tuple[Fidelity, ...]:
    """The default schedule: every candidate at `SCREEN` of the final recipe, then the
    promoted ones and the baselines at the full recipe, so the plan a search returns is chosen
    on full-length results.

    >>> [str(f) for f in default_rungs()]
    ['5% of the recipe', 'the full recipe']
    """
    return (Fidelity(share=SCREEN), Fidelity())


def halving_rungs(top: Fidelity, rungs: int = 3, eta: int = 3) -> list[Fidelity]:
    """``rungs`` fidelities ending at ``top``, each ``eta`` times shorter (steps and training
    batches) than the next; never below one step or one batch."""
    if rungs < 1 or eta < 2:
        raise ValueError(f"successive halving needs rungs >= 1 and eta >= 2, got rungs={rungs}, eta={eta}")

    def shrink(n: int | None, k: int) -> int | None:
        return None if n is None else max(1, n // eta**k)

    return [
        Fidelity(shrink(top.steps, k), shrink(top.train_batches, k), top.eval_batches) for k in range(rungs - 1, -1, -1)
    ]


def promoted_count(n: int, eta: int) -> int:
    """How many of ``n`` completed candidates go on to the next rung: ``n // eta``, at least
    one while there is any."""
    return max(1, n // eta) if n else 0


def cost_share(fidelity: Fidelity, recipe: Recipe) -> float:
    """What one training at ``fidelity`` costs in runs of the final ``recipe``: its share of the
    steps (a fidelity counted in steps of a recipe counted in epochs costs one run: the most it
    can).

    >>> cost_share(Fidelity(share=0.05), Recipe(steps=200)), cost_share(Fidelity(steps=50), Recipe(steps=200))
    (0.05, 0.25)
    """
    if fidelity.share is not None:
        return fidelity.share
    if fidelity.steps is None or recipe.steps is None:
        return 1.0
    return min(1.0, fidelity.steps / recipe.steps)


def top_slots(
    runs: float | None, trials: int, fidelities: tuple[Fidelity, ...], recipe: Recipe, eta: int, refine: int
) -> int | None:
    """How many candidates the top rung trains when a study may cost ``runs`` final-run
    equivalents: what is left once ``trials`` screens, ``1/eta`` of them at each rung between and
    ``refine`` top-rung refinements are paid; None without a cap or a rung below the top.

    >>> top_slots(3.0, 16, (Fidelity(share=0.05), Fidelity()), Recipe(steps=100), eta=3, refine=0)
    2
    >>> top_slots(3.0, 16, (Fidelity(share=0.05), Fidelity()), Recipe(steps=100), eta=3, refine=2)
    Traceback (most recent call last):
    ...
    ValueError: runs=3 leaves no full run: 16 screens cost 0.8 runs and 2 refinements 2.0; raise runs, or screen fewer candidates, or refine less
    """
    if runs is None or len(fidelities) < 2:
        return None
    n, below = trials, 0.0
    for f in fidelities[:-1]:
        below += n * cost_share(f, recipe)
        n = promoted_count(n, eta)
    top = cost_share(fidelities[-1], recipe)
    slots = math.floor((runs - below - refine * top) / top + 1e-9)
    if slots < 1:
        raise ValueError(
            f"runs={runs:g} leaves no full run: {trials} screens cost {below:.1f} runs and {refine} refinements "
            f"{refine * top:.1f}; raise runs, or screen fewer candidates, or refine less"
        )
    return slots


def mixed(order: list[int], baselines: set[int]) -> list[int]:
    """``order`` (best first) with its ``baselines`` and the other candidates taking turns, the
    kind of its best first; once one kind runs out, the rest of the other. Short screens rank
    plans weakly (`SCREEN`), so under a cap of two full runs neither a hand-written plan nor a
    searched one is left out on their evidence alone.

    >>> mixed([7, 3, 9, 4, 5], baselines={3, 9, 5})
    [7, 3, 4, 9, 5]
    """
    own = [c for c in order if c in baselines], [c for c in order if c not in baselines]
    first, second = own if order and order[0] in baselines else own[::-1]
    return [c for i in range(len(order)) for c in (first[i : i + 1] + second[i : i + 1])]


def promote(candidates: dict[int, dict[str, float]], senses: dict[str, str], eta: int) -> list[int]:
    """The candidates (by number) that go on to the next rung, best first: sorted by
    non-dominated rank, crowding distance (larger first), then number."""
    numbers = sorted(candidates)
    points = [tuple(candidates[c][k] * (1 if s == "max" else -1) for k, s in senses.items()) for c in numbers]
    ranks = nondominated_ranks(points)
    spread = [0.0] * len(points)
    for r in set(ranks):
        members = [i for i, ri in enumerate(ranks) if ri == r]
        for i, d in zip(members, crowding([points[i] for i in members]), strict=True):
            spread[i] = d
    order = sorted(range(len(numbers)), key=lambda i: (ranks[i], -spread[i], numbers[i]))
    return [numbers[i] for i in order[: promoted_count(len(numbers), eta)]]


def nondominated_ranks(points: list[tuple[float, ...]]) -> list[int]:
    """Rank of each point (all objectives maximised): 0 for the non-dominated ones, 1 for
    those dominated only by rank 0, and so on.

    >>> nondominated_ranks([(1, 1), (2, 2), (0, 3), (0, 0)])
    [1, 0, 0, 2]
    """

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    ranks = [-1] * len(points)
    left, rank = set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def crowding(points: list[tuple[float, ...]]) -> list[float]:
    """NSGA-II crowding distance: per objective, the normalised gap between each point's two
    neighbours; the extremes get infinity.

    >>> crowding([(0, 2), (1, 1), (2, 0)])
    [inf, 2.0, inf]
    """
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:], strict=False):
            dist[i] += (points[b][k] - points[a][k]) / (hi - lo)
    return dist
