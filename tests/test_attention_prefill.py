"""attention_prefill: the reference against an independent float64 formula (CPU, CI) and the CUDA kernels against the
reference under the 2x rule (GPU), for the kernel path this process uses (MIXTRAL_EXT_ATTN_PATH, default auto); on
Hopper, test_each_path_in_a_subprocess reruns the GPU tests with the sm_80 path forced and, where built, the sm_90a
path forced."""
import math
import os
import subprocess
import sys

import pytest
import torch

from attention_prefill_inputs import D, chunked, eager_low, make_inputs, ref_fp32, visible
from conftest import backend_cases, backends
from mixtral_ext import ops
from numerics import assert_2x_rule


def formula(q, k_cache, v_cache, cu, lens, scale, window):
    """float64 attention, one sequence and one query head at a time, GQA by index arithmetic."""
    T, Hq, _ = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros(T, Hq, q.shape[2], dtype=torch.float64)
    for b in range(len(lens)):
        n, L = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        mask = visible(torch.arange(L - n, L), torch.arange(L), window)
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            s = q[cu[b]:cu[b + 1], h].double() @ k_cache[b, :L, kv].double().T * scale
            s = s.masked_fill(~mask, -math.inf)
            p = torch.exp(s - s.max(-1, keepdim=True).values)
            out[cu[b]:cu[b + 1], h] = (p / p.sum(-1, keepdim=True)) @ v_cache[b, :L, kv].double()
    return out


@pytest.mark.parametrize("new_lens,prefix_lens,window", [
    ([1], [0], 0), ([17], [0], 0), ([5, 1, 33], [0, 7, 20], 0), ([9, 40], [3, 0], 4), ([16, 1], [50, 10], 1),
    ([0, 6], [4, 2], 0),
])
@pytest.mark.usefixtures("cpu_impl")
def test_reference_matches_formula(new_lens, prefix_lens, window):
    q, k, v, cu_t, lens_t, max_q, cu, lens = make_inputs(new_lens, prefix_lens, seed=len(new_lens) + window)
    scale = D ** -0.5
    out = ops.attention_prefill(q, k, v, cu_t, lens_t, max_q, scale, window)
    torch.testing.assert_close(out.double()[:cu[-1]], formula(q, k, v, cu, lens, scale, window), rtol=1e-5,
                               atol=1e-6)


def test_opcheck_cpu():
    q, k, v, cu_t, lens_t, max_q, _, _ = make_inputs([3, 5], [2, 0], seed=3)
    torch.library.opcheck(torch.ops.mixtral_ext.attention_prefill.default, (q, k, v, cu_t, lens_t, max_q, 0.1, 0))
    torch.library.opcheck(torch.ops.mixtral_ext.attention_prefill.default, (q, k, v, cu_t, lens_t, max_q, 0.1, 2))


def test_registered_for_all_devices():
    assert hasattr(torch.ops.mixtral_ext, "attention_prefill")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mixtral_ext::attention_prefill",
                                                          "CompositeExplicitAutograd")


# ---- the kernels: on the GPU, and their source emulated on the CPU (the sm_80 path, reduced lengths) ----------


def check(kernels, new_lens, prefix_lens, window=0, dtype=torch.bfloat16, Hq=32, Hkv=8, slack=0, seed=0,
          q_scale=1.0):
    dev = getattr(kernels, "device", "cuda")
    q, k, v, cu_t, lens_t, max_q, cu, lens = make_inputs(new_lens, prefix_lens, Hq, Hkv, dtype, dev, slack,
                                                         seed, q_scale, stale=float("nan"))
    scale = D ** -0.5
    # Poison the caching allocator: the output most likely reuses this NaN-filled block, so a row the kernel never
    # writes shows up as NaN instead of as whatever an earlier, correct result left there. (The emulator allocates
    # every output NaN-filled.)
    torch.full(q.shape, float("nan"), dtype=dtype, device=dev)
    out = kernels.attention_prefill(q, k, v, cu_t, lens_t, max_q, scale, window)
    assert out.dtype == dtype and out.shape == q.shape
    # The oracles must not see the NaN slots either: they read only the first L slots, as the contract says.
    ref = chunked(ref_fp32, q, k, v, cu, lens, scale, window)
    low = chunked(eager_low, q, k, v, cu, lens, scale, window)
    what = f"attention_prefill {dtype} new={new_lens} prefix={prefix_lens} window={window} heads={Hq}/{Hkv}"
    assert_2x_rule(out, ref, low, what=what)
    return out


@pytest.mark.parametrize("kern, n", backend_cases([1, 15, 16, 17, 127, 128, 129, 1000, 4096, 16384],
                                                  [1, 15, 17, 64, 65, 129, 200]), indirect=["kern"])
def test_lengths_no_cache(kern, n):
    """The no-cache full forward: k_cache is k viewed as [1, n, Hkv, D], exactly n slots."""
    check(kern, [n], [0], seed=n)


@pytest.mark.parametrize("kern, n", backend_cases([1, 17, 129, 1000], [1, 17, 129]), indirect=["kern"])
def test_lengths_fp16(kern, n):
    check(kern, [n], [0], dtype=torch.float16, seed=n + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kern, new_lens", backend_cases([[1, 15, 16, 17], [129, 1, 1000, 64, 3], [4096, 127, 128]],
                                                         [[1, 15, 16, 17], [129, 1, 64, 3]]), indirect=["kern"])
def test_mixed_batch(kern, dtype, new_lens):
    check(kern, new_lens, [0] * len(new_lens), dtype=dtype, slack=37, seed=len(new_lens))


@pytest.mark.parametrize("kern, case", backend_cases(
    [([1], [1000]), ([16, 1, 200], [5, 300, 2048]), ([129, 64], [64, 1]), ([1000, 17], [3000, 4096])],
    [([1], [100]), ([16, 1, 20], [5, 30, 200]), ([129, 64], [64, 1])]), indirect=["kern"])
def test_cached_prefix(kern, case):
    new_lens, prefix_lens = case
    check(kern, new_lens, prefix_lens, slack=100, seed=sum(prefix_lens))


@pytest.mark.parametrize("kern, case", backend_cases(
    [(w, [1000, 1, 129], [0, 2000, 300]) for w in (1, 7, 64, 100, 1000, 5000)],
    [(w, [200, 1, 65], [0, 200, 30]) for w in (1, 7, 64, 100)]), indirect=["kern"])
def test_sliding_window(kern, case):
    """Windows narrower than, equal to and wider than the key tiles, with and without a cached prefix."""
    window, new_lens, prefix_lens = case
    check(kern, new_lens, prefix_lens, window=window, slack=5, seed=window)


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_other_gqa_groups(kern):
    """G = 1 (MHA), 2 and 8 fold differently into the 128-row tile."""
    for Hq, Hkv in [(8, 8), (8, 4), (16, 2)]:
        check(kern, [100, 7], [30, 0], Hq=Hq, Hkv=Hkv, seed=Hq + Hkv)


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_no_nan(kern):
    """Large logits (q x 30) stress the running max; a sequence with no visible key at all (seq_lens_k = 0 with one
    new token, outside the contract) must give zeros, not NaN; NaN in unused cache slots must not leak."""
    out = check(kern, [300, 1], [0, 50], window=3, slack=20, q_scale=30.0)
    assert torch.isfinite(out).all()
    dev = kern.device
    q = torch.randn(3, 32, D, device=dev, dtype=torch.bfloat16)
    k = torch.full((2, 8, 8, D), float("nan"), device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=dev)
    lens = torch.tensor([0, 2], dtype=torch.int32, device=dev)
    k[1, :2] = torch.randn(2, 8, D, device=dev, dtype=torch.bfloat16)
    out = kern.attention_prefill(q, k, k, cu, lens, 2, D ** -0.5, 0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.cuda
def test_large_cache_64bit_offsets(kernels):
    """A [2, 2^21 + 64, 8, 128] cache (8 GiB each for K and V): sequence 1 starts 2^31 elements in, and its last keys
    sit ~2^31 elements past that, so any 32-bit index product reads the wrong slots. A window keeps the oracle small:
    it runs on the last 2048 slots, which hold every key the window lets a query see."""
    B, S, Hq, Hkv, W = 2, (1 << 21) + 64, 32, 8, 1500
    g = torch.Generator(device="cuda").manual_seed(11)
    k = torch.empty(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.empty_like(k)
    new_lens, lens = [40, 300], [100, S]
    for b, L in enumerate(lens):
        lo = max(0, L - 2048)
        k[b, lo:L] = torch.randn(L - lo, Hkv, D, device="cuda", generator=g).to(torch.bfloat16)
        v[b, lo:L] = torch.randn(L - lo, Hkv, D, device="cuda", generator=g).to(torch.bfloat16)
        k[b, L:L + 512] = float("nan")
        v[b, L:L + 512] = float("nan")
    q = torch.randn(sum(new_lens), Hq, D, device="cuda", generator=g).to(torch.bfloat16)
    cu = [0, new_lens[0], sum(new_lens)]
    out = kernels.attention_prefill(q, k, v, torch.tensor(cu, dtype=torch.int32, device="cuda"),
                                    torch.tensor(lens, dtype=torch.int32, device="cuda"), max(new_lens), D ** -0.5, W)
    ref, low = torch.empty(q.shape, device="cuda"), torch.empty_like(q)
    for b, L in enumerate(lens):
        lo = max(0, L - 2048)
        rows = slice(cu[b], cu[b + 1])
        args = (q[rows], k[b:b + 1, lo:L], v[b:b + 1, lo:L], [0, new_lens[b]], [L - lo], D ** -0.5, W)
        ref[rows], low[rows] = ref_fp32(*args), eager_low(*args)
    del k, v
    torch.cuda.empty_cache()  # the sm_80 subprocess rerun needs the GPU memory back
    assert_2x_rule(out, ref, low, what="attention_prefill 64-bit offsets")


@pytest.mark.cuda
def test_determinism_and_strided_q(kernels):
    q, k, v, cu_t, lens_t, max_q, cu, lens = make_inputs([700, 33], [100, 0], 32, 8, torch.bfloat16, "cuda", 10,
                                                         seed=5)
    first = kernels.attention_prefill(q, k, v, cu_t, lens_t, max_q, 0.09, 0)
    for _ in range(3):
        assert torch.equal(kernels.attention_prefill(q, k, v, cu_t, lens_t, max_q, 0.09, 0), first)
    # q as a view of a fused [T, (Hq + 2 Hkv) D] projection: strided tokens, same result.
    fused = torch.randn(q.shape[0], 48, D, device="cuda", dtype=torch.bfloat16)
    fused[:, :32] = q
    assert torch.equal(kernels.attention_prefill(fused[:, :32], k, v, cu_t, lens_t, max_q, 0.09, 0), first)


@pytest.mark.cuda
def test_graph_capture(kernels):
    q, k, v, cu_t, lens_t, max_q, _, _ = make_inputs([200, 5], [0, 60], 32, 8, torch.bfloat16, "cuda", 0, seed=9)
    eager = kernels.attention_prefill(q, k, v, cu_t, lens_t, max_q, D ** -0.5, 0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.attention_prefill(q, k, v, cu_t, lens_t, max_q, D ** -0.5, 0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.cuda
def test_opcheck_and_errors(kernels):
    q, k, v, cu_t, lens_t, max_q, _, _ = make_inputs([20, 3], [5, 0], 32, 8, torch.bfloat16, "cuda", 4, seed=2)
    assert kernels.has_cuda_kernel("attention_prefill")
    torch.library.opcheck(torch.ops.mixtral_ext.attention_prefill.default, (q, k, v, cu_t, lens_t, max_q, 0.1, 0))
    torch.library.opcheck(torch.ops.mixtral_ext.attention_prefill.default, (q, k, v, cu_t, lens_t, max_q, 0.1, 9))
    op = torch.ops.mixtral_ext.attention_prefill
    with pytest.raises(RuntimeError, match="only head_dim 128"):
        op(q[..., :64], k[..., :64], v[..., :64], cu_t, lens_t, max_q, 0.1, 0)
    with pytest.raises(RuntimeError, match="multiple of the cache's KV heads"):
        op(q[:, :30], k, v, cu_t, lens_t, max_q, 0.1, 0)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be"):
        op(q, k, v, cu_t.long(), lens_t, max_q, 0.1, 0)
    with pytest.raises(RuntimeError, match="k_cache must be"):
        op(q, k.half(), v, cu_t, lens_t, max_q, 0.1, 0)


@pytest.mark.cuda
def test_each_path_in_a_subprocess():
    """The path is chosen once per process. On Hopper this process ran the sm_90a kernel (auto); a child reruns
    every GPU test here with the sm_80 kernel forced, and a second child forces sm90 on a few tests, which fails if
    the build lacks the sm_90a kernel (auto would then have quietly tested the sm_80 kernel twice)."""
    import mixtral_ext

    if os.environ.get("MIXTRAL_EXT_ATTN_PATH") or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("runs from a default-path process on a Hopper GPU")
    assert mixtral_ext.HAS_CUDA_KERNELS, mixtral_ext.EXTENSION_STATUS
    for path, select in [("sm80", "not subprocess"), ("sm90", "mixed_batch or opcheck")]:
        env = dict(os.environ, MIXTRAL_EXT_ATTN_PATH=path)
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "cuda", "-p", "no:cacheprovider",
                              "-k", select, __file__], env=env, capture_output=True, text=True, timeout=1800,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert res.returncode == 0, f"MIXTRAL_EXT_ATTN_PATH={path}:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
