"""A method the planner has never heard of is searchable once registered: one backend file
(here, a class in this test) and its import, no planner edit. The default space builds its
band and knobs from `Method.band`, and a search plans with it.

The method is LoRA-FA (Zhang et al. 2023): LoRA with the down-projection A frozen at its random
initialisation, so only B (out x rank) trains, and `sized` buys more rank for LoRA's params."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
import torch
import torch.nn as nn

import peftplan as pp
from peftplan.backends import base, count_trainable
from peftplan.backends.wrapper import Wrapper
from peftplan.planner.space import default_space
from tests.planner.trials import stand_in, tiny_task
from tests.zoo import bert_classifier


class FrozenA(Wrapper):
    """``y = base(x) + B (A x)`` with ``A`` a fixed random buffer and ``B`` trainable, zero at first."""

    def __init__(self, module: nn.Linear, rank: int) -> None:
        super().__init__(module)
        w = module.weight
        g = torch.Generator().manual_seed(0)
        a = torch.randn(rank, module.in_features, generator=g) / math.sqrt(module.in_features)
        self.register_buffer("a", a.to(w.device, w.dtype))
        self.b = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T) @ self.b.T  # (..., out)


class LoRAFA(base.Method):
    name = "lora_fa"
    ops = frozenset({"linear"})
    band = "rank"
    hyper = {"rank": None}
    example = {"rank": 2}

    def param_count(self, site, rank, **_):
        return rank * site.out_features

    def sized(self, site, rank, **choices):  # the rank whose B costs about LoRA's A and B at ``rank``
        return {"rank": min(site.in_features, rank * (site.in_features + site.out_features) // site.out_features)}

    def overhead_flops(self, site, rank, **_):
        return 2 * site.tokens * rank * (site.in_features + site.out_features) * site.calls

    def extra_ops(self, site, **hp):
        return 3  # x A^T, (x A^T) B^T, the sum

    def saved_activations(self, site, tokens, rank, **_):
        return tokens * rank * site.calls  # A x, for B's gradient

    def wrap(self, module, site, rank):
        return FrozenA(module, rank)


@pytest.fixture
def lora_fa(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # registered for this test only
    base.register(LoRAFA)
    return "lora_fa"


def test_a_registered_method_gets_a_band_in_the_default_space(lora_fa):
    model, task = bert_classifier(), tiny_task()
    space = default_space(model, "5%", task, methods=("lora", lora_fa))
    assert space.distributions()["lora_fa_share"] == optuna.distributions.FloatDistribution(0.0, 1.0)
    params = {**space.proxy_params(1.0), "lora_fa_share": 1.0}  # the whole rank band on the new method
    plan = space.plan_from_params(params)
    tuned = {n: e for n, e in plan.sites.items() if e["method"] != "full"}
    assert tuned and {e["method"] for e in tuned.values()} == {lora_fa}
    assert plan.objectives["params"] <= pp.Budget(params="5%").param_limit(space.graph.total_params)
    x = task.train_batches[0]
    model.eval()  # no dropout
    with torch.no_grad():
        before = model(**{k: v for k, v in x.items() if k != "labels"}).logits
        tuned_model = pp.apply(copy.deepcopy(model), plan)
        after = tuned_model(**{k: v for k, v in x.items() if k != "labels"}).logits
    assert count_trainable(tuned_model) == plan.objectives["params"]  # the method's param_count, summed by the space
    torch.testing.assert_close(after, before)  # B starts at zero: the base model's outputs


def test_a_search_plans_with_it(lora_fa):
    storage = optuna.storages.InMemoryStorage()
    pp.search(
        bert_classifier(),
        "5%",
        tiny_task(),
        strategy="random",
        trials=8,
        evaluator=stand_in,
        progress=False,
        threads=1,
        methods=("lora", lora_fa),
        storage=storage,
        study_name="s",
    )
    trials = optuna.load_study(study_name="s", storage=storage).get_trials(states=[optuna.trial.TrialState.COMPLETE])
    chosen = [t for t in trials if any(e["method"] == lora_fa for e in t.user_attrs["plan"]["sites"].values())]
    assert chosen and all(t.params["lora_fa_share"] > 0 for t in chosen)
