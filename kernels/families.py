"""Model-family adapters: where image tokens sit in each family's block arguments.

ComfyUI's `patches_replace["dit"]` hands a block replacement an `args` dict
(`img`, `txt`, `vec`, `pe`, `attn_mask`, `transformer_options`) and the
`original_block`. This module knows, per family, which slice of `args["img"]`
holds the image tokens of the generated latent (text and reference-image tokens
are never merged), where their rotary embedding sits in `pe`, and how to run a
block on merged image tokens and restore full density. It imports nothing
from ComfyUI, so the embedded reference model drives the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .token_ops import MergePlan

ATTENTION_OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's attention hook key


@dataclass(frozen=True)
class BlockSpec:
    key: tuple           # patches_replace key, e.g. ("double_block", 3)
    index: int           # depth index over all patched blocks
    text_in_img: bool    # single-stream block: args["img"] = cat(txt, img)


@dataclass(frozen=True)
class Family:
    name: str
    blocks: tuple[BlockSpec, ...]
    has_rope: bool       # pe carries one rotary entry per token of cat(txt, img)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def flux_family(name: str, n_double: int, n_single: int) -> Family:
    """Flux, Flux Kontext and Chroma: double-stream then single-stream blocks."""
    blocks = [BlockSpec(("double_block", i), i, False) for i in range(n_double)]
    blocks += [BlockSpec(("single_block", i), n_double + i, True) for i in range(n_single)]
    return Family(name, tuple(blocks), has_rope=True)


def mmdit_family(name: str, n_joint: int) -> Family:
    """SD3 / SD3.5 MMDiT joint blocks; positions are absolute, added at the input."""
    return Family(name, tuple(BlockSpec(("double_block", i), i, False) for i in range(n_joint)), has_rope=False)


@dataclass
class ImageSpan:
    """Where the n_img latent image tokens sit inside one block call."""

    img_start: int   # offset of the first image token in args["img"]
    n_img: int
    n_txt: int       # text tokens before the image in the joint attention sequence


def image_span(spec: BlockSpec, args: dict, n_img: int, n_txt_single: int) -> ImageSpan | None:
    """Locate the image tokens, or None when the call does not look as expected."""
    img = args["img"]
    if spec.text_in_img:
        start, n_txt = n_txt_single, 0
    else:
        start, n_txt = 0, args["txt"].shape[1] if args.get("txt") is not None else 0
    if img.ndim != 3 or img.shape[1] < start + n_img or n_img < 4:
        return None
    if args.get("attn_mask") is not None:
        return None  # a token-level mask would need re-indexing; run such calls unmerged
    return ImageSpan(start, n_img, n_txt)


def run_block_merged(args: dict, original_block: Callable, plan: MergePlan, span: ImageSpan,
                     family: Family, key_bias: torch.Tensor | None = None) -> dict:
    """Run a block on merged image tokens and restore full density.

    The block sees M merged image tokens (each the mean of its group, at the
    representative's rotary position); every original token then receives
    its own input plus its group's update, X + Unmerge(F(Merge X) - Merge X),
    so the residual stream keeps full-resolution detail.
    """
    x = args["img"]
    a, b = span.img_start, span.img_start + span.n_img
    main = x[:, a:b]
    merged = plan.merge(main)
    new_args = dict(args)
    new_args["img"] = torch.cat([x[:, :a], merged, x[:, b:]], dim=1)
    pe = args.get("pe")
    if family.has_rope and pe is not None:
        # pe: (B or 1, 1, tokens of cat(txt, img), ...); image tokens follow the text.
        p0 = span.n_txt + a
        p1 = p0 + span.n_img
        if pe.shape[0] != x.shape[0]:  # a batch-shared table: give every row its own image part
            pe = pe.expand(x.shape[0], *pe.shape[1:])
        new_args["pe"] = torch.cat([pe[:, :, :p0], plan.take_rep(pe[:, :, p0:p1], dim=2), pe[:, :, p1:]], dim=2)
    if key_bias is not None:
        new_args["transformer_options"] = _with_key_bias(args.get("transformer_options") or {}, key_bias,
                                                         offset=span.n_txt + a, n_merged=plan.n_out)
    out = original_block(new_args)
    y = out["img"]
    m = plan.n_out
    restored = main + plan.unmerge(y[:, a:a + m] - merged)
    out = dict(out)
    out["img"] = torch.cat([y[:, :a], restored, y[:, a + m:]], dim=1)
    return out


def _with_key_bias(transformer_options: dict, key_bias: torch.Tensor, offset: int, n_merged: int) -> dict:
    """Copy of transformer_options whose attention adds `key_bias` to the merged image keys.

    Joint attention sees [text, image(, reference)] keys: the bias goes at
    `offset`. Image-only attention (SD3.5's second attention) sees the merged
    image keys alone. Any other key length is left untouched.
    """
    previous = transformer_options.get(ATTENTION_OVERRIDE_KEY)

    def attention_with_bias(func, *args, **kwargs):
        q, k = args[0], args[1]
        n_keys = k.shape[2] if kwargs.get("skip_reshape") else k.shape[1]
        start = offset if n_keys >= offset + n_merged else (0 if n_keys == n_merged else None)
        if start is not None:
            bias = torch.zeros(key_bias.shape[0], n_keys, device=q.device, dtype=q.dtype)
            bias[:, start:start + n_merged] = key_bias.to(q.dtype)
            bias = bias[:, None, None, :]
            mask = kwargs.get("mask")
            if mask is not None:
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
                while mask.ndim < 4:
                    mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
                bias = bias + mask
            kwargs["mask"] = bias
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    out = dict(transformer_options)
    out[ATTENTION_OVERRIDE_KEY] = attention_with_bias
    return out
