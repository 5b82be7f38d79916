"""Weight-only quantization of the expert matrices: the storage formats, quantize (at load) and dequantize (the
reference's and the tests' view of what the kernels compute).

Two formats, both symmetric round-to-nearest (ties to even, as torch.round) from the checkpoint's values upcast to
float32, with float32 scales, for a matrix stored [out, in] (w1 and w3 rows of w13, w2):
  int8  per output row:  scale[r] = absmax(w[r, :]) / 127,  q = clamp(round(w / scale), -127, 127)
        q: int8 [out, in];  scale: float32 [out]
  int4  per group of GROUP = 128 consecutive inputs of a row:  scale[r, g] = absmax(w[r, 128g : 128g + 128]) / 7,
        q = clamp(round(w / scale), -8, 7)
        packed: uint8 [out, in / 2];  scale: float32 [out, in / 128]
        Nibble order: byte j of a row holds input 2j in its low nibble (bits 0-3) and input 2j + 1 in its high nibble
        (bits 4-7), each a 4-bit two's complement value; so a little-endian 32-bit word w of a row holds inputs
        8w .. 8w + 7 at bits 4i .. 4i + 3.
A zero row (or group) has scale 0 and dequantizes to 0. dequantize(q, scale) = q * scale in float32.
Any leading dimensions ([E, out, in]) are carried along. Non-finite weights cannot be quantized: ValueError.
"""
import torch

MODES = ("int8", "int4")  # the values of `quantize` (None: no quantization)
GROUP = 128  # int4 inputs per scale
_QMAX = {"int8": 127, "int4": 7}
_QMIN = {"int8": -127, "int4": -8}
STORAGE_DTYPE = {"int8": torch.int8, "int4": torch.uint8}


def check_mode(quantize):
    """None or one of MODES, else a ValueError naming the value."""
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {', '.join(map(repr, MODES))} or "
                         f"None")
    return quantize


def check_width(quantize, width, what="input width"):
    """int4 groups 128 inputs per scale (and packs two per byte): a width that is not a multiple of 128 is refused."""
    if quantize == "int4" and width % GROUP:
        raise ValueError(f"quantize='int4' groups {GROUP} inputs per scale, but the {what} is {width}, not a "
                         f"multiple of {GROUP}; use quantize='int8' for this model")


def quantized_shapes(quantize, out, inp):
    """(storage shape, scale shape) of one [out, in] matrix."""
    if quantize == "int8":
        return (out, inp), (out,)
    check_width(quantize, inp)
    return (out, inp // 2), (out, inp // GROUP)


def _symmetric(w, qmax, qmin):
    """(q, scale) with scale = absmax / qmax over the last dimension of w (float32)."""
    scale = w.abs().amax(dim=-1) / qmax
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weights with non-finite values (inf or nan) cannot be quantized")
    nonzero = scale > 0
    # Division (not multiplication by 1/scale) is the scheme's definition; a zero group divides by 1 and stays 0.
    q = torch.round(w / torch.where(nonzero, scale, torch.ones_like(scale)).unsqueeze(-1))
    return q.clamp_(qmin, qmax), scale


def quantize(w, mode):
    """Quantize w [..., out, in] (any float dtype; upcast to float32 first). Returns (q, scale) in the layout of
    the module docstring: int8 [..., out, in] + float32 [..., out], or packed uint8 [..., out, in/2] + float32
    [..., out, in/128]."""
    check_mode(mode)
    if mode is None:
        raise ValueError("quantize(): mode must be 'int8' or 'int4', not None")
    w = w.float()
    if mode == "int8":
        q, scale = _symmetric(w, _QMAX[mode], _QMIN[mode])
        return q.to(torch.int8), scale
    check_width(mode, w.shape[-1])
    groups = w.unflatten(-1, (w.shape[-1] // GROUP, GROUP))  # [..., out, in/128, 128]
    q, scale = _symmetric(groups, _QMAX[mode], _QMIN[mode])
    return pack_int4(q.flatten(-2).to(torch.int8)), scale


def pack_int4(q):
    """int8 values in [-8, 7], [..., n] (n even) -> uint8 [..., n/2], input 2j in the low nibble of byte j."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    nib = q.to(torch.int16) & 0xF  # two's complement nibble
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed):
    """uint8 [..., m] -> int8 [..., 2m] in [-8, 7]: the inverse of pack_int4."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed int4 weights are uint8, got {packed.dtype}")
    b = packed.to(torch.int16)
    lo, hi = b & 0xF, b >> 4
    both = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., 2m], low nibble first
    return ((both ^ 8) - 8).to(torch.int8)  # sign-extend the 4-bit two's complement


def dequantize(q, scale):
    """float32 weights [..., out, in] from int8 q [..., out, in] + scale [..., out], or packed uint8 q
    [..., out, in/2] + scale [..., out, in/128]."""
    if q.dtype == torch.int8:
        if scale.shape != q.shape[:-1]:
            raise ValueError(f"int8 weights {tuple(q.shape)} need one scale per row, shape {tuple(q.shape[:-1])}; got "
                             f"{tuple(scale.shape)}")
        return q.float() * scale.float().unsqueeze(-1)
    if q.dtype == torch.uint8:
        inp = 2 * q.shape[-1]
        if inp % GROUP or scale.shape != (*q.shape[:-1], inp // GROUP):
            raise ValueError(f"packed int4 weights {tuple(q.shape)} ({inp} inputs a row) need scales of shape "
                             f"{(*q.shape[:-1], inp // GROUP)} (one per {GROUP} inputs); got {tuple(scale.shape)}")
        w = unpack_int4(q).float().unflatten(-1, (inp // GROUP, GROUP))
        return (w * scale.float().unsqueeze(-1)).flatten(-2)
    raise ValueError(f"quantized weights are int8 (int8 format) or uint8 (packed int4), got {q.dtype}")


def mode_of(q):
    """The format of stored weights from their dtype: 'int8', 'int4', or None for unquantized (float) weights."""
    return {torch.int8: "int8", torch.uint8: "int4"}.get(q.dtype)


def expert_bytes(cfg, quantize, dtype_bytes):
    """Bytes of one layer's experts (w13 + w2 and their scales) in the given format (None: dtype_bytes each)."""
    E, I, H = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    n = 3 * E * I * H
    if quantize is None:
        return n * dtype_bytes
    if quantize == "int8":
        return n + 4 * E * (2 * I + H)  # a float32 scale per output row of w13 (2I) and w2 (H)
    return n // 2 + 4 * E * (2 * I * (H // GROUP) + H * (I // GROUP))
