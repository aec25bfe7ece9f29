"""ComfyUI glue shared by every patch node: family detection, wrappers, block replaces.

A node clones the MODEL, then `install` adds:
- an APPLY_MODEL wrapper that records, per model call, the latent's token grid
  and the denoising progress read from sigma through the model's own
  model_sampling (works with any sampler, step count and denoise);
- an OUTER_SAMPLE wrapper that gives every sampling run fresh statistics and
  logs a summary in a `finally`, so an interrupted run leaks nothing;
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

from ..kernels.block_patch import CALL_KEY, RUNS_KEY, CallInfo, RunStats, block_replaces
from ..kernels.families import Family, flux_family, mmdit_family
from ..kernels.schedule import ProgressMap

SUPPORTED_FAMILIES = "Flux (dev, schnell, Kontext), Chroma, SD3 / SD3.5 (MMDiT)"

log = logging.getLogger("token_reduction")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelInfo:
    family: Family
    patch_size: int


def detect_family(model, method_name: str) -> ModelInfo:
    """The family adapter for a MODEL, or a clear error naming what is supported."""
    import comfy.ldm.flux.model as flux_model
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    dm = model.get_model_object("diffusion_model")
    kind = type(dm)
    flux_types = {flux_model.Flux}
    try:
        import comfy.ldm.chroma.model as chroma_model
        flux_types.add(chroma_model.Chroma)
    except ImportError:  # older hosts have no Chroma
        pass
    # Exact types: subclasses (e.g. pixel-space variants) lay out tokens differently.
    if kind in flux_types:
        fam = flux_family(kind.__name__, len(dm.double_blocks), len(dm.single_blocks))
        return ModelInfo(fam, int(dm.patch_size))
    if isinstance(dm, MMDiT) and hasattr(dm, "joint_blocks"):
        return ModelInfo(mmdit_family("SD3", len(dm.joint_blocks)), int(dm.patch_size))
    raise UnsupportedModelError(
        f"{method_name} cannot patch this model: its diffusion model is {kind.__name__} "
        f"(model type {type(model.model).__name__}). Supported families: {SUPPORTED_FAMILIES}.")


_progress_maps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def progress_map(model_sampling) -> ProgressMap:
    pm = _progress_maps.get(model_sampling)
    if pm is None:
        pm = ProgressMap(model_sampling.percent_to_sigma)
        _progress_maps[model_sampling] = pm
    return pm


def install(model, method, method_key: str, info: ModelInfo):
    """Patch a cloned ModelPatcher `model` so that `method` reduces tokens."""
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
        progress = progress_map(executor.class_obj.model_sampling)(sigma)
        transformer_options[CALL_KEY] = CallInfo(grid, n_img, n_txt, progress)
        return executor(*args, **kwargs)

    def outer_sample_wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        to = guider.model_options["transformer_options"]
        runs = dict(to.get(RUNS_KEY, {}))
        stats = runs[method_key] = RunStats()
        to[RUNS_KEY] = runs
        try:
            return executor(*args, **kwargs)
        finally:
            log.info(stats.summary(method.name))
            guider.model_options = original_options

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, method_key, apply_model_wrapper)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, method_key, outer_sample_wrapper)
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for key, replace in block_replaces(info.family, method, method_key, existing).items():
        model.set_model_patch_replace(replace, "dit", key[0], key[1])


