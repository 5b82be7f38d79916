"""Weight-only int8 / int4 experts on the CPU: the quantization scheme (rounding, ties, zero rows, clamping), the int4
nibble packing, the moe_experts_quant reference, the quantized model against the same model with its experts replaced
by their dequantized values (float32 logits, sharded checkpoints), the storage per weight, the memory fit check, the
CLI, and the errors for bad input."""
import json
import os

import pytest
import torch

from mixtral_ext import cli, ops, quant, reference
from mixtral_ext.config import MixtralConfig
from mixtral_ext.demo import random_weights
from mixtral_ext.model import Mixtral
from mixtral_ext.weights import CheckpointError, ModelTooLargeError, check_fits, param_bytes

# Two random configs whose expert widths are multiples of 128 (int4 groups): different H/I, GQA ratios, top-k.
CONFIGS = {
    "h128_i256_top2": dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64),
    "h256_i128_top3": dict(vocab_size=200, hidden_size=256, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=8, num_key_value_heads=1, head_dim=32, num_local_experts=6,
                           num_experts_per_tok=3, max_position_embeddings=64),
}


def write_sharded(path, cfg, weights, shards=3):
    """An HF-layout checkpoint split over `shards` files with a model.safetensors.index.json."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg.save(path)
    names = sorted(weights)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n].contiguous() for n in names[i::shards]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(config, {name: stored tensor}, sharded checkpoint dir). std 0.3 spreads the logits (as test_model does)."""
    cfg = MixtralConfig(**CONFIGS[request.param])
    weights = random_weights(cfg, seed=len(request.param), std=0.3)
    path = str(tmp_path_factory.mktemp(request.param))
    write_sharded(path, cfg, weights)
    return cfg, weights, path


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- the scheme ----------------------------------------------------------------------------------------------------
def test_int8_rounds_half_to_even_per_row_and_zero_row():
    # Row 0: absmax 127 -> scale 1, so w / scale is exactly the value: ties go to the even neighbour.
    row0 = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, -126.6])
    row1 = torch.zeros(8)  # a zero row: scale 0, dequantizes to 0 (no nan from 0 / 0)
    row2 = row0 * 0.25  # scale 0.25: the same codes, scaled
    q, s = quant.quantize(torch.stack([row0, row1, row2]), "int8")
    want = torch.tensor([127, 0, 2, 2, 0, -2, 3, -127], dtype=torch.int8)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3,)
    assert torch.equal(q[0], want) and torch.equal(q[2], want) and torch.equal(q[1], torch.zeros(8, dtype=torch.int8))
    assert s.tolist() == [1.0, 0.0, 0.25]
    assert torch.equal(quant.dequantize(q, s)[1], torch.zeros(8))


def test_int4_groups_of_128_round_half_to_even():
    w = torch.zeros(2, 256)
    w[0, :6] = torch.tensor([7.0, 0.5, 1.5, 2.5, -3.5, -6.9])  # group (0, 0): absmax 7 -> scale 1
    w[0, 128:130] = torch.tensor([0.7, -0.35])  # group (0, 1): scale 0.1 -> 7, -3.5 -> -4 (ties to even)
    # row 1: group (1, 0) all zero -> scale 0; group (1, 1) absmax 14 -> scale 2
    w[1, 200] = -14.0
    w[1, 201] = 5.0  # 2.5 -> 2
    q, s = quant.quantize(w, "int4")
    assert q.dtype == torch.uint8 and q.shape == (2, 128) and s.shape == (2, 2)
    assert torch.allclose(s, torch.tensor([[1.0, 0.1], [0.0, 2.0]]))
    codes = quant.unpack_int4(q)
    assert codes[0, :6].tolist() == [7, 0, 2, 2, -4, -7]
    assert codes[0, 128:130].tolist() == [7, -4]  # 0.7 / 0.1 rounds to 7 in float32 (6.9999..)
    assert codes[1, 200:202].tolist() == [-7, 2]
    assert int(codes[0, 6:128].abs().sum()) == 0 and int(codes[1, :200].abs().sum()) == 0


@pytest.mark.parametrize("mode, qmax, per", [("int8", 127, None), ("int4", 7, 128)])
def test_quantize_error_bound_and_full_range(mode, qmax, per):
    w = torch.randn(3, 5, 384, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(torch.bfloat16)
    q, s = quant.quantize(w, mode)  # leading dims carried along
    deq = quant.dequantize(q, s)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    step = s.unsqueeze(-1) if per is None else s.repeat_interleave(per, dim=-1)
    # Round to nearest: half a step at most (plus float32 rounding of q * scale; bf16 inputs make exact ties common).
    assert bool(((deq - w.float()).abs() <= step / 2 + w.float().abs() * 2 ** -20).all())
    codes = q.float() if mode == "int8" else quant.unpack_int4(q).float()
    amax = codes.abs().amax(-1) if per is None else codes.unflatten(-1, (-1, per)).abs().amax(-1)
    assert bool((amax == qmax).all())  # each row / group's absmax lands on the largest code


def test_int4_pack_unpack_round_trip_and_nibble_order():
    assert quant.pack_int4(torch.tensor([1, -2], dtype=torch.int8)).tolist() == [0xE1]  # low nibble = input 0
    assert quant.pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0x78]
    every = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(every, every).reshape(-1)  # all 256 (low, high) pairs
    packed = quant.pack_int4(pairs)
    assert sorted(packed.tolist()) == list(range(256))  # a bijection onto the bytes
    assert torch.equal(quant.unpack_int4(packed), pairs)
    x = torch.randint(-8, 8, (4, 3, 34), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quant.unpack_int4(quant.pack_int4(x)), x)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"quantize='fp8' is not supported; choose one of 'int8', 'int4'"):
        quant.quantize(torch.ones(2, 128), "fp8")
    with pytest.raises(ValueError, match=r"the input width is 200, not a multiple of 128"):
        quant.quantize(torch.ones(2, 200), "int4")
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize(torch.tensor([[1.0, float("inf")]]), "int8")
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize(torch.full((1, 128), float("nan")), "int4")
    with pytest.raises(ValueError, match="last dimension must be even"):
        quant.pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"values must lie in \[-8, 7\]"):
        quant.pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match="need one scale per row"):
        quant.dequantize(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"need scales of shape \(4, 2\)"):
        quant.dequantize(torch.zeros(4, 128, dtype=torch.uint8), torch.zeros(4))
    cfg = MixtralConfig.from_name("tiny")  # hidden 64
    with pytest.raises(ValueError, match=r"hidden_size \(the input width of the experts' w1 and w3\) is 64, not a "
                                         r"multiple of 128"):
        Mixtral(cfg, quantize="int4")
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        Mixtral(cfg, quantize="int3")
    Mixtral(cfg, quantize="int8")  # int8 has no width condition


def test_loader_errors_name_the_problem(tmp_path):
    cfg = MixtralConfig.from_name("tiny", vocab_size=300, hidden_size=128, head_dim=32, intermediate_size=192)
    weights = random_weights(cfg, seed=0)
    bad = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    weights[bad][5, 7] = float("inf")
    write_sharded(str(tmp_path), cfg, weights, shards=2)
    with pytest.raises(ValueError, match=r"quantize='int2' is not supported"):
        Mixtral.from_pretrained(str(tmp_path), quantize="int2", progress=False)
    with pytest.raises(ValueError, match=r"intermediate_size \(the input width of the experts' w2\) is 192, not a "
                                         r"multiple of 128"):
        Mixtral.from_pretrained(str(tmp_path), quantize="int4", progress=False)
    with pytest.raises(CheckpointError, match=rf"tensor {bad}: weights with non-finite values"):
        Mixtral.from_pretrained(str(tmp_path), quantize="int8", progress=False)


# ---- the op --------------------------------------------------------------------------------------------------------
def quantized_experts(E, H, I, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) * 0.1, torch.randn(E, H, I, generator=gen) * 0.1
    w13[0, 3] = 0  # a zero row
    return (*quant.quantize(w13, mode), *quant.quantize(w2, mode))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_reference_op_is_dequantize_then_moe_experts(mode, T):
    E, H, I, k = 5, 256, 128, 2
    q13, s13, q2, s2 = quantized_experts(E, H, I, mode, seed=T)
    gen = torch.Generator().manual_seed(100 + T)
    x = torch.randn(T, H, generator=gen)
    route = ops.moe_route(torch.randn(T, E, generator=gen), k)
    got = ops.moe_experts(x, route, q13, q2, s13, s2)
    want = ops.moe_experts(x, route, quant.dequantize(q13, s13), quant.dequantize(q2, s2))
    assert torch.equal(got, want)
    # and against an independent per-token formula with the dequantized weights
    w13, w2 = quant.dequantize(q13, s13), quant.dequantize(q2, s2)
    y = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for slot in range(k):
            e = int(route.topk_ids[t, slot])
            h = w13[e].double() @ x[t].double()
            y[t] += float(route.topk_weights[t, slot]) * (w2[e].double() @ (torch.nn.functional.silu(h[0::2]) * h[1::2]))
    assert rel_err(got, y) < 1e-5
    assert got.dtype == x.dtype


def test_reference_op_bf16_activations_and_opcheck():
    q13, s13, q2, s2 = quantized_experts(4, 128, 256, "int4", seed=3)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    route = ops.moe_route(torch.randn(3, 4), 2)
    r = (route.topk_weights, route.topk_ids, route.expert_offsets, route.sorted_tokens, route.token_rows)
    assert ops.moe_experts(x, route, q13, q2, s13, s2).dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.mixtral_ext.moe_experts_quant.default, (x, *r, q13, s13, q2, s2, 4))


def test_reference_op_errors():
    q13, s13, q2, s2 = quantized_experts(4, 128, 256, "int8", seed=4)
    x = torch.randn(3, 128)
    route = ops.moe_route(torch.randn(3, 4), 2)
    r = (route.topk_weights, route.topk_ids, route.expert_offsets, route.sorted_tokens, route.token_rows)
    with pytest.raises(ValueError, match="bits must be 8"):
        reference.moe_experts_quant(x, *r, q13, s13, q2, s2, 3)
    with pytest.raises(ValueError, match=r"w13_scale must be torch.float32 \(4, 512\)"):
        reference.moe_experts_quant(x, *r, q13, s13[:, :-1], q2, s2, 8)
    with pytest.raises(ValueError, match=r"w13 must be torch.uint8 \(4, 512, 64\)"):
        reference.moe_experts_quant(x, *r, q13, s13, q2, s2, 4)
    with pytest.raises(ValueError, match=r"w2_scale must be torch.float32"):
        reference.moe_experts_quant(x, *r, q13, s13, q2, s2.double(), 8)
    with pytest.raises(ValueError, match="both scales"):
        ops.moe_experts(x, route, q13, q2, s13, None)


# ---- the model -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_equals_model_with_dequantized_experts(checkpoint, mode):
    cfg, weights, path = checkpoint
    qm = Mixtral.from_pretrained(path, quantize=mode, progress=False)
    fm = Mixtral.from_pretrained(path, progress=False)
    for n, (ql, fl) in enumerate(zip(qm.layers, fm.layers)):
        # Placement: the stored values of each expert tensor quantized on their own land in their rows.
        e = n % cfg.num_local_experts
        prefix = f"model.layers.{n}.block_sparse_moe.experts.{e}"
        for name, rows, q, s in (("w1", slice(0, None, 2), ql.moe.w13, ql.moe.w13_scale),
                                 ("w3", slice(1, None, 2), ql.moe.w13, ql.moe.w13_scale),
                                 ("w2", slice(None), ql.moe.w2, ql.moe.w2_scale)):
            q_want, s_want = quant.quantize(weights[f"{prefix}.{name}.weight"], mode)
            assert torch.equal(q[e, rows], q_want) and torch.equal(s[e, rows], s_want), (n, e, name)
        fl.moe.w13.copy_(quant.dequantize(ql.moe.w13, ql.moe.w13_scale))
        fl.moe.w2.copy_(quant.dequantize(ql.moe.w2, ql.moe.w2_scale))
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    got, want = qm(ids), fm(ids)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-4
    # The cached decode path with quantized experts: greedy generation equals arg-max of the full forward.
    out = qm.generate(ids[:1, :6], max_new_tokens=4)
    for i in range(4):
        assert int(out[0, 6 + i]) == int(qm(out[:, :6 + i])[0, -1].argmax())


@pytest.mark.parametrize("mode, per_weight", [("int8", 1.0), ("int4", 0.5)])
def test_storage_bytes_per_weight(checkpoint, mode, per_weight):
    cfg, _, path = checkpoint
    m = Mixtral.from_pretrained(path, quantize=mode, progress=False)
    E, I, H = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    for layer in m.layers:
        moe = layer.moe
        weight_bytes = moe.w13.nbytes + moe.w2.nbytes
        assert weight_bytes == per_weight * 3 * E * I * H
        scales = (E * (2 * I + H)) if mode == "int8" else (E * (2 * I * H // 128 + H * I // 128))
        assert moe.w13_scale.dtype == moe.w2_scale.dtype == torch.float32
        assert moe.w13_scale.numel() + moe.w2_scale.numel() == scales
        assert moe.gate.dtype == torch.float32  # the router stays in the model dtype
    floats = [p for n, p in m.named_parameters() if not n.endswith(("moe.w13", "moe.w2", "_scale"))]
    assert all(p.dtype == torch.float32 for p in floats)
    # The fit check's accounting is the model's actual size.
    assert param_bytes(cfg, torch.float32, mode) == sum(p.nbytes for p in m.parameters())
    assert param_bytes(cfg, torch.bfloat16, mode) == sum(p.nbytes for p in Mixtral(cfg, dtype=torch.bfloat16,
                                                                                     quantize=mode,
                                                                                     device="meta").parameters())


def test_fit_check_counts_quantized_bytes():
    cfg = MixtralConfig.from_name("mixtral-8x7b")
    gib = 2 ** 30
    h100 = dict(free_bytes=78 * gib, total_bytes=79.6 * gib)  # an 80 GB card
    a100_40 = dict(free_bytes=39 * gib, total_bytes=39.4 * gib)  # a 40 GB card
    with pytest.raises(ModelTooLargeError, match=r"bfloat16\) needs 87\.0 GiB .* --quantize int8 \(quantize='int8': "
                                                 r"45\.0 GiB\) or --quantize int4"):
        check_fits(cfg, torch.bfloat16, "cuda:0", **h100)
    check_fits(cfg, torch.bfloat16, "cuda:0", quantize="int8", **h100)
    with pytest.raises(ModelTooLargeError, match=r"int8 experts\) needs 45\.0 GiB .* --quantize int4"):
        check_fits(cfg, torch.bfloat16, "cuda:0", quantize="int8", **a100_40)
    check_fits(cfg, torch.bfloat16, "cuda:0", quantize="int4", **a100_40)
    with pytest.raises(ModelTooLargeError, match=r"int4 experts\) needs 25\.3 GiB .* a GPU with more memory"):
        check_fits(cfg, torch.bfloat16, "cuda:0", quantize="int4", free_bytes=24 * gib)
    # Experts are 96% of Mixtral-8x7B: int8 about halves the bytes, int4 leaves less than a third.
    bf16 = param_bytes(cfg, torch.bfloat16)
    assert 0.5 < param_bytes(cfg, torch.bfloat16, "int8") / bf16 < 0.53
    assert 0.28 < param_bytes(cfg, torch.bfloat16, "int4") / bf16 < 0.30


# ---- the CLI -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cli_demo_quantized(mode, capsys):
    rc = cli.main(["demo", "--quantize", mode, "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"float32, {mode} experts" in out.out and "5 tokens in" in out.err


def test_cli_generate_quantized_matches_library(tmp_path, capsys):  # int4 (the demo test runs int8 end to end too)
    mode = "int4"
    from mixtral_ext.demo import build_tiny_checkpoint, tiny_config
    from mixtral_ext.tokenizer import Tokenizer
    build_tiny_checkpoint(tmp_path, tiny_config(hidden_size=128, head_dim=32), seed=1)
    rc = cli.main(["generate", "--model", str(tmp_path), "--prompt", "Hello my name is", "--quantize", mode,
                   "--max-new-tokens", "6", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    model = Mixtral.from_pretrained(str(tmp_path), quantize=mode, progress=False)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode("Hello my name is")
    new = model.generate(torch.tensor([ids]), max_new_tokens=6)[0].tolist()
    assert out.out == "Hello my name is" + tok.decode(new)[len(tok.decode(ids)):] + "\n"


def test_cli_rejects_unknown_quantize(capsys):
    assert cli.main(["demo", "--quantize", "int2"]) == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err


def test_cli_bench_passes_quantize_to_the_e2e_benchmark(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_find_bench_dir", lambda: str(tmp_path))
    (tmp_path / "bench_kernels.py").write_text("import sys; print('kernels', sys.argv[1:])")
    (tmp_path / "bench_e2e.py").write_text("import sys; print('e2e', sys.argv[1:])")
    assert cli.main(["bench", "--quick", "--quantize", "int4"]) == 0
    out = capfd.readouterr().out
    assert "kernels ['--quick']" in out and "e2e ['--quick', '--quantize', 'int4']" in out


@pytest.mark.parametrize("layout", ["hf-fused", "mlx"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_stacked_expert_layouts_quantize_like_per_expert(layout, mode, tmp_path):
    """transformers 5's fused experts and mlx-lm's stacked ones (a layer's experts in one tensor) quantize to exactly
    the values and scales of the per-expert layout."""
    cfg = MixtralConfig(**CONFIGS["h128_i256_top2"])
    per_expert = random_weights(cfg, seed=3, std=0.3)
    write_sharded(str(tmp_path / "per_expert"), cfg, per_expert)
    stacked, E = dict(per_expert), cfg.num_local_experts
    for n in range(cfg.num_hidden_layers):
        m = f"model.layers.{n}.block_sparse_moe"
        w = {k: torch.stack([stacked.pop(f"{m}.experts.{e}.{k}.weight") for e in range(E)]) for k in ("w1", "w2", "w3")}
        if layout == "hf-fused":
            stacked[f"model.layers.{n}.mlp.gate.weight"] = stacked.pop(f"{m}.gate.weight")
            stacked[f"model.layers.{n}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
            stacked[f"model.layers.{n}.mlp.experts.down_proj"] = w["w2"]
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                stacked[f"{m}.switch_mlp.{theirs}.weight"] = w[ours]
    write_sharded(str(tmp_path / layout), cfg, stacked)
    got = Mixtral.from_pretrained(str(tmp_path / layout), quantize=mode, progress=False)
    want = Mixtral.from_pretrained(str(tmp_path / "per_expert"), quantize=mode, progress=False)
    for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_quantize_with_several_ranks_is_refused(checkpoint, monkeypatch):
    from mixtral_ext import parallel
    monkeypatch.setattr(parallel, "process_group", lambda device: object())  # as under torchrun
    with pytest.raises(ValueError, match=r"quantize='int8' with several ranks \(torchrun\) is not supported yet"):
        Mixtral.from_pretrained(checkpoint[2], quantize="int8", progress=False)
