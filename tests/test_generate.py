"""generate() on the CPU: greedy and penalised decoding token-identical to transformers, ragged batches equal to
one-by-one runs, EOS per sequence, streaming, sampling (seeded, distribution, top-k/top-p against transformers'
warpers), argument validation, and no CUDA graph off the GPU."""
import pytest
import torch

from mixtral_ext.generate import SamplingConfig, _next_tokens, graphs_supported
from checkpoints import CONFIGS, hf_checkpoint, ours

transformers = pytest.importorskip("transformers")


def _prompt(name, n, seed):
    return torch.randint(0, CONFIGS[name]["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor([ids]), do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("name", ["gqa3_odd", "gqa8_top3", "window"])
def test_greedy_32_tokens_identical_to_transformers(name):
    hf, _ = hf_checkpoint(name)
    model = ours(name)
    ids = _prompt(name, 9, 10)
    ref = _hf_generate(hf, ids, max_new_tokens=32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=32, eos_token_id=[])
    assert out.dtype == torch.long and out.shape == (1, 9 + 32)
    assert out.tolist() == ref.tolist()


def test_repetition_penalty_identical_to_transformers():
    hf, _ = hf_checkpoint("gqa3_odd")
    ids = _prompt("gqa3_odd", 6, 11)
    ref = _hf_generate(hf, ids, max_new_tokens=24, repetition_penalty=1.7)
    out = ours("gqa3_odd").generate([ids], max_new_tokens=24, repetition_penalty=1.7, eos_token_id=[])
    assert out.tolist() == ref.tolist()
    assert out.tolist() != ours("gqa3_odd").generate([ids], max_new_tokens=24, eos_token_id=[]).tolist()


def test_eos_stops_like_transformers():
    """Stop on an EOS id of the generation (taken from an unconstrained run): transformers pads after it and ends
    when the sequence has stopped; with a list of EOS ids, the first one met counts."""
    hf, _ = hf_checkpoint("gqa3_odd")
    model = ours("gqa3_odd")
    ids = _prompt("gqa3_odd", 5, 12)
    free = model.generate([ids], max_new_tokens=20, eos_token_id=[])[0, 5:].tolist()
    eos = free[6]
    first = free.index(eos)
    ref = _hf_generate(hf, ids, max_new_tokens=20, eos_token_id=eos)
    out = model.generate([ids], max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert out.tolist() == ref.tolist() and out.shape[1] == 5 + first + 1
    out2 = model.generate([ids], max_new_tokens=20, eos_token_id=[96, eos], sync_every=3)
    assert out2.tolist() == out.tolist()


def test_ragged_batch_equals_one_by_one():
    """Prompts of lengths 3, 11, 1 run together (each its own length in the cache); one of them stops on EOS early.
    Each row equals its own run, left-padded with pad_token_id, and later rows pad after their EOS."""
    model = ours("gqa3_odd")
    prompts = [_prompt("gqa3_odd", n, 20 + n) for n in (3, 11, 1)]
    singles = [model.generate([p], max_new_tokens=16, eos_token_id=[])[0].tolist() for p in prompts]
    batch = model.generate(prompts, max_new_tokens=16, eos_token_id=[], pad_token_id=5)
    assert batch.shape == (3, 11 + 16)
    for b, p in enumerate(prompts):
        assert batch[b].tolist() == [5] * (11 - len(p)) + singles[b]
    eos = singles[0][3 + 4]  # sequence 0's 5th new token
    stop = [s[len(p):].index(eos) if eos in s[len(p):] else 15 for s, p in zip(singles, prompts)]
    out = model.generate(prompts, max_new_tokens=16, eos_token_id=eos, pad_token_id=5)
    assert out.shape[1] == 11 + max(stop) + 1
    for b, p in enumerate(prompts):
        new = singles[b][len(p):][:stop[b] + 1]
        assert out[b].tolist() == [5] * (11 - len(p)) + p + new + [5] * (out.shape[1] - 11 - len(new))


def test_tensor_input_and_output_device():
    model = ours("mha")
    ids = torch.tensor([_prompt("mha", 4, 30), _prompt("mha", 4, 31)])
    out = model.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids) and out.device == ids.device
    assert model.generate(ids, max_new_tokens=0).tolist() == ids.tolist()


def test_stream_yields_each_step():
    model = ours("gqa3_odd")
    prompts = [_prompt("gqa3_odd", 4, 40), _prompt("gqa3_odd", 7, 41)]
    full = model.generate(prompts, max_new_tokens=10, eos_token_id=[])
    it = model.generate(prompts, max_new_tokens=10, eos_token_id=[], stream=True)
    steps = []
    while True:
        try:
            steps.append(next(it))
        except StopIteration as done:
            result = done.value
            break
    assert len(steps) == 10 and all(isinstance(s, list) and len(s) == 2 for s in steps)
    assert torch.equal(torch.tensor(steps).t(), full[:, 7:]) and torch.equal(result, full)
    eos = steps[2][0]  # the stream ends as soon as every sequence has stopped
    one = list(model.generate([prompts[0]], max_new_tokens=10, eos_token_id=eos, stream=True))
    assert one == [[s[0]] for s in steps[:3]]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = ours("gqa3_odd")
    p = [_prompt("gqa3_odd", 5, 50)]
    kw = dict(max_new_tokens=12, do_sample=True, eos_token_id=[], temperature=1.5, top_k=0)
    a, b, c = (model.generate(p, seed=s, **kw) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(p, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(model.generate(p, seed=3, **{**kw, "top_k": 1}), greedy)
    assert torch.equal(model.generate(p, seed=3, **{**kw, "top_p": 1e-6}), greedy)


def test_sampling_follows_the_distribution():
    """Frequencies of 40000 draws match softmax(logits / T) within a few standard errors."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]]).repeat(40000, 1)
    draws = _next_tokens(logits, None, SamplingConfig(do_sample=True, temperature=0.7, top_k=0), g)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    p = torch.softmax(logits[0].double() / 0.7, -1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / draws.numel()).sqrt() + 1e-4).all(), (freq, p)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (7, 0.5), (0, 0.99), (40, 0.3)])
def test_top_k_top_p_keep_the_same_tokens_as_transformers(top_k, top_p):
    """The support of our sampling distribution equals what transformers' warpers leave finite (ties included)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    scores = torch.randn(4, 64, generator=g) * 3
    scores[1, :10] = scores[1, 10]  # a tie straddling the cut
    ref = scores.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    draws = _next_tokens(scores.repeat(3000, 1), None, SamplingConfig(do_sample=True, top_k=top_k, top_p=top_p), g)
    draws = draws.view(3000, 4)
    for b in range(4):
        support = set(draws[:, b].tolist())
        allowed = set(torch.nonzero(torch.isfinite(ref[b])).flatten().tolist())
        assert support <= allowed
        likely = {i for i in allowed if torch.softmax(ref[b], -1)[i] > 0.01}
        assert likely <= support


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=150), r"max_new_tokens: a prompt of 11 tokens \+ max_new_tokens=150 exceeds the context "
                               r"max_position_embeddings=160"),
    (dict(input_ids=[[1, 2], [3, 97]]), r"input_ids: prompt 1 holds token id 97, outside the vocabulary \[0, 97\)"),
    (dict(input_ids=[[1, 2], [-1]]), r"input_ids: prompt 1 holds token id -1"),
    (dict(input_ids=[[1, 2], []]), r"input_ids: prompt 1 is empty"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"input_ids: prompt 0 is empty"),
    (dict(input_ids=[]), r"input_ids: the batch is empty"),
    (dict(input_ids=torch.zeros(1, 3)), r"input_ids must hold integer token ids, got dtype torch\.float32"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\], got 1\.5"),
    (dict(top_k=-1), r"top_k must be an integer >= 0 \(0 disables it\), got -1"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be > 0 when do_sample=True, got 0\.0"),
    (dict(do_sample=True, temperature=-1), r"temperature must be > 0 when do_sample=True, got -1"),
    (dict(repetition_penalty=0), r"repetition_penalty must be > 0, got 0"),
    (dict(eos_token_id=[2, 97]), r"eos_token_id: 97 is outside the vocabulary \[0, 97\)"),
    (dict(pad_token_id=-3), r"pad_token_id: -3 is outside the vocabulary"),
    (dict(use_cuda_graph=True), r"use_cuda_graph=True needs a CUDA model"),
])
def test_argument_errors(kwargs, message):
    model = ours("gqa3_odd")
    kwargs = {"input_ids": [_prompt("gqa3_odd", 11, 60)], **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)
    with pytest.raises(ValueError, match=message):  # checked at the call, before the first item of a stream
        model.generate(stream=True, **kwargs)


def test_sampling_config_is_checked_once_at_construction_and_frozen():
    """The settings are validated where they are made (generate() builds one; test_argument_errors checks the
    messages through it), the floats stored as floats, and nothing can swap them afterwards."""
    import dataclasses

    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 0"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match=r"seed must be an integer or None, got True"):
        SamplingConfig(seed=True)
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 0 \(0 disables it\), got 2\.0"):
        SamplingConfig(top_k=2.0)
    SamplingConfig(do_sample=False, temperature=0)  # greedy: the temperature is not used, so not checked
    s = SamplingConfig(do_sample=1, temperature=2, top_p=1, repetition_penalty=1, seed=4)
    assert (s.do_sample, s.temperature, s.top_p, s.repetition_penalty) == (True, 2.0, 1.0, 1.0)
    assert all(type(v) is float for v in (s.temperature, s.top_p, s.repetition_penalty))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 0.5
    assert torch.equal(torch.rand(3, generator=s.generator("cpu")), torch.rand(3, generator=s.generator("cpu")))
    assert SamplingConfig().generator("cpu") is None


def test_a_failed_graph_capture_falls_back_to_eager_steps_once(monkeypatch):
    """The CUDA-graph fallback, on the CPU: a capture that raises gives a warning and eager steps with the same
    tokens, the model's GenerationState remembers the error, and later calls do not try to capture again."""
    import mixtral_ext.generate as gen

    model = ours("mha")
    prompts = [_prompt("mha", 6, 3), _prompt("mha", 4, 4)]
    eager = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    captures = []

    def capture(state, m):
        captures.append(m)
        raise RuntimeError("capture refused")

    monkeypatch.setattr(gen, "graphs_supported", lambda m: True)
    monkeypatch.setattr(gen.DecodeState, "_capture", capture)
    model.release_cache()
    with pytest.warns(RuntimeWarning, match=r"capture of the decode step failed \(RuntimeError: capture refused\)"):
        assert torch.equal(model.generate(prompts, max_new_tokens=6, eos_token_id=[]), eager)
    assert len(captures) == 1 and model.generation.capture_error == "RuntimeError: capture refused"
    assert all(s.graph is None for s in model.generation.states.values())
    model.release_cache()  # frees the states; the model still cannot capture, so the error stays
    assert not model.generation.states and model.generation.capture_error
    assert torch.equal(model.generate(prompts[:1], max_new_tokens=6, eos_token_id=[]), eager[:1])
    assert len(captures) == 1
    with pytest.raises(RuntimeError, match="capture refused"):  # required graphs: the error, no fallback
        model.generate(prompts[:1], max_new_tokens=6, eos_token_id=[], use_cuda_graph=True)


def test_cpu_never_uses_cuda_graphs():
    model = ours("mha")
    assert not graphs_supported(model)
    model.generate([[1, 2, 3]], max_new_tokens=3)
    assert model.generation.states and all(s.graph is None for s in model.generation.states.values())
    model.release_cache()
    assert not model.generation.states


# ---- transformers-style padded batches -----------------------------------------------------------------------------
def _left_padded(name, lens, pad=0):
    prompts = [_prompt(name, n, seed=10 + n) for n in lens]
    T = max(lens) + 2  # more padding than needed: every row is padded, as after truncation to a fixed length
    ids = torch.full((len(lens), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return prompts, ids, mask


def test_left_padded_batch_with_attention_mask_equals_one_by_one_and_transformers():
    """Each row of a left-padded batch gives what its own prompt alone gives; the result is [B, T + new] with
    input_ids as passed in front, like transformers' generate (which is compared token for token)."""
    name = "gqa3_odd"
    hf, _ = hf_checkpoint(name)
    model = ours(name)
    prompts, ids, mask = _left_padded(name, [3, 9, 6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert out.shape == (3, ids.shape[1] + 8) and torch.equal(out[:, :ids.shape[1]], ids)
    for b, p in enumerate(prompts):
        alone = model.generate([p], max_new_tokens=8)[0, len(p):]
        assert torch.equal(out[b, ids.shape[1]:], alone), b
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    streamed = model.generate(ids, attention_mask=mask.tolist(), max_new_tokens=8, stream=True)
    steps = []
    while True:
        try:
            steps.append(next(streamed))
        except StopIteration as done:
            assert torch.equal(done.value, out)
            break
    assert torch.equal(torch.tensor(steps).T, out[:, ids.shape[1]:])


def test_pad_token_id_infers_the_mask_like_transformers():
    model = ours("gqa3_odd")
    prompts, ids, mask = _left_padded("gqa3_odd", [4, 7], pad=96)
    assert torch.equal(model.generate(ids, pad_token_id=96, eos_token_id=[], max_new_tokens=5),
                       model.generate(ids, attention_mask=mask, pad_token_id=96, eos_token_id=[], max_new_tokens=5))


@pytest.mark.parametrize("mask, message", [
    ([[1, 1, 1, 0], [1, 1, 1, 1]], r"row 0 has right padding; .*pad on the left"),
    ([[0, 1, 0, 1], [1, 1, 1, 1]], r"row 0 has padding between prompt tokens"),
    ([[0, 0, 0, 0], [1, 1, 1, 1]], r"row 0 is all padding"),
    ([[1, 1, 1], [1, 1, 1]], r"attention_mask has shape \(2, 3\), input_ids \(2, 4\)"),
    ([[2, 1, 1, 1], [1, 1, 1, 1]], r"only 0 \(padding\) and 1"),
])
def test_attention_mask_errors(mask, message):
    with pytest.raises(ValueError, match=message):
        ours("gqa3_odd").generate(torch.ones(2, 4, dtype=torch.long), attention_mask=mask, max_new_tokens=2)


def test_prefix_cache_prefills_only_the_new_tokens_and_changes_nothing():
    """A conversation's second turn (the first turn's prompt + answer + more) prefills only what is new, and gives
    exactly what a fresh full prefill gives; a prompt that diverges early reuses only the common prefix."""
    from mixtral_ext.generate import PrefixCache
    model = ours("gqa3_odd")
    cache = PrefixCache()
    first = _prompt("gqa3_odd", 7, seed=1)
    out1 = model.generate([first], max_new_tokens=5, prefix_cache=cache)[0].tolist()
    assert cache.last_prefill == 7 and out1 == model.generate([first], max_new_tokens=5)[0].tolist()
    assert cache.tokens == out1[:-1]  # the last new token was never fed back
    second = out1 + _prompt("gqa3_odd", 4, seed=2)
    out2 = model.generate([second], max_new_tokens=6, prefix_cache=cache)
    assert cache.last_prefill == len(second) - len(out1[:-1])
    assert torch.equal(out2, model.generate([second], max_new_tokens=6))
    third = first[:3] + _prompt("gqa3_odd", 5, seed=3)  # a re-encoded history: only 3 tokens in common
    out3 = model.generate([third], max_new_tokens=4, prefix_cache=cache, repetition_penalty=1.3)
    assert cache.last_prefill == len(third) - 3
    assert torch.equal(out3, model.generate([third], max_new_tokens=4, repetition_penalty=1.3))
    with pytest.raises(ValueError, match="prefix_cache holds one conversation"):
        model.generate([first, first], prefix_cache=cache)
