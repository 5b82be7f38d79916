"""What each kernel supports: the kernels' own `*_supported` predicates (csrc/kernels/*.h, registered for every op by
csrc/op_impl.h define_supported_ops) against the ops' checks and against ops._dispatch's choice.

The emulation build registers the very predicates _C carries (torch.ops.mixtral_emu.*_supported, the same source),
so the boundaries are tested here without a GPU: each one on both sides, the predicate's answer, the emulated op
running on the supported side and refusing the other with a clear error (the op's checks ask the same predicate),
and ops._dispatch sending the unsupported side to the reference.
"""
import glob
import os
import subprocess
import sys

import pytest
import torch

from mixtral_ext import cpu, ops, quant, reference

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def emu_pred(name, *args):
    return torch.ops.mixtral_emu.__getattr__(f"{name}_supported")(*args)


# ---- the predicates' boundaries (the issue's: E 64/65, top-k 4/5, head_dim 64/96 and 128 vs others, group 8/16,
# int4 widths multiples of 128) -------------------------------------------------------------------------------------
BOUNDARIES = [
    # (op, predicate arguments, supported?)
    ("moe_route", (64, 4, BF16), True),
    ("moe_route", (65, 4, BF16), False),
    ("moe_route", (8, 4, F32), True),
    ("moe_route", (8, 5, F32), False),
    ("moe_route", (2, 3, F32), False),  # top_k > E
    ("moe_route", (8, 0, F32), False),
    ("moe_route", (8, 2, torch.float64), False),
    ("attention_decode", (64, 8, 1, BF16), True),
    ("attention_decode", (96, 8, 1, BF16), False),
    ("attention_decode", (128, 32, 4, F16), True),  # group 8
    ("attention_decode", (128, 64, 4, F16), False),  # group 16
    ("attention_decode", (128, 32, 8, F32), False),
    ("attention_decode", (128, 30, 8, BF16), False),  # Hq not a multiple of Hkv
    ("attention_prefill", (128, 32, 8, BF16), True),
    ("attention_prefill", (64, 32, 8, BF16), False),
    ("attention_prefill", (96, 32, 8, BF16), False),
    ("attention_prefill", (256, 32, 8, BF16), False),
    ("attention_prefill", (128, 16, 1, F16), True),  # group 16 divides the 128-row block
    ("attention_prefill", (128, 12, 4, F16), False),  # group 3 does not
    ("attention_prefill", (128, 32, 8, F32), False),
    ("moe_experts", (64, 8, 8, BF16), True),
    ("moe_experts", (65, 8, 8, BF16), False),
    ("moe_experts", (8, 64, 96, F16), True),
    ("moe_experts", (8, 60, 96, F16), False),
    ("moe_experts", (8, 64, 96, F32), False),
    ("moe_experts_quant", (8, 128, 256, 4, BF16), True),
    ("moe_experts_quant", (8, 192, 256, 4, BF16), False),  # int4: whole 128-input groups
    ("moe_experts_quant", (8, 128, 64, 4, BF16), False),
    ("moe_experts_quant", (8, 192, 48, 8, BF16), True),  # int8: 16-byte vectors
    ("moe_experts_quant", (8, 192, 40, 8, BF16), False),
    ("moe_experts_quant", (65, 128, 128, 8, BF16), False),
    ("moe_experts_quant", (8, 128, 128, 5, BF16), False),
    ("rms_norm", (F32,), True),
    ("rms_norm", (torch.float64,), False),
    ("rope_kv_append", (BF16,), True),
    ("rope_kv_append", (torch.int32,), False),
]


@pytest.mark.parametrize("name, args, expected", BOUNDARIES)
def test_predicate_boundaries(emu_built, name, args, expected):
    assert emu_pred(name, *args) is expected


def test_every_op_has_a_predicate(emu_built):
    """ops.PREDICATE_ARGS covers the schema list, and each mapping's arguments are what the predicate takes."""
    assert set(ops.PREDICATE_ARGS) == set(ops.OP_NAMES)
    for name in ops.OP_NAMES:
        schema = getattr(torch.ops.mixtral_emu, f"{name}_supported").default._schema
        assert len(schema.arguments) == len(next(a for n, a, _ in BOUNDARIES if n == name))
        assert str(schema.returns[0].type) == "bool"


# ---- each boundary on the emulated op: the op runs on the supported side, refuses the other ----------------------
def _route(T, E, k, seed=0):
    return ops.Route(*reference.moe_route(torch.randn(T, E, generator=torch.Generator().manual_seed(seed)), k))


def _attention_decode(D, Hq, Hkv, dtype=BF16):
    g = torch.Generator().manual_seed(D + Hq)
    q = torch.randn(1, Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(1, 3, Hkv, D, generator=g).to(dtype) for _ in range(2))
    return (q, k, v, torch.tensor([3], dtype=torch.int32), D ** -0.5, 0)


def _attention_prefill(D, Hq, Hkv, dtype=BF16):
    g = torch.Generator().manual_seed(D + Hq)
    q = torch.randn(2, Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, Hkv, D, generator=g).to(dtype) for _ in range(2))
    return (q, k, v, torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 2, D ** -0.5, 0)


def _moe_route(E, k, dtype=F32):
    return (torch.randn(3, E, generator=torch.Generator().manual_seed(E)).to(dtype), k)


def _moe_experts(E, H, I, dtype=BF16):
    g = torch.Generator().manual_seed(E + H + I)
    r = _route(2, E, 2)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    return (torch.randn(2, H, generator=g).to(dtype), r.topk_weights, r.topk_ids, r.expert_offsets, r.sorted_tokens,
            r.token_rows, w13, w2)


def _moe_experts_quant(E, H, I, bits, dtype=BF16):
    g = torch.Generator().manual_seed(E + H + I + bits)
    r = _route(2, E, 2)
    mode = "int8" if bits == 8 else "int4"
    weights = []
    for rows, cols in ((2 * I, H), (H, I)):
        w = torch.randn(E, rows, cols, generator=g) / cols ** 0.5
        if cols % 128 == 0 or bits == 8:
            weights += quant.quantize(w, mode)
        else:  # not quantizable to int4 (the point of the case): bytes and scales of the op's layout
            weights += [torch.zeros(E, rows, cols // 2, dtype=torch.uint8), torch.ones(E, rows, 1)]
    return (torch.randn(2, H, generator=g).to(dtype), r.topk_weights, r.topk_ids, r.expert_offsets, r.sorted_tokens,
            r.token_rows, *weights, bits)


EMU_OPS = {
    "attention_decode": lambda *a: torch.ops.mixtral_emu.attention_decode(*a, 0, 80),
    "attention_prefill": lambda *a: torch.ops.mixtral_emu.attention_prefill(*a, 80),
    "moe_route": lambda *a: torch.ops.mixtral_emu.moe_route(*a, "auto", 80),
    "moe_experts": lambda *a: torch.ops.mixtral_emu.moe_experts(*a, "decode", 80),
    "moe_experts_quant": lambda *a: torch.ops.mixtral_emu.moe_experts_quant(*a, "decode", 80),
}

# (op, inputs, supported?, the error's words on the unsupported side)
OP_CASES = [
    ("moe_route", lambda: _moe_route(64, 4), True, None),
    ("moe_route", lambda: _moe_route(65, 4), False, "65 experts"),
    ("moe_route", lambda: _moe_route(8, 5), False, "top_k = 5"),
    ("attention_decode", lambda: _attention_decode(64, 8, 1), True, None),  # group 8
    ("attention_decode", lambda: _attention_decode(96, 8, 1), False, "got head_dim 96"),
    ("attention_decode", lambda: _attention_decode(64, 16, 1), False, "Hq 16, Hkv 1"),
    ("attention_decode", lambda: _attention_decode(64, 8, 1, F32), False, "q Float"),
    ("attention_prefill", lambda: _attention_prefill(128, 4, 1), True, None),
    ("attention_prefill", lambda: _attention_prefill(64, 4, 1), False, "got head_dim 64"),
    ("attention_prefill", lambda: _attention_prefill(128, 3, 1), False, "Hq / Hkv = 3 / 1 = 3"),
    ("moe_experts", lambda: _moe_experts(64, 8, 8), True, None),
    ("moe_experts", lambda: _moe_experts(65, 8, 8), False, "65 experts"),
    ("moe_experts", lambda: _moe_experts(4, 12, 8), False, "H = 12"),
    ("moe_experts_quant", lambda: _moe_experts_quant(2, 128, 128, 4), True, None),
    ("moe_experts_quant", lambda: _moe_experts_quant(2, 192, 128, 4), False, "multiples of 128"),
    ("moe_experts_quant", lambda: _moe_experts_quant(2, 48, 16, 8), True, None),
    ("moe_experts_quant", lambda: _moe_experts_quant(2, 48, 8, 8), False, "I = 8"),
]


@pytest.mark.parametrize("name, make, supported, words", OP_CASES)
def test_the_emulated_op_agrees_with_its_predicate(emu_built, name, make, supported, words):
    args = make()
    assert emu_pred(name, *ops.PREDICATE_ARGS[name](*args)) is supported
    if not supported:
        with pytest.raises(RuntimeError, match="unsupported") as info:
            EMU_OPS[name](*args)
        assert words in str(info.value)
        return
    out = EMU_OPS[name](*args)
    want = getattr(reference, name)(*args)
    for o, w in zip(*((out, want) if isinstance(out, (tuple, list)) else ((out,), (want,)))):
        assert o.shape == w.shape and o.dtype == w.dtype
        assert torch.isfinite(o.float()).all()


# ---- ops._dispatch asks the predicates ------------------------------------------------------------------------------
class _CudaKey:
    """What _dispatch reads of its key tensor: a CUDA tensor (this machine may have no GPU)."""
    is_cuda = True


@pytest.fixture
def emu_predicates(emu_built, monkeypatch):
    """ops with the emulation build's predicates standing in for _C's (the same source), and the kernel and the
    reference replaced by recorders: which one _dispatch chose."""
    calls = []
    monkeypatch.setattr(ops, "_PREDICATES", torch.ops.mixtral_emu)
    monkeypatch.setattr(ops, "_ASKED", {})

    class Recorder:
        def __init__(self, who):
            self.who = who

        def __getattr__(self, name):
            return lambda *args: calls.append((self.who, name))

    monkeypatch.setattr(ops, "reference", Recorder("reference"))
    monkeypatch.setattr(torch.ops, "mixtral_ext", Recorder("kernel"))
    return calls


@pytest.mark.parametrize("name, make, supported, words", OP_CASES)
def test_dispatch_sends_unsupported_shapes_to_the_reference(emu_predicates, name, make, supported, words):
    args = make()
    ops._dispatch(name, _CudaKey(), *args)
    assert emu_predicates == [("kernel" if supported else "reference", name)]


def test_dispatch_without_the_extension_runs_the_reference(emu_predicates, monkeypatch):
    monkeypatch.setattr(ops, "_PREDICATES", None)
    ops._dispatch("moe_route", _CudaKey(), *_moe_route(8, 2))
    assert emu_predicates == [("reference", "moe_route")]


def test_kernel_supported_asks_once_per_shape(emu_built, monkeypatch):
    asked = []

    class Counting:
        def __getattr__(self, name):
            pred = getattr(torch.ops.mixtral_emu, name)
            return lambda *args: asked.append(args) or pred(*args)

    monkeypatch.setattr(ops, "_PREDICATES", Counting())
    monkeypatch.setattr(ops, "_ASKED", {})
    for _ in range(3):
        assert ops.kernel_supported("moe_route", 64, 4, BF16)
        assert not ops.kernel_supported("moe_route", 65, 4, BF16)
    assert asked == [(64, 4, BF16), (65, 4, BF16)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_kernel_supported_is_a_constant_under_torch_compile(emu_built, monkeypatch, dynamic):
    """On a GPU, torch.compile traces _dispatch: the predicate's answer must become a constant (with a guard on the
    sizes it read), not a graph break; dynamic=True makes the sizes symbolic."""
    monkeypatch.setattr(ops, "_PREDICATES", torch.ops.mixtral_emu)
    monkeypatch.setattr(ops, "_ASKED", {})

    def fn(logits):
        return logits + 1 if ops.kernel_supported("moe_route", logits.shape[-1], 4, logits.dtype) else logits - 1
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=dynamic)
    for E, expected in ((8, 1.0), (64, 1.0), (65, -1.0), (9, 1.0)):
        assert compiled(torch.zeros(2, E))[0, 0].item() == expected, E


def test_graphs_supported_asks_the_decode_steps_predicates(emu_built, monkeypatch):
    """generate.graphs_supported with plain ints: a model whose decode kernel takes its heads, and one whose
    head_dim (96) it does not (the same tiny config otherwise)."""
    from mixtral_ext import generate, model as mx

    monkeypatch.setattr(ops, "_PREDICATES", torch.ops.mixtral_emu)
    monkeypatch.setattr(ops, "_ASKED", {})
    monkeypatch.setattr(ops, "has_cuda_kernel", lambda name: True)
    asked = []
    real = ops.kernel_supported
    monkeypatch.setattr(ops, "kernel_supported", lambda name, *a: asked.append((name, *a)) or real(name, *a))
    for head_dim, expected in ((128, True), (96, False)):
        m = mx.Mixtral(mx.MixtralConfig.from_name("tiny", head_dim=head_dim), device="meta", dtype=BF16)
        monkeypatch.setattr(type(m), "device", torch.device("cuda"), raising=False)
        assert generate.graphs_supported(m) is expected
    cfg = m.config
    assert ("attention_decode", 96, cfg.num_attention_heads, cfg.num_key_value_heads, BF16) in asked


# ---- _C: the same predicates, next to the schemas ops.py defines (either import order) -----------------------------
_BUILT = sorted(glob.glob(os.path.join(os.path.dirname(ops.__file__), "_C*.so")))


@pytest.mark.skipif(not _BUILT, reason="the CUDA extension (_C) is not built")
@pytest.mark.parametrize("order", ["package first", "_C first"])
def test_cuda_build_registers_the_same_predicates(order):
    """_C's TORCH_LIBRARY_FRAGMENT coexists with the library ops.py defines from Python, in either import order
    (loading _C needs no GPU), and its predicates answer as the emulation build's on every boundary."""
    cases = [(n, [repr(a) if not isinstance(a, torch.dtype) else str(a) for a in args], e) for n, args, e in BOUNDARIES]
    script = f"""
import torch
if {order == "_C first"!r}:
    torch.ops.load_library({_BUILT[0]!r})
import mixtral_ext
from mixtral_ext import ops
assert ops.HAS_CUDA_KERNELS, ops.EXTENSION_STATUS
for name, args, expected in {cases!r}:
    got = getattr(torch.ops.mixtral_ext, name + "_supported")(*[eval(a) for a in args])
    assert got is expected, (name, args, got)
assert torch.ops.mixtral_ext.rms_norm.default._schema.name == "mixtral_ext::rms_norm"
print("ok", len({cases!r}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(ops.__file__)))
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


# ---- an uneven GQA pairing is a clear error on every path without the kernel ---------------------------------------
def _uneven_gqa(op):
    """q with 6 heads against a cache of 4 KV heads (6 % 4 != 0), otherwise valid inputs of `op`."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 8, 4, 16, generator=g)
    v = torch.randn(2, 8, 4, 16, generator=g)
    if op == "attention_decode":
        return torch.randn(2, 6, 16, generator=g), k, v, torch.tensor([3, 8], dtype=torch.int32), 0.25, 0
    q = torch.randn(5, 6, 16, generator=g)
    return q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([2, 5], dtype=torch.int32), 3, 0.25, 0


@pytest.mark.parametrize("op", ["attention_decode", "attention_prefill"])
@pytest.mark.parametrize("path", ["reference", "cpu", "dispatcher"])
def test_uneven_gqa_names_both_head_counts(op, path):
    """The kernels refuse Hq % Hkv != 0 with a message naming both counts; the reference (where ops._dispatch sends
    shapes the kernels do not implement), the CPU path and the registered CPU kernel must too, not fail in a view."""
    fn = {"reference": getattr(reference, op), "cpu": getattr(cpu, op),
          "dispatcher": getattr(torch.ops.mixtral_ext, op)}[path]
    with pytest.raises((ValueError, RuntimeError), match=r"q heads \(6\) must be a multiple of the cache's KV heads "
                                                         r"\(4\)"):
        fn(*_uneven_gqa(op))


@pytest.mark.parametrize("op", ["attention_decode", "attention_prefill"])
def test_even_gqa_still_runs_everywhere(op):
    """The check refuses only the uneven pairing: 8 query heads over the same 4 KV heads run on all three paths
    and agree."""
    q, *rest = _uneven_gqa(op)
    q = torch.cat([q, q[:, :2]], dim=1)  # 8 heads
    outs = [getattr(m, op)(q, *rest) for m in (reference, cpu, torch.ops.mixtral_ext)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
