"""Collect device_check.sh's logs into results.json and summary.md (in the results directory)."""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def test_counts(out):
    """passed/failed/skipped and failure names, from junit.xml, else from the -v log of a run that was cut short."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "complete": False}
    junit = os.path.join(out, "junit.xml")
    if os.path.exists(junit):
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                counts["failures"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
        counts["complete"] = True
        return counts
    log = os.path.join(out, "tests.log")
    if os.path.exists(log):
        for line in open(log, errors="replace"):
            m = re.match(r"(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
            if m:
                key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}[m.group(2)]
                counts[key] += 1
                if key == "failed":
                    counts["failures"].append(m.group(1))
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
             + ("" if t["complete"] else " (run cut short: counted from the log)"), ""]
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
