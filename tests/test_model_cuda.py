"""The model on the GPU through the CUDA kernels (marker `cuda`): bf16 against transformers' bf16 and float32
MixtralForCausalLM on the same GPU with the same weights (small configs and Mixtral's real hidden/head/expert sizes
with 2 layers), CUDA-graph replay equal to eager steps (also across batch-size changes and a cache that is outgrown,
and with sequences stopping at different steps), batched equal to one by one, seeded sampling, determinism,
no host synchronisation inside a decode step, loading straight to the GPU, the early out-of-memory error.

bf16 is not bitwise comparable across implementations, and random-weight MoE models sit on router near-ties now
and then: logits are held to the 2x rule per token (75th percentile) against transformers in float32, and greedy
runs must agree token for token until the first difference, where each side's token must be in the other's top-5,
for at least 3 of 5 prompts (see assert_mostly_agree).
"""
import json
import os

import pytest
import torch

import mixtral_ext as mx
from mixtral_ext.generate import SamplingConfig, _next_tokens, graphs_supported
from mixtral_ext.weights import ModelTooLargeError
from mixtral_ext.weights import load_transformers_state

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.cuda

# head_dim 128 (the prefill kernel's only size); GQA ratios 8, 2, 4; odd expert count, widths that are multiples of
# 8 but not of a tile; a sliding window shorter than the prompts; and Mixtral-8x7B's real sizes with 2 layers.
GPU_CONFIGS = {
    "gqa8": dict(vocab_size=1000, hidden_size=512, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=1, num_local_experts=8),
    "gqa2_e5": dict(vocab_size=777, hidden_size=264, intermediate_size=200, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=5),
    "gqa4_window": dict(vocab_size=512, hidden_size=1024, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, sliding_window=24),
    "real_2layers": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8),
}
SMALL = ["gqa8", "gqa2_e5", "gqa4_window"]
_MODELS = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _MODELS.clear()
    torch.cuda.empty_cache()


def models(name):
    """(ours bf16, transformers bf16, transformers float32), all on the GPU with the same weights."""
    if name not in _MODELS:  # kept for the module (the real-size trio takes ~25 GB, the small ones little)
        kw = dict(GPU_CONFIGS[name], head_dim=128, num_experts_per_tok=2, max_position_embeddings=4096,
                  initializer_range=0.02 if name == "real_2layers" else 0.06, eos_token_id=None, bos_token_id=None)
        cfg = transformers.MixtralConfig(**kw)
        torch.manual_seed(sum(map(ord, name)))
        with torch.device("cuda"):  # random init on the GPU: seconds even at the real sizes
            hf32 = transformers.MixtralForCausalLM(cfg).eval()
            # Built in bf16 (as from_pretrained(dtype=bfloat16) does), not hf32-like and then .to(bfloat16): .to()
            # would also round the rotary inv_freq buffer to bf16 and put RoPE angles off by up to 0.4% of the
            # position, a worse baseline than transformers users get.
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                hf16 = transformers.MixtralForCausalLM(cfg).eval()
            finally:
                torch.set_default_dtype(prev)
        hf16.load_state_dict(hf32.state_dict())  # the same weights, rounded to bf16
        buffers32 = dict(hf32.named_buffers())
        for bname, buf in hf16.named_buffers():  # non-parameter state (inv_freq) as in float32, whatever init did
            if buf.is_floating_point() and buf.dtype != buffers32[bname].dtype:
                module, _, attr = bname.rpartition(".")
                setattr(hf16.get_submodule(module), attr, buffers32[bname].clone())
        assert next(hf16.parameters()).dtype == torch.bfloat16
        ours_cfg = mx.MixtralConfig.from_dict(cfg.to_dict())
        ours = mx.Mixtral(ours_cfg, device="cuda", dtype=torch.bfloat16)
        load_transformers_state(hf32.state_dict(), ours_cfg, dict(ours.named_parameters()))
        _MODELS[name] = (ours.eval(), hf16, hf32)
    return _MODELS[name]


def _prompts(vocab, lens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def _next_logits(model, prefix):
    ids = torch.tensor([prefix], device="cuda")
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out)[0, -1].float()


def greedy_agrees(prompt, a, b, model_a, model_b):
    """a, b: new tokens of two greedy runs. Whether they are equal until the first difference, where each token is
    in the other model's top-5 for the common prefix. Returns (ok, description)."""
    n = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    if n is None:
        return len(a) == len(b), f"all {len(a)} tokens equal"
    prefix = prompt + a[:n]
    top_a = _next_logits(model_a, prefix).topk(5).indices.tolist()
    top_b = _next_logits(model_b, prefix).topk(5).indices.tolist()
    return (b[n] in top_a and a[n] in top_b,
            f"first difference at new token {n}: {a[n]} (other's top-5 {top_b}) vs {b[n]} (first's top-5 {top_a})")


def assert_mostly_agree(results, what, allowed_failures=2):
    """Random-weight bf16 MoE models sit on router near-ties now and then (the 2nd and 3rd expert within bf16
    rounding): either implementation may flip an expert, which moves the logits by a whole expert's output and can
    break the top-5 rule for that prompt. Measured on the CPU with transformers' bf16 against ours (reference ops)
    on the gqa8 config: 2 of 16 prompts broke it, once on each side (the flipping side's token ranked 21st and 22nd
    by the float32 model). A decoding bug (cache slot, position, routing) breaks it for every prompt, so a minority
    of failures is tolerated: at least 3 of 5 prompts must satisfy the rule."""
    failures = [d for ok, d in results if not ok]
    assert len(failures) <= allowed_failures, f"{what}: {len(failures)}/{len(results)} prompts disagree: {failures}"


def assert_logits_2x(out, ref32, ref16, what, quantile=0.75):
    """tests/numerics.py's 2x rule, taken per token: the 75th percentile of our per-token max error against
    float32 is at most twice transformers' bf16 one plus rounding noise (a routing flip on either side inflates a
    few tokens' errors; a bug inflates most)."""
    assert not torch.isnan(out).any(), f"{what}: NaN"
    err = (out.float() - ref32.float()).abs().flatten(0, -2).amax(-1)  # [tokens]
    base = (ref16.float() - ref32.float()).abs().flatten(0, -2).amax(-1)
    noise = 2 * 2.0 ** -8 * ref32.float().abs().max().item()
    e, b = err.quantile(quantile).item(), base.quantile(quantile).item()
    assert e <= 2 * b + noise, f"{what}: p{int(100 * quantile)} token error {e:.3e} > 2 x transformers bf16 " \
                               f"{b:.3e} + noise {noise:.3e}"


def test_the_cuda_path_is_active(kernels):
    ours, _, _ = models("gqa8")
    assert graphs_supported(ours), "every op should have a CUDA kernel for bf16"
    ours.generate([[1, 2, 3]], max_new_tokens=3, eos_token_id=[])  # the default: graphs whenever possible
    assert ours.generation.capture_error is None and ours.generation.states[1].graph is not None
    # Shapes the decode kernel does not take (head_dim 96) run the reference there: no graph for such a model.
    odd = mx.Mixtral(mx.MixtralConfig.from_name("tiny", head_dim=96), device="cuda", dtype=torch.bfloat16)
    assert not graphs_supported(odd)


@pytest.mark.parametrize("name", SMALL + ["real_2layers"])
def test_logits_vs_transformers(kernels, name):
    ours, hf16, hf32 = models(name)
    V = GPU_CONFIGS[name]["vocab_size"]
    ids = torch.tensor(_prompts(V, [45, 45], 1), device="cuda")
    with torch.no_grad():
        ref32, ref16 = hf32(ids).logits, hf16(ids).logits
    out = ours(ids)
    assert out.dtype == torch.bfloat16 and out.shape == ref32.shape
    assert_logits_2x(out, ref32, ref16, f"{name} logits")


@pytest.mark.parametrize("name", SMALL + ["real_2layers"])
def test_greedy_vs_transformers(kernels, name):
    ours, hf16, _ = models(name)
    results = []
    for prompt in _prompts(GPU_CONFIGS[name]["vocab_size"], [17, 5, 30, 12, 23], 2):
        n = len(prompt)
        mine = ours.generate([prompt], max_new_tokens=32, eos_token_id=[])[0, n:].tolist()
        with torch.no_grad():
            ref = hf16.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=32,
                                pad_token_id=0)[0, n:].tolist()
        assert len(mine) == 32
        results.append(greedy_agrees(prompt, mine, ref, ours, hf16))
    assert_mostly_agree(results, f"{name}: ours vs transformers")


@pytest.mark.parametrize("name", SMALL + ["real_2layers"])
def test_graph_replay_equals_eager(kernels, name):
    ours, _, _ = models(name)
    prompts = _prompts(GPU_CONFIGS[name]["vocab_size"], [5, 30, 1, 17], 3)
    for kw in (dict(), dict(do_sample=True, seed=11, temperature=0.9, top_p=0.95)):
        graphed = ours.generate(prompts, max_new_tokens=24, eos_token_id=[], use_cuda_graph=True, **kw)
        assert ours.generation.states[4].graph is not None
        eager = ours.generate(prompts, max_new_tokens=24, eos_token_id=[], use_cuda_graph=False, **kw)
        assert ours.generation.states[4].graph is None
        assert torch.equal(graphed, eager), kw
    ours.release_cache()


def test_graph_states_across_calls(kernels):
    """Batch sizes changing between calls, a reused graph, and a longer prompt that outgrows the captured cache (a
    fresh capture): each graphed run equals the eager one."""
    ours, _, _ = models("gqa8")
    ours.release_cache()
    runs = [[5, 9, 2], [7], [3, 12, 8], [300, 4, 1]]  # batch 3, 1, 3 (the graph reused), 3 (cache outgrown: 256)
    prompts = [_prompts(1000, lens, 20 + i) for i, lens in enumerate(runs)]
    graphed, graphs = [], []
    for p in prompts:
        graphed.append(ours.generate(p, max_new_tokens=10, eos_token_id=[], use_cuda_graph=True))
        state = ours.generation.states[len(p)]
        assert state.graph is not None and state.length >= max(map(len, p)) + 10
        graphs.append(state.graph)
    assert graphs[2] is graphs[0], "the batch-3 graph should be reused"
    assert graphs[3] is not graphs[2], "a longer prompt needs a longer cache and a new graph"
    ours.release_cache()
    for p, g in zip(prompts, graphed):
        assert torch.equal(g, ours.generate(p, max_new_tokens=10, eos_token_id=[], use_cuda_graph=False)), \
            [len(x) for x in p]
    ours.release_cache()


@pytest.mark.parametrize("sync_every", [1, 8])
def test_eos_at_different_steps_with_graphs(kernels, sync_every):
    """Sequences stopping at different steps on the graphed path: each row equals the no-EOS run up to its first
    EOS and pads after it, and the columns end at the last sequence's EOS (transformers' semantics)."""
    ours, _, _ = models("gqa8")
    prompts = _prompts(1000, [6, 11, 3], 8)
    n, new = 11, 24
    full = ours.generate(prompts, max_new_tokens=new, eos_token_id=[])[:, n:].tolist()  # [3, 24] new tokens
    eos = [full[0][2], full[1][9]]  # row 0 stops by step 2, row 1 by step 9; row 2 only if it meets one of them
    out = ours.generate(prompts, max_new_tokens=new, eos_token_id=eos, pad_token_id=999, sync_every=sync_every)
    assert ours.generation.states[3].graph is not None
    stops = [next((i for i, t in enumerate(row) if t in eos), None) for row in full]
    keep = new if None in stops else max(stops) + 1
    expected = [row[:stop + 1] + [999] * (new - stop - 1) if stop is not None else row
                for row, stop in zip(full, stops)]
    assert out.shape == (3, n + keep)
    assert out[:, n:].tolist() == [row[:keep] for row in expected]
    ours.release_cache()


@pytest.mark.parametrize("name", SMALL)
def test_batched_equals_one_by_one(kernels, name):
    ours, _, _ = models(name)
    prompts = _prompts(GPU_CONFIGS[name]["vocab_size"], [3, 40, 11, 1, 26], 4)
    batch = ours.generate(prompts, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    assert batch.shape == (5, 40 + 20)
    results = []
    for b, p in enumerate(prompts):
        single = ours.generate([p], max_new_tokens=20, eos_token_id=[])[0].tolist()
        row = batch[b].tolist()
        assert row[:40 - len(p)] == [0] * (40 - len(p)) and row[40 - len(p):40] == p
        results.append(greedy_agrees(p, row[40:], single[len(p):], ours, ours))
    assert_mostly_agree(results, f"{name}: batch rows vs alone")


def test_seeded_sampling_and_determinism(kernels):
    ours, _, _ = models("gqa8")
    prompts = _prompts(1000, [9, 4], 5)
    kw = dict(max_new_tokens=20, eos_token_id=[], do_sample=True, top_k=20, top_p=0.9, temperature=1.3)
    a, b, c = (ours.generate(prompts, seed=s, **kw) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = (ours.generate(prompts, max_new_tokens=20, eos_token_id=[]) for _ in range(2))
    assert torch.equal(g1, g2)
    assert torch.equal(ours(torch.tensor([prompts[0]], device="cuda")),
                       ours(torch.tensor([prompts[0]], device="cuda")))


def test_stream_matches_on_the_gpu(kernels):
    ours, _, _ = models("gqa2_e5")
    prompts = _prompts(777, [6, 13], 6)
    full = ours.generate(prompts, max_new_tokens=12, eos_token_id=[])
    steps = list(ours.generate(prompts, max_new_tokens=12, eos_token_id=[], stream=True))
    assert torch.equal(torch.tensor(steps).t(), full[:, 13:].cpu())


def test_decode_step_and_sampling_never_sync_with_the_host(kernels):
    ours, _, _ = models("gqa8")
    state = ours.generation.decode_state(ours, 3, 64, use_graph=False)
    with torch.inference_mode():
        ours.prefill(_prompts(1000, [5, 9, 2], 7), state.cache)
        state.positions.copy_(torch.tensor([5, 9, 2], dtype=torch.int32))
        seen = torch.zeros(3, 1000, dtype=torch.bool, device="cuda")
        gen = torch.Generator("cuda").manual_seed(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = state.step(ours)
            nxt = _next_tokens(logits, seen, SamplingConfig(True, 0.8, 5, 0.9, 1.2), gen)
            state.tokens.copy_(nxt)
            state.positions += 1
            state.step(ours)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours.release_cache()


def test_load_to_the_gpu(kernels, tmp_path):
    ours, _, hf32 = models("gqa2_e5")
    hf32.save_pretrained(tmp_path, max_shard_size="2MB")
    loaded = mx.Mixtral.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16, progress=False)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(loaded.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), name


def test_model_too_large_fails_before_allocating(kernels, tmp_path):
    from safetensors.torch import save_file
    cfg = mx.MixtralConfig.from_name("mixtral-8x7b", num_hidden_layers=400)  # ~1.2 TB in bf16
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    save_file({}, os.path.join(tmp_path, "model.safetensors"))
    before = torch.cuda.memory_allocated()
    with pytest.raises(ModelTooLargeError, match=r"needs \d+\.\d GiB for its weights .* but cuda(:\d)? has "
                                                 r"\d+\.\d GiB free"):
        mx.Mixtral.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    assert torch.cuda.memory_allocated() == before
