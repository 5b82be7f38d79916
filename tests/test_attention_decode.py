"""attention_decode: the reference against transformers' eager attention (CPU, CI) and the CUDA kernel against the
fp32 reference under the 2x rule (GPU): batch x cache-length sweep with ragged lengths, sliding window, forced split
counts (MIXTRAL_EXT_DECODE_SPLITS), empty sequences, graph replay with changing lengths, determinism, opcheck.

In the GPU tests every cache slot the query must not see holds NaN: the kernel must never let one reach the output
(the references get the same caches with those slots zeroed)."""
import math

import pytest
import torch

from attention_decode_inputs import make_inputs
from conftest import backend_cases
from mixtral_ext import ops, reference
from numerics import assert_2x_rule


def visible_mask(lens, S, window):
    """[B, S] bool, spelled independently of the reference: slot j is seen by the query at p = len - 1 iff
    j <= p and (window == 0 or p - j < window)."""
    j = torch.arange(S, device=lens.device)[None, :]
    p = lens.long()[:, None] - 1
    mask = j <= p
    if window > 0:
        mask &= (p - j) < window
    return mask


class _Module(torch.nn.Module):
    """What eager_attention_forward reads from the attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("B,S,Hq,Hkv,D,lens,window", [
    (1, 1, 4, 2, 16, [1], 0),
    (3, 40, 32, 8, 128, [40, 1, 17], 0),
    (3, 40, 32, 8, 128, [40, 1, 17], 5),
    (2, 64, 8, 8, 32, [64, 30], 0),
    (2, 64, 8, 1, 64, [33, 64], 64),
])
@pytest.mark.usefixtures("cpu_impl")
def test_reference_matches_transformers_eager(B, S, Hq, Hkv, D, lens, window):
    # Imported here, not at module level: a transformers without it must not stop the GPU tests from being collected.
    from transformers.models.mixtral.modeling_mixtral import eager_attention_forward

    q, k, v, seq_lens = make_inputs(B, S, Hq, Hkv, D, lens, seed=S + D)
    scale = 1 / math.sqrt(D)
    out = ops.attention_decode(q, k, v, seq_lens, scale, window)
    mask = torch.zeros(B, 1, 1, S)
    mask.masked_fill_(~visible_mask(seq_lens, S, window)[:, None, None, :], torch.finfo(torch.float32).min)
    hf, _ = eager_attention_forward(_Module(Hq // Hkv).eval(), q[:, :, None, :], k.transpose(1, 2),
                                    v.transpose(1, 2), mask, scale)  # [B, 1, Hq, D]
    torch.testing.assert_close(out, hf[:, 0], rtol=1e-5, atol=1e-5)


def test_opcheck_cpu():
    q, k, v, seq_lens = make_inputs(2, 8, 4, 2, 16, [8, 3])
    torch.library.opcheck(torch.ops.mixtral_ext.attention_decode.default, (q, k, v, seq_lens, 0.25, 0))
    torch.library.opcheck(torch.ops.mixtral_ext.attention_decode.default, (q, k, v, seq_lens, 0.25, 2))


# ---- the kernel: on the GPU, and its source emulated on the CPU (reduced lengths) -----------------------------

def poison(k, v, lens, window):
    """NaN into every slot no query may see: past each length and, with a window, before its start."""
    for b, L in enumerate(lens.tolist()):
        k[b, L:] = float("nan")
        v[b, L:] = float("nan")
        if window > 0 and L > window:
            k[b, :L - window] = float("nan")
            v[b, :L - window] = float("nan")


def eager_low(q, k, v, lens, scale, window):
    """The same attention as bf16/fp16 eager PyTorch does it (transformers' eager path): matmuls in the low dtype,
    softmax in fp32 rounded back to the low dtype."""
    B, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    s = torch.einsum("bhgd,bshd->bhgs", q.view(B, Hkv, Hq // Hkv, D), k) * scale
    s = s.float().masked_fill(~visible_mask(lens, S, window)[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.einsum("bhgs,bshd->bhgd", p, v).reshape(B, Hq, D)


def check_against_reference(out, q, k, v, lens, scale, window, what, chunk=8):
    """2x rule per batch chunk (keeps the fp32 copies of a 32k cache small); rows with length 0 must be zero."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    empty = lens == 0
    assert torch.count_nonzero(out[empty]) == 0, f"{what}: a sequence of length 0 must give zeros"
    for b0 in range(0, q.shape[0], chunk):
        sl = slice(b0, b0 + chunk)
        keep = ~empty[sl]
        if not keep.any():
            continue
        kc, vc = torch.nan_to_num(k[sl][keep]), torch.nan_to_num(v[sl][keep])
        qc, lc = q[sl][keep], lens[sl][keep]
        ref = reference.attention_decode(qc.float(), kc.float(), vc.float(), lc, scale, window)
        low = eager_low(qc, kc, vc, lc, scale, window)
        assert_2x_rule(out[sl][keep], ref, low, what=f"{what} rows {b0}..")


def ragged(B, L, seed):
    """B lengths in [1, L], the first exactly L (the cache is sized for it), the others random."""
    g = torch.Generator().manual_seed(seed)
    return [L] + torch.randint(1, L + 1, (B - 1,), generator=g).tolist()


MIXTRAL = dict(Hq=32, Hkv=8, D=128)


@pytest.mark.parametrize("kern, case", backend_cases(
    [(B, L, W) for B in (1, 3, 16, 64) for L in (1, 2, 100, 4095, 4096, 32768) for W in (1000,)],
    [(1, 1, 0), (3, 15, 0), (2, 64, 0), (3, 65, 16), (2, 200, 100)]), indirect=["kern"])
def test_kernel_sweep(kern, case):
    """The issue's grid (bf16, Mixtral heads), ragged lengths, each with the window off and (where it can matter:
    lengths above it) on."""
    B, L, W = case
    lens = ragged(B, L, seed=B * 7 + L)
    q, k, v, seq_lens = make_inputs(B, L, **MIXTRAL, lens=lens, dtype=torch.bfloat16, device=kern.device,
                                    seed=B + L)
    poison(k, v, seq_lens, 0)
    scale = 1 / math.sqrt(128)
    for window in ((0, W) if 0 < W < L else (0,)):
        out = kern.attention_decode(q, k, v, seq_lens, scale, window)
        check_against_reference(out, q, k, v, seq_lens, scale, window, f"B={B} L={L} W={window}")


@pytest.mark.parametrize("kern, case", backend_cases([(3, 100), (16, 4096), (1, 32768)], [(3, 100)]),
                         indirect=["kern"])
def test_kernel_fp16(kern, case):
    B, L = case
    lens = ragged(B, L, seed=L)
    q, k, v, seq_lens = make_inputs(B, L, **MIXTRAL, lens=lens, dtype=torch.float16, device=kern.device, seed=L)
    poison(k, v, seq_lens, 0)
    out = kern.attention_decode(q, k, v, seq_lens, 1 / math.sqrt(128), 0)
    check_against_reference(out, q, k, v, seq_lens, 1 / math.sqrt(128), 0, f"fp16 B={B} L={L}")


@pytest.mark.parametrize("kern, case", backend_cases(
    [(w, [5000, 4097, 38, 1]) for w in (1, 3, 37, 4096)], [(w, [300, 201, 38, 1]) for w in (1, 3, 37, 200)]),
    indirect=["kern"])
def test_kernel_sliding_window_never_reads_outside(kern, case):
    """Slots before the window start hold NaN too: whole splits fall outside the window and must add nothing."""
    window, lens = case
    B, S = len(lens), lens[0]
    q, k, v, seq_lens = make_inputs(B, S, **MIXTRAL, lens=lens, dtype=torch.bfloat16, device=kern.device,
                                    seed=window)
    poison(k, v, seq_lens, window)
    out = kern.attention_decode(q, k, v, seq_lens, 0.088, window, splits=4 if kern.name != "cuda" else 0)
    check_against_reference(out, q, k, v, seq_lens, 0.088, window, f"W={window}")


@pytest.mark.parametrize("kern, case", backend_cases(
    [(n, [3000, 2999, 31, 33, 1000], w) for n in (1, 2, 3, 17, 64) for w in (0, 700)],
    [(n, [300, 299, 31, 33, 100], w) for n in (1, 2, 3, 17) for w in (0, 70)]), indirect=["kern"])
def test_kernel_forced_splits(kern, case):
    """Every split count gives the reference's answer, including splits left empty by short sequences."""
    splits, lens, window = case
    B, S = len(lens), lens[0]
    q, k, v, seq_lens = make_inputs(B, S, **MIXTRAL, lens=lens, dtype=torch.bfloat16, device=kern.device,
                                    seed=splits)
    poison(k, v, seq_lens, window)
    out = kern.attention_decode(q, k, v, seq_lens, 0.088, window, splits=splits)
    check_against_reference(out, q, k, v, seq_lens, 0.088, window, f"splits={splits} W={window}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (16, 8), (8, 2), (16, 2)])
@pytest.mark.parametrize("kern, lens", backend_cases([[700, 1, 333]], [[150, 1, 67]]), indirect=["kern"])
def test_kernel_other_group_sizes_and_head_dims(kern, lens, Hq, Hkv, D, dtype):
    """Every compiled (D, G = Hq / Hkv) specialisation, in both dtypes; these lengths give several splits."""
    B, S = len(lens), lens[0]
    q, k, v, seq_lens = make_inputs(B, S, Hq, Hkv, D, lens, dtype=dtype, device=kern.device, seed=Hq + D)
    poison(k, v, seq_lens, 0)
    out = kern.attention_decode(q, k, v, seq_lens, 1 / math.sqrt(D), 0, splits=3 if kern.name != "cuda" else 0)
    check_against_reference(out, q, k, v, seq_lens, 1 / math.sqrt(D), 0, f"Hq={Hq} Hkv={Hkv} D={D} {dtype}")


@pytest.mark.parametrize("kern, lens", backend_cases([[2048, 0, 1, 0, 1500, 2]], [[300, 0, 1, 0, 200, 2]]),
                         indirect=["kern"])
def test_kernel_outlier_logits_and_empty_sequences(kern, lens):
    """Large scores (a peaked softmax: the running max must be right) and sequences of length 0 (zero rows)."""
    B, S = len(lens), lens[0]
    q, k, v, seq_lens = make_inputs(B, S, **MIXTRAL, lens=lens, dtype=torch.bfloat16, device=kern.device, seed=11,
                                    q_scale=25.0)
    poison(k, v, seq_lens, 0)
    for window in (0, 64):
        out = kern.attention_decode(q, k, v, seq_lens, 1 / math.sqrt(128), window)
        check_against_reference(out, q, k, v, seq_lens, 1 / math.sqrt(128), window, f"outliers W={window}")


@pytest.mark.cuda
@pytest.mark.parametrize("B,S", [(1, 32768), (16, 4096), (64, 512)])
def test_kernel_graph_replay_with_changing_lengths(kernels, B, S):
    """Captured once; seq_lens updated in place between replays (as the decode loop does) must give exactly the
    eager kernel's result for the new lengths (same split count: it depends on shapes only)."""
    q, k, v, seq_lens = make_inputs(B, S, **MIXTRAL, lens=[S] * B, dtype=torch.bfloat16, device="cuda", seed=B)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernels.attention_decode(q, k, v, seq_lens, 0.088, 0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.attention_decode(q, k, v, seq_lens, 0.088, 0)
    gen = torch.Generator().manual_seed(S)
    for step, kind in enumerate(["full", "short", "ragged", "grow"]):
        if kind == "full":
            new = [S] * B
        elif kind == "short":
            new = [1 + step] * B
        elif kind == "ragged":
            new = torch.randint(0, S + 1, (B,), generator=gen).tolist()
        else:
            new = [min(S, x + 97) for x in new]
        seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
        q.normal_()
        g.replay()
        eager = kernels.attention_decode(q, k, v, seq_lens, 0.088, 0)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"replay {step} ({kind}) differs from eager"
        check_against_reference(out, q, k, v, seq_lens, 0.088, 0, f"graph B={B} {kind}")


@pytest.mark.cuda
def test_kernel_deterministic(kernels):
    q, k, v, seq_lens = make_inputs(2, 8192, **MIXTRAL, lens=[8192, 5000], dtype=torch.bfloat16, device="cuda")
    first = kernels.attention_decode(q, k, v, seq_lens, 0.088, 0)
    for _ in range(3):
        assert torch.equal(kernels.attention_decode(q, k, v, seq_lens, 0.088, 0), first)


@pytest.mark.cuda
def test_kernel_opcheck_and_errors(kernels):
    assert kernels.has_cuda_kernel("attention_decode")
    q, k, v, seq_lens = make_inputs(2, 300, **MIXTRAL, lens=[300, 7], dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.mixtral_ext.attention_decode.default, (q, k, v, seq_lens, 0.088, 0))
    torch.library.opcheck(torch.ops.mixtral_ext.attention_decode.default, (q, k, v, seq_lens, 0.088, 16))
    op = torch.ops.mixtral_ext.attention_decode
    with pytest.raises(RuntimeError, match="seq_lens must be Int"):
        op(q, k, v, seq_lens.long(), 0.088, 0)
    with pytest.raises(RuntimeError, match="k_cache has 1 sequences"):
        op(q, k[:1], v[:1], seq_lens, 0.088, 0)
    with pytest.raises(RuntimeError, match="unsupported shape"):
        op(q[..., :96].contiguous(), k[..., :96].contiguous(), v[..., :96].contiguous(), seq_lens, 0.088, 0)
    with pytest.raises(RuntimeError, match="multiple of the cache's KV heads"):
        op(q[:, :12].contiguous(), k, v, seq_lens, 0.088, 0)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        op(q, k, v, seq_lens, 0.088, -1)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        op(torch.cat([q, q], dim=-1)[..., :128], k, v, seq_lens, 0.088, 0)
    with pytest.raises(RuntimeError, match="v_cache must be contiguous"):
        op(q, k, torch.cat([v, v], dim=-1)[..., :128], seq_lens, 0.088, 0)
    with pytest.raises(RuntimeError, match="q and seq_lens are on different devices"):
        op(q, k, v, seq_lens.cpu(), 0.088, 0)
    with pytest.raises(RuntimeError, match="k_cache shape .* differs from v_cache"):
        op(q, k, v[:, :, :4].contiguous(), seq_lens, 0.088, 0)
    with pytest.raises(RuntimeError, match="v_cache must be BFloat16"):
        op(q, k, v.half(), seq_lens, 0.088, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("value", ["four", "0", "65"])
def test_kernel_bad_decode_splits_switch_is_an_error(kernels, monkeypatch, value):
    """MIXTRAL_EXT_DECODE_SPLITS outside 1..64 (or not a number) is an error naming the variable, never ignored."""
    q, k, v, seq_lens = make_inputs(2, 300, **MIXTRAL, lens=[300, 7], dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("MIXTRAL_EXT_DECODE_SPLITS", value)
    with pytest.raises(RuntimeError, match=f"MIXTRAL_EXT_DECODE_SPLITS must be an integer from 1 to 64 .*'{value}'"):
        torch.ops.mixtral_ext.attention_decode(q, k, v, seq_lens, 0.088, 0)
