"""Tiny GGUF files written with the `gguf` package the way llama.cpp's converter writes them
(q and k projections permuted for its rotary layout, a byte-level BPE tokenizer, a chat
template), from a seeded Hugging Face Llama: the reference a GGUF load is checked against."""

from __future__ import annotations

from pathlib import Path

import torch

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
HEADS, KV_HEADS, LAYERS, HIDDEN, FF = 4, 2, 2, 32, 64


def tokens() -> list[str]:
    """Three special tokens, the 256 byte-level characters, one merge ("hi")."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return ["<s>", "</s>", "<unk>", *bytes_to_unicode().values(), "hi"]


def tiny_llama(seed: int = 0):
    """The Hugging Face model a GGUF file of `write_llama` holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens()),
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _permute(w, n_head: int):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama(path: Path, model, arch: str = "llama") -> Path:
    """``model`` (from `tiny_llama`) as a GGUF file at ``path``, every tensor in f32; ``arch``
    names the architecture in the file's metadata."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_embedding_length(HIDDEN)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens()))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens())
    w.add_token_types([3, 3, 3] + [1] * (len(tokens()) - 3))
    w.add_token_scores([0.0] * len(tokens()))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, value in model.state_dict().items():
        t = value.numpy().astype(np.float32)
        if key.endswith("q_proj.weight"):
            t = _permute(t, HEADS)
        elif key.endswith("k_proj.weight"):
            t = _permute(t, KV_HEADS)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
