"""Find and import the ComfyUI host in-process; build tiny models of its own classes.

The host is found through COMFYUI_PATH, else the ComfyUI checkout this pack sits in
(ComfyUI/custom_nodes/<pack>), else ~/ComfyUI. Used by the host tests (which skip with the reason
when it is missing), tools/compare.py and tools/benchmark.py.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import re
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "token_reduction_pack"


def find_comfyui() -> tuple[Path | None, str]:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(("the checkout this pack sits in", PACK_ROOT.parent.parent))
    candidates.append(("~/ComfyUI", Path.home() / "ComfyUI"))
    tried = []
    for how, path in candidates:
        if (path / "comfy" / "model_patcher.py").is_file():
            return path, how
        tried.append(f"{how} ({path})")
    return None, "no ComfyUI checkout found; looked at " + ", ".join(tried)


_host_error: str | None = None
_host_ready = False


def import_host(cpu: bool = True) -> str | None:
    """Import ComfyUI in this process (SDPA attention; on the CPU unless `cpu` is False). Returns an
    error string or None."""
    global _host_error, _host_ready
    if _host_ready or _host_error:
        return _host_error
    path, how = find_comfyui()
    if path is None:
        _host_error = how
        return _host_error
    try:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        import comfy.options
        comfy.options.enable_args_parsing()
        argv = sys.argv
        sys.argv = [argv[0]] + (["--cpu"] if cpu else []) + ["--use-pytorch-cross-attention"]
        try:
            import comfy.cli_args  # noqa: F401  (parses the flags above)
        finally:
            sys.argv = argv
        # Like ComfyUI's main.py, import its `utils` package before anything imports nodes.py,
        # which puts comfy/ (holding comfy/utils.py) on sys.path and would shadow the package.
        try:
            import utils.install_util  # noqa: F401
        except ImportError:  # older hosts have no such package
            pass
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.supported_models  # noqa: F401
    except Exception as e:  # the host is there but unusable here: say why
        _host_error = f"ComfyUI found at {path} ({how}) but failed to import: {type(e).__name__}: {e}"
        return _host_error
    _host_ready = True
    return None


def comfyui_version() -> tuple[int, ...] | None:
    """The found checkout's version (comfyui_version.py), e.g. (0, 3, 75); None when unknown."""
    path, _ = find_comfyui()
    try:
        text = (path / "comfyui_version.py").read_text() if path else ""
    except OSError:
        return None
    m = re.search(r'__version__\s*=\s*"([0-9.]+)"', text)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def parse_requirement(spec: str) -> tuple[int, ...]:
    """The version of a ">=X.Y.Z" requirement (the only form the pack's workflows use)."""
    m = re.fullmatch(r">=([0-9]+(?:\.[0-9]+)*)", spec)
    if not m:
        raise ValueError(f"requires_comfyui must read \">=X.Y.Z\", got {spec!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def workflow_needs_newer_host(wf: dict) -> str | None:
    """Why the found host cannot run this example workflow (its extra.requires_comfyui is newer than the
    host), or None. The same reason is the skip reason of every test of that workflow on that host."""
    spec = wf.get("extra", {}).get("requires_comfyui")
    if not spec:
        return None
    version = comfyui_version()
    if version is not None and version >= parse_requirement(spec):
        return None
    have = ".".join(map(str, version)) if version else "of unknown version"
    return (f"needs ComfyUI {spec} ({wf['extra'].get('requires_comfyui_reason', 'see the workflow')}); "
            f"this host is {have}")


def load_pack():
    """Import this pack as a package, the way ComfyUI's loader names it."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_nodes():
    """{node_id: node class} of this pack, from its V3 entrypoint."""
    pack = load_pack()
    ext = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    return {n.define_schema().node_id: n for n in nodes}


def node_inputs(node_cls, **overrides) -> dict:
    """A node's widget inputs at their defaults, with `overrides`; a patch node's preset is `custom`, so
    the values given here are the ones that run."""
    widgets = [i for i in node_cls.define_schema().inputs
               if i.id not in ("model", "schedule") and not getattr(i, "optional", False)]
    inputs = {i.id: "custom" if i.id == "preset" and "custom" in i.options else i.default for i in widgets}
    return {**inputs, **overrides}


EVERY_STEP = {"SDTMPatchModel": ("sdtm", "EVERY_STEP_MERGED"), "TokenDensityPatchModel": ("density", "EVERY_STEP_POOLED")}


def every_step_inputs(node_cls, **overrides) -> dict:
    """node_inputs() with the method merging (or pooling) at every step after a short warm-up and no detail
    cache: the merging mechanics, which the defaults' full refresh steps would hide from a test."""
    module, name = EVERY_STEP[node_cls.__name__]
    settings = getattr(importlib.import_module(f"{PACK_NAME}.kernels.{module}"), name)
    widget = importlib.import_module(f"{PACK_NAME}.nodes.patching").widget_value
    return node_inputs(node_cls, **{**{k: widget(v) for k, v in settings.items()}, **overrides})


def run_node(node_cls, **inputs):
    """Execute a V3 node the way the executor does (class clone, locked methods)."""
    from comfy_api.latest import io  # noqa: F401
    import inspect
    if not hasattr(node_cls, "PREPARE_CLASS_CLONE"):
        clone = node_cls
    elif "v3_data" in inspect.signature(node_cls.PREPARE_CLASS_CLONE).parameters:  # ComfyUI 0.33
        clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {}})
    else:
        clone = node_cls.PREPARE_CLASS_CLONE(inputs)
    out = clone.execute(**inputs)
    return out.args if hasattr(out, "args") else out


# ---- tiny models of the host's own classes -------------------------------------------------

def _init_weights(model, seed: int):
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1]) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        # Models are built with uninitialised storage: fill floating buffers too
        # (SD3's pos_embed is one), or outputs depend on leftover memory.
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.02)


def tiny_flux(seed: int = 0, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2,
              dtype=None):
    import torch
    import comfy.model_patcher
    import comfy.supported_models
    unet_config = {
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
        "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": hidden, "mlp_ratio": 4.0,
        "num_heads": heads, "depth": depth, "depth_single_blocks": depth_single,
        "axes_dim": [hidden // heads // 4, hidden // heads * 3 // 8, hidden // heads * 3 // 8],
        "theta": 10000, "patch_size": 2, "qkv_bias": True,
    }
    return _build(comfy.supported_models.Flux(unet_config), seed, dtype or torch.float32)


def tiny_sd3(seed: int = 0, depth: int = 2, dtype=None):
    import torch
    import comfy.supported_models
    unet_config = {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth,
        "pos_embed_max_size": 64, "num_patches": 64 * 64, "adm_in_channels": 32,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 32, "out_features": 64 * depth}},
        "qk_norm": "rms",
    }
    return _build(comfy.supported_models.SD3(unet_config), seed, dtype or torch.float32)


def tiny_chroma(seed: int = 0, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2,
                dtype=None):
    """Chroma: Flux's blocks with a distilled modulation approximator (in_dim 64 = 16 + 16 + 32)."""
    import torch
    import comfy.supported_models
    unet_config = {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32,
        "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
        "depth_single_blocks": depth_single,
        "axes_dim": [hidden // heads // 4, hidden // heads * 3 // 8, hidden // heads * 3 // 8],
        "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "in_dim": 64, "out_dim": hidden, "hidden_dim": 32, "n_layers": 2,
    }
    return _build(comfy.supported_models.Chroma(unet_config), seed, dtype or torch.float32)


def tiny_wan(seed: int = 0, layers: int = 2, dim: int = 64, heads: int = 2, dtype=None):
    """Wan 2.1 text-to-video (the architecture of both Wan 2.2 A14B experts); latents (B, 16, T, H, W)."""
    import torch
    import comfy.supported_models
    unet_config = {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 16,
        "dim": dim, "ffn_dim": 2 * dim, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": heads,
        "num_layers": layers, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }
    patcher = _build(comfy.supported_models.WAN21_T2V(unet_config), seed, dtype or torch.float32)
    patcher.model.diffusion_model.patch_embedding.to(torch.float32)  # ComfyUI keeps it in fp32 (x.float())
    return patcher


def tiny_wan_vace(seed: int = 0, layers: int = 2, dim: int = 64, heads: int = 2, dtype=None):
    """Wan 2.1 VACE: a control branch whose blocks add residuals (c_skip) after the main blocks."""
    import torch
    import comfy.supported_models
    unet_config = {
        "image_model": "wan2.1", "model_type": "vace", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 16,
        "dim": dim, "ffn_dim": 2 * dim, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": heads,
        "num_layers": layers, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
        "vace_layers": layers, "vace_in_dim": 96,
    }
    patcher = _build(comfy.supported_models.WAN21_Vace(unet_config), seed, dtype or torch.float32)
    dm = patcher.model.diffusion_model
    dm.patch_embedding.to(torch.float32)
    dm.vace_patch_embedding.to(torch.float32)
    with torch.no_grad():  # control residuals of a size that steers, not drowns, the main blocks
        for blk in dm.vace_blocks:
            blk.after_proj.weight.mul_(0.1)
            blk.after_proj.bias.zero_()
    return patcher


def tiny_flux_controlnet(seed: int = 1, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2):
    """An InstantX-style Flux ControlNet (latent hint, residuals after every double and single block) of
    the host's own ControlNetFlux class, random weights, as comfy.controlnet loads one."""
    import torch
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops
    cfg = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": hidden,
           "mlp_ratio": 4.0, "num_heads": heads, "depth": depth, "depth_single_blocks": depth_single,
           "axes_dim": [hidden // heads // 4, hidden // heads * 3 // 8, hidden // heads * 3 // 8],
           "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    model = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, control_latent_channels=16,
                                                     operations=comfy.ops.disable_weight_init,
                                                     device=torch.device("cpu"), dtype=torch.float32, **cfg)
    _init_weights(model, seed)
    with torch.no_grad():  # residuals strong enough to steer the image visibly
        for lin in list(model.controlnet_blocks) + list(model.controlnet_single_blocks):
            lin.weight.mul_(4.0)
    return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=None,
                                       load_device=torch.device("cpu"), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


def tiny_qwen_image(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 32, dtype=None):
    """Qwen-Image: dual-stream blocks, joint attention; latents (B, 16, 1, H, W) as ComfyUI gives them."""
    import torch
    import comfy.supported_models
    unet_config = {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": layers,
        "attention_head_dim": head_dim, "num_attention_heads": heads, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "axes_dims_rope": (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
    }
    return _build(comfy.supported_models.QwenImage(unet_config), seed, dtype or torch.float32)


def _hunyuan_config(**overrides) -> dict:
    """A tiny HunyuanVideo unet_config; hosts from 0.3.75 on require two more fields."""
    import comfy.ldm.hunyuan_video.model as hv
    config = {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
        "guidance_embed": True, "byt5": False, "meanflow": False,
    }
    if "use_cond_type_embedding" in hv.HunyuanVideoParams.__dataclass_fields__:
        config.update(use_cond_type_embedding=False, vision_in_dim=None)
    config.update(overrides)
    return config


def tiny_hunyuan_video(seed: int = 0, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2,
                       dtype=None):
    """HunyuanVideo: Flux-like blocks with the image before the text; latents (B, 16, T, H, W)."""
    import torch
    import comfy.supported_models
    config = _hunyuan_config(hidden_size=hidden, num_heads=heads, depth=depth, depth_single_blocks=depth_single,
                             axes_dim=[hidden // heads // 4, hidden // heads * 3 // 8, hidden // heads * 3 // 8])
    return _build(comfy.supported_models.HunyuanVideo(config), seed, dtype or torch.float32)


def tiny_hunyuan_image21(seed: int = 0, dtype=None):
    """HunyuanImage 2.1: the HunyuanVideo model with a 2-D patch [1, 1]; latents (B, 64, H, W)."""
    import torch
    import comfy.supported_models
    config = _hunyuan_config(in_channels=64, out_channels=64, vec_in_dim=None, guidance_embed=False,
                             patch_size=[1, 1], axes_dim=[16, 16])
    return _build(comfy.supported_models.HunyuanImage21(config), seed, dtype or torch.float32)


def tiny_hunyuan_video15(seed: int = 0, dtype=None):
    """HunyuanVideo 1.5 (hosts from 0.3.75 on): patch [1, 1, 1], latents (B, 32, T, H, W), a 33-channel
    image-and-mask concat and cond-type embeddings."""
    import torch
    import comfy.supported_models
    if not hasattr(comfy.supported_models, "HunyuanVideo15"):
        raise HostTooOld("HunyuanVideo 1.5 needs a newer ComfyUI (it arrived after 0.3.64)")
    config = _hunyuan_config(in_channels=65, out_channels=32, vec_in_dim=None, guidance_embed=False,
                             patch_size=[1, 1, 1], use_cond_type_embedding=True, vision_in_dim=16)
    return _build(comfy.supported_models.HunyuanVideo15(config), seed, dtype or torch.float32)


def tiny_flux2(seed: int = 0, depth: int = 2, depth_single: int = 2, dtype=None):
    """Flux 2 (hosts from 0.3.75 on): Flux's class with modulation shared by all blocks, patch 1,
    latents (B, 128, H, W)."""
    import torch
    import comfy.supported_models
    if not hasattr(comfy.supported_models, "Flux2"):
        raise HostTooOld("Flux 2 needs a newer ComfyUI (it arrived after 0.3.64)")
    config = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
              "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": depth,
              "depth_single_blocks": depth_single, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1,
              "qkv_bias": False, "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True,
              "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}
    return _build(comfy.supported_models.Flux2(config), seed, dtype or torch.float32)


def tiny_zimage(seed: int = 0, layers: int = 2, dtype=None):
    """Z-Image (hosts from 0.3.75 on): NextDiT with its own modulation, caption and image each padded
    to a multiple of 32 tokens; the adaLN input is 256 wide, so the width is at least 256."""
    import torch
    import comfy.supported_models
    if not hasattr(comfy.supported_models, "ZImage"):
        raise HostTooOld("Z-Image needs a newer ComfyUI (it arrived after 0.3.64)")
    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
              "n_layers": layers, "n_refiner_layers": 1, "n_heads": 8, "n_kv_heads": 8, "qk_norm": True,
              "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
              "ffn_dim_multiplier": 8 / 3, "multiple_of": 16, "z_image_modulation": True, "time_scale": 1000.0,
              "pad_tokens_multiple": 32}
    patcher = _build(comfy.supported_models.ZImage(config), seed, dtype or torch.float32)
    with torch.no_grad():  # tanh-gated layer updates of a visible size (random gates sit near 0)
        for layer in patcher.model.diffusion_model.layers:
            layer.adaLN_modulation[-1].bias.add_(1.0)
    return patcher


class HostTooOld(RuntimeError):
    """The host checkout predates the model family."""


def tiny_lumina2(seed: int = 0, layers: int = 3, dim: int = 64, heads: int = 2, dtype=None):
    """Lumina 2 (NextDiT): one joint sequence [caption, image] per layer; sample with
    cond_extra={"attention_mask": torch.ones(1, context_len, dtype=torch.long)} (it sets the caption
    length)."""
    import torch
    import comfy.supported_models
    head_dim = dim // heads
    unet_config = {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": 32,
        "n_layers": layers, "n_refiner_layers": 1, "n_heads": heads, "n_kv_heads": 1, "qk_norm": True,
        "axes_dims": [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8], "axes_lens": [300, 512, 512],
        "multiple_of": 16,
    }
    patcher = _build(comfy.supported_models.Lumina2(unet_config), seed, dtype or torch.float32)
    with torch.no_grad():  # tanh-gated layer updates of a visible size (random gates sit near 0)
        for layer in patcher.model.diffusion_model.layers:
            layer.adaLN_modulation[1].bias.add_(1.0)
    return patcher


def _build(config, seed, dtype):
    import torch
    import comfy.model_patcher
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.to(dtype)
    _init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def conditioning(context_len: int = 16, extra: dict | None = None, ctx_dim: int = 32, pooled_dim: int = 32):
    """(positive, negative): the random text conditioning sample() uses, the same on every call."""
    import torch
    gen = torch.Generator().manual_seed(1234)
    pos = [[torch.randn(1, context_len, ctx_dim, generator=gen),
            {"pooled_output": torch.randn(1, pooled_dim, generator=gen), **(extra or {})}]]
    neg = [[torch.randn(1, context_len, ctx_dim, generator=gen),
            {"pooled_output": torch.randn(1, pooled_dim, generator=gen), **(extra or {})}]]
    return pos, neg


def sample(model, seed: int = 0, steps: int = 6, cfg: float = 3.0, height: int = 64, width: int = 64,
           batch: int = 1, denoise: float = 1.0, latent=None, context_len: int = 16, sampler: str = "euler",
           scheduler: str = "simple", noise_mask=None, cond_extra: dict | None = None, ctx_dim: int = 32,
           pooled_dim: int = 32):
    """comfy.sample.sample with CFG and random text conditioning; returns the latent. `cond_extra` is
    added to both conditionings (e.g. Lumina 2's attention_mask, which sets its caption length)."""
    import torch
    import comfy.sample
    pos, neg = conditioning(context_len, cond_extra, ctx_dim, pooled_dim)
    if latent is None:
        latent = torch.zeros(batch, 16, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                               denoise=denoise, disable_pbar=True, seed=seed, noise_mask=noise_mask)


# ---- tiny models of the families new in ComfyUI 0.33, through the host's own model detection ----------
#
# A tiny instance of the host's own class gives a state dict keyed as a checkpoint stores it; the host's
# model detection and loader (comfy.sd.load_diffusion_model_state_dict, the UNETLoader's path) then build
# the model from those tensors, as they build a user's. Families whose detection fixes full-size widths
# (Chroma Radiance, Z-Image pixel space) are built from the host's own config class instead.

def host_class(path: str, family: str):
    """The host's class "package.module.Class", or HostTooOld naming the family."""
    module, name = path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise HostTooOld(f"{family} needs a newer ComfyUI (this host has no {path})") from None


def tiny_weights(class_path: str, family: str, seed: int = 0, **config) -> dict:
    """Random weights of the host's class `class_path` built with `config`, as a checkpoint's state dict."""
    import torch
    import comfy.ops
    cls = host_class(class_path, family)
    model = cls(**config, operations=comfy.ops.disable_weight_init, device=torch.device("cpu"), dtype=torch.float32)
    _init_weights(model, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def detected(state_dict: dict, expect: str, metadata: dict | None = None, dtype=None):
    """A ModelPatcher built by the host's detection and loader from `state_dict`; its diffusion model must be
    the class named `expect` (the detection chose the family the test means)."""
    import inspect
    import torch
    import comfy.sd
    cpu = torch.device("cpu")
    load = comfy.sd.load_diffusion_model_state_dict
    extra = {"metadata": metadata, "disable_dynamic": True}  # what older hosts' loader takes, it gets
    extra = {k: v for k, v in extra.items() if k in inspect.signature(load).parameters and v is not None}
    patcher = load(state_dict, model_options={"dtype": dtype or torch.float32, "load_device": cpu,
                                              "offload_device": cpu}, **extra)
    found = type(patcher.model.diffusion_model).__name__ if patcher is not None else None
    if found != expect.rsplit(".", 1)[1]:
        raise RuntimeError(f"the host's model detection built {found} from the tiny {expect} state dict")
    return patcher


def detected_with(state_dict: dict, expect: str, **full_size: object):
    """For detections that fix some widths at full size: the config the host's detection derives from
    `state_dict`, with those widths (`full_size`, each a key detection sets) set to the tiny model's, built by the config class detection picks and loaded with the state dict."""
    import torch
    import comfy.model_detection
    import comfy.model_patcher
    config = comfy.model_detection.detect_unet_config(state_dict, "")
    unknown = [k for k in full_size if k not in config]
    if unknown:
        raise RuntimeError(f"the host's detection no longer fixes {', '.join(unknown)}")
    config.update(full_size)
    model_config = comfy.model_detection.model_config_from_unet_config(config, state_dict)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict, "", device=torch.device("cpu"))
    found = type(model.diffusion_model).__name__
    if found != expect.rsplit(".", 1)[1]:
        raise RuntimeError(f"the host's model detection built {found} from the tiny {expect} state dict")
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny {expect}: weights missing {missing}, unexpected {unexpected}")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_chroma_radiance(seed: int = 0, patch: int = 8):
    """Chroma Radiance: Chroma's blocks on pixel patches (here 8x8) with a NeRF head; latents are images
    (B, 3, H, W). Detection fixes the heads, the modulation approximator and the NeRF head at full size
    (0.3.64 also the width, patch and text width)."""
    path = "comfy.ldm.chroma_radiance.model.ChromaRadiance"
    params = host_class("comfy.ldm.chroma_radiance.model.ChromaRadianceParams", "Chroma Radiance").__dataclass_fields__
    tiny = dict(hidden_size=64, context_in_dim=32, patch_size=patch, axes_dim=[8, 12, 12], num_heads=2, out_dim=64,
                hidden_dim=32, n_layers=2, nerf_hidden_size=16, nerf_depth=1, nerf_tile_size=0)
    config = dict(in_channels=3, out_channels=3, mlp_ratio=4.0, depth=2, depth_single_blocks=2, theta=10000,
                  qkv_bias=True, in_dim=64, txt_ids_dims=[], vec_in_dim=None, nerf_mlp_ratio=4, nerf_max_freqs=8,
                  nerf_final_head_type="conv", nerf_embedder_dtype=None, use_x0=False, use_sequential_txt_ids=False,
                  **tiny)
    # the fields this host's params take (hosts add some, e.g. txt_ids_dims in 0.33)
    sd = tiny_weights(path, "Chroma Radiance", seed, **{k: v for k, v in config.items() if k in params})
    return detected_with(sd, path, **tiny)


WAN_TINY = dict(patch_size=(1, 2, 2), dim=256, ffn_dim=256, num_heads=2, text_dim=4096, freq_dim=256, in_dim=16,
                out_dim=16)  # detection derives these from the tensors (2 heads of 128 at dim 256)


def tiny_wan_animate(seed: int = 0, layers: int = 5):
    """Wan 2.2 Animate: Wan blocks plus pose embedding and a face adapter after every fifth block;
    latents (B, 16, T, H, W) with a 36-channel image concat (in_dim 36)."""
    path = "comfy.ldm.wan.model_animate.AnimateWanModel"
    sd = tiny_weights(path, "Wan Animate", seed, **{**WAN_TINY, "in_dim": 36}, num_layers=layers)
    return detected(sd, path)


def tiny_scail(seed: int = 0, layers: int = 2):
    """Wan SCAIL: Wan blocks over [reference frames, video, pose tokens]; latents (B, 16, T, H, W), 20-channel
    input (the latent and a 4-channel mask)."""
    path = "comfy.ldm.wan.model.SCAILWanModel"
    sd = tiny_weights(path, "Wan SCAIL", seed, **{**WAN_TINY, "in_dim": 20}, num_layers=layers)
    return detected(sd, path)


def tiny_scail2(seed: int = 0, layers: int = 2):
    """Wan SCAIL-2: SCAIL plus additive identity-mask streams (28 channels) over the reference, video and pose
    tokens."""
    path = "comfy.ldm.wan.model.SCAIL2WanModel"
    sd = tiny_weights(path, "Wan SCAIL-2", seed, **{**WAN_TINY, "in_dim": 20}, num_layers=layers)
    return detected(sd, path)


def tiny_kandinsky5(seed: int = 0, layers: int = 2):
    """Kandinsky 5 video: visual blocks that cross-attend to the text; latents (B, 16, T, H, W) with a
    16-channel image and 1-channel mask concat, patched 1x2x2 into 132 inputs; text 3584 wide, pooled 768 (the host's defaults)."""
    path = "comfy.ldm.kandinsky5.model.Kandinsky5"
    sd = tiny_weights(path, "Kandinsky 5", seed, model_dim=128, ff_dim=256, time_dim=64, num_text_blocks=1,
                      num_visual_blocks=layers)
    return detected(sd, path)


def diffusion_model_classes() -> set:
    """Every diffusion model class the host's comfy/model_base.py builds: the `unet_model=` each of its model
    classes passes or defaults to, read from the source and resolved in that module."""
    import ast
    import comfy.model_base as model_base
    found = set()
    for node in ast.walk(ast.parse(Path(model_base.__file__).read_text())):
        values = [k.value for k in node.keywords if k.arg == "unet_model"] if isinstance(node, ast.Call) else []
        if isinstance(node, ast.FunctionDef) and node.args.defaults:
            named = node.args.args[-len(node.args.defaults):]
            values += [d for a, d in zip(named, node.args.defaults) if a.arg == "unet_model"]
        for value in values:
            if isinstance(value, ast.Name) and value.id == "unet_model":
                continue  # passed on from the caller's own parameter
            found.add(eval(compile(ast.Expression(value), model_base.__file__, "eval"), vars(model_base)))
    return found


def tiny_minimax_h3(seed: int = 0, layers: int = 2):
    """MiniMax H3: one packed sequence [text, audio, video] per block, batch 1; latents are (video
    (1, 24, T, H, W), audio (1, 32, 2, T_audio)) pairs; text 64 wide."""
    path = "comfy.ldm.minimax.model.MiniMaxH3Model"
    sd = tiny_weights(path, "MiniMax H3", seed, hidden_size=128, num_layers=layers, token_refiner_num_layers=1,
                      num_attention_heads=2, attention_head_dim=64, ffn_hidden_size=256, text_dim=64,
                      timestep_input_dim=64, time_embed_hidden_size=128, time_embed_dim=64, rope_inv_freq_len=8)
    import torch
    sd["rope.inv_freq"] = 1.0 / 100.0 ** (torch.arange(8) / 8)  # a rotary table that turns (random ones barely do)
    return detected(sd, path)


def tiny_ltxav(seed: int = 0, layers: int = 2):
    """LTX-2 (LTXAVModel): blocks over (video, audio) token pairs; latents are (video (B, 128, T, H, W), audio
    (B, 8, T_audio, 16)) pairs; text 128 wide (video and audio halves). Its config travels, as in LTX-2
    checkpoints, in the file's metadata, which detection reads."""
    import json
    path = "comfy.ldm.lightricks.av_model.LTXAVModel"
    config = dict(in_channels=128, audio_in_channels=128, cross_attention_dim=64, audio_cross_attention_dim=32,
                  attention_head_dim=32, audio_attention_head_dim=16, num_attention_heads=2,
                  audio_num_attention_heads=2, caption_channels=64, num_layers=layers, connector_attention_head_dim=32,
                  connector_num_attention_heads=2, connector_num_layers=1)
    sd = tiny_weights(path, "LTX-2", seed, **config)
    return detected(sd, path, metadata={"config": json.dumps({"transformer": config})})
