"""Tensor and expert parallelism on the CPU: N gloo processes (N = 2, 4) against the single-process model (itself
checked against transformers in test_model.py), both checkpoint layouts, the per-rank shards, the bad inputs, and
the CLI under torchrun.

The rank processes are started with multiprocessing's spawn and find each other through torchrun's environment
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the library initialises the process group itself, as it
does under torchrun. Each rank saves what it computed; the assertions run here, in the test process. A run that does
not finish within its time limit fails as a hang.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from mixtral_ext import parallel
from mixtral_ext.config import MixtralConfig
from mixtral_ext.demo import build_tiny_checkpoint, random_weights, tiny_config
from mixtral_ext.model import Mixtral
from mixtral_ext.ops import moe_experts, moe_route
from mixtral_ext.parallel import Shard
from mixtral_ext.weights import ModelTooLargeError, check_fits
from checkpoints import rel_err, rotate_half_to_interleaved

# 4 KV heads (so N = 2 and 4 split them), 8 experts, expert width 40 (10 per rank at N = 4), odd head_dim 6.
CFG = MixtralConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=6, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=64, eos_token_id=None)
IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
PROMPTS = [[5, 17, 3, 88, 9], [1, 2, 3, 4, 5, 6, 7, 8, 40]]  # ragged
NEW = 10
TIMEOUT = 240  # seconds for a whole multi-process run on a loaded 2-core machine


def write_hf_sharded(path, cfg, tensors, n_files=3):
    os.makedirs(path, exist_ok=True)
    cfg.save(path)
    names, weight_map = sorted(tensors), {}
    for i in range(n_files):
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::n_files]}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names[i::n_files]})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


def write_consolidated(path, cfg, tensors, n_files=2):
    out = {}
    for k, v in tensors.items():
        k = (k.replace("model.embed_tokens.", "tok_embeddings.").replace("lm_head.", "output.")
             .replace("model.norm.", "norm.").replace("model.layers.", "layers.")
             .replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm")
             .replace("block_sparse_moe", "feed_forward").replace("self_attn", "attention")
             .replace("q_proj", "wq").replace("k_proj", "wk").replace("v_proj", "wv").replace("o_proj", "wo"))
        if k.endswith("attention.wq.weight"):
            v = rotate_half_to_interleaved(v, cfg.num_attention_heads, cfg.head_dim)
        elif k.endswith("attention.wk.weight"):
            v = rotate_half_to_interleaved(v, cfg.num_key_value_heads, cfg.head_dim)
        out[k] = v.contiguous()
    os.makedirs(path, exist_ok=True)
    names = sorted(out)
    for i in range(n_files):
        save_file({k: out[k] for k in names[i::n_files]}, os.path.join(path, f"consolidated.{i:02d}.safetensors"))
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
              "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size,
              "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_position_embeddings,
              "moe": {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    return str(path)


def write_stacked(path, cfg, tensors, layout):
    """The experts of each layer stacked: transformers >= 5's fused layout ("hf-fused": mlp.experts.gate_up_proj =
    w1 rows then w3 rows, down_proj) or mlx-lm's ("mlx": block_sparse_moe.switch_mlp.gate/up/down_proj)."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for n in range(cfg.num_hidden_layers):
        m = f"model.layers.{n}.block_sparse_moe"
        w1, w3, w2 = (torch.stack([tensors[f"{m}.experts.{e}.{w}.weight"] for e in range(cfg.num_local_experts)])
                      for w in ("w1", "w3", "w2"))
        if layout == "hf-fused":
            out[f"model.layers.{n}.mlp.gate.weight"] = out.pop(f"{m}.gate.weight")
            out[f"model.layers.{n}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
            out[f"model.layers.{n}.mlp.experts.down_proj"] = w2
        else:
            out.update({f"{m}.switch_mlp.gate_proj.weight": w1, f"{m}.switch_mlp.up_proj.weight": w3,
                        f"{m}.switch_mlp.down_proj.weight": w2})
    os.makedirs(path, exist_ok=True)
    cfg.save(path)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    tensors = random_weights(CFG, seed=3, std=0.3)  # wide logits: greedy choices are not near-ties
    paths = {"hf": write_hf_sharded(root / "hf", CFG, tensors),
             "consolidated": write_consolidated(root / "consolidated", CFG, tensors),
             "hf-fused": write_stacked(root / "fused", CFG, tensors, "hf-fused"),
             "mlx": write_stacked(root / "mlx", CFG, tensors, "mlx")}
    missing = shutil.copytree(paths["hf"], root / "missing")
    os.remove(os.path.join(missing, "model-00002-of-00003.safetensors"))  # what one node's copy may lack
    paths["missing"] = str(missing)
    bad = MixtralConfig(**{**_fields(CFG), "num_local_experts": 6})  # N = 4 divides the 4 KV heads, not E = 6
    paths["six_experts"] = write_hf_sharded(root / "six", bad, random_weights(bad, seed=4, std=0.3), n_files=1)
    return paths


@pytest.fixture(scope="module")
def reference(ckpts):
    model = Mixtral.from_pretrained(ckpts["hf"], progress=False)
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".moe.w" in n)
    return {"model": model, "logits": model(IDS), "expert_bytes": experts,
            "greedy": model.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)}


# ---- the multi-process runner --------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, scenario, args, out_dir, timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MIXTRAL_EXT_DIST_TIMEOUT=str(timeout))
    torch.set_num_threads(1)
    try:
        result = {"ok": SCENARIOS[scenario](rank, world, out_dir, *args)}
    except BaseException as exc:  # noqa: B902 - reported to the test process, which decides
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel.shutdown()


def run_ranks(world, scenario, *args, tmp_path, timeout=30):
    """Run SCENARIOS[scenario](rank, world, out_dir, *args) on `world` spawned processes; returns each rank's
    {"ok": result} or {"error": message}. timeout: the collectives' (MIXTRAL_EXT_DIST_TIMEOUT). Fails the test if
    the ranks do not all finish within TIMEOUT."""
    out_dir = str(tmp_path / f"{scenario}_{world}")
    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, scenario, args, out_dir, timeout)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} of {world} still running after {TIMEOUT} s: a hang"
    results = []
    for r in range(world):
        file = os.path.join(out_dir, f"rank{r}.pt")
        assert os.path.exists(file), f"rank {r} exited with status {procs[r].exitcode} without a result"
        results.append(torch.load(file, weights_only=False))
    return results


def _ok(results):
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r} failed: {res['error']}\n{res['traceback']}"
    return [res["ok"] for res in results]


# ---- what the ranks run --------------------------------------------------------------------------------------------
def _sc_match(rank, world, out_dir, paths, extra):
    """Both layouts x tensor / expert parallel: logits, greedy and sampled generation, shard sizes, determinism."""
    out = {}
    for layout in ("hf", "consolidated"):
        for ep in (False, True):
            model = Mixtral.from_pretrained(paths[layout], expert_parallel=ep, progress=False)
            logits = model(IDS)
            r = {"logits": logits, "again": torch.equal(model(IDS), logits),
                 "greedy": model.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0),
                 "sampled": model.generate(PROMPTS[:1], max_new_tokens=6, do_sample=True),  # seed from rank 0
                 "expert_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                     if ".moe.w" in n),
                 "cache_kv_heads": model.generation.states[len(PROMPTS)].cache.k.shape[3],
                 "shard": (model.shard.q_heads, model.shard.kv_heads, model.shard.experts, model.shard.inter)}
            if layout == "hf" and ep:  # a fresh load gives the same bits
                r["reload_equal"] = torch.equal(Mixtral.from_pretrained(paths[layout], expert_parallel=True,
                                                                        progress=False)(IDS), logits)
            out[layout, ep] = r
    if extra == "six_experts":  # N = 4 divides the 4 KV heads but not the 6 experts
        out["six_experts"] = _error_of(lambda: Mixtral.from_pretrained(paths["six_experts"], expert_parallel=True,
                                                                       progress=False))
    if extra == "missing_then_dead":
        path = paths["missing"] if rank == 1 else paths["hf"]
        out["missing"] = _error_of(lambda: Mixtral.from_pretrained(path, progress=False))
        if rank == 1:  # rank 1 dies; rank 0 must not wait for it forever
            torch.save({"ok": out}, os.path.join(out_dir, f"rank{rank}.pt"))
            os._exit(0)
        t0 = time.monotonic()
        out["dead"] = _error_of(lambda: Mixtral.from_pretrained(paths["hf"], progress=False))
        out["dead_seconds"] = time.monotonic() - t0
    return out


def _sc_stuck(rank, world, out_dir, path):
    """Rank 1 joins the group and then never calls anything (stuck); rank 0 must give up after the timeout."""
    if rank == 1:
        parallel.process_group("cpu")
        while not os.path.exists(os.path.join(out_dir, "rank0.pt")):
            time.sleep(0.1)
        torch.save({"ok": None}, os.path.join(out_dir, "rank1.pt"))
        os._exit(0)
    t0 = time.monotonic()
    return _error_of(lambda: Mixtral.from_pretrained(path, progress=False)), time.monotonic() - t0


def _error_of(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


SCENARIOS = {"match": _sc_match, "stuck": _sc_stuck}


# ---- tests: several processes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_model_equals_the_single_process_model(world, ckpts, reference, tmp_path):
    extra = {2: "missing_then_dead", 4: "six_experts"}[world]
    results = _ok(run_ranks(world, "match", ckpts, extra, tmp_path=tmp_path))
    for layout in ("hf", "consolidated"):
        for ep in (False, True):
            what = f"{layout} layout, {'expert' if ep else 'tensor'} parallel, N={world}"
            runs = [res[layout, ep] for res in results]
            for rank, r in enumerate(runs):
                assert rel_err(r["logits"], reference["logits"]) < 1e-5, f"{what}: rank {rank} logits"
                assert torch.equal(r["logits"], runs[0]["logits"]), f"{what}: ranks disagree"
                assert r["again"], f"{what}: a second forward gave other bits"
                assert torch.equal(r["greedy"], reference["greedy"]), f"{what}: rank {rank} greedy tokens"
                assert torch.equal(r["sampled"], runs[0]["sampled"]), f"{what}: ranks sampled apart"
                assert r["expert_bytes"] * world == reference["expert_bytes"], f"{what}: expert bytes not 1/N"
                assert r["cache_kv_heads"] == CFG.num_key_value_heads // world
                assert r["shard"] == ((8 // world, 4 // world, 8 // world, 40) if ep else
                                      (8 // world, 4 // world, 8, 40 // world))
            if layout == "hf" and ep:
                assert all(r["reload_equal"] for r in runs), "expert parallel: a reload gave other bits"
    if world == 4:
        for rank, res in enumerate(results):
            assert res["six_experts"] is not None and "ValueError: expert parallel over 4 ranks: 4 does not divide " \
                "num_local_experts=6" in res["six_experts"] and "valid rank counts: 1, 2" in res["six_experts"], \
                f"rank {rank}: {res['six_experts']}"
    else:
        r0, r1 = results[0]["missing"], results[1]["missing"]
        assert r1.startswith("CheckpointError") and "model-00002-of-00003.safetensors" in r1 and \
            "does not exist" in r1, r1
        assert r0.startswith("ParallelError: rank 0 of 2 stops because another rank failed (rank 1: " \
                             "CheckpointError") and "model-00002-of-00003.safetensors" in r0, r0
        dead = results[0]["dead"]
        assert dead is not None and dead.startswith("ParallelError: rank 0 of 2: the other ranks did not answer"), dead
        assert results[0]["dead_seconds"] < 60


def test_a_stuck_rank_gives_a_timeout_error_not_a_hang(ckpts, tmp_path):
    results = run_ranks(2, "stuck", ckpts["hf"], tmp_path=tmp_path, timeout=10)
    error, seconds = _ok(results[:1])[0]
    assert error is not None and error.startswith("ParallelError: rank 0 of 2: the other ranks did not answer within "
                                                  "10 s (MIXTRAL_EXT_DIST_TIMEOUT)"), error
    assert 10 <= seconds < 40


# ---- tests: one process --------------------------------------------------------------------------------------------
class _CountingOpen:
    """safetensors.safe_open that counts the elements every get_slice(...)[...] returns; get_tensor fails."""
    read = 0

    def __init__(self, real, *args, **kwargs):
        self.f = real(*args, **kwargs)

    def __enter__(self):
        self.inner = self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        raise AssertionError(f"whole tensor {name} read")

    def get_slice(self, name):
        sl, owner = self.inner.get_slice(name), type(self)

        class Slice:
            get_shape, get_dtype = sl.get_shape, sl.get_dtype

            def __getitem__(self, index):
                value = sl[index]
                owner.read += value.numel()
                return value
        return Slice()


@pytest.mark.parametrize("layout", ["hf", "consolidated", "hf-fused", "mlx"])
@pytest.mark.parametrize("world,ep", [(2, False), (4, False), (2, True), (4, True)])
def test_each_rank_reads_only_its_slices_and_they_are_the_right_ones(layout, world, ep, ckpts, reference,
                                                                     monkeypatch):
    import safetensors
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _CountingOpen(real, *a, **k))
    full = dict(reference["model"].named_parameters())
    D, Hq, Hkv = CFG.head_dim, CFG.num_attention_heads, CFG.num_key_value_heads
    for rank in range(world):
        shard = Shard(CFG, world, rank, expert_parallel=ep)
        model = Mixtral(CFG, shard=shard)
        _CountingOpen.read = 0
        assert parallel.load_shard(ckpts[layout], CFG, dict(model.named_parameters()), shard, progress=False) == layout
        kept = sum(p.numel() for p in model.parameters())
        assert _CountingOpen.read == kept, "read elements that the rank does not keep"
        for n, p in model.named_parameters():
            ref = full[n]
            if n.endswith("wqkv"):
                q, k, v = ref.split([Hq * D, Hkv * D, Hkv * D])
                ql, kl = Hq // world * D, Hkv // world * D
                ref = torch.cat([q[rank * ql:(rank + 1) * ql], k[rank * kl:(rank + 1) * kl],
                                 v[rank * kl:(rank + 1) * kl]])
            elif n.endswith("wo"):
                ref = ref[:, rank * Hq // world * D:(rank + 1) * Hq // world * D]
            elif n.endswith("moe.w13") or n.endswith("moe.w2"):
                if ep:
                    ref = ref[rank * 8 // world:(rank + 1) * 8 // world]
                else:
                    i = 40 // world
                    ref = ref[:, 2 * rank * i:2 * (rank + 1) * i] if n.endswith("w13") else \
                        ref[:, :, rank * i:(rank + 1) * i]
            assert torch.equal(p, ref), f"rank {rank} of {world}: {n}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["random", "one_expert", "one_token"])
def test_local_routes_sum_to_the_whole_moe(world, case):
    """Expert parallelism's MoE in one process: the sum over ranks of moe_experts on each rank's experts with its
    local_route equals moe_experts on all experts; every rank's unused rows are harmless (including a rank with no
    slot at all)."""
    g = torch.Generator().manual_seed(world)
    E, H, I, T = 8, 16, 24, {"random": 37, "one_expert": 9, "one_token": 1}[case]
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    if case == "one_expert":  # every token's top-2 are experts 6 and 7: only the last rank has work
        logits[:, 6:] += 100
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 4
    route = moe_route(logits, 2)
    whole = moe_experts(x, route, w13, w2)
    cfg = MixtralConfig(vocab_size=16, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=4, num_local_experts=E, num_experts_per_tok=2)
    total = torch.zeros_like(whole)
    for rank in range(world):
        s = Shard(cfg, world, rank, expert_parallel=True)
        local = s.local_route(route)
        # The CUDA kernels leave rows outside every expert unwritten (garbage): the combine must never read one.
        assert int(local.expert_offsets[-1]) <= T * 2 and (local.token_rows < local.expert_offsets[-1]).all()
        part = moe_experts(x, local, w13[s.first_expert:s.first_expert + s.experts],
                           w2[s.first_expert:s.first_expert + s.experts])
        assert torch.isfinite(part).all()
        total += part
    assert rel_err(total, whole) < 1e-6


def test_rank_count_errors_name_the_valid_counts():
    big = MixtralConfig.from_name("mixtral-8x7b")
    with pytest.raises(ValueError, match=r"tensor parallel over 3 ranks: 3 does not divide num_key_value_heads=8 .*"
                                         r"valid rank counts: 1, 2, 4, 8"):
        Shard(big, 3, 0)
    with pytest.raises(ValueError, match=r"tensor parallel over 4 ranks: 4 does not divide intermediate_size=42 .*"
                                         r"valid rank counts: 1, 2$"):
        Shard(MixtralConfig(**{**_fields(CFG), "intermediate_size": 42}), 4, 0)
    with pytest.raises(ValueError, match=r"expert parallel over 4 ranks: 4 does not divide num_local_experts=6 .*"
                                         r"valid rank counts: 1, 2$"):
        Shard(MixtralConfig(**{**_fields(CFG), "num_local_experts": 6}), 4, 0, expert_parallel=True)


def _fields(cfg):
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_fit_check_per_rank():
    big, gib = MixtralConfig.from_name("mixtral-8x7b"), 2 ** 30
    with pytest.raises(ModelTooLargeError, match=r"it needs 2 GPUs of 80 GiB in bfloat16 \(torchrun "
                                                 r"--nproc-per-node 2"):
        check_fits(big, torch.bfloat16, "cuda:0", free_bytes=78 * gib, total_bytes=79.6 * gib)
    two = Shard(big, 2, 1)
    per_rank = parallel.shard_param_bytes(big, torch.bfloat16, two)
    # Half of everything but the replicated embeddings, lm_head, norms and routers.
    assert per_rank / 1e9 == pytest.approx((93.4 - 2 * 0.262) / 2 + 2 * 0.262, rel=0.01)
    parallel.check_fits(big, torch.bfloat16, "cuda:1", two, free_bytes=78 * gib, total_bytes=79.6 * gib)
    with pytest.raises(ModelTooLargeError, match=r"rank 1 of 2 \(tensor parallel\): its shard of Mixtral \(32 layers, "
                                                 r"bfloat16\) needs 43\.\d GiB plus 1\.0 GiB headroom, but cuda:1 has "
                                                 r"30\.0 GiB free; it needs 4 GPUs of 40 GiB in bfloat16"):
        parallel.check_fits(big, torch.bfloat16, "cuda:1", two, free_bytes=30 * gib, total_bytes=40 * gib)


# ---- the CLI under torchrun ----------------------------------------------------------------------------------------
ENV = {**os.environ, "MIXTRAL_EXT_DEBUG": "", "PYTHONIOENCODING": "utf-8", "MIXTRAL_EXT_DIST_TIMEOUT": "60",
       "OMP_NUM_THREADS": "1"}


def _cli(args, world=None, stdin=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                if world else [sys.executable])
    return subprocess.run(launcher + ["-m", "mixtral_ext", *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", timeout=TIMEOUT, env=ENV)


@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory):
    """The demo's model with 4 KV heads (so 2 and 4 ranks split it) and the real vocabulary and tokenizer."""
    path = tmp_path_factory.mktemp("cli")
    build_tiny_checkpoint(path, tiny_config(num_key_value_heads=4), seed=5)
    return str(path)


@pytest.mark.parametrize("world,command", [(2, "generate"), (4, "chat")])
def test_cli_under_torchrun_prints_what_one_process_prints(world, command, cli_ckpt):
    if command == "generate":
        # the prompt from stdin: rank 0 reads it and hands it to the others
        args, stdin = ["generate", "--model", cli_ckpt, "--prompt", "-", "--device", "cpu"], "Mixture of experts\n"
    else:  # expert parallel; rank 0 reads the turns and hands them to the others
        args, stdin = ["chat", "--model", cli_ckpt, "--device", "cpu", "--expert-parallel"], "Hi there\nAnd now?\n"
    args += ["--max-new-tokens", "12"]
    one, many = _cli(args, stdin=stdin), _cli(args, world=world, stdin=stdin)
    assert one.returncode == 0 and many.returncode == 0, many.stderr
    assert one.stdout.strip() and many.stdout == one.stdout
    stats = [line for line in many.stderr.splitlines() if " tok/s " in line]
    assert len(stats) == (1 if command == "generate" else 2), many.stderr  # rank 0's statistics only


def test_cli_bench_model(cli_ckpt, capsys):
    from mixtral_ext import cli
    assert cli.main(["bench", "--model", cli_ckpt, "--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "4"]
                    ) == 0
    out = capsys.readouterr().out
    assert "(float32, PyTorch CPU path (mixtral_ext/cpu.py), 1 process): prefill 8 tokens in " in out and " ms/token (" in out


def test_cli_under_torchrun_bad_rank_count_is_an_error_on_every_rank(cli_ckpt):
    """Every rank says why it stops (the API raises on every rank too: the missing-shard and six-experts cases)."""
    res = _cli(["generate", "--model", cli_ckpt, "--prompt", "x", "--device", "cpu"], world=3)
    assert res.returncode != 0 and res.stdout == ""
    for rank in range(3):
        line = f"mixtral-ext: error (rank {rank} of 3): tensor parallel over 3 ranks: 3 does not divide " \
               f"num_key_value_heads=4"
        assert line in res.stderr, res.stderr
    assert "valid rank counts: 1, 2, 4" in res.stderr and "mixtral_ext/" not in res.stderr  # no traceback of ours
