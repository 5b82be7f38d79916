"""The embedded demo's checkpoint: a tiny Mixtral with random weights, written in the Hugging Face layout.

`mixtral-ext demo` (cli.py) writes one into a temporary directory and then runs the real path on it: the
sentencepiece tokenizer (the real Mixtral one, shipped in mixtral_ext/data), the checkpoint loader, the model and
its kernels (CUDA on a GPU, the PyTorch CPU path elsewhere), streaming generation. The weights are random, so the
text is meaningless; the vocabulary is the real 32000 pieces, so it decodes to real (random) words.
Tests use it as a small checkpoint as well.
"""
import os
import shutil

import torch
from safetensors.torch import save_file

from .config import MixtralConfig
from .tokenizer import BUNDLED_TOKENIZER

PROMPT = "The Mixtral-8x7B mixture of experts routes each token to"


def tiny_config(**overrides):
    """The demo's model on a CPU: 2 layers, hidden 64, 8 experts (top-2), 4 query / 2 KV heads of 16, vocab 32000."""
    return MixtralConfig.from_name("tiny", **overrides)


def demo_config(device, quantize=None):
    """The demo's model for `device`. On a GPU the CUDA kernels run, and they are specialised for Mixtral's head
    size (128) and grouping (4 query heads per KV head), so the GPU demo keeps those and is small elsewhere: 2 layers,
    hidden 1024, 8 query / 2 KV heads of 128, 8 experts (top-2) of width 2048. With quantize="int4" on the CPU the
    hidden size is 128 instead of 64, since int4 groups 128 inputs per scale."""
    if str(device).startswith("cuda"):
        return tiny_config(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=128)
    return tiny_config(hidden_size=128, head_dim=32) if quantize == "int4" else tiny_config()


def random_weights(cfg, seed=0, dtype=torch.float32, std=0.02):
    """{HF tensor name: tensor} for `cfg`: normal(0, std) matrices (transformers' initializer_range) and norm
    weights near 1."""
    H, I, E, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim
    Hq, Hkv, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)

    w = {"model.embed_tokens.weight": normal(V, H), "model.norm.weight": norm()}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = normal(V, H)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        w[f"{p}.input_layernorm.weight"] = norm()
        w[f"{p}.post_attention_layernorm.weight"] = norm()
        w[f"{p}.self_attn.q_proj.weight"] = normal(Hq * D, H)
        w[f"{p}.self_attn.k_proj.weight"] = normal(Hkv * D, H)
        w[f"{p}.self_attn.v_proj.weight"] = normal(Hkv * D, H)
        w[f"{p}.self_attn.o_proj.weight"] = normal(H, Hq * D)
        w[f"{p}.block_sparse_moe.gate.weight"] = normal(E, H)
        for e in range(E):
            w[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = normal(I, H)
            w[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = normal(I, H)
            w[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = normal(H, I)
    return w


def build_tiny_checkpoint(path, cfg=None, seed=0, dtype=torch.float32, tokenizer=True):
    """Write config.json, model.safetensors and (tokenizer=True) the bundled tokenizer.model into the directory
    `path` (created if needed). Returns the config."""
    cfg = cfg or tiny_config()
    if tokenizer and cfg.vocab_size != 32000:
        raise ValueError(f"the bundled tokenizer has 32000 pieces; a config with vocab_size={cfg.vocab_size} "
                         f"cannot use it (pass tokenizer=False)")
    os.makedirs(path, exist_ok=True)
    cfg.save(path)
    save_file(random_weights(cfg, seed, dtype), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        shutil.copyfile(BUNDLED_TOKENIZER, os.path.join(path, "tokenizer.model"))
    return cfg
