"""rope_kv_append: the reference against transformers' Mixtral rotary embedding (CPU, CI) and the CUDA kernel against
the reference (GPU): rotated q and k and the copied v bit-exact (the kernel rounds every fp32 product and sum
separately, in the reference's order), written exactly at (seq_ids, positions), nothing else in the caches touched."""
import pytest
import torch

from conftest import backend_cases, backends
from mixtral_ext import ops, reference


def make_inputs(T, Hq, Hkv, D, B, S, dtype=torch.float32, device="cpu", seed=0, P=None):
    """Random qkv [T, (Hq + 2 Hkv) D], distinct (seq, pos) slots for the T tokens, random caches [B, S, Hkv, D]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g) * 2
    slots = torch.randperm(B * S, generator=g)[:T]  # distinct slots: the reference's index_put has no duplicates
    seq_ids, positions = (slots // S).to(torch.int32), (slots % S).to(torch.int32)
    k_cache = torch.randn(B, S, Hkv, D, generator=g)
    v_cache = torch.randn(B, S, Hkv, D, generator=g)
    cos_sin = reference.rope_cos_sin(P or S, D, 1e6)
    to = dict(device=device)
    return (qkv.to(dtype=dtype, **to), positions.to(**to), seq_ids.to(**to), cos_sin.to(**to),
            k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to))


@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("D,theta", [(128, 1e6), (16, 1e4), (64, 1e6)])
def test_reference_matches_transformers(D, theta):
    # Imported here, not at module level: a transformers without these must not stop the GPU tests from being
    # collected.
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb

    Hq, Hkv, B, S, T = 4, 2, 3, 50, 17
    cfg = MixtralConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                        rope_theta=theta, max_position_embeddings=S)
    qkv, positions, seq_ids, _, k_cache, v_cache = make_inputs(T, Hq, Hkv, D, B, S, seed=D)
    cos_sin = reference.rope_cos_sin(S, D, theta)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = ops.rope_kv_append(qkv, positions, seq_ids, cos_sin, k_cache, v_cache)

    q, k, v = qkv.view(T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
    rot = MixtralRotaryEmbedding(cfg)
    cos, sin = rot(qkv, positions.long()[None])  # [1, T, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)  # [1, h, T, D]
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    written = torch.zeros(B, S, dtype=torch.bool)
    written[seq_ids.long(), positions.long()] = True
    torch.testing.assert_close(k_cache[seq_ids.long(), positions.long()], k_hf[0].transpose(0, 1), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(v_cache[seq_ids.long(), positions.long()], v)
    assert torch.equal(k_cache[~written], k0[~written]) and torch.equal(v_cache[~written], v0[~written])


def test_reference_table_matches_transformers():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    D, P = 128, 4096
    cfg = MixtralConfig(head_dim=D, rope_theta=1e6, max_position_embeddings=P)
    cos, sin = MixtralRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(P)[None])
    table = reference.rope_cos_sin(P, D, 1e6)
    torch.testing.assert_close(table[:, :D // 2], cos[0, :, :D // 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(table[:, D // 2:], sin[0, :, :D // 2], rtol=0, atol=1e-6)


def test_opcheck_cpu():
    args = make_inputs(5, 4, 2, 16, 2, 8)
    torch.library.opcheck(torch.ops.mixtral_ext.rope_kv_append.default, args)


def run_both(kernels, args):
    """(kernel q, k_cache, v_cache) and (reference q, k_cache, v_cache) from the same inputs, caches cloned."""
    qkv, positions, seq_ids, cos_sin, k_cache, v_cache = args
    kc, vc, rk, rv = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    q = kernels.rope_kv_append(qkv, positions, seq_ids, cos_sin, kc, vc)
    q_ref = reference.rope_kv_append(qkv, positions, seq_ids, cos_sin, rk, rv)
    return (q, kc, vc), (q_ref, rk, rv)


def assert_exact(ours, ref, what):
    for name, a, b in zip(("q", "k_cache", "v_cache"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {name}: {a.dtype}{tuple(a.shape)}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{what} {name}: {m}")


# ---- the kernel: on the GPU, and its source emulated on the CPU ---------------------------------------------------

CASES = [  # T, Hq, Hkv, D, B, S
    (1, 32, 8, 128, 1, 1),        # one decode token into a one-slot cache
    (3, 32, 8, 128, 3, 4096),     # decode, batch 3
    (64, 32, 8, 128, 64, 100),    # decode, batch 64
    (1000, 32, 8, 128, 2, 600),   # prefill-sized
    (7, 4, 2, 16, 3, 9),          # tiny model config (D = 16: one 16-byte vector per half)
    (5, 3, 1, 6, 2, 7),           # D / 2 = 3: scalar path
]
# The emulator runs every thread on the CPU: the same paths at fewer tokens.
EMU_CASES = [(1, 32, 8, 128, 1, 1), (3, 32, 8, 128, 3, 300), (37, 32, 8, 128, 4, 20), (7, 4, 2, 16, 3, 9),
             (5, 3, 1, 6, 2, 7)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kern, case", backend_cases(CASES, EMU_CASES), indirect=["kern"])
def test_kernel_matches_reference_exactly(kern, dtype, case):
    T, Hq, Hkv, D, B, S = case
    args = make_inputs(T, Hq, Hkv, D, B, S, dtype=dtype, device=kern.device, seed=T + D)
    ours, ref = run_both(kern, args)
    assert_exact(ours, ref, f"rope_kv_append {dtype} T={T} D={D}")


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_kernel_unaligned_scalar_path(kern):
    """qkv at an odd element offset (contiguous, not 16-byte aligned) takes the scalar path; same results."""
    T, Hq, Hkv, D = 9, 32, 8, 128
    args = list(make_inputs(T, Hq, Hkv, D, 2, 20, dtype=torch.bfloat16, device=kern.device, seed=3))
    buf = torch.empty(args[0].numel() + 1, dtype=torch.bfloat16, device=kern.device)
    args[0] = buf[1:].view(T, -1).copy_(args[0])
    assert args[0].is_contiguous() and args[0].data_ptr() % 16 != 0
    ours, ref = run_both(kern, args)
    assert_exact(ours, ref, "rope_kv_append unaligned")


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_kernel_table_longer_than_cache_and_shared_positions(kern):
    """P > S, several sequences at the same position (the decode step), positions near the end of the table."""
    T, Hq, Hkv, D, B, S = 16, 32, 8, 128, 16, 64
    dev = kern.device
    qkv, _, _, _, k_cache, v_cache = make_inputs(T, Hq, Hkv, D, B, S, dtype=torch.bfloat16, device=dev)
    positions = torch.full((T,), S - 1, dtype=torch.int32, device=dev)
    positions[::3] = 5
    seq_ids = torch.arange(T, dtype=torch.int32, device=dev).flip(0)
    cos_sin = reference.rope_cos_sin(32768, D, 1e6, device=dev)
    ours, ref = run_both(kern, (qkv, positions, seq_ids, cos_sin, k_cache, v_cache))
    assert_exact(ours, ref, "rope_kv_append shared positions")


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_kernel_skips_out_of_range_tokens(kern):
    """Tokens whose position is outside [0, min(P, S)) or whose sequence is outside [0, B) write nothing to the
    caches and get a zero q row; the other tokens are unaffected."""
    T, Hq, Hkv, D, B, S = 8, 32, 8, 128, 3, 50
    dev = kern.device
    qkv, positions, seq_ids, cos_sin, k_cache, v_cache = make_inputs(T, Hq, Hkv, D, B, S, dtype=torch.bfloat16,
                                                                     device=dev, P=40)
    bad = torch.tensor([1, 3, 4, 6], device=dev)
    positions, seq_ids = positions.clone(), seq_ids.clone()
    positions[bad[:2]] = torch.tensor([-1, 45], dtype=torch.int32, device=dev)  # 45: inside S, past P
    seq_ids[bad[2:]] = torch.tensor([3, -2], dtype=torch.int32, device=dev)
    good = torch.tensor([0, 2, 5, 7], device=dev)
    positions[good] = torch.tensor([0, 39, 10, 11], dtype=torch.int32, device=dev)
    seq_ids[good] = torch.tensor([0, 2, 1, 1], dtype=torch.int32, device=dev)
    kc, vc = k_cache.clone(), v_cache.clone()
    q = kern.rope_kv_append(qkv, positions, seq_ids, cos_sin, kc, vc)
    rk, rv = k_cache.clone(), v_cache.clone()
    q_ref = reference.rope_kv_append(qkv[good], positions[good], seq_ids[good], cos_sin, rk, rv)
    if kern.name == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(kc, rk) and torch.equal(vc, rv), "caches differ: an out-of-range token was written"
    assert torch.equal(q[good], q_ref)
    assert torch.count_nonzero(q[bad]) == 0


@pytest.mark.cuda
def test_kernel_graph_capture_with_changing_positions(kernels):
    T, Hq, Hkv, D, B, S = 4, 32, 8, 128, 4, 256
    qkv, positions, seq_ids, cos_sin, k_cache, v_cache = make_inputs(T, Hq, Hkv, D, B, S, dtype=torch.bfloat16,
                                                                     device="cuda")
    seq_ids.copy_(torch.arange(T, dtype=torch.int32))
    kc, vc = k_cache.clone(), v_cache.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        kernels.rope_kv_append(qkv, positions, seq_ids, cos_sin, kc, vc)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q = kernels.rope_kv_append(qkv, positions, seq_ids, cos_sin, kc, vc)
    rk, rv = kc.clone(), vc.clone()
    for step in range(3):
        positions.copy_(torch.tensor([10 + step, 200 + step, 0 + step, 255 - step], dtype=torch.int32))
        qkv.normal_()
        g.replay()
        q_ref = reference.rope_kv_append(qkv, positions, seq_ids, cos_sin, rk, rv)
        torch.cuda.synchronize()
        assert torch.equal(q, q_ref) and torch.equal(kc, rk) and torch.equal(vc, rv), f"replay {step}"


@pytest.mark.cuda
def test_kernel_opcheck_and_errors(kernels):
    assert kernels.has_cuda_kernel("rope_kv_append")
    args = make_inputs(6, 32, 8, 128, 2, 16, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.mixtral_ext.rope_kv_append.default, args)
    qkv, positions, seq_ids, cos_sin, k_cache, v_cache = args
    op = torch.ops.mixtral_ext.rope_kv_append
    with pytest.raises(RuntimeError, match="positions must be Int"):
        op(qkv, positions.long(), seq_ids, cos_sin, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="cos_sin must be Float"):
        op(qkv, positions, seq_ids, cos_sin.bfloat16(), k_cache, v_cache)
    with pytest.raises(RuntimeError, match="k_cache must be BFloat16"):
        op(qkv, positions, seq_ids, cos_sin, k_cache.half(), v_cache)
    with pytest.raises(RuntimeError, match="qkv width"):
        op(qkv[:, :-1].contiguous(), positions, seq_ids, cos_sin, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="seq_ids has 5 entries"):
        op(qkv, positions, seq_ids[:5], cos_sin, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="k_cache must be contiguous"):
        op(qkv, positions, seq_ids, cos_sin, torch.cat([k_cache, k_cache], dim=-1)[..., :128], v_cache)
    with pytest.raises(RuntimeError, match="qkv and positions are on different devices"):
        op(qkv, positions.cpu(), seq_ids, cos_sin, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="k_cache shape .* differs from v_cache"):
        op(qkv, positions, seq_ids, cos_sin, k_cache, v_cache[:1].contiguous())
    with pytest.raises(RuntimeError, match="cos_sin must be \\[P, D = 128\\]"):
        op(qkv, positions, seq_ids, cos_sin[:, :64].contiguous(), k_cache, v_cache)
