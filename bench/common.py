"""One timer, one device probe and one aten-call counter shared by every benchmark (and test_cpu_path.py).

time_fn: CUDA events around each call, after warm-up, median of many runs; the caller passes a list of argument
sets (rotating buffers, together larger than L2) so no run reads data the previous one left in cache.
probe_device: measured copy bandwidth (device-to-device copy of 1 GiB: read + write bytes / time) and bf16 matmul
rate (8192^3 GEMM) - the rooflines every figure is quoted against.
layer_aten_events: the aten calls a model makes inside its decoder layers during one step (torch.profiler), what
bench_cpu.py reports and tests/test_cpu_path.py bounds.
"""
import json
import platform
import statistics
import subprocess
import time

import torch

L2_FLUSH_BYTES = 256 << 20


def rotating(make, total_bytes_per_set, min_sets=2, budget_bytes=L2_FLUSH_BYTES):
    """Build enough independent argument sets that cycling through them defeats the L2 cache."""
    n = max(min_sets, -(-budget_bytes // max(1, total_bytes_per_set)))
    return [make() for _ in range(min(n, 64))]


def routed_inputs(T, H, E, top_k, generator, n_sets=4):
    """n_sets (x [T, H] bf16, route) pairs for the MoE benchmarks, routed by moe_route from random logits [T, E] (what
    Mixtral's router gives with uniform experts), and the mean number of active experts per set."""
    from mixtral_ext import ops

    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, H, device="cuda", generator=generator).bfloat16()
        route = ops.moe_route(torch.randn(T, E, device="cuda", generator=generator), top_k)
        sets.append((x, route))
    active = sum(int((route.expert_counts > 0).sum()) for _, route in sets) / n_sets
    return sets, active


def time_fn(fn, arg_sets, warmup=5, iters=50):
    """Median milliseconds of fn(*args), rotating over arg_sets, timed with CUDA events one call at a time."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = arg_sets[i % len(arg_sets)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fn, args, warmup=3, iters=50):
    """Median ms of fn(*args) captured in a CUDA graph and replayed (launch gaps excluded, as in the decode loop)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    return time_fn(lambda: g.replay(), [()], warmup=warmup, iters=iters)


def probe_device(seconds=10.0):
    """Copy GB/s and bf16 matmul TFLOP/s of the current GPU, measured for about `seconds` in total."""
    props = torch.cuda.get_device_properties(0)
    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    deadline = time.time() + seconds / 2
    best_copy = float("inf")
    while time.time() < deadline:
        best_copy = min(best_copy, time_fn(lambda: dst.copy_(src), [()], warmup=2, iters=10))
    copy_gbs = 2 * src.numel() * 2 / (best_copy * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    deadline = time.time() + seconds / 2
    best_mm = float("inf")
    while time.time() < deadline:
        best_mm = min(best_mm, time_fn(lambda: a @ b, [()], warmup=2, iters=10))
    tflops = 2 * m ** 3 / (best_mm * 1e-3) / 1e12
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2 ** 30, 1),
        "sm_count": props.multi_processor_count,
        "copy_gbs": round(copy_gbs, 1),
        "bf16_matmul_tflops": round(tflops, 1),
    }


def environment():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit or "unknown", "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def print_table(title, rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        print("| " + " | ".join(cells) + " |")


def dump_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def layer_aten_events(layers, step):
    """The aten:: profiler events that start inside a forward of one of `layers` (modules) while step() runs: (all
    of them, those Python issued itself: not called from inside another aten op). The layers are marked by forward
    hooks that open a record_function; RuntimeError if the profile does not hold one such span per layer (a layer
    that did not run, or ran twice)."""
    marks = []

    def pre(module, args):
        marks.append(torch.autograd.profiler.record_function("decoder_layer"))
        marks[-1].__enter__()

    def post(module, args, out):
        marks.pop().__exit__(None, None, None)

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for h in hooks:
            h.remove()
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == "decoder_layer"]
    if len(spans) != len(layers):
        raise RuntimeError(f"{len(spans)} decoder_layer spans profiled for {len(layers)} layers")
    inside = [e for e in events if e.name.startswith("aten::")
              and any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans)]
    issued = [e for e in inside if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return inside, issued
