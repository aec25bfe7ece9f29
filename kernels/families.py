"""Model families: where the image tokens sit in each family's block arguments, host-free.

A Family says which slice of a block's args["img"] holds the latent's image tokens (text and reference
tokens are never reduced) and how pe and masks line up; `image_span` checks a call against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class BlockSpec:
    key: tuple                     # patches_replace key, e.g. ("double_block", 3)
    index: int                     # depth index over all patched blocks
    text_in_img: bool              # single-stream block: args["img"] = cat(txt, img)
    img_at_end: bool = False       # reference tokens first: the latent's are the last n_img (before padding)
    cross_attention: bool = False  # args["txt"] is attended by cross-attention, not joined with the image
    text_first: bool = True        # joint sequence is [text, image]; False: [image, text] (HunyuanVideo)


@dataclass(frozen=True)
class Family:
    name: str
    blocks: tuple[BlockSpec, ...]
    has_rope: bool                 # pe carries one rotary entry per token of the attention sequence
    pe_token_dim: int = 2          # token axis of pe: Flux (B, 1, L, ...) -> 2; Wan, Qwen (B, L, 1, ...) -> 1
    pe_has_text: bool = True       # pe covers cat(txt, img), not the image alone
    key_mask_arg: str | None = None  # args key of a per-key mask over the joint sequence
    layer_list: str | None = None  # no patches_replace hook: the glue patches these layers' forward
    pad_multiple: int | None = None  # image tokens padded to a multiple of this (Z-Image)

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
    """Wan 2.1 / 2.2: self-attention over [reference?, video] with image-only 3-D rope, text by cross-attention."""
    blocks = tuple(BlockSpec(("double_block", i), i, False, img_at_end=True, cross_attention=True)
                   for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, pe_has_text=False)


def qwen_image_family(name: str, n_blocks: int) -> Family:
    """Qwen-Image (and -Edit): dual-stream blocks, joint attention over cat(txt, img, reference)."""
    return Family(name, tuple(BlockSpec(("double_block", i), i, False) for i in range(n_blocks)),
                  has_rope=True, pe_token_dim=1)


def hunyuan_video_family(name: str, n_double: int, n_single: int) -> Family:
    """HunyuanVideo (and HunyuanImage 2.1): Flux-like, but [reference?, image, text] with a text key mask."""
    blocks = [BlockSpec(("double_block", i), i, False, img_at_end=True, text_first=False) for i in range(n_double)]
    blocks += [BlockSpec(("single_block", i), n_double + i, True, text_first=False) for i in range(n_single)]
    return Family(name, tuple(blocks), has_rope=True, key_mask_arg="attention_mask")


def nextdit_family(name: str, n_layers: int, pad_multiple: int | None = None) -> Family:
    """Lumina 2 / Z-Image (NextDiT): one joint sequence [caption, image] in args["img"] with a key mask
    (x_mask); Z-Image pads each part to `pad_multiple`: [caption, pad, image, pad]."""
    blocks = tuple(BlockSpec(("layer", i), i, False, img_at_end=True) for i in range(n_layers))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, key_mask_arg="x_mask", layer_list="layers",
                  pad_multiple=pad_multiple)


@dataclass
class ImageSpan:
    """Where the n_img latent image tokens sit inside one block call."""

    img_start: int   # offset of the first image token in args["img"]
    n_img: int
    n_txt: int       # text tokens before the image in the joint attention sequence
    cross_attention: bool = False  # only the first attention is over the image (text by cross-attention)
    n_txt_after: int = 0  # text tokens after args["img"] in the joint sequence
    text_first: bool = True
    pe_dim: int | None = None  # token axis of args["pe"], found from its shape

    @property
    def key_offset(self) -> int:
        """Position of the first image key in the joint attention sequence."""
        return self.n_txt + self.img_start


def image_span(spec: BlockSpec, args: dict, n_img: int, n_txt_single: int, family: Family) -> ImageSpan | str | None:
    """Locate the image tokens. None: a call left alone by design; a string: why the call does not
    match the family."""
    img = args["img"]
    if img.ndim != 3:
        return f"img has {img.ndim} dims, expected (batch, tokens, channels)"
    if n_img < 4:
        return None
    if args.get("attn_mask") is not None:
        return None  # a token-level mask would need re-indexing; such calls run unreduced
    if args.get("modulation_dims") is not None or args.get("modulation_dims_img") is not None:
        return None  # per-range modulation (HunyuanVideo I2V token replace) indexes unreduced positions
    n_txt_arg = args["txt"].shape[1] if args.get("txt") is not None else 0
    n_after = 0
    if spec.text_in_img:
        start = n_txt_single if spec.text_first else img.shape[1] - n_txt_single - n_img
        n_txt = 0
    elif spec.img_at_end:
        start, n_txt = img.shape[1] - n_img - ((-n_img) % family.pad_multiple if family.pad_multiple else 0), 0
    else:
        start, n_txt = 0, n_txt_arg
    if not spec.text_first and not spec.text_in_img:
        n_txt, n_after = 0, n_txt_arg
    if spec.cross_attention:
        n_txt, n_after = 0, 0
    if start < 0 or img.shape[1] < start + n_img:
        return f"{img.shape[1]} tokens in the block, {n_img} image tokens expected from position {start}"
    span = ImageSpan(start, n_img, n_txt, spec.cross_attention, n_after, spec.text_first)
    pe = args.get("pe")
    if family.has_rope and isinstance(pe, torch.Tensor):
        length = (n_txt + img.shape[1] + n_after) if family.pe_has_text else img.shape[1]
        span.pe_dim = next((d for d in (family.pe_token_dim, 3 - family.pe_token_dim)
                            if pe.ndim > d and pe.shape[d] == length), None)
        if span.pe_dim is None:
            return f"rotary table of shape {tuple(pe.shape)} has no axis of the {length} attention tokens"
    mask = args.get(family.key_mask_arg) if family.key_mask_arg else None
    if isinstance(mask, torch.Tensor) and mask.shape[-1] < span.key_offset + n_img:
        return f"key mask of shape {tuple(mask.shape)} is shorter than the attention sequence"
    return span


def split_tokens(x: torch.Tensor, start: int, n: int, dim: int = 1) -> tuple:
    """(before, part, after) views of x along `dim`; (None, x, None) when the part is all of x."""
    if start == 0 and n == x.shape[dim]:
        return None, x, None
    return tuple(x.split([start, n, x.shape[dim] - start - n], dim=dim))


def join_tokens(before, part, after, dim: int = 1) -> torch.Tensor:
    """Inverse of split_tokens for a new middle part: one cat of the non-empty pieces."""
    pieces = [t for t in (before, part, after) if t is not None and t.shape[dim]]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def with_image_pe(pe: torch.Tensor, span: ImageSpan, family: Family, batch: int, take: Callable,
                  shared=None) -> torch.Tensor:
    """`pe` with its image part (as stored: batch 1 when shared) replaced by take(image part)."""
    d = span.pe_dim
    p0 = (span.n_txt if family.pe_has_text else 0) + span.img_start

    def parts():
        before, img, after = pe.split([p0, span.n_img, pe.shape[d] - p0 - span.n_img], dim=d)
        if pe.shape[0] != batch:  # a batch-shared table: every row gets its own image part
            before, after = (t.expand(batch, *t.shape[1:]) for t in (before, after))
        return before, img, after

    before, img, after = parts() if shared is None else shared.get(("pe parts", d, p0, span.n_img, batch), (pe,),
                                                                    parts)
    return torch.cat([t for t in (before, take(img), after) if t.shape[d]], dim=d)


def per_token_vec(vec, x: torch.Tensor) -> bool:
    """Per-token modulation (Wan 2.2 TI2V): vec has one entry per token of args["img"]."""
    return isinstance(vec, torch.Tensor) and vec.ndim >= 3 and vec.shape[1] == x.shape[1] and x.shape[1] > 1
