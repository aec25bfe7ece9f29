"""The image keys and values CAT Pruning keeps per block: captured in a full call, completed with the
fresh ones of the computed tokens in a pruned call; optionally stored as float8 with a scale per token.
"""
from __future__ import annotations

import torch

from .attention import image_key_start, seq_dim
from .families import join_tokens, split_tokens
from .token_ops import scatter_index

CACHE_DTYPES = ("model", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn bits as uint8, float32 scale per last-axis vector). uint8 because scatter has no
    float8 kernel."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8).view(torch.uint8), scale


def dequantize_fp8(bits: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    return (bits.view(FP8).float() * scale).to(dtype)


def store_kv(kv_store: dict, captured: list, fp8: bool = False):
    """Store a full block's captured image keys/values, in place when the layout is unchanged."""
    for ordinal, start, kk, vv in captured:
        new = {"start": start}
        for name, t in (("k", kk), ("v", vv)):
            if fp8:
                new[name], new[name + "_scale"] = quantize_fp8(t)
            else:
                new[name] = t
        entry = kv_store.get(ordinal)
        if entry is not None and entry.keys() == new.keys() and all(
                entry[n].shape == new[n].shape and entry[n].dtype == new[n].dtype and entry[n].device == new[n].device
                for n in new if n != "start"):
            for n in new:
                if n == "start":
                    entry[n] = start
                else:
                    entry[n].copy_(new[n])
        else:
            kv_store[ordinal] = {n: (t if n == "start" or fp8 else t.clone()) for n, t in new.items()}

def cached_kv_hook(kv_store: dict, offset: int, n_img: int, selection, shared=None, captured: list | None = None,
                    fp8: bool = False):
    """Attention hook that captures (selection None) or completes (selection) the image keys/values,
    per call ordinal. The caller stores `captured` after the block, so a compiled block never writes or
    branches on the store. Selected tokens attend with their exact fresh keys/values."""
    def hook(ordinal, args, kwargs):
        q, k, v = args[0], args[1], args[2]
        seq = seq_dim(kwargs)
        n_keys = k.shape[seq]
        if selection is None:
            start = image_key_start(n_keys, offset, n_img)
            if start is not None and captured is not None:
                captured.append((ordinal, start) + tuple(split_tokens(t, start, n_img, seq)[1] for t in (k, v)))
            return args, kwargs
        entry = kv_store.get(ordinal)
        n_sel = selection.shape[1]
        if entry is not None and n_keys >= entry["start"] + n_sel:
            start = entry["start"]
            full = []
            for name, t in (("k", k), ("v", v)):  # v may have another layout than k (SD3: B, L, H, D)
                before, fresh, after = split_tokens(t, start, n_sel, seq)
                idx = scatter_index(shared, selection, seq, tuple(fresh.shape))
                cache = entry[name]
                if fp8:
                    image = dequantize_fp8(cache, entry[name + "_scale"], t.dtype).scatter_(seq, idx, fresh)
                    bits, scale = quantize_fp8(fresh)
                    cache.scatter_(seq, idx, bits)
                    entry[name + "_scale"].scatter_(seq, scatter_index(shared, selection, seq, tuple(scale.shape)), scale)
                else:
                    cache.scatter_(seq, idx, fresh if fresh.dtype == cache.dtype else fresh.to(cache.dtype))
                    image = cache if cache.dtype == t.dtype else cache.to(t.dtype)
                full.append(join_tokens(before, image, after, seq))
            args = (q, full[0], full[1]) + tuple(args[3:])
        return args, kwargs

    return hook
