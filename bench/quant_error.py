"""The quantization error itself, on the CPU: logits of a random-weight Mixtral with int8 / int4 experts against the
same model unquantized (float32 compute, reference ops). `python bench/quant_error.py [--json PATH]`.

Reported, not asserted (random weights are not a trained model: real checkpoints have outliers that matter more, and
their quality is a perplexity question). Figures: max |dlogit| / max |logit|, mean |dlogit| / mean |logit|, the
greedy-token agreement over the prompt positions, and the per-weight relative RMS error of the experts.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mixtral_ext import Mixtral, MixtralConfig, quant  # noqa: E402
from mixtral_ext.demo import random_weights  # noqa: E402

CONFIGS = {  # expert widths multiples of 128 (int4 groups)
    "h256_i512_e8_top2": dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=256),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--std", type=float, default=0.02, help="weight std (transformers' initializer_range)")
    args = ap.parse_args(argv)
    rows = []
    for name, kw in CONFIGS.items():
        cfg = MixtralConfig(**kw)
        with tempfile.TemporaryDirectory() as tmp:
            from safetensors.torch import save_file
            cfg.save(tmp)
            save_file(random_weights(cfg, seed=0, std=args.std), os.path.join(tmp, "model.safetensors"))
            ref = Mixtral.from_pretrained(tmp, progress=False)
            ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
            want = ref(ids).double()
            for mode in quant.MODES:
                m = Mixtral.from_pretrained(tmp, quantize=mode, progress=False)
                got = m(ids).double()
                w_err = [((quant.dequantize(lq.moe.w13, lq.moe.w13_scale) - lr.moe.w13).pow(2).mean()
                          / lr.moe.w13.pow(2).mean()).sqrt().item() for lq, lr in zip(m.layers, ref.layers)]
                row = {"config": name, "quantize": mode, "std": args.std,
                       "max_rel": ((got - want).abs().max() / want.abs().max()).item(),
                       "mean_rel": ((got - want).abs().mean() / want.abs().mean()).item(),
                       "argmax_agree": (got.argmax(-1) == want.argmax(-1)).double().mean().item(),
                       "w13_rel_rms": sum(w_err) / len(w_err)}
                rows.append(row)
                print(f"{name} {mode}: logits max |d|/max|ref| {row['max_rel']:.2e}, mean |d|/mean|ref| "
                      f"{row['mean_rel']:.2e}, greedy agreement {100 * row['argmax_agree']:.1f}%, expert weight "
                      f"relative RMS error {row['w13_rel_rms']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
