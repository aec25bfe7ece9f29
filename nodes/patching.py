"""ComfyUI glue shared by every patch node: family detection, wrappers, block replaces.

A node clones the MODEL, then `install` adds:
- an APPLY_MODEL wrapper that records, per model call, the latent's token grid
  and the denoising progress read from sigma through the model's own
  model_sampling (works with any sampler, step count and denoise);
- an OUTER_SAMPLE wrapper that gives every sampling run fresh statistics (and,
  for a stateful method such as CAT, a fresh run state) and logs a summary and
  frees that state in a `finally`, so an interrupted run leaks nothing;
- a `patches_replace["dit"]` entry per transformer block that merges image
  tokens as the method decides, chained over any replacement already there.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io

import torch

from ..kernels.block_patch import (CALL_KEY, RUNS_KEY, STATE_KEY, CallInfo, RunStats, begin_call, block_replaces,
                                   end_call, row_keys)
from ..kernels.families import (Family, flux_family, hunyuan_video_family, mmdit_family, nextdit_family,
                                qwen_image_family, wan_family)
from ..kernels.schedule import ProgressMap

SUPPORTED_FAMILIES = ("Flux (dev, schnell, Kontext), Chroma, SD3 / SD3.5 (MMDiT), Wan 2.1 / 2.2 "
                      "(text/image-to-video, VACE, camera), Qwen-Image (and -Edit), HunyuanVideo (and "
                      "HunyuanImage 2.1), Lumina 2 / Z-Image (NextDiT)")

# Families the pack knows but cannot patch yet, and why (shown in the error).
_NO_HOOK = "this ComfyUI version gives its transformer layers no per-block hook (patches_replace) to attach to"
KNOWN_UNSUPPORTED = {
    "HiDreamImageTransformer2DModel": "HiDream: " + _NO_HOOK,
    "LTXVModel": "LTXV: " + _NO_HOOK,
    "PixArtMS": "PixArt: " + _NO_HOOK,
    "WanModel_S2V": "Wan speech-to-video blocks receive no transformer_options, so per-call state cannot reach them",
    "HumoWanModel": "Wan HuMo adds audio tokens this adapter does not lay out yet",
}

log = logging.getLogger("token_reduction")


FAMILIES_SHORT = "Flux, Chroma, SD3/SD3.5, Wan, Qwen-Image, HunyuanVideo and Lumina 2 / Z-Image"  # for node descriptions


def model_input():
    """The MODEL input of every patch node."""
    return io.Model.Input("model", tooltip=f"The diffusion model to accelerate: {SUPPORTED_FAMILIES}.")


def detail_cache_input(default: bool, verb: str):
    """The `detail_cache` input of the merging nodes (SDTM, density); `verb` is "merged" or "pooled"."""
    return io.Boolean.Input("detail_cache", default=default,
                            tooltip=f"Off by default. {verb.capitalize()} steps reuse the per-token detail of the "
                                    "model's last full-density call (the steps before start_percent): the "
                                    f"{verb} call decides the coarse picture, the cached one the fine detail. On "
                                    f"the reference model it removes the per-token noise {verb} tokens leave; the "
                                    "detail is from an early step, so fine texture that forms late may soften. "
                                    "Needs start_percent > 0.")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelInfo:
    family: Family
    patch_size: int


def detect_family(model, method_name: str) -> ModelInfo:
    """The family adapter for a MODEL, or a clear error naming what is supported."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    dm = model.get_model_object("diffusion_model")
    kind = type(dm)
    # Exact types: subclasses (e.g. pixel-space variants) lay out tokens differently.
    flux_types, chroma_types, wan_types, qwen_types, hunyuan_types, nextdit_types = _optional_types(
        ("comfy.ldm.flux.model", ("Flux",)), ("comfy.ldm.chroma.model", ("Chroma",)),
        ("comfy.ldm.wan.model", ("WanModel", "VaceWanModel", "CameraWanModel")),
        ("comfy.ldm.qwen_image.model", ("QwenImageTransformer2DModel",)),
        ("comfy.ldm.hunyuan_video.model", ("HunyuanVideo",)), ("comfy.ldm.lumina.model", ("NextDiT",)))
    if kind in flux_types | chroma_types:
        fam = flux_family(kind.__name__, len(dm.double_blocks), len(dm.single_blocks))
        return ModelInfo(fam, int(dm.patch_size))
    if isinstance(dm, MMDiT) and hasattr(dm, "joint_blocks"):
        return ModelInfo(mmdit_family("SD3", len(dm.joint_blocks)), int(dm.patch_size))
    if kind in wan_types:
        return ModelInfo(wan_family(kind.__name__, len(dm.blocks)), _spatial_patch(dm.patch_size, "Wan", method_name))
    if kind in qwen_types:
        return ModelInfo(qwen_image_family("QwenImage", len(dm.transformer_blocks)), int(dm.patch_size))
    if kind in hunyuan_types:
        fam = hunyuan_video_family(kind.__name__, len(dm.double_blocks), len(dm.single_blocks))
        return ModelInfo(fam, _spatial_patch(dm.patch_size, "HunyuanVideo", method_name))
    if kind in nextdit_types:
        return ModelInfo(nextdit_family("NextDiT", len(dm.layers)), int(dm.patch_size))
    reason = KNOWN_UNSUPPORTED.get(kind.__name__, "")
    raise UnsupportedModelError(
        f"{method_name} cannot patch this model: its diffusion model is {kind.__name__} "
        f"(model type {type(model.model).__name__}){': ' + reason if reason else ''}. "
        f"Supported families: {SUPPORTED_FAMILIES}.")


def _spatial_patch(patch, family_name: str, method_name: str) -> int:
    """The square spatial patch of a (T,) H, W patch size; the token grid (the APPLY_MODEL wrapper's)
    assumes one latent frame per token row."""
    patch = tuple(patch)
    if len(patch) == 3 and patch[0] != 1:
        raise UnsupportedModelError(f"{method_name}: {family_name} with temporal patch size {patch[0]} is not "
                                    "supported (the token grid assumes one latent frame per token row).")
    if patch[-1] != patch[-2]:
        raise UnsupportedModelError(f"{method_name}: {family_name} with a non-square patch {patch} is not supported.")
    return int(patch[-1])


def _optional_types(*modules) -> list[set]:
    """Exact diffusion-model classes per (module, class names); hosts too old to have one give an empty set."""
    import importlib
    out = []
    for module_name, names in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            out.append(set())
            continue
        out.append({getattr(module, n) for n in names if hasattr(module, n)})
    return out


_progress_maps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def progress_map(model_sampling) -> ProgressMap:
    pm = _progress_maps.get(model_sampling)
    if pm is None:
        pm = ProgressMap(model_sampling.percent_to_sigma)
        _progress_maps[model_sampling] = pm
    return pm


METHODS_KEY = "token_reduction_methods"  # transformer_options: [(method_key, name, composable)] installed


def check_composable(model, method, method_key: str):
    """Refuse, at patch time, a stack that cannot work (a non-composable method with any other)."""
    installed = model.model_options.get("transformer_options", {}).get(METHODS_KEY, [])
    mine = getattr(method, "composable", True)
    for key, name, composable in installed:
        if not (mine and composable):
            raise ValueError(
                f"{method.name} cannot be stacked with {name}: CAT Pruning computes a changing subset of image "
                f"tokens and caches the others, while {name} already changes the image tokens each block sees. "
                f"Use one of them on this model.")


def install(model, method, method_key: str, info: ModelInfo):
    """Patch a cloned ModelPatcher `model` so that `method` reduces tokens."""
    check_composable(model, method, method_key)
    patch = info.patch_size

    def apply_model_wrapper(executor, *args, **kwargs):
        x, sigma, transformer_options = args[0], args[1], args[5]
        grid = tuple(math.ceil(s / patch) for s in x.shape[2:])
        if x.ndim == 5 and len(grid) == 3:  # video latents patch time by 1
            grid = (x.shape[2],) + grid[1:]
        context = args[3]
        n_txt = context.shape[1] if context is not None and context.ndim == 3 else 0
        n_img = 1
        for g in grid:
            n_img *= g
        sigma_value = float(sigma.flatten()[0])  # one device sync per call
        progress = progress_map(executor.class_obj.model_sampling)(sigma_value)
        transformer_options[CALL_KEY] = CallInfo(grid, n_img, n_txt, progress, sigma_value,
                                                 row_keys(transformer_options, x.shape[0]))
        state = begin_call(method, transformer_options, method_key, info.family, x)
        out = executor(*args, **kwargs)
        if state is not None and len(grid) in (2, 3) and bool((sigma > 0).all()):
            # The model returns the denoised latent; the method works on the predicted noise
            # (x - denoised) / sigma, which is eps for eps models and the velocity for flow models.
            s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(out.dtype)
            noise = (x.to(out.dtype) - out) / s
            reused = end_call(method, state, noise, grid, patch)
            if reused is not None:
                new_noise, computed = reused
                out = torch.where(computed, out, x.to(out.dtype) - new_noise.to(out.dtype) * s)
        return out

    def outer_sample_wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        to = guider.model_options["transformer_options"]
        runs = dict(to.get(RUNS_KEY, {}))
        stats = runs[method_key] = RunStats()
        to[RUNS_KEY] = runs
        state = None
        if hasattr(method, "new_run_state"):
            state = method.new_run_state()
            to[STATE_KEY] = {**to.get(STATE_KEY, {}), method_key: state}
        try:
            return executor(*args, **kwargs)
        finally:
            log.info(stats.summary(method.name))
            if state is not None:
                log.info(f"{method.name}: cache peak {state.peak_cache_bytes / 2**20:.1f} MiB, freed")
                state.clear()
            guider.model_options = original_options

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, method_key, apply_model_wrapper)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, method_key, outer_sample_wrapper)
    to = model.model_options.setdefault("transformer_options", {})
    to[METHODS_KEY] = list(to.get(METHODS_KEY, [])) + [(method_key, method.name, getattr(method, "composable", True))]
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    set_block_replaces(model, info.family, block_replaces(info.family, method, method_key, existing))


def set_block_replaces(model, family: Family, replaces: dict):
    """Register {block key: replace} as `patches_replace["dit"]` entries on a cloned ModelPatcher.

    Families whose layers read no such hook (NextDiT: `family.layer_list`) get, once per layer, an
    object patch of the layer's `forward` that looks the entry up in the call's transformer_options,
    so they chain, clone and unpatch like the hooked families. Weights and their keys stay as they are
    (LoRA, weight patches and offloading are untouched).
    """
    for key, replace in replaces.items():
        model.set_model_patch_replace(replace, "dit", key[0], key[1])
    if family.layer_list:
        masked = {"mask": None, "any": False}  # shared by the layers: one mask check per model call
        for spec in family.blocks:
            name = f"diffusion_model.{family.layer_list}.{spec.key[1]}"
            if name + ".forward" not in model.object_patches:
                model.add_object_patch(name + ".forward", _hooked_nextdit_forward(model.get_model_object(name),
                                                                                 spec.key, masked))


def _hooked_nextdit_forward(layer, key, masked: dict):
    """NextDiT's JointTransformerBlock.forward(x, x_mask, freqs_cis, adaln_input, transformer_options),
    routed through the `patches_replace["dit"][key]` entry of the call when there is one. A caption mask
    that masks any key means the rows' captions differ in length, so their image tokens start at
    different places: the entry then gets `attn_mask` too, and runs the call unreduced."""
    run = type(layer).forward.__get__(layer)

    def original(a):
        return {"img": run(a["img"], a["x_mask"], a["pe"], a["vec"], transformer_options=a["transformer_options"])}

    def forward(x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):
        replace = transformer_options.get("patches_replace", {}).get("dit", {}).get(key)
        if replace is None:
            return run(x, x_mask, freqs_cis, adaln_input, transformer_options=transformer_options)
        args = {"img": x, "x_mask": x_mask, "pe": freqs_cis, "vec": adaln_input,
                "transformer_options": transformer_options}
        if x_mask is not None:
            if masked["mask"] is not x_mask:
                masked.update(mask=x_mask, any=bool((x_mask != 0).any()))
            if masked["any"]:
                args["attn_mask"] = x_mask
        return replace(args, {"original_block": original})["img"]

    return forward
