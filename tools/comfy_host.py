"""Find and import the ComfyUI host in-process; build tiny models of its own classes.

The host is found through COMFYUI_PATH, else the ComfyUI checkout this pack sits in
(ComfyUI/custom_nodes/<pack>), else ~/ComfyUI. Used by the host tests (which skip with the reason
when it is missing), tools/compare.py and tools/benchmark.py.
"""
from __future__ import annotations

import asyncio
import importlib
import json
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


def every_step_inputs(node_cls, **overrides) -> dict:
    """node_inputs() with the method merging (or pooling) at every step after a short warm-up and no detail
    cache (its spec's every_step): the merging mechanics, which the defaults' full refresh steps would hide
    from a test."""
    widget = importlib.import_module(f"{PACK_NAME}.nodes.patch_node").widget_value
    settings = node_cls.SPEC.every_step
    return node_inputs(node_cls, **{**{k: widget(v) for k, v in settings.items()}, **overrides})


def run_node(node_cls, node_id: str = "1", **inputs):
    """Execute a node as a queued prompt does: ComfyUI's own execution.get_input_data and get_output_data
    (which give a V3 node its class clone, hidden inputs and locked methods). Returns its outputs."""
    import execution
    input_data_all, _, hidden = execution.get_input_data(inputs, node_cls, node_id)
    output, _, _, pending = asyncio.run(execution.get_output_data("token-reduction-tests", node_id, node_cls,
                                                                  input_data_all, None, None, hidden))
    assert not pending, f"{node_cls.__name__} left a task running"
    return tuple(values[0] for values in output)


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


class HostTooOld(RuntimeError):
    """The host checkout predates the model family."""


_layouts: dict | None = None


def checkpoint_layout(family: str) -> dict:
    """{"model_config": class name, "tensors": {name: shape}} of the family's published checkpoint at depth 2,
    written by tools/checkpoint_layouts.py (this module is also loaded alone, by path: it reads the file)."""
    global _layouts
    if _layouts is None:
        _layouts = json.loads((Path(__file__).resolve().parent / "checkpoint_layouts.json").read_text())
    return _layouts[family]


def detected_model_config(family: str, marker_keys: tuple = ()):
    """The host's model config for the family's checkpoint layout, picked by the host's own detection
    (comfy.model_detection, as a checkpoint loader does): its class and every config field this host
    version needs. `marker_keys`: extra tensor names some checkpoints carry (Qwen-Image-Edit 2511's
    __index_timestep_zero__). HostTooOld when this host does not know the family."""
    import torch
    import comfy.model_detection
    layout = checkpoint_layout(family)
    expected = layout["model_config"]
    sd = {k: torch.empty(shape, device="meta") for k, shape in layout["tensors"].items()}
    sd.update((k, torch.empty(0, device="meta")) for k in marker_keys)
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd) if unet_config else None
    found = type(model_config).__name__ if model_config is not None else None
    if found != expected:
        raise HostTooOld(f"this ComfyUI does not detect a {family} checkpoint as {expected} (found: {found})")
    return model_config


def tiny_model(family: str, sizes: dict, seed: int = 0, dtype=None, marker_keys: tuple = ()):
    """A ModelPatcher of the host's own class for `family`, built as a loaded checkpoint would be (see
    detected_model_config), at the tiny `sizes` (widths, heads, depths: the fields a checkpoint's tensor
    shapes decide), with seeded random weights."""
    import torch
    model_config = detected_model_config(family, marker_keys)
    model_config.unet_config.update(sizes)
    patcher = _build(model_config, seed, dtype or torch.float32)
    n_params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    if n_params > TINY_PARAMS:  # a size this host names otherwise kept its full-size value
        raise RuntimeError(f"tiny {family} has {n_params} parameters: this host ignored some of {sorted(sizes)}")
    return patcher


TINY_PARAMS = 100_000_000  # the full-size layouts hold hundreds of millions at depth 2


def _flux_axes(hidden: int, heads: int) -> list:
    return [hidden // heads // 4, hidden // heads * 3 // 8, hidden // heads * 3 // 8]


def tiny_flux(seed: int = 0, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2,
              dtype=None):
    return tiny_model("flux", flux_sizes(depth, depth_single, hidden, heads), seed, dtype)


def flux_sizes(depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2) -> dict:
    """Tiny Flux sizes (also those of the tiny Flux ControlNet)."""
    return {"vec_in_dim": 32, "context_in_dim": 32, "hidden_size": hidden, "num_heads": heads, "depth": depth,
            "depth_single_blocks": depth_single, "axes_dim": _flux_axes(hidden, heads)}


def tiny_sd3(seed: int = 0, depth: int = 2, dtype=None):
    """SD3 (MMDiT): `depth` sets both the width (64 x depth) and the number of joint blocks."""
    return tiny_model("sd3", {"depth": depth, "num_blocks": None, "pos_embed_max_size": 64, "num_patches": 64 * 64,
                              "adm_in_channels": 32,
                              "context_embedder_config": {"target": "torch.nn.Linear",
                                                          "params": {"in_features": 32, "out_features": 64 * depth}}},
                      seed, dtype)


def tiny_chroma(seed: int = 0, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2,
                dtype=None):
    """Chroma: Flux's blocks with a distilled modulation approximator (in_dim 64 = 16 + 16 + 32)."""
    return tiny_model("chroma", {"context_in_dim": 32, "hidden_size": hidden, "num_heads": heads, "depth": depth,
                                 "depth_single_blocks": depth_single, "axes_dim": _flux_axes(hidden, heads),
                                 "out_dim": hidden, "hidden_dim": 32, "n_layers": 2}, seed, dtype)


def _wan_sizes(layers: int, dim: int, heads: int) -> dict:
    return {"text_len": 16, "dim": dim, "ffn_dim": 2 * dim, "freq_dim": 32, "text_dim": 32, "num_heads": heads,
            "num_layers": layers}


def tiny_wan(seed: int = 0, layers: int = 2, dim: int = 64, heads: int = 2, dtype=None):
    """Wan 2.1 text-to-video (the architecture of both Wan 2.2 A14B experts); latents (B, 16, T, H, W)."""
    import torch
    patcher = tiny_model("wan", _wan_sizes(layers, dim, heads), seed, dtype)
    patcher.model.diffusion_model.patch_embedding.to(torch.float32)  # ComfyUI keeps it in fp32 (x.float())
    return patcher


def tiny_wan_vace(seed: int = 0, layers: int = 2, dim: int = 64, heads: int = 2, dtype=None):
    """Wan 2.1 VACE: a control branch whose blocks add residuals (c_skip) after the main blocks."""
    import torch
    patcher = tiny_model("wan_vace", {**_wan_sizes(layers, dim, heads), "vace_layers": layers}, seed, dtype)
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
    the host's own ControlNetFlux class, random weights, built as comfy.controlnet loads one: from the
    config the host detects for a Flux checkpoint."""
    import torch
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops
    config = {**detected_model_config("flux").unet_config, **flux_sizes(depth, depth_single, hidden, heads)}
    model = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, control_latent_channels=16,
                                                     operations=comfy.ops.disable_weight_init,
                                                     device=torch.device("cpu"), dtype=torch.float32, **config)
    _init_weights(model, seed)
    with torch.no_grad():  # residuals strong enough to steer the image visibly
        for lin in list(model.controlnet_blocks) + list(model.controlnet_single_blocks):
            lin.weight.mul_(4.0)
    return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=None,
                                       load_device=torch.device("cpu"), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


QWEN_EDIT_2511 = ("__index_timestep_zero__",)  # the tensor name by which a checkpoint says it is Edit 2511


def tiny_qwen_image(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 32, dtype=None,
                    marker_keys: tuple = ()):
    """Qwen-Image: dual-stream blocks, joint attention; latents (B, 16, 1, H, W) as ComfyUI gives them.
    marker_keys=QWEN_EDIT_2511: Qwen-Image-Edit 2511, whose reference tokens get a modulation of their own."""
    return tiny_model("qwen_image", {"num_layers": layers, "attention_head_dim": head_dim,
                                     "num_attention_heads": heads, "joint_attention_dim": 32,
                                     "pooled_projection_dim": 32,
                                     "axes_dims_rope": (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)},
                      seed, dtype, marker_keys)


def _hunyuan_sizes(**overrides) -> dict:
    return {"vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "num_heads": 2, "depth": 2,
            "depth_single_blocks": 2, "axes_dim": [8, 12, 12], **overrides}


def tiny_hunyuan_video(seed: int = 0, depth: int = 2, depth_single: int = 2, hidden: int = 64, heads: int = 2,
                       dtype=None):
    """HunyuanVideo: Flux-like blocks, a text key mask; latents (B, 16, T, H, W)."""
    return tiny_model("hunyuan_video", _hunyuan_sizes(hidden_size=hidden, num_heads=heads, depth=depth,
                                                      depth_single_blocks=depth_single,
                                                      axes_dim=_flux_axes(hidden, heads)), seed, dtype)


def tiny_hunyuan_image21(seed: int = 0, dtype=None):
    """HunyuanImage 2.1: the HunyuanVideo model with a 2-D patch [1, 1]; latents (B, 64, H, W)."""
    return tiny_model("hunyuan_image21", _hunyuan_sizes(vec_in_dim=None, axes_dim=[16, 16]), seed, dtype)


def tiny_hunyuan_video15(seed: int = 0, dtype=None):
    """HunyuanVideo 1.5 (hosts from 0.3.75 on): patch [1, 1, 1], latents (B, 32, T, H, W), a 33-channel
    image-and-mask concat and cond-type embeddings."""
    return tiny_model("hunyuan_video15", _hunyuan_sizes(vec_in_dim=None, vision_in_dim=16), seed, dtype)


def tiny_flux2(seed: int = 0, depth: int = 2, depth_single: int = 2, dtype=None):
    """Flux 2 (hosts from 0.3.75 on): Flux's class with modulation shared by all blocks, patch 1,
    latents (B, 128, H, W)."""
    return tiny_model("flux2", {"context_in_dim": 32, "hidden_size": 64, "num_heads": 2, "depth": depth,
                                "depth_single_blocks": depth_single, "axes_dim": [8, 8, 8, 8]}, seed, dtype)


def tiny_zimage(seed: int = 0, layers: int = 2, dtype=None):
    """Z-Image (hosts from 0.3.75 on): NextDiT with its own modulation, caption and image each padded
    to a multiple of 32 tokens; the adaLN input is 256 wide, so the width is at least 256."""
    return _open_gates(tiny_model("zimage", {**_zimage_sizes(layers), "multiple_of": 16}, seed, dtype))


def _zimage_sizes(layers: int) -> dict:
    return {"dim": 256, "cap_feat_dim": 32, "n_layers": layers, "n_refiner_layers": 1, "n_heads": 8, "n_kv_heads": 8,
            "axes_dims": [8, 12, 12]}


def _open_gates(patcher):
    """Z-Image's tanh-gated layer updates at a visible size (random gates sit near 0)."""
    import torch
    with torch.no_grad():
        for layer in patcher.model.diffusion_model.layers:
            layer.adaLN_modulation[-1].bias.add_(1.0)
    return patcher


def tiny_lumina2(seed: int = 0, layers: int = 3, dim: int = 64, heads: int = 2, dtype=None):
    """Lumina 2 (NextDiT): one joint sequence [caption, image] per layer; sample with
    cond_extra={"attention_mask": torch.ones(1, context_len, dtype=torch.long)} (it sets the caption
    length)."""
    import torch
    head_dim = dim // heads
    patcher = tiny_model("lumina2", {"dim": dim, "cap_feat_dim": 32, "n_layers": layers, "n_refiner_layers": 1,
                                     "n_heads": heads, "n_kv_heads": 1,
                                     "axes_dims": [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8],
                                     "multiple_of": 16}, seed, dtype)
    with torch.no_grad():  # tanh-gated layer updates of a visible size (random gates sit near 0)
        for layer in patcher.model.diffusion_model.layers:
            layer.adaLN_modulation[1].bias.add_(1.0)
    return patcher


def _build(model_config, seed, dtype):
    import torch
    import comfy.model_patcher
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
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


# ---- tiny models of the families new in ComfyUI 0.33 ------------------------------------------------

def tiny_chroma_radiance(seed: int = 0, patch: int = 8, dtype=None):
    """Chroma Radiance: Chroma's blocks on pixel patches (here 8x8) with a NeRF head painting each patch;
    latents are images (B, 3, H, W)."""
    return tiny_model("chroma_radiance", {"context_in_dim": 32, "hidden_size": 64, "num_heads": 2, "depth": 2,
                                          "depth_single_blocks": 2, "axes_dim": _flux_axes(64, 2), "out_dim": 64,
                                          "hidden_dim": 32, "n_layers": 2, "patch_size": patch,
                                          "nerf_hidden_size": 16, "nerf_depth": 1, "nerf_tile_size": 0}, seed, dtype)


def _tiny_wan(family: str, layers: int, seed: int, dtype):
    import torch
    patcher = tiny_model(family, _wan_sizes(layers, 64, 2), seed, dtype)
    patcher.model.diffusion_model.patch_embedding.to(torch.float32)  # ComfyUI keeps it in fp32 (x.float())
    return patcher


def tiny_wan_animate(seed: int = 0, layers: int = 5, dtype=None):
    """Wan 2.2 Animate: Wan's blocks, a pose embedding added to the video tokens and a face adapter after every
    fifth block; latents (B, 16, T, H, W) with a 20-channel image-and-mask concat."""
    return _tiny_wan("wan_animate", layers, seed, dtype)


def tiny_scail(seed: int = 0, layers: int = 2, dtype=None):
    """Wan SCAIL: Wan's blocks over [reference frames, video, pose tokens]; latents (B, 16, T, H, W) with a
    4-channel mask."""
    return _tiny_wan("wan_scail", layers, seed, dtype)


def tiny_scail2(seed: int = 0, layers: int = 2, dtype=None):
    """Wan SCAIL-2: SCAIL plus additive identity-mask streams (28 channels) over the reference, video and pose
    tokens."""
    return _tiny_wan("wan_scail2", layers, seed, dtype)


def tiny_kandinsky5(seed: int = 0, layers: int = 2, dtype=None):
    """Kandinsky 5 video: visual blocks that cross-attend to the text; latents (B, 16, T, H, W) with a
    16-channel image and 1-channel mask concat, patched 1x2x2 into 132 inputs."""
    return tiny_model("kandinsky5", {"model_dim": 128, "ff_dim": 256, "time_dim": 64, "num_text_blocks": 1,
                                     "num_visual_blocks": layers, "in_text_dim": 32, "in_text_dim2": 32},
                      seed, dtype)


def tiny_krea2(seed: int = 0, layers: int = 2, dtype=None):
    """Krea 2: single-stream blocks over [text, image, references] (no per-block hook: the pack patches its
    layers); text arrives as txtlayers stacked states (here 2 x 32 = 64 wide)."""
    return tiny_model("krea2", {"features": 128, "heads": 2, "kvheads": 1, "multiplier": 2, "layers": layers,
                                "txtdim": 32, "txtlayers": 2, "txtheads": 2, "txtkvheads": 2}, seed, dtype)


def tiny_minimax_h3(seed: int = 0, layers: int = 2, dtype=None):
    """MiniMax H3: one packed sequence [text, audio, video] per block, batch 1; latents are (video
    (1, 24, T, H, W), audio (1, 32, 2, T_audio)) pairs; text 64 wide."""
    import torch
    patcher = tiny_model("minimax_h3", {"hidden_size": 128, "num_layers": layers, "token_refiner_num_layers": 1,
                                        "num_attention_heads": 2, "attention_head_dim": 64, "ffn_hidden_size": 256,
                                        "text_dim": 64, "timestep_input_dim": 64, "time_embed_hidden_size": 128,
                                        "time_embed_dim": 64, "rope_inv_freq_len": 8}, seed, dtype)
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        dm.rope.inv_freq.copy_(1.0 / 100.0 ** (torch.arange(8) / 8))  # a rotary table that turns
        for block in dm.blocks:  # gated block updates of a visible size (random gates sit near 0)
            gates = block.adaln_proj.linear.bias.view(3, 6, -1)  # (modality, shift/scale/gate x 2, width)
            gates[:, 2].add_(1.0)
            gates[:, 5].add_(1.0)
    return patcher


def tiny_ltxav(seed: int = 0, layers: int = 2, dtype=None):
    """LTX-2 (LTXAVModel): blocks over (video, audio) token pairs; latents are (video (B, 128, T, H, W), audio
    (B, 8, T_audio, 16)) pairs; text 128 wide (video and audio halves)."""
    return tiny_model("ltxav", {"cross_attention_dim": 64, "audio_cross_attention_dim": 32, "attention_head_dim": 32,
                                "audio_attention_head_dim": 16, "num_attention_heads": 2,
                                "audio_num_attention_heads": 2, "caption_channels": 64, "num_layers": layers,
                                "connector_attention_head_dim": 32, "connector_num_attention_heads": 2,
                                "connector_num_layers": 1}, seed, dtype)


def tiny_zimage_pixel(seed: int = 0, layers: int = 2, patch: int = 8, dtype=None):
    """Z-Image pixel space (NextDiTPixelSpace): Z-Image's layers on pixel patches (here 8x8) with a per-patch
    decoder; latents are images (B, 3, H, W)."""
    return _open_gates(tiny_model("zimage_pixel", {**_zimage_sizes(layers), "patch_size": patch,
                                                   "decoder_hidden_size": 64, "decoder_num_res_blocks": 1,
                                                   "decoder_in_channels": patch * patch * 3}, seed, dtype))


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

