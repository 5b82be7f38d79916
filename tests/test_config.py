"""MixtralConfig: presets, config.json (old and transformers >= 5 spelling) and params.json, validation errors."""
import dataclasses
import json

import pytest

from mixtral_ext.config import PRESETS, MixtralConfig

transformers = pytest.importorskip("transformers")


def _hf_dict(**kw):
    return transformers.MixtralConfig(**kw).to_dict()


def test_mixtral_8x7b_preset():
    c = MixtralConfig.from_name("mixtral-8x7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (4096, 32, 32, 8, 128)
    assert (c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, c.vocab_size) == (14336, 8, 2, 32000)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.sliding_window) == (1e6, 1e-5, 32768, None)
    assert c.qkv_size == (32 + 16) * 128 and c.eos_token_ids == (2,)
    assert "tiny" in PRESETS and MixtralConfig.from_name("tiny", num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ValueError, match=r"unknown model name 'mixtral-9x9b'; presets: \['mixtral-8x7b', 'tiny'\]"):
        MixtralConfig.from_name("mixtral-9x9b")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MixtralConfig().hidden_size = 8


def test_transformers_config_roundtrip(tmp_path):
    """A config.json written by transformers (rope_theta nested in rope_parameters) reads back field for field, and
    ours writes one that transformers reads."""
    d = _hf_dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=10, num_local_experts=5, rope_theta=5e5, eos_token_id=[2, 7])
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = MixtralConfig.from_pretrained(str(tmp_path))
    assert (c.vocab_size, c.hidden_size, c.head_dim, c.num_key_value_heads, c.num_local_experts) == (97, 48, 10, 2, 5)
    assert c.rope_theta == 5e5 and c.eos_token_id == (2, 7) and c.eos_token_ids == (2, 7)
    out = tmp_path / "out"
    out.mkdir()
    c.save(str(out))
    back = transformers.MixtralConfig.from_pretrained(str(out))
    assert (back.hidden_size, back.head_dim, back.rope_parameters["rope_theta"], back.eos_token_id) == (48, 10, 5e5,
                                                                                                       [2, 7])
    assert MixtralConfig.from_pretrained(str(out / "config.json")) == c


def test_old_style_config_with_sliding_window(tmp_path):
    """Older copies of the Instruct config.json: rope_theta at the top level, sliding_window 4096, no head_dim."""
    d = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
         "sliding_window": 4096, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = MixtralConfig.from_pretrained(str(tmp_path))
    assert c.sliding_window == 4096 and c.head_dim == 128 and c.rope_theta == 1e6
    assert dataclasses.replace(c, sliding_window=None) == MixtralConfig.from_name("mixtral-8x7b")


def test_params_json(tmp_path):
    p = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
         "norm_eps": 1e-05, "vocab_size": 32000, "rope_theta": 1e6, "moe": {"num_experts": 8, "num_experts_per_tok": 2}}
    (tmp_path / "params.json").write_text(json.dumps(p))
    assert MixtralConfig.from_pretrained(str(tmp_path)) == MixtralConfig.from_name("mixtral-8x7b")
    del p["moe"]
    (tmp_path / "params.json").write_text(json.dumps(p))
    with pytest.raises(ValueError, match=r"params\.json: missing required field\(s\) \['moe'\]"):
        MixtralConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (dict(model_type="llama"), r"model_type is 'llama', not 'mixtral'"),
    (dict(num_attention_heads=6, num_key_value_heads=4, head_dim=8),
     r"num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    (dict(hidden_size=50, num_attention_heads=6, num_key_value_heads=2), r"hidden_size 50 is not divisible by "
                                                                           r"num_attention_heads 6"),
    (dict(head_dim=7), r"head_dim must be even"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok 9 exceeds num_local_experts 8"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, got 0"),
    (dict(sliding_window=-1), r"sliding_window must be null or a positive integer, got -1"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(eos_token_id=40000), r"special token id 40000 is outside the vocabulary \[0, 32000\)"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), r"rope scaling .* not supported"),
])
def test_invalid_config_json(tmp_path, change, message):
    d = {**_hf_dict(), **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as info:
        MixtralConfig.from_pretrained(str(tmp_path))
    assert "config.json" in str(info.value)  # the message names the file


def test_missing_fields(tmp_path):
    d = _hf_dict()
    del d["intermediate_size"], d["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: missing required field\(s\) \['vocab_size', "
                                         r"'intermediate_size'\]"):
        MixtralConfig.from_pretrained(str(tmp_path))


def test_unreadable_or_absent_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json or params.json"):
        MixtralConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: unreadable config \(expected a JSON object, got list\)"):
        MixtralConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"config\.json: unreadable config"):
        MixtralConfig.from_pretrained(str(tmp_path))
