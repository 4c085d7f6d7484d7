"""The contract every registered PEFT method passes, on five small models.

Each method in ``peftplan.backends.methods()`` (except ``none``) is applied with its
``Method.example`` hyper-parameters to every site of each model whose op it tunes, and
checked for properties, not numbers copied from a run:

- identity at initialisation (unless the method sets ``identity_at_init = False``);
- ``param_count`` summed over the plan equals the trainable parameters created;
- only adapter tensors receive gradients, base weights keep ``.grad is None``;
- merged == unmerged where ``can_merge`` allows, and ``unmerge`` restores the base weights;
- ``extra_ops`` per call equals the aten kernels (views aside) the tuned model's forward
  runs beyond the base model's, counted by a ``TorchDispatchMode``, unmerged and merged;
- ``sized`` hyper-parameters cost at most LoRA at that rank plus ``fixed_params``;
- ``band`` (how a search space sizes the method) agrees with ``sized`` and ``size``;
- ``save`` → ``load`` onto a fresh copy of the base gives identical outputs;
- 30 AdamW steps fit the outputs of a perturbed copy of the tuned model (a teacher the
  method can match) better than at the start;
- bfloat16 forward and backward are finite;
- applying on the meta device allocates nothing, and the model runs once materialised.

A new method is one file registering a `Method`; this suite picks it up by itself:

    $ pytest tests/backends/test_contract.py -k "lora and llama" -q
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import peftplan  # noqa: F401  (registers every method)
from peftplan.backends import (
    adapter_tensors,
    apply,
    aux_loss,
    count_trainable,
    load,
    merge,
    methods,
    save,
    trainable_parameters,
    unmerge,
)
from peftplan.backends.base import Method, register
from peftplan.ir import SiteGraph, lower
from peftplan.ir.kernels import KernelCount
from peftplan.ir.modules import module_op, static_site
from peftplan.plan import Plan
from tests import zoo
from tests.backends.adapters import frozen
from tests.backends.references import saved_elements

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, above all on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(1, zoo.V, (2, 8), generator=g)  # (B, T)


@dataclass(frozen=True)
class Model:
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]


MODELS = {
    "mlp": Model(zoo.MLP, lambda g: torch.randn(4, 8, generator=g)),  # (B, d)
    "cnn": Model(zoo.CNN, lambda g: torch.randn(2, 3, 8, 8, generator=g)),  # (B, C, H, W)
    "bert": Model(zoo.bert, _ids),
    "llama": Model(zoo.llama, _ids),
    "gpt2": Model(zoo.gpt2, _ids),  # HF Conv1D linears, lm_head tied to wte
}
CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in sorted(methods()) if m != "none" for k in MODELS]
each_case = pytest.mark.parametrize("method_name, model_name", CASES)


# -- helpers ---------------------------------------------------------------------------------


def _make(model_name: str) -> nn.Module:
    """A fresh model; the same seed gives the same base weights every time."""
    torch.manual_seed(0)
    return MODELS[model_name].make().eval()  # eval: dropout off, outputs comparable


def _inputs(model_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = MODELS[model_name].inputs(torch.Generator().manual_seed(1))
    return x.to(dtype) if x.is_floating_point() else x


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    o = model(x)
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@functools.cache
def _graph(model_name: str) -> SiteGraph:
    return lower(_make(model_name))


def _plan(method: Method, model_name: str) -> Plan:
    """``method`` with its example hyper-parameters on every site whose op it tunes. Of sites
    sharing one weight (GPT-2's wte and lm_head) only the first is tuned: one weight, one delta."""
    graph = _graph(model_name)
    sites, taken = {}, set()
    for s in graph:
        if s.op not in method.ops or taken & set(s.tied):
            continue
        taken.add(s.name)
        sites[s.name] = {
            "method": method.name,
            **method.example,
            "role": s.role,
            "depth": s.depth,
            "op": s.op,
            "shape": [s.in_features, s.out_features],
        }
    if not sites:
        ops = sorted({s.op for s in graph})
        pytest.skip(f"{method.name} tunes {sorted(method.ops)}; model {model_name} has only {ops} sites")
    return Plan(sites=sites, model={"fingerprint": graph.fingerprint})


def _setup(method_name: str, model_name: str) -> tuple[Method, Plan, nn.Module]:
    method = methods()[method_name]
    plan = _plan(method, model_name)
    return method, plan, _make(model_name)


def _perturb(model: nn.Module, std: float = 0.1) -> None:
    """Move every trainable tensor off its initial value, so deltas are live (LoRA's B ≠ 0)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def _loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error to ``target`` (zeros by default), without auxiliary losses."""
    y = _out(model, x).float()
    target = torch.zeros_like(y) if target is None else target
    return (y - target).pow(2).mean()


def _kernels(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), KernelCount() as count:
        _out(model, x)
    return count.kernels


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


# -- the contract ----------------------------------------------------------------------------


@each_case
def test_identity_at_init(method_name, model_name):
    method, plan, model = _setup(method_name, model_name)
    if not method.identity_at_init:
        pytest.skip(f"{method_name} declares identity_at_init = False")
    x = _inputs(model_name)
    with torch.no_grad():
        expected = _out(model, x)
        got = _out(apply(model, plan), x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@each_case
def test_param_count_equals_trainable_parameters(method_name, model_name):
    method, plan, model = _setup(method_name, model_name)
    graph = _graph(model_name)
    expected = {n: method.param_count(graph[n], **plan.hyper(e)) for n, e in plan.sites.items()}
    apply(model, plan)
    assert count_trainable(model) == sum(expected.values()), f"per site, param_count says {expected}"


@each_case
def test_only_adapter_tensors_get_gradients(method_name, model_name):
    _, plan, model = _setup(method_name, model_name)
    apply(model, plan)
    _perturb(model)
    (_loss(model, _inputs(model_name)) + 0.01 * aux_loss(model)).backward()
    adapters = {id(t) for t in adapter_tensors(model).values()}
    graded = {n: p for n, p in model.named_parameters() if p.grad is not None}
    stray = sorted(n for n, p in graded.items() if id(p) not in adapters)
    assert not stray, f"base weights received gradients: {stray[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in graded.values()), "no adapter tensor got a non-zero gradient"


@each_case
def test_merge_equals_unmerged_and_unmerge_restores_base(method_name, model_name):
    method, plan, model = _setup(method_name, model_name)
    graph = _graph(model_name)
    mergeable = {n for n, e in plan.sites.items() if method.can_merge(graph[n], **plan.hyper(e)) is None}
    tied = {
        n for n in mergeable if graph[n].tied
    }  # `merge` may leave these: a folded delta would change the other user
    apply(model, plan)
    _perturb(model)
    x = _inputs(model_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = _out(model, x)
        report = merge(model)
        merged = _out(model, x)
    assert mergeable - tied <= set(report.merged) <= mergeable, str(report)
    assert set(report.merged) | set(report.left) == set(plan.sites), str(report)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    unmerge(model)
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"{k} after unmerge: {m}")
    with torch.no_grad():
        torch.testing.assert_close(_out(model, x), unmerged, atol=1e-6, rtol=1e-6)


@each_case
def test_extra_ops_are_the_kernels_the_wrapped_forward_adds(method_name, model_name):
    method, plan, model = _setup(method_name, model_name)
    graph, x = _graph(model_name), _inputs(model_name)
    base = _kernels(model, x)
    apply(model, plan)
    _perturb(model)

    def declared(names) -> int:
        return sum(method.extra_ops(graph[n], **plan.hyper(plan.sites[n])) * graph[n].calls for n in names)

    assert _kernels(model, x) - base == declared(plan.sites), "unmerged"
    report = merge(model)
    assert _kernels(model, x) - base == declared(report.left), f"merged: {report}"


@pytest.mark.parametrize("method_name", [m for m in sorted(methods()) if m != "none"])
def test_sized_costs_at_most_lora_plus_fixed_params(method_name):
    method, lora = methods()[method_name], methods()["lora"]
    checked = 0
    for site in [*_graph("cnn"), *_graph("gpt2"), *_graph("bert")]:
        if site.op not in method.ops or site.op not in lora.ops:
            continue
        top = min(site.in_features, site.out_features)
        for rank, experts in itertools.product(sorted({1, 2, 3, top}), (1, 3)):
            hp = method.sized(site, rank, experts=experts)
            if hp is None:
                assert all(method.sized(site, r) is None for r in (1, top)), "a size knob for some ranks only"
                continue
            hp = method.validate(site, **hp)  # sized gives valid hyper-parameters
            limit = lora.param_count(site, rank=rank) + method.fixed_params(site, experts=experts)
            assert method.param_count(site, **hp) <= limit, f"{site.name} rank {rank} experts {experts}: {hp}"
            checked += 1
    if method.sized(_graph("bert").sites[-1], 1) is not None:
        assert checked, f"{method_name} has a size knob but no site was checked"


@pytest.mark.parametrize("method_name", sorted(methods()))
def test_band_says_how_sized_sizes(method_name):
    """What a search space reads of a method: a "vector" one has no size knob, a "rank" one is
    sized at every rank, a "fixed" one validates at its `Method.size` default and bounds."""
    method = methods()[method_name]
    sites = [s for s in [*_graph("cnn"), *_graph("gpt2"), *_graph("bert")] if s.op in method.ops]
    assert sites or method.band is None
    for site in sites:
        sized = [method.sized(site, r) for r in sorted({1, min(site.in_features, site.out_features)})]
        if method.band == "vector":
            assert sized == [None] * len(sized), f"{site.name}: a vector method with a size knob"
        elif method.band == "rank":
            assert None not in sized, f"{site.name}: a rank method without a size at some rank"
        elif method.band == "fixed":
            for value in (method.size.low, method.size.default, method.size.high):
                hp = method.validate(site, **{method.size.name: value})
                assert method.param_count(site, **hp) > 0


@pytest.mark.parametrize(
    "declared", [{"band": "ranked"}, {"band": "fixed"}, {"band": "vector", "structure": "experts"}]
)
def test_a_method_whose_band_declarations_disagree_is_not_registered(declared):
    attrs = {
        "name": "odd",
        "ops": frozenset({"linear"}),
        **declared,
        **{
            k: (lambda self, *a, **hp: 0)
            for k in ("param_count", "overhead_flops", "extra_ops", "saved_activations", "wrap")
        },
    }
    before = methods()
    with pytest.raises(ValueError, match="band"):
        register(type("Odd", (Method,), attrs))
    assert methods() == before


def test_a_method_missing_an_abstract_hook_is_not_registered():
    class Half(Method):
        name = "half"
        ops = frozenset({"linear"})

        def param_count(self, site, **hp):
            return 0

    before = methods()
    with pytest.raises(TypeError, match=r"'extra_ops', 'overhead_flops', 'saved_activations', 'wrap'"):
        register(Half)
    assert methods() == before


@each_case
def test_save_load_gives_identical_outputs(method_name, model_name, tmp_path):
    _, plan, model = _setup(method_name, model_name)
    apply(model, plan)
    _perturb(model)
    save(model, tmp_path)
    loaded = load(_make(model_name), tmp_path)
    x = _inputs(model_name)
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, x), _out(model, x), atol=0, rtol=0)


@each_case
def test_training_reduces_loss(method_name, model_name):
    _, plan, teacher = _setup(method_name, model_name)
    x = _inputs(model_name)
    apply(teacher, plan)
    _perturb(teacher)
    with torch.no_grad():
        target = _out(teacher, x).float()  # reachable by the method from its initial state
    model = apply(_make(model_name), plan)
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = _loss(model, x, target)
        opt.zero_grad()
        (loss + 0.01 * aux_loss(model)).backward()  # a router's balance loss, as in training
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.4g} → {losses[-1]:.4g}"


@each_case
def test_bfloat16_forward_and_backward_are_finite(method_name, model_name):
    _, plan, before = _setup(method_name, model_name)
    after = _make(model_name)
    apply(before.to(torch.bfloat16), plan)  # adapters built on a bf16 base
    apply(after, plan).to(torch.bfloat16)  # an fp32 tuned model cast afterwards
    x = _inputs(model_name, torch.bfloat16)
    for model in (before, after):
        _perturb(model)
        loss = _loss(model, x) + 0.01 * aux_loss(model)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in trainable_parameters(model).values() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


@each_case
def test_meta_device_allocates_nothing_until_materialised(method_name, model_name):
    _, plan, real = _setup(method_name, model_name)
    apply(real, plan)
    _perturb(real)
    with torch.device("meta"):
        model = _make(model_name)
    apply(model, plan)
    on_cpu = sorted(n for n, t in _tensors(model).items() if not t.is_meta)
    assert not on_cpu, f"allocated on {method_name} apply: {on_cpu[:5]}"
    model.to_empty(device="cpu")
    values = _tensors(real)
    with torch.no_grad():
        for n, t in itertools.chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        ):
            t.copy_(values[n])
        x = _inputs(model_name)
        torch.testing.assert_close(_out(model, x), _out(real, x), atol=0, rtol=0)


# -- saved activations: the training-memory cost against what autograd keeps ---------------

SAVED_MODULES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {  # (module, input)
    "linear": lambda: (nn.Linear(12, 7), torch.randn(3, 5, 12)),
    "linear_wide": lambda: (nn.Linear(24, 40), torch.randn(3, 5, 24)),
    "linear_no_bias": lambda: (nn.Linear(12, 7, bias=False), torch.randn(3, 5, 12)),
    "conv1d_hf": lambda: (Conv1D(7, 12), torch.randn(3, 5, 12)),
    "conv2d": lambda: (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 6, 6)),
    "conv2d_strided": lambda: (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)),
    "conv2d_grouped": lambda: (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 9, 9)),
    "conv2d_grouped_no_bias": lambda: (nn.Conv2d(4, 6, 3, groups=2, bias=False), torch.randn(2, 4, 7, 7)),
    # stride 1, same padding: input and output maps have one size, as input scaling assumes
    "conv2d_grouped_reflect": lambda: (
        nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
        torch.randn(2, 4, 6, 6),
    ),
    "embedding": lambda: (nn.Embedding(20, 8, padding_idx=0), torch.randint(0, 20, (3, 5))),
    "layernorm": lambda: (nn.LayerNorm(8), torch.randn(3, 5, 8)),
    "groupnorm": lambda: (nn.GroupNorm(2, 6), torch.randn(2, 6, 4, 4)),
    "rmsnorm": lambda: (nn.RMSNorm(8), torch.randn(3, 5, 8)),
}
# The hyper-parameters that change what a method saves, on the module kinds it tunes.
SAVED_VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "lora": [("linear_wide", {"rank": 4})],
    "full": [("linear_wide", {})],
    "none": [("linear_wide", {})],
    "adapter": [
        ("linear", {"bottleneck": 3, "placement": p, "activation": a})
        for p in ("serial", "parallel")
        for a in ("gelu", "relu", "silu", "tanh")
    ],
    "dora": [
        ("linear", {"rank": 3}),
        ("linear", {"rank": 3, "dropout": 0.1}),
        ("conv1d_hf", {"rank": 3}),
        ("conv2d", {"rank": 3}),
        ("linear_no_bias", {"rank": 3, "dropout": 0.2}),
    ],
    "ia3": [
        (k, {"placement": p})
        for k in ("linear", "linear_no_bias", "conv1d_hf", "conv2d", "conv2d_grouped_reflect")
        for p in ("output", "input")
    ],
    "moe_lora": [("linear", {"experts": 4, "rank": 2, "top_k": k}) for k in (1, 3)],
    "sparse": [
        (k, {"density": d})
        for k in ("linear", "conv1d_hf", "conv2d_strided", "conv2d_grouped", "embedding")
        for d in (0.05, 0.2)
    ],
    "ssf": [
        (k, {})
        for k in (
            "linear",
            "linear_no_bias",
            "conv1d_hf",
            "conv2d_strided",
            "conv2d_grouped_no_bias",
            "embedding",
            "layernorm",
            "groupnorm",
            "rmsnorm",
        )
    ],
}
SAVED_CASES = [
    pytest.param(m, kind, hp, id=f"{m}-{kind}-" + "-".join(f"{k}={v}" for k, v in hp.items()))
    for m in sorted(methods())
    for kind, hp in SAVED_VARIANTS.get(m, [("linear", methods()[m].example)])  # a new method: its example
]


@pytest.mark.parametrize("method_name, module_kind, hp", SAVED_CASES)
def test_saved_activations_equal_what_autograd_saves(method_name, module_kind, hp):
    """``saved_activations`` counts exactly the elements autograd keeps for backward beyond
    what the frozen module keeps, in training mode (dropout masks included)."""
    torch.manual_seed(0)
    module, x = SAVED_MODULES[module_kind]()
    if x.is_floating_point():
        x.requires_grad_(True)  # as inside a model
    method = methods()[method_name]
    site = replace(static_site("m", module, module_op(module)), out_shape=tuple(module(x).shape))
    full = method.validate(site, **hp)
    before = saved_elements(frozen(copy.deepcopy(module)), x)
    layer = method.wrap(frozen(module), site, **full)  # as apply does: freeze, then wrap
    assert saved_elements(layer, x) - before == method.saved_activations(site, site.tokens, **full)
