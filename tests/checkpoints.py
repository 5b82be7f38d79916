"""Tiny Mixtral checkpoints the model-level tests share (test_model, test_weights, test_layouts, test_generate,
test_cpu_path, test_parallel): random small transformers configs, their save_pretrained checkpoints (cached per test
session), the same weights in Mistral's consolidated layout, and the relative error the parity tests bound.
transformers is imported only by the helpers that build an HF model."""
import atexit
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

import mixtral_ext as mx

# Random small configs: GQA ratios 3, 1 (plain MHA), 8; odd widths; top-1/2/3 routing; a sliding window shorter
# than the prompts. initializer_range is large so logits are spread out and greedy choices are not near-ties.
CONFIGS = {
    "gqa3_odd": dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=10, num_local_experts=5, num_experts_per_tok=2),
    "mha": dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1),
    "gqa8_top3": dict(vocab_size=131, hidden_size=56, intermediate_size=72, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=1, head_dim=6, num_local_experts=7, num_experts_per_tok=3),
    "window": dict(vocab_size=80, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=12, num_local_experts=8, num_experts_per_tok=2, sliding_window=5),
}
_CACHE = {}
_ROOT = tempfile.mkdtemp(prefix="mixtral_ext_test_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def hf_model(name, dtype=torch.float32, **overrides):
    """transformers' model for CONFIGS[name] (seeded by the name), float32, eval mode."""
    kw = dict(CONFIGS[name], max_position_embeddings=160, initializer_range=0.3, eos_token_id=None,
              bos_token_id=None, attn_implementation="eager", **overrides)
    torch.manual_seed(sum(map(ord, name)))
    import transformers  # a test extra: only the tests that build an HF model need it

    cfg = transformers.MixtralConfig(**kw)
    return transformers.MixtralForCausalLM(cfg).to(dtype).eval()


def hf_checkpoint(name, sharded=False):
    """(transformers model, checkpoint dir written by its save_pretrained), cached per test session."""
    key = (name, sharded)
    if key not in _CACHE:
        model = _CACHE[(name, not sharded)][0] if (name, not sharded) in _CACHE else hf_model(name)
        path = f"{_ROOT}/{name}{'_sharded' if sharded else ''}"
        model.save_pretrained(path, max_shard_size="16KB" if sharded else "10GB")
        _CACHE[key] = (model, path)
    return _CACHE[key]


def ours(name, sharded=False):
    """mixtral_ext's model loaded from hf_checkpoint(name, sharded)."""
    return mx.Mixtral.from_pretrained(hf_checkpoint(name, sharded)[1], progress=False)


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def hf_tensors(name):
    """{name: tensor} of the HF checkpoint of CONFIGS[name]."""
    return load_file(os.path.join(hf_checkpoint(name)[1], "model.safetensors"))


def write_hf(path, tensors, config_from="gqa3_odd", weights=True):
    """An HF-layout checkpoint at path: config.json of CONFIGS[config_from] and (weights=True) `tensors` as
    model.safetensors. Returns the path."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(hf_checkpoint(config_from)[1], "config.json")) as f:
        config = f.read()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config)
    if weights:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def rotate_half_to_interleaved(w, n_heads, head_dim):
    """The inverse of the loader's permutation: how Mistral's release stores an HF q/k projection."""
    rows, cols = w.shape
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_consolidated(path, name, n_files=2):
    """Rename and re-permute the HF checkpoint of CONFIGS[name] into Mistral's consolidated layout."""
    c = CONFIGS[name]
    Hq, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c.get("head_dim", c["hidden_size"] //
                                                                           c["num_attention_heads"])
    out = {}
    for k, v in hf_tensors(name).items():
        k = (k.replace("model.embed_tokens.", "tok_embeddings.").replace("lm_head.", "output.")
             .replace("model.norm.", "norm.").replace("model.layers.", "layers.")
             .replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm")
             .replace("block_sparse_moe", "feed_forward").replace("self_attn", "attention"))
        for hf_proj, c_proj in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            k = k.replace(hf_proj, c_proj)
        if k.endswith("attention.wq.weight"):
            v = rotate_half_to_interleaved(v, Hq, D)
        elif k.endswith("attention.wk.weight"):
            v = rotate_half_to_interleaved(v, Hkv, D)
        out[k] = v.contiguous()
    os.makedirs(path, exist_ok=True)
    names = sorted(out)
    for i in range(n_files):
        save_file({k: out[k] for k in names[i::n_files]}, os.path.join(path, f"consolidated.{i:02d}.safetensors"))
    params = {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"], "head_dim": D,
              "hidden_dim": c["intermediate_size"], "n_heads": Hq, "n_kv_heads": Hkv, "norm_eps": 1e-5,
              "vocab_size": c["vocab_size"], "rope_theta": 1e6, "max_seq_len": 160,
              "moe": {"num_experts": c["num_local_experts"], "num_experts_per_tok": c["num_experts_per_tok"]}}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    return str(path)
