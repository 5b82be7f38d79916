"""Several GPUs (or several CPU processes): tensor and expert parallelism over torch.distributed.

Launched by torchrun (`torchrun --nproc-per-node N -m mixtral_ext generate ...`) or under a default process group
the caller initialised; Mixtral.from_pretrained notices either (process_group) and loads this rank's shard only.
NCCL on GPUs, gloo on CPUs; in a group initialised here every collective times out after MIXTRAL_EXT_DIST_TIMEOUT
seconds (default 600; a caller's own group keeps its timeout), so a rank that died or diverged gives an error
instead of a hang.

What each of the N ranks holds (Shard), rank r:
  attention   query heads [r Hq/N, (r+1) Hq/N) and the KV heads they read, [r Hkv/N, (r+1) Hkv/N) (with grouped-query
              attention query head h reads KV head h // (Hq/Hkv), so contiguous blocks keep every pair together);
              wqkv holds those heads' rows, wo those heads' columns; the KV cache holds those KV heads only.
              The partial o_proj outputs are summed by one all-reduce.
  MoE, tensor parallel (the default): every expert, a 1/N slice of its FFN: w1/w3 rows [r I/N, (r+1) I/N) and the
              same columns of w2, so silu(w1 x) * w3 x never crosses ranks; the partial outputs are summed by one
              all-reduce.
  MoE, expert parallel: E/N whole experts, [r E/N, (r+1) E/N). The router is replicated and its input identical on
              every rank (it comes out of an all-reduce), so every rank computes the same routing; each computes its
              own experts' weighted contributions (local_route) and one all-reduce sums them.
  embeddings, the final norm, lm_head, the router: replicated. lm_head could be split by vocabulary, but then the
              logits need an all-gather every step (a third collective per token on the latency-bound decode path) and
              sampling would have to agree across ranks; replicated, every rank computes the same logits and picks
              the same token by itself. The cost is 2 V H elements per rank (0.5 GB of Mixtral-8x7B in bf16, ~1% of
              an 80 GB GPU).
Every rank reads only its slices from the safetensors files (safe_open(...).get_slice), never a whole tensor it
does not keep. Errors while loading are agreed on: if any rank fails, every rank raises, naming the rank and why.

Dimension legend as in model.py: T tokens, k experts per token, E experts, I expert FFN width, H hidden,
Hq / Hkv query / key-value heads, D head dim, N ranks.
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist

_OWNED = []  # non-empty when this module initialised the default process group (shutdown() destroys it)
_PEER_LOST = []  # set when a collective found a rank gone: shutdown() then does not wait for it


class ParallelError(RuntimeError):
    """Another rank failed (its message is included), or the ranks could not agree in time."""


def timeout_seconds():
    value = os.environ.get("MIXTRAL_EXT_DIST_TIMEOUT", "600")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"MIXTRAL_EXT_DIST_TIMEOUT must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"MIXTRAL_EXT_DIST_TIMEOUT must be positive, got {value!r}")
    return seconds


def launched_world_size():
    """The world size torchrun (or any env:// launcher) set for this process: 1 when not launched that way."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def process_group(device):
    """The default process group when there are several ranks, else None. Initialises it from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when nobody has yet: NCCL for a CUDA device, gloo
    otherwise. With CUDA it also makes cuda:LOCAL_RANK the current device."""
    if not dist.is_available():
        if launched_world_size() > 1:
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        return None
    if not dist.is_initialized():
        if launched_world_size() <= 1:
            return None
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
        _OWNED.append(True)  # not the group itself: no reference that outlives destroy_process_group
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def local_device(device):
    """A CUDA device without an index means this rank's GPU, cuda:LOCAL_RANK (torchrun's one GPU per process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shutdown():
    """Destroy the default process group if process_group() created it (the CLI calls this on exit; a program that
    uses the Python API under torchrun should too, or call dist.destroy_process_group()). The ranks first wait for
    each other: gloo ranks that leave while a peer is still connected abort at exit now and then ("terminate called
    without an active exception"), and torchrun stops the other ranks as soon as one exits, possibly before they
    printed their error."""
    while _OWNED:
        _OWNED.pop()
        if not dist.is_initialized():
            continue
        # Frames kept alive by reference cycles (an exception's traceback) may still hold the group; destroying it
        # must free it now, so that its worker threads are joined before the interpreter exits: a gloo worker that
        # releases a tensor during interpreter finalization aborts the process.
        gc.collect()
        if not _PEER_LOST:
            try:
                dist.barrier()
            except Exception:  # a rank died meanwhile: nothing to wait for
                pass
        dist.destroy_process_group()


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_world_sizes(cfg, expert_parallel=False):
    """The rank counts the config can be split over: N divides the KV heads (each rank owns whole KV heads with
    their query heads) and the expert FFN width (tensor parallel) or the expert count (expert parallel)."""
    split = cfg.num_local_experts if expert_parallel else cfg.intermediate_size
    return [n for n in _divisors(cfg.num_key_value_heads) if split % n == 0]


class Shard:
    """What one rank holds and how it combines with the others (see the module docstring). world == 1 is the
    whole model, with no communication."""

    def __init__(self, cfg, world=1, rank=0, group=None, expert_parallel=False):
        Hq, Hkv, I, E = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                         cfg.num_local_experts)
        mode = "expert parallel" if expert_parallel else "tensor parallel"
        valid = ", ".join(map(str, valid_world_sizes(cfg, expert_parallel)))
        if Hkv % world:
            raise ValueError(f"{mode} over {world} ranks: {world} does not divide num_key_value_heads={Hkv} (each "
                             f"rank holds whole KV heads with their query heads); valid rank counts: {valid}")
        if expert_parallel and E % world:
            raise ValueError(f"expert parallel over {world} ranks: {world} does not divide num_local_experts={E} "
                             f"(each rank holds E/N whole experts); valid rank counts: {valid}")
        if not expert_parallel and I % world:
            raise ValueError(f"tensor parallel over {world} ranks: {world} does not divide intermediate_size={I} "
                             f"(each expert's w1/w3 rows and w2 columns are split); valid rank counts: {valid}")
        self.world, self.rank, self.expert_parallel = world, rank, bool(expert_parallel)
        # None stands for the default group: a model must not keep the process group object alive past
        # destroy_process_group (its threads would then be torn down at interpreter exit, which aborts).
        self.group = None if group is None or group is dist.group.WORLD else group
        self.q_heads, self.kv_heads = Hq // world, Hkv // world  # this rank's heads: Hq/N and Hkv/N
        self.first_q_head, self.first_kv_head = rank * self.q_heads, rank * self.kv_heads
        if self.expert_parallel:
            self.experts, self.first_expert = E // world, rank * (E // world)  # whole experts [e0, e0 + E/N)
            self.inter, self.first_inter = I, 0
        else:
            self.experts, self.first_expert = E, 0
            self.inter, self.first_inter = I // world, rank * (I // world)  # FFN units [i0, i0 + I/N) of each expert

    def __repr__(self):
        mode = "expert" if self.expert_parallel else "tensor"
        return f"Shard(rank {self.rank} of {self.world}, {mode} parallel)"

    def all_reduce(self, x):
        """Sum x over the ranks, in place (every rank gets the same bits). No-op for one rank."""
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def local_route(self, route):
        """moe_route's routing (over all E experts, identical on every rank) restricted to this rank's experts, as
        the routing of a problem with E/N experts that moe_experts runs unchanged. Fixed shapes and no host
        synchronisation, so it can sit inside a captured CUDA graph.

        The slots of other ranks' experts get weight 0 and are left out of the expert-sorted rows, except that
        moe_experts' combine reads a row for every (token, slot): they all read one dummy row, the first foreign
        slot's token run through a local expert that is active anyway where there is one (so no extra weights are
        streamed). Its output is finite, times weight 0 it adds exactly 0. Rows after the local ones and the dummy
        belong to no expert and are never read."""
        from .ops import Route
        weights, ids = route.topk_weights, route.topk_ids  # [T, k]
        T, k = ids.shape
        El, e0 = self.experts, self.first_expert
        local_id = ids.long() - e0  # [T, k]
        mine = (local_id >= 0) & (local_id < El)
        key = torch.where(mine, local_id, El).reshape(-1)  # [T k]: local expert of each slot, El = foreign
        counts = torch.bincount(key, minlength=El + 1)[:El]  # [El]
        dummy_expert = (counts > 0).int().argmax()  # the first active local expert (0 when none is)
        dummy_slot = (key == El).int().argmax()  # the first foreign slot (0 when there is none: then unused)
        has_foreign = key[dummy_slot] == El
        key = key.clone()
        key[dummy_slot] = torch.where(has_foreign, dummy_expert, key[dummy_slot])
        order = torch.sort(key, stable=True).indices  # [T k]: grouped by local expert, slots ascending
        offsets = torch.zeros(El + 1, dtype=torch.int32, device=ids.device)
        offsets[1:] = torch.cumsum(torch.bincount(key, minlength=El + 1)[:El], 0)
        rows = torch.empty_like(order)
        rows[order] = torch.arange(T * k, device=ids.device)
        token_rows = torch.where(mine.reshape(-1), rows, rows[dummy_slot]).view(T, k)
        local_ids = torch.where(mine, local_id, dummy_expert)
        return Route(topk_weights=torch.where(mine, weights, 0.0), topk_ids=local_ids.to(torch.int32),
                     expert_counts=offsets[1:] - offsets[:-1], expert_offsets=offsets,
                     sorted_tokens=(order // k).to(torch.int32), token_rows=token_rows.to(torch.int32))


def agree(group, error):
    """Every rank calls this with its own exception (or None). Returns normally when none failed; otherwise raises
    on every rank: its own error where it failed, elsewhere a ParallelError quoting the failed ranks' messages. A
    rank that never arrives makes the others fail after the process group's timeout instead of waiting forever."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    states = [None] * world
    try:
        try:
            dist.all_gather_object(states, mine, group=group)
        except Exception as exc:  # a peer died (connection closed) or timed out
            _PEER_LOST.append(True)
            if error is None:
                raise ParallelError(f"rank {rank} of {world}: the other ranks did not answer within "
                                    f"{timeout_seconds():g} s (MIXTRAL_EXT_DIST_TIMEOUT) or one of them died "
                                    f"({exc})") from None
        if error is not None:
            raise error
    finally:
        # No reference cycle (this frame -> error -> its traceback -> this frame) that would keep the frames'
        # objects, the process group among them, alive until interpreter exit.
        error = None
    failed = [(r, s) for r, s in enumerate(states) if s is not None]
    if failed:
        what = "; ".join(f"rank {r}: {s}" for r, s in failed)
        raise ParallelError(f"rank {rank} of {world} stops because another rank failed ({what})")


def broadcast_object(obj, shard):
    """rank 0's obj on every rank (a Python object; for the CLI's chat input and a shared sampling seed)."""
    if shard.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(shard.group, 0) if shard.group is not None else 0,
                               group=shard.group)
    return box[0]


def shared_seed(shard):
    """A sampling seed drawn from rank 0's global torch RNG and given to every rank: the ranks' logits are the
    same, so with the same seed they sample the same tokens and stay in step."""
    return broadcast_object(int(torch.randint(0, 2 ** 62, ()).item()) if shard.rank == 0 else None, shard)


def shard_param_bytes(cfg, dtype, shard):
    """Bytes of one rank's parameters in `dtype` (for the fit check)."""
    H, D, V, L = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.num_hidden_layers
    E = cfg.num_local_experts
    attention = (shard.q_heads + 2 * shard.kv_heads) * D * H + H * shard.q_heads * D
    per_layer = 2 * H + attention + E * H + 3 * shard.experts * shard.inter * H
    return (L * per_layer + 2 * V * H + H) * torch.empty((), dtype=dtype).element_size()


def gpus_needed(cfg, dtype, gpu_bytes, expert_parallel=False, headroom=1 << 30):
    """The smallest valid rank count whose per-rank weights plus headroom fit in gpu_bytes, or None."""
    for n in valid_world_sizes(cfg, expert_parallel):
        if shard_param_bytes(cfg, dtype, Shard(cfg, n, 0, expert_parallel=expert_parallel)) + headroom <= gpu_bytes:
            return n
    return None


def check_fits(cfg, dtype, device, shard, free_bytes=None, total_bytes=None, headroom=1 << 30):
    """weights.check_fits for one rank of several: this rank's weights against this rank's GPU."""
    from .weights import ModelTooLargeError
    device = torch.device(device)
    if device.type != "cuda" and free_bytes is None:
        return
    if free_bytes is None:
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    needed = shard_param_bytes(cfg, dtype, shard)
    if needed + headroom <= free_bytes:
        return
    gib, name = 2.0 ** 30, str(dtype).replace("torch.", "")
    mode = "expert" if shard.expert_parallel else "tensor"
    n = gpus_needed(cfg, dtype, total_bytes or free_bytes, shard.expert_parallel, headroom)
    advice = (f"it needs {n} GPUs of {(total_bytes or free_bytes) / gib:.0f} GiB in {name}" if n else
              f"no valid split over GPUs of this size holds it in {name}")
    raise ModelTooLargeError(
        f"rank {shard.rank} of {shard.world} ({mode} parallel): its shard of Mixtral ({cfg.num_hidden_layers} layers, "
        f"{name}) needs {needed / gib:.1f} GiB plus {headroom / gib:.1f} GiB headroom, but {device} has "
        f"{free_bytes / gib:.1f} GiB free; {advice}")


def load_shard(path, cfg, params, shard, progress=True):
    """Read this rank's slices of every tensor of the checkpoint in `path` into `params` (this rank's parameters,
    pre-allocated on the target device; the layouts of weights.expected_tensors with local sizes). Every name,
    shape and dtype of every shard file is checked (headers only) as weights.load_checkpoint does; the data read is
    this rank's slices, through get_slice. The consolidated layout's q/k permutation works within each head, so a
    slice of whole heads is permuted on its own."""
    from safetensors import safe_open

    from .weights import (_CHUNK_BYTES, CheckpointError, _interleaved_to_rotate_half, _open, _progress,
                          check_header_entry, expected_tensors, find_checkpoint)

    layout, _, files = find_checkpoint(path, announce=False)  # from_pretrained announced the choice (rank 0)
    expected = expected_tensors(cfg, layout)
    optional = {"lm_head.weight", "output.weight"} if cfg.tie_word_embeddings else set()
    device = next(iter(params.values())).device
    D, s = cfg.head_dim, shard
    ql, kl = s.q_heads * D, s.kv_heads * D  # this rank's q rows and k (= v) rows
    q0, k0 = s.first_q_head * D, s.first_kv_head * D
    i0, il = s.first_inter, s.inter

    e0, e1, I = s.first_expert, s.first_expert + s.experts, cfg.intermediate_size  # this rank's experts [e0, e1)

    def read(role, expert, sl, transform):
        """[(a slice of the stored tensor that this rank keeps, the view of the local parameter it goes to)]."""
        if role == "q":
            value = sl[q0:q0 + ql]
            return [((transform(value, s.q_heads, D) if transform else value), lambda p: p[:ql])]
        if role == "k":
            value = sl[k0:k0 + kl]
            return [((transform(value, s.kv_heads, D) if transform else value), lambda p: p[ql:ql + kl])]
        if role == "v":
            return [(sl[k0:k0 + kl], lambda p: p[ql + kl:ql + 2 * kl])]
        if role == "o":
            return [(sl[:, q0:q0 + ql], lambda p: p)]
        if role in ("w1", "w3", "w2"):  # one expert's [I, H] or [H, I]
            if not e0 <= expert < e1:
                return []  # another rank's expert
            e = expert - e0
            if role == "w2":
                return [(sl[:, i0:i0 + il], lambda p: p[e])]
            return [(sl[i0:i0 + il], (lambda p: p[e, 0::2]) if role == "w1" else (lambda p: p[e, 1::2]))]
        if role == "gate_up":  # all experts' [E, 2I, H]: w1 rows, then w3 rows
            return [(sl[e0:e1, i0:i0 + il], lambda p: p[:, 0::2]),
                    (sl[e0:e1, I + i0:I + i0 + il], lambda p: p[:, 1::2])]
        if role in ("gate_all", "up_all"):  # all experts' w1 or w3 [E, I, H]
            return [(sl[e0:e1, i0:i0 + il], (lambda p: p[:, 0::2]) if role == "gate_all" else (lambda p: p[:, 1::2]))]
        if role == "down_all":  # all experts' w2 [E, H, I]
            return [(sl[e0:e1, :, i0:i0 + il], lambda p: p)]
        return [(sl[:], lambda p: p)]

    seen, reads = {}, []
    for file in files:  # first pass: every header entry checked before any data is read
        with _open(safe_open, file, device) as f:
            for name in f.keys():
                nbytes = check_header_entry(f, file, name, expected, optional, seen, layout)
                if nbytes is not None:
                    reads.append((file, name, nbytes))
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]}{more} missing from the checkpoint "
                              f"({', '.join(os.path.basename(f) for f in files)})")
    bar = _progress(len(reads), progress, os.path.basename(os.path.normpath(path)))
    f, open_file, mapped = None, None, 0
    try:
        for file, name, nbytes in reads:
            # Reopened every ~_CHUNK_BYTES of stored tensors, as load_checkpoint does: pages of the memory map that
            # were read stay resident until the file is closed.
            if file != open_file or mapped > _CHUNK_BYTES:
                if f is not None:
                    f.__exit__(None, None, None)
                f = _open(safe_open, file, device).__enter__()
                open_file, mapped = file, 0
            mapped += nbytes
            param, _, _, permute = expected[name]
            try:
                parts = read(*_role(name), f.get_slice(name),
                             _interleaved_to_rotate_half if permute is not None else None)
            except Exception as exc:
                raise CheckpointError(f"{file}: tensor {name} could not be read ({exc})") from None
            for value, place in parts:
                place(params[param]).copy_(value)
            del parts
            bar.update(1)
    finally:
        if f is not None:
            f.__exit__(None, None, None)
        bar.close()
    if cfg.tie_word_embeddings:
        params["lm_head"].copy_(params["embed"])
    return layout


# How each stored tensor is split (load_shard's read), by the end of its name, in every layout of weights.LAYOUTS:
# the experts stacked in one tensor (hf-fused, mlx), then the per-tensor names before ".weight" (hf, consolidated).
_STACKED = ((".experts.gate_up_proj", "gate_up"), (".experts.down_proj", "down_all"),
            (".switch_mlp.gate_proj.weight", "gate_all"), (".switch_mlp.up_proj.weight", "up_all"),
            (".switch_mlp.down_proj.weight", "down_all"))
_ROLES = {"q_proj": "q", "wq": "q", "k_proj": "k", "wk": "k", "v_proj": "v", "wv": "v", "o_proj": "o", "wo": "o",
          "w1": "w1", "w3": "w3", "w2": "w2"}


def _role(name):
    """(role, expert index or None) of a stored tensor; role "whole" for the replicated ones."""
    for suffix, role in _STACKED:
        if name.endswith(suffix):
            return role, None
    role = _ROLES.get(name.rsplit(".", 2)[-2], "whole")
    if role in ("w1", "w3", "w2"):
        return role, int(name.split(".experts.")[1].split(".")[0])
    return role, None


def from_pretrained(cls, path, device, dtype, progress, expert_parallel, group):
    """Mixtral.from_pretrained on one rank of `group`: this rank's shard only. Any failure on any rank (a bad
    config, a rank count that does not divide the heads, a missing or corrupt file, a shard too large for its GPU)
    raises on every rank."""
    from .config import MixtralConfig
    from .weights import find_checkpoint

    model, error = None, None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    try:
        backend = dist.get_backend(group)
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the process group's backend is NCCL, which cannot carry {device.type} tensors: use "
                             f"device='cuda', or a gloo process group for the CPU")
        _, config_path, _ = find_checkpoint(path, announce=rank == 0)
        cfg = MixtralConfig.from_pretrained(config_path)
        shard = Shard(cfg, world, rank, group, expert_parallel)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        check_fits(cfg, dtype, device, shard)
        model = cls(cfg, device=device, dtype=dtype, shard=shard)
        load_shard(path, cfg, dict(model.named_parameters()), shard, progress=progress and rank == 0)
    except Exception as exc:
        error, model = exc, None
    try:
        agree(group, error)
    finally:
        error = None  # no cycle through this frame (see agree)
    return model.eval()
