"""MixtralConfig: the model's sizes as one frozen dataclass with transformers' field names.

Read from a Hugging Face `config.json` or a Mistral `params.json` (MixtralConfig.from_pretrained), or taken from a
named preset (MixtralConfig.from_name("mixtral-8x7b")). Every invariant the model relies on is checked in
__post_init__, so a config that constructs is one the model can run.
"""
import dataclasses
import json
import os
from dataclasses import dataclass

# Fields that config.json must state: they fix every weight shape, so a silent default would be a wrong model.
_REQUIRED_HF = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# params.json (Mistral) name -> our name; "moe" is a nested dict handled separately.
_PARAMS_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
                 "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
                 "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size",
                 "rope_theta": "rope_theta", "sliding_window": "sliding_window"}
_REQUIRED_PARAMS = ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size", "moe")


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096  # H
    intermediate_size: int = 14336  # I, each expert's FFN width
    num_hidden_layers: int = 32  # L
    num_attention_heads: int = 32  # Hq
    num_key_value_heads: int = 8  # Hkv
    head_dim: int = None  # D; None means hidden_size // num_attention_heads
    num_local_experts: int = 8  # E
    num_experts_per_tok: int = 2  # k
    max_position_embeddings: int = 32768  # the context: prompt + new tokens never exceed it
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int = None  # None: full causal attention (Mixtral v0.1); W: each query sees its last W keys
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: object = 2  # an int, or a tuple of ints (config.json may give a list)
    pad_token_id: int = None
    model_type: str = "mixtral"

    def __post_init__(self):
        if self.model_type != "mixtral":
            raise ValueError(f"model_type is {self.model_type!r}, not 'mixtral': this package runs Mixtral only")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_local_experts "
                             f"{self.num_local_experts}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be null or a positive integer, got {self.sliding_window!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Mixtral uses 'silu')")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps}, "
                             f"{self.rope_theta}")
        eos = self.eos_token_id
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(eos))
        for tok in (self.eos_token_ids + tuple(t for t in (self.bos_token_id, self.pad_token_id) if t is not None)):
            if not isinstance(tok, int) or not 0 <= tok < self.vocab_size:
                raise ValueError(f"special token id {tok!r} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def eos_token_ids(self):
        """The stop tokens as a tuple (empty when the config names none)."""
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def qkv_size(self):
        """Rows of the fused q/k/v projection: (Hq + 2 Hkv) * D."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    # ---- constructors ----------------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d, source="config"):
        """From a transformers config.json dict. Unknown keys are ignored, missing shape fields are an error."""
        if d.get("model_type") != "mixtral":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, not 'mixtral'")
        missing = [k for k in _REQUIRED_HF if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        # transformers >= 5 nests rope_theta in rope_parameters; older configs have it at the top level.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"{source}: rope scaling {rope!r} is not supported (Mixtral uses plain RoPE)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "rope_theta" in rope and "rope_theta" not in d:
            kw["rope_theta"] = rope["rope_theta"]
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])  # transformers' default: plain MHA
        try:
            return cls(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_params(cls, d, source="params.json"):
        """From Mistral's params.json (the consolidated checkpoint layout)."""
        missing = [k for k in _REQUIRED_PARAMS if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing} (a Mixtral params.json has a 'moe' "
                             f"section)")
        kw = {ours: d[theirs] for theirs, ours in _PARAMS_NAMES.items() if theirs in d}
        moe = d["moe"]
        kw["num_local_experts"] = moe.get("num_experts", 8)
        kw["num_experts_per_tok"] = moe.get("num_experts_per_tok", 2)
        if "max_seq_len" in d:
            kw["max_position_embeddings"] = d["max_seq_len"]
        try:
            return cls(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path):
        """From a checkpoint directory (config.json, else params.json) or one of those files."""
        if os.path.isdir(path):
            for name in ("config.json", "params.json"):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(f"{path}: no config.json or params.json in this directory")
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable config ({type(exc).__name__}: {exc})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: unreadable config (expected a JSON object, got {type(d).__name__})")
        if os.path.basename(path) == "params.json" or ("dim" in d and "model_type" not in d):
            return cls.from_params(d, source=path)
        return cls.from_dict(d, source=path)

    def to_dict(self):
        """transformers' config.json content (what save_pretrained writes for MixtralForCausalLM)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(d["eos_token_id"]) if isinstance(d["eos_token_id"], tuple) else d["eos_token_id"]
        d["architectures"] = ["MixtralForCausalLM"]
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return d

    def save(self, path):
        """Write config.json into the directory `path`."""
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


PRESETS = {
    "mixtral-8x7b": MixtralConfig(),
    # Small enough for a CPU test or the demo, with the real vocabulary so the real tokenizer works on it.
    "tiny": MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
}
