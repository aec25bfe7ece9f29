"""Embedded reference model: a compact Flux-style DiT in pixel space, without ComfyUI.

The layers, the rotary embedding (`pe` of shape (B, 1, L_txt + L_img, D/2, 2, 2)
from 3-axis ids), the block calling convention and the attention hook follow
ComfyUI's comfy/ldm/flux (model.py forward_orig, layers.py, math.py) and
comfy/ldm/modules/attention.py wrap_attn, so that the pack's runtime
(kernels.runtime) drives this model exactly as it drives Flux:

- `patches_replace["dit"][("double_block", i)]` gets {"img", "txt", "vec", "pe",
  "attn_mask", "transformer_options"} and {"original_block": wrap};
- `patches_replace["dit"][("single_block", i)]` gets {"img" = cat(txt, img), "vec",
  "pe", "attn_mask", "transformer_options"};
- `transformer_options["optimized_attention_override"]` is called as
  override(func, q, k, v, heads, mask=..., skip_reshape=True, transformer_options=...).

Parameter names follow Flux's state dict (see DiTConfig.flux_params). The
condition is a class id: a short sequence of text tokens (an embedding per
class) plus a pooled vector; id `num_classes` is the empty (unconditional) class
for classifier-free guidance. The model predicts the rectified-flow velocity
v = noise - image for x_sigma = (1 - sigma) * image + sigma * noise.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from kernels.attention import ATTENTION_OVERRIDE_KEY
from kernels.families import Family, flux_family
from kernels.runtime import Runtime
from kernels.schedule import ProgressMap, flow_percent_to_sigma

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "reference_dit.safetensors"
# The reference models by name: 64 px (16x16 tokens) and 128 px (32x32 tokens) on the procedural shapes,
# 256 px (64x64 tokens, Flux-dev's grid at 1024²) on the procedural scenes; tools/weights/README.md.
MODELS = {"64px": WEIGHTS_PATH, "128px": WEIGHTS_PATH.with_name("reference_dit_128.safetensors"),
          "256px": WEIGHTS_PATH.with_name("reference_dit_256.safetensors")}
# Per-call hooks run by `model_call`, this model's analogue of ComfyUI's APPLY_MODEL wrappers.
APPLY_MODEL_HOOKS_KEY = "reference_apply_model_hooks"
# Hooks run after it, hook(x, sigma, options, out) -> out (a stateful method such as CAT reuses cached noise).
APPLY_MODEL_AFTER_KEY = "reference_apply_model_after_hooks"
# Wrappers around the whole call, wrapper(call_next, x, sigma, class_ids, options) -> out, outermost first: this
# model's analogue of an APPLY_MODEL wrapper that may skip the model (a step cache, tools/step_cache.py).
MODEL_WRAPPERS_KEY = "reference_model_wrappers"


@dataclass
class DiTConfig:
    image_size: int = 64          # pixels per side of generated images (32x32 = 1024 image tokens)
    channels: int = 3             # RGB
    patch_size: int = 2
    hidden: int = 128
    heads: int = 2
    depth_double: int = 2
    depth_single: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10         # class ids 0..num_classes-1; num_classes = unconditional
    txt_len: int = 4              # text tokens per class condition
    context_dim: int = 64         # width of the text tokens before txt_in
    vec_dim: int = 64             # width of the pooled condition before vector_in
    axes_dim: tuple = (16, 24, 24)  # rotary dims per id axis; sums to hidden // heads
    theta: int = 10000
    data: str = "shapes"          # what the class ids name: a data set of tools/procedural.py (DATASETS)

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.hidden % self.heads or sum(self.axes_dim) != self.hidden // self.heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to hidden/heads = {self.hidden // self.heads}")
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim entries must be even, got {self.axes_dim}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def flux_params(self) -> dict:
        """Keyword arguments of comfy.ldm.flux.model.Flux with the same blocks: every parameter of
        ReferenceDiT except class_txt / class_vec loads into it under the same name."""
        return dict(in_channels=self.channels, out_channels=self.channels, vec_in_dim=self.vec_dim,
                    context_in_dim=self.context_dim, hidden_size=self.hidden, mlp_ratio=self.mlp_ratio,
                    num_heads=self.heads, depth=self.depth_double, depth_single_blocks=self.depth_single,
                    axes_dim=list(self.axes_dim), theta=self.theta, patch_size=self.patch_size, qkv_bias=True,
                    guidance_embed=False)

    @classmethod
    def from_json(cls, text: str) -> "DiTConfig":
        return cls(**json.loads(text))


# The configuration each reference model is trained at (tools/train_reference.py --model NAME). The 256 px
# model: 4x4 patches give Flux's 64x64 token grid; its width and depth are sized for a few minutes on one GPU
# (tools/weights/README.md has the arithmetic).
_SHAPES = dict(patch_size=4, hidden=128, heads=2, depth_double=2, depth_single=4, num_classes=10, axes_dim=(16, 24, 24))
MODEL_CONFIGS = {"64px": DiTConfig(image_size=64, **_SHAPES), "128px": DiTConfig(image_size=128, **_SHAPES),
                 "256px": DiTConfig(image_size=256, patch_size=4, hidden=224, heads=4, depth_double=2,
                                    depth_single=4, num_classes=10, axes_dim=(8, 24, 24), data="scenes")}


# ---- attention, as comfy.ldm.modules.attention (wrap_attn + attention_pytorch) -----------------

def wrap_attn(func):
    """Dispatch to transformer_options["optimized_attention_override"] once, like ComfyUI."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if "_inside_attn_wrapper" in kwargs:
            return func(*args, **kwargs)
        kwargs["_inside_attn_wrapper"] = True
        to = kwargs.get("transformer_options")
        if to is not None and ATTENTION_OVERRIDE_KEY in to:
            return to[ATTENTION_OVERRIDE_KEY](func, *args, **kwargs)
        return func(*args, **kwargs)
    return wrapper


@wrap_attn
def attention_sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """torch SDPA; `mask` is an additive float (or bool) mask broadcastable to (B, H, Lq, Lk)."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask=None, transformer_options={}) -> Tensor:
    """comfy.ldm.flux.math.attention: rotary on q, k then the (overridable) attention."""
    q_shape, k_shape = q.shape, k.shape
    if pe is not None:
        q = q.to(dtype=pe.dtype).reshape(*q.shape[:-1], -1, 1, 2)
        k = k.to(dtype=pe.dtype).reshape(*k.shape[:-1], -1, 1, 2)
        q = (pe[..., 0] * q[..., 0] + pe[..., 1] * q[..., 1]).reshape(*q_shape).type_as(v)
        k = (pe[..., 0] * k[..., 0] + pe[..., 1] * k[..., 1]).reshape(*k_shape).type_as(v)
    return attention_sdpa(q, k, v, q.shape[1], skip_reshape=True, mask=mask, transformer_options=transformer_options)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(dtype=torch.float32), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).to(torch.float32)


class EmbedND(nn.Module):
    def __init__(self, theta: int, axes_dim: tuple):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:  # (B, L, 3) -> (B, 1, L, D/2, 2, 2)
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period=10000, time_factor: float = 1000.0) -> Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---- layers, as comfy.ldm.flux.layers --------------------------------------------------------------

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, weight=self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):  # a weight container, as in Flux
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv, self.norm, self.proj = nn.Linear(dim, 3 * dim), QKNorm(dim // heads), nn.Linear(dim, dim)


class Modulation(nn.Module):
    """adaLN: vec (B, C) -> n chunks (B, 1, C): shift, scale, gate(, shift, scale, gate)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n, self.lin = n, nn.Linear(dim, n * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec[:, None, :])).chunk(self.n, dim=-1)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


class DoubleStreamBlock(nn.Module):
    """Separate img / txt weights, joint attention over cat(txt, img)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = heads
        self.img_mod, self.txt_mod = Modulation(hidden, 6), Modulation(hidden, 6)
        self.img_attn, self.txt_attn = SelfAttention(hidden, heads), SelfAttention(hidden, heads)
        self.img_mlp, self.txt_mlp = _mlp(hidden, mlp_ratio), _mlp(hidden, mlp_ratio)

    def _qkv(self, attn: SelfAttention, x: Tensor, shift, scale):
        qkv = attn.qkv(_ln(x) * (1 + scale) + shift)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        im, tm = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self._qkv(self.img_attn, img, im[0], im[1])
        tq, tk, tv = self._qkv(self.txt_attn, txt, tm[0], tm[1])
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2),
                         pe=pe, mask=attn_mask, transformer_options=transformer_options)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im[2] * self.img_attn.proj(img_attn)
        img = img + im[5] * self.img_mlp(_ln(img) * (1 + im[4]) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(txt_attn)
        txt = txt + tm[5] * self.txt_mlp(_ln(txt) * (1 + tm[4]) + tm[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on cat(txt, img)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads, self.hidden_size, self.mlp_hidden_dim = heads, hidden, int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(hidden // heads)
        self.modulation = Modulation(hidden, 3)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(_ln(x) * (1 + scale) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(_ln(x) * (1 + scale) + shift)


class ReferenceDiT(nn.Module):
    """`host_layers` (comfy.ldm.flux.layers, comfy.ops class): build ComfyUI's own Flux blocks instead (same
    parameter names and calling convention; their weights start uninitialised)."""

    def __init__(self, config: DiTConfig | None = None, host_layers=None):
        super().__init__()
        c = self.config = config or DiTConfig()
        self.patch_size = c.patch_size
        self.img_in = nn.Linear(c.channels * c.patch_size ** 2, c.hidden)
        self.time_in = MLPEmbedder(256, c.hidden)
        self.vector_in = MLPEmbedder(c.vec_dim, c.hidden)
        self.txt_in = nn.Linear(c.context_dim, c.hidden)
        self.class_txt = nn.Embedding(c.num_classes + 1, c.txt_len * c.context_dim)  # text tokens per class
        self.class_vec = nn.Embedding(c.num_classes + 1, c.vec_dim)                  # pooled condition
        self.pe_embedder = EmbedND(c.theta, c.axes_dim)
        if host_layers is None:
            double, single = (lambda: DoubleStreamBlock(c.hidden, c.heads, c.mlp_ratio),
                              lambda: SingleStreamBlock(c.hidden, c.heads, c.mlp_ratio))
        else:
            layers, ops = host_layers
            double, single = (lambda: layers.DoubleStreamBlock(c.hidden, c.heads, c.mlp_ratio, qkv_bias=True,
                                                               operations=ops),
                              lambda: layers.SingleStreamBlock(c.hidden, c.heads, c.mlp_ratio, operations=ops))
        self.double_blocks = nn.ModuleList(double() for _ in range(c.depth_double))
        self.single_blocks = nn.ModuleList(single() for _ in range(c.depth_single))
        self.final_layer = LastLayer(c.hidden, c.channels * c.patch_size ** 2)

    def family(self) -> Family:
        return flux_family("reference", len(self.double_blocks), len(self.single_blocks),
                           text_order_from_calls=False)

    def init_weights(self, seed: int = 0) -> "ReferenceDiT":
        """Seeded random init (independent of the global RNG): N(0, 1/fan_in) weights, zero biases."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".scale"):
                    p.fill_(1.0)
                elif "class_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
                elif p.ndim >= 2:
                    std = p.shape[1] ** -0.5 * (0.5 if "mod" in name else 1.0)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                else:
                    p.zero_()
        return self

    def condition(self, class_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Class ids (B,) -> text tokens (B, txt_len, context_dim) and pooled vector (B, vec_dim)."""
        c = self.config
        return self.class_txt(class_ids).view(-1, c.txt_len, c.context_dim), self.class_vec(class_ids)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, transformer_options={}, attn_mask=None):
        """comfy.ldm.flux.model.Flux.forward_orig, with the same patches_replace["dit"] protocol."""
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype)) + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                                   attn_mask=args.get("attn_mask"),
                                                   transformer_options=args.get("transformer_options"))
                    return out
                out = blocks_replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                     "transformer_options": transformer_options}, {"original_block": block_wrap})
                txt, img = out["txt"], out["img"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                                 transformer_options=transformer_options)

        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                         transformer_options=args.get("transformer_options"))}
                out = blocks_replace[("single_block", i)](
                    {"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                     "transformer_options": transformer_options}, {"original_block": block_wrap})
                img = out["img"]
            else:
                img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
        img = img[:, txt.shape[1]:]

        return self.final_layer(img, vec)

    def forward(self, x: Tensor, sigma: Tensor, class_ids: Tensor, transformer_options=None, attn_mask=None) -> Tensor:
        """Velocity (B, C, H, W) for images x (B, C, H, W) at noise level sigma (B,) in [0, 1]."""
        transformer_options = {} if transformer_options is None else transformer_options
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        hl, wl = h // p, w // p
        img = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)
        img_ids = torch.zeros(hl, wl, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] = torch.arange(hl, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] = torch.arange(wl, device=x.device, dtype=x.dtype)[None, :]
        img_ids = repeat(img_ids, "h w c -> b (h w) c", b=b)
        txt, y = self.condition(class_ids)
        txt = txt.to(x.dtype)
        txt_ids = torch.zeros(b, txt.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.forward_orig(img, img_ids, txt, txt_ids, sigma.to(x.dtype), y.to(x.dtype),
                                transformer_options=transformer_options, attn_mask=attn_mask)
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=hl, w=wl, ph=p, pw=p)


# ---- weights ---------------------------------------------------------------------------------------

def save_weights(model: ReferenceDiT, path=WEIGHTS_PATH, metadata: dict | None = None, dtype=None):
    """Write the state dict (optionally cast to `dtype`, e.g. float16 to halve the file) with the
    config and any extra string `metadata` (training command, seed, ...) in the safetensors header."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**{k: str(v) for k, v in (metadata or {}).items()}, "config": model.config.to_json(),
            "format": "reference_dit"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


class WeightsError(ValueError):
    """A weights file the reference model cannot be loaded from; the message is one line naming the file."""


@contextlib.contextmanager
def _reading(path):
    """Turns whatever reading `path` raises (missing, truncated, not safetensors, another model's tensors) into
    one WeightsError line."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as e:
        reason = " ".join(str(e).replace("Error while deserializing header: ", "").split())[:200]
        shipped = Path(path).resolve().parent == WEIGHTS_PATH.parent
        restore = f"; restore it with `git checkout -- tools/weights/{Path(path).name}`" if shipped else ""
        raise WeightsError(f"{path} is not a reference-model safetensors file ({reason}){restore}") from None


def weights_metadata(path=WEIGHTS_PATH) -> dict:
    from safetensors import safe_open
    with _reading(path), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path=WEIGHTS_PATH) -> ReferenceDiT:
    """The stored model in float32 (whatever the storage dtype), in eval mode; WeightsError, one line, for a
    file it cannot be loaded from."""
    from safetensors.torch import load_file
    meta = weights_metadata(path)
    with _reading(path):
        model = ReferenceDiT(DiTConfig.from_json(meta["config"]) if "config" in meta else DiTConfig())
        state, wanted = load_file(str(path)), model.state_dict()
        if set(state) != set(wanted):
            raise ValueError(f"{len(set(wanted) - set(state))} of the model's {len(wanted)} tensors missing, "
                             f"{len(set(state) - set(wanted))} tensors not the model's")
        model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def shown_path(path) -> str:
    """A path as pages state it: relative to the pack's folder when inside it (no machine's own paths)."""
    try:
        return Path(path).resolve().relative_to(WEIGHTS_PATH.parents[2]).as_posix()
    except ValueError:
        return str(path)


def build_model(config: DiTConfig | None = None, seed: int = 0, weights=WEIGHTS_PATH) -> tuple[ReferenceDiT, str]:
    """(model, source): trained weights from `weights` if that file exists, else seeded random init.

    A given `config` must match the stored one when weights are loaded.
    """
    if weights is not None and Path(weights).is_file():
        model = load_weights(weights)
        if config is not None and config != model.config:
            raise ValueError(f"{weights} holds {model.config}, not the requested {config}")
        return model, f"trained weights from {shown_path(weights)}"
    missing = "" if weights is None else f"; no {shown_path(weights)}"
    return ReferenceDiT(config).init_weights(seed).eval(), f"seeded random init (seed {seed}{missing})"


# ---- host glue: per-call info, method options, sampler --------------------------------------------

@functools.lru_cache(maxsize=1)
def progress_map() -> ProgressMap:
    return ProgressMap(flow_percent_to_sigma)


def method_options(method, model: ReferenceDiT, method_key: str = "sdtm", base: dict | None = None) -> dict:
    """transformer_options that drive `method` (e.g. kernels.sdtm.SDTM) on `model` through
    kernels.runtime.Runtime, as nodes/patching.install does in ComfyUI: block replaces (chained over any
    in `base`), a fresh run, and per-call hooks around every model call."""
    runtime = Runtime(method, model.family(), model.patch_size, method_key)
    to = dict(base or {})
    patches = dict(to.get("patches_replace", {}))
    dit = dict(patches.get("dit", {}))
    dit.update(runtime.block_replaces(existing=dit))
    patches["dit"] = dit
    to["patches_replace"] = patches
    runtime.start_run(to)
    n_txt = model.config.txt_len

    def begin(x: Tensor, sigma: float, call_options: dict):
        runtime.begin_call(call_options, x, float(sigma), progress_map()(sigma), n_txt)

    def reuse_cached(x: Tensor, sigma: float, call_options: dict, out: Tensor) -> Tensor:
        reused = runtime.end_call(call_options, out)  # the output is the velocity, the predicted noise
        return out if reused is None else torch.where(reused[1], out, reused[0].to(out.dtype))

    to[APPLY_MODEL_HOOKS_KEY] = list(to.get(APPLY_MODEL_HOOKS_KEY, [])) + [begin]
    to[APPLY_MODEL_AFTER_KEY] = list(to.get(APPLY_MODEL_AFTER_KEY, [])) + [reuse_cached]
    return to


def model_call(model: ReferenceDiT, x: Tensor, sigma: float, class_ids: Tensor, transformer_options=None) -> Tensor:
    """One model call with a per-call copy of transformer_options (like ComfyUI's calc_cond_batch)."""
    to = dict(transformer_options or {})
    call = functools.partial(_hooked_call, model)
    for wrapper in reversed(to.get(MODEL_WRAPPERS_KEY, [])):
        call = functools.partial(wrapper, call)
    return call(x, sigma, class_ids, to)


def _hooked_call(model: ReferenceDiT, x: Tensor, sigma: float, class_ids: Tensor, to: dict) -> Tensor:
    for hook in to.get(APPLY_MODEL_HOOKS_KEY, []):
        hook(x, sigma, to)
    s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    out = model(x, s, class_ids, transformer_options=to)
    for hook in to.get(APPLY_MODEL_AFTER_KEY, []):
        out = hook(x, sigma, to, out)
    return out


def sigmas(steps: int) -> list[float]:
    """Unshifted rectified-flow schedule 1 -> 0 (matches kernels.schedule.flow_percent_to_sigma)."""
    return [1.0 - i / steps for i in range(steps + 1)]


@torch.inference_mode()
def sample(model: ReferenceDiT, class_ids, steps: int = 8, cfg: float = 3.0, seed: int = 0, size: int | None = None,
           transformer_options=None, device=None, sampler: str = "euler") -> Tensor:
    """Rectified-flow sampling with CFG (cond and uncond in one batched call).

    `sampler`: "euler" (first order, the reference), or "ab2": second-order Adams-Bashforth on the
    velocity, which reuses the previous step's prediction at no extra model call (the multistep
    idea behind ComfyUI's dpmpp_2m); its first step is Euler.
    Returns images (N, C, size, size), nominally in [-1, 1]. Noise is drawn on the CPU
    from `seed`, so results do not depend on the device's RNG.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    device = device or next(model.parameters()).device
    cond = torch.as_tensor(class_ids, dtype=torch.long, device=device).reshape(-1)
    x = initial_noise(model.config, cond.shape[0], seed, size).to(device)
    sig = sigmas(steps)
    previous = None  # (step size, velocity) of the last step, for ab2
    for s, s_next in zip(sig[:-1], sig[1:]):
        v = guided_velocity(model, x, s, cond, cfg, transformer_options)
        h = s_next - s
        if sampler == "ab2" and previous is not None:
            # Variable-step AB2: extrapolate the velocity to the middle of this step.
            w = h / (2 * previous[0])
            x = x + h * ((1 + w) * v - w * previous[1])
        else:
            x = x + h * v
        previous = (h, v)
    return x


SAMPLERS = ("euler", "ab2")


def initial_noise(config: DiTConfig, n: int, seed: int, size: int | None = None) -> Tensor:
    """The starting noise of `sample` for n images: drawn on the CPU from `seed`."""
    size = size or config.image_size
    return torch.randn(n, config.channels, size, size, generator=torch.Generator().manual_seed(seed))


def guided_velocity(model: ReferenceDiT, x: Tensor, sigma: float, cond: Tensor, cfg: float,
                    transformer_options=None) -> Tensor:
    """The CFG-combined velocity: cond and uncond (class id num_classes) in one batched call."""
    if cfg == 1.0:
        return model_call(model, x, sigma, cond, transformer_options)
    uncond = torch.full_like(cond, model.config.num_classes)
    v_c, v_u = model_call(model, torch.cat([x, x]), sigma, torch.cat([cond, uncond]), transformer_options).chunk(2)
    return v_u + cfg * (v_c - v_u)


# ---- measurement helpers -----------------------------------------------------------------------------

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode that also counts CPU SDPA (not in torch's registry)."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of images a, b in [-1, 1] (clamped), peak = data_range."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)
