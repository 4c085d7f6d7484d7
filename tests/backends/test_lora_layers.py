"""LoRA layers against hand-written references: the base module at init, ``x·Wᵀ + s·B·A·x``
with non-zero weights, and merge/unmerge round trips; on fp32, bf16 and the meta device."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from peftplan.backends import get_method
from peftplan.backends.lora_layers import LoRAConv2d, LoRAEmbedding, LoRALinear
from peftplan.ir.modules import module_op, static_site


def _modules() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), torch.randn(3, 5, 12)),
        "conv1d_hf": (Conv1D(7, 12), torch.randn(3, 5, 12)),  # Conv1D(nf=out, nx=in)
        "conv2d_3x3": (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)),
        "conv2d_1x1": (nn.Conv2d(4, 6, 1), torch.randn(2, 4, 5, 5)),
        "conv2d_reflect": (
            nn.Conv2d(4, 6, (3, 2), padding=1, padding_mode="reflect", dilation=2),
            torch.randn(2, 4, 9, 9),
        ),
        "embedding": (nn.Embedding(20, 8, padding_idx=0), torch.randint(0, 20, (3, 5))),
    }


CASES = list(_modules())


def _wrap(module: nn.Module, rank: int = 3, alpha: float = 6.0) -> nn.Module:
    site = static_site("m", module, module_op(module))
    return get_method("lora").wrap(module, site, rank=rank, alpha=alpha)


def _reference(module: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA output computed independently from the layer's forward."""
    s = layer.scaling
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if isinstance(module, nn.Embedding):
        return module(x) + (a.T[x] @ b.T) * s
    if isinstance(module, nn.Conv2d):
        delta = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
        )
        with torch.no_grad():  # B·A per kernel tap
            delta.weight.copy_(
                torch.stack(
                    [b[:, :, 0, 0] @ a[:, :, i, j] for i in range(a.shape[2]) for j in range(a.shape[3])], -1
                ).reshape_as(module.weight)
            )
        return module(x) + delta(x) * s
    return module(x) + x @ a.T @ b.T * s


@pytest.mark.parametrize("case", CASES)
def test_output_equals_base_at_init(case):
    module, x = _modules()[case]
    expected = module(x)
    layer = _wrap(module)
    assert torch.equal(layer(x), expected)


def _randomize(layer: nn.Module) -> nn.Module:
    """Give A and B random non-zero values, so the delta shows in the output."""
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_(std=0.1)
    return layer


@pytest.mark.parametrize("case", CASES)
def test_output_with_weights_matches_reference(case):
    module, x = _modules()[case]
    layer = _randomize(_wrap(module))
    torch.testing.assert_close(layer(x), _reference(module, layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(case):
    module, x = _modules()[case]
    layer = _randomize(_wrap(module))
    original = module.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # a second merge must not add the delta twice
    assert layer.merged and not torch.equal(module.weight, original)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=1e-5)  # the delta is in the base now
    layer.unmerge()
    torch.testing.assert_close(module.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_param_count_is_exact_and_only_adapters_train(case):
    module, x = _modules()[case]
    site = static_site("m", module, module_op(module))
    layer = _wrap(module, rank=3)
    trainable = {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {"lora_A", "lora_B"}
    assert sum(trainable.values()) == get_method("lora").param_count(site, rank=3)
    layer(x).float().sum().backward()
    assert layer.lora_B.grad is not None and module.weight.grad is None


def test_param_count_by_hand():
    lora = get_method("lora")
    assert lora.param_count(static_site("l", nn.Linear(384, 96), "linear"), rank=8) == 8 * (384 + 96)
    assert lora.param_count(static_site("c", Conv1D(96, 384), "linear"), rank=8) == 8 * (384 + 96)
    assert lora.param_count(static_site("k", nn.Conv2d(16, 32, (3, 5)), "conv2d"), rank=4) == 4 * 16 * 15 + 32 * 4
    assert lora.param_count(static_site("e", nn.Embedding(1000, 64), "embedding"), rank=2) == 2 * (1000 + 64)


def test_shapes_follow_peft():
    assert LoRALinear(nn.Linear(12, 7), 3, 6).lora_A.shape == (3, 12)
    assert LoRALinear(Conv1D(7, 12), 3, 6).lora_B.shape == (7, 3)
    conv = LoRAConv2d(nn.Conv2d(4, 6, 3), 3, 6)
    assert (conv.lora_A.shape, conv.lora_B.shape) == ((3, 4, 3, 3), (6, 3, 1, 1))
    emb = LoRAEmbedding(nn.Embedding(20, 8), 3, 6)
    assert (emb.lora_A.shape, emb.lora_B.shape) == ((3, 20), (8, 3))


@pytest.mark.parametrize("case", CASES)
def test_bf16(case):
    module, x = _modules()[case]
    module = module.to(torch.bfloat16)
    x = x if x.dtype == torch.long else x.to(torch.bfloat16)
    expected = module(x)
    layer = _wrap(module)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert torch.equal(layer(x), expected)
    unmerged = _randomize(layer)(x)
    layer.merge()
    assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), unmerged, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("case", CASES)
def test_meta_device_allocates_nothing(case):
    module, x = _modules()[case]
    module = module.to("meta")
    layer = _wrap(module)
    assert all(p.is_meta for p in layer.parameters())
    layer.merge()
    assert layer(x.to("meta")).is_meta


def test_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    base, x = nn.Linear(6, 6), torch.randn(4, 6)
    layer = LoRALinear(base, rank=2, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    expected = base(x) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * 2
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("case", CASES)
def test_fp32_adapters_on_bf16_base_keep_base_dtype(case):
    module, x = _modules()[case]
    module = module.to(torch.bfloat16)
    x = x if x.dtype == torch.long else x.to(torch.bfloat16)
    layer = _randomize(_wrap(module))
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.float(), layer.lora_B.float()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=0.1, rtol=0.05)
