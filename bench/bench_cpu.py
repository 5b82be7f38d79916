"""The CPU path against transformers: `python bench/bench_cpu.py [--quick] [--layers N] [--json PATH]`.

Both models load the same safetensors files (a random-weight Mixtral written by transformers' save_pretrained:
hidden 1024, expert FFN 3584, 8 query / 2 KV heads of 128, 8 experts top-2, vocab 32000, 4 layers by default) in
float32 and in bf16, on one thread (torch.set_num_threads(1)). transformers runs with its defaults (SDPA attention,
its default experts implementation, DynamicCache).
  prefill  one prompt of 128, 1024, 4096 tokens: Mixtral.prefill into a static cache against transformers' forward
           with use_cache=True and logits_to_keep=1 (both return the last token's logits).
  decode   batch 1 and 8 after a 128-token prompt: the mean time of DECODE_STEPS steps (greedy, the cache growing),
           mixtral_ext's decode_step against transformers' forward with its cache.
  ops      aten calls per decoder layer in one decode step at batch 1 (profiler events): those Python issued, and
           all of them (with the ones aten ops make inside).
Each figure is measured in rounds that alternate the two models in one process (who goes first alternates too); a
round's ratio is transformers' time / ours (> 1: ours is faster), the figure is the median ratio over the rounds.
Times are the process's CPU time by default (--clock cpu): on one thread it equals the wall time of an idle machine,
and unlike wall time it does not count the time other processes on a shared machine hold the core; --clock wall
times the wall clock instead.
--quick: 2 layers, prefill 128 and 1024, 3 rounds (a few minutes on a 2-core machine).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import mixtral_ext as mx  # noqa: E402
from mixtral_ext.model import KVCache  # noqa: E402

DECODE_STEPS = 16
DECODE_PROMPT = 128
CLOCK = time.process_time  # --clock: time.process_time or time.perf_counter


def write_checkpoint(path, layers, vocab=32000, hidden=1024, ffn=3584, seed=0):
    """A random transformers Mixtral saved to `path` (float32 safetensors)."""
    import transformers
    cfg = transformers.MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                     num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                     head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                                     max_position_embeddings=8192, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(path)


def load_both(path, dtype):
    import transformers
    hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ours = mx.Mixtral.from_pretrained(path, dtype=dtype, progress=False)
    return ours, hf


def _timed(fn):
    start = CLOCK()
    fn()
    return CLOCK() - start


def prefill_pair(ours, hf, n):
    """(ours_s, transformers_s) closures for one prompt of n tokens."""
    ids = torch.randint(0, ours.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    cache = KVCache(ours.config, 1, n, "cpu", ours.dtype)

    def run_ours():
        return _timed(lambda: ours.prefill([ids], cache))

    def run_hf():
        x = torch.tensor([ids])
        return _timed(lambda: hf(input_ids=x, use_cache=True, logits_to_keep=1))

    return run_ours, run_hf


def decode_pair(ours, hf, B):
    """(ours, transformers) closures: each prefills a fresh DECODE_PROMPT-token batch (untimed) and returns the mean
    seconds of a decode step over DECODE_STEPS greedy steps."""
    V = ours.config.vocab_size
    prompts = torch.randint(0, V, (B, DECODE_PROMPT), generator=torch.Generator().manual_seed(B))

    def run_ours():
        cache = KVCache(ours.config, B, DECODE_PROMPT + DECODE_STEPS, "cpu", ours.dtype)
        nxt = ours.prefill(prompts.tolist(), cache).argmax(-1)
        positions = torch.full((B,), DECODE_PROMPT, dtype=torch.int32)
        seq_ids = torch.arange(B, dtype=torch.int32)
        start = CLOCK()
        for _ in range(DECODE_STEPS):
            nxt = ours.decode_step(nxt, positions, seq_ids, cache).argmax(-1)
            positions += 1
        return (CLOCK() - start) / DECODE_STEPS

    def run_hf():
        out = hf(input_ids=prompts, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = CLOCK()
        for _ in range(DECODE_STEPS):
            out = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (CLOCK() - start) / DECODE_STEPS

    return run_ours, run_hf


def alternate(run_ours, run_hf, rounds):
    """Median over rounds of transformers' time / ours, and each side's median seconds; one warm-up each."""
    run_ours(), run_hf()
    ours_t, hf_t, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            h = run_hf()
            o = run_ours()
        else:
            o = run_ours()
            h = run_hf()
        ours_t.append(o)
        hf_t.append(h)
        ratios.append(h / o)
    return statistics.median(ratios), statistics.median(ours_t), statistics.median(hf_t)


def layer_ops(layers, step):
    """aten:: calls per decoder layer during step(): (the calls Python issued, all calls including those aten ops
    make inside)."""
    inside, issued = common.layer_aten_events(layers, step)
    return len(issued) / len(layers), len(inside) / len(layers)


def ops_per_layer(ours, hf):
    """(ours, transformers) aten calls per decoder layer in one batch-1 decode step after a short prompt."""
    cache = KVCache(ours.config, 1, 16, "cpu", ours.dtype)
    nxt = ours.prefill([list(range(1, 9))], cache).argmax(-1)
    pos, seq = torch.tensor([8], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    mine = layer_ops(ours.layers, lambda: ours.decode_step(nxt, pos, seq, cache))
    out = hf(input_ids=torch.tensor([list(range(1, 9))]), use_cache=True)
    theirs = layer_ops(hf.model.layers, lambda: hf(input_ids=out.logits[:, -1:].argmax(-1),
                                                         past_key_values=out.past_key_values, use_cache=True))
    return mine, theirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, prefill 128 and 1024, 3 rounds")
    ap.add_argument("--layers", type=int, help="decoder layers (default 4, --quick 2)")
    ap.add_argument("--rounds", type=int, help="alternated rounds per figure (default 5, --quick 3)")
    ap.add_argument("--prefill", type=int, nargs="*", help="prompt lengths (default 128 1024 4096)")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="time the process's CPU time (default; robust on a shared machine) or the wall clock")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    layers = args.layers or (2 if args.quick else 4)
    rounds = args.rounds or (3 if args.quick else 5)
    prefill = args.prefill if args.prefill is not None else ([128, 1024] if args.quick else [128, 1024, 4096])
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    import transformers
    rows = []
    print(f"mixtral_ext CPU path vs transformers {transformers.__version__} (torch {torch.__version__}), one thread, "
          f"hidden 1024 / FFN 3584, {layers} layers; {args.clock} time; ratio = transformers time / ours (> 1: ours "
          f"faster), median of {rounds} alternated rounds", flush=True)
    print(f"{'dtype':9} {'what':18} {'ours ms':>10} {'hf ms':>10} {'ratio':>7}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as path, torch.inference_mode():
        write_checkpoint(path, layers)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            ours, hf = load_both(path, dtype)
            impl = (hf.config._attn_implementation, getattr(hf.config, "_experts_implementation", None))
            cases = [(f"prefill {n}", prefill_pair(ours, hf, n)) for n in prefill]
            cases += [(f"decode batch {B}", decode_pair(ours, hf, B)) for B in (1, 8)]
            for what, (run_ours, run_hf) in cases:
                ratio, o, h = alternate(run_ours, run_hf, rounds)
                rows.append(dict(dtype=dtype_name, what=what, ours_ms=o * 1e3, hf_ms=h * 1e3, ratio=ratio,
                                 hf_impl=impl))
                print(f"{dtype_name:9} {what:18} {o * 1e3:10.2f} {h * 1e3:10.2f} {ratio:7.2f}", flush=True)
            mine, theirs = ops_per_layer(ours, hf)
            rows.append(dict(dtype=dtype_name, what="aten calls / decode layer (issued, all)", ours=mine, hf=theirs))
            print(f"{dtype_name:9} {'aten calls/layer':18} {mine[0]:10.1f} {theirs[0]:10.1f}   (all, nested too: "
                  f"{mine[1]:.0f} vs {theirs[1]:.0f})", flush=True)
            del ours, hf
    print(f"transformers ran attention={impl[0]}, experts={impl[1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(layers=layers, rounds=rounds, threads=1, clock=args.clock, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
