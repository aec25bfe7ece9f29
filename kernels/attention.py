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
    """Copy of transformer_options whose attention calls pass `hook(ordinal, args, kwargs) -> (args, kwargs)`.

    With `first_call_only` only a block's first attention call is hooked (Wan: self-attention, then
    cross-attention to the text).
    """
    previous = transformer_options.get(ATTENTION_OVERRIDE_KEY)
    calls = [0]

    def attention(func, *args, **kwargs):
        ordinal = calls[0]
        calls[0] += 1
        if not (first_call_only and ordinal > 0):
            args, kwargs = hook(ordinal, args, kwargs)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

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
    """Adds `key_bias` (B, n_merged) to the merged image keys' attention logits (proportional attention).

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
            bias = F.pad(kb, (start, n_keys - start - n_merged)).view(kb.shape[0], 1, 1, n_keys)
            return bias if mask is None else bias + additive_mask(mask, q.dtype)

        if shared is None:
            return with_mask(args, kwargs, build())
        return with_mask(args, kwargs, shared.get(("key bias", n_keys, start, q.dtype, q.device), (key_bias, mask),
                                                  build))

    return hook
