"""Collect device_check.sh's logs into results.json and summary.md (in the results directory)."""
import argparse
import json
import os
import re
import sys


def test_counts(out):
    """passed/failed/skipped, failure names and files that timed out or never ran, from the -v log of every file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "timed_out": [], "not_run": []}
    log = os.path.join(out, "tests.log")
    if not os.path.exists(log):
        return counts
    for line in open(log, errors="replace"):
        m = re.match(r"(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
        if m:
            key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed",
                   "SKIPPED": "skipped", "XFAIL": "skipped"}[m.group(2)]
            counts[key] += 1
            if key == "failed":
                counts["failures"].append(m.group(1))
        elif line.startswith("TIMED OUT"):
            counts["timed_out"].append(line.split(": ", 1)[-1].strip())
        elif line.startswith("NOT RUN"):
            counts["not_run"].append(line.split(": ", 1)[-1].strip())
    return counts


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--stamp", required=True)
    for k in ("build-rc", "tests-rc", "bench-rc", "e2e-rc", "seconds"):
        ap.add_argument(f"--{k}", type=int, default=-1)
    a = ap.parse_args()
    kernels = load(os.path.join(a.out, "bench_kernels.json")) or {}
    e2e = load(os.path.join(a.out, "bench_e2e.json")) or {}
    try:
        import torch
        torch_v, cuda_v = torch.__version__, torch.version.cuda
    except ImportError:
        torch_v = cuda_v = None
    results = {
        "date": a.stamp,
        "commit": os.environ.get("MIXTRAL_EXT_COMMIT", "unknown"),
        "device": kernels.get("device") or e2e.get("device"),
        "torch": torch_v,
        "cuda": cuda_v,
        "build_rc": a.build_rc,
        "tests": test_counts(a.out),
        "tests_rc": a.tests_rc,
        "benchmarks": {**kernels.get("benchmarks", {}), **({"e2e": e2e.get("benchmarks")} if e2e else {})},
        "bench_rc": {"kernels": a.bench_rc, "e2e": a.e2e_rc},
        "seconds": a.seconds,
    }
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    t = results["tests"]
    lines = [f"# device_check {a.stamp}", "",
             f"- commit: {results['commit']}", f"- device: {results['device']}",
             f"- torch {torch_v}, CUDA {cuda_v}", f"- build rc {a.build_rc}, total {a.seconds} s",
             f"- tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
             + (f"; timed out: {', '.join(t['timed_out'])}" if t["timed_out"] else "")
             + (f"; not run: {', '.join(t['not_run'])}" if t["not_run"] else ""), ""]
    if t["failures"]:
        lines += ["## Failures", ""] + [f"- {n}" for n in t["failures"]] + [""]
    for log in ("bench_kernels.log", "bench_e2e.log"):
        path = os.path.join(a.out, log)
        if os.path.exists(path):
            body = open(path, errors="replace").read()
            lines += [f"## {log}", "", body[body.find("##"):] if "##" in body else body, ""]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
