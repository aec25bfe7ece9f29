"""One way for every method to hook the host's attention: ComfyUI's `optimized_attention_override`.

The host calls override(func, q, k, v, heads, mask=..., skip_reshape=..., ...); Qwen-Image passes
the mask positionally (args[4]). Overrides chain: a hook runs before any override already there.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ATTENTION_OVERRIDE_KEY = "optimized_attention_override"


def override_attention(transformer_options: dict, hook: Callable, first_call_only: bool = False) -> dict:
    """Copy of transformer_options whose attention calls pass `hook(ordinal, args, kwargs) -> (args, kwargs)`
    (or (args, kwargs, post): the call's output is then post(output)).

    With `first_call_only` only a block's first attention call is hooked (Wan: self-attention, then
    cross-attention to the text).
    """
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
    """Where `n_img` image keys start: at `offset` in joint attention, at 0 in image-only attention
    (SD3.5's second attention); None for any other call."""
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
    """Adds `key_bias` (B, n_merged), or (B, 1, 1, n_merged), to the merged image keys' attention logits
    (proportional attention).

    `shared` (runtime.CallShared): the padded bias is built once per model call while `key_bias` and the
    host's mask are the same objects (every block of a density call).
    """
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
    """Proportional attention without an additive mask: the same result as key_bias_hook(log sizes), so that
    the host's attention keeps its fastest kernel (an arbitrary float mask rules flash attention out).

    A key of group size s counts s times: out = sum_j s_j e^(q.k_j) v_j / sum_j s_j e^(q.k_j), computed as
    attention(q, k, [s v, s]) followed by a division by the last channel. The head dim grows by one channel,
    padded to a multiple of 8 (flash wants equal q/k/v head dims that are); q and k get zero channels and q
    is scaled by sqrt(padded / original) so that the host's default 1/sqrt(head dim) scale is unchanged.
    `sizes` (B, n_merged); `shared` (runtime.CallShared): the per-key weights are built once per call.
    A host mask passes through unchanged.
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

        def key_weights():  # (B, n_keys) with the token axis where v has it, heads and channels of size 1
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
        split_heads = not kwargs.get("skip_output_reshape")  # the host returns (B, L, H * padded), else (B, H, L, padded)

        def post(out):
            o = out.unflatten(-1, (heads, padded)) if split_heads else out
            o = o[..., :d] / o[..., d:d + 1]
            return o.flatten(-2) if split_heads else o

        return (q2, k2, v2) + tuple(args[3:]), kwargs, post

    return hook
