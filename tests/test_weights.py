"""Checkpoint loading: the packed layouts, the consolidated (Mistral) layout and its q/k permutation, every error
case (type and message), the fits-in-GPU-memory check, and peak host memory while loading."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixtral_ext as mx
from mixtral_ext.config import MixtralConfig
from mixtral_ext.reference import apply_rope, rope_cos_sin
from mixtral_ext.weights import (CheckpointError, ModelTooLargeError, _interleaved_to_rotate_half, check_fits,
                                 expected_tensors, param_bytes)
from checkpoints import CONFIGS, hf_checkpoint, hf_tensors, ours, rel_err, write_consolidated, write_hf

transformers = pytest.importorskip("transformers")


def test_packing_layout():
    """wqkv stacks q, k, v rows; w13 interleaves w1 and w3 by row (w13[e, 2i] = w1[e, i], w13[e, 2i+1] = w3[e, i]);
    w2 is stacked per expert; everything else is copied as stored."""
    t = hf_tensors("gqa3_odd")
    model = ours("gqa3_odd")
    for n, layer in enumerate(model.layers):
        p = f"model.layers.{n}"
        a = f"{p}.self_attn"
        assert torch.equal(layer.attention.wqkv, torch.cat([t[f"{a}.q_proj.weight"], t[f"{a}.k_proj.weight"],
                                                            t[f"{a}.v_proj.weight"]]))
        assert torch.equal(layer.attention.wo, t[f"{a}.o_proj.weight"])
        assert torch.equal(layer.moe.gate, t[f"{p}.block_sparse_moe.gate.weight"])
        assert torch.equal(layer.attn_norm, t[f"{p}.input_layernorm.weight"])
        assert torch.equal(layer.ffn_norm, t[f"{p}.post_attention_layernorm.weight"])
        for e in range(5):
            x = f"{p}.block_sparse_moe.experts.{e}"
            w1, w3 = t[f"{x}.w1.weight"], t[f"{x}.w3.weight"]
            for i in (0, 1, w1.shape[0] - 1):
                assert torch.equal(layer.moe.w13[e, 2 * i], w1[i]) and torch.equal(layer.moe.w13[e, 2 * i + 1], w3[i])
            assert torch.equal(layer.moe.w2[e], t[f"{x}.w2.weight"])
    assert torch.equal(model.embed, t["model.embed_tokens.weight"]) and torch.equal(model.lm_head, t["lm_head.weight"])


def test_loads_to_the_requested_dtype():
    model = mx.Mixtral.from_pretrained(hf_checkpoint("mha")[1], dtype=torch.bfloat16, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = ours("mha")
    assert torch.equal(model.layers[1].moe.w13, ref.layers[1].moe.w13.bfloat16())
    assert model._rope.dtype == torch.float32


def test_interleaved_rope_equals_rotate_half_after_the_permutation():
    """Independent check of the conversion math: Mistral's RoPE (complex rotation of adjacent pairs) on the
    interleaved projection equals rotate-half RoPE on the converted projection, up to the same permutation of each
    head's dimensions for q and k, so the attention scores q.k are identical (apply_rope works in float32, hence
    the tolerance; a wrong permutation is off by O(1))."""
    g = torch.Generator().manual_seed(0)
    heads, D, H, T = 3, 8, 20, 9
    w = torch.randn(heads * D, H, generator=g, dtype=torch.float64)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    pos = torch.arange(T) * 37
    cs = rope_cos_sin(int(pos.max()) + 1, D, 1e6).double()[pos]
    # Mistral: pairs (x[2i], x[2i+1]) as complex numbers times exp(i * p * f_i).
    y = (x @ w.t()).view(T, heads, D // 2, 2)
    rot = torch.view_as_real(torch.view_as_complex(y.contiguous()) *
                             torch.polar(torch.ones_like(cs[:, None, :D // 2]), torch.atan2(cs[:, None, D // 2:],
                                                                                           cs[:, None, :D // 2])))
    mistral = rot.reshape(T, heads, D)
    ours_ = apply_rope((x @ _interleaved_to_rotate_half(w, heads, D).t()).view(T, heads, D), cs)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])  # rotate-half dim j <- interleaved dim perm[j]
    torch.testing.assert_close(ours_, mistral[..., perm], rtol=1e-5, atol=1e-5)
    scores = lambda q: torch.einsum("thd,shd->hts", q, q)  # noqa: E731
    torch.testing.assert_close(scores(ours_), scores(mistral), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa3_odd", "gqa8_top3"])
def test_consolidated_layout_gives_the_hf_logits(tmp_path, name):
    path = write_consolidated(tmp_path / "c", name)
    cons = mx.Mixtral.from_pretrained(path, progress=False)
    hf = ours(name)
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "num_local_experts", "num_experts_per_tok", "vocab_size", "rope_theta", "sliding_window")
    assert [getattr(cons.config, f) for f in fields] == [getattr(hf.config, f) for f in fields]
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    assert rel_err(cons(ids), hf(ids)) < 1e-6


# ---- errors ------------------------------------------------------------------------------------------------------
def _expect(path, match):
    with pytest.raises(CheckpointError, match=match):
        mx.Mixtral.from_pretrained(str(path), progress=False)


def test_missing_tensor(tmp_path):
    t = hf_tensors("gqa3_odd")
    del t["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    _expect(write_hf(tmp_path, t), r"tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight missing "
                                    r"from the checkpoint \(model\.safetensors\)")


def test_unexpected_tensor(tmp_path):
    t = hf_tensors("gqa3_odd")
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(5)
    _expect(write_hf(tmp_path, t), r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.rotary_emb")


def test_checkpoint_with_more_layers_than_the_config(tmp_path):
    t = hf_tensors("gqa3_odd")
    t["model.layers.3.input_layernorm.weight"] = torch.ones(48)
    _expect(write_hf(tmp_path, t), r"unexpected tensor model\.layers\.3\.input_layernorm\.weight")


def test_wrong_shape(tmp_path):
    t = hf_tensors("gqa3_odd")
    t["model.layers.2.self_attn.k_proj.weight"] = torch.ones(21, 48)
    _expect(write_hf(tmp_path, t), r"model\.safetensors: tensor model\.layers\.2\.self_attn\.k_proj\.weight has "
                                    r"shape \(21, 48\), expected \(20, 48\)")


def test_wrong_dtype(tmp_path):
    t = hf_tensors("gqa3_odd")
    t["model.norm.weight"] = torch.ones(48, dtype=torch.int32)
    _expect(write_hf(tmp_path, t), r"tensor model\.norm\.weight has dtype I32")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_shard(tmp_path, damage):
    path = write_hf(tmp_path, hf_tensors("gqa3_odd"))
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[:len(data) - 1000] if damage == "truncated" else b"\x07" * 64)
    _expect(path, r"model\.safetensors: corrupt or truncated safetensors file")


def test_index_naming_a_missing_shard(tmp_path):
    src = hf_checkpoint("gqa3_odd", sharded=True)[1]
    os.makedirs(tmp_path / "s")
    files = sorted(f for f in os.listdir(src) if f.startswith("model-"))
    for f in os.listdir(src):
        if f != files[1]:
            with open(os.path.join(src, f), "rb") as a, open(tmp_path / "s" / f, "wb") as b:
                b.write(a.read())
    _expect(tmp_path / "s", rf"model\.safetensors\.index\.json: shard {files[1]} \(holding \S+\) does not exist")


def test_unreadable_index(tmp_path):
    path = write_hf(tmp_path, {}, weights=False)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write("{not json")
    _expect(path, r"model\.safetensors\.index\.json: unreadable shard index")


def test_duplicate_tensor_across_shards(tmp_path):
    path = write_consolidated(tmp_path / "c", "mha")
    extra = load_file(os.path.join(path, "consolidated.00.safetensors"))
    name = sorted(extra)[0]
    save_file({name: extra[name]}, os.path.join(path, "consolidated.02.safetensors"))
    _expect(path, rf"consolidated\.02\.safetensors: tensor {name} appears again \(already in consolidated\.00")


def test_unreadable_config(tmp_path):
    path = write_hf(tmp_path, hf_tensors("gqa3_odd"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "mixtral", ')
    with pytest.raises(ValueError, match=r"config\.json: unreadable config \(JSONDecodeError"):
        mx.Mixtral.from_pretrained(path, progress=False)


def test_not_a_checkpoint(tmp_path):
    _expect(tmp_path, r"neither config\.json \(HF layout\) nor params\.json")
    _expect(tmp_path / "nope", r"nope: not a checkpoint directory")


class _Exploit:
    """Unpickling this creates a marker file: the loader must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_never_unpickled(tmp_path):
    path = write_hf(tmp_path / "ck", {}, weights=False)
    marker = tmp_path / "pwned"
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump({"model.norm.weight": _Exploit(str(marker))}, f)
    _expect(path, r"only pickled weights \(pytorch_model\.bin\); they are not loaded because unpickling can run "
                  r"arbitrary code")
    assert not marker.exists()


def test_model_too_large_for_the_gpu_fails_early():
    cfg = MixtralConfig.from_name("mixtral-8x7b")
    assert param_bytes(cfg, torch.bfloat16) == pytest.approx(93.4e9, rel=0.01)  # Mixtral-8x7B: 46.7 B parameters
    with pytest.raises(ModelTooLargeError, match=r"needs 87\.\d GiB for its weights plus 1\.0 GiB headroom, but "
                                                 r"cuda:0 has 78\.0 GiB free of 79\.6 GiB.*int8"):
        check_fits(cfg, torch.bfloat16, "cuda:0", free_bytes=78 * 2 ** 30, total_bytes=79.6 * 2 ** 30)
    check_fits(cfg, torch.bfloat16, "cuda:0", free_bytes=139 * 2 ** 30)  # an H200 holds it


def test_expected_tensor_count():
    cfg = MixtralConfig.from_name("mixtral-8x7b")
    n = 3 + 32 * (2 + 4 + 1 + 8 * 3)  # embed/norm/lm_head; per layer 2 norms, q/k/v/o, router, 8 x w1/w2/w3
    assert len(expected_tensors(cfg, "hf")) == n == len(expected_tensors(cfg, "consolidated"))


_RSS_SCRIPT = """
import resource, sys
import mixtral_ext as mx
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mx.Mixtral.from_pretrained(sys.argv[1], progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_peak_host_memory_while_loading(tmp_path):
    """Peak RSS growth while loading a sharded checkpoint stays near the model's size plus one shard (whose
    memory-mapped pages count while it is open), far from the two copies a load-then-convert would hold."""
    cfg = MixtralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    names = list(expected_tensors(cfg, "hf").items())
    g = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    for i in range(4):
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        part = {n: torch.randn(shape, generator=g) for n, (_, shape, _, _) in names[i::4]}
        save_file(part, tmp_path / file, metadata={"format": "pt"})
        largest = max(largest, os.path.getsize(tmp_path / file))
        weight_map.update(dict.fromkeys(part, file))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg.save(tmp_path)
    model_bytes = param_bytes(cfg, torch.float32)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(mx.__file__)))
    peak = int(out.stdout.split()[-1])
    assert peak < model_bytes + 1.5 * largest + (24 << 20), (peak, model_bytes, largest)


def test_in_memory_transformers_state_equals_its_checkpoint():
    """load_transformers_state (transformers >= 5 fused expert names) packs exactly what save_pretrained's checkpoint
    gives (per-expert names)."""
    from mixtral_ext.weights import load_transformers_state
    hf, _ = hf_checkpoint("gqa3_odd")
    ref = ours("gqa3_odd")
    model = mx.Mixtral(ref.config)
    load_transformers_state(hf.state_dict(), ref.config, dict(model.named_parameters()))
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name
    state = dict(hf.state_dict())
    state.pop(next(k for k in state if k.endswith("down_proj") or k.endswith("experts.0.w2.weight")))
    with pytest.raises(CheckpointError, match=r"transformers state: tensor model\.layers\.0\.block_sparse_moe\."
                                              r"experts\.0\.w2\.weight missing"):
        load_transformers_state(state, ref.config, dict(model.named_parameters()))


def test_model_too_large_for_host_memory_fails_early_and_names_a_dtype_that_fits(monkeypatch, tmp_path):
    """On the CPU the host's available memory is checked before allocating (the OOM killer would end the process
    silently): Mixtral-8x7B in float32 (187 GB) on a 128 GiB machine names bfloat16, which fits."""
    cfg = MixtralConfig.from_name("mixtral-8x7b")
    with pytest.raises(ModelTooLargeError, match=r"float32\) needs 174\.\d GiB .* this machine has 120\.0 GiB of "
                                                 r"memory available of 128\.0 GiB\. In bfloat16 it needs 87\.\d GiB, "
                                                 r"which fits: pass dtype=torch\.bfloat16 \(mixtral-ext --dtype "
                                                 r"bf16\)"):
        check_fits(cfg, torch.float32, "cpu", free_bytes=120 * 2 ** 30, total_bytes=128 * 2 ** 30)
    with pytest.raises(ModelTooLargeError, match=r"Even bfloat16 needs 87\.\d GiB: use a machine with more memory"):
        check_fits(cfg, torch.bfloat16, "cpu", free_bytes=24 * 2 ** 30)
    check_fits(cfg, torch.bfloat16, "cpu", free_bytes=120 * 2 ** 30)
    # from_pretrained measures the host (mixtral_ext.weights.host_memory) and fails before allocating anything.
    import mixtral_ext.model as model_mod
    import mixtral_ext.weights as weights_mod
    path = write_hf(tmp_path, hf_tensors("gqa3_odd"))
    need = param_bytes(mx.MixtralConfig.from_pretrained(path), torch.float32)
    monkeypatch.setattr(weights_mod, "host_memory", lambda: ((1 << 30) + need // 2, None))
    monkeypatch.setattr(model_mod.Mixtral, "__init__", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(ModelTooLargeError, match=r"In bfloat16 it needs 0\.0 GiB, which fits"):
        mx.Mixtral.from_pretrained(path, progress=False)


def test_host_memory_is_measured():
    from mixtral_ext.weights import host_memory
    available, total = host_memory()
    assert 0 < available <= total


def test_the_loading_bar_is_tqdm_and_silent_when_disabled(capsys):
    from mixtral_ext.weights import _progress
    for enabled in (False, True):
        bar = _progress(3, enabled, "ckpt")
        for _ in range(3):
            bar.update(1)
        bar.close()
        err = capsys.readouterr().err
        assert ("loading ckpt" in err and "3/3" in err) if enabled else err == "", err
