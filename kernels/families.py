"""Model families: where the image tokens sit in each family's block arguments, host-free.

A Family says which slice of a block's args["img"] holds the latent's image tokens (text and reference
tokens are never reduced) and how pe and masks line up; `image_span` checks a call against it. Where the
text sits in a joint sequence is read from the calls and the host's own blocks (`TextOrder`); a modulation
that differs between token ranges follows a reduced call (`shift_ranges`) or the call runs unreduced
(`modulation_mismatch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .attention import override_attention, seq_dim
from .token_ops import take_rows


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
    layer_args: tuple = ()         # with layer_list: (layer forward parameter, block-args key) of those read
    layer_mask: str | None = None  # with layer_list: the block-args key of a key mask (masking any key: unreduced)
    pad_multiple: int | None = None  # image tokens padded to a multiple of this (Z-Image)
    text_order_from_calls: bool = False  # single-stream blocks join the streams in an order TextOrder reads
    modulation_range_dim: int | None = None  # axis of a modulation tensor that would index token ranges
    block_args: "BlockArgs | None" = None  # the host names its block arguments otherwise (see BlockArgs)
    locate: Callable | None = None  # (runner args, n_img) -> image start in args["img"], or why not found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class BlockArgs:
    """How a family's block call maps onto the runners' arguments: "img" (B, L, C) holding the image tokens,
    "txt", "vec", "pe", the key mask and "transformer_options"; and back (LTX-2's (video, audio) pairs,
    MiniMax H3's batch-less sequence). Families whose blocks use the runners' names need none."""

    def view(self, args: dict) -> dict | str | None:
        """The runners' arguments of a host block call; None: a call left alone by design; a string: why the
        call cannot be reduced."""
        raise NotImplementedError

    def host(self, view: dict, args: dict) -> dict:
        """Host block arguments from (possibly reduced) runner arguments; `args`: the host call's own."""
        raise NotImplementedError

    def out_view(self, out: dict) -> dict:
        """A host block's output as the runners read it ({"img": ...})."""
        return self.view(out)

    def out_host(self, out: dict, args: dict) -> dict:
        """The runners' output as the host's block wrapper returns it."""
        return self.host(out, args)


def block_view(family: Family, args: dict, host_block: Callable) -> tuple:
    """(runner args or why not, the block on runner args, the runners' output back to the host's) of one block
    call; `host_block` runs the block (and any replace beneath) on host args."""
    adapter = family.block_args
    if adapter is None:
        return args, host_block, _same
    view = adapter.view(args)
    if not isinstance(view, dict):
        return view, host_block, _same
    return (view, lambda a: adapter.out_view(host_block(adapter.host(a, args))),
            lambda out: adapter.out_host(out, args))


def _same(out):
    return out


def block_tokens(family: Family, args: dict) -> int:
    """Tokens of args["img"] in a host block call, as the runners see them."""
    view = family.block_args.view(args) if family.block_args is not None else args
    return view["img"].shape[1] if isinstance(view, dict) else 0


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
                  layer_args=(("x", "img"), ("x_mask", "x_mask"), ("freqs_cis", "pe"), ("adaln_input", "vec"),
                              ("transformer_options", "transformer_options")),
                  layer_mask="x_mask", pad_multiple=pad_multiple)


def krea2_family(name: str, n_blocks: int) -> Family:
    """Krea 2 (SingleStreamDiT): one sequence [text, image, references] per block, no per-block hook (the glue
    patches its blocks' forward); the host names the image range in transformer_options["img_slice"]."""
    blocks = tuple(BlockSpec(("layer", i), i, True) for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, layer_list="blocks", locate=_img_slice_start,
                  layer_args=(("x", "img"), ("vec", "vec"), ("freqs", "pe"), ("mask", "mask"),
                              ("transformer_options", "transformer_options")), layer_mask="mask")


def _img_slice_start(args: dict, n_img: int):
    """The image starts where the host's img_slice (text length, sequence length) says."""
    img_slice = (args.get("transformer_options") or {}).get("img_slice")
    n = args["img"].shape[1]
    if not img_slice or img_slice[1] != n or n - img_slice[0] < n_img:
        return f"img_slice {img_slice} of a {n}-token block does not hold the {n_img} image tokens"
    return int(img_slice[0])


def scail_family(name: str, n_blocks: int) -> Family:
    """Wan SCAIL: Wan's blocks over [reference frames, video, time concat?, pose tokens]."""
    blocks = tuple(BlockSpec(("double_block", i), i, False, cross_attention=True) for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, pe_has_text=False, locate=_scail_image_start)


def kandinsky5_family(name: str, n_blocks: int) -> Family:
    """Kandinsky 5: visual blocks over the video tokens alone, text by cross-attention. Its per-block hook
    calls the blocks with argument names they do not take (0.33), so the glue patches their forward."""
    blocks = tuple(BlockSpec(("layer", i), i, False, cross_attention=True) for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, pe_has_text=False, locate=_whole_sequence,
                  layer_list="visual_transformer_blocks",
                  layer_args=(("visual_embed", "img"), ("text_embed", "txt"), ("time_embed", "vec"), ("freqs", "pe"),
                              ("transformer_options", "transformer_options")))


def minimax_h3_family(name: str, n_blocks: int) -> Family:
    """MiniMax H3: one packed sequence [text, conditions, audio, video] of batch 1 per block, the video last,
    with modulation per segment (mod_segments) and a rotary table over the whole sequence."""
    blocks = tuple(BlockSpec(("double_block", i), i, True) for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, block_args=MiniMaxH3Args(),
                  locate=_video_segment_start)


class MiniMaxH3Args(BlockArgs):
    """MiniMax H3's block arguments: h (S, C) without a batch axis, t_emb, mod_segments [(start, stop, row)]
    covering h with the video last, rope_freqs (1, S, 1, ...). The runners see h as a batch of one; a reduced
    video keeps its segment's modulation row over its new length."""

    def view(self, args: dict) -> dict | str:
        segments = args.get("mod_segments") or []
        h = args["img"]
        if h.ndim != 2 or not segments or segments[-1][1] != h.shape[0]:
            return "expected h (tokens, channels) with mod_segments ending at its last token"
        if isinstance(segments[-1][2], torch.Tensor):
            return "the video has a modulation row per token (a denoise mask)"
        return {**args, "img": h.unsqueeze(0), "pe": args["rope_freqs"]}

    def host(self, view: dict, args: dict) -> dict:
        h = view["img"][0]
        start, _, row = args["mod_segments"][-1]
        host = {k: v for k, v in view.items() if k != "pe"}
        host.update(img=h, rope_freqs=view["pe"], mod_segments=args["mod_segments"][:-1] + [(start, h.shape[0], row)])
        return host

    def out_view(self, out: dict) -> dict:
        return {**out, "img": out["img"].unsqueeze(0)}

    def out_host(self, out: dict, args: dict) -> dict:
        return {**out, "img": out["img"][0]}


def _video_segment_start(args: dict, n_img: int):
    """MiniMax H3: the video is the last modulation segment."""
    start, stop, _ = args["mod_segments"][-1]
    if stop - start != n_img:
        return f"the last segment holds {stop - start} tokens, expected the {n_img} video tokens"
    return start


def ltxav_family(name: str, n_blocks: int) -> Family:
    """LTX-2 (LTXAVModel): each block takes (video, audio) tokens; video self-attention first, then text
    cross-attention, audio, and audio-video cross-attention. Only the video tokens are reduced."""
    blocks = tuple(BlockSpec(("double_block", i), i, False, cross_attention=True) for i in range(n_blocks))
    return Family(name, blocks, has_rope=True, pe_token_dim=1, pe_has_text=False, block_args=LTXAVArgs(),
                  locate=_whole_sequence)


LTX_VIDEO_TOKEN_ARGS = ("v_pe", "v_cross_pe", "v_timestep", "v_cross_scale_shift_timestep", "v_cross_gate_timestep")


class LTXAVArgs(BlockArgs):
    """LTX-2's block arguments: img = (video, audio). The runners see the video as img and, as its "pe", each
    token's index; when they reduce the video, every per-video-token argument (the rotary tables, the
    timesteps, per token or compressed per frame) is taken at the indices that come back, so each kept or
    representative token keeps its own. The audio passes through the block beside the reduced video."""

    def view(self, args: dict) -> dict | str | None:
        vx, ax = args["img"]
        if args.get("self_attention_mask") is not None:
            return "a guide attention mask (keyframe guides) indexes the video tokens"
        to = args.get("transformer_options") or {}
        if to.get("stg_skip_self_attn") or not to.get("run_vx", True):
            return None  # spatio-temporal guidance replaces the video self-attention here: left alone
        index = torch.arange(vx.shape[1], device=vx.device, dtype=torch.float32).view(1, -1, 1)
        return {**args, "img": vx, "audio": ax, "pe": index}

    def host(self, view: dict, args: dict) -> dict:
        vx = view["img"]
        host = {k: v for k, v in view.items() if k not in ("pe", "audio")}
        host["img"] = (vx, view["audio"])
        if vx.shape[1] != args["img"][0].shape[1]:  # reduced: each token's own entries, by its index
            index = view["pe"][..., 0].long()
            for key in LTX_VIDEO_TOKEN_ARGS:
                host[key] = _tokens_at(args[key], index)
        return host

    def out_view(self, out: dict) -> dict:
        vx, ax = out["img"]
        return {**out, "img": vx, "audio": ax}

    def out_host(self, out: dict, args: dict) -> dict:
        host = {k: v for k, v in out.items() if k != "audio"}
        host["img"] = (out["img"], out["audio"])
        return host


def _tokens_at(value, index: torch.Tensor):
    """A per-video-token argument of LTX-2 at token `index` (B, K): a rotary (table, split) pair, a timestep
    tensor (B, 1 or tokens, F), or the host's per-frame CompressedTimestep (returned per token)."""
    if isinstance(value, tuple):
        return (take_rows(value[0], index, 1),) + tuple(value[1:])
    if isinstance(value, torch.Tensor):
        return value if value.shape[1] == 1 else take_rows(value, index, 1)
    per_frame, data = int(getattr(value, "patches_per_frame", 0) or 0), getattr(value, "data", None)
    if per_frame < 1 or not isinstance(data, torch.Tensor):
        raise TypeError(f"LTX-2: an unknown per-token timestep {type(value).__name__}")
    if data.shape[1] == 1:
        return value  # one entry for every token
    return take_rows(data, torch.div(index, per_frame, rounding_mode="floor"), 1)


def first_stream(x, shapes):
    """The image (video) stream of a latent that packs several streams (LTX-2, MiniMax H3: video, audio), as
    the host packs them (each flattened into (B, 1, n) and joined); `x` itself when nothing is packed."""
    if not shapes or len(shapes) < 2:
        return x
    n = math.prod(shapes[0][1:])
    return x[:, :, :n].reshape(x.shape[0], *shapes[0][1:])


def with_first_stream(x, shapes, first):
    """`x` with its first packed stream replaced by `first`."""
    if not shapes or len(shapes) < 2:
        return first
    n = math.prod(shapes[0][1:])
    return torch.cat([first.reshape(x.shape[0], 1, n).to(x.dtype), x[:, :, n:]], dim=-1)


CONDS_KEY = "token_reduction_conds"  # transformer_options: the model call's own conditioning (reference latents)


def _conds(args: dict) -> dict:
    return (args.get("transformer_options") or {}).get(CONDS_KEY) or {}


def _whole_sequence(args: dict, n_img: int):
    """The block sees the image tokens alone."""
    n = args["img"].shape[1]
    return 0 if n == n_img else f"{n} tokens in the block, expected the {n_img} image tokens alone"


def _frame_tokens(latent, per_frame: int) -> int:
    """Tokens of a conditioning video latent (B, C, T, H, W) at `per_frame` tokens a frame; 0 for none."""
    return int(latent.shape[2]) * per_frame if isinstance(latent, torch.Tensor) and latent.ndim == 5 else 0


def _scail_image_start(args: dict, n_img: int):
    """SCAIL: its grid (transformer_options["grid_sizes"]) spans the reference frames, the latent's and any
    time-concatenated frames; the pose tokens follow. The reference latent says where the image starts."""
    grid = (args.get("transformer_options") or {}).get("grid_sizes")
    if grid is None or len(grid) != 3:
        return "no (frames, height, width) grid_sizes in transformer_options"
    per_frame = int(grid[1]) * int(grid[2])
    conds = _conds(args)
    n_ref = _frame_tokens(conds.get("reference_latent"), per_frame)
    n_concat = _frame_tokens(conds.get("time_dim_concat"), per_frame)
    n_grid = int(grid[0]) * per_frame
    if n_ref + n_img + n_concat != n_grid or args["img"].shape[1] < n_grid:
        return (f"grid of {n_grid} tokens in a block of {args['img'].shape[1]}, expected {n_ref} reference + "
                f"{n_img} image + {n_concat} concatenated tokens")
    return n_ref


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
    if family.locate is not None:  # the family reads the image start from the call's own tensors
        start = family.locate(args, n_img)
        if isinstance(start, str):
            return start
        n_txt = 0
    elif spec.text_in_img:  # the text stream, then the image stream, or the other way round
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
