"""Planted-bug check for the two sm_90a kernels (issue 18): does the emulator catch one-line protocol bugs?

Copies the working tree's sources to a scratch directory, builds the emulation library there once, then for each
planted bug applies a one-line edit to a kernel file (or arch/sm90.cuh), rebuilds (one translation unit and the
link), and runs the emulated sm_90a tests (tests/test_emu_sm90.py, the kernel's subset) against that library. A bug
is caught when those tests fail; the unmodified tree must pass them first. Prints one line per bug and the count.

    python bench/planted_bugs_sm90.py [--keep DIR] [--only NAME ...]

Needs a C++ compiler, CMake, Ninja and torch (the emulation build's requirements); about a minute per bug on 2 cores.
"""
import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTN = "csrc/kernels/attention_prefill_sm90.cu"
MOE = "csrc/kernels/moe_experts_sm90.cu"
SM90 = "csrc/kernels/arch/sm90.cuh"
K_ATTN = "attention_prefill"
K_MOE = "moe"

# (name, file, exact text, replacement, pytest -k expression of the tests that should catch it); a list of (text,
# replacement) pairs with None instead of the replacement for a bug that moves a line.
BUGS = [
    ("attn: missing fence.proxy.async before publishing a tile", ATTN,
     "        fence_proxy_async();\n        mbar_arrive(full_bar", "        mbar_arrive(full_bar", K_ATTN),
    ("attn: accumulators read before wgmma.wait_group (wait<1>)", ATTN,
     "      wgmma_wait<0>();\n      keep_regs(s);", "      wgmma_wait<1>();\n      keep_regs(s);", K_ATTN),
    ("attn: V stage released before the wait that retires its P V (the release moved up one line)", ATTN,
     [("      if (it > 0) mbar_arrive(empty_bar + 8 * ((it - 1) % kStages));  // done reading the previous stage's V\n",
       ""),
      ("      wgmma_wait<0>();\n      keep_regs(s);",
       "      if (it > 0) mbar_arrive(empty_bar + 8 * ((it - 1) % kStages));\n      wgmma_wait<0>();\n      keep_regs(s);")],
     None, K_ATTN),
    ("attn: full barrier count off by one (127)", ATTN,
     "mbar_init(full_bar + 8 * s, 128);", "mbar_init(full_bar + 8 * s, 127);", K_ATTN),
    ("attn: empty barrier count off by one (257)", ATTN,
     "mbar_init(empty_bar + 8 * s, 256);", "mbar_init(empty_bar + 8 * s, 257);", K_ATTN),
    ("attn: consumer waits on the wrong parity", ATTN,
     "mbar_wait(full_bar + 8 * st, (it / kStages) & 1);", "mbar_wait(full_bar + 8 * st, ((it / kStages) & 1) ^ 1);",
     K_ATTN),
    ("attn: producer's empty wait on the wrong parity", ATTN,
     "mbar_wait_watchdog(empty_bar + 8 * s, ((it / kStages) - 1) & 1);",
     "mbar_wait_watchdog(empty_bar + 8 * s, (it / kStages) & 1);", K_ATTN),
    ("attn: register guard removed", ATTN,
     "return regs_ok<__nv_bfloat16>() ? launch_sm90<__nv_bfloat16>(p, stream) :",
     "return true ? launch_sm90<__nv_bfloat16>(p, stream) :", "register_guard"),
    ("attn: ping-pong hand-over dropped", ATTN,
     "      if (!(cw == 1 && it == bg.n_tiles - 1)) bar_arrive<256>(their_turn);", "", K_ATTN),
    ("moe: accumulators read before the final wgmma.wait_group", MOE,
     "      wgmma_wait<0>();\n      keep_regs(d);", "      keep_regs(d);", K_MOE),
    ("moe: ring slot released one group early (wait<2>)", MOE,
     "        wgmma_wait<1>();", "        wgmma_wait<2>();", K_MOE),
    ("moe: short expect_tx", MOE,
     "mbar_arrive_expect_tx(fb, kStageBytes);", "mbar_arrive_expect_tx(fb, kStageBytes - 1024);", K_MOE),
    ("moe: consumer waits on the wrong parity", MOE,
     "mbar_wait_watchdog(smem_u32(&full_bar[stage]), phase);",
     "mbar_wait_watchdog(smem_u32(&full_bar[stage]), phase ^ 1);", K_MOE),
    ("moe: empty barrier count off by one (7)", MOE,
     "mbar_init(smem_u32(&empty_bar[s]), 8);", "mbar_init(smem_u32(&empty_bar[s]), 7);", K_MOE),
    ("moe: register guard removed", MOE,
     "  return 128 * (attr.numRegs - kProducerRegs) >= 256 * (kConsumerRegs - attr.numRegs);\n}\n\ntemplate <typename T, bool SWIGLU>",
     "  return true;\n}\n\ntemplate <typename T, bool SWIGLU>", "register_guard"),
    ("sm90.cuh: K-major descriptor stride (SBO 512)", SM90,
     "(uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32)", "(uint64_t{1} << 16) | (uint64_t{512 >> 4} << 32)",
     f"{K_ATTN} or {K_MOE}"),
    ("sm90.cuh: K-major descriptor swizzle 64B", SM90,
     "(uint64_t{1024 >> 4} << 32) |\n         (uint64_t{1} << 62);", "(uint64_t{1024 >> 4} << 32) |\n         (uint64_t{2} << 62);",
     f"{K_ATTN} or {K_MOE}"),
    ("sm90.cuh: N-major descriptor stride (SBO 2048)", SM90,
     "         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);",
     "         (uint64_t{2048 >> 4} << 32) | (uint64_t{1} << 62);", K_ATTN),
]


def run(cmd, cwd, log, env=None, timeout=1800):
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="scratch directory to use and keep (default: a temporary one, removed)")
    ap.add_argument("--only", nargs="*", help="run only the bugs whose name contains one of these")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="planted_sm90_")
    tree = os.path.join(work, "tree")
    log = os.path.join(work, "log.txt")
    py = sys.executable
    if os.path.exists(tree):
        shutil.rmtree(tree)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        if not os.path.isfile(os.path.join(ROOT, rel)):
            continue
        os.makedirs(os.path.dirname(os.path.join(tree, rel)) or tree, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(tree, rel))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    build = os.path.join(work, "build")
    cfg = ["cmake", "-S", tree, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={py}",
           "-DMIXTRAL_EXT_WITH_CUDA=OFF", "-DMIXTRAL_EXT_WITH_EMU=ON",
           f"-DMIXTRAL_EXT_EMU_OUTPUT={os.path.join(tree, 'mixtral_ext', '_emu' + suffix)}"]
    jobs = os.environ.get("MAX_JOBS", "2")

    def build_and_test(k):
        if run(["cmake", "--build", build, "-j", jobs], tree, log) != 0:
            return "build failed"
        env = dict(os.environ, PYTHONPATH=tree, MIXTRAL_EXT_REQUIRE_BUILD="1")
        rc = run([py, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_emu_sm90.py", "-k", k], tree,
                 log, env=env)
        return "pass" if rc == 0 else "fail"

    t0 = time.time()
    if run(cfg, tree, log) != 0:
        sys.exit(f"configure failed: see {log}")
    base = build_and_test(" or ".join(sorted({b[4] for b in BUGS})))
    print(f"unmodified tree: {base} ({time.time() - t0:.0f} s)", flush=True)
    if base != "pass":
        sys.exit(f"the unmodified tree must pass first: see {log}")
    caught = tried = 0
    for name, rel, old, new, k in BUGS:
        if args.only and not any(o in name for o in args.only):
            continue
        path = os.path.join(tree, rel)
        src = open(path).read()
        edits = old if new is None else [(old, new)]
        bad = [o for o, _ in edits if src.count(o) != 1]
        if bad:
            print(f"SKIPPED  {name}: the text to edit does not occur exactly once in {rel}: {bad[0]!r}", flush=True)
            continue
        t = time.time()
        planted = src
        for o, n in edits:
            planted = planted.replace(o, n)
        with open(path, "w") as f:
            f.write(planted)
        with open(log, "a") as f:
            f.write(f"\n==== {name}\n")
        verdict = build_and_test(k)
        with open(path, "w") as f:
            f.write(src)
        tried += 1
        caught += verdict == "fail"
        print(f"{'CAUGHT ' if verdict == 'fail' else 'MISSED ' if verdict == 'pass' else 'ERROR  '} {name} "
              f"({verdict}, {time.time() - t:.0f} s)", flush=True)
    print(f"{caught} of {tried} planted bugs caught ({time.time() - t0:.0f} s); log: {log}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if caught == tried else 1)


if __name__ == "__main__":
    main()
