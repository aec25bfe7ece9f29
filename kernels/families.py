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
    key: tuple                     # patches_replace key, e.g. ("double_block", 3)
    index: int                     # depth index over all patched blocks
    text_in_img: bool              # single-stream block: args["img"] = cat(txt, img)
    img_at_end: bool = False       # reference tokens come first: the latent's tokens are the last n_img
    cross_attention: bool = False  # args["txt"] is attended by cross-attention, not joined with the image
    text_first: bool = True        # joint sequence is [text, image]; False: [image, text] (HunyuanVideo)


@dataclass(frozen=True)
class Family:
    name: str
    blocks: tuple[BlockSpec, ...]
    has_rope: bool                 # pe carries one rotary entry per token of the attention sequence
    pe_token_dim: int = 2          # token axis of pe: Flux (B, 1, L, ...) -> 2; Wan, Qwen (B, L, 1, ...) -> 1
    pe_has_text: bool = True       # pe covers cat(txt, img) (joint attention), not the image alone
    key_mask_arg: str | None = None  # args key of a per-key attention mask over the joint sequence
    layer_list: str | None = None  # no patches_replace hook: the host glue patches the forward of each
                                   # layer in this diffusion-model ModuleList (ModelPatcher object patch)

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


def wan_family(name: str, n_blocks: int) -> Family:
    """Wan 2.1 / 2.2: self-attention over [reference?, video tokens] with 3-D rope (pe: (1, L, 1, ...),
    image only), text by cross-attention. Reference-latent tokens (ref_conv) come first."""
    blocks = tuple(BlockSpec(("double_block", i), i, False, img_at_end=True, cross_attention=True)
                   for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, pe_has_text=False)


def qwen_image_family(name: str, n_blocks: int) -> Family:
    """Qwen-Image (and -Edit): dual-stream blocks, joint attention over cat(txt, img, reference);
    pe (B, L_txt + L_img, 1, ...)."""
    return Family(name, tuple(BlockSpec(("double_block", i), i, False) for i in range(n_blocks)),
                  has_rope=True, pe_token_dim=1)


def hunyuan_video_family(name: str, n_double: int, n_single: int) -> Family:
    """HunyuanVideo (and HunyuanImage 2.1): Flux-like blocks, but the joint sequence is
    [reference?, image, text] and a per-key text mask travels as args["attention_mask"]."""
    blocks = [BlockSpec(("double_block", i), i, False, img_at_end=True, text_first=False) for i in range(n_double)]
    blocks += [BlockSpec(("single_block", i), n_double + i, True, text_first=False) for i in range(n_single)]
    return Family(name, tuple(blocks), has_rope=True, key_mask_arg="attention_mask")


def nextdit_family(name: str, n_layers: int) -> Family:
    """Lumina 2 / Z-Image (NextDiT): each layer sees one joint sequence [caption, image] (args["img"]),
    rope (B, L, 1, ...) over all of it and a key mask over it (args["x_mask"])."""
    blocks = tuple(BlockSpec(("layer", i), i, False, img_at_end=True) for i in range(n_layers))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, key_mask_arg="x_mask", layer_list="layers")


@dataclass
class ImageSpan:
    """Where the n_img latent image tokens sit inside one block call."""

    img_start: int   # offset of the first image token in args["img"]
    n_img: int
    n_txt: int       # text tokens before the image in the joint attention sequence
    cross_attention: bool = False  # text comes by a later cross-attention: only the first attention is joint
    n_txt_after: int = 0  # text tokens after args["img"] in the joint attention sequence (image-first families)
    text_first: bool = True  # False: the text follows the image in the joint sequence (HunyuanVideo)


def image_span(spec: BlockSpec, args: dict, n_img: int, n_txt_single: int) -> ImageSpan | None:
    """Locate the image tokens, or None when the call does not look as expected."""
    img = args["img"]
    if img.ndim != 3:
        return None
    n_txt_arg = args["txt"].shape[1] if args.get("txt") is not None else 0
    n_after = 0
    if spec.text_in_img:
        start = n_txt_single if spec.text_first else img.shape[1] - n_txt_single - n_img
        n_txt = 0
    elif spec.img_at_end:
        start, n_txt = img.shape[1] - n_img, 0
    else:
        start, n_txt = 0, n_txt_arg
    if not spec.text_first and not spec.text_in_img:
        n_txt, n_after = 0, n_txt_arg
    if spec.cross_attention:
        n_txt, n_after = 0, 0
    if start < 0 or img.shape[1] < start + n_img or n_img < 4:
        return None
    if args.get("attn_mask") is not None:
        return None  # a token-level mask would need re-indexing; run such calls unmerged
    if args.get("modulation_dims") is not None or args.get("modulation_dims_img") is not None:
        return None  # per-range modulation (HunyuanVideo I2V token replace) indexes unmerged positions
    return ImageSpan(start, n_img, n_txt, spec.cross_attention, n_after, spec.text_first)


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
        # pe: one entry per token of the attention sequence along pe_token_dim; the image
        # tokens follow the joint text when the family's pe covers it.
        d = family.pe_token_dim
        p0 = (span.n_txt if family.pe_has_text else 0) + a
        p1 = p0 + span.n_img
        if pe.shape[0] != x.shape[0]:  # a batch-shared table: give every row its own image part
            pe = pe.expand(x.shape[0], *pe.shape[1:])
        parts = [pe.narrow(d, 0, p0), plan.take_rep(pe.narrow(d, p0, span.n_img), dim=d),
                 pe.narrow(d, p1, pe.shape[d] - p1)]
        new_args["pe"] = torch.cat(parts, dim=d)
    mask = args.get(family.key_mask_arg) if family.key_mask_arg else None
    if isinstance(mask, torch.Tensor):
        # A per-key mask over the joint sequence (HunyuanVideo's text mask): merged keys take their
        # representative's entry.
        k0 = span.n_txt + a
        mask = mask.expand(x.shape[0], *mask.shape[1:]) if mask.shape[0] != x.shape[0] else mask
        new_args[family.key_mask_arg] = torch.cat(
            [mask[..., :k0], plan.take_rep(mask[..., k0:k0 + span.n_img], dim=mask.ndim - 1),
             mask[..., k0 + span.n_img:]], dim=-1)
    vec = args.get("vec")
    if isinstance(vec, torch.Tensor) and vec.ndim >= 3 and vec.shape[1] == x.shape[1] and x.shape[1] > 1:
        # Per-token modulation (Wan 2.2 TI2V): merged tokens take their group's mean.
        img_vec = vec[:, a:b]
        merged_vec = plan.merge(img_vec.flatten(2)).unflatten(2, img_vec.shape[2:])
        new_args["vec"] = torch.cat([vec[:, :a], merged_vec, vec[:, b:]], dim=1)
    if key_bias is not None:
        new_args["transformer_options"] = _with_key_bias(args.get("transformer_options") or {}, key_bias,
                                                         offset=span.n_txt + a, n_merged=plan.n_out,
                                                         first_call_only=span.cross_attention)
    out = original_block(new_args)
    y = out["img"]
    m = plan.n_out
    restored = main + plan.unmerge(y[:, a:a + m] - merged)
    out = dict(out)
    out["img"] = torch.cat([y[:, :a], restored, y[:, a + m:]], dim=1)
    return out


def _with_key_bias(transformer_options: dict, key_bias: torch.Tensor, offset: int, n_merged: int,
                   first_call_only: bool = False) -> dict:
    """Copy of transformer_options whose attention adds `key_bias` to the merged image keys.

    Joint attention sees [text, image(, reference)] keys: the bias goes at
    `offset`. Image-only attention (SD3.5's second attention) sees the merged
    image keys alone. Any other key length is left untouched. With
    `first_call_only` (Wan: self-attention, then cross-attention to the text),
    only the block's first attention call is biased.
    """
    previous = transformer_options.get(ATTENTION_OVERRIDE_KEY)
    calls = [0]

    def attention_with_bias(func, *args, **kwargs):
        q, k = args[0], args[1]
        n_keys = k.shape[2] if kwargs.get("skip_reshape") else k.shape[1]
        start = offset if n_keys >= offset + n_merged else (0 if n_keys == n_merged else None)
        if first_call_only and calls[0] > 0:
            start = None
        calls[0] += 1
        if start is not None:
            bias = torch.zeros(key_bias.shape[0], n_keys, device=q.device, dtype=q.dtype)
            bias[:, start:start + n_merged] = key_bias.to(q.dtype)
            bias = bias[:, None, None, :]
            positional_mask = len(args) > 4  # e.g. Qwen-Image: attention(q, k, v, heads, mask, ...)
            mask = args[4] if positional_mask else kwargs.get("mask")
            if mask is not None:
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
                while mask.ndim < 4:
                    mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
                bias = bias + mask
            if positional_mask:
                args = args[:4] + (bias,) + args[5:]
            else:
                kwargs["mask"] = bias
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    out = dict(transformer_options)
    out[ATTENTION_OVERRIDE_KEY] = attention_with_bias
    return out
