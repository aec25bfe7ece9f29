"""Model families: where the image tokens sit in each family's block arguments, host-free.

A Family says which slice of a block's args["img"] holds the latent's image tokens (text and reference
tokens are never reduced) and how pe and masks line up; `image_span` checks a call against it. Where the
text sits in a joint sequence is read from the calls and the host's own blocks (`TextOrder`); a modulation
that differs between token ranges follows a reduced call (`shift_ranges`) or the call runs unreduced
(`modulation_mismatch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import key_bias_hook, override_attention, seq_dim, size_weighted_hook
from .token_ops import MergePlan


@dataclass(frozen=True)
class BlockSpec:
    key: tuple                     # patches_replace key, e.g. ("double_block", 3)
    index: int                     # depth index over all patched blocks
    text_in_img: bool              # single-stream block: args["img"] joins the text and image streams
    img_at_end: bool = False       # reference tokens first: the latent's are the last n_img (before padding)
    cross_attention: bool = False  # args["txt"] is attended by cross-attention, not joined with the image


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
    text_order_from_calls: bool = False  # single-stream blocks join the streams in an order TextOrder reads
    modulation_range_dim: int | None = None  # axis of a modulation tensor that would index token ranges

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def flux_family(name: str, n_double: int, n_single: int, text_order_from_calls: bool = True) -> Family:
    """Flux, Flux Kontext and Chroma: double-stream then single-stream blocks. `text_order_from_calls`
    False: a model of the pack's own (the reference DiT, the benchmark's dry run), text first by construction."""
    blocks = [BlockSpec(("double_block", i), i, False) for i in range(n_double)]
    blocks += [BlockSpec(("single_block", i), n_double + i, True) for i in range(n_single)]
    return Family(name, tuple(blocks), has_rope=True, text_order_from_calls=text_order_from_calls,
                  modulation_range_dim=1)


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
    """HunyuanVideo (and HunyuanImage 2.1): Flux-like with the reference before the image and a text key
    mask; hosts up to 0.3.75 put the text after the image, 0.33 before it (TextOrder reads which)."""
    blocks = [BlockSpec(("double_block", i), i, False, img_at_end=True) for i in range(n_double)]
    blocks += [BlockSpec(("single_block", i), n_double + i, True, img_at_end=True) for i in range(n_single)]
    return Family(name, tuple(blocks), has_rope=True, key_mask_arg="attention_mask", text_order_from_calls=True,
                  modulation_range_dim=1)


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


def image_span(spec: BlockSpec, args: dict, n_img: int, n_txt_single: int, family: Family,
               text_first: bool = True) -> ImageSpan | str | None:
    """Locate the image tokens; `text_first`: the joint sequence puts the text before the image streams
    (TextOrder). None: a call left alone by design; a string: why the call does not match the family."""
    img = args["img"]
    if img.ndim != 3:
        return f"img has {img.ndim} dims, expected (batch, tokens, channels)"
    if n_img < 4:
        return None
    if args.get("attn_mask") is not None:
        return None  # a token-level mask would need re-indexing; such calls run unreduced
    n_txt_arg = args["txt"].shape[1] if args.get("txt") is not None else 0
    n_after = 0
    pad = (-n_img) % family.pad_multiple if family.pad_multiple else 0
    if spec.text_in_img:  # the text stream, then the image stream, or the other way round
        stream = img.shape[1] - n_txt_single
        start = (n_txt_single if text_first else 0) + (stream - n_img - pad if spec.img_at_end else 0)
        n_txt = 0
    else:
        start = img.shape[1] - n_img - pad if spec.img_at_end else 0
        n_txt, n_after = (n_txt_arg, 0) if text_first else (0, n_txt_arg)
    if spec.cross_attention:
        n_txt, n_after = 0, 0
    if start < 0 or img.shape[1] < start + n_img:
        return f"{img.shape[1]} tokens in the block, {n_img} image tokens expected from position {start}"
    why = modulation_mismatch(args, family, start, n_img)
    if why:
        return why
    span = ImageSpan(start, n_img, n_txt, spec.cross_attention, n_after, text_first)
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


# ---- where the text sits -------------------------------------------------------------------------

def single_stream_text_first(seq: torch.Tensor, txt_stream, n_txt: int) -> bool | str:
    """Whether a single-stream block's sequence is cat(text, image) (True) or cat(image, text) (False), read
    from the call: the text stream the last double block returned sits, unchanged, at one end of it."""
    if n_txt == 0:
        return True
    if not isinstance(txt_stream, torch.Tensor) or txt_stream.shape != (seq.shape[0], n_txt, seq.shape[2]):
        return "no text stream from a double block to find in the single-stream sequence"
    if torch.equal(seq[:, :n_txt], txt_stream):
        return True
    if torch.equal(seq[:, -n_txt:], txt_stream):
        return False
    return "the single-stream sequence has the text stream at neither end"


class _QueriesSeen(Exception):
    """Stops a probed block at its first attention: the queries are all the probe needs."""


def probe_text_first(args: dict, host_block: Callable, family: Family) -> bool | str:
    """Whether a double block's joint attention puts the text before the image stream, as the host's own
    block shows. The block runs twice on one text and one image token, up to its first attention: the first
    time as given, the second with the image token changed; the query that moves is the image's, second
    (True) or first (False). Rotary table and key mask are cut to two entries (which entries does not
    matter: only which query moves is read)."""
    img, txt = args["img"], args["txt"]
    length = txt.shape[1] + img.shape[1]
    probe = dict(args, img=img[:, :1], txt=txt[:, :1])
    pe = args.get("pe")
    if family.has_rope and isinstance(pe, torch.Tensor):
        d = next((d for d in (family.pe_token_dim, 3 - family.pe_token_dim) if pe.ndim > d and pe.shape[d] == length),
                 None)
        if d is None:
            return f"rotary table of shape {tuple(pe.shape)} has no axis of the {length} attention tokens"
        probe["pe"] = pe.narrow(d, 0, 2)
    mask = args.get(family.key_mask_arg) if family.key_mask_arg else None
    if isinstance(mask, torch.Tensor):
        probe[family.key_mask_arg] = mask[..., :2]
    queries = []

    def capture(ordinal, a, kw):
        queries.append(a[0].detach().movedim(seq_dim(kw), 1).flatten(2))
        raise _QueriesSeen

    bump = torch.randn(img.shape[0], 1, img.shape[2], generator=torch.Generator().manual_seed(0)).to(img)
    for image in (probe["img"].clone(), probe["img"] + bump):
        to = override_attention(args.get("transformer_options") or {}, capture, first_call_only=True)
        try:
            with torch.no_grad():
                host_block(dict(probe, img=image, txt=probe["txt"].clone(), transformer_options=to))
        except _QueriesSeen:
            pass
        except Exception as e:  # a block that cannot run on two tokens: unverified, never the user's run failed
            return f"the double block could not be probed ({type(e).__name__}: {str(e)[:100]})"
    if len(queries) != 2 or queries[0].shape[1] != 2:
        return "the double block's joint attention could not be observed"
    moved = torch.nonzero((queries[0] != queries[1]).any(dim=2).any(dim=0)).flatten().tolist()
    if moved in ([1], [0]):
        return moved == [1]
    return f"changing the image token moved the joint attention's queries {moved}"


class TextOrder:
    """Where the text sits in the joint sequences of a family whose host joins a text and an image stream
    for its single-stream blocks (Family.text_order_from_calls), read from the calls.

    Double blocks: probe_text_first on the host's own block, once per text and joint length (two runs on two
    tokens, up to the first attention). Single blocks: verified at the first one of every call
    (single_stream_text_first); a call that disagrees with its double blocks runs unreduced, and so do the
    double blocks of later calls of that shape. Per-call state lives on the call (`txt_stream`, `text_first`)."""

    def __init__(self, family: Family):
        self.family = family
        self.known: dict = {}  # (text tokens, joint tokens) -> True, False, or why it is unverified

    def of(self, spec: BlockSpec, args: dict, call, host_block: Callable | None = None) -> bool | str | None:
        """True / False: the text comes first / last; a string: unverified, why; None: not known (no host block
        to probe)."""
        if not self.family.text_order_from_calls or spec.cross_attention:
            return True
        if spec.text_in_img:
            if call.text_first is None:
                key = (call.n_txt, args["img"].shape[1])
                seen = single_stream_text_first(args["img"], call.txt_stream, call.n_txt)
                doubles = self.known.get(key)
                if isinstance(seen, bool) and isinstance(doubles, bool) and seen is not doubles:
                    seen = "the single-stream blocks put the text elsewhere than the double blocks"
                if isinstance(seen, str):
                    self.known[key] = seen
                call.text_first, call.txt_stream = seen, None
            return call.text_first
        n_txt = args["txt"].shape[1] if args.get("txt") is not None else 0
        key = (n_txt, n_txt + args["img"].shape[1])
        if key not in self.known and host_block is not None and n_txt:
            self.known[key] = probe_text_first(args, host_block, self.family)
        return self.known.get(key, True if not n_txt else None)

    def block_done(self, spec: BlockSpec, out: dict, call):
        if self.family.text_order_from_calls and not spec.text_in_img:
            call.txt_stream = out.get("txt")


# ---- modulation that differs between token ranges ------------------------------------------------

# Block arguments that name token ranges of args["img"] with a modulation of their own: each a list of
# (start, end or None, ...) (HunyuanVideo's image-to-video frames, NextDiT's reference images).
RANGE_ARGS = ("modulation_dims", "modulation_dims_img", "timestep_zero_index")


def modulation_ranges(args: dict) -> dict:
    """{argument: ranges} of the RANGE_ARGS this call passes."""
    return {name: args[name] for name in RANGE_ARGS if args.get(name) is not None}


def _tensors(value):
    """The tensors in a modulation argument: a tensor, or tuples / dataclasses of them (Flux's ModulationOut)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))


def modulation_mismatch(args: dict, family: Family, start: int, n_img: int) -> str | None:
    """Why the image tokens cannot keep their own modulation when reduced, or None.

    Ranges the block arguments name are shifted for a reduced call (shift_ranges) unless one splits the
    image tokens. A modulation with more rows than the batch (Qwen-Image-Edit 2511's reference tokens), or
    with a range axis (Flux's index_timestep_zero), indexes ranges the arguments do not name."""
    ranges = modulation_ranges(args)
    for name, value in ranges.items():
        for r in ([(value, None)] if isinstance(value, int) else value):
            if any(b is not None and start < b < start + n_img for b in r[:2]):
                return f"{name} gives part of the image tokens a modulation of their own"
    if ranges:
        return None
    batch = args["img"].shape[0]
    for t in _tensors(args.get("vec")):
        if t.ndim and t.shape[0] not in (1, batch):
            return "its modulation has more rows than the batch (token ranges with a modulation of their own)"
        d = family.modulation_range_dim
        if d is not None and t.ndim > d + 1 and t.shape[d] > 1:
            return "its modulation has a range axis (token ranges with a modulation of their own)"
    return None


def shift_ranges(args: dict, new_args: dict, img_end: int, removed: int) -> dict:
    """`new_args` with each RANGE_ARGS boundary past the image tokens (which end at `img_end` in `args`)
    moved back by the `removed` tokens of a reduced call."""
    ranges = modulation_ranges(args)
    if not ranges or not removed:
        return new_args
    new_args = dict(new_args)

    def moved(b):
        return b - removed if b is not None and b >= img_end else b

    for name, value in ranges.items():
        new_args[name] = (moved(value) if isinstance(value, int) else
                          [type(r)((moved(r[0]), moved(r[1]), *r[2:])) for r in value])
    return new_args


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


def run_block_merged(args: dict, original_block: Callable, plan: MergePlan, span: ImageSpan,
                     family: Family, key_bias: torch.Tensor | None = None, shared=None, pieces=None,
                     key_weights: torch.Tensor | None = None) -> dict:
    """Run a block on merged image tokens and restore full density: X + Unmerge(F(Merge X) - Merge X).

    A group takes its representative's rotary position. Proportional attention: `key_bias` (B, M) as a
    mask, or `key_weights` (B, M) without one (attention.size_weighted_hook).
    """
    x = args["img"]
    a = span.img_start
    before, main, after = pieces if pieces is not None else split_tokens(x, a, span.n_img)
    merged = plan.merge(main)
    new_args = dict(args)
    joined = join_tokens(before, merged, after)
    # Hosts update the block input in place (Flux: img += ...); merged is needed after the block.
    new_args["img"] = merged.clone() if joined is merged else joined
    if span.pe_dim is not None:
        pe = args["pe"]

        def merged_pe():
            return with_image_pe(pe, span, family, x.shape[0], lambda t: plan.take_rep(t, dim=span.pe_dim), shared)

        new_args["pe"] = merged_pe() if shared is None else shared.get(("merged pe", span.pe_dim, span.key_offset),
                                                                          (pe, plan), merged_pe)
    mask = args.get(family.key_mask_arg) if family.key_mask_arg else None
    if isinstance(mask, torch.Tensor):  # a per-key mask (HunyuanVideo's text mask): merged keys take their rep's
        k0 = span.key_offset
        mask = mask.expand(x.shape[0], *mask.shape[1:]) if mask.shape[0] != x.shape[0] else mask
        new_args[family.key_mask_arg] = torch.cat(
            [mask[..., :k0], plan.take_rep(mask[..., k0:k0 + span.n_img], dim=mask.ndim - 1),
             mask[..., k0 + span.n_img:]], dim=-1)
    vec = args.get("vec")
    if per_token_vec(vec, x):  # merged tokens take their group's mean modulation
        img_vec = vec[:, a:a + span.n_img]
        merged_vec = plan.merge(img_vec.flatten(2)).unflatten(2, img_vec.shape[2:])
        new_args["vec"] = torch.cat([vec[:, :a], merged_vec, vec[:, a + span.n_img:]], dim=1)
    hook = (key_bias_hook(key_bias, span.key_offset, plan.n_out, shared) if key_bias is not None else
            size_weighted_hook(key_weights, span.key_offset, plan.n_out, shared) if key_weights is not None else None)
    if hook is not None:
        new_args["transformer_options"] = override_attention(args.get("transformer_options") or {}, hook,
                                                             first_call_only=span.cross_attention)
    out = original_block(new_args)
    y_before, y_merged, y_after = split_tokens(out["img"], a, plan.n_out)
    out = dict(out)
    out["img"] = join_tokens(y_before, main + plan.unmerge(y_merged - merged), y_after)
    return out


def matmul_flops(tokens: float, query_key_pairs: float, width: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of a block: 2 (4 + 2 mlp_ratio) C^2 per token through the linear layers, 4 C per
    query-key pair in attention."""
    return 2.0 * (4.0 + 2.0 * mlp_ratio) * width * width * tokens + 4.0 * width * query_key_pairs


def block_flops(n_tokens: float, width: int, mlp_ratio: float = 4.0, n_keys: float | None = None) -> float:
    """matmul_flops of one block on one sequence; `n_keys` (default n_tokens): keys per query (CAT's pruned
    queries see every key)."""
    return matmul_flops(n_tokens, n_tokens * (n_tokens if n_keys is None else n_keys), width, mlp_ratio)
