"""Inputs of the attention_decode tests, shared with test_emu_traffic.py."""
import torch


def make_inputs(B, S, Hq, Hkv, D, lens, dtype=torch.float32, device="cpu", seed=0, q_scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = (torch.randn(B, Hq, D, generator=g, device=device) * q_scale).to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=g, device=device).to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=g, device=device).to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=device)
