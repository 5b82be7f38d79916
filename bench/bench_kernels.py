"""Kernel microbenchmarks: `python bench/bench_kernels.py [OP ...] [--quick] [--json PATH]`.

Each op's benchmark lives in bench/kbench/<op>.py (or <op>_<regime>.py) and exposes
`run(device_info, quick) -> (title, rows, columns)`; rows are dicts, columns (key, header, format) for the printed
table. Every row states its roofline: bytes over the measured copy bandwidth or FLOPs over the measured bf16 matmul
rate (from common.probe_device).
"""
import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# moe_experts_quant last: device_check.sh gives the whole --quick run one time limit, and it is the newest.
BENCHES = ["rms_norm", "rope_kv_append", "moe_route", "moe_experts_decode", "moe_experts_prefill", "attention_decode",
           "attention_prefill", "moe_experts_quant"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("ops", nargs="*", default=BENCHES, help=f"which ({', '.join(BENCHES)}); default all")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, for bench/device_check.sh")
    ap.add_argument("--json", help="write the rows and the device probe here")
    ap.add_argument("--probe-seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; the benchmarks time CUDA kernels and need one", file=sys.stderr)
        return 2
    import mixtral_ext

    print(f"mixtral_ext extension: {mixtral_ext.EXTENSION_STATUS}")
    device = common.probe_device(args.probe_seconds)
    env = common.environment()
    print(f"device: {device}\nenv: {env}")
    results = {"device": device, **env, "benchmarks": {}}
    for name in args.ops:
        if name not in BENCHES:
            ap.error(f"unknown benchmark {name!r}; choose from {BENCHES}")
        try:
            title, rows, columns = importlib.import_module(f"kbench.{name}").run(device, args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"\n## {name}: FAILED: {type(exc).__name__}: {exc}")
            results["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        common.print_table(title, rows, columns)
        results["benchmarks"][name] = rows
    if args.json:
        common.dump_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
