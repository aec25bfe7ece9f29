"""Every method hooks the host's attention one way: ComfyUI's `optimized_attention_override`.

The host calls override(func, q, k, v, heads, mask=..., skip_reshape=..., ...) (Qwen-Image passes the
mask as args[4]). A hook runs before any override already there.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ATTENTION_OVERRIDE_KEY = "optimized_attention_override"


def override_attention(transformer_options: dict, hook: Callable, first_call_only: bool = False) -> dict:
    """Copy of transformer_options whose attention calls go through `hook(ordinal, args, kwargs)`, which
    returns (args, kwargs) or (args, kwargs, post) to map the output. `first_call_only`: hook only a
    block's first attention (Wan: self-attention, then cross-attention)."""
    previous = transformer_options.get(ATTENTION_OVERRIDE_KEY)
    calls = [0]

    def attention(func, *args, **kwargs):
        ordinal = calls[0]
        calls[0] += 1
        post = None
        if not (first_call_only and ordinal > 0):
            hooked = hook(ordinal, args, kwargs)
            args, kwargs = hooked[0], hooked[1]
            post = hooked[2] if len(hooked) > 2 else None
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        return out if post is None else post(out)

    out = dict(transformer_options)
    out[ATTENTION_OVERRIDE_KEY] = attention
    return out


def seq_dim(kwargs: dict) -> int:
    """The token axis of q, k, v: (B, H, L, D) when the host already split the heads, else (B, L, H*D)."""
    return 2 if kwargs.get("skip_reshape") else 1


def image_key_start(n_keys: int, offset: int, n_img: int) -> int | None:
    """Start of the `n_img` image keys: `offset` in joint attention, 0 in image-only attention (SD3.5's
    second one), else None."""
    if n_keys >= offset + n_img:
        return offset
    return 0 if n_keys == n_img else None


def get_mask(args: tuple, kwargs: dict):
    return args[4] if len(args) > 4 else kwargs.get("mask")


def with_mask(args: tuple, kwargs: dict, mask) -> tuple[tuple, dict]:
    if len(args) > 4:
        return args[:4] + (mask,) + args[5:], kwargs
    kwargs["mask"] = mask
    return args, kwargs


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean (True = attend) or additive mask as an additive float mask of at least 4 dims."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
    return mask


def key_bias_hook(key_bias: torch.Tensor, offset: int, n_merged: int, shared=None) -> Callable:
    """Proportional attention: adds `key_bias` (B, n_merged) or (B, 1, 1, n_merged) to the merged keys'
    logits; with `shared` (runtime.CallShared) the padded mask is built once per call."""
    def hook(ordinal, args, kwargs):
        q, k = args[0], args[1]
        n_keys = k.shape[seq_dim(kwargs)]
        start = image_key_start(n_keys, offset, n_merged)
        if start is None:
            return args, kwargs
        mask = get_mask(args, kwargs)

        def build():
            kb = key_bias if key_bias.dtype == q.dtype else key_bias.to(q.dtype)
            kb = kb if kb.ndim == 4 else kb.view(kb.shape[0], 1, 1, n_merged)
            bias = F.pad(kb, (start, n_keys - start - n_merged))
            return bias if mask is None else bias + additive_mask(mask, q.dtype)

        if shared is None:
            return with_mask(args, kwargs, build())
        return with_mask(args, kwargs, shared.get(("key bias", n_keys, start, q.dtype, q.device), (key_bias, mask),
                                                  build))

    return hook


def size_weighted_hook(sizes: torch.Tensor, offset: int, n_merged: int, shared=None) -> Callable:
    """key_bias_hook(log sizes) without a mask, so the host keeps its flash kernel (a float mask rules it out).

    out = sum_j s_j e^(q.k_j) v_j / sum_j s_j e^(q.k_j) = attention(q, k, [s v, s]) / its last channel.
    Head dims are padded to a multiple of 8 (flash wants equal ones) and q is scaled by sqrt(padded / d)
    to keep the host's 1/sqrt(head dim). `sizes` (B, n_merged); a host mask passes through.
    """
    def hook(ordinal, args, kwargs):
        q, k, v = args[0], args[1], args[2]
        seq = seq_dim(kwargs)
        n_keys = k.shape[seq]
        start = image_key_start(n_keys, offset, n_merged)
        if start is None:
            return args, kwargs
        heads = q.shape[1] if seq == 2 else int(args[3] if len(args) > 3 else kwargs["heads"])
        d = q.shape[-1] if seq == 2 else q.shape[-1] // heads
        padded = -(-(d + 1) // 8) * 8

        def key_weights():  # (B, n_keys), laid out to broadcast against v
            w = F.pad(sizes.to(v.dtype), (start, n_keys - start - n_merged), value=1.0)
            return w.view(w.shape[0], 1, n_keys, 1) if seq == 2 else w.view(w.shape[0], n_keys, 1, 1)

        w = key_weights() if shared is None else shared.get(("key weights", n_keys, start, v.dtype, seq), (sizes,),
                                                            key_weights)
        flat_v = v.ndim == 3  # v may come with its heads split when q and k do not (SD3: B, L, H, D)
        if seq != 2:  # (B, L, H*D) -> (B, L, H, D)
            q, k = (t.unflatten(-1, (heads, d)) for t in (q, k))
            v = v.unflatten(-1, (heads, d)) if flat_v else v
        zeros = (0, padded - d)
        q2 = F.pad(q * (padded / d) ** 0.5, zeros)
        k2 = F.pad(k, zeros)
        v2 = F.pad(torch.cat([v * w, w.expand(*v.shape[:-1], 1)], dim=-1), (0, padded - d - 1))
        if seq != 2:
            q2, k2 = q2.flatten(-2), k2.flatten(-2)
            v2 = v2.flatten(-2) if flat_v else v2
        split_heads = not kwargs.get("skip_output_reshape")  # output (B, L, H * padded), else (B, H, L, padded)

        def post(out):
            o = out.unflatten(-1, (heads, padded)) if split_heads else out
            o = o[..., :d] / o[..., d:d + 1]
            return o.flatten(-2) if split_heads else o

        return (q2, k2, v2) + tuple(args[3:]), kwargs, post

    return hook
