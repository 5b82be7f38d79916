"""torch.compile of the model, on a tiny random Mixtral on the CPU: what ops.py promises ("torch.ops.mixtral_ext.*
works under torch.compile (fake kernels)") held for the whole forward and the decode step.

Which ops the compiler sees depends on the device. On a GPU, ops.py calls the dispatcher ops torch.ops.mixtral_ext.*
(the CUDA kernels), which Dynamo keeps as single graph nodes and runs through their fake kernels while tracing. On
the CPU, ops.py calls cpu.py directly (no dispatcher: 5-16 us per call saved), so Dynamo traces into cpu.py's plain
torch code, and its host reads (the prefill's cu_seqlens.tolist(), the decode step's seq_lens.max(), the experts'
offsets) end the graph there: a CPU model compiles with graph breaks only. The first tests therefore route the CPU
model through the dispatcher, as a GPU model is routed (ops.cpu -> torch.ops.mixtral_ext, whose CPU kernels are the
reference), and require one whole graph (fullgraph=True) in which every op is a mixtral_ext node, with the eager
output bit for bit. The last one compiles the default CPU path as it is and checks its output.

Backend aot_eager: Dynamo's graph, then AOTAutograd's functionalization, which turns the ops that write their
arguments (rms_norm's residual, rope_kv_append's caches) into functional calls plus copies back, the part of the
schemas' Tensor(a!) annotations a compiler relies on; the result runs on the eager kernels. Inductor would add C++
code generation (minutes on a 2-core machine) and test Inductor rather than our ops.
"""
import pytest
import torch

import mixtral_ext as mx
from mixtral_ext import ops

CFG = mx.MixtralConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=2,
                       max_position_embeddings=64)


def tiny_model(quantize=None):
    torch.manual_seed(0)
    model = mx.Mixtral(CFG, quantize=quantize)
    for p in model.parameters():
        if p.dtype.is_floating_point:
            p.normal_(0, 0.3)
        else:  # quantized expert weights: any byte is a valid int8 value or pair of int4 values
            p.random_(-128 if p.dtype == torch.int8 else 0, 128 if p.dtype == torch.int8 else 256)
    return model.eval()


def compile_recording(fn, fullgraph=True):
    """(torch.compile(fn) on aot_eager, the list that receives each FX graph Dynamo hands the backend)."""
    torch._dynamo.reset()
    graphs, aot_eager = [], torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return torch.compile(fn, backend=backend, fullgraph=fullgraph), graphs


def mixtral_ext_nodes(graph):
    """The names of the mixtral_ext ops called in an FX graph."""
    return {str(n.target).removeprefix("mixtral_ext.") for n in graph.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("mixtral_ext.")}


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_forward_and_decode_step_compile_to_one_graph_of_mixtral_ext_ops(quantize, monkeypatch):
    monkeypatch.setattr(ops, "cpu", torch.ops.mixtral_ext)  # the dispatcher ops, as on a GPU
    model = tiny_model(quantize)
    experts = "moe_experts_quant" if quantize else "moe_experts"
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))

    forward, graphs = compile_recording(model)
    with torch.inference_mode():
        eager = model(ids)
        compiled = forward(ids)
    assert torch.equal(compiled, eager)
    assert len(graphs) == 1 and mixtral_ext_nodes(graphs[0]) == {
        "rms_norm", "rope_kv_append", "attention_prefill", "moe_route", experts}

    # The decode step (what generate() replays in a CUDA graph), on a cache the eager prefill filled: the same
    # logits, and the same keys and values written into a copy of that cache.
    step, graphs = compile_recording(model.decode_step)
    cache = model.new_cache(2, 16)
    with torch.inference_mode():
        model.prefill([ids[0].tolist(), ids[1, :4].tolist()], cache)
        copy = model.new_cache(2, 16)
        copy.k.copy_(cache.k)
        copy.v.copy_(cache.v)
        tokens, positions = torch.tensor([5, 9]), torch.tensor([7, 4], dtype=torch.int32)
        seq_ids = torch.arange(2, dtype=torch.int32)
        eager = model.decode_step(tokens, positions, seq_ids, cache)
        compiled = step(tokens, positions, seq_ids, copy)
    assert torch.equal(compiled, eager)
    assert torch.equal(copy.k, cache.k) and torch.equal(copy.v, cache.v)
    assert copy.k[:, 1, 4].abs().sum() > 0  # the step's own key was written, not just the prefill's
    assert len(graphs) == 1 and mixtral_ext_nodes(graphs[0]) == {
        "rms_norm", "rope_kv_append", "attention_decode", "moe_route", experts}


def test_the_default_cpu_path_compiles_with_graph_breaks():
    """The CPU model as it is (ops.py -> cpu.py): not one graph (cpu.py reads lengths on the host), but the same
    logits as eager, with no mixtral_ext op in any graph (cpu.py is plain torch code)."""
    model = tiny_model()
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    forward, graphs = compile_recording(model, fullgraph=False)
    with torch.inference_mode():
        eager = model(ids)
        compiled = forward(ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert graphs and not any(mixtral_ext_nodes(g) for g in graphs)


def test_out_of_vocabulary_ids_still_fail_under_compile(monkeypatch):
    """forward's id range check reads the ids on the host, so it is skipped while tracing; the embedding lookup
    still refuses an id outside the table."""
    monkeypatch.setattr(ops, "cpu", torch.ops.mixtral_ext)
    forward, _ = compile_recording(tiny_model())
    with torch.inference_mode(), pytest.raises(Exception, match="index out of range"):
        forward(torch.tensor([[1, CFG.vocab_size]]))
