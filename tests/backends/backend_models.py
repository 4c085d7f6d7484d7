"""Tiny models with random weights, and plan/adapter helpers shared by the backend tests."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peftplan.backends import adapter_tensors
from peftplan.ir.modules import fingerprint
from peftplan.plan import Plan

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
GPT2 = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)


def bert() -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(**BERT, attn_implementation="eager")).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="eager")).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**GPT2, attn_implementation="eager")).eval()


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # peft's LoRA ignores dilation: keep it 1
        self.point = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(torch.relu(self.body(torch.relu(self.stem(x)))))  # (N, 6, H', W')
        return self.head(h.mean(dim=(2, 3)))  # (N, 4)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN().eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)).eval()


def token_ids(vocab: int = 99) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def plan_for(model: nn.Module, entries: dict[str, dict]) -> Plan:
    """A plan with the model's fingerprint; entries map site names to {"method": ..., hp...}."""
    return Plan(sites=entries, model={"fingerprint": fingerprint(model)})


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every adapter tensor non-zero values, so the delta actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_tensors(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
