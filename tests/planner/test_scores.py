import math

import pytest
import torch
import torch.nn as nn

import peftplan
from peftplan.planner import Task, alpha_scores, grad2_scores, hill_alpha


def pareto_eigenvalues(alpha: float, n: int) -> torch.Tensor:
    """Quantiles of the density p(λ) ∝ λ^-alpha on [1, ∞): an exact power-law spectrum."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (1 - q) ** (-1 / (alpha - 1))


def matrix_with_spectrum(eigenvalues: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """W = U diag(s) V^T with s² = eigenvalues, so that W^T W has exactly those eigenvalues."""
    g = torch.Generator().manual_seed(0)
    k = eigenvalues.numel()
    u, _ = torch.linalg.qr(torch.randn(n_out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(eigenvalues.sqrt()) @ v.t()  # (out, in)


def test_hill_alpha_by_hand():
    # xmin = median 3.5, tail [4, 5, 6]: 1 + 3 / (log(4/3.5) + log(5/3.5) + log(6/3.5))
    expected = 1 + 3 / sum(math.log(x / 3.5) for x in (4, 5, 6))
    assert hill_alpha(torch.tensor([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])) == pytest.approx(expected)
    assert hill_alpha(torch.ones(10)) == math.inf
    assert hill_alpha(torch.tensor([0.0, 0.0, 3.0])) == math.inf


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_alpha_of_a_weight_with_a_power_law_spectrum(alpha):
    model = nn.Sequential(nn.Linear(300, 200, bias=False), nn.ReLU(), nn.Linear(200, 10))
    with torch.no_grad():
        model[0].weight.copy_(matrix_with_spectrum(pareto_eigenvalues(alpha, 200), 200, 300))
    scores = alpha_scores(model, peftplan.lower(model), ["0"])
    assert list(scores) == ["0"]
    assert scores["0"] == pytest.approx(alpha, rel=0.05)


def test_heavy_tailed_weights_score_lower_than_random_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 512))
    with torch.no_grad():
        model[2].weight.copy_(matrix_with_spectrum(pareto_eigenvalues(2.0, 128), 512, 128))
    scores = alpha_scores(model, peftplan.lower(model))
    # random init: a Marchenko–Pastur spectrum, no heavy tail (alpha ≈ 3.4 at this aspect ratio)
    assert scores["0"] > 3 > 2.2 > scores["2"]
    assert scores == alpha_scores(model, peftplan.lower(model))


def test_meta_weights_are_refused_with_advice():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    graph = peftplan.lower(model)
    with pytest.raises(ValueError, match="meta device.*materialise"):
        alpha_scores(model, graph)


def test_scores_cover_matrix_sites_only(tiny_bert, tiny_bert_graph):
    scores = alpha_scores(tiny_bert, tiny_bert_graph)
    assert set(scores) == {s.name for s in tiny_bert_graph if s.op in ("linear", "embedding")}
    assert all(math.isfinite(v) and v > 1 for v in scores.values())
    with pytest.raises(ValueError, match="not weight matrices"):
        alpha_scores(tiny_bert, tiny_bert_graph, ["bert.embeddings.LayerNorm"])


def regression_task(batches) -> Task:
    def loss(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    return Task(train_batches=batches, eval_batches=[], loss=loss, metric=lambda m, b: 0.0, name="toy")


def toy_model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2))
    batches = [{"x": torch.randn(5, 3), "y": torch.randn(5, 2)} for _ in range(3)]
    return model, batches


def test_grad2_equals_a_manual_computation():
    model, batches = toy_model_and_batches()
    graph = peftplan.lower(model)
    scores = grad2_scores(model, graph, regression_task(batches), batches=2)

    reference = {"0": 0.0, "3": 0.0}
    model.eval()  # the scorer runs in eval mode: no dropout
    for batch in batches[:2]:  # only the first two batches
        model.zero_grad()
        ((model(batch["x"]) - batch["y"]) ** 2).mean().backward()
        for name in reference:
            reference[name] += model.get_submodule(name).weight.grad.pow(2).sum().item()
    assert scores == pytest.approx(reference, rel=1e-6)


def test_grad2_restores_flags_grads_and_mode():
    model, batches = toy_model_and_batches()
    model.train()
    model[0].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    marker = torch.full_like(model[3].bias, 7.0)
    model[3].bias.grad = marker
    before = [p.detach().clone() for p in model.parameters()]

    scores = grad2_scores(model, peftplan.lower(model), regression_task(batches), batches=3)

    assert scores["3"] > 0  # scored although it was frozen
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, True]
    assert model[3].bias.grad is marker
    assert model[0].weight.grad is None and model[3].weight.grad is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_grad2_is_deterministic_and_needs_a_graph():
    model, batches = toy_model_and_batches()
    graph = peftplan.lower(model)
    task = regression_task(batches)
    assert grad2_scores(model, graph, task, seed=3) == grad2_scores(model, graph, task, seed=3)

    def detached(model, batch):
        with torch.no_grad():
            return model(batch["x"]).sum()

    task.loss = detached
    with pytest.raises(ValueError, match="no autograd graph"):
        grad2_scores(model, graph, task)
    assert all(p.requires_grad for p in model.parameters())
