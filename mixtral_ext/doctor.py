"""`mixtral-ext doctor`: what this machine can run, then every op through the best kernel it has, against the
reference.

    from mixtral_ext import doctor
    rc = doctor.main()                       # prints the report; 0 when every check passed
    doctor.run_checks("emu", only=["rms_norm"])  # [Result(op, path, max_err, tol, seconds, status, detail), ...]

Backends: "cuda" (the real GPU through mixtral_ext.ops; the kernel paths it can force: decode splits by the
MIXTRAL_EXT_DECODE_SPLITS knob, the MoE regime by the token count) or "emu" (the kernels' exact source run on the CPU
by the emulator, mixtral_ext.emu, each path chosen explicitly). Inputs are small and random (seeded).

The error rule is the test suite's (tests/numerics.py, DESIGN.md "Tests"): a kernel's max error against the float32
reference may be at most twice that of the same math done in the low dtype by eager PyTorch, plus two output ulps at
the reference's magnitude; integer outputs (routing ids, counts, offsets, permutations) must be exact. A NaN in an
output, or an emulator report (race, deadlock, out-of-bounds access, warp collective with a lane missing), is a FAIL.
A path the machine has no kernel for (e.g. an sm_90a path the emulator does not model yet) is a SKIP with its reason,
never a PASS.
"""
import dataclasses
import os
import platform
import re
import time

import torch
import torch.nn.functional as F

from . import reference

_EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}


@dataclasses.dataclass
class Result:
    op: str
    path: str
    max_err: float
    tol: float
    seconds: float
    status: str  # PASS | FAIL | SKIP
    detail: str = ""


class _Failed(Exception):
    pass


def _rule(out, ref32, low):
    """(max error, tolerance) of tests/numerics.py's rule; raises _Failed on NaN in the output."""
    if torch.isnan(out.float()).any():
        raise _Failed("NaN in the kernel output")
    ref = ref32.float()
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    base = (low.float() - ref).abs().max().item() if out.numel() else 0.0
    noise = 2 * _EPS.get(out.dtype, 2.0 ** -8) * (ref.abs().max().item() if ref.numel() else 0.0)
    return err, 2 * base + noise


def _exact(name, got, want):
    if not torch.equal(got.cpu().to(want.dtype), want.cpu()):
        raise _Failed(f"{name} differs from the reference (integer output, must be exact)")


# ---- backends ------------------------------------------------------------------------------------------------------

class _Emu:
    device = "cpu"

    def __init__(self):
        from . import emu

        self.emu = emu

    def call(self, op, *args, **path):
        return getattr(self.emu, op)(*args, **path)


class _Cuda:
    device = "cuda"

    def __init__(self):
        from . import ops

        self.ops = ops

    def call(self, op, *args, **path):
        path.pop("arch", None)
        if op == "attention_decode":
            splits = path.pop("splits", 0)
            old = os.environ.get("MIXTRAL_EXT_DECODE_SPLITS")
            try:
                if splits:
                    os.environ["MIXTRAL_EXT_DECODE_SPLITS"] = str(splits)
                return self.ops.attention_decode(*args, **path)
            finally:
                if old is None:
                    os.environ.pop("MIXTRAL_EXT_DECODE_SPLITS", None)
                else:
                    os.environ["MIXTRAL_EXT_DECODE_SPLITS"] = old
        path.pop("path", None)
        path.pop("regime", None)
        if op == "moe_experts_quant":  # the friendly spelling takes the quantized weights with their scales
            x, route, w13, w13_scale, w2, w2_scale, _bits = args
            args = (x, route, w13, w2, w13_scale, w2_scale)
            op = "moe_experts"
        out = getattr(self.ops, op)(*args, **path)
        torch.cuda.synchronize()
        return out


# ---- the checks: (op, path label, function(backend) -> (max_err, tol)) ---------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_rms_norm(be, residual, arch=80):
    g = _gen(1)
    T, H = 5, 1000  # H not a multiple of the vector width
    x = torch.randn(T, H, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(H, generator=g)).bfloat16()
    r = torch.randn(T, H, generator=g).bfloat16() if residual else None
    ref_r = None if r is None else r.float().clone()
    ref = reference.rms_norm(x.float(), w.float(), 1e-5, ref_r)
    low_r = None if r is None else r.clone()
    low_x = x if low_r is None else (low_r + x)
    low = (w * (low_x * torch.rsqrt(low_x.pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    rr = None if r is None else r.clone().to(be.device)
    out = be.call("rms_norm", x.to(be.device), w.to(be.device), 1e-5, rr, arch=arch)
    out = out[0] if isinstance(out, tuple) else out
    if residual:
        err, tol = _rule(rr.cpu(), ref_r, (r + x))
        if err > tol:
            raise _Failed(f"updated residual: error {err:.3e} > {tol:.3e}")
    return _rule(out.cpu(), ref, low)


def _check_rope(be, arch=80):
    g = _gen(2)
    T, Hq, Hkv, D, B, S = 7, 4, 2, 128, 2, 16
    qkv = (torch.randn(T, (Hq + 2 * Hkv) * D, generator=g) * 2).bfloat16()
    slots = torch.randperm(B * S, generator=g)[:T]
    seq_ids, positions = (slots // S).to(torch.int32), (slots % S).to(torch.int32)
    cs = reference.rope_cos_sin(S, D, 1e6)
    kc, vc = torch.randn(B, S, Hkv, D, generator=g).bfloat16(), torch.randn(B, S, Hkv, D, generator=g).bfloat16()
    k32, v32 = kc.float(), vc.float()
    q32 = reference.rope_kv_append(qkv.float(), positions, seq_ids, cs, k32, v32)
    # eager in bf16: the rotation done on bf16 tensors with the table rounded to bf16
    half = D // 2
    c = cs[positions.long()].bfloat16()
    cos, sin = c[:, None, :half].repeat(1, 1, 2), c[:, None, half:].repeat(1, 1, 2)
    q, k, _ = qkv.view(T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
    rot = lambda t: t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin  # noqa: E731
    q_low, k_low = rot(q), rot(k)
    kd, vd = kc.clone().to(be.device), vc.clone().to(be.device)
    qo = be.call("rope_kv_append", qkv.to(be.device), positions.to(be.device), seq_ids.to(be.device),
                 cs.to(be.device), kd, vd, arch=arch)
    kd, vd = kd.cpu(), vd.cpu()
    err_k, tol_k = _rule(kd[seq_ids.long(), positions.long()], k32[seq_ids.long(), positions.long()], k_low)
    if err_k > tol_k:
        raise _Failed(f"k_cache: error {err_k:.3e} > {tol_k:.3e}")
    untouched = torch.ones(B, S, dtype=torch.bool)
    untouched[seq_ids.long(), positions.long()] = False
    if not torch.equal(kd[untouched], kc[untouched]) or not torch.equal(vd, v32.bfloat16()):
        raise _Failed("cache slots other than the tokens' changed, or v differs")
    return _rule(qo.cpu(), q32, q_low)


def _route_inputs(T, E=8, seed=3):
    return torch.randn(T, E, generator=_gen(seed))


def _check_route(be, T, path, arch=80):
    logits = _route_inputs(T).bfloat16()
    ref = reference.moe_route(logits.float(), 2)
    out = be.call("moe_route", logits.to(be.device), 2, path=path, arch=arch)
    for name, got, want in zip(("topk_ids", "expert_counts", "expert_offsets", "sorted_tokens", "token_rows"),
                               tuple(out)[1:], ref[1:]):
        _exact(name, got, want)
    low = torch.softmax(logits, -1).gather(1, ref[1].long())
    low = low / low.sum(-1, keepdim=True)
    return _rule(out[0].cpu(), ref[0], low)


def _moe_inputs(T, E=8, H=264, I=200, seed=4, skew=False):  # K tails: 264, 200 not multiples of 64
    g = _gen(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).bfloat16()
    logits = torch.randn(T, E, generator=g)
    if skew:
        logits[:, 0] += 10  # every token on expert 0, a few experts with no tokens
    from .ops import Route

    return x, Route(*reference.moe_route(logits, 2)), w13, w2


def _moe_low(x, route, w13, w2):
    """Eager PyTorch in x's dtype: every matmul and the activation rounded to it."""
    y = torch.zeros_like(x)
    for s in range(route.topk_ids.shape[1]):
        for e in route.topk_ids[:, s].unique().tolist():
            rows = (route.topk_ids[:, s] == e).nonzero().flatten()
            h = x[rows] @ w13[e].t()
            act = F.silu(h[:, 0::2]) * h[:, 1::2]
            y[rows] += route.topk_weights[rows, s:s + 1].to(x.dtype) * (act @ w2[e].t())
    return y


def _check_moe(be, T, regime, arch=80, skew=False):
    x, route, w13, w2 = _moe_inputs(T, skew=skew)
    ref = reference.moe_experts(x.float(), *route[:2], *route[3:], w13, w2)
    dev = type(route)(*(t.to(be.device) for t in route))
    out = be.call("moe_experts", x.to(be.device), dev, w13.to(be.device), w2.to(be.device), regime=regime, arch=arch)
    return _rule(out.cpu(), ref, _moe_low(x, route, w13, w2))


def _check_moe_quant(be, T, regime, mode, arch=80, skew=False):
    """Quantized experts (quant.py formats) against the dequantize reference; the low-precision baseline is eager
    bf16 on the dequantized weights. H = 384, I = 256: int4 needs multiples of 128."""
    from . import quant

    x, route, w13, w2 = _moe_inputs(T, H=384, I=256, seed=5, skew=skew)
    (q13, s13), (q2, s2) = quant.quantize(w13, mode), quant.quantize(w2, mode)
    bits = 8 if mode == "int8" else 4
    ref = reference.moe_experts_quant(x.float(), *route[:2], *route[3:], q13, s13, q2, s2, bits)
    d13, d2 = quant.dequantize(q13, s13).bfloat16(), quant.dequantize(q2, s2).bfloat16()
    dev = type(route)(*(t.to(be.device) for t in route))
    out = be.call("moe_experts_quant", x.to(be.device), dev, q13.to(be.device), s13.to(be.device), q2.to(be.device),
                  s2.to(be.device), bits, regime=regime, arch=arch)
    return _rule(out.cpu(), ref, _moe_low(x, route, d13, d2))


def _attn_low(qf, kf, vf, mask, scale):
    """Eager attention in the low dtype: matmuls in it, softmax in fp32 rounded back. qf [n,Hq,D], kf/vf [L,Hq,D]."""
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0).to(qf.dtype)
    return torch.einsum("hqk,khd->qhd", p, vf)


def _check_decode(be, splits, window, arch=80):
    g = _gen(5)
    lens, Hq, Hkv, D = [1, 15, 65, 200], 8, 2, 128
    B, S = len(lens), max(lens) + 3
    q = torch.randn(B, Hq, D, generator=g).bfloat16()
    k, v = torch.randn(B, S, Hkv, D, generator=g).bfloat16(), torch.randn(B, S, Hkv, D, generator=g).bfloat16()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    ref = reference.attention_decode(q.float(), k.float(), v.float(), seq_lens, scale, window)
    low = torch.empty_like(q)
    for b, L in enumerate(lens):
        kb, vb = (t[b, :L].repeat_interleave(Hq // Hkv, 1) for t in (k, v))
        mask = reference._visible(torch.tensor([L - 1]), torch.arange(L), window)
        low[b] = _attn_low(q[b:b + 1], kb, vb, mask, scale)[0]
    out = be.call("attention_decode", q.to(be.device), k.to(be.device), v.to(be.device), seq_lens.to(be.device),
                  scale, window, splits=splits, arch=arch)
    return _rule(out.cpu(), ref, low)


def _check_prefill(be, window, arch):
    g = _gen(6)
    new, prefix, Hq, Hkv, D = [1, 70, 130], [0, 33, 5], 4, 2, 128  # ragged, a cached prefix, tiles with tails
    B = len(new)
    lens = [n + p for n, p in zip(new, prefix)]
    S = max(lens)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, D, generator=g).bfloat16()
    k, v = torch.randn(B, S, Hkv, D, generator=g).bfloat16(), torch.randn(B, S, Hkv, D, generator=g).bfloat16()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    ref = reference.attention_prefill(q.float(), k.float(), v.float(), cu, seq_lens, max(new), scale, window)
    low = torch.empty_like(q)
    for b in range(B):
        n, L = new[b], lens[b]
        kb, vb = (t[b, :L].repeat_interleave(Hq // Hkv, 1) for t in (k, v))
        mask = reference._visible(torch.arange(L - n, L), torch.arange(L), window)
        low[cu[b]:cu[b + 1]] = _attn_low(q[cu[b]:cu[b + 1]], kb, vb, mask, scale)
    out = be.call("attention_prefill", q.to(be.device), k.to(be.device), v.to(be.device), cu.to(be.device),
                  seq_lens.to(be.device), max(new), scale, window, arch=arch)
    return _rule(out.cpu(), ref, low)


def checks(backend, arch, emu_archs=(80, 90)):
    """[(op, path, fn(be), kernel)]: `kernel` names the kernel the path must launch (checked on the emulator, which
    counts launches); `arch` is the GPU's (cuda) or 80 (emu; the sm_90a paths are tried as well)."""
    emu = backend == "emu"
    c = [
        ("rms_norm", "plain", lambda be: _check_rms_norm(be, False, arch), "rms_norm_kernel"),
        ("rms_norm", "fused residual", lambda be: _check_rms_norm(be, True, arch), "rms_norm_kernel"),
        ("rope_kv_append", "-", lambda be: _check_rope(be, arch), "rope_kv_append_kernel"),
        ("moe_route", "single block (T=37)", lambda be: _check_route(be, 37, "single", arch),
         "moe_route_single_kernel"),
        ("moe_route", "count/scan/scatter (T=4100)", lambda be: _check_route(be, 4100, "multi", arch),
         "moe_route_scatter_kernel"),
        ("moe_experts", "decode GEMVs (T=1)", lambda be: _check_moe(be, 1, "decode", arch), "moe_experts_gemv_kernel"),
        ("moe_experts", "decode GEMVs (T=3, one expert)", lambda be: _check_moe(be, 3, "decode", arch, True),
         "moe_experts_gemv_kernel"),
        ("moe_experts_quant", "int8 decode GEMVs (T=1)", lambda be: _check_moe_quant(be, 1, "decode", "int8", arch),
         "moe_experts_gemv_kernel"),
        ("moe_experts_quant", "int4 decode GEMVs (T=5, one expert)",
         lambda be: _check_moe_quant(be, 5, "decode", "int4", arch, True), "moe_experts_gemv_kernel"),
        ("moe_experts_quant", "int4 prefill dequant+GEMM (T=80)",
         lambda be: _check_moe_quant(be, 80, "prefill", "int4", arch, True), "moe_experts_dequant_kernel"),
        ("attention_decode", "auto splits", lambda be: _check_decode(be, 0, 0, arch), "attention_decode_kernel"),
        ("attention_decode", "3 splits, window 50", lambda be: _check_decode(be, 3, 50, arch),
         "attention_decode_combine_kernel"),
    ]
    for a in (emu_archs if emu else [arch]):
        label, sm = ("sm_80 mma.sync", "sm80") if a < 90 else ("sm_90a wgmma", "sm90")
        # on a GPU the launcher picks the regime by T: 80 tokens is the grouped GEMM
        c.append(("moe_experts", f"prefill {label} (T=80, skewed)",
                  lambda be, a=a: _check_moe(be, 80, "prefill", a, True), f"moe_experts_{sm}_kernel"))
        c.append(("attention_prefill", f"{label} ragged + prefix",
                  lambda be, a=a: _check_prefill(be, 0, a), f"attention_prefill_{sm}_kernel"))
        c.append(("attention_prefill", f"{label} window 40",
                  lambda be, a=a: _check_prefill(be, 40, a), f"attention_prefill_{sm}_kernel"))
    return c


def run_checks(backend, only=None, arch=None, log=None, emu_archs=(80, 90)):
    """Runs the checks of `backend` ("cuda" | "emu"), optionally only ops in `only`; returns [Result]."""
    if arch is None:
        arch = 80
        if backend == "cuda":
            major, minor = torch.cuda.get_device_capability()
            arch = 90 if major >= 9 else 80
    be = _Cuda() if backend == "cuda" else _Emu()
    results = []
    for op, path, fn, kernel in checks(backend, arch, emu_archs):
        if only and op not in only:
            continue
        if backend == "emu":
            be.emu.reset_stats()
        t0 = time.perf_counter()
        try:
            err, tol = fn(be)
            status, detail = ("PASS" if err <= tol else "FAIL"), ""
            if backend == "emu":
                ran = _launched(be.emu.stats())
                if kernel not in ran and "sm90" in kernel:
                    status, detail = "SKIP", f"the emulator ran {', '.join(ran)} instead (sm_90a not modelled yet)"
                elif kernel not in ran:
                    status, detail = "FAIL", f"{kernel} did not run (launched: {', '.join(ran)})"
        except _Failed as e:
            err, tol, status, detail = float("nan"), float("nan"), "FAIL", str(e)
        except RuntimeError as e:
            msg = str(e).strip()
            if backend == "emu" and "not emulated yet" in msg:
                err, tol, status, detail = float("nan"), float("nan"), "SKIP", "not modelled by the emulator yet"
            else:
                err, tol, status, detail = float("nan"), float("nan"), "FAIL", msg
        r = Result(op, path, err, tol, time.perf_counter() - t0, status, detail)
        results.append(r)
        if log:
            log(format_result(r))
    return results


def _launched(stats):
    """Distinct kernel names (without namespaces and template arguments) of the launches in emu.stats()."""
    names = []
    for s in stats:
        m = re.search(r"(\w+)(?=<|\()", s["kernel"])  # the first identifier followed by template args or params
        name = m.group(1) if m else s["kernel"]
        if name not in names:
            names.append(name)
    return names


def format_result(r):
    err = "-" if r.max_err != r.max_err else f"{r.max_err:.2e}"
    tol = "-" if r.tol != r.tol else f"{r.tol:.2e}"
    line = f"  {r.op:<18} {r.path:<38} {err:>9} {tol:>9} {r.seconds:7.2f}s  {r.status}"
    if r.detail:
        line += f"  ({_short_report(r.detail)[:240]})"
    return line


def _short_report(text):
    """The first line of an error; an emulator report is shortened to what happened and in which kernel (the full
    report, with source lines, is what the emulated op raises)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"emu: kernel (.*?), grid .*?: CTA \([^)]*\)(?:, thread \d+ \([^)]*\))?: (.*)", first)
    if not m:
        return first
    k = re.search(r"(\w+)(?=<|\()", m.group(1))
    return f"{m.group(2)} [{k.group(1) if k else m.group(1)}]"


def environment():
    """[(name, value)]: torch, CUDA runtime / driver, GPU, the extensions and their architectures."""
    from . import ops

    env = [("python", platform.python_version()), ("torch", torch.__version__),
           ("CUDA runtime (torch)", torch.version.cuda or "none (CPU-only torch)")]
    if torch.cuda.is_available():
        try:
            driver = torch._C._cuda_getDriverVersion()
            env.append(("CUDA driver", f"{driver // 1000}.{driver % 1000 // 10}"))
        except (AttributeError, RuntimeError):
            pass
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env.append((f"GPU {i}", f"{p.name}, compute capability {p.major}.{p.minor}, "
                                    f"{p.total_memory / 2 ** 30:.0f} GiB"))
    else:
        env.append(("GPU", "none visible to torch"))
    env.append(("CUDA extension (_C)", "loaded" if ops.HAS_CUDA_KERNELS else f"unavailable: {ops.EXTENSION_STATUS}"))
    if ops.HAS_CUDA_KERNELS:
        archs = _built_archs()
        if archs:
            env.append(("architectures in _C", archs))
    from . import emu

    env.append(("emulation extension (_emu)", "loaded" if emu.available() else f"unavailable: {emu.status()}"))
    return env


def _built_archs():
    """The architectures compiled into _C, from the marker string the build writes into it (csrc/ops.cpp,
    MIXTRAL_EXT_ARCH_LIST); None if unknown. (Scanning the file for "sm_NN" finds the CUDA runtime's own strings.)"""
    try:
        import glob

        so = glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so"))
        if not so:
            return None
        m = re.search(rb"mixtral_ext_arch_list=([0-9a-z ]+)\x00", open(so[0], "rb").read())
        return ", ".join(f"sm_{a}" for a in m.group(1).decode().split()) if m else None
    except OSError:
        return None


def main(backend=None, only=None, out=print, emu_archs=(80, 90)):
    """Prints the environment and the op table; returns the exit status (1 on any FAIL or when nothing can run)."""
    known = sorted({c[0] for c in checks("emu", 80)})
    bad = sorted(set(only or ()) - set(known))
    if bad:
        raise ValueError(f"doctor: unknown op(s) {', '.join(bad)}; the ops are {', '.join(known)}")
    out("mixtral-ext doctor")
    for k, v in environment():
        out(f"  {k:<28} {v}")
    from . import emu, ops

    if backend is None:
        backend = "cuda" if torch.cuda.is_available() and ops.HAS_CUDA_KERNELS else "emu"
    if backend == "emu" and not emu.available():
        out(f"no kernel can run here: no usable GPU and no emulation extension ({emu.status()})")
        return 1
    where = "the GPU" if backend == "cuda" else "the CPU emulator (the kernels' exact source; no GPU used)"
    out(f"ops through {where}; error rule: max |err| <= 2 x eager low-dtype error + 2 output ulps")
    out(f"  {'op':<18} {'path':<38} {'max err':>9} {'tol':>9} {'time':>8}  status")
    results = run_checks(backend, only=only, log=out, emu_archs=emu_archs)
    fails = sum(r.status == "FAIL" for r in results)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    out(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if fails or not counts["PASS"] else 0
