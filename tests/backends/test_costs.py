"""Training-memory costs against what autograd actually keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from peftplan.backends import aux_loss, get_method
from peftplan.ir.modules import module_op, static_site
from tests.backends.adapters import frozen
from tests.backends.references import saved_elements


@pytest.mark.parametrize("method,hp", [("lora", {"rank": 4}), ("full", {}), ("none", {})])
def test_saved_activations_match_autograd(method, hp):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    site = static_site("fc", base, module_op(base))
    x = torch.randn(3, 5, 24, requires_grad=True)  # 15 positions; input needs grad as inside a model
    before = saved_elements(frozen(nn.Linear(24, 40)), x)
    m = get_method(method)
    full_hp = m.validate(site, **hp)
    wrapped = m.wrap(frozen(base), site, **full_hp)  # as apply does: freeze, then wrap
    assert saved_elements(wrapped, x) - before == m.saved_activations(site, 15, **full_hp)


def test_train_memory_by_hand():
    site = static_site("q", nn.Linear(384, 384), "linear")
    lora = get_method("lora")
    params = 8 * (384 + 384)
    # fp32 weights + grads (8 B) + two AdamW states (8 B) per parameter, 4 B per saved element
    assert lora.train_memory(site, 2048, rank=8) == params * 16 + 4 * 2048 * (384 + 8)


def test_aux_loss_is_zero_without_routers():
    assert aux_loss(nn.Sequential(nn.Linear(2, 2))) == 0.0
