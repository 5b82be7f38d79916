"""Checkpoint loading: find the files, map every stored tensor to its place in the model, stream it there.

Two layouts (DESIGN.md "Checkpoints"):
  HF           config.json + model.safetensors, or model.safetensors.index.json + model-0000i-of-0000n.safetensors
  consolidated params.json + consolidated*.safetensors (Mistral's release format)

Loading streams shard by shard: each shard is memory-mapped by safetensors (reopened every _CHUNK_BYTES, so at most
that much of it is mapped and resident at once), each tensor is read on its own straight to the target device
(safe_open(device=...)), converted to the target dtype and copied into the model's pre-allocated parameter, so host
RAM holds the model's parameters (on a CPU target) plus one chunk in flight, never two copies of the model.
Weights are re-laid-out here, once:
  q/k/v    -> attention.wqkv [(Hq + 2 Hkv) * D, H] (rows: q heads, k heads, v heads), one matmul per layer
  w1/w3    -> moe.w13 [E, 2I, H] interleaved by row: w13[e, 2i] = w1[e, i], w13[e, 2i + 1] = w3[e, i] (the contract
              of ops.moe_experts: one pass over w13 yields the gate and up value of the same unit together)
  w2       -> moe.w2 [E, H, I]
Every stored tensor's name, shape and dtype is checked against the config; every problem is a CheckpointError
naming the file and the tensor. Pickled .pth/.bin checkpoints are refused: unpickling can run arbitrary code.
"""
import glob
import json
import os

import torch

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CHUNK_BYTES = 128 << 20  # tensors read per opening of a shard (bounds the mapped pages resident at once)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and, where one is at fault, the tensor."""


def find_checkpoint(path):
    """Returns (layout, config_path, [safetensors files]) for a checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    pickled = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "*.bin")) +
                     glob.glob(os.path.join(path, "*.pt")))
    if has("config.json"):
        layout, config = "hf", os.path.join(path, "config.json")
        if has("model.safetensors.index.json"):
            files = _index_files(path, os.path.join(path, "model.safetensors.index.json"))
        elif has("model.safetensors"):
            files = [os.path.join(path, "model.safetensors")]
        else:
            files = sorted(glob.glob(os.path.join(path, "model-*.safetensors")))
    elif has("params.json"):
        layout, config = "consolidated", os.path.join(path, "params.json")
        files = sorted(glob.glob(os.path.join(path, "consolidated*.safetensors")))
    else:
        raise CheckpointError(f"{path}: neither config.json (HF layout) nor params.json (consolidated layout) found")
    if not files:
        if pickled:
            raise CheckpointError(f"{path}: only pickled weights ({', '.join(map(os.path.basename, pickled))}); "
                                  f"they are not loaded because unpickling can run arbitrary code - convert them to "
                                  f"safetensors")
        raise CheckpointError(f"{path}: no .safetensors weight files found for the {layout} layout")
    return layout, config, files


def _index_files(path, index_path):
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
    return [os.path.join(path, name) for name in files]


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

    hf = layout == "hf"
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
        out[names["gate"]] = (f"{p}.moe.gate", (E, H), whole, None)
        for e in range(E):
            out[names["expert"].format(e=e, w="w1")] = (f"{p}.moe.w13", (I, H), expert(e, 0), None)
            out[names["expert"].format(e=e, w="w3")] = (f"{p}.moe.w13", (I, H), expert(e, 1), None)
            out[names["expert"].format(e=e, w="w2")] = (f"{p}.moe.w2", (H, I), expert(e, None), None)
    return out


def load_checkpoint(path, cfg, params, progress=True):
    """Stream every tensor of the checkpoint in `path` into `params` ({parameter name: pre-allocated tensor}, on
    the target device and dtype). Raises CheckpointError on any missing, unexpected, duplicated, misshapen or
    unreadable tensor."""
    from safetensors import safe_open

    layout, _, files = find_checkpoint(path)
    expected = expected_tensors(cfg, layout)
    optional = {"lm_head.weight", "output.weight"} if cfg.tie_word_embeddings else set()
    device = next(iter(params.values())).device
    seen = {}
    bar = _progress(len(expected), progress, os.path.basename(os.path.normpath(path)))
    for file in files:
        # First pass: check every name, shape and dtype of the shard before reading any data.
        chunks, chunk, chunk_bytes = [], [], 0
        with _open(safe_open, file, device) as f:
            for name in f.keys():
                if name in optional:
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name} (not part of a {layout}-layout Mixtral "
                                          f"with this config)")
                if name in seen:
                    raise CheckpointError(f"{file}: tensor {name} appears again (already in {seen[name]})")
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != expected[name][1]:
                    raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected {expected[name][1]} "
                                          f"from the config")
                if dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, expected one of "
                                          f"{sorted(_FLOAT_DTYPES)}")
                seen[name] = os.path.basename(file)
                nbytes = torch.Size(shape).numel() * _FLOAT_DTYPES[dtype].itemsize
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
                    place(params[param]).copy_(value)
                    del value
                    bar.update(1)
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
    = w1 rows then w3 rows, mlp.experts.down_proj [E, H, I])."""
    expected = expected_tensors(cfg, "hf")
    I, E = cfg.intermediate_size, cfg.num_local_experts
    done = set()
    for name, value in state.items():
        legacy = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        experts = f"model.layers.{layer}.block_sparse_moe.experts"
        if legacy in expected:
            param, _, place, _ = expected[legacy]
            place(params[param]).copy_(value)
            done.add(legacy)
        elif name.endswith(".mlp.experts.gate_up_proj"):
            w13 = params[f"layers.{layer}.moe.w13"]
            w13[:, 0::2].copy_(value[:, :I])
            w13[:, 1::2].copy_(value[:, I:])
            done.update(f"{experts}.{e}.{w}.weight" for e in range(E) for w in ("w1", "w3"))
        elif name.endswith(".mlp.experts.down_proj"):
            params[f"layers.{layer}.moe.w2"].copy_(value)
            done.update(f"{experts}.{e}.w2.weight" for e in range(E))
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            raise CheckpointError(f"transformers state: unexpected tensor {name}")
    missing = [n for n in expected if n not in done]
    if missing:
        raise CheckpointError(f"transformers state: tensor {missing[0]} missing")
    if cfg.tie_word_embeddings:
        params["lm_head"].copy_(params["embed"])


def _open(safe_open, file, device):
    try:
        return safe_open(file, framework="pt", device=str(device))
    except Exception as exc:  # SafetensorError, OSError: a corrupt, truncated or unreadable shard
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def _progress(total, enabled, what):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing progress bar must not stop a load
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Silent()
    return tqdm(total=total, desc=f"loading {what}", unit="tensor")


def param_bytes(cfg, dtype):
    """Bytes of the model's parameters in `dtype` (for the fits-in-memory check)."""
    H, I, E, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size,
                     cfg.num_hidden_layers)
    per_layer = 2 * H + cfg.qkv_size * H + H * cfg.num_attention_heads * cfg.head_dim + E * H + 3 * E * I * H
    return (L * per_layer + 2 * V * H + H) * torch.empty((), dtype=dtype).element_size()
