"""End-to-end benchmark: `python bench/bench_e2e.py [--quick] [--json PATH] [--plot PNG] [--layers N]`.

A random-weight Mixtral-8x7B (the real sizes) in bf16 on the GPU, run the way generate() runs it:
  decode   tok/s at batch 1, 8, 64 with 128 and 4096 tokens of context: a CUDA-graph-replayed step plus greedy
           sampling. The cache is filled with random keys/values (a step's cost does not depend on their values,
           and no 64 x 4096-token prefill is needed to time it). At batch 1 the same step without the graph too.
  prefill  tok/s for one prompt of 512, 4096 (and 16384) tokens: Mixtral.prefill (varlen kernels, lm_head on the
           last token only).
Depth: all 32 layers when the weights and the largest cache fit, else N layers; an N-layer figure is scaled to 32
layers by timing at N and N/2 layers and extrapolating linearly (per-layer cost from the difference, the rest -
embedding, final norm, lm_head, sampling - from the intercept). --quick uses 2 layers.
Roofline (per 32-layer model): decode = bytes a step must read (attention and router weights, the experts the batch
touches in expectation under uniform routing, lm_head, the KV cache) / measured copy bandwidth; prefill = FLOPs
(projections, the tokens' 2 experts, causal attention) / measured bf16 matmul rate (bench/common.probe_device).
vs transformers: MixtralForCausalLM (its default attention and MoE, DynamicCache) with the same weights at the
same reduced depth (2 layers in --quick, 4 otherwise): decode steps and the prefill forward, timed the same way.
Each measurement runs on its own: a failure (OOM, a kernel error) is listed under "errors" in the JSON and the rest
still run; the JSON is rewritten after every section and on SIGTERM; --quick starts no measurement after 55 s
(device_check.sh allows 75), listing what it left out under "skipped". Exit status 1 when anything failed.
"""
import argparse
import contextlib
import gc
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEVICE = "cuda"  # a CPU dry run of the script's logic sets "cpu"


def expected_experts(E, k, B):
    """Distinct experts a batch of B tokens touches per layer when each picks k of E uniformly."""
    return E * (1 - ((E - k) / E) ** B)


def decode_bytes(cfg, B, ctx, quantize=None):
    """Bytes a bf16 step reads; the experts at their stored size (quantized values + scales with --quantize)."""
    from mixtral_ext.quant import expert_bytes
    L = cfg.num_hidden_layers
    H, E, k = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    attn = (cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim) * H + E * H
    experts = expected_experts(E, k, B) * expert_bytes(cfg, quantize, 2) / E
    kv = B * (ctx + 1) * cfg.num_key_value_heads * cfg.head_dim * 2
    return L * (2 * attn + experts + 2 * kv) + 2 * cfg.vocab_size * H  # bf16


def prefill_flops(cfg, n):
    L = cfg.num_hidden_layers
    H, I, k, D, Hq = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok, cfg.head_dim, \
        cfg.num_attention_heads
    per_token = 2 * H * (cfg.qkv_size + Hq * D + cfg.num_local_experts) + k * 2 * 3 * I * H
    attention = 2 * Hq * D * n * (n + 1)  # QK^T and PV over the causal half
    return L * (n * per_token + attention) + 2 * H * cfg.vocab_size


@contextlib.contextmanager
def depth(model, n):
    """Run the first n layers only (the cache keeps room for all of them)."""
    layers = model.layers
    model.layers = torch.nn.ModuleList(list(layers)[:n])
    model.release_cache()
    try:
        yield
    finally:
        model.layers = layers
        model.release_cache()


def time_decode_ours(model, B, ctx, iters, graph=True):
    from mixtral_ext.generate import graphs_supported
    with torch.inference_mode():  # as in generate(), which creates and reuses these states in inference mode
        state = model.generation.decode_state(model, B, ctx + 2, use_graph=graph and graphs_supported(model))
        state.cache.k.normal_()
        state.cache.v.normal_()
        state.positions.fill_(ctx)
        state.tokens.random_(0, model.config.vocab_size)

        def step():  # what generate() does per token: replay, greedy choice, feed it back
            logits = state.step(model)
            state.tokens.copy_(logits.argmax(-1))

        ms = common.time_fn(step, [()], warmup=3, iters=iters)
    model.release_cache()
    return ms


def time_prefill_ours(model, n, iters):
    from mixtral_ext.model import KVCache
    cache = KVCache(model.config, 1, n, model.device, model.dtype)
    ids = torch.randint(0, model.config.vocab_size, (n,)).tolist()
    with torch.inference_mode():
        ms = common.time_fn(lambda: model.prefill([ids], cache), [()], warmup=1, iters=iters)
    del cache
    return ms


def scaled(measure, model, n_layers, full):
    """measure() at n_layers (and n_layers / 2), extrapolated to `full` layers. Returns (ms at full, ms at n_layers)."""
    with depth(model, n_layers):
        t_n = measure()
    if n_layers >= full:
        return t_n, t_n
    half = max(1, n_layers // 2)
    with depth(model, half):
        t_h = measure()
    per_layer = max(0.0, (t_n - t_h) / (n_layers - half))
    return t_n + (full - n_layers) * per_layer, t_n


def random_model(cfg, seed=0, quantize=None):
    from mixtral_ext import Mixtral
    model = Mixtral(cfg, device=DEVICE, dtype=torch.bfloat16, quantize=quantize)
    g = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm"):
                p.fill_(1.0)
            elif p.dtype in (torch.int8, torch.uint8):  # quantized experts: any codes (int8 kept in [-127, 127])
                p.random_(-127 if p.dtype == torch.int8 else 0, 128 if p.dtype == torch.int8 else 256, generator=g)
            elif name.endswith("_scale"):  # weights of about the bf16 model's spread (std 0.02)
                p.fill_(0.02 * 3 / (127 if quantize == "int8" else 7))
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def transformers_model(cfg, layers):
    """transformers' MixtralForCausalLM (bf16, random weights, on the GPU) with `layers` layers, or None."""
    try:
        import transformers
    except ImportError:
        return None
    d = cfg.to_dict()
    d.update(num_hidden_layers=layers, eos_token_id=None, bos_token_id=None)
    d.pop("architectures", None)
    hf_cfg = transformers.MixtralConfig(**{k: v for k, v in d.items() if k != "model_type"})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            return transformers.MixtralForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def _hf_cache(out):
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


def time_decode_hf(hf, B, ctx, iters):
    V = hf.config.vocab_size
    ids = torch.randint(0, V, (B, ctx), device=DEVICE)
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        box = {"cache": _hf_cache(out), "next": out.logits[:, -1:].argmax(-1)}

        def step():
            o = hf(input_ids=box["next"], past_key_values=box["cache"], use_cache=True)
            box["cache"], box["next"] = _hf_cache(o), o.logits[:, -1:].argmax(-1)

        ms = common.time_fn(step, [()], warmup=2, iters=iters)
    del box, out
    return ms


def time_prefill_hf(hf, n, iters):
    ids = torch.randint(0, hf.config.vocab_size, (1, n), device=DEVICE)
    with torch.no_grad():
        return common.time_fn(lambda: hf(input_ids=ids, use_cache=False, logits_to_keep=1), [()], warmup=1,
                              iters=iters)


def free():
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, fewer sizes: ~1 minute on an H100")
    ap.add_argument("--json", help="write the rows, the device probe and the depth used here")
    ap.add_argument("--plot", help="write a PNG of decode tok/s against batch size with the roofline (matplotlib)")
    ap.add_argument("--layers", type=int, help="layers to build (default: 32 if they fit, else as many as fit)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--probe-seconds", type=float, default=None)
    ap.add_argument("--model", default="mixtral-8x7b", help="a MixtralConfig preset (\"tiny\" for a smoke run)")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None, help="quantized expert weights")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="start no new measurement after this many seconds (default: 55 with --quick, which runs "
                         "under a 75 s limit in device_check.sh; else none); skipped ones are listed in the JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_e2e: no CUDA GPU here; this benchmark times the model on a GPU", file=sys.stderr)
        return 2
    import mixtral_ext
    from mixtral_ext import MixtralConfig
    from mixtral_ext.weights import load_transformers_state, param_bytes

    t_start = time.time()
    budget = args.budget_seconds if args.budget_seconds is not None else (55.0 if args.quick else None)
    decode_rows, prefill_rows, cmp_rows, errors, skipped = [], [], [], [], []
    results = {"extension": mixtral_ext.EXTENSION_STATUS, "errors": errors, "skipped": skipped,
               "quantize": args.quantize,
               "benchmarks": {"decode": decode_rows, "prefill": prefill_rows, "vs_transformers": cmp_rows}}

    def save():  # after every section, so a crash or the caller's time limit still leaves what was measured
        results["seconds"] = round(time.time() - t_start, 1)
        if args.json:
            common.dump_json(args.json, results)

    def attempt(what, fn, need=0.0):
        """fn() or None: a failed measurement (OOM, a kernel error) is recorded and the others still run. Not
        started (recorded as skipped) when fewer than `need` seconds of the budget are left."""
        if budget is not None and time.time() - t_start > budget - need:
            skipped.append(what)
            return None
        try:
            return fn()
        except Exception as exc:
            errors.append(f"{what}: {type(exc).__name__}: {str(exc).strip()[:500]}")
            print(f"bench_e2e: {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            free()
            return None

    def on_term(signum, frame):  # `timeout` in device_check.sh: keep what was measured
        errors.append(f"bench_e2e: killed by signal {signum} after {time.time() - t_start:.0f} s")
        save()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"mixtral_ext extension: {mixtral_ext.EXTENSION_STATUS}")
        device = common.probe_device(args.probe_seconds or (4.0 if args.quick else 10.0))
        results["device"] = device
        try:
            env = common.environment()
        except Exception as exc:  # no git on the device: the commit comes from device_check.sh
            env = {"commit": "unknown", "torch": torch.__version__, "environment_error": str(exc)}
        if env.get("commit", "unknown") == "unknown":
            env["commit"] = os.environ.get("MIXTRAL_EXT_COMMIT", "unknown")
        results.update(env)
        print(f"device: {device}\nenv: {env}")
        save()
        _run(args, results, attempt, save, device, decode_rows, prefill_rows, cmp_rows, t_start,
             MixtralConfig, load_transformers_state, param_bytes)
    except Exception as exc:  # outside any one measurement (the probe, building the model): still write the JSON
        errors.append(f"bench_e2e: {type(exc).__name__}: {str(exc).strip()[:500]}")
        print(f"bench_e2e: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        save()
        return 1
    save()
    if skipped:
        print(f"bench_e2e: time budget ({budget:.0f} s) spent, skipped: {', '.join(skipped)}", file=sys.stderr)
    if args.plot and decode_rows:
        plot(args.plot, decode_rows, results["device"])
    return 1 if errors else 0


def _run(args, results, attempt, save, device, decode_rows, prefill_rows, cmp_rows, t_start, MixtralConfig,
         load_transformers_state, param_bytes):
    cfg = MixtralConfig.from_name(args.model)
    full = cfg.num_hidden_layers
    batches = [1, 8, 64]
    # Within the preset's context (the "tiny" smoke preset has 4096 positions; Mixtral-8x7B 32768).
    contexts = [c for c in (128, 4096) if c + 2 <= cfg.max_position_embeddings]
    prompts = [n for n in ([512, 4096] if args.quick else [512, 4096, 16384]) if n <= cfg.max_position_embeddings]
    iters = 10 if args.quick else 30

    # Depth: the weights + the largest cache (batch 64 at 4096 tokens) + activations must fit; the transformers
    # comparison comes afterwards, with this model freed, so an H200 runs all 32 layers.
    cmp_layers = min(full, 2 if args.quick else 4)
    free_bytes, _ = torch.cuda.mem_get_info()
    layer_bytes = (param_bytes(cfg, torch.bfloat16, args.quantize) - 2 * 2 * cfg.vocab_size * cfg.hidden_size) / full
    cache_per_layer = 2 * 2 * max(batches) * (max(contexts) + 256) * cfg.num_key_value_heads * cfg.head_dim
    fit = int((free_bytes - 6 * 2 ** 30 - 4 * cfg.vocab_size * cfg.hidden_size) // (layer_bytes + cache_per_layer))
    layers = min(full, args.layers or (2 if args.quick else max(2, min(full, fit))))
    note = (f"all {full} layers" if layers >= full else
            f"{layers} layers built, timed at {layers} and {max(1, layers // 2)}, extrapolated to {full}")
    print(f"depth: {note} (fits: {fit}); transformers comparison at {cmp_layers} layers")
    results["depth"] = {"layers_built": layers, "note": note, "compare_layers": cmp_layers}
    model = random_model(dict_replace(cfg, num_hidden_layers=layers), quantize=args.quantize)

    for ctx in contexts:
        for B in batches:
            what = f"decode B={B} ctx={ctx}"
            got = attempt(what, lambda: scaled(lambda: time_decode_ours(model, B, ctx, iters), model, layers, full))
            if got is None:
                continue
            ms32 = got[0]
            step_bytes = decode_bytes(cfg, B, ctx, args.quantize)
            roof_ms = step_bytes / (device["copy_gbs"] * 1e9) * 1e3
            row = {"batch": B, "context": ctx, "ms_per_step": ms32, "tok_s": B / ms32 * 1e3,
                   "roofline_tok_s": B / roof_ms * 1e3, "pct_roofline": 100 * roof_ms / ms32,
                   "GB_per_step": step_bytes / 1e9}
            if B == 1:  # what the CUDA graph saves: the same step launched op by op
                eager = attempt(f"{what} without graph",
                                lambda: scaled(lambda: time_decode_ours(model, B, ctx, iters, graph=False),
                                               model, layers, full))
                row["eager_ms_per_step"] = eager[0] if eager else None
            decode_rows.append(row)
            print(f"{what}: {ms32:.2f} ms/step ({time.time() - t_start:.0f} s)", flush=True)
    save()
    for n in prompts:
        got = attempt(f"prefill n={n}",
                      lambda: scaled(lambda: time_prefill_ours(model, n, max(2, iters // 5)), model, layers, full))
        if got is None:
            continue
        ms32 = got[0]
        flops = prefill_flops(cfg, n)
        prefill_rows.append({"tokens": n, "ms": ms32, "tok_s": n / ms32 * 1e3, "TFLOP_s": flops / ms32 / 1e9,
                             "pct_matmul": 100 * flops / ms32 / 1e9 / device["bf16_matmul_tflops"]})
        print(f"prefill n={n}: {ms32:.1f} ms ({time.time() - t_start:.0f} s)", flush=True)
    save()

    del model
    free()
    hf = None
    if not args.no_transformers:
        hf = attempt("transformers model", lambda: transformers_model(cfg, cmp_layers), need=15.0)
    model = None
    if hf is not None:
        def ours_like_hf():
            m = random_model(dict_replace(cfg, num_hidden_layers=cmp_layers), quantize=args.quantize)
            load_transformers_state(hf.state_dict(), m.config, dict(m.named_parameters()))
            return m
        model = attempt("our model with transformers' weights", ours_like_hf)
    if model is not None:
        cmp_contexts = [128] if args.quick else [128, 4096]
        for ctx in cmp_contexts:
            for B in batches:
                if B * ctx > 64 * 1024:  # transformers would need a B x ctx prefill with its eager MoE first
                    continue
                ours_ms = attempt(f"vs transformers: ours decode B={B} ctx={ctx}",
                                  lambda: time_decode_ours(model, B, ctx, iters))
                hf_ms = attempt(f"vs transformers: transformers decode B={B} ctx={ctx}",
                                lambda: time_decode_hf(hf, B, ctx, max(5, iters // 2)))
                free()
                if ours_ms is not None and hf_ms is not None:
                    cmp_rows.append({"what": "decode", "batch": B, "context": ctx, "ours_ms": ours_ms,
                                     "hf_ms": hf_ms, "ours_tok_s": B / ours_ms * 1e3, "hf_tok_s": B / hf_ms * 1e3,
                                     "speedup": hf_ms / ours_ms})
            save()
        for n in prompts[:2]:
            ours_ms = attempt(f"vs transformers: ours prefill n={n}", lambda: time_prefill_ours(model, n, 3))
            hf_ms = attempt(f"vs transformers: transformers prefill n={n}", lambda: time_prefill_hf(hf, n, 3))
            free()
            if ours_ms is not None and hf_ms is not None:
                cmp_rows.append({"what": "prefill", "batch": 1, "context": n, "ours_ms": ours_ms, "hf_ms": hf_ms,
                                 "ours_tok_s": n / ours_ms * 1e3, "hf_tok_s": n / hf_ms * 1e3,
                                 "speedup": hf_ms / ours_ms})
        save()
        print(f"transformers comparison done ({time.time() - t_start:.0f} s)", flush=True)
    del model, hf
    free()

    fmt = f"bf16, {args.quantize} experts" if args.quantize else "bf16"
    common.print_table(f"Decode, {fmt}, {args.model} ({note}); roofline: bytes per step / {device['copy_gbs']} GB/s",
                       decode_rows,
                       [("batch", "batch", None), ("context", "context", None), ("ms_per_step", "ms/step", "{:.2f}"),
                        ("tok_s", "tok/s", "{:.1f}"), ("roofline_tok_s", "roofline tok/s", "{:.1f}"),
                        ("pct_roofline", "% roofline", "{:.0f}"), ("GB_per_step", "GB/step", "{:.1f}"),
                        ("eager_ms_per_step", "ms/step without graph", "{:.2f}")])
    common.print_table(f"Prefill, {fmt}, one prompt ({note}); roofline: {device['bf16_matmul_tflops']} TFLOP/s",
                       prefill_rows,
                       [("tokens", "tokens", None), ("ms", "ms", "{:.1f}"), ("tok_s", "tok/s", "{:.0f}"),
                        ("TFLOP_s", "TFLOP/s", "{:.0f}"), ("pct_matmul", "% matmul rate", "{:.0f}")])
    if cmp_rows:
        common.print_table(f"vs transformers {_hf_version()} (same weights, {cmp_layers} layers, its default "
                           f"attention and MoE)", cmp_rows,
                           [("what", "", None), ("batch", "batch", None), ("context", "context/prompt", None),
                            ("ours_tok_s", "ours tok/s", "{:.1f}"), ("hf_tok_s", "transformers tok/s", "{:.1f}"),
                            ("speedup", "speedup", "{:.1f}x")])
    for e in results["errors"]:
        print(f"ERROR {e}")
    print(f"\nbench_e2e: {time.time() - t_start:.0f} s")


def dict_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def _hf_version():
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "?"


def plot(path, rows, device):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_e2e: matplotlib missing, no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for ctx in sorted({r["context"] for r in rows}):
        sel = [r for r in rows if r["context"] == ctx]
        ax.plot([r["batch"] for r in sel], [r["tok_s"] for r in sel], "o-", label=f"mixtral_ext, context {ctx}")
        ax.plot([r["batch"] for r in sel], [r["roofline_tok_s"] for r in sel], "--", label=f"roofline, context {ctx}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Mixtral-8x7B bf16 decode, {device['name']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
