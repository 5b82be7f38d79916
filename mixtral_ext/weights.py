"""Checkpoint loading: find the files, map every stored tensor to its place in the model, stream it there.

Layouts (DESIGN.md "Checkpoints"; LAYOUTS below), told apart by their tensor names:
  hf           config.json + model.safetensors, or model.safetensors.index.json + model-0000i-of-0000n.safetensors,
               per-expert tensors block_sparse_moe.experts.N.w1/w2/w3 (transformers < 5, and its default format)
  hf-fused     the same files, experts stacked: mlp.experts.gate_up_proj [E, 2I, H] (w1 rows, then w3 rows) and
               mlp.experts.down_proj [E, H, I], router mlp.gate (transformers >= 5, save_original_format=False)
  mlx          the same files, block_sparse_moe.switch_mlp.gate_proj/up_proj [E, I, H], down_proj [E, H, I] (mlx-lm)
  consolidated params.json + consolidated*.safetensors (Mistral's release format)
A directory may hold several candidate checkpoints (a consolidated download next to an HF one, stale shards, an
index from another revision): find_checkpoint takes the one complete candidate, judged from the headers alone.

Loading streams shard by shard: each shard is memory-mapped by safetensors (reopened every _CHUNK_BYTES, so at most
that much of it is mapped and resident at once), each tensor is read on its own straight to the target device
(safe_open(device=...)), converted to the target dtype and copied into the model's pre-allocated parameter, so host
RAM holds the model's parameters (on a CPU target) plus one chunk in flight, never two copies of the model.
Weights are re-laid-out here, once:
  q/k/v    -> attention.wqkv [(Hq + 2 Hkv) * D, H] (rows: q heads, k heads, v heads), one matmul per layer
  w1/w3    -> moe.w13 [E, 2I, H] interleaved by row: w13[e, 2i] = w1[e, i], w13[e, 2i + 1] = w3[e, i] (the contract
              of ops.moe_experts: one pass over w13 yields the gate and up value of the same unit together)
  w2       -> moe.w2 [E, H, I]
A model built with quantize="int8" / "int4" holds its experts quantized (moe.w13 / moe.w2 int8 or packed uint8, plus
moe.w13_scale / moe.w2_scale float32; mixtral_ext/quant.py): each w1/w3/w2 tensor is quantized as it is read (in
float32, on the target device) and only the quantized values and scales are kept, so no full-precision copy of the
experts ever exists.
Every stored tensor's name, shape and dtype is checked against the config; every problem is a CheckpointError
naming the file and the tensor. Pickled .pth/.bin checkpoints are refused: unpickling can run arbitrary code.
Before anything is allocated, check_fits compares the weights' size (param_bytes) with the target's free memory and
raises ModelTooLargeError with what would fit (another dtype, quantized experts, several GPUs).
"""
import glob
import json
import os
import re
import sys

import torch
from tqdm.auto import tqdm

from . import quant
from .quant import mode_of, quantize

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CHUNK_BYTES = 128 << 20  # tensors read per opening of a shard (bounds the mapped pages resident at once)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and, where one is at fault, the tensor."""


def find_checkpoint(path, announce=True):
    """Returns (layout, config_path, [safetensors files]) of the one complete checkpoint in the directory `path`.

    Every set of weight files that could be a checkpoint is a candidate: the shards a model.safetensors.index.json
    names, model.safetensors, each model-*-of-N.safetensors series, consolidated*.safetensors. Each is checked from
    its safetensors headers alone (no tensor data is read) against the config: every expected tensor present once
    with its shape, nothing unexpected, the index agreeing with its shards. With one candidate its first problem is
    the error; with several, the complete one is taken (HF before consolidated when both are) and one line on
    stderr says which (announce=False: silent); none complete is an error naming what each one lacks.
    Layouts: see LAYOUTS. Pickled weights (.bin, .pt, .pth) are never candidates: unpickling can run arbitrary code.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    candidates, pickled = _candidates(path)
    if not candidates:
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            raise CheckpointError(f"{path}: a PEFT/LoRA adapter (adapter_config.json), not a model: merge it into "
                                  f"its base model first (peft's merge_and_unload) and save that")
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if ggufs:
            raise CheckpointError(f"{path}: GGUF files ({', '.join(map(os.path.basename, ggufs))}, llama.cpp's "
                                  f"format) are not supported; supported layouts: {_SUPPORTED}")
        if pickled:
            raise CheckpointError(f"{path}: only pickled weights ({', '.join(map(os.path.basename, pickled))}); "
                                  f"they are not loaded because unpickling can run arbitrary code - convert them to "
                                  f"safetensors")
        if not (os.path.exists(os.path.join(path, "config.json")) or
                os.path.exists(os.path.join(path, "params.json"))):
            raise CheckpointError(f"{path}: neither config.json (HF layout) nor params.json (consolidated layout) "
                                  f"found")
        raise CheckpointError(f"{path}: no .safetensors weight files found")
    for c in candidates:
        c.check()
    # An index's own shards are a candidate of their own only for when the index is at fault.
    if any(c.index is not None and not c.problem for c in candidates):
        candidates = [c for c in candidates if not c.same_as_index]
    if len(candidates) == 1 and (candidates[0].problem or not pickled):
        (c,) = candidates
        if c.problem:
            raise CheckpointError(c.problem)
        return c.layout, c.config_path, c.files
    complete = [c for c in candidates if not c.problem]
    if not complete:
        lacks = "; ".join(f"[{c.describe()}] {c.problem}" for c in candidates)
        raise CheckpointError(f"{path}: no complete checkpoint among {len(candidates)} candidates: {lacks}")
    chosen = complete[0]
    if announce:
        others = [c.describe() + (" (also complete)" if not c.problem else " (incomplete)")
                  for c in candidates if c is not chosen]
        if pickled:  # never read: unpickling can run arbitrary code
            others.append(f"pickled {', '.join(map(os.path.basename, pickled))}")
        print(f"mixtral_ext: {path}: loading {chosen.describe()}; ignoring {', '.join(others)}", file=sys.stderr)
    return chosen.layout, chosen.config_path, chosen.files


# Layouts that maintained tools write for Mixtral, by the names of one layer's MoE tensors.
LAYOUTS = {
    "hf": "Hugging Face per-expert (block_sparse_moe.experts.N.w1/w2/w3; transformers < 5, or >= 5 with "
          "save_original_format=True)",
    "hf-fused": "Hugging Face fused experts (mlp.experts.gate_up_proj/down_proj; transformers >= 5 with "
                "save_original_format=False)",
    "mlx": "MLX (block_sparse_moe.switch_mlp.gate_proj/up_proj/down_proj; mlx-lm, unquantized)",
    "consolidated": "Mistral consolidated (params.json + consolidated*.safetensors)",
}
_SUPPORTED = "; ".join(LAYOUTS.values())
# Suffixes of tensors that only quantized layouts have, and the layout they mean.
_QUANTIZED = ((".qweight", "GPTQ/AWQ-quantized"), (".qzeros", "GPTQ/AWQ-quantized"),
              (".absmax", "bitsandbytes-quantized"), (".quant_state.bitsandbytes__nf4", "bitsandbytes-quantized"),
              (".weight_scale", "FP8-quantized (compressed-tensors)"), (".weight_scale_inv", "FP8-quantized"),
              (".scales", "quantized (MLX or another group-wise format)"), (".biases", "MLX-quantized"))


class _Candidate:
    """One set of weight files with its config file; check() fills layout, or problem (a message, or None)."""

    def __init__(self, path, family, config_path, files, what, index=None, problem=None):
        self.path, self.family, self.config_path, self.files = path, family, config_path, files
        self.what, self.index, self.problem, self.layout = what, index, problem, None
        self.same_as_index = False  # a model-*-of-N series that is exactly the index's shards

    def describe(self):
        return self.what + (f" ({self.layout} layout)" if self.layout else "")

    def check(self):
        if self.problem:
            return
        try:
            self.problem = self._first_problem()
        except CheckpointError as exc:
            self.problem = str(exc)

    def _first_problem(self):
        from .config import MixtralConfig
        if self.config_path is None:
            return f"{self.path}: no {'config.json' if self.family == 'hf' else 'params.json'} for {self.what}"
        try:
            cfg = MixtralConfig.from_pretrained(self.config_path)
        except ValueError as exc:
            return str(exc)
        headers = {f: _read_header(f) for f in self.files}
        names = {n for h in headers.values() for n in h}
        self.layout = _detect_layout(self.family, names, self.path)
        expected = expected_tensors(cfg, self.layout)
        optional = {"lm_head.weight", "output.weight"} if cfg.tie_word_embeddings else set()
        seen = {}
        for file, header in headers.items():
            for name, (dtype, shape) in header.items():
                if name in optional:
                    continue
                if name not in expected:
                    return (f"{file}: unexpected tensor {name} (not part of a {self.layout}-layout Mixtral with this "
                            f"config)")
                if name in seen:
                    return f"{file}: tensor {name} appears again (already in {seen[name]})"
                if shape != expected[name][1]:
                    return f"{file}: tensor {name} has shape {shape}, expected {expected[name][1]} from the config"
                if dtype not in _FLOAT_DTYPES:
                    return f"{file}: tensor {name} has dtype {dtype}, expected one of {sorted(_FLOAT_DTYPES)}"
                seen[name] = os.path.basename(file)
        if self.index is not None:  # {tensor: shard} of the index: the shards' headers must say the same
            for name, shard in self.index.items():
                if seen.get(name) != shard:
                    where = f"is in {seen[name]}" if name in seen else "is in none of them"
                    return (f"{self.path}/model.safetensors.index.json disagrees with its shards: it puts {name} in "
                            f"{shard}, which does not hold it ({name} {where})")
            stray = sorted(set(seen) - set(self.index))
            if stray:
                return (f"{self.path}/model.safetensors.index.json disagrees with its shards: {stray[0]} (in "
                        f"{seen[stray[0]]}) is not in the index")
        missing = [name for name in expected if name not in seen]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            files = [os.path.basename(f) for f in self.files]
            files = ", ".join(files) if len(files) <= 3 else f"{files[0]} ... {files[-1]}"
            return f"{self.path}: tensor {missing[0]}{more} missing from the checkpoint ({files})"
        return None


def _candidates(path):
    """(candidates, pickled files) of a directory; see find_checkpoint."""
    has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    pickled = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "*.bin")) +
                     glob.glob(os.path.join(path, "*.pt")))
    hf_config = os.path.join(path, "config.json") if has("config.json") else None
    params = os.path.join(path, "params.json") if has("params.json") else None
    out = []
    index_files = None
    if has("model.safetensors.index.json"):
        index_path = os.path.join(path, "model.safetensors.index.json")
        try:
            index_files, weight_map = _index_files(path, index_path)
            out.append(_Candidate(path, "hf", hf_config, index_files, "model.safetensors.index.json and its "
                                  f"{len(index_files)} shard(s)", index=weight_map))
        except CheckpointError as exc:
            out.append(_Candidate(path, "hf", hf_config, [], "model.safetensors.index.json", problem=str(exc)))
    if has("model.safetensors"):
        out.append(_Candidate(path, "hf", hf_config, [os.path.join(path, "model.safetensors")], "model.safetensors"))
    series = {}
    for file in sorted(glob.glob(os.path.join(path, "model-*.safetensors"))):
        m = re.fullmatch(r"model-(\d+)-of-(\d+)\.safetensors", os.path.basename(file))
        series.setdefault(int(m[2]) if m else None, []).append(file)
    for n, files in sorted(series.items(), key=lambda kv: kv[0] or 0):
        what = f"{len(files)} model-*-of-{n:05d}.safetensors shard(s)" if n else "model-*.safetensors"
        problem = None
        if n and len(files) != n:
            problem = f"{path}: only {len(files)} of the {n} shards model-*-of-{n:05d}.safetensors exist"
        out.append(_Candidate(path, "hf", hf_config, files, what, problem=problem))
        out[-1].same_as_index = index_files is not None and set(files) == set(index_files)
    consolidated = sorted(glob.glob(os.path.join(path, "consolidated*.safetensors")))
    if consolidated:
        out.append(_Candidate(path, "consolidated", params, consolidated,
                              f"params.json and {len(consolidated)} consolidated*.safetensors file(s)"))
    if not out and hf_config and not params:  # a config alone, or with weights under other names
        others = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if others:
            out.append(_Candidate(path, "hf", hf_config, others, ", ".join(map(os.path.basename, others))))
    return out, pickled


def _index_files(path, index_path):
    """(shard files, {tensor: shard name}) of an index, every shard existing."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path}: unreadable shard index ({type(exc).__name__}: {exc})") from None
    for name in files:
        if not os.path.exists(os.path.join(path, name)):
            tensor = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(f"{index_path}: shard {name} (holding {tensor}) does not exist")
    return [os.path.join(path, name) for name in files], weight_map



def _read_header(file):
    """{name: (dtype, shape)} from a safetensors file's JSON header, with the file's size checked against it."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out, end = {}, 0
        for name, info in header.items():
            out[name] = (info["dtype"], tuple(info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        if 8 + n + end > size:
            raise ValueError(f"the data ends at byte {8 + n + end}, the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    return out


def _detect_layout(family, names, where):
    """The layout whose MoE tensor names these are (for an HF-family candidate), or a CheckpointError naming the
    layout found when it is not one we load."""
    if family == "consolidated":
        return "consolidated"
    prefixes = {n[:n.index("model.layers.")] for n in names if "model.layers." in n}
    if prefixes and "" not in prefixes:  # a wrapper's prefix: DDP's module., torch.compile's _orig_mod., PEFT's
        prefix = sorted(prefixes)[0]
        raise CheckpointError(f"{where}: every tensor name carries the prefix {prefix!r} (a wrapped model - DDP, "
                              f"torch.compile or PEFT - saved as is); save the unwrapped model, or rename the "
                              f"tensors without it")
    for suffix, what in _QUANTIZED:
        hit = next((n for n in sorted(names) if n.endswith(suffix)), None)
        if hit:
            raise CheckpointError(f"{where}: found a {what} checkpoint (tensor {hit}); supported layouts (all of "
                                  f"unquantized float weights): {_SUPPORTED}")
    if any(".mlp.experts.gate_up_proj" in n or ".mlp.experts.down_proj" in n for n in names):
        return "hf-fused"
    if any(".switch_mlp." in n for n in names):
        return "mlx"
    if any(".feed_forward." in n or n.startswith("tok_embeddings.") for n in names):
        raise CheckpointError(f"{where}: found Mistral consolidated tensor names (tok_embeddings, feed_forward) "
                              "next to a config.json: the consolidated layout needs params.json and "
                              f"consolidated*.safetensors file names; supported layouts: {_SUPPORTED}")
    known = any(".block_sparse_moe.experts." in n for n in names) or not any(".layers." in n for n in names)
    if not known:
        common = ("self_attn.", "layernorm.", ".gate.weight", "embed_tokens.", "lm_head.", "model.norm.")
        example = next((n for n in sorted(names) if not any(c in n for c in common)), sorted(names)[0])
        raise CheckpointError(f"{where}: unrecognised checkpoint layout (e.g. tensor {example}); supported layouts: "
                              f"{_SUPPORTED}")
    return "hf"


def _interleaved_to_rotate_half(w, n_heads, head_dim):
    """Convert a q or k projection from Mistral's interleaved RoPE layout to the rotate-half layout.

    Mistral's reference rotates the pairs (x[2i], x[2i+1]) of each head by the angle p * f_i; transformers' (and
    our) rotate-half convention rotates (x[i], x[i + D/2]) by the same angle. So the rotate-half weight's row j of
    a head is the interleaved weight's row 2j for j < D/2 and row 2(j - D/2) + 1 for j >= D/2: view each head's
    rows as [D/2, 2] (pair index, member), swap to [2, D/2], flatten. Both q and k get the same permutation P of
    every head's dimensions, so q.k = (Pq).(Pk) is unchanged and RoPE on the permuted vectors rotates the same
    pairs by the same angles: the attention output is identical. v and o are untouched.
    """
    rows, cols = w.shape
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def expected_tensors(cfg, layout):
    """{stored name: (parameter name, expected shape, place)}: place(param) is the view the tensor is copied into;
    for the consolidated q/k the value goes through _interleaved_to_rotate_half first (the 4th tuple element)."""
    H, I, E, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim
    Hq, Hkv, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    q_rows, kv_rows = Hq * D, Hkv * D
    whole = lambda p: p  # noqa: E731

    def rows(a, b):
        return lambda p: p[a:b]

    def expert(e, part):  # part: 0 = w1 (even rows of w13), 1 = w3 (odd rows), None = w2
        return (lambda p: p[e, part::2]) if part is not None else (lambda p: p[e])

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    hf = layout != "consolidated"
    out = {}
    top = (("model.embed_tokens.weight", "tok_embeddings.weight", "embed", (V, H)),
           ("model.norm.weight", "norm.weight", "norm", (H,)),
           ("lm_head.weight", "output.weight", "lm_head", (V, H)))
    for hf_name, c_name, param, shape in top:
        if param == "lm_head" and cfg.tie_word_embeddings:
            continue
        out[hf_name if hf else c_name] = (param, shape, whole, None)
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}"
        if hf:
            a, m = f"model.layers.{n}.self_attn", f"model.layers.{n}.block_sparse_moe"
            names = {"norm1": f"model.layers.{n}.input_layernorm.weight",
                     "norm2": f"model.layers.{n}.post_attention_layernorm.weight",
                     "q": f"{a}.q_proj.weight", "k": f"{a}.k_proj.weight", "v": f"{a}.v_proj.weight",
                     "o": f"{a}.o_proj.weight", "gate": f"{m}.gate.weight", "expert": f"{m}.experts.{{e}}.{{w}}.weight"}
            permute_q = permute_k = None
        else:
            a, m = f"layers.{n}.attention", f"layers.{n}.feed_forward"
            names = {"norm1": f"layers.{n}.attention_norm.weight", "norm2": f"layers.{n}.ffn_norm.weight",
                     "q": f"{a}.wq.weight", "k": f"{a}.wk.weight", "v": f"{a}.wv.weight", "o": f"{a}.wo.weight",
                     "gate": f"{m}.gate.weight", "expert": f"{m}.experts.{{e}}.{{w}}.weight"}
            permute_q = lambda w: _interleaved_to_rotate_half(w, Hq, D)  # noqa: E731
            permute_k = lambda w: _interleaved_to_rotate_half(w, Hkv, D)  # noqa: E731
        out[names["norm1"]] = (f"{p}.attn_norm", (H,), whole, None)
        out[names["norm2"]] = (f"{p}.ffn_norm", (H,), whole, None)
        out[names["q"]] = (f"{p}.attention.wqkv", (q_rows, H), rows(0, q_rows), permute_q)
        out[names["k"]] = (f"{p}.attention.wqkv", (kv_rows, H), rows(q_rows, q_rows + kv_rows), permute_k)
        out[names["v"]] = (f"{p}.attention.wqkv", (kv_rows, H), rows(q_rows + kv_rows, q_rows + 2 * kv_rows), None)
        out[names["o"]] = (f"{p}.attention.wo", (H, q_rows), whole, None)
        if layout == "hf-fused":  # router under mlp.gate; the experts stacked, w1 and w3 concatenated by row
            m = f"model.layers.{n}.mlp"
            names["gate"] = f"{m}.gate.weight"
            # gate_up_proj[e] = w1[e] rows then w3[e] rows: seen as [E, 2, I, H], w13 as [E, I, 2, H] (its
            # interleaved rows) swapped to [E, 2, I, H], so the copy is one strided view, no temporary.
            out[f"{m}.experts.gate_up_proj"] = (f"{p}.moe.w13", (E, 2 * I, H),
                                                lambda w: w.view(E, I, 2, *w.shape[2:]).transpose(1, 2),
                                                lambda v: v.view(E, 2, I, H))
            out[f"{m}.experts.down_proj"] = (f"{p}.moe.w2", (E, H, I), whole, None)
        elif layout == "mlx":  # mlx-lm's SwitchGLU: the experts stacked, gate_proj = w1, up_proj = w3, down = w2
            s_ = f"{m}.switch_mlp"
            out[f"{s_}.gate_proj.weight"] = (f"{p}.moe.w13", (E, I, H), lambda w: w[:, 0::2], None)
            out[f"{s_}.up_proj.weight"] = (f"{p}.moe.w13", (E, I, H), lambda w: w[:, 1::2], None)
            out[f"{s_}.down_proj.weight"] = (f"{p}.moe.w2", (E, H, I), whole, None)
        out[names["gate"]] = (f"{p}.moe.gate", (E, H), whole, None)
        for e in range(E) if layout in ("hf", "consolidated") else ():
            out[names["expert"].format(e=e, w="w1")] = (f"{p}.moe.w13", (I, H), expert(e, 0), None)
            out[names["expert"].format(e=e, w="w3")] = (f"{p}.moe.w13", (I, H), expert(e, 1), None)
            out[names["expert"].format(e=e, w="w2")] = (f"{p}.moe.w2", (H, I), expert(e, None), None)
    return out



def check_header_entry(f, file, name, expected, optional, seen, layout):
    """Checks one tensor of an open safetensors file against the config before any data is read: its name
    (expected, not seen in an earlier file), shape and dtype; records it in `seen`. Returns its stored size in
    bytes, or None for an optional tensor this config does not use. CheckpointError names the file and tensor."""
    if name in optional:
        return None
    if name not in expected:
        raise CheckpointError(f"{file}: unexpected tensor {name} (not part of a {layout}-layout Mixtral with this "
                              f"config)")
    if name in seen:
        raise CheckpointError(f"{file}: tensor {name} appears again (already in {seen[name]})")
    sl = f.get_slice(name)
    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
    if shape != expected[name][1]:
        raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected {expected[name][1]} from the config")
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, expected one of {sorted(_FLOAT_DTYPES)}")
    seen[name] = os.path.basename(file)
    return torch.Size(shape).numel() * _FLOAT_DTYPES[dtype].itemsize

def load_checkpoint(path, cfg, params, progress=True):
    """Stream every tensor of the checkpoint in `path` into `params` ({parameter name: pre-allocated tensor}, on
    the target device and dtype). Raises CheckpointError on any missing, unexpected, duplicated, misshapen or
    unreadable tensor."""
    from safetensors import safe_open

    layout, _, files = find_checkpoint(path, announce=False)  # from_pretrained has announced the choice
    expected = expected_tensors(cfg, layout)
    optional = {"lm_head.weight", "output.weight"} if cfg.tie_word_embeddings else set()
    device = next(iter(params.values())).device
    seen = {}
    bar = _progress(len(expected), progress, os.path.basename(os.path.normpath(path)))
    try:
        for file in files:
            # First pass: check every name, shape and dtype of the shard before reading any data.
            chunks, chunk, chunk_bytes = [], [], 0
            with _open(safe_open, file, device) as f:
                for name in f.keys():
                    nbytes = check_header_entry(f, file, name, expected, optional, seen, layout)
                    if nbytes is None:
                        continue
                    if chunk and chunk_bytes + nbytes > _CHUNK_BYTES:
                        chunks.append(chunk)
                        chunk, chunk_bytes = [], 0
                    chunk.append(name)
                    chunk_bytes += nbytes
            chunks.append(chunk)
            # Second pass, reopening the shard for every ~_CHUNK_BYTES of tensors: the memory map's pages that were
            # read count towards the process's resident memory until the file is closed, so a 5 GB shard read in one
            # go would show up as a second copy of that much of the model.
            for chunk in chunks:
                with _open(safe_open, file, device) as f:
                    for name in chunk:
                        param, _, place, transform = expected[name]
                        try:
                            value = f.get_tensor(name)
                        except Exception as exc:
                            raise CheckpointError(f"{file}: tensor {name} could not be read ({exc})") from None
                        if transform is not None:
                            value = transform(value)
                        _store(params, param, place, value, file, name)
                        del value
                        bar.update(1)
    finally:
        # Closed before an error propagates: a bar redrawn after the error message would hide it.
        bar.close()
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]}{more} missing from the checkpoint "
                              f"({', '.join(os.path.basename(f) for f in files)})")
    if cfg.tie_word_embeddings:
        params["lm_head"].copy_(params["embed"])
    return layout


def load_transformers_state(state, cfg, params):
    """Copy an in-memory transformers MixtralForCausalLM state_dict into `params` (for tests and benchmarks that
    compare against transformers with the same weights, without a round trip through disk). Accepts the per-expert
    names of the checkpoint format and the fused ones of transformers >= 5 (mlp.experts.gate_up_proj [E, 2I, H]
    = w1 rows then w3 rows, mlp.experts.down_proj [E, H, I]). Quantized expert parameters are filled as
    load_checkpoint fills them."""
    expected = expected_tensors(cfg, "hf")
    I, E = cfg.intermediate_size, cfg.num_local_experts
    done = set()
    for name, value in state.items():
        legacy = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        experts = f"model.layers.{layer}.block_sparse_moe.experts"
        if legacy in expected:
            param, _, place, _ = expected[legacy]
            _store(params, param, place, value, "transformers state", name)
            done.add(legacy)
        elif name.endswith(".mlp.experts.gate_up_proj"):
            w13 = f"layers.{layer}.moe.w13"
            _store(params, w13, lambda p: p[:, 0::2], value[:, :I], "transformers state", name)
            _store(params, w13, lambda p: p[:, 1::2], value[:, I:], "transformers state", name)
            done.update(f"{experts}.{e}.{w}.weight" for e in range(E) for w in ("w1", "w3"))
        elif name.endswith(".mlp.experts.down_proj"):
            _store(params, f"layers.{layer}.moe.w2", lambda p: p, value, "transformers state", name)
            done.update(f"{experts}.{e}.w2.weight" for e in range(E))
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            raise CheckpointError(f"transformers state: unexpected tensor {name}")
    missing = [n for n in expected if n not in done]
    if missing:
        raise CheckpointError(f"transformers state: tensor {missing[0]} missing")
    if cfg.tie_word_embeddings:
        params["lm_head"].copy_(params["embed"])


def _store(params, param, place, value, file, name):
    """Copy one stored tensor into its place; into a quantized expert parameter (one with a `<param>_scale` beside
    it, int8 or packed-int4 uint8) as its quantized values and scales, computed from the value upcast to float32
    (quant.quantize). Rows are quantized independently, so w1, w3 and w2 quantize tensor by tensor, and a stacked
    tensor (all experts of a layer in one) expert by expert, which bounds the float32 temporary to one expert."""
    scale = params.get(param + "_scale")
    if scale is None:
        place(params[param]).copy_(value)
        return
    target, target_scale = place(params[param]), place(scale)
    pieces = range(value.shape[0]) if value.dim() >= 3 else [slice(None)]
    for i in pieces:
        try:
            q, s = quantize(value[i], mode_of(params[param]))
        except ValueError as exc:
            raise CheckpointError(f"{file}: tensor {name}: {exc}") from None
        target[i].copy_(q)
        target_scale[i].copy_(s)


def _open(safe_open, file, device):
    try:
        return safe_open(file, framework="pt", device=str(device))
    except Exception as exc:  # SafetensorError, OSError: a corrupt, truncated or unreadable shard
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def _progress(total, enabled, what):
    """The loaders' progress bar over `total` tensors; a no-op bar when not enabled."""
    return tqdm(total=total, desc=f"loading {what}", unit="tensor", disable=not enabled)


def param_bytes(cfg, dtype, quantize=None):
    """Bytes of the model's parameters in `dtype`, with the experts stored as `quantize` (None, "int8", "int4":
    quantized bytes plus float32 scales) - for the fits-in-memory check."""
    from .quant import check_width, expert_bytes
    H, I, E, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size,
                     cfg.num_hidden_layers)
    check_width(quantize, H, "hidden_size")
    check_width(quantize, I, "intermediate_size")
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = (2 * H + cfg.qkv_size * H + H * cfg.num_attention_heads * cfg.head_dim + E * H) * size
    return L * (per_layer + expert_bytes(cfg, quantize, size)) + (2 * V * H + H) * size


class ModelTooLargeError(RuntimeError):
    """The model's weights do not fit in the target device's free memory (the GPU's, or the host's on the CPU)."""


def host_memory():
    """(available, total) bytes of host memory for this process: MemAvailable of /proc/meminfo, lowered to what
    the cgroup (a container's memory limit) still allows. (None, None) where neither can be read."""
    available = total = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        available, total = info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            left = max(int(limit) - used, 0)
            available = left if available is None else min(available, left)
            total = int(limit) if total is None else min(total, int(limit))
    except (OSError, ValueError):
        pass
    return available, total


def check_fits(cfg, dtype, device, free_bytes=None, total_bytes=None, headroom=1 << 30, quantize=None):
    """Fail before allocating when the weights (plus `headroom` for activations and a small KV cache) exceed the
    free memory of the target: the GPU's (torch.cuda.mem_get_info), or on the CPU the host's (host_memory(): the
    OOM killer would otherwise end the process without a word). free_bytes/total_bytes override the measurement.
    quantize: the expert weights' format (None, "int8", "int4"), counted at its stored size (quantized bytes plus
    float32 scales); the error names the quantized formats that would fit."""
    device = torch.device(device)
    if free_bytes is None:
        if device.type == "cuda":
            free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        elif device.type == "cpu":
            free_bytes, total_bytes = host_memory()
        if free_bytes is None:
            return
    needed = param_bytes(cfg, dtype, quantize)
    if needed + headroom > free_bytes:
        gib = 2.0 ** 30
        total = f" of {total_bytes / gib:.1f} GiB" if total_bytes else ""
        name = str(dtype).replace("torch.", "") + (f", {quantize} experts" if quantize else "")
        head = (f"Mixtral ({cfg.num_hidden_layers} layers, {name}) needs {needed / gib:.1f} GiB for its weights plus "
                f"{headroom / gib:.1f} GiB headroom, but ")
        # The quantized formats that would fit, smallest change first (int8 keeps more precision than int4).
        fitting = []
        for mode in (quant.MODES[quant.MODES.index(quantize) + 1:] if quantize else quant.MODES):
            try:
                need = param_bytes(cfg, dtype, mode)
            except ValueError:  # int4 with widths that are not a multiple of 128
                continue
            if need + headroom <= free_bytes:
                fitting.append(f"--quantize {mode} (quantize={mode!r}: {need / gib:.1f} GiB)")
        quantized = f"quantize the expert weights: {' or '.join(fitting)}" if fitting else ""
        if device.type == "cuda":
            # Several GPUs (tensor parallel) are an option for unquantized weights only (quantize is one process).
            several = "" if quantize else _several_gpus(cfg, dtype, total_bytes or free_bytes, headroom)
            hint = f"use a GPU with more memory (an H200 holds Mixtral-8x7B in bf16){several}"
            hint = f"{quantized[0].upper()}{quantized[1:]}; or {hint}" if fitting else hint[0].upper() + hint[1:]
            raise ModelTooLargeError(head + f"{device} has {free_bytes / gib:.1f} GiB free{total}. {hint}.")
        smaller = [(d, flag) for d, flag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))
                   if param_bytes(cfg, d, quantize) < needed and param_bytes(cfg, d, quantize) + headroom <= free_bytes]
        if smaller:
            d, flag = smaller[0]
            hint = (f"In {str(d).replace('torch.', '')} it needs {param_bytes(cfg, d, quantize) / gib:.1f} GiB, "
                    f"which fits: pass dtype=torch.{str(d).replace('torch.', '')} (mixtral-ext --dtype {flag}).")
        else:
            low = param_bytes(cfg, torch.bfloat16, quantize)
            hint = (f"Even bfloat16 needs {low / gib:.1f} GiB: use a machine with more memory, or a GPU "
                    f"(device=\"cuda\")" + (f", or {quantized}." if fitting else "."))
        raise ModelTooLargeError(head + f"this machine has {free_bytes / gib:.1f} GiB of memory available{total}. "
                                 + hint)


def _several_gpus(cfg, dtype, gpu_bytes, headroom):
    """", or several: it needs N GPUs of X GiB ..." when a tensor-parallel split over GPUs like this one would fit."""
    from .parallel import gpus_needed
    n = gpus_needed(cfg, dtype, gpu_bytes, headroom=headroom)
    if not n or n == 1:
        return ""
    return (f", or several: it needs {n} GPUs of {gpu_bytes / 2 ** 30:.0f} GiB in {str(dtype).replace('torch.', '')} "
            f"(torchrun --nproc-per-node {n} -m mixtral_ext ...)")
