"""generate(): transformers-compatible generation over the static KV cache.

Prompts run ragged: each sequence keeps its own length in the cache (row b, positions 0..n_b-1), the prefill packs
them without padding, and every decode step feeds one token per sequence at its own position. The result is
left-padded like transformers' output: [B, max_b n_b + new] with pad_token_id before short prompts and after a
sequence's EOS.

On a GPU with the CUDA kernels, the decode step is captured once per batch size in a CUDA graph (its inputs are the
static device tensors DecodeState.tokens / .positions; sampling runs eagerly on the graph's logits), and the host
looks at the tokens only every `sync_every` steps to see whether every sequence has stopped (each step when
streaming, which must hand the tokens over anyway). Elsewhere the same step runs eagerly.

Logits processing follows transformers' order: repetition penalty, then (sampling only) temperature, top-k, top-p;
the settings travel as one SamplingConfig. What generate() keeps on a model between calls (the caches, the CUDA
graphs, a failed capture's error) is its GenerationState, model.generation.
"""
import dataclasses
import warnings
from typing import Optional

import torch

from . import ops, parallel


_CAPTURE_STREAMS = {}  # CUDA device index -> the stream decode steps are captured on


class DecodeState:
    """One batch size's static cache, step inputs and (on CUDA with kernels) its captured decode step."""

    def __init__(self, model, batch, length, use_graph):
        dev = model.device
        self.cache = model.new_cache(batch, length)
        self.length = length
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)  # [B] the token each sequence feeds next
        self.positions = torch.zeros(batch, dtype=torch.int32, device=dev)  # [B] its slot in the cache
        self.seq_ids = torch.arange(batch, dtype=torch.int32, device=dev)  # [B] decode: sequence b is cache row b
        self.graph, self.logits = None, None
        # The weights' addresses, which a captured graph has baked in: model.to(), .half() or swapped layers move
        # them, and then this state must not be replayed (GenerationState.decode_state builds a new one).
        self.weights = weights_key(model)
        if use_graph:
            self._capture(model)

    def _capture(self, model):
        # Warm-up first, on a side stream as CUDA-graph capture requires (lazy initialisation, the kernels' cached
        # attributes): on the capture stream itself, so that its cuBLAS workspace exists before capture too.
        # It writes cache slot 0 of every row, which the next prefill overwrites before anything reads it.
        # The model's device is made current: the ops launch on the current stream of their tensors' device, which
        # must be the capture stream (one per device, like torch.cuda.graph's default, which lives on one device).
        with torch.cuda.device(model.device):
            index = torch.cuda.current_device()
            if index not in _CAPTURE_STREAMS:
                _CAPTURE_STREAMS[index] = torch.cuda.Stream()
            stream = _CAPTURE_STREAMS[index]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model.decode_step(self.tokens, self.positions, self.seq_ids, self.cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self.logits = model.decode_step(self.tokens, self.positions, self.seq_ids, self.cache)  # [B, V]
            self.graph = graph

    def step(self, model):
        """Logits [B, V] of the tokens in self.tokens at self.positions (the graph's output buffer when captured:
        valid until the next step)."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return model.decode_step(self.tokens, self.positions, self.seq_ids, self.cache)


def weights_key(model):
    """The addresses of the model's parameters (what a captured decode step reads)."""
    return tuple(p.data_ptr() for p in model.parameters())


def graphs_supported(model):
    """CUDA graphs need every op of the decode step to run a CUDA kernel for the model's dtype and shapes: the
    reference fallbacks (ops._dispatch) read device values on the host (moe_experts' .tolist()), which capture
    forbids. The kernels' own predicates (ops.kernel_supported) are asked about the decode step's shapes."""
    if model.device.type != "cuda":
        return False
    quantize, dt = getattr(model, "quantize", None), model.dtype
    cfg, shard = model.config, model.shard  # the shapes this rank runs (all heads and experts in one process)
    w13 = model.layers[0].moe.w13  # [E, 2I, H or H/2]: this rank's experts (every layer's have the same shapes)
    E, H, I = w13.shape[0], cfg.hidden_size, w13.shape[1] // 2
    # The decode step's ops: (name, the predicate's arguments). Only the experts op this model runs counts.
    step = [("rms_norm", dt), ("rope_kv_append", dt),
            ("attention_decode", cfg.head_dim, shard.q_heads, shard.kv_heads, dt),
            ("moe_route", cfg.num_local_experts, cfg.num_experts_per_tok, dt),
            ("moe_experts_quant", E, H, I, 8 if quantize == "int8" else 4, dt) if quantize
            else ("moe_experts", E, H, I, dt)]
    return all(ops.has_cuda_kernel(name) and ops.kernel_supported(name, *args) for name, *args in step)


class GenerationState:
    """What generate() keeps on one model between calls (model.generation): per batch size B, a DecodeState (that
    batch's static KV cache, its step inputs and, on a GPU, its captured decode step), reused while its cache is long
    enough and the weights have not moved; and the error of a failed CUDA-graph capture, after which generate()
    decodes this model with eager steps without trying to capture again (use_cuda_graph=None).

    The model is passed to each method rather than kept here (the model holds this object)."""

    def __init__(self):
        self.states = {}  # B -> DecodeState
        self.capture_error = None  # "ExceptionType: message" of the capture that failed, or None

    def release(self):
        """Free the caches and CUDA graphs (model.release_cache()). A capture error stays: the model still fails it."""
        self.states.clear()

    def decode_state(self, model, batch, needed, use_graph, fallback=False):
        """The DecodeState for `batch` sequences of up to `needed` positions, reused while its cache is long
        enough. fallback: a failed capture gives eager steps (with a warning, and no further capture attempts on
        this model) instead of the error. ValueError when needed exceeds max_position_embeddings."""
        # The rope table's rows: a later position would index past it.
        if needed > model.config.max_position_embeddings:
            raise ValueError(f"a decode state for {needed} positions exceeds max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        state = self.states.get(batch)
        if (state is not None and state.length >= needed and (state.graph is not None) == use_graph
                and state.weights == weights_key(model)):
            return state
        self.states.pop(batch, None)
        state = None
        length = needed
        if model.device.type == "cuda":  # round up so later calls with slightly longer prompts reuse the graph
            length = min(-(-needed // 256) * 256, model.config.max_position_embeddings)
        try:
            state = self.new_state(model, batch, length, use_graph, fallback)
        except torch.cuda.OutOfMemoryError:
            state = None
        if state is None:
            # Retried outside the except block: the exception's traceback holds the half-built state's tensors.
            self.states.clear()  # other batch sizes' caches are what is in the way
            torch.cuda.empty_cache()
            state = self.new_state(model, batch, length, use_graph, fallback)
        self.states[batch] = state
        return state

    def new_state(self, model, batch, length, use_graph, fallback):
        """A new DecodeState (not kept: decode_state and PrefixCache keep their own). With use_graph and fallback,
        a failed capture is recorded in capture_error and gives an eager state, with a warning."""
        try:
            return DecodeState(model, batch, length, use_graph)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            if not (use_graph and fallback):
                raise
            self.capture_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"mixtral_ext: CUDA-graph capture of the decode step failed ({self.capture_error}); "
                      f"decoding with eager steps", RuntimeWarning, stacklevel=3)
        return DecodeState(model, batch, length, False)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How generate() picks each next token: transformers' generate arguments of the same names and defaults,
    validated once here (ValueError naming the argument and its value).

    do_sample: False = greedy (argmax); True = a draw from softmax(scores) after temperature, top_k, top_p, which
    apply only then (temperature is checked only then too). temperature > 0; top_k: an integer >= 0, 0 disables it;
    top_p in (0, 1], 1 disables it; repetition_penalty > 0, 1 disables it (applies to greedy decoding too); seed: an
    integer for a generator of its own (reproducible draws), None for torch's global RNG."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):  # an int 1 compares as 1.0 below, but stays exact
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "do_sample", bool(self.do_sample))

    def generator(self, device):
        """A torch.Generator on `device` seeded with seed, or None (torch's global RNG) without one."""
        return torch.Generator(device).manual_seed(self.seed) if self.seed is not None else None


class PrefixCache:
    """A conversation's KV cache kept between generate() calls (generate(..., prefix_cache=c), one sequence): a
    prompt that starts with the tokens already cached (the history, for a chat's next turn) prefills only the rest.

    tokens: the ids whose keys and values the cache holds, in order (a prompt, then each generated token that was
    fed back). A new prompt reuses their longest common prefix with it, so a history that was re-encoded differently
    costs a longer prefill, never a wrong answer: the cached keys of a position depend only on the tokens before it.
    last_prefill: how many tokens the last call prefilled."""

    def __init__(self):
        self.state, self.tokens, self.last_prefill = None, [], 0

    def reset(self):
        self.tokens = []

    def _prepare(self, model, prompt, needed, use_graph, fallback):
        """(the DecodeState to run in, how many leading tokens of prompt are cached already)."""
        state = self.state
        if state is not None and state.weights != weights_key(model):
            self.state = state = None
            self.tokens = []
        if state is None or state.length < needed or (state.graph is not None) != use_graph:
            # Room for the next turns too; the keys and values cached so far move into the new cache.
            length = min(-(-2 * needed // 256) * 256, model.config.max_position_embeddings)
            new = model.generation.new_state(model, 1, max(length, needed), use_graph, fallback)
            if state is not None:
                n = min(len(self.tokens), state.length)
                new.cache.k[:, :, :n].copy_(state.cache.k[:, :, :n])
                new.cache.v[:, :, :n].copy_(state.cache.v[:, :, :n])
                self.tokens = self.tokens[:n]
            self.state = state = new
        reuse = 0
        for a, b in zip(self.tokens, prompt[:-1]):  # at least the last prompt token is prefilled: its logits
            if a != b:
                break
            reuse += 1
        self.tokens = list(prompt)
        self.last_prefill = len(prompt) - reuse
        return state, reuse


def generate(model, input_ids, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50, top_p=1.0,
             repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, seed=None, stream=False,
             use_cuda_graph=None, sync_every=8, attention_mask=None, prefix_cache=None):
    """Generate up to max_new_tokens new tokens per sequence.

    input_ids: a LongTensor [B, T] (every row a whole prompt), a list of ints (one prompt) or a list of id lists
    (prompts of different lengths, run ragged). Sampling (do_sample=True) draws from softmax(scores) after the
    processors; `seed` makes it reproducible (a generator of its own; None uses torch's global RNG). eos_token_id:
    int, list of ints, or None for the config's; [] disables stopping. pad_token_id: None = the config's, else the
    first EOS id, else 0. use_cuda_graph: None = whenever possible (eager steps, with a warning, if a capture
    fails), False = eager steps, True = required.

    Returns a LongTensor [B, max_b n_b + new] (on input_ids' device for a tensor, else the CPU), prompts left-padded,
    new = max_new_tokens, or fewer when every sequence has emitted an EOS (as transformers). With stream=True,
    returns an iterator instead: each item is a list of B ints, the token each sequence produced at that step
    (pad_token_id for a sequence that already stopped); it ends when every sequence has stopped or after
    max_new_tokens items, and its return value (StopIteration.value) is the tensor above.

    attention_mask: as transformers', for a batch padded to one length [B, T]: 1 for a prompt token, 0 for padding,
    which must be on the left (a row is 0...0 1...1; right padding or holes are a ValueError). Each row then runs as
    its own prompt, and the result is [B, T + new]: input_ids as given, then the new tokens (transformers' shape).
    Without a mask, a padded tensor is taken as it is, unless pad_token_id (given, or the config's) is not an EOS
    id and occurs in input_ids: then the mask is input_ids != pad_token_id, as transformers infers it.

    prefix_cache: a PrefixCache (one prompt only): the part of the prompt it holds already is not prefilled again.
    """
    cfg = model.config
    padded = None  # the caller's padded [B, T] batch, when a mask says which tokens are prompts
    pad_given = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    stops = cfg.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    if (attention_mask is None and isinstance(input_ids, torch.Tensor) and isinstance(pad_given, int)
            and pad_given not in stops and bool((input_ids == pad_given).any())):
        attention_mask = input_ids != pad_given
    if attention_mask is not None:
        input_ids, padded = _unpad(input_ids, attention_mask)
    prompts, out_device = _prompts(input_ids, cfg.vocab_size)
    if padded is not None:
        out_device = padded.device
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"max_new_tokens: a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"the context max_position_embeddings={cfg.max_position_embeddings}")
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    eos = cfg.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    for name, ids in (("eos_token_id", eos), ("pad_token_id", () if pad_token_id is None else (pad_token_id,))):
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size:
                raise ValueError(f"{name}: {t!r} is outside the vocabulary [0, {cfg.vocab_size})")
    pad = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    can_graph = graphs_supported(model)
    if use_cuda_graph and not can_graph:
        raise ValueError(f"use_cuda_graph=True needs a CUDA model whose every op has a CUDA kernel for "
                         f"{model.dtype} (device {model.device}, extension: {ops.EXTENSION_STATUS})")
    use_graph = can_graph if use_cuda_graph is None else bool(use_cuda_graph)
    if use_cuda_graph is None and model.generation.capture_error:
        use_graph = False  # a capture already failed on this model (warned then)
    if prefix_cache is not None and len(prompts) != 1:
        raise ValueError(f"prefix_cache holds one conversation; input_ids has {len(prompts)} prompts")
    if sampling.do_sample and sampling.seed is None and model.shard.world > 1:
        # ranks sampling apart would diverge (and deadlock)
        sampling = dataclasses.replace(sampling, seed=parallel.shared_seed(model.shard))
    steps = _generate(model, prompts, max_new_tokens, sampling, eos=eos, pad=pad, stream=stream, use_graph=use_graph,
                      graph_fallback=use_cuda_graph is None, sync_every=sync_every, out_device=out_device,
                      prefix_cache=prefix_cache)
    if padded is not None:
        steps = _repad(steps, padded, max(len(p) for p in prompts))
    if stream:
        return steps
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _unpad(input_ids, attention_mask):
    """(the rows' prompts, the padded batch as a tensor) of a left-padded batch; see generate's attention_mask."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else torch.tensor(attention_mask)
    if ids.dim() == 1:
        ids, mask = ids[None], mask[None] if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}: they must match")
    mask = mask.to("cpu")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt token)")
    mask = mask.bool()
    prompts = []
    for b in range(ids.shape[0]):
        row = mask[b]
        n = int(row.sum())
        if n == 0:
            raise ValueError(f"attention_mask: row {b} is all padding (each prompt needs at least one token)")
        if not bool(row[ids.shape[1] - n:].all()):
            side = "right padding" if bool(row[0]) else "padding between prompt tokens"
            raise ValueError(f"attention_mask: row {b} has {side}; generation continues a prompt from its end, so "
                             f"pad on the left (transformers: tokenizer.padding_side = 'left')")
        prompts.append(ids[b, ids.shape[1] - n:].tolist())
    return prompts, ids


def _repad(steps, padded, longest):
    """generate()'s steps with the result re-based on the caller's padded batch: [B, T + new]."""
    result = yield from steps
    return torch.cat([padded.to(result.device), result[:, longest:].to(padded.dtype)], dim=1)


def _prompts(input_ids, vocab_size):
    """Normalise input_ids to a list of non-empty id lists (validated) and the device of the result."""
    out_device = torch.device("cpu")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be [batch, tokens] (or one prompt [tokens]), got shape "
                             f"{tuple(input_ids.shape)}")
        out_device = input_ids.device
        prompts = input_ids.tolist()
        prompts = [prompts] if input_ids.dim() == 1 else prompts
    elif isinstance(input_ids, (list, tuple)):
        if input_ids and all(isinstance(t, int) for t in input_ids):
            prompts = [list(input_ids)]
        else:
            prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in input_ids]
    else:
        raise ValueError(f"input_ids must be a LongTensor or a list of token id lists, got {type(input_ids).__name__}")
    if not prompts:
        raise ValueError("input_ids: the batch is empty (no prompts)")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"input_ids: prompt {b} is empty (each prompt needs at least one token)")
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"input_ids: prompt {b} holds token id {t!r}, outside the vocabulary "
                                 f"[0, {vocab_size})")
    return prompts, out_device


@torch.inference_mode()
def _generate(model, prompts, max_new, sampling, *, eos, pad, stream, use_graph, graph_fallback, sync_every,
              out_device, prefix_cache=None):
    dev, V = model.device, model.config.vocab_size
    B, lens = len(prompts), [len(p) for p in prompts]
    longest = max(lens)
    new = torch.full((B, max_new), pad, dtype=torch.long, device=dev)  # [B, new]
    n_keep = 0
    if max_new > 0:
        if prefix_cache is None:
            state = model.generation.decode_state(model, B, longest + max_new, use_graph, graph_fallback)
            logits = model.prefill(prompts, state.cache)  # [B, V]
        else:
            state, reuse = prefix_cache._prepare(model, prompts[0], longest + max_new, use_graph, graph_fallback)
            logits = model.prefill([prompts[0][reuse:]], state.cache, starts=[reuse])
        state.positions.copy_(torch.tensor(lens, dtype=torch.int32))
        generator = sampling.generator(dev)
        seen = None  # [B, V] bool: tokens each sequence holds so far (for the repetition penalty)
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
            rows = torch.tensor([b for b, n in enumerate(lens) for _ in range(n)], device=dev)
            seen[rows, torch.tensor([t for p in prompts for t in p], device=dev)] = True
        eos_ids = torch.tensor(eos, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        stop_step = torch.full((B,), max_new - 1, dtype=torch.long, device=dev)  # step of each sequence's EOS
        for i in range(max_new):
            nxt = _next_tokens(logits, seen, sampling, generator)
            nxt = torch.where(finished, pad, nxt)  # [B]
            new[:, i] = nxt
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            if eos:
                hit = torch.isin(nxt, eos_ids) & ~finished
                stop_step = torch.where(hit, i, stop_step)
                finished |= hit
            all_done = False
            if stream:
                yield nxt.tolist()
                all_done = bool(eos) and bool(finished.all())
            elif eos and (i + 1) % sync_every == 0:
                all_done = bool(finished.all())  # the one host synchronisation of the loop
            if all_done or i == max_new - 1:
                break
            state.tokens.copy_(nxt)
            logits = state.step(model)
            state.positions += 1
            if prefix_cache is not None:  # one sequence; its token is on the host already when streaming
                prefix_cache.tokens.append(int(nxt[0]))
        # transformers stops at the step where the last sequence stopped: drop the columns after it.
        n_keep = int(stop_step.max()) + 1
    out = torch.full((B, longest + n_keep), pad, dtype=torch.long)
    for b, p in enumerate(prompts):
        out[b, longest - len(p):longest] = torch.tensor(p, dtype=torch.long)
    out[:, longest:] = new[:, :n_keep].cpu()
    return out.to(out_device)


def _next_tokens(logits, seen, sampling, generator):
    """The next token of each sequence from logits [B, V] under `sampling` (a SamplingConfig); seen [B, V] bool: the
    tokens the repetition penalty applies to (None: no penalty); generator: sampling.generator(), or None for torch's
    global RNG. No host synchronisation."""
    scores = logits.float()
    penalty, temperature, top_k, top_p = (sampling.repetition_penalty, sampling.temperature, sampling.top_k,
                                          sampling.top_p)
    if seen is not None:  # CTRL's penalty, as transformers: divide positive scores, multiply negative ones
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if not sampling.do_sample:
        return scores.argmax(-1)  # ties: the lowest id, as torch.argmax in transformers
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]; ties with the k-th score stay in
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        # Drop the low tail whose total probability is at most 1 - top_p; the most likely token always stays.
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    # argmax(p / Exp(1) noise) is a draw from Categorical(p) (the exponential race), without a host sync; the clamp
    # keeps a zero draw from turning 0/0 into NaN.
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / noise).argmax(-1)
