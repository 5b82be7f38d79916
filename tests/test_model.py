"""The whole model on the CPU (the CPU path, and the reference ops where marked cpu_impl) against transformers'
MixtralForCausalLM: float32 logits, KV-cache consistency (every decode step equals the full forward), ragged batches.
"""
import pytest
import torch

import mixtral_ext as mx
from mixtral_ext.model import KVCache
from checkpoints import CONFIGS, hf_checkpoint, hf_model, ours, rel_err

transformers = pytest.importorskip("transformers")


@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    hf, _ = hf_checkpoint(name)
    model = ours(name)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


def test_sharded_checkpoint_gives_the_same_logits():
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    single, sharded = ours("gqa3_odd"), ours("gqa3_odd", sharded=True)
    assert torch.equal(single(ids), sharded(ids))


@pytest.mark.usefixtures("cpu_impl")
def test_tied_embeddings(tmp_path):
    hf = hf_model("mha", tie_word_embeddings=True)
    path = str(tmp_path / "tied")
    hf.save_pretrained(path)
    model = mx.Mixtral.from_pretrained(path, progress=False)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(model(ids), ref) < 1e-4


@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("name", ["gqa3_odd", "window"])
def test_each_decode_step_matches_the_full_forward(name):
    """Prefill two ragged prompts, then decode: the logits of every step equal the full no-cache forward of the
    same tokens at that position (the window config's prompts are longer than its window)."""
    model = ours(name)
    V = CONFIGS[name]["vocab_size"]
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 12)]
    steps = 6
    cache = KVCache(model.config, 2, 12 + steps, "cpu", torch.float32)
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        logits = model.prefill(prompts, cache)
        positions = torch.tensor([7, 12], dtype=torch.int32)
        seq_ids = torch.arange(2, dtype=torch.int32)
        for _ in range(steps):
            for b in range(2):
                full = model(torch.tensor([seqs[b]]))[0, -1]
                assert rel_err(logits[b], full) < 1e-5, f"sequence {b} at length {len(seqs[b])}"
            nxt = logits.argmax(-1)
            for b in range(2):
                seqs[b].append(int(nxt[b]))
            logits = model.decode_step(nxt, positions, seq_ids, cache)
            positions += 1


def test_forward_input_checks():
    model = ours("mha")
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"vocab_size=64"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="max_position_embeddings=160"):
        model(torch.zeros(1, 161, dtype=torch.long))


def test_public_api_names():
    assert mx.Mixtral is mx.model.Mixtral
    assert mx.MixtralConfig is mx.config.MixtralConfig
    model = ours("mha")
    assert isinstance(model, torch.nn.Module) and model.config.num_key_value_heads == 4
    assert model.layers[0].moe.w13.shape == (4, 48, 32)  # [E, 2I, H]
    assert model.layers[0].attention.wqkv.shape == ((4 + 2 * 4) * 8, 32)  # [(Hq + 2 Hkv) D, H]
