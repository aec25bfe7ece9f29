"""Benchmark: SDTM token merging vs the unpatched model, side by side in one run.

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--out FILE.md] [--no-host]

All SDTM numbers use kernels.sdtm.SDTMConfig() defaults. Blocks are the host's own classes
(comfy.ldm.flux.layers.DoubleStreamBlock / SingleStreamBlock, mmdit JointBlock, with
operations=comfy.ops.disable_weight_init), driven like Flux.forward_orig / MMDiT drive them:
every block call goes through the pack's kernels.block_patch.block_replaces (SDTM.plan ->
families.run_block_merged) with a CallInfo whose progress is read from the step's sigma by
kernels.schedule.ProgressMap(model_sampling.percent_to_sigma), as nodes/patching.py does.
Sigmas come from ComfyUI's calculate_sigmas: Flux-dev ModelSamplingFlux with the
ModelSamplingFlux-node shift for 1024x1024 and the "simple" scheduler; SD3.5
ModelSamplingDiscreteFlow shift 3.0 and "sgm_uniform"; 28 steps each.

1. FLOPs per image, full size (Flux-dev: hidden 3072, 24 heads, 19 double + 38 single blocks,
   4096 image + 512 text tokens, 1 call per step; SD3.5-large: 38 joint blocks, hidden 2432,
   4096 image + 333 text tokens, CFG = 2 calls per step): torch FlopCounterMode over blocks
   built on the meta device (no weights materialised). An inner block's FLOPs depend only on
   its input shapes, so each distinct (block type, shapes, attention bias) runs once on meta
   and is re-used; selection, merge and unmerge run for every block of every step (--quick
   also re-uses whole replacement calls with equal shapes, ratio and stage: same totals).
   Embedders + final layer come from the host model with zero blocks; text encoders and VAE
   are not counted. SDTM's own similarity matmuls are reported separately.
2. CPU wall time of one model call (the blocks of one call) at real width, reduced depth:
   one Flux double + one single block standing for blocks 9 and 38 of the 57 (so skip_first /
   skip_last act as in the full model), random fp32 weights, 20x20 image + 50 text tokens
   (--quick 16x16 + 32). Baseline vs SDTM at the middle step of each merging stage of the defaults;
   median of repeats interleaved across configs.
3. Bookkeeping share: an instrumented run with timers around SDTM.plan, MergePlan.merge,
   MergePlan.unmerge, the inner block and the whole replacement (CUDA events on GPU).
4. Peak memory of one call: CUDA max_memory_allocated above what was held before the call;
   CPU: peak of the running sum of tensor allocations - frees in torch.profiler(profile_memory).
5. --device cuda: tables 2-4 for FULL-SIZE Flux-dev (57 blocks, bf16 random weights, ~24 GB)
   and SD3.5-large (batch 2 = cond + uncond) at 1024x1024, median of repeats after warmup.
   Exits with an error (status 2) when CUDA is not available.

Without a ComfyUI checkout (or with --no-host) equivalent pure-torch blocks are used; the
report says so.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from kernels import token_ops  # noqa: E402
from kernels.block_patch import CALL_KEY, RUNS_KEY, CallInfo, RunStats, block_replaces  # noqa: E402
from kernels.cat import FAST_SETTING, PAPER_SETTING, CATConfig, CATPruning, run_block_pruned  # noqa: E402
from kernels.families import ATTENTION_OVERRIDE_KEY, flux_family, image_span, mmdit_family  # noqa: E402
from kernels.schedule import ProgressMap  # noqa: E402
from kernels.sdtm import SDTM, SDTMConfig  # noqa: E402
from tools.reference_dit import attention as reference_attention, attention_sdpa  # noqa: E402

METHOD_KEY = "sdtm"


# ---- output ---------------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = ""):
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]):
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self("| " + " | ".join(str(c) for c in r) + " |")
        self()


def _g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---- host (ComfyUI) or pure-torch fallback -------------------------------------------------------

@dataclass
class Host:
    """The host's block classes and sampling, or None fields for the fallback."""

    comfy: bool
    desc: str
    ops: object = None
    flux_layers: object = None
    mmdit: object = None
    model_sampling: object = None
    samplers: object = None


def load_host(device: str, no_host: bool) -> Host:
    if no_host:
        return Host(False, "pure-torch fallback blocks (--no-host), equivalent to ComfyUI's")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import host as host_mod  # tests/host.py: finds and imports ComfyUI in-process
    finally:
        sys.path.remove(str(ROOT / "tests"))
    path, how = host_mod.find_comfyui()
    if path is None:
        return Host(False, f"pure-torch fallback blocks, equivalent to ComfyUI's ({how})")
    if device == "cpu":
        err = host_mod.import_host()  # --cpu --use-pytorch-cross-attention
    else:
        err = _import_host_gpu(path, how)
    if err:
        return Host(False, f"pure-torch fallback blocks, equivalent to ComfyUI's (host unusable: {err})")
    import comfy.ldm.flux.layers as flux_layers
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.model_sampling as model_sampling
    import comfy.ops
    import comfy.samplers as samplers
    version = "?"
    try:
        version = (path / "comfyui_version.py").read_text().split('"')[1]
    except Exception:
        pass
    return Host(True, f"ComfyUI {version} at {path} (host block classes)", comfy.ops.disable_weight_init,
                flux_layers, mmdit, model_sampling, samplers)


def _import_host_gpu(path, how) -> str | None:
    """tests/host.import_host without --cpu: the host as ComfyUI runs it on a GPU."""
    try:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        import comfy.options
        comfy.options.enable_args_parsing()
        argv = sys.argv
        sys.argv = [argv[0], "--use-pytorch-cross-attention"]
        try:
            import comfy.cli_args  # noqa: F401
        finally:
            sys.argv = argv
        import comfy.model_management  # noqa: F401
        import comfy.samplers  # noqa: F401
    except Exception as e:
        return f"ComfyUI found at {path} ({how}) but failed to import: {type(e).__name__}: {e}"
    return None


# Pure-torch blocks with the host's layer shapes and calling conventions (used without ComfyUI).

def _rms(x, scale):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * scale


class _FbStream(nn.Module):
    def __init__(self, h, heads, mlp, device, dtype):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.heads = heads
        self.mod = nn.Linear(h, 6 * h, **f)
        self.qkv = nn.Linear(h, 3 * h, **f)
        self.q_scale = nn.Parameter(torch.ones(h // heads, **f))
        self.k_scale = nn.Parameter(torch.ones(h // heads, **f))
        self.proj = nn.Linear(h, h, **f)
        self.mlp = nn.Sequential(nn.Linear(h, mlp, **f), nn.GELU(approximate="tanh"), nn.Linear(mlp, h, **f))

    def pre(self, x, vec):
        m = self.mod(F.silu(vec))[:, None].chunk(6, dim=-1)
        xm = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[1]) + m[0]
        q, k, v = self.qkv(xm).view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return _rms(q, self.q_scale), _rms(k, self.k_scale), v, m

    def post(self, x, attn, m):
        x = x + m[2] * self.proj(attn)
        return x + m[5] * self.mlp(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[4]) + m[3])


class FbDoubleStreamBlock(nn.Module):
    """comfy.ldm.flux.layers.DoubleStreamBlock (same Linear shapes and calling convention)."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, device=None, dtype=None):
        super().__init__()
        self.img = _FbStream(hidden, heads, int(hidden * mlp_ratio), device, dtype)
        self.txt = _FbStream(hidden, heads, int(hidden * mlp_ratio), device, dtype)

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        iq, ik, iv, im = self.img.pre(img, vec)
        tq, tk, tv, tm = self.txt.pre(txt, vec)
        attn = reference_attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2),
                                  pe, attn_mask, transformer_options)
        return self.img.post(img, attn[:, txt.shape[1]:], im), self.txt.post(txt, attn[:, :txt.shape[1]], tm)


class FbSingleStreamBlock(nn.Module):
    """comfy.ldm.flux.layers.SingleStreamBlock."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, device=None, dtype=None):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.h, self.heads, self.mlp = hidden, heads, int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp, **f)
        self.linear2 = nn.Linear(hidden + self.mlp, hidden, **f)
        self.q_scale = nn.Parameter(torch.ones(hidden // heads, **f))
        self.k_scale = nn.Parameter(torch.ones(hidden // heads, **f))
        self.modulation = nn.Linear(hidden, 3 * hidden, **f)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        m = self.modulation(F.silu(vec))[:, None].chunk(3, dim=-1)
        xm = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[1]) + m[0]
        qkv, mlp = torch.split(self.linear1(xm), [3 * self.h, self.mlp], dim=-1)
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = reference_attention(_rms(q, self.q_scale), _rms(k, self.k_scale), v, pe, attn_mask, transformer_options)
        return x + m[2] * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))


class _FbDismantled(nn.Module):
    def __init__(self, h, heads, pre_only, device, dtype):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.heads, self.pre_only = heads, pre_only
        self.adaLN = nn.Linear(h, (2 if pre_only else 6) * h, **f)
        self.qkv = nn.Linear(h, 3 * h, **f)
        self.ln_q = nn.Parameter(torch.ones(h // heads, **f))
        self.ln_k = nn.Parameter(torch.ones(h // heads, **f))
        if not pre_only:
            self.proj = nn.Linear(h, h, **f)
            self.mlp = nn.Sequential(nn.Linear(h, 4 * h, **f), nn.GELU(approximate="tanh"), nn.Linear(4 * h, h, **f))

    def pre(self, x, c):
        m = self.adaLN(F.silu(c)).chunk(2 if self.pre_only else 6, dim=1)
        xm = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[1][:, None]) + m[0][:, None]
        q, k, v = self.qkv(xm).reshape(x.shape[0], x.shape[1], 3, -1, x.shape[-1] // self.heads).movedim(2, 0)
        q = _rms(q, self.ln_q).reshape(x.shape[0], x.shape[1], -1)
        k = _rms(k, self.ln_k).reshape(x.shape[0], x.shape[1], -1)
        return (q, k, v.reshape(x.shape[0], x.shape[1], -1)), m

    def post(self, x, attn, m):
        x = x + m[2][:, None] * self.proj(attn)
        return x + m[5][:, None] * self.mlp(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[4][:, None]) + m[3][:, None])


class FbJointBlock(nn.Module):
    """comfy.ldm.modules.diffusionmodules.mmdit.JointBlock (qk_norm rms), called as (context, x, c=...)."""

    def __init__(self, hidden, heads, pre_only=False, device=None, dtype=None):
        super().__init__()
        self.context_block = _FbDismantled(hidden, heads, pre_only, device, dtype)
        self.x_block = _FbDismantled(hidden, heads, False, device, dtype)
        self.heads = heads

    def forward(self, context, x, c, transformer_options={}):
        cqkv, cm = self.context_block.pre(context, c)
        xqkv, xm = self.x_block.pre(x, c)
        q, k, v = (torch.cat((a, b), 1) for a, b in zip(cqkv, xqkv))
        attn = attention_sdpa(q, k, v, self.heads, transformer_options=transformer_options)
        n = context.shape[1]
        context = None if self.context_block.pre_only else self.context_block.post(context, attn[:, :n], cm)
        return context, self.x_block.post(x, attn[:, n:], xm)


class _FbSampling:
    """comfy.model_sampling.ModelSamplingFlux / ModelSamplingDiscreteFlow (sigma tables, percent_to_sigma)."""

    def __init__(self, kind: str, shift: float):
        self.kind, self.shift = kind, shift
        n = 10000 if kind == "flux" else 1000
        self.multiplier = 1.0 if kind == "flux" else 1000.0
        self.sigmas = torch.tensor([self.sigma_of_t(i / n) for i in range(1, n + 1)])
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def sigma_of_t(self, t):
        if self.kind == "flux":
            return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1)) if t > 0 else 0.0
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return self.sigma_of_t(float(timestep) / self.multiplier)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.sigma_of_t(1.0 - percent)


def _fb_calculate_sigmas(ms, scheduler: str, steps: int) -> torch.Tensor:
    """comfy.samplers.simple_scheduler / normal_scheduler(sgm=True)."""
    if scheduler == "simple":
        ss = len(ms.sigmas) / steps
        sigs = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    elif scheduler == "sgm_uniform":
        ts = torch.linspace(float(ms.timestep(ms.sigma_max)), float(ms.timestep(ms.sigma_min)), steps + 1)[:-1]
        sigs = [float(ms.sigma(t)) for t in ts]
    else:
        raise ValueError(scheduler)
    return torch.FloatTensor(sigs + [0.0])


# ---- architectures ---------------------------------------------------------------------------------

@dataclass
class Arch:
    key: str
    title: str
    hidden: int
    heads: int
    n_double: int          # Flux double blocks, or MMDiT joint blocks
    n_single: int
    n_txt: int
    grid: tuple
    steps: int
    calls_per_step: int    # model calls per sampling step (CFG = 2)
    scheduler: str
    shift: float
    note: str = ""

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    def family(self):
        if self.key == "flux":
            return flux_family("Flux", self.n_double, self.n_single)
        return mmdit_family("SD3", self.n_double)

    def keys(self) -> list[tuple]:
        return [spec.key for spec in self.family().blocks]


def flux_time_shift_1024() -> float:
    """comfy_extras.nodes_model_advanced.ModelSamplingFlux for width = height = 1024 (defaults 0.5 / 1.15)."""
    base_shift, max_shift, x1, x2 = 0.5, 1.15, 256, 4096
    mm = (max_shift - base_shift) / (x2 - x1)
    return (1024 * 1024 / (8 * 8 * 2 * 2)) * mm + (base_shift - mm * x1)


FLUX = Arch("flux", "Flux-dev", 3072, 24, 19, 38, 512, (64, 64), 28, 1, "simple", flux_time_shift_1024(),
            "guidance distilled: 1 call/step")
SD35 = Arch("sd35", "SD3.5-large", 64 * 38, 38, 38, 0, 77 + 256, (64, 64), 28, 2, "sgm_uniform", 3.0,
            "CFG: 2 calls/step (cond + uncond)")


def make_block(host: Host, arch: Arch, key: tuple, device, dtype) -> nn.Module:
    kind, i = key
    if arch.key == "flux":
        if host.comfy:
            L = host.flux_layers
            if kind == "double_block":
                return L.DoubleStreamBlock(arch.hidden, arch.heads, mlp_ratio=4.0, qkv_bias=True,
                                           dtype=dtype, device=device, operations=host.ops)
            return L.SingleStreamBlock(arch.hidden, arch.heads, mlp_ratio=4.0, dtype=dtype, device=device,
                                       operations=host.ops)
        cls = FbDoubleStreamBlock if kind == "double_block" else FbSingleStreamBlock
        return cls(arch.hidden, arch.heads, 4.0, device=device, dtype=dtype)
    pre_only = i == arch.n_double - 1  # MMDiT: the last block's context stream is pre-only
    if host.comfy:
        return host.mmdit.JointBlock(arch.hidden, arch.heads, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch",
                                     pre_only=pre_only, rmsnorm=False, scale_mod_only=False, swiglu=False,
                                     qk_norm="rms", x_block_self_attn=False, dtype=dtype, device=device,
                                     operations=host.ops)
    return FbJointBlock(arch.hidden, arch.heads, pre_only=pre_only, device=device, dtype=dtype)


def block_signature(arch: Arch, key: tuple) -> tuple:
    """Blocks with equal signatures have identical architecture (shared on meta)."""
    if arch.key == "flux":
        return (key[0],)
    return (key[0], key[1] == arch.n_double - 1)


def init_weights(module: nn.Module, seed: int):
    """Random weights: Linear ~ N(0, 1/fan_in), biases small, norm scales 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)


def schedule(host: Host, arch: Arch):
    """(model_sampling, sigmas of the arch's schedule, progress of every model call's sigma)."""
    if host.comfy:
        ms_mod = host.model_sampling
        if arch.key == "flux":
            class MS(ms_mod.ModelSamplingFlux, ms_mod.CONST):
                pass
            ms = MS()
            ms.set_parameters(shift=arch.shift)
        else:
            class MS(ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST):
                pass
            ms = MS()
            ms.set_parameters(shift=arch.shift, multiplier=1000)
        sigmas = host.samplers.calculate_sigmas(ms, arch.scheduler, arch.steps)
    else:
        ms = _FbSampling(arch.key, arch.shift)
        sigmas = _fb_calculate_sigmas(ms, arch.scheduler, arch.steps)
    pm = ProgressMap(ms.percent_to_sigma)  # as nodes/patching.progress_map
    return ms, sigmas, [pm(s) for s in sigmas[:-1]]


# ---- one model call: the host's forward_orig loop over blocks ------------------------------------

def make_inputs(host: Host, arch: Arch, batch: int, grid: tuple, n_txt: int, device, dtype) -> dict:
    n_img = grid[0] * grid[1]
    meta = torch.device(device).type == "meta"
    gen = None if meta else torch.Generator(device=device).manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    x = {"img": rnd(batch, n_img, arch.hidden), "txt": rnd(batch, n_txt, arch.hidden), "vec": rnd(batch, arch.hidden)}
    if arch.key == "flux":
        head = arch.hidden // arch.heads
        if meta:
            x["pe"] = torch.empty(batch, 1, n_txt + n_img, head // 2, 2, 2, device=device)
        else:
            img_ids = torch.zeros(grid[0], grid[1], 3)
            img_ids[..., 1] = torch.arange(grid[0])[:, None]
            img_ids[..., 2] = torch.arange(grid[1])[None, :]
            ids = torch.cat([torch.zeros(n_txt, 3), img_ids.reshape(-1, 3)]).expand(batch, -1, -1).to(device)
            axes = [16, 56, 56] if head == 128 else [head // 4, head * 3 // 8, head * 3 // 8]
            if host.comfy:
                pe = host.flux_layers.EmbedND(dim=head, theta=10000, axes_dim=axes)(ids)
            else:
                pe = torch.cat([_fb_rope(ids[..., i], axes[i], 10000) for i in range(3)], dim=-3).unsqueeze(1)
            x["pe"] = pe
    return x


def _fb_rope(pos, dim, theta):
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float32), 1.0 / (theta ** scale))
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).to(torch.float32)


def clone_inputs(x: dict) -> dict:
    # Host blocks update txt / img in place, so every call gets fresh copies.
    return {k: (v.clone() if k in ("img", "txt") else v) for k, v in x.items()}


def default_invoke(reps):
    def invoke(key, args, fn):
        if reps is not None and key in reps:
            return reps[key](args, {"original_block": fn})
        return fn(args)
    return invoke


def model_call(arch: Arch, blocks: list, x: dict, to: dict, invoke) -> torch.Tensor:
    """The block loop of Flux.forward_orig / MMDiT.forward_core_with_concat with patches_replace["dit"].

    invoke(key, args, original_block) runs the replacement for `key` (or the block itself).
    """
    if arch.key == "flux":
        img, txt, vec, pe = x["img"], x["txt"], x["vec"], x["pe"]
        for key, blk in blocks:
            if key[0] != "double_block":
                continue

            def wrap(args, blk=blk):
                out = {}
                out["img"], out["txt"] = blk(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                             attn_mask=args.get("attn_mask"),
                                             transformer_options=args.get("transformer_options"))
                return out
            out = invoke(key, {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": None,
                               "transformer_options": to}, wrap)
            img, txt = out["img"], out["txt"]
        img = torch.cat((txt, img), 1)
        for key, blk in blocks:
            if key[0] != "single_block":
                continue

            def wrap(args, blk=blk):
                return {"img": blk(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                   transformer_options=args.get("transformer_options"))}
            img = invoke(key, {"img": img, "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": to},
                         wrap)["img"]
        return img[:, txt.shape[1]:]
    xi, ctx, c = x["img"], x["txt"], x["vec"]
    for key, blk in blocks:
        def wrap(args, blk=blk):
            out = {}
            out["txt"], out["img"] = blk(args["txt"], args["img"], c=args["vec"],
                                         transformer_options=args["transformer_options"])
            return out
        out = invoke(key, {"img": xi, "txt": ctx, "vec": c, "transformer_options": to}, wrap)
        ctx, xi = out["txt"], out["img"]
    return xi


def call_options(arch: Arch, grid: tuple, n_txt: int, progress: float | None) -> tuple[dict, RunStats]:
    """transformer_options of one call, as nodes/patching.install's APPLY_MODEL wrapper leaves them."""
    stats = RunStats()
    to = {RUNS_KEY: {METHOD_KEY: stats}}
    if progress is not None:
        to[CALL_KEY] = CallInfo(tuple(grid), grid[0] * grid[1], n_txt, float(progress))
    return to, stats


def sdtm_replaces(arch: Arch, method=None) -> dict:
    return block_replaces(arch.family(), method or SDTM(SDTMConfig()), METHOD_KEY)


# ---- 1. FLOPs ----------------------------------------------------------------------------------------

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:  # not in torch's registry; meta runs take the (counted) math path anyway
        mapping[op] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _shape_sig(args: dict) -> tuple:
    sig = []
    for name in ("img", "txt", "vec", "pe", "attn_mask"):
        v = args.get(name)
        sig.append((name, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (name, None))
    sig.append(ATTENTION_OVERRIDE_KEY in (args.get("transformer_options") or {}))
    return tuple(sig)


def _out_spec(out: dict) -> dict:
    return {k: None if v is None else (tuple(v.shape), v.dtype) for k, v in out.items()}


def _from_spec(spec: dict) -> dict:
    return {k: None if s is None else torch.empty(s[0], dtype=s[1], device="meta") for k, s in spec.items()}


class FlopMemo:
    """FLOP counting on meta with re-use of work whose count depends only on shapes.

    Inner blocks run once per distinct (block type, input shapes, attention bias); their FLOPs are
    re-used. With reuse_replace (--quick), a whole replacement call (selection + merge + block +
    unmerge) is also re-used when block type, input shapes and the method's ratio and stage at that
    block and progress are equal; otherwise every replacement runs for every block of every step.
    """

    def __init__(self, arch: Arch, reuse_replace: bool):
        self.arch = arch
        self.reuse_replace = reuse_replace
        self.blocks: dict = {}
        self.replaces: dict = {}
        self.counter: FlopCounterMode | None = None
        self.extra = 0          # FLOPs of cache hits in the current count
        self.selection = 0      # FLOPs inside SDTM.plan in the current count
        self.index = {spec.key: spec.index for spec in arch.family().blocks}

    def wrap_block(self, key, fn):
        def run(args):
            sig = (block_signature(self.arch, key),) + _shape_sig(args)
            hit = self.blocks.get(sig)
            if hit is not None:
                self.extra += hit[0]
                return _from_spec(hit[1])
            before = self.counter.get_total_flops() + self.extra
            out = fn(args)
            self.blocks[sig] = (self.counter.get_total_flops() + self.extra - before, _out_spec(out))
            return out
        return run

    def invoke(self, reps, method: SDTM | None, to: dict):
        def call(key, args, fn):
            fn = self.wrap_block(key, fn)
            if reps is None or key not in reps:
                return fn(args)
            if not self.reuse_replace:
                return reps[key](args, {"original_block": fn})
            info, stats = to[CALL_KEY], to[RUNS_KEY][METHOD_KEY]
            nb = self.arch.family().num_blocks
            sig = ((block_signature(self.arch, key),) + _shape_sig(args)
                   + (int(method.ratio(self.index[key], nb, info.progress) * info.n_img), method.stage(info.progress)))
            hit = self.replaces.get(sig)
            if hit is not None:
                flops, sel, spec, n_in, n_out = hit
                self.extra += flops
                self.selection += sel
                stats.add(n_in, n_out)
                return _from_spec(spec)
            before, sel0, tin, tout = (self.counter.get_total_flops() + self.extra, self.selection,
                                       stats.tokens_in, stats.tokens_computed)
            out = reps[key](args, {"original_block": fn})
            self.replaces[sig] = (self.counter.get_total_flops() + self.extra - before, self.selection - sel0,
                                  _out_spec(out), stats.tokens_in - tin, stats.tokens_computed - tout)
            return out
        return call

    def count(self, fn) -> int:
        self.extra = 0
        self.selection = 0
        with flop_counter() as counter:
            self.counter = counter
            fn()
        self.counter = None
        return counter.get_total_flops() + self.extra


class CountingMethod:
    """SDTM with the FLOPs of its plan() (token selection) recorded."""

    def __init__(self, method: SDTM, memo: FlopMemo):
        self.m, self.memo = method, memo
        self.name = method.name

    def plan(self, *args, **kwargs):
        before = self.memo.counter.get_total_flops()
        plan = self.m.plan(*args, **kwargs)
        self.memo.selection += self.memo.counter.get_total_flops() - before
        return plan

    def __getattr__(self, name):
        return getattr(self.m, name)


def nonblock_flops(host: Host, arch: Arch) -> int | None:
    """Embedders + final layer of one call: the host's diffusion model with zero blocks, on meta."""
    if not host.comfy:
        return None
    import comfy.ldm.flux.model as flux_model
    meta = torch.device("meta")
    ctx_dim = 4096
    x = torch.empty(1, 16, arch.grid[0] * 2, arch.grid[1] * 2, device=meta)
    with torch.no_grad():
        if arch.key == "flux":
            dm = flux_model.Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768,
                                 context_in_dim=ctx_dim, hidden_size=arch.hidden, mlp_ratio=4.0, num_heads=arch.heads,
                                 depth=0, depth_single_blocks=0, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                                 qkv_bias=True, guidance_embed=True, device=meta, operations=host.ops)
            with flop_counter() as c:
                dm(x, torch.ones(1, device=meta), torch.empty(1, arch.n_txt, ctx_dim, device=meta),
                   y=torch.empty(1, 768, device=meta), guidance=torch.ones(1, device=meta))
        else:
            dm = host.mmdit.OpenAISignatureMMDITWrapper(
                in_channels=16, patch_size=2, out_channels=16, depth=38, num_blocks=0, adm_in_channels=2048,
                pos_embed_max_size=192, num_patches=192 * 192, qk_norm="rms", device=meta, operations=host.ops,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": ctx_dim, "out_features": arch.hidden}})
            with flop_counter() as c:
                dm(x, torch.ones(1, device=meta), context=torch.empty(1, arch.n_txt, ctx_dim, device=meta),
                   y=torch.empty(1, 2048, device=meta))
    return c.get_total_flops()


def analytic_baseline(arch: Arch) -> int:
    """Independent check: matmul FLOPs of the blocks of one baseline call (batch 1)."""
    h, m, T, N = arch.hidden, 4 * arch.hidden, arch.n_txt, arch.n_img
    L = N + T
    stream = 3 * h * h + h * h + 2 * h * m
    if arch.key == "flux":
        double = 2 * L * stream + 4 * L * L * h + 2 * 2 * h * 6 * h
        single = 2 * L * (h * (3 * h + m) + (h + m) * h) + 4 * L * L * h + 2 * h * 3 * h
        return arch.n_double * double + arch.n_single * single
    joint = 2 * L * stream + 4 * L * L * h + 2 * 2 * h * 6 * h
    last = 2 * (L * 3 * h * h + N * (h * h + 2 * h * m)) + 4 * L * L * h + 2 * (h * 2 * h + h * 6 * h)
    return (arch.n_double - 1) * joint + last


@dataclass
class FlopResult:
    arch: Arch
    base_call: int
    sdtm_calls: list
    selection_calls: list
    progress: list
    sigmas: list
    computed: list          # image tokens computed / image tokens in, per call
    nonblock: int | None
    analytic: int

    def per_image(self, per_call_sum: int) -> int:
        return self.arch.calls_per_step * per_call_sum


def meta_blocks_and_inputs(host: Host, arch: Arch):
    """([(block key, block)], inputs) at full width on the meta device, bf16; blocks of the same
    signature are built once and shared."""
    meta = torch.device("meta")
    shared, blocks = {}, []
    for key in arch.keys():
        sig = block_signature(arch, key)
        if sig not in shared:
            shared[sig] = make_block(host, arch, key, meta, torch.bfloat16)
        blocks.append((key, shared[sig]))
    return blocks, make_inputs(host, arch, 1, arch.grid, arch.n_txt, meta, torch.bfloat16)


def count_flops(host: Host, arch: Arch, notes: list, reuse_replace: bool, method: SDTM | None = None) -> FlopResult:
    """FLOPs of the unpatched model and of `method` (default: SDTM at its defaults) per call."""
    blocks, x = meta_blocks_and_inputs(host, arch)
    _, sigmas, progress = schedule(host, arch)
    memo = FlopMemo(arch, reuse_replace)
    sdtm_method = method or SDTM(SDTMConfig())
    reps = sdtm_replaces(arch, CountingMethod(sdtm_method, memo))

    with torch.no_grad():
        to, _ = call_options(arch, arch.grid, arch.n_txt, None)
        base = memo.count(lambda: model_call(arch, blocks, x, to, memo.invoke(None, None, to)))
        sdtm, sel, computed = [], [], []
        for p in progress:
            to, stats = call_options(arch, arch.grid, arch.n_txt, p)
            sdtm.append(memo.count(lambda: model_call(arch, blocks, x, to, memo.invoke(reps, sdtm_method, to))))
            sel.append(memo.selection)
            computed.append(stats.tokens_computed / max(stats.tokens_in, 1))
    return FlopResult(arch, base, sdtm, sel, progress, [float(s) for s in sigmas[:-1]], computed,
                      nonblock_flops(host, arch), analytic_baseline(arch))


def call_flops(host: Host, arch: Arch, keys: list, grid: tuple, n_txt: int, batch: int, configs: list,
               notes: list) -> dict:
    """Block FLOPs of one timed call per config, counted on meta at the timed shape."""
    meta = torch.device("meta")
    blocks = [(key, make_block(host, arch, key, meta, torch.float32)) for key in keys]
    x = make_inputs(host, arch, batch, grid, n_txt, meta, torch.float32)
    memo = FlopMemo(arch, reuse_replace=False)
    out = {}
    with torch.no_grad():
        for cfg in configs:
            to, _ = call_options(arch, grid, n_txt, cfg.progress)
            reps = sdtm_replaces(arch, CountingMethod(SDTM(SDTMConfig()), memo)) if cfg.sdtm else None
            out[cfg.label] = memo.count(lambda: model_call(arch, blocks, x, to, memo.invoke(reps, None, to)))
    return out


def check_flops(results: list[FlopResult], notes: list):
    for r in results:
        dev = (r.base_call - r.analytic) / r.analytic
        if abs(dev) > 0.01:
            notes.append(f"WARNING: counted baseline FLOPs of {r.arch.title} differ from the analytic matmul count "
                         f"by {100 * dev:+.2f}% (an op the counter does not see, e.g. a new attention kernel?)")


def report_flops(rep: Report, results: list[FlopResult], per_step: bool, quick: bool):
    rep("## 1. FLOPs per image, full-size models (FlopCounterMode on meta-device blocks)")
    rep()
    rep("Every block of every step ran through kernels.block_patch.block_replaces with the step's CallInfo"
        + (" (--quick: replacement calls with equal block type, shapes, SDTM ratio and stage re-used)."
           if quick else "."))
    rep()
    rows = []
    for r in results:
        a = r.arch
        nb = r.nonblock or 0
        base = r.per_image((r.base_call + nb) * a.steps)
        sdtm = r.per_image(sum(r.sdtm_calls) + nb * a.steps)
        sel = r.per_image(sum(r.selection_calls))
        stages = [sdtm_stage(p) for p in r.progress]
        counts = " / ".join(str(stages.count(k)) for k in ("full", "structure", "detail"))
        rows.append([f"{a.title}", f"{a.n_img} img + {a.n_txt} txt tok, {a.steps} steps x {a.calls_per_step} call",
                     _g(base), _g(sdtm), f"{sdtm / base:.3f}", f"{base / sdtm:.2f}x", _g(sel),
                     _pct(sum(r.computed) / len(r.computed)), counts])
    rep.table(["model", "per image", "baseline GFLOPs/image", "SDTM GFLOPs/image", "SDTM / baseline",
               "FLOP speedup", "of which token selection GFLOPs", "image tokens computed (mean over calls)",
               "full / structure / detail steps"], rows)
    for r in results:
        a = r.arch
        nb = "n/a (fallback: blocks only)" if r.nonblock is None else f"{_g(r.nonblock)} GFLOPs/call"
        dev = (r.base_call - r.analytic) / r.analytic
        rep(f"- {a.title}: hidden {a.hidden}, {a.heads} heads, "
            + (f"{a.n_double} double + {a.n_single} single blocks" if a.key == "flux" else f"{a.n_double} joint blocks")
            + f"; {a.note}; sigmas: {a.scheduler} scheduler, shift {a.shift:.3f}; embedders + final layer {nb}; "
              f"baseline blocks per call {_g(r.base_call)} GFLOPs (analytic matmul count {_g(r.analytic)}, "
              f"{100 * dev:+.3f}%).")
    rep()
    if per_step:
        rep("Per model call (SDTM / baseline block FLOPs, progress read from sigma):")
        rep()
        header = ["step"]
        for r in results:
            header += [f"{r.arch.title} sigma", "progress", "stage", "SDTM/base"]
        rows = []
        for i in range(max(len(r.progress) for r in results)):
            row = [i]
            for r in results:
                if i < len(r.progress):
                    stage = sdtm_stage(r.progress[i])
                    row += [f"{r.sigmas[i]:.4f}", f"{r.progress[i]:.3f}", stage, f"{r.sdtm_calls[i] / r.base_call:.3f}"]
                else:
                    row += ["", "", "", ""]
            rows.append(row)
        rep.table(header, rows)


# ---- 1b. CAT cached token pruning: FLOPs per image ----------------------------------------------------

CAT_SETTINGS = (
    # (label, config, full steps forced as in the paper (t0 of the schedule's steps) or None)
    ("CAT paper setting (70% pruned, t0 = 8 of 28, no refresh, no forecast)", CATConfig(**PAPER_SETTING), 8),
    ("CAT node defaults", CATConfig(), None),
    ("CAT faster preset (full_percent 0.18)", CATConfig(**FAST_SETTING), None),
)


def cat_call_flops(host: Host, arch: Arch, n_keep: int) -> tuple[int, int]:
    """(block FLOPs of one pruned call computing n_keep image tokens, K/V cache bytes in bf16 per row).

    Meta-device blocks; every block runs through kernels.cat.run_block_pruned, first in full (which
    fills the key/value cache), then with n_keep selected tokens (counted)."""
    blocks, x = meta_blocks_and_inputs(host, arch)
    family = arch.family()
    stores = {spec.key: {} for spec in family.blocks}
    specs = {spec.key: spec for spec in family.blocks}

    def invoke_with(selection):
        def call(key, args, fn):
            span = image_span(specs[key], args, arch.n_img, arch.n_txt)
            return run_block_pruned(args, fn, span, family, selection, stores[key])
        return call

    to = {}
    with torch.no_grad():
        model_call(arch, blocks, clone_inputs(x), to, invoke_with(None))
        selection = torch.arange(n_keep, device="meta")[None]
        with flop_counter() as c:
            model_call(arch, blocks, clone_inputs(x), to, invoke_with(selection))
    cache = sum(t.numel() * t.element_size() for st in stores.values() for e in st.values()
                for t in (e["k"], e["v"]))
    return c.get_total_flops(), cache


def cat_flops(host: Host, r: FlopResult, cfg: CATConfig, t0: int | None = None, pruned_cost: dict | None = None):
    """(FLOPs per image, image tokens computed per step, K/V cache bytes per row, config) of CAT on the
    schedule of `r` (a count_flops result). t0: force the first t0 steps full, as the paper does.
    pruned_cost memoises cat_call_flops per kept-token count across calls."""
    a = r.arch
    pruned_cost = {} if pruned_cost is None else pruned_cost
    if t0 is not None:  # full_percent between the progress of step t0-1 and step t0
        cfg = CATConfig(**{**cfg.__dict__, "full_percent": (r.progress[t0 - 1] + r.progress[t0]) / 2})
    plan = CATPruning(cfg).step_plan(r.progress, a.n_img, a.family().num_blocks)
    total, cache = 0, 0
    for k in plan:
        if k == a.n_img:
            total += r.base_call
        else:
            if k not in pruned_cost:
                pruned_cost[k] = cat_call_flops(host, a, k)
            total += pruned_cost[k][0]
            cache = pruned_cost[k][1]
    return r.per_image(total) + r.per_image((r.nonblock or 0) * a.steps), plan, cache, cfg


def report_cat(rep: Report, host: Host, results: list[FlopResult]):
    rep("## 1b. CAT cached token pruning: FLOPs per image, full-size models")
    rep()
    rep("Same blocks, schedules and counting as table 1. A full step costs the baseline call; a pruned "
        "step runs every block through kernels.cat.run_block_pruned with the kept image tokens as queries "
        "and all image keys/values (cached ones for the others). Which steps are full comes from "
        "CATPruning.step_plan on the schedule's progress values (the same decision a run makes). Selection "
        "(k-means once per run, sorting per step) adds no matmul and under 0.001% of the FLOPs.")
    rep()
    rows = []
    for r in results:
        a = r.arch
        nb = (r.nonblock or 0) * a.steps
        base = r.per_image(r.base_call * a.steps) + r.per_image(nb)
        sdtm = r.per_image(sum(r.sdtm_calls)) + r.per_image(nb)
        rows.append([a.title, "baseline", _g(base), "1.000", "1.00x", "100.0%", "-", "-"])
        rows.append([a.title, "SDTM defaults", _g(sdtm), f"{sdtm / base:.3f}", f"{base / sdtm:.2f}x",
                     _pct(sum(r.computed) / len(r.computed)), "-", "0"])
        pruned_cost: dict = {}
        for label, cfg, t0 in CAT_SETTINGS:
            per_image, plan, cache, cfg = cat_flops(host, r, cfg, t0, pruned_cost)
            full_steps = sum(1 for k in plan if k == a.n_img)
            cache_all = cache * a.calls_per_step
            rows.append([a.title, f"{label}: {full_steps} full + {a.steps - full_steps} pruned steps",
                         _g(per_image), f"{per_image / base:.3f}", f"**{base / per_image:.2f}x**",
                         _pct(sum(plan) / (a.n_img * len(plan))),
                         f"full_percent {cfg.full_percent:.3f}, refresh_every {cfg.refresh_every}",
                         f"{cache_all / 2**30:.2f} GiB"])
    rep.table(["model", "setting", "GFLOPs/image", "/ baseline", "FLOP speedup", "image tokens computed",
               "schedule", "K/V cache (bf16, all rows)"], rows)
    rep()
    rep("K/V cache: keys and values of every image token for every block, per batch row (CFG doubles it), "
        "in the model's dtype; the per-token noise history (3 maps of 4096 x 64 fp32 per row, 3 MiB) is "
        "negligible next to it.")
    rep()


def run_cat_cpu_time(host: Host, rep: Report, quick: bool, device: str = "cpu"):
    """CAT: wall time of one full call vs one pruned call (node defaults: 70% of image tokens pruned),
    Flux width, one double + one single block, real fp32 weights; median of interleaved repeats."""
    grid, n_txt = ((16, 16), 32) if quick else ((20, 20), 50)
    repeats = 3 if quick else 5
    keys = [("double_block", 9), ("single_block", 19)]
    b = build_bench(host, FLUX, keys, grid, n_txt, 1, device, torch.float32, "")
    family = FLUX.family()
    specs = {spec.key: spec for spec in family.blocks}
    n_img = grid[0] * grid[1]
    n_keep = CATPruning(CATConfig()).n_keep(n_img, 1.0)
    stores = {key: {} for key in keys}
    selection = torch.sort(torch.randperm(n_img, generator=torch.Generator().manual_seed(0))[:n_keep]).values[None]

    def invoke_with(sel):
        def call(key, args, fn):
            span = image_span(specs[key], args, n_img, n_txt)
            return run_block_pruned(args, fn, span, family, sel, stores[key])
        return call

    configs = {"baseline": default_invoke(None), "CAT full step (fills the K/V cache)": invoke_with(None),
               f"CAT pruned step ({n_keep} of {n_img} image tokens)": invoke_with(selection.to(device))}
    times = {k: [] for k in configs}
    with torch.no_grad():
        for label, inv in configs.items():  # warmup (and the cache for the pruned step)
            model_call(FLUX, b.blocks, clone_inputs(b.x), {}, inv)
        for _ in range(repeats):
            for label, inv in configs.items():
                sync(device)
                t0 = time.perf_counter()
                model_call(FLUX, b.blocks, clone_inputs(b.x), {}, inv)
                sync(device)
                times[label].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(times["baseline"])
    rep(f"## 1c. CAT: wall time of one model call ({device}, Flux width {FLUX.hidden}, 1 double + 1 single block, "
        f"{n_img} image + {n_txt} text tokens, fp32, random weights, median of {repeats} interleaved repeats)")
    rep()
    rows = [[label, f"{statistics.median(t):,.1f}", f"{min(t):,.1f} - {max(t):,.1f}",
             f"{statistics.median(t) / base:.3f}", f"{base / statistics.median(t):.2f}x"] for label, t in times.items()]
    rep.table(["config", "median ms / call", "min - max ms", "time / baseline", "speedup"], rows)
    rep()


# ---- 2-5. timing, bookkeeping, memory ----------------------------------------------------------------

class Timers:
    """Named section times; CUDA events on GPU (resolved after synchronize), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.pending: list = []
        self.totals: dict = {}

    @contextlib.contextmanager
    def section(self, name):
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            try:
                yield
            finally:
                e.record()
                self.pending.append((name, s, e))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def resolve(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            for name, s, e in self.pending:
                self.totals[name] = self.totals.get(name, 0.0) + s.elapsed_time(e)
            self.pending = []
        return dict(self.totals)


class TimedMethod:
    def __init__(self, method, timers: Timers):
        self.m, self.timers = method, timers
        self.name = method.name

    def plan(self, *args, **kwargs):
        with self.timers.section("plan"):
            return self.m.plan(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.m, name)


@contextlib.contextmanager
def timed_merge_plan(timers: Timers):
    cls = token_ops.MergePlan
    merge, unmerge = cls.merge, cls.unmerge

    def t_merge(self, x):
        with timers.section("merge"):
            return merge(self, x)

    def t_unmerge(self, y):
        with timers.section("unmerge"):
            return unmerge(self, y)
    cls.merge, cls.unmerge = t_merge, t_unmerge
    try:
        yield
    finally:
        cls.merge, cls.unmerge = merge, unmerge


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Config:
    label: str
    step: int | None = None
    sigma: float | None = None
    progress: float | None = None

    @property
    def sdtm(self) -> bool:
        return self.progress is not None


def sdtm_stage(progress: float) -> str:
    """What SDTM at its defaults does at `progress`: 'full' (outside start/end), 'structure' or 'detail'."""
    method = SDTM(SDTMConfig())
    return method.stage(progress) if method.is_active(progress) else "full"


def stage_ranges() -> list[tuple[str, float, float]]:
    """(stage, first, last progress) of the SDTM defaults' merging stages that are not empty."""
    c = SDTMConfig()
    lo, sw, hi = c.start_percent, min(max(c.switch_percent, c.start_percent), c.end_percent), c.end_percent
    return [(name, a, b) for name, a, b in (("structure", lo, sw), ("detail", sw, hi)) if b > a]


def pick_steps(host: Host, arch: Arch) -> list[Config]:
    """Baseline, and SDTM at the schedule steps nearest the middle of each merging stage of the defaults."""
    _, sigmas, progress = schedule(host, arch)
    out = [Config("baseline")]
    for stage, a, b in stage_ranges():
        i = min(range(len(progress)), key=lambda j: abs(progress[j] - (a + b) / 2))
        out.append(Config(f"SDTM {stage} stage", i, float(sigmas[i]), progress[i]))
    return out


@dataclass
class Bench:
    arch: Arch
    blocks: list
    x: dict
    grid: tuple
    n_txt: int
    batch: int
    device: str
    dtype: torch.dtype
    shape_note: str
    times: dict = field(default_factory=dict)
    computed: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)

    def run(self, cfg: Config, invoke=None, method=None, check: bool = True, x: dict | None = None):
        """One model call; returns (RunStats, milliseconds between synchronised start and end)."""
        to, stats = call_options(self.arch, self.grid, self.n_txt, cfg.progress)
        reps = sdtm_replaces(self.arch, method) if cfg.sdtm else None
        x = clone_inputs(self.x) if x is None else x
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model_call(self.arch, self.blocks, x, to, invoke(reps) if invoke else default_invoke(reps))
        sync(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        if check and not torch.isfinite(out).all():
            raise RuntimeError(f"{self.arch.title} {cfg.label}: non-finite output with random weights")
        return stats, ms

    def time(self, configs, warmup, repeats, warmup_first_only: bool = False):
        for cfg in configs[:1] if warmup_first_only else configs:
            for _ in range(warmup):
                self.run(cfg)
        samples = {c.label: [] for c in configs}
        for _ in range(repeats):
            for cfg in configs:  # interleaved: load from other processes hits every config alike
                stats, ms = self.run(cfg, check=False)
                samples[cfg.label].append(ms)
                self.computed[cfg.label] = stats.tokens_computed / max(stats.tokens_in, 1) if cfg.sdtm else 1.0
        self.times = samples

    def instrument(self, configs, repeats):
        for cfg in configs:
            runs = []
            for _ in range(repeats):
                timers = Timers(self.device)

                def invoke(reps, timers=timers):
                    inner = default_invoke(reps)

                    def call(key, args, fn):
                        def block(a):
                            with timers.section("block"):
                                return fn(a)
                        with timers.section("replace"):
                            return inner(key, args, block)
                    return call
                method = TimedMethod(SDTM(SDTMConfig()), timers) if cfg.sdtm else None
                with timed_merge_plan(timers):
                    _, wall = self.run(cfg, invoke, method, check=False)
                tot = timers.resolve()
                tot["wall"] = wall
                runs.append(tot)
            keys = set().union(*runs)
            self.breakdown[cfg.label] = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}

    def measure_memory(self, configs):
        for cfg in configs:
            if torch.device(self.device).type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                sync(self.device)
                x = clone_inputs(self.x)
                sync(self.device)
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
                self.run(cfg, x=x)
                peak = torch.cuda.max_memory_allocated()
                self.memory[cfg.label] = (peak - held, peak)
            else:
                x = clone_inputs(self.x)
                self.memory[cfg.label] = (cpu_peak_bytes(lambda: self.run(cfg, x=x)), None)


def cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of tensor allocations minus frees that torch.profiler(profile_memory)
    records while fn() runs (CPU, op granularity); memory held before the call is not counted."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak


def build_bench(host: Host, arch: Arch, keys: list, grid: tuple, n_txt: int, batch: int, device, dtype,
                shape_note: str) -> Bench:
    blocks = []
    for i, key in enumerate(keys):
        blk = make_block(host, arch, key, torch.device(device), dtype)
        init_weights(blk, seed=i)
        blk.eval()
        blocks.append((key, blk))
    x = make_inputs(host, arch, batch, grid, n_txt, device, dtype)
    return Bench(arch, blocks, x, grid, n_txt, batch, str(device), dtype, shape_note)


def report_bench(rep: Report, b: Bench, configs: list[Config], title: str, device_name: str, number: str):
    method = SDTM(SDTMConfig())
    nb = b.arch.family().num_blocks
    mid = next(spec.index for spec in b.arch.family().blocks if spec.key == b.blocks[len(b.blocks) // 2][0])
    rep(f"## {number[0]}. {title}: wall time of one model call ({device_name})")
    rep()
    rep(f"Shape: {b.shape_note}.")
    rep()
    base = statistics.median(b.times["baseline"])
    rows = []
    for c in configs:
        t = b.times[c.label]
        med = statistics.median(t)
        ratio = "-" if not c.sdtm else f"{method.ratio(mid, nb, c.progress):.3f}"
        where = "-" if c.step is None else f"{c.step} / {b.arch.steps}, sigma {c.sigma:.4f}, progress {c.progress:.3f}"
        fl = b.flops.get(c.label)
        rows.append([c.label, where, ratio, _pct(b.computed.get(c.label, 1.0)),
                     "-" if fl is None else f"{fl / 1e9:,.1f}",
                     "-" if fl is None else f"{fl / b.flops['baseline']:.3f}", f"{med:,.1f}",
                     f"{min(t):,.1f} - {max(t):,.1f}", len(t), f"{med / base:.3f}", f"{base / med:.2f}x",
                     "-" if fl is None else f"{fl / med / 1e6:,.0f}"])
    rep.table(["config", "step of schedule", "merge ratio (merged blocks)", "image tokens computed",
               "GFLOPs / call", "FLOPs / baseline", "median ms / call", "min - max ms", "repeats",
               "time / baseline", "speedup", "achieved GFLOP/s"], rows)

    rep(f"## {number[1]}. {title}: bookkeeping share ({device_name}, instrumented run, median)")
    rep()
    rows = []
    for c in configs:
        d = b.breakdown[c.label]
        plan, merge, unmerge = d.get("plan", 0.0), d.get("merge", 0.0), d.get("unmerge", 0.0)
        block, replace = d.get("block", 0.0), d.get("replace", 0.0)
        glue = max(replace - block - plan - merge - unmerge, 0.0)
        keep = plan + merge + unmerge
        rows.append([c.label, f"{plan:.2f}", f"{merge:.2f}", f"{unmerge:.2f}", f"{glue:.2f}", f"{block:,.1f}",
                     f"{d['wall']:,.1f}", _pct(keep / block) if block else "-",
                     _pct((keep + glue) / d["wall"]) if d["wall"] else "-"])
    rep.table(["config", "selection (SDTM.plan) ms", "merge ms", "unmerge ms", "other glue ms",
               "inner blocks ms", "call ms (instrumented)", "selection+merge+unmerge / block time",
               "all bookkeeping / call"], rows)
    rep("Other glue = concat of text/image, rotary gather, key-bias setup and residual restore inside "
        "run_block_merged; the key bias itself is applied inside attention (in block time).")
    rep()

    rep(f"## {number[2]}. {title}: peak memory of one call ({device_name})")
    rep()
    if torch.device(b.device).type == "cuda":
        base_act = b.memory["baseline"][0]
        rows = [[c.label, f"{b.memory[c.label][0] / 2**20:,.0f}", f"{b.memory[c.label][1] / 2**30:,.2f}",
                 f"{b.memory[c.label][0] / base_act:.3f}"] for c in configs]
        rep.table(["config", "activation peak MiB (max_memory_allocated - held)", "peak allocated GiB (incl. weights)",
                   "activation / baseline"], rows)
    else:
        base_act = b.memory["baseline"][0]
        rows = [[c.label, f"{b.memory[c.label][0] / 2**20:,.1f}", f"{b.memory[c.label][0] / base_act:.3f}"]
                for c in configs]
        rep.table(["config", "activation peak MiB (torch.profiler allocations, op granularity)",
                   "activation / baseline"], rows)
        rep("CPU: peak of the running sum of tensor allocations minus frees recorded by "
            "torch.profiler(profile_memory=True) during the call; weights and inputs are excluded.")
        rep()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---- main ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced shapes / repeats (about 1-2 minutes on 2 cores)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", help="also write the markdown report to this file")
    ap.add_argument("--no-host", action="store_true", help="use the pure-torch fallback blocks even with ComfyUI")
    ap.add_argument("--flops-only", action="store_true", help="only the FLOP tables (1 and 1b), no timing sections")
    ap.add_argument("--cat-time", action="store_true", help="add CAT's wall time of one full / pruned call (1c)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    rep = Report()
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = (f"error: --device cuda requested but torch.cuda.is_available() is False "
               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Nothing was measured.")
        print(msg, file=sys.stderr)
        return 2
    host = load_host(args.device, args.no_host)
    if args.device == "cuda":
        dev_name = f"CUDA {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        dev_name = f"CPU {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cfg = SDTMConfig()
    rep(f"# SDTM benchmark ({'quick' if args.quick else 'full'}, device: {dev_name})")
    rep()
    rep(f"- Blocks: {host.desc}")
    rep(f"- SDTM defaults: {cfg}")
    rep(f"- Command: `python tools/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    rep()
    notes: list[str] = []
    failed = None
    try:
        t0 = time.perf_counter()
        results = [count_flops(host, a, notes, reuse_replace=args.quick) for a in (FLUX, SD35)]
        check_flops(results, notes)
        report_flops(rep, results, per_step=not args.quick, quick=args.quick)
        rep(f"(FLOP counting took {time.perf_counter() - t0:.1f} s)")
        rep()
        t0 = time.perf_counter()
        report_cat(rep, host, results)
        rep(f"(CAT FLOP counting took {time.perf_counter() - t0:.1f} s)")
        rep()

        if args.cat_time:
            run_cat_cpu_time(host, rep, args.quick, args.device)
        if args.flops_only:
            pass
        elif args.device == "cpu":
            run_cpu_reduced(host, rep, dev_name, args.quick, notes)
        else:
            run_full_size(host, rep, dev_name, "cuda", torch.bfloat16, args.quick, notes, ((FLUX, 1), (SD35, 2)))
    except BaseException as e:
        failed = e
        rep()
        rep(f"**FAILED: {type(e).__name__}: {e}**")
        raise
    finally:
        if notes:
            rep("Notes:")
            for n in dict.fromkeys(notes):
                rep(f"- {n}")
            rep()
        rep(f"Total wall time: {time.perf_counter() - t_start:.1f} s" + (" (run failed)" if failed else ""))
        if args.out:
            Path(args.out).write_text("\n".join(rep.lines) + "\n")
    return 0


def run_cpu_reduced(host: Host, rep: Report, dev_name: str, quick: bool, notes: list):
    """Sections 2-4: Flux at real width, one double + one single block, on CPU."""
    t0 = time.perf_counter()
    grid, n_txt = ((16, 16), 32) if quick else ((20, 20), 50)
    warmup, repeats, inst = (1, 2, 1) if quick else (1, 5, 2)
    keys = [("double_block", 9), ("single_block", 19)]
    note = (f"Flux width {FLUX.hidden}, {FLUX.heads} heads, 1 double + 1 single block standing for blocks "
            f"9 and 38 of the 57-block Flux-dev; {grid[0]}x{grid[1]} = {grid[0] * grid[1]} image tokens "
            f"({grid[0] * 16}x{grid[1] * 16} px) + {n_txt} text tokens (Flux's 8:1 image:text mix), batch 1, "
            f"fp32, random weights, blocks only (no embedders / final layer); sigmas of the 28-step 1024^2 "
            f"Flux-dev schedule; "
            f"{warmup} warmup call + {repeats} repeats per config, "
            f"repeats interleaved across configs")
    load0 = _load()
    b = build_bench(host, FLUX, keys, grid, n_txt, 1, "cpu", torch.float32, note)
    configs = pick_steps(host, FLUX)
    b.flops = call_flops(host, FLUX, keys, grid, n_txt, 1, configs, notes)
    b.time(configs, warmup, repeats, warmup_first_only=True)
    b.instrument(configs, inst)
    b.measure_memory(configs)
    report_bench(rep, b, configs, "Flux-dev, real width, reduced depth", dev_name, ("2", "3", "4"))
    rep(f"(CPU timing sections took {time.perf_counter() - t0:.1f} s; load average 1/5/15 min before "
        f"{load0}, after {_load()} on {os.cpu_count()} cores shared with other processes)")
    rep()


def run_full_size(host: Host, rep: Report, dev_name: str, device: str, dtype, quick: bool, notes: list,
                  archs) -> None:
    """Section 5: every block of the full-size models at 1024^2 with random weights (meant for CUDA)."""
    cuda = torch.device(device).type == "cuda"
    warmup, repeats, inst = (1, 3, 1) if quick else (3, 10, 3)
    for n, (arch, batch) in enumerate(archs):
        t0 = time.perf_counter()
        params = _param_estimate(arch)
        need = params * torch.empty((), dtype=dtype).element_size()
        if cuda:
            free, total = torch.cuda.mem_get_info()
            if need * 1.15 > free:
                raise RuntimeError(f"{arch.title} needs about {need / 2**30:.1f} GiB for its {dtype} block weights; "
                                   f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free on the GPU")
        note = (f"{arch.title} full size: all {arch.family().num_blocks} blocks, hidden {arch.hidden}, "
                f"{arch.n_img} image + {arch.n_txt} text tokens ({arch.grid[0] * 16}x{arch.grid[1] * 16} px), "
                f"batch {batch}{' (cond + uncond)' if batch == 2 else ''}, {str(dtype).replace('torch.', '')} random "
                f"weights ({params / 1e9:.2f}B block params, {need / 2**30:.1f} GiB); {warmup} warmup + "
                f"{repeats} repeats per config")
        b = build_bench(host, arch, arch.keys(), arch.grid, arch.n_txt, batch, device, dtype, note)
        configs = pick_steps(host, arch)
        b.flops = call_flops(host, arch, arch.keys(), arch.grid, arch.n_txt, batch, configs, notes)
        b.time(configs, warmup, repeats)
        b.instrument(configs, inst)
        b.measure_memory(configs)
        letters = "abcdefghijkl"[3 * n:3 * n + 3]
        report_bench(rep, b, configs, f"{arch.title}, full size", dev_name, tuple(f"5{c}" for c in letters))
        rep(f"({arch.title} full-size sections took {time.perf_counter() - t0:.1f} s)")
        rep()
        del b
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _param_estimate(arch: Arch) -> int:
    h = arch.hidden
    if arch.key == "flux":
        double = 2 * (6 * h * h + 3 * h * h + h * h + 8 * h * h)
        single = 3 * h * h + h * 7 * h + 5 * h * h
        return arch.n_double * double + arch.n_single * single
    return arch.n_double * 2 * (6 * h * h + 3 * h * h + h * h + 8 * h * h)


if __name__ == "__main__":
    sys.exit(main())
