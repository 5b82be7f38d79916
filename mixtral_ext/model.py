"""Mixtral-8x7B, read top-down: cache -> model -> block -> attention -> MoE.

Every hot op goes through mixtral_ext.ops (the CUDA kernels on a GPU, the CPU path of cpu.py elsewhere); dense
projections, the router and lm_head are plain F.linear (cuBLAS). Tokens are always packed: a batch is one [T, H]
matrix whose rows carry their sequence (seq_ids) and position, so ragged prompts need no padding.

Dimension legend: B sequences, T tokens (packed over the batch), S cache length, L layers, V vocab, H hidden,
I expert FFN width, E experts, k experts per token, Hq / Hkv query / key-value heads, D head dim.
Numerics follow transformers' MixtralForCausalLM: RMSNorm and the router softmax in float32, the residual stream in
the model dtype, attention softmax in float32, RoPE in the rotate-half layout with a float32 cos/sin table.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import generate as generation
from . import ops
from . import quant
from .config import MixtralConfig
from .parallel import Shard
from .reference import rope_cos_sin


class KVCache:
    """The static cache: k, v [L, B, S, Hkv, D]. Sequence b's token at position p lives in slot [:, b, p]. Zeroed,
    because the reference decode attention reads every slot (masked) and 0 * garbage could be NaN. kv_heads: the
    heads this rank holds under tensor parallelism (model.shard.kv_heads); default all of them."""

    def __init__(self, cfg, batch, length, device, dtype, kv_heads=None):
        shape = (cfg.num_hidden_layers, batch, length, kv_heads or cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def layer(self, i):
        return self.k[i], self.v[i]  # [B, S, Hkv, D] each, contiguous


class Batch(NamedTuple):
    """Where each packed token goes and what it attends to."""
    positions: torch.Tensor  # [T] int32: position of each token in its sequence (= its cache slot)
    seq_ids: torch.Tensor  # [T] int32: cache row of each token
    seq_lens: torch.Tensor  # [B] int32: valid cache slots per sequence once these tokens are written
    cu_seqlens: Optional[torch.Tensor]  # [B + 1] int32: prefill row ranges; None = decode, one token per sequence
    max_seqlen_q: int = 1


class Mixtral(nn.Module):
    def __init__(self, cfg: MixtralConfig, device=None, dtype=torch.float32, shard: Shard = None, quantize=None):
        """quantize: None, "int8" or "int4": the storage of the expert weights (mixtral_ext/quant.py); everything
        else stays in `dtype`. ValueError for another value, or for int4 with a width not a multiple of 128."""
        super().__init__()
        self.config = cfg
        # This rank's part of the model (parallel.py); the whole model by default. config stays the whole model's.
        self.shard = shard or Shard(cfg)
        self.quantize = check_quantize(cfg, quantize)
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, **kw), requires_grad=False)
        self.layers = nn.ModuleList(Block(cfg, self.shard, quantize=quantize, **kw)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, **kw), requires_grad=False)
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, **kw), requires_grad=False)
        # float32 whatever the model dtype (transformers computes cos/sin in float32 too); not a buffer, so that
        # model.to(dtype) cannot round it.
        self._rope = rope_cos_sin(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, device=device)
        # generate()'s per-batch-size caches and CUDA graphs, kept between calls; owned and used by generate.py only.
        self.generation = generation.GenerationState()

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, progress=True, expert_parallel=False, quantize=None):
        """Load an HF-layout or consolidated-layout checkpoint directory. device defaults to "cpu"; dtype to
        bfloat16 on a GPU and float32 on the CPU. quantize="int8" or "int4" stores the expert weights quantized
        (tensor by tensor as they are read; mixtral_ext/quant.py has the formats).

        Under torchrun (WORLD_SIZE > 1) or an initialised default process group of several ranks, every rank loads
        only its shard (parallel.py; "cuda" means cuda:LOCAL_RANK): tensor parallel, or with expert_parallel=True
        E/N whole experts per rank. Every rank must then make the same calls with the same inputs."""
        from . import parallel
        from .weights import check_fits, find_checkpoint, load_checkpoint
        quant.check_mode(quantize)
        device = parallel.local_device(device or "cpu")
        check_device(device)
        group = parallel.process_group(device)
        if group is not None:
            if quantize:
                raise ValueError(f"quantize={quantize!r} with several ranks (torchrun) is not supported yet: each "
                                 f"rank's loader reads unquantized slices; load on one GPU, or without quantize")
            return parallel.from_pretrained(cls, path, device, dtype, progress, expert_parallel, group)
        _, config_path, _ = find_checkpoint(path)
        cfg = MixtralConfig.from_pretrained(config_path)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        check_quantize(cfg, quantize)
        check_fits(cfg, dtype, device, quantize=quantize)
        model = cls(cfg, device=device, dtype=dtype, quantize=quantize)
        load_checkpoint(path, cfg, dict(model.named_parameters()), progress=progress)
        return model.eval()

    def new_cache(self, batch, length):
        """An empty (zeroed) KVCache for `batch` sequences of up to `length` positions, on the model's device and in
        its dtype, with this rank's key-value heads."""
        return KVCache(self.config, batch, length, self.device, self.dtype, kv_heads=self.shard.kv_heads)

    def rope_table(self):
        if self._rope.device != self.device:
            self._rope = self._rope.to(self.device)
        return self._rope

    def run_layers(self, ids, batch: Batch, caches):
        """The decoder over packed tokens. ids: [T]; caches(i) -> (k, v) [B, S, Hkv, D] for layer i.
        Returns the final-normed hidden states [T, H]."""
        x = F.embedding(ids, self.embed)  # [T, H]; the residual stream, updated in place by the fused norms
        rope = self.rope_table()
        delta, residual = x, None
        for i, layer in enumerate(self.layers):
            delta, residual = layer(delta, residual, batch, rope, *caches(i))
        out, _ = ops.rms_norm(delta, self.norm, self.config.rms_norm_eps, residual)
        return out

    @torch.inference_mode()
    def forward(self, input_ids):
        """Full forward without a cache: input_ids [B, T] -> logits [B, T, V]. A temporary [B, T, Hkv, D] cache is
        shared by all layers (each layer overwrites it before it attends)."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens, beyond the context max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        dev, i32 = self.device, dict(dtype=torch.int32, device=self.device)
        ids = input_ids.to(dev).reshape(-1)
        # Not while torch.compile traces: a host read of the ids would end the graph (F.embedding still fails on an
        # id outside the table, less clearly).
        if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0
                                                                  or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids: token ids must lie in [0, vocab_size={cfg.vocab_size})")
        k = torch.empty(B, T, self.shard.kv_heads, cfg.head_dim, device=dev, dtype=self.dtype)
        v = torch.empty_like(k)
        batch = Batch(positions=torch.arange(T, **i32).repeat(B), seq_ids=torch.arange(B, **i32).repeat_interleave(T),
                      seq_lens=torch.full((B,), T, **i32), cu_seqlens=torch.arange(B + 1, **i32) * T, max_seqlen_q=T)
        h = self.run_layers(ids, batch, lambda i: (k, v))
        return F.linear(h, self.lm_head).view(B, T, cfg.vocab_size)

    def prefill(self, prompts, cache, starts=None):
        """Write the packed prompts (a list of B id lists; sequence b into cache row b, positions starts[b] ..
        starts[b] + n_b - 1, after the starts[b] tokens already cached there; starts defaults to zeros) into the
        cache and return each sequence's last-token logits [B, V]."""
        dev, i32 = self.device, dict(dtype=torch.int32, device=self.device)
        lens = [len(p) for p in prompts]
        starts = list(starts) if starts is not None else [0] * len(prompts)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
        cu = torch.tensor([0] + lens, **i32).cumsum(0, dtype=torch.int32)  # [B + 1]
        batch = Batch(positions=torch.tensor([s + p for s, n in zip(starts, lens) for p in range(n)], **i32),
                      seq_ids=torch.tensor([b for b, n in enumerate(lens) for _ in range(n)], **i32),
                      seq_lens=torch.tensor([s + n for s, n in zip(starts, lens)], **i32), cu_seqlens=cu,
                      max_seqlen_q=max(lens))
        h = self.run_layers(ids, batch, cache.layer)  # [T, H]
        return F.linear(h[cu[1:].long() - 1], self.lm_head)  # only the last token of each sequence

    def decode_step(self, tokens, positions, seq_ids, cache):
        """One new token per sequence: tokens [B] long, positions [B] int32 (their slots), seq_ids [B] int32 =
        arange(B). Returns logits [B, V]. Free of host synchronisation on the CUDA kernels, so it can be captured
        in a CUDA graph (every input is a device tensor that the caller updates in place between replays)."""
        batch = Batch(positions=positions, seq_ids=seq_ids, seq_lens=positions + 1, cu_seqlens=None)
        h = self.run_layers(tokens, batch, cache.layer)
        return F.linear(h, self.lm_head)

    def release_cache(self):
        """Free the KV caches and CUDA graphs that generate() keeps per batch size (generate.GenerationState)."""
        self.generation.release()

    def generate(self, input_ids, **kwargs):
        """transformers-style generation; see mixtral_ext.generate.generate for the arguments."""
        return generation.generate(self, input_ids, **kwargs)


class Block(nn.Module):
    def __init__(self, cfg, shard=None, quantize=None, **kw):
        super().__init__()
        shard = shard or Shard(cfg)
        self.eps = cfg.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.empty(cfg.hidden_size, **kw), requires_grad=False)
        self.attention = Attention(cfg, shard, **kw)
        self.ffn_norm = nn.Parameter(torch.empty(cfg.hidden_size, **kw), requires_grad=False)
        self.moe = MoE(cfg, shard, quantize=quantize, **kw)

    def forward(self, x, residual, batch, rope, k_cache, v_cache):
        """x: the previous block's output (or the embeddings, with residual None) [T, H]. The fused norm adds it
        into the residual stream in place (residual += x) and normalises the sum. Returns (moe output, residual)."""
        h, residual = ops.rms_norm(x, self.attn_norm, self.eps, residual)
        a = self.attention(h, batch, rope, k_cache, v_cache)
        h, residual = ops.rms_norm(a, self.ffn_norm, self.eps, residual)
        return self.moe(h), residual


class Attention(nn.Module):
    def __init__(self, cfg, shard=None, **kw):
        super().__init__()
        shard = shard or Shard(cfg)
        # Hq, Hkv below are this rank's heads (all of them in one process; Hq/N and Hkv/N of N tensor-parallel ranks).
        self.n_heads, self.head_dim = shard.q_heads, cfg.head_dim
        self.shard = shard
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.window = cfg.sliding_window or 0
        # q, k, v projections fused at load time: rows are Hq heads of q, then Hkv of k, then Hkv of v.
        qkv_rows = (shard.q_heads + 2 * shard.kv_heads) * cfg.head_dim
        self.wqkv = nn.Parameter(torch.empty(qkv_rows, cfg.hidden_size, **kw), requires_grad=False)
        self.wo = nn.Parameter(torch.empty(cfg.hidden_size, shard.q_heads * cfg.head_dim, **kw),
                               requires_grad=False)

    def forward(self, x, batch, rope, k_cache, v_cache):
        T = x.shape[0]
        qkv = F.linear(x, self.wqkv)  # [T, (Hq + 2 Hkv) * D]
        # RoPE on q and k; k and v land in the cache at (seq_ids, positions); q comes back rotated [T, Hq, D].
        q = ops.rope_kv_append(qkv, batch.positions, batch.seq_ids, rope, k_cache, v_cache)
        if batch.cu_seqlens is None:
            o = ops.attention_decode(q, k_cache, v_cache, batch.seq_lens, self.scale, self.window)
        else:
            o = ops.attention_prefill(q, k_cache, v_cache, batch.cu_seqlens, batch.seq_lens, batch.max_seqlen_q,
                                      self.scale, self.window)
        # [T, H]; with tensor parallelism each rank's heads give a partial sum, completed across ranks
        return self.shard.all_reduce(F.linear(o.view(T, self.n_heads * self.head_dim), self.wo))


class MoE(nn.Module):
    def __init__(self, cfg, shard=None, quantize=None, **kw):
        super().__init__()
        shard = shard or Shard(cfg)
        self.top_k = cfg.num_experts_per_tok
        self.shard = shard
        # The router sees all experts; w13/w2 hold this rank's (E/N whole experts, or a 1/N slice of every one).
        E, I, H = shard.experts, shard.inter, cfg.hidden_size
        self.gate = nn.Parameter(torch.empty(cfg.num_local_experts, H, **kw), requires_grad=False)  # the router
        if quantize is None:
            self.w13 = nn.Parameter(torch.empty(E, 2 * I, H, **kw), requires_grad=False)  # w1, w3 interleaved by row
            self.w2 = nn.Parameter(torch.empty(E, H, I, **kw), requires_grad=False)
            self.w13_scale = self.w2_scale = None
            return
        # Quantized (quant.py): int8 [E, 2I, H] or packed int4 [E, 2I, H/2] with float32 scales per row [E, 2I] or
        # per 128-input group [E, 2I, H/128]; the same row interleave. Scales are float32 whatever the model dtype.
        store, dev = quant.STORAGE_DTYPE[quantize], kw.get("device")
        for name, (out, inp) in (("w13", (2 * I, H)), ("w2", (H, I))):
            q_shape, s_shape = quant.quantized_shapes(quantize, out, inp)
            setattr(self, name, nn.Parameter(torch.empty(E, *q_shape, dtype=store, device=dev), requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(torch.empty(E, *s_shape, dtype=torch.float32, device=dev),
                                                        requires_grad=False))

    def forward(self, x):
        route = ops.moe_route(F.linear(x, self.gate), self.top_k)  # softmax/top-k/renormalise + expert permutation
        if self.shard.expert_parallel:
            route = self.shard.local_route(route)  # only this rank's experts' contributions
        y = ops.moe_experts(x, route, self.w13, self.w2, self.w13_scale, self.w2_scale)  # [T, H]
        return self.shard.all_reduce(y)


def check_device(device):
    """One clear error for a CUDA device this process cannot use (instead of torch's, raised deep inside a load)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
        raise RuntimeError(f"device={str(device)!r}: no CUDA GPU is available here ({why}). Use device='cpu' (the "
                           f"PyTorch CPU path), or pick it at run time: device='cuda' if "
                           f"torch.cuda.is_available() else 'cpu'")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_quantize(cfg, quantize):
    """quantize (None, "int8" or "int4") for this config, else a ValueError naming the value or the width."""
    quant.check_mode(quantize)
    quant.check_width(quantize, cfg.hidden_size, "hidden_size (the input width of the experts' w1 and w3)")
    quant.check_width(quantize, cfg.intermediate_size, "intermediate_size (the input width of the experts' w2)")
    return quantize
