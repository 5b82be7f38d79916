"""Checkpoints as they are found in the wild: every layout a maintained tool writes for Mixtral (transformers 5's
fused experts, mlx-lm's stacked experts) loads and gives transformers' logits; layouts we do not read are named;
directories holding several candidate checkpoints, or parts of them, load the one complete candidate and say which,
or name what each candidate lacks."""
import copy
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixtral_ext as mx
from mixtral_ext.weights import CheckpointError, find_checkpoint
from checkpoints import hf_checkpoint, hf_tensors, rel_err, write_consolidated, write_hf

transformers = pytest.importorskip("transformers")

NAME = "gqa3_odd"  # 3 layers, 5 experts, I=40, H=48


def _load(path):
    return mx.Mixtral.from_pretrained(str(path), progress=False)


def _ids():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))


def _hf_logits():
    hf, _ = hf_checkpoint(NAME)
    with torch.no_grad():
        return hf(_ids()).logits


def _copy(src, dst, skip=()):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f not in skip:
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


def test_transformers_v5_fused_layout_matches_transformers(tmp_path):
    """save_pretrained(save_original_format=False) of transformers >= 5 writes mlp.experts.gate_up_proj [E, 2I, H],
    mlp.experts.down_proj [E, H, I] and mlp.gate: streamed in, the logits are transformers' own."""
    hf, _ = hf_checkpoint(NAME)
    hf.save_pretrained(tmp_path, save_original_format=False)
    names = load_file(os.path.join(tmp_path, "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any("block_sparse_moe" in n for n in names)
    assert find_checkpoint(str(tmp_path))[0] == "hf-fused"
    model = _load(tmp_path)
    assert rel_err(model(_ids()), _hf_logits()) < 1e-5
    for a, b in zip(model.parameters(), _load(hf_checkpoint(NAME)[1]).parameters()):
        assert torch.equal(a, b)


def test_transformers_v5_fused_layout_sharded_in_bf16(tmp_path):
    hf, _ = hf_checkpoint(NAME)
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path, save_original_format=False, max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    model = _load(tmp_path)
    ref = _load(hf_checkpoint(NAME)[1])
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b.bfloat16().float())


def test_transformers_v5_fused_layout_is_validated(tmp_path):
    hf, _ = hf_checkpoint(NAME)
    hf.save_pretrained(tmp_path, save_original_format=False)
    t = load_file(os.path.join(tmp_path, "model.safetensors"))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    t[name] = t[name].transpose(1, 2).contiguous()
    save_file(t, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"gate_up_proj has shape \(5, 48, 80\), expected \(5, 80, 48\)"):
        _load(tmp_path)
    del t["model.layers.1.mlp.experts.gate_up_proj"]
    save_file(t, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.experts\.gate_up_proj missing"):
        _load(tmp_path)


def test_mlx_layout_matches_transformers(tmp_path):
    """mlx-lm stacks each layer's experts into block_sparse_moe.switch_mlp.{gate,up,down}_proj."""
    t = hf_tensors(NAME)
    out = {}
    for n in range(3):
        m = f"model.layers.{n}.block_sparse_moe"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{m}.switch_mlp.{theirs}.weight"] = torch.stack([t.pop(f"{m}.experts.{e}.{ours}.weight")
                                                                 for e in range(5)])
    out.update(t)
    path = write_hf(tmp_path, out)
    assert find_checkpoint(path)[0] == "mlx"
    assert rel_err(_load(path)(_ids()), _hf_logits()) < 1e-5


@pytest.mark.parametrize("suffix, layout", [(".qweight", "GPTQ/AWQ-quantized"), (".absmax", "bitsandbytes"),
                                            (".scales", "quantized"), (".weight_scale", "FP8")])
def test_quantized_layouts_are_named(tmp_path, suffix, layout):
    t = hf_tensors(NAME)
    w = t.pop("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    t["model.layers.0.block_sparse_moe.experts.0.w1" + suffix] = w
    path = write_hf(tmp_path, t)
    with pytest.raises(CheckpointError, match=rf"found a {layout}.*checkpoint \(tensor \S+{suffix}\); supported "
                                              r"layouts \(all of unquantized float weights\): Hugging Face per-expert.*Hugging Face "
                                              r"fused.*MLX.*Mistral"):
        _load(path)


def test_unknown_layout_names_what_it_found_and_what_is_supported(tmp_path):
    t = {k.replace("block_sparse_moe.experts.", "moe.expert_list."): v for k, v in hf_tensors(NAME).items()}
    path = write_hf(tmp_path, t)
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint layout \(e\.g\. tensor model\.layers\.0\.moe"
                                              r"\.\S+\); supported layouts: .*transformers >= 5"):
        _load(path)


def test_gguf_and_adapter_directories_are_named(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "mixtral-8x7b.Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"GGUF files \(mixtral-8x7b\.Q4_K_M\.gguf, llama\.cpp's format\) are "
                                              r"not supported; supported layouts"):
        _load(tmp_path / "g")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    save_file({"x": torch.ones(1)}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"a PEFT/LoRA adapter \(adapter_config\.json\), not a model"):
        _load(tmp_path / "a")


# ---- directories with several candidates ---------------------------------------------------------------------------
def test_hf_next_to_consolidated_loads_one_and_says_which(tmp_path, capfd):
    """A download of the whole repository: the HF shards, Mistral's consolidated files and its pickles."""
    path = write_consolidated(tmp_path / "both", NAME)
    _copy(hf_checkpoint(NAME)[1], path)
    with open(os.path.join(path, "consolidated.00.pth"), "wb") as f:
        pickle.dump({"x": 1}, f)
    model = _load(path)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "loading model.safetensors (hf layout)" in err[0] and "params.json and 2 consolidated" in err[0] \
        and "also complete" in err[0] and ", pickled consolidated.00.pth" in err[0], err
    assert rel_err(model(_ids()), _hf_logits()) < 1e-5


def test_incomplete_hf_next_to_complete_consolidated(tmp_path, capfd):
    path = write_consolidated(tmp_path / "c", NAME)
    t = hf_tensors(NAME)
    del t["model.norm.weight"]
    write_hf(path, t)
    assert find_checkpoint(path)[0] == "consolidated"
    err = capfd.readouterr().err
    assert "loading params.json and 2 consolidated*.safetensors file(s) (consolidated layout); ignoring " \
           "model.safetensors (hf layout) (incomplete)" in err, err
    assert rel_err(_load(path)(_ids()), _hf_logits()) < 1e-5


def _sharded(dst):
    return _copy(hf_checkpoint(NAME, sharded=True)[1], dst)


def test_stale_index_next_to_complete_shards(tmp_path, capfd):
    """An index from another revision (it names a tensor in the wrong shard): the shards themselves are complete."""
    path = _sharded(tmp_path / "s")
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        d = json.load(f)
    shards = sorted(set(d["weight_map"].values()))
    d["weight_map"]["model.norm.weight"] = next(s for s in shards if s != d["weight_map"]["model.norm.weight"])
    with open(index, "w") as f:
        json.dump(d, f)
    layout, _, files = find_checkpoint(path)
    err = capfd.readouterr().err
    assert layout == "hf" and len(files) == len(shards)
    assert f"loading {len(shards)} model-*-of-{len(shards):05d}.safetensors shard(s) (hf layout); ignoring " \
           "model.safetensors.index.json" in err, err
    assert rel_err(_load(path)(_ids()), _hf_logits()) < 1e-5


def test_leftover_shards_of_another_sharding(tmp_path, capfd):
    """Two shardings in one directory (a re-download with another shard size): the index's one is complete, the
    leftover series model-*-of-00002 is partial."""
    path = _sharded(tmp_path / "s")
    save_file({"model.norm.weight": torch.ones(48)}, os.path.join(path, "model-00001-of-00002.safetensors"))
    layout, _, files = find_checkpoint(path)
    err = capfd.readouterr().err
    assert "ignoring 1 model-*-of-00002.safetensors shard(s) (incomplete)" in err, err
    assert all("-of-00002" not in f for f in files)
    _load(path)


def test_no_complete_candidate_names_what_each_lacks(tmp_path):
    path = write_consolidated(tmp_path / "c", NAME)
    os.remove(os.path.join(path, "consolidated.01.safetensors"))
    t = hf_tensors(NAME)
    t["model.layers.0.self_attn.k_proj.weight"] = torch.ones(21, 48)
    write_hf(path, t)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    msg = str(info.value)
    assert "no complete checkpoint among 2 candidates" in msg
    assert "[model.safetensors (hf layout)] " in msg and "k_proj.weight has shape (21, 48), expected (20, 48)" in msg
    assert "[params.json and 1 consolidated*.safetensors file(s) (consolidated layout)] " in msg and \
           "missing from the checkpoint (consolidated.00.safetensors)" in msg


def test_consolidated_weights_without_params_json(tmp_path):
    path = write_consolidated(tmp_path / "c", NAME)
    os.remove(os.path.join(path, "params.json"))
    write_hf(path, {}, weights=False)
    with pytest.raises(CheckpointError, match=r"no params\.json for params\.json and 2 consolidated"):
        _load(path)


def test_index_disagreeing_with_incomplete_shards(tmp_path):
    """A shard lost a tensor that the index still names: neither the index nor the bare shard series is complete,
    and the error says what each lacks."""
    path = _sharded(tmp_path / "s")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.norm.weight"]
    t = load_file(os.path.join(path, shard))
    del t["model.norm.weight"]
    save_file(t, os.path.join(path, shard))
    want = (rf"\[model\.safetensors\.index\.json and its \d+ shard\(s\) \(hf layout\)\] \S+ disagrees with its "
            rf"shards: it puts model\.norm\.weight in {shard}, which does not hold it \(model\.norm\.weight is in none "
            rf"of them\); \[\d+ model-\*-of-\d+\.safetensors shard\(s\) \(hf layout\)\] .*tensor model\.norm\.weight "
            rf"missing")
    with pytest.raises(CheckpointError, match=want):
        find_checkpoint(path)


def test_hf_shards_with_stray_pickles_say_so(tmp_path, capfd):
    """Mixtral-Instruct's repository as downloaded: safetensors shards with their index, and .pt pickles."""
    path = _sharded(tmp_path / "s")
    (tmp_path / "s" / "consolidated.00.pt").write_bytes(b"not read")
    layout, _, files = find_checkpoint(path)
    err = capfd.readouterr().err.strip().splitlines()
    assert layout == "hf" and len(err) == 1, err
    assert err[0].endswith(f"loading model.safetensors.index.json and its {len(files)} shard(s) (hf layout); "
                           "ignoring pickled consolidated.00.pt"), err


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "base_model.model."])
def test_wrapped_model_prefix_is_named(tmp_path, prefix):
    path = write_hf(tmp_path, {prefix + k: v for k, v in hf_tensors(NAME).items()})
    with pytest.raises(CheckpointError, match=rf"every tensor name carries the prefix '{prefix}' \(a wrapped model"):
        _load(path)
