"""Which host diffusion models the pack can patch: one entry per family, host-free.

Entries name the host's classes by import path and describe an instance as a Family. The supported
list, the README's support matrix and every refusal message come from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .families import (Family, flux_family, hunyuan_video_family, mmdit_family, nextdit_family, qwen_image_family,
                       wan_family)

TESTED_COMFYUI = ("0.3.64", "0.33.0")  # the host tests run against both ends of the supported range


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    family: Family
    patch_size: int


@dataclass(frozen=True)
class Entry:
    label: str                          # what users call it
    classes: tuple[str, ...]            # "module.Class" of the host's diffusion model
    describe: Callable[[object], Family] | None = None
    patch: Callable[[object, str], int] = lambda dm, label: int(dm.patch_size)
    subclasses: bool = False            # also match subclasses (SD3's wrapper class)
    when: Callable[[object], bool] | None = None  # tells apart products that share a class (first match wins)
    refused: str = ""                   # why the pack cannot patch it (describe is None)
    workflow: str = ""                  # example workflow in workflows/


def spatial_patch(patch, label: str) -> int:
    """The square spatial patch of a (T,) H, W patch size; the token grid assumes one frame per row."""
    patch = tuple(patch)
    if len(patch) == 3 and patch[0] != 1:
        raise UnsupportedModelError(f"{label} with temporal patch size {patch[0]} is not supported (the token grid "
                                    "assumes one latent frame per token row).")
    if patch[-1] != patch[-2]:
        raise UnsupportedModelError(f"{label} with a non-square patch {patch} is not supported.")
    return int(patch[-1])


_NO_HOOK = "this ComfyUI version gives its transformer layers no per-block hook (patches_replace) to attach to"

def _flux(dm) -> Family:
    return flux_family(type(dm).__name__, len(dm.double_blocks), len(dm.single_blocks))


def _hunyuan(dm) -> Family:
    return hunyuan_video_family(type(dm).__name__, len(dm.double_blocks), len(dm.single_blocks))


def _nextdit(dm) -> Family:
    return nextdit_family("NextDiT", len(dm.layers), getattr(dm, "pad_tokens_multiple", None))


def _spatial(dm, label) -> int:
    return spatial_patch(dm.patch_size, label)


REGISTRY: tuple[Entry, ...] = (
    Entry("Flux 2", ("comfy.ldm.flux.model.Flux",), _flux,
          when=lambda dm: bool(getattr(getattr(dm, "params", None), "global_modulation", False)),
          workflow="Flux 2 - SDTM.json"),
    Entry("Flux (dev, schnell, Kontext)", ("comfy.ldm.flux.model.Flux",), _flux, workflow="Flux - SDTM.json"),
    Entry("Chroma", ("comfy.ldm.chroma.model.Chroma",), _flux, workflow="Chroma - SDTM.json"),
    Entry("SD3 / SD3.5 (MMDiT)", ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",),
          lambda dm: mmdit_family("SD3", len(dm.joint_blocks)), subclasses=True, workflow="SD3.5 - SDTM.json"),
    Entry("Wan 2.1 / 2.2 (text/image-to-video, VACE, camera)",
          ("comfy.ldm.wan.model.WanModel", "comfy.ldm.wan.model.VaceWanModel", "comfy.ldm.wan.model.CameraWanModel"),
          lambda dm: wan_family(type(dm).__name__, len(dm.blocks)), patch=_spatial, workflow="Wan 2.1 - SDTM.json"),
    Entry("Qwen-Image (and -Edit)", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
          lambda dm: qwen_image_family("QwenImage", len(dm.transformer_blocks)), workflow="Qwen-Image - SDTM.json"),
    Entry("HunyuanImage 2.1", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",), _hunyuan, patch=_spatial,
          when=lambda dm: len(tuple(dm.patch_size)) == 2, workflow="HunyuanImage 2.1 - SDTM.json"),
    Entry("HunyuanVideo 1.5", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",), _hunyuan, patch=_spatial,
          when=lambda dm: getattr(dm, "cond_type_embedding", None) is not None, workflow="HunyuanVideo 1.5 - SDTM.json"),
    Entry("HunyuanVideo", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",), _hunyuan, patch=_spatial,
          workflow="HunyuanVideo - SDTM.json"),
    Entry("Z-Image", ("comfy.ldm.lumina.model.NextDiT",), _nextdit,
          when=lambda dm: getattr(dm, "pad_tokens_multiple", None) is not None, workflow="Z-Image - SDTM.json"),
    Entry("Lumina 2 (NextDiT)", ("comfy.ldm.lumina.model.NextDiT",), _nextdit, workflow="Lumina 2 - SDTM.json"),
    Entry("HiDream", ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",), refused=_NO_HOOK),
    Entry("LTXV", ("comfy.ldm.lightricks.model.LTXVModel",),
          refused="its video tokens, rotary table and per-token timesteps are not described by an adapter yet"),
    Entry("PixArt", ("comfy.ldm.pixart.pixartms.PixArtMS",), refused=_NO_HOOK),
    Entry("Wan speech-to-video", ("comfy.ldm.wan.model.WanModel_S2V",),
          refused="its blocks receive no transformer_options, so per-call state cannot reach them"),
    Entry("Wan HuMo", ("comfy.ldm.wan.model.HumoWanModel",),
          refused="it adds audio tokens this adapter does not lay out yet"),
)

SUPPORTED = tuple(e for e in REGISTRY if not e.refused)
SUPPORTED_TEXT = ", ".join(e.label for e in SUPPORTED)


def class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def entry_for(diffusion_model) -> Entry | None:
    own = class_path(type(diffusion_model))
    parents = {class_path(c) for c in type(diffusion_model).__mro__[1:]}
    for e in REGISTRY:
        if own in e.classes or (e.subclasses and parents.intersection(e.classes)):
            if e.when is None or e.when(diffusion_model):
                return e
    return None


def describe(diffusion_model, method_name: str, model_name: str = "") -> ModelInfo:
    """The family and patch size of a host diffusion model, or an error naming the family and why."""
    kind = type(diffusion_model).__name__
    e = entry_for(diffusion_model)
    if e is None or e.refused:
        reason = f": {e.label}: {e.refused}" if e is not None else ""
        raise UnsupportedModelError(
            f"{method_name} cannot patch this model: its diffusion model is {kind}"
            f"{f' (model type {model_name})' if model_name else ''}{reason}. Supported families: {SUPPORTED_TEXT}.")
    try:
        patch = e.patch(diffusion_model, e.label)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{method_name}: {err}") from None
    return ModelInfo(e.describe(diffusion_model), patch)
