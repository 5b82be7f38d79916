"""Planted-bug check: does the emulated test path catch the one-line kernel bugs that matter?

For each mutant below, the script copies csrc/ to a scratch directory, applies the one-line change (the `old` text
must occur exactly once, so a mutant that no longer matches the kernels is reported as STALE, never silently
skipped), recompiles only the translation unit that includes the file with the build's own compile command, relinks
a throwaway emulation library from the build's other object files, and runs `mixtral-ext doctor --emu` for the
op against it (MIXTRAL_EXT_EMU_LIBRARY); with --pytest, a mutant that doctor misses also gets the op's emulated
kernel tests. A mutant is caught when a check fails: a wrong answer under the tests' error rule, or an emulator
report (race, deadlock, out-of-bounds, missing lane). The unmutated library is checked first: it must pass.

    .venv/bin/python bench/planted_bugs.py                 # every mutant (before a kernel change is merged)
    .venv/bin/python bench/planted_bugs.py --only dec_wait_short gemm_row_guard
    .venv/bin/python bench/planted_bugs.py --list

Needs a configured emulation build (scripts/dev_build.sh, or setup.py with MIXTRAL_EXT_BUILD_DIR; default
build/dev). Prints a table and `caught N / planted M`; exit status 1 when a mutant survives or is stale.
"""
import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Mutant:
    id: str
    file: str  # under csrc/kernels
    old: str
    new: str
    what: str
    op: str  # the doctor op (and test file) that must catch it
    tu: str = ""  # the .cu translation unit to recompile (default: file)


M = Mutant
MUTANTS = [
    # rms_norm
    M("rms_missing_sync", "rms_norm.cu", "partial[threadIdx.x >> 5] = ss;\n  __syncthreads();",
      "partial[threadIdx.x >> 5] = ss;", "missing __syncthreads before the cross-warp sum", "rms_norm"),
    M("rms_residual_not_stored", "rms_norm.cu", "      res[i] = a;\n", "", "fused residual never written back",
      "rms_norm"),
    M("rms_tail_dropped", "rms_norm.cu", "  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {\n    V a = src[i];",
      "  for (int64_t i = threadIdx.x; i < nvec - 1; i += kThreads) {\n    V a = src[i];",
      "output loop one vector short", "rms_norm"),
    # rope
    M("rope_sign", "rope_kv_append.cu", "-__fmul_rn(b, sn[i])", "__fmul_rn(b, sn[i])", "rotate-half sign flipped",
      "rope_kv_append"),
    M("rope_sin_is_cos", "rope_kv_append.cu", "p.cos_sin + pos * p.head_dim + half + col, sn", "p.cos_sin + pos * p.head_dim + col, sn",
      "sin read from the cos half of the table", "rope_kv_append"),
    M("rope_v_slot", "rope_kv_append.cu", "(slot + h - p.q_heads - p.kv_heads) * p.head_dim", "(slot + h - p.q_heads) * p.head_dim",
      "v written to the wrong head slot", "rope_kv_append"),
    # moe_route
    # (Not the barrier between the scan and scatter_tile: scatter_tile's own first barrier already orders s_base,
    # so removing that one is an equivalent mutant, measured as such.)
    M("route_missing_sync", "moe_route.cu",
      "    if (lane == 0) s_warp[warp * kMaxE + e] = __popc(b);\n  }\n  __syncthreads();",
      "    if (lane == 0) s_warp[warp * kMaxE + e] = __popc(b);\n  }",
      "missing __syncthreads before the per-warp prefix", "moe_route"),
    M("route_inclusive_scan", "moe_route.cu", "    p.expert_offsets[lane] = i0 - c0;", "    p.expert_offsets[lane] = i0;",
      "offsets scan inclusive instead of exclusive", "moe_route"),
    M("route_block_base", "moe_route.cu", "      *slot = run;\n      run += c;", "      run += c;\n      *slot = run;",
      "multi-block path: a block's base row off by its own count", "moe_route"),
    # moe decode GEMVs + combine
    M("gemv_k_tail", "moe_experts_decode.cu", "          if (!in) wv[u][i] = make_uint4(0u, 0u, 0u, 0u);\n", "",
      "K tail not zeroed (reloaded vector counted twice)", "moe_experts"),
    M("gemv_gate_up", "moe_experts_decode.cu", "const float act = g / (1.f + __expf(-g)) * up;",
      "const float act = up / (1.f + __expf(-up)) * g;", "gate and up swapped in the GEMV1 epilogue", "moe_experts"),
    M("gemv_missing_sync", "moe_experts_decode.cu", "    if (lane < RW * ROWS) s_part[warp][lane] = mine;\n    __syncthreads();",
      "    if (lane < RW * ROWS) s_part[warp][lane] = mine;", "missing __syncthreads before the K-split sum",
      "moe_experts"),
    M("combine_slot_weight", "moe_experts_decode.cu", "__ldg(p.topk_weights + t * p.top_k + s)", "__ldg(p.topk_weights + t * p.top_k)",
      "combine uses slot 0's weight for every slot", "moe_experts"),
    M("gemv_expert_skip", "moe_experts_decode.cu", "for (int i = 0; i < slot && m != 0ull; ++i)",
      "for (int i = 0; i <= slot && m != 0ull; ++i)", "active-expert lookup off by one", "moe_experts"),
    # attention_decode
    M("dec_wait_short", "attention_decode.cu", "cp_async_wait_group<kStages - 2>();",
      "cp_async_wait_group<kStages - 1>();", "cp.async waits one group short", "attention_decode"),
    M("dec_missing_sync", "attention_decode.cu",
      "    cp_async_wait_group<kStages - 2>();  // this thread's pieces of tile t have landed\n    __syncthreads();",
      "    cp_async_wait_group<kStages - 2>();  // this thread's pieces of tile t have landed",
      "missing __syncthreads after the tile wait", "attention_decode"),
    M("dec_window_off_by_one", "attention_decode.cu", "max(0, vis_hi - p.window)", "max(0, vis_hi - p.window - 1)",
      "sliding window one key too wide", "attention_decode"),
    M("dec_split_end", "attention_decode.cu", "key0 + (l16 >> 2) < hi;", "key0 + (l16 >> 2) <= hi;",
      "split-end mask off by one", "attention_decode"),
    M("dec_lse_base", "attention_decode.cu", "mx + log2f(den)", "mx + logf(den)",
      "split log-sum-exp in the wrong base", "attention_decode"),
    # attention_prefill (sm_80)
    M("pre_causal_off_by_one", "attention_prefill.cu", "const bool visible = j <= ps &&",
      "const bool visible = j < ps &&", "causal mask hides the diagonal", "attention_prefill"),
    M("pre_window_off_by_one", "attention_prefill.cu", "(p.window <= 0 || ps - j < p.window)",
      "(p.window <= 0 || ps - j <= p.window)", "sliding window one key too wide", "attention_prefill"),
    M("pre_wait_short", "attention_prefill.cu", "    cp_async_wait_group<1>();\n    __syncthreads();\n    if (it == 0)",
      "    cp_async_wait_group<2>();\n    __syncthreads();\n    if (it == 0)", "cp.async waits one group short",
      "attention_prefill"),
    M("pre_swizzle_dropped", "attention_prefill.cu", "    cp_async_cg_16(dst + swz(row, chunk), src, valid ? 16 : 0);",
      "    cp_async_cg_16(dst + row * kRowBytes + chunk * 16, src, valid ? 16 : 0);",
      "K/V tile stored without the swizzle the ldmatrix reads assume", "attention_prefill"),
    M("pre_frag_swap", "attention_prefill.cu", "ldmatrix_x4(sk + swz(key, c), b0, b1, b2, b3);",
      "ldmatrix_x4(sk + swz(key, c), b0, b2, b1, b3);", "ldmatrix fragments of K swapped", "attention_prefill"),
    M("pre_row_guard", "attention_prefill.cu", "    if (tok < n) {\n      uint4 v;", "    {\n      uint4 v;",
      "epilogue row guard removed", "attention_prefill"),
    M("pre_missing_sync", "attention_prefill.cu",
      "    // Every warp is done with this stage before it is refilled with tile it + 2.\n    __syncthreads();",
      "    // Every warp is done with this stage before it is refilled with tile it + 2.",
      "missing __syncthreads before a stage is refilled", "attention_prefill"),
    # MoE grouped GEMM (sm_80)
    M("gemm_k_tail", "moe_experts_sm80.cu", "const bool k_ok = kcol < g.k;", "const bool k_ok = true;",
      "K tail not zero-filled", "moe_experts"),
    M("gemm_row_guard", "moe_experts_sm80.cu", "const bool row_ok = r < tl.m_end;", "const bool row_ok = true;",
      "epilogue row guard removed", "moe_experts"),
    M("gemm_wait_short", "moe_experts_sm80.cu", "      cp_async_wait_group<STAGES - 2>();",
      "      cp_async_wait_group<STAGES - 1>();", "cp.async waits one group short", "moe_experts"),
    M("gemm_missing_sync", "moe_experts_sm80.cu", "      cp_async_wait_group<STAGES - 2>();\n      __syncthreads();",
      "      cp_async_wait_group<STAGES - 2>();", "missing __syncthreads after the stage wait", "moe_experts"),
    M("gemm_frag_swap", "moe_experts_sm80.cu", "bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1]",
      "bf[2 * j][0], bf[2 * j + 1][0], bf[2 * j][1], bf[2 * j + 1][1]", "ldmatrix B fragments swapped",
      "moe_experts"),
    M("gemm_swizzle_dropped", "moe_experts_sm80.cu", "cp_async_cg_16(a_dst + swz(ld_r + 32 * i, ld_c)",
      "cp_async_cg_16(a_dst + (ld_r + 32 * i) * kRowBytes + ld_c * 16", "A tile stored without the swizzle",
      "moe_experts"),
    M("gemm_gate_up", "moe_experts_common.cuh", "  const float v0 = silu_mul(g0, u0);", "  const float v0 = silu_mul(u0, g0);",
      "gate and up swapped in the GEMM1 epilogue", "moe_experts", tu="moe_experts_sm80.cu"),
    # quantized decode GEMVs (moe_experts_quant)
    M("quant_int4_nibbles", "moe_experts_decode.cu", "static_cast<int>(u[J] << (28 - 4 * b)) >> 28",
      "static_cast<int>(u[J] << (28 - 4 * (b ^ 1))) >> 28", "int4 nibbles of a byte swapped", "moe_experts_quant"),
    M("quant_int8_unsigned", "moe_experts_decode.cu", "static_cast<int>(u[2 * J] << (24 - 8 * b)) >> 24",
      "static_cast<int>((u[2 * J] << (24 - 8 * b)) >> 24)", "int8 sign extension dropped", "moe_experts_quant"),
    M("quant_int4_group", "moe_experts_decode.cu", "(c * EPV) / kInt4Group : 0;", "0 : 0;",
      "int4 scale of group 0 for every input", "moe_experts_quant"),
]

TEST_FILES = {"rms_norm": "test_rms_norm.py", "rope_kv_append": "test_rope_kv_append.py",
              "moe_route": "test_moe_route.py", "moe_experts": "test_moe_experts.py",
              "attention_decode": "test_attention_decode.py", "attention_prefill": "test_attention_prefill.py",
              "moe_experts_quant": "test_moe_experts_quant.py"}


def find_build_dir():
    """The first configured Ninja build with the emulation target: $MIXTRAL_EXT_BUILD_DIR, build/dev, build."""
    for d in (os.environ.get("MIXTRAL_EXT_BUILD_DIR"), os.path.join(ROOT, "build", "dev"), os.path.join(ROOT, "build")):
        if d and os.path.exists(os.path.join(d, "build.ninja")):
            with open(os.path.join(d, "build.ninja")) as f:
                if "mixtral_ext_emu" in f.read():
                    return d
    return None


def build_commands(build_dir):
    """{stem: compile command} of the emulated kernel TUs and the link command of the emulation library."""
    out = subprocess.run(["ninja", "-C", build_dir, "-t", "commands", "mixtral_ext_emu"], capture_output=True,
                         text=True, check=True).stdout
    compiles, link = {}, None
    for line in out.splitlines():
        m = re.search(r"emu_src/(\w+)\.cpp\.o -c ", line)
        if m:
            compiles[m.group(1)] = line
        elif " -shared " in line and "_emu" in line:
            link = line
    if not compiles or link is None:
        raise SystemExit(f"planted_bugs: no emulation target in {build_dir} (run scripts/dev_build.sh first)")
    return compiles, link


def build_mutant(m, scratch, compiles, link, build_dir):
    """Compiles the mutated TU and links a library; returns its path (raises CalledProcessError on a build error)."""
    stem = os.path.splitext(m.tu or m.file)[0]
    wrapper = os.path.join(scratch, "wrap", f"{stem}.cpp")
    os.makedirs(os.path.dirname(wrapper), exist_ok=True)
    with open(wrapper, "w") as f:
        f.write(f'#include "{scratch}/csrc/kernels/{stem}.cu"\n')
    obj = os.path.join(scratch, "obj", f"{stem}.o")
    os.makedirs(os.path.dirname(obj), exist_ok=True)
    args = shlex.split(compiles[stem])
    cmd = []
    skip = 0
    for i, a in enumerate(args):
        if skip:
            skip -= 1
            continue
        if a in ("-MT", "-MF"):
            skip = 1
            continue
        if a == "-MD":
            continue
        if a == "-o":
            cmd += ["-o", obj]
            skip = 1
            continue
        if a == "-c":
            cmd += ["-c", wrapper]
            skip = 1
            continue
        if a.startswith("-I") and a[2:].startswith(os.path.join(ROOT, "csrc")):
            a = "-I" + scratch + a[2 + len(ROOT):]
        cmd.append(a)
    subprocess.run(cmd, cwd=build_dir, check=True, capture_output=True, text=True)
    lib = os.path.join(scratch, f"_emu_{m.id}.so")
    ln = re.sub(r"-o \S+", f"-o {lib}", link, count=1)
    ln = ln.replace(f"CMakeFiles/mixtral_emu_kernels.dir/emu_src/{stem}.cpp.o", obj)
    subprocess.run(ln, shell=True, cwd=build_dir, check=True, capture_output=True, text=True)
    return lib


def run_doctor(lib, op, timeout):
    env = dict(os.environ, MIXTRAL_EXT_EMU_LIBRARY=lib)
    try:
        r = subprocess.run([sys.executable, "-m", "mixtral_ext", "doctor", "--emu", "--emu-arch", "80", "--only", op],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timeout (a hang the emulator did not report)"
    fails = [ln for ln in r.stdout.splitlines() if " FAIL" in ln]
    if r.returncode == 0:
        return True, ""
    return False, _why(fails[0] if fails else (r.stdout + r.stderr).strip().splitlines()[-1])


def run_pytest(lib, op, timeout):
    env = dict(os.environ, MIXTRAL_EXT_EMU_LIBRARY=lib)
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "emu",
                            os.path.join("tests", TEST_FILES[op])], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "tests: timeout"
    if r.returncode == 0:
        return True, ""
    if r.returncode == 5:  # pytest: no test collected (the op has no emulated tests yet): nothing caught it
        return True, f"(no emulated tests in {TEST_FILES[op]})"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("E ") or "Error" in ln]
    return False, "tests: " + _why(lines[0] if lines else r.stdout.strip().splitlines()[-1])


def _why(line):
    if " FAIL" in line:  # a doctor row: its path, then the detail in parentheses (or the error vs the tolerance)
        cols = line.split()
        detail = line.split(" FAIL", 1)[1].strip(" ()")
        line = f"{cols[1]}: " + (detail or f"max err {cols[-4]} > tol {cols[-3]}")
    low = line.lower()
    for word in ("race", "deadlock", "out-of-bounds", "out of bounds", "missing", "nan"):
        if word in low:
            return f"{word}: {line.strip()[:140]}"
    return line.strip()[:150]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--pytest", action="store_true", help="a mutant doctor misses also runs the op's emulated tests")
    ap.add_argument("--build-dir", default=None,
                    help="the configured CMake build (default: $MIXTRAL_EXT_BUILD_DIR, build/dev or build)")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:<24} {m.file:<22} {m.op:<18} {m.what}")
        return 0
    if args.only and len(mutants) != len(args.only):
        raise SystemExit(f"unknown mutant(s): {sorted(set(args.only) - {m.id for m in MUTANTS})}")
    args.build_dir = args.build_dir or find_build_dir()
    if args.build_dir is None:
        raise SystemExit("planted_bugs: no configured emulation build (run scripts/dev_build.sh or pip install -e .)")
    compiles, link = build_commands(args.build_dir)
    t_all = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="planted_")
    try:
        shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(scratch, "csrc"))
        # The baseline: the unmutated sources through the same rebuild must pass, or a "catch" means nothing.
        ops = sorted({m.op for m in mutants})
        base = M("baseline", "rms_norm.cu", "", "", "unmutated", "")
        t0 = time.perf_counter()
        lib = build_mutant(base, scratch, compiles, link, args.build_dir)
        for op in ops:
            ok, why = run_doctor(lib, op, args.timeout)
            if not ok:
                print(f"baseline FAILS for {op}: {why}")
                return 1
        print(f"baseline (unmutated rebuild) passes {', '.join(ops)} in {time.perf_counter() - t0:.0f}s")
        print(f"{'mutant':<24} {'file':<20} {'what':<52} {'verdict':<8} {'time':>6}  how")
        caught = stale = 0
        for m in mutants:
            path = os.path.join(scratch, "csrc", "kernels", m.file)
            with open(path) as f:
                text = f.read()
            t0 = time.perf_counter()
            if text.count(m.old) != 1:
                stale += 1
                print(f"{m.id:<24} {m.file:<20} {m.what[:52]:<52} {'STALE':<8} {0:5.0f}s  "
                      f"the line occurs {text.count(m.old)} times in the kernel now: update the mutant")
                continue
            try:
                with open(path, "w") as f:
                    f.write(text.replace(m.old, m.new))
                try:
                    lib = build_mutant(m, scratch, compiles, link, args.build_dir)
                except subprocess.CalledProcessError as e:
                    verdict, how = "CAUGHT", "does not compile: " + (e.stderr or "").strip().splitlines()[-1][:80]
                else:
                    passed, how = run_doctor(lib, m.op, args.timeout)
                    if passed and args.pytest:
                        passed, how = run_pytest(lib, m.op, args.timeout)
                    verdict = "missed" if passed else "CAUGHT"
                    if not passed and not how.startswith("tests"):
                        how = "doctor: " + how
            finally:
                with open(path, "w") as f:
                    f.write(text)
                if os.path.exists(os.path.join(scratch, f"_emu_{m.id}.so")):
                    os.remove(os.path.join(scratch, f"_emu_{m.id}.so"))
            caught += verdict == "CAUGHT"
            print(f"{m.id:<24} {m.file:<20} {m.what[:52]:<52} {verdict:<8} {time.perf_counter() - t0:5.0f}s  {how}",
                  flush=True)
        print(f"caught {caught} / planted {len(mutants)}" + (f" ({stale} stale)" if stale else "") +
              f" in {time.perf_counter() - t_all:.0f}s")
        return 0 if caught == len(mutants) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
