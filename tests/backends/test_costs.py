"""Training memory and the auxiliary loss by hand (what autograd keeps for backward: test_contract.py)."""

from __future__ import annotations

import torch.nn as nn

from peftplan.backends import aux_loss, get_method
from peftplan.ir.modules import static_site


def test_train_memory_by_hand():
    site = static_site("q", nn.Linear(384, 384), "linear")
    lora = get_method("lora")
    params = 8 * (384 + 384)
    # fp32 weights + grads (8 B) + two AdamW states (8 B) per parameter, 4 B per saved element
    assert lora.train_memory(site, 2048, rank=8) == params * 16 + 4 * 2048 * (384 + 8)


def test_aux_loss_is_zero_without_routers():
    assert aux_loss(nn.Sequential(nn.Linear(2, 2))) == 0.0
