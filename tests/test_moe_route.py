"""moe_route: the reference against transformers' router math and an independent loop (CPU, CI), and the CUDA
kernel against the reference (GPU): ids, counts, offsets and permutations exact, weights within 1e-6."""
import pytest
import torch

from conftest import backend_cases, backends
from mixtral_ext import ops, reference

OUT_NAMES = ["topk_weights", "topk_ids", "expert_counts", "expert_offsets", "sorted_tokens", "token_rows"]


def independent_route(logits, k):
    """A plain-Python statement of the contract (small T only): the tie rule, the row order, the inverse."""
    T, E = logits.shape
    lf = logits.float()
    ids, weights = [], []
    for t in range(T):
        row = lf[t].tolist()
        order = sorted(range(E), key=lambda e: (-row[e], e))[:k]  # descending, ties toward the lower index
        ex = [torch.exp(torch.tensor(row[e] - row[order[0]], dtype=torch.float64)).item() for e in order]
        ids.append(order)
        weights.append([v / sum(ex) for v in ex])
    rows = [(ids[t][s], t, s) for t in range(T) for s in range(k)]
    rows.sort(key=lambda r: (r[0], r[1]))  # grouped by expert, tokens ascending
    counts = [sum(1 for r in rows if r[0] == e) for e in range(E)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    token_rows = [[0] * k for _ in range(T)]
    for i, (_, t, s) in enumerate(rows):
        token_rows[t][s] = i
    return weights, ids, counts, offsets, [r[1] for r in rows], token_rows


def check_invariants(out, T, E, k):
    w, ids, counts, offsets, sorted_tokens, token_rows = [o.cpu() for o in out]
    assert w.dtype == torch.float32 and w.shape == (T, k)
    for t_, shape in zip(out[1:], [(T, k), (E,), (E + 1,), (T * k,), (T, k)]):
        assert t_.dtype == torch.int32 and tuple(t_.shape) == shape
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=E).int())
    assert offsets[0] == 0 and torch.equal(offsets[1:], torch.cumsum(counts, 0).int())
    flat = ids.reshape(-1).long()
    rows = token_rows.reshape(-1).long()
    assert torch.equal(torch.sort(rows).values, torch.arange(T * k)), "token_rows must be a permutation"
    assert torch.equal(sorted_tokens[rows].long(), torch.arange(T * k) // k), "sorted_tokens[token_rows] != token"
    for e in range(E):
        seg = sorted_tokens[offsets[e]:offsets[e + 1]].long()
        assert torch.all(seg[1:] > seg[:-1]), f"tokens of expert {e} not strictly ascending"
        assert torch.all(flat.view(T, k)[seg].eq(e).any(dim=1)), f"rows of expert {e} hold tokens that did not pick it"
    if T:
        torch.testing.assert_close(w.sum(-1), torch.ones(T), rtol=0, atol=1e-6)


# ---- CPU: the reference ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("cpu_impl")
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (7, 8, 2), (33, 8, 1), (64, 16, 2), (129, 8, 2), (50, 64, 4)])
def test_reference_matches_transformers_router(T, E, k):
    """transformers' MixtralTopKRouter (softmax in fp32, topk, renormalise) on the same hidden states."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=E, num_experts_per_tok=k,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    router = MixtralTopKRouter(cfg)
    g = torch.Generator().manual_seed(T * 100 + E + k)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 32, generator=g))
        hidden = torch.randn(T, 32, generator=g)
        logits, scores, indices = router(hidden)
    out = ops.moe_route(logits, k)
    assert torch.equal(out.topk_ids.long(), indices), "random logits have no ties: ids must agree exactly"
    torch.testing.assert_close(out.topk_weights, scores, rtol=0, atol=1e-6)
    check_invariants(out, T, E, k)


@pytest.mark.parametrize("T,E,k,ties", [(1, 8, 2, False), (5, 8, 2, True), (40, 8, 1, True), (31, 16, 2, False),
                                        (17, 64, 4, True), (9, 3, 3, True)])
def test_reference_matches_independent_loop(T, E, k, ties):
    g = torch.Generator().manual_seed(T + 7 * E + k)
    logits = torch.randint(-2, 3, (T, E), generator=g).float() if ties else torch.randn(T, E, generator=g) * 4
    out = reference.moe_route(logits, k)
    weights, ids, counts, offsets, sorted_tokens, token_rows = independent_route(logits, k)
    assert out[1].tolist() == ids
    assert out[2].tolist() == counts and out[3].tolist() == offsets
    assert out[4].tolist() == sorted_tokens and out[5].tolist() == token_rows
    torch.testing.assert_close(out[0].double(), torch.tensor(weights, dtype=torch.float64), rtol=0, atol=1e-6)
    check_invariants(out, T, E, k)


def test_reference_tie_rule_lower_index_first():
    # Every logit equal: the k lowest expert indices, equal weights.
    out = reference.moe_route(torch.full((3, 8), 0.25), 2)
    assert out[1].tolist() == [[0, 1]] * 3
    torch.testing.assert_close(out[0], torch.full((3, 2), 0.5))
    # A tie for second place between experts 6 and 2: expert 2 wins.
    logits = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 3.0]])
    assert reference.moe_route(logits, 2)[1].tolist() == [[7, 2]]


def test_reference_empty_and_skewed():
    out = reference.moe_route(torch.zeros(0, 8), 2)
    assert out[2].tolist() == [0] * 8 and out[3].tolist() == [0] * 9 and out[4].numel() == 0
    logits = torch.randn(20, 8)
    logits[:, 3] += 30  # every token picks expert 3, then one other; expert 0 pushed out everywhere
    logits[:, 0] -= 30
    out = reference.moe_route(logits, 2)
    assert out[2][3] == 20 and out[2][0] == 0
    check_invariants(out, 20, 8, 2)


def test_reference_nonfinite_order():
    """NaN ranks above every number (torch.sort's order, as transformers' torch.topk), NaNs among themselves by
    index; a row holding NaN or +inf has NaN weights. The kernel is held to exactly this."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, nan, 3.0, 2.0], [nan, 1.0, nan, 5.0], [inf, 0.0, 2.0, inf], [0.0, -inf, 1.0, -inf]])
    w, ids = reference.moe_route(logits, 2)[:2]
    assert ids.tolist() == [[1, 2], [0, 2], [0, 3], [2, 0]]
    assert torch.isnan(w[:3]).all() and not torch.isnan(w[3]).any()
    assert torch.topk(logits[:1], 2).indices.tolist() == [[1, 2]]  # topk (transformers) also ranks NaN first


def test_opcheck_cpu():
    logits = torch.randn(9, 8)
    torch.library.opcheck(torch.ops.mixtral_ext.moe_route.default, (logits, 2))
    torch.library.opcheck(torch.ops.mixtral_ext.moe_route.default, (logits.bfloat16(), 1))


def test_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mixtral_ext::moe_route", "CompositeExplicitAutograd")


# ---- the kernel: on the GPU, and its source emulated on the CPU ---------------------------------------------------

GPU_T = [1, 2, 3, 8, 63, 64, 65, 257, 1024, 2000, 4096, 4097, 16384]  # 2000: one block, a partial second tile
# The emulator states the launch path it expects: one block up to 4096 tokens, count / scan / scatter above.
EMU_T = [(1, "single"), (3, "single"), (65, "single"), (257, "single"), (2000, "single"), (4097, "multi")]


def _path(T):
    return "single" if T <= 4096 else "multi"


def assert_matches_reference(out, logits, k, what):
    ref = reference.moe_route(logits.cpu(), k)
    T, E = logits.shape
    for name, a, b in zip(OUT_NAMES, out, ref):
        assert a.device == logits.device, f"{what}: {name} on {a.device}, the logits on {logits.device}"
        if name == "topk_weights":
            assert not torch.isnan(a).any(), f"{what}: NaN weights"
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {name}: {m}")
        else:
            assert a.dtype == torch.int32 and a.shape == b.shape, f"{what}: {name} {a.dtype} {tuple(a.shape)}"
            assert torch.equal(a.cpu(), b), f"{what}: {name} differs from the reference"
    check_invariants(out, T, E, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 1), (16, 2)])
@pytest.mark.parametrize("kern, case", backend_cases([(T, "auto") for T in GPU_T], EMU_T), indirect=["kern"])
def test_kernel_matches_reference(kern, case, E, k, dtype):
    T, path = case
    torch.manual_seed(T * 31 + E * 3 + k)
    logits = (torch.randn(T, E, device=kern.device) * 2).to(dtype)
    out = kern.moe_route(logits, k, path=path)
    assert_matches_reference(out, logits, k, f"T={T} E={E} k={k} {dtype}")


GENERIC = [(1, 64, 4, torch.float16), (300, 64, 4, torch.bfloat16), (5000, 64, 3, torch.float32),
           (4096, 2, 2, torch.float16), (70, 5, 3, torch.float32), (10, 1, 1, torch.float32),
           (9000, 33, 4, torch.bfloat16)]


@pytest.mark.parametrize("kern, case", backend_cases(GENERIC, [c for c in GENERIC if c[0] < 9000]), indirect=["kern"])
def test_kernel_generic_sizes(kern, case):
    T, E, k, dtype = case
    torch.manual_seed(T + E + k)
    logits = (torch.randn(T, E, device=kern.device) * 3).to(dtype)
    out = kern.moe_route(logits, k, path=_path(T))
    assert_matches_reference(out, logits, k, f"T={T} E={E} k={k} {dtype}")


def adversarial_logits(kind, T, E, dtype, device="cuda"):
    g = torch.Generator(device=device).manual_seed(T + E)
    if kind == "ties":  # few distinct values: ties everywhere, exact in every dtype
        x = torch.randint(-2, 3, (T, E), device=device, generator=g).float()
    elif kind == "outliers":  # +-30 outliers (finite): weights underflow towards 0 but never NaN
        x = torch.randn(T, E, device=device, generator=g)
        mask = torch.rand(T, E, device=device, generator=g)
        x = torch.where(mask < 0.1, torch.full_like(x, 30.0), torch.where(mask > 0.9, torch.full_like(x, -30.0), x))
    elif kind == "all_same_two":  # every token on experts 2 and 5
        x = torch.randn(T, E, device=device, generator=g)
        x[:, 2] += 30
        x[:, 5] += 25
    elif kind == "empty_expert":  # nobody picks expert 0 or the last expert
        x = torch.randn(T, E, device=device, generator=g)
        x[:, 0] = -30
        x[:, E - 1] = -30
    elif kind == "all_equal":
        x = torch.full((T, E), 1.5, device=device)
    return x.to(dtype)


@pytest.mark.parametrize("kind", ["ties", "outliers", "all_same_two", "empty_expert", "all_equal"])
@pytest.mark.parametrize("kern, T", backend_cases([1, 3, 64, 257, 4096, 16384], [1, 3, 257, 4097]),
                         indirect=["kern"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 1)])
def test_kernel_adversarial(kern, kind, T, dtype, E, k):
    logits = adversarial_logits(kind, T, E, dtype, device=kern.device)
    out = kern.moe_route(logits, k, path=_path(T))
    assert_matches_reference(out, logits, k, f"{kind} T={T} E={E} k={k} {dtype}")
    if kind == "all_same_two" and k == 2:
        counts = out[2].cpu()
        assert counts[2] == T and counts[5] == T and counts.sum() == 2 * T
    if kind == "empty_expert":
        assert out[2][0].item() == 0 and out[2][E - 1].item() == 0


@pytest.mark.parametrize("kern, T", backend_cases([5, 300, 5000], [5, 300, 5000]), indirect=["kern"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_nonfinite_logits(kern, T, k, dtype):
    """NaN / +inf / -inf logits: ids and permutation exactly the reference's (NaN ranks first), weights equal with
    the same NaN pattern (NaN or +inf in a row makes its softmax NaN; -inf gets weight 0)."""
    E = 8
    g = torch.Generator(device=kern.device).manual_seed(T * 10 + k)
    x = torch.randn(T, E, device=kern.device, generator=g)
    pick = torch.rand(T, E, device=kern.device, generator=g)
    x = torch.where(pick < 0.06, torch.full_like(x, float("nan")), x)
    x = torch.where(pick > 0.97, torch.full_like(x, float("inf")), x)
    x = torch.where((pick > 0.93) & (pick <= 0.97), torch.full_like(x, float("-inf")), x)
    x[0] = torch.tensor([1.0, 0.5, float("nan"), 3.0, 2.0, float("nan"), -1.0, 4.0])  # NaN below larger numbers
    x[1] = torch.arange(E, device=kern.device).float()  # a finite row for certain
    logits = x.to(dtype)
    out = kern.moe_route(logits, k, path=_path(T))
    ref = reference.moe_route(logits.cpu(), k)
    assert torch.isnan(ref[0]).any() and not torch.isnan(ref[0]).all(), "the input must mix NaN and finite rows"
    torch.testing.assert_close(out[0].cpu(), ref[0], rtol=0, atol=1e-6, equal_nan=True)
    for name, a, b in zip(OUT_NAMES[1:], out[1:], ref[1:]):
        assert torch.equal(a.cpu(), b), f"T={T} k={k} {dtype}: {name} differs from the reference"


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_kernel_strided_logits(kern):
    base = torch.randn(100, 8 + 5, device=kern.device, dtype=torch.bfloat16)
    logits = base[:, 2:10]  # rows 13 elements apart
    assert_matches_reference(kern.moe_route(logits, 2), logits.contiguous(), 2, "strided")


@pytest.mark.parametrize("kern", backends(), indirect=True)
def test_kernel_empty(kern):
    out = kern.moe_route(torch.empty(0, 8, device=kern.device), 2)
    assert out[2].tolist() == [0] * 8 and out[3].tolist() == [0] * 9 and out[4].numel() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("T", [8, 4096, 16384])
def test_kernel_deterministic(kernels, T):
    logits = adversarial_logits("ties", T, 8, torch.bfloat16)
    first = kernels.moe_route(logits, 2)
    for _ in range(5):
        again = kernels.moe_route(logits, 2)
        for name, a, b in zip(OUT_NAMES, first, again):
            assert torch.equal(a, b), f"T={T}: {name} differs between runs"


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 64, 8192])
def test_kernel_graph_capture(kernels, T):
    static = torch.randn(T, 8, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, on a side stream as torch recommends
        kernels.moe_route(static, 2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = kernels.moe_route(static, 2)
    fresh = torch.randn(T, 8, device="cuda", dtype=torch.bfloat16)
    static.copy_(fresh)
    g.replay()
    eager = kernels.moe_route(fresh, 2)
    for name, a, b in zip(OUT_NAMES, captured, eager):
        assert torch.equal(a, b), f"T={T}: {name} differs between graph replay and eager"


@pytest.mark.cuda
def test_kernel_opcheck_and_errors(kernels):
    assert kernels.has_cuda_kernel("moe_route")
    for T in (5, 5000):
        torch.library.opcheck(torch.ops.mixtral_ext.moe_route.default,
                              (torch.randn(T, 8, device="cuda", dtype=torch.bfloat16), 2))
    with pytest.raises(RuntimeError, match="experts"):
        torch.ops.mixtral_ext.moe_route(torch.randn(4, 65, device="cuda"), 2)
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.mixtral_ext.moe_route(torch.randn(4, 8, device="cuda"), 5)
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.mixtral_ext.moe_route(torch.randn(4, 2, device="cuda"), 3)
    with pytest.raises(RuntimeError, match="router_logits must be"):
        torch.ops.mixtral_ext.moe_route(torch.randn(4, 8, device="cuda").double(), 2)
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.mixtral_ext.moe_route(torch.randn(2, 4, 8, device="cuda"), 2)
