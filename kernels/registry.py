"""Which host diffusion models the pack can patch: one entry per family, host-free.

Entries name the host's classes by import path and describe an instance as a Family. The supported
list, the README's support matrix and every refusal message come from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .families import (Family, flux_family, hunyuan_video_family, kandinsky5_family, krea2_family, ltxav_family,
                       minimax_h3_family, mmdit_family, nextdit_family, qwen_image_family, scail_family, wan_family)

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
    refused_features: dict = field(default_factory=dict)  # "maps" / "calibration" -> why not for this family
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
_PACKED_AV = ("it reads the image grid from the sampled latent, which for this model packs the video with its audio "
              "(not supported yet)")
_UNVERIFIED = "its block layout is not described by an adapter and checked by a test yet"

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
    Entry("Chroma Radiance", ("comfy.ldm.chroma_radiance.model.ChromaRadiance",), _flux,
          workflow="Chroma Radiance - SDTM.json"),
    Entry("Wan Animate", ("comfy.ldm.wan.model_animate.AnimateWanModel",),
          lambda dm: wan_family(type(dm).__name__, len(dm.blocks)), patch=_spatial, workflow="Wan Animate - SDTM.json"),
    Entry("Wan SCAIL / SCAIL-2", ("comfy.ldm.wan.model.SCAILWanModel", "comfy.ldm.wan.model.SCAIL2WanModel"),
          lambda dm: scail_family(type(dm).__name__, len(dm.blocks)), patch=_spatial, workflow="Wan SCAIL - SDTM.json"),
    # no public pixel-space checkpoint to name yet: Z-Image's workflow, with its loaders switched, shows the node
    Entry("Z-Image (pixel space)", ("comfy.ldm.lumina.model.NextDiTPixelSpace",), _nextdit,
          workflow="Z-Image - SDTM.json"),
    Entry("Krea 2", ("comfy.ldm.krea2.model.SingleStreamDiT",), lambda dm: krea2_family("Krea2", len(dm.blocks)),
          patch=lambda dm, label: int(dm.patch), workflow="Krea 2 - SDTM.json"),
    Entry("Kandinsky 5", ("comfy.ldm.kandinsky5.model.Kandinsky5",),
          lambda dm: kandinsky5_family("Kandinsky5", len(dm.visual_transformer_blocks)), patch=_spatial,
          workflow="Kandinsky 5 - SDTM.json"),
    Entry("LTX-2", ("comfy.ldm.lightricks.av_model.LTXAVModel",), lambda dm: ltxav_family("LTXAV", len(dm.transformer_blocks)),
          patch=lambda dm, label: spatial_patch(dm.patchifier.patch_size, label),
          refused_features={"maps": _PACKED_AV, "calibration": _PACKED_AV}, workflow="LTX-2 - SDTM.json"),
    Entry("MiniMax H3", ("comfy.ldm.minimax.model.MiniMaxH3Model",),
          lambda dm: minimax_h3_family("MiniMaxH3", len(dm.blocks)), patch=_spatial,
          refused_features={"maps": _PACKED_AV, "calibration": _PACKED_AV}, workflow="MiniMax H3 - SDTM.json"),
    # Refused, each with its reason: every generator class of the newest supported ComfyUI is named here or
    # above (a host test checks it), so a class the host adds is noticed.
    Entry("HiDream", ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",), refused=_NO_HOOK),
    Entry("LTXV", ("comfy.ldm.lightricks.model.LTXVModel",),
          refused="its video tokens, rotary table and per-token timesteps are not described by an adapter yet"),
    Entry("PixArt", ("comfy.ldm.pixart.pixartms.PixArtMS",), refused=_NO_HOOK),
    Entry("Wan speech-to-video", ("comfy.ldm.wan.model.WanModel_S2V",),
          refused="its blocks spread each frame's modulation over the tokens by counting them (repeat_e over "
                  "video, reference and motion frames of different sizes), so fewer image tokens would give them "
                  "other frames' modulation"),
    Entry("Wan HuMo", ("comfy.ldm.wan.model.HumoWanModel",),
          refused="its audio cross-attention cuts the video tokens into equal per-frame groups by their count, "
                  "which fewer tokens would shift"),
    Entry("Wan Animate 2", ("comfy.ldm.wan.model_animate2.WanAnimate2Model",),
          refused="its self-attention runs frame by frame over fixed slices of the token sequence into buffers "
                  "sized for every token, which fewer image tokens would break"),
    Entry("WanDancer", ("comfy.ldm.wan.model_wandancer.WanDancerModel",), refused=_UNVERIFIED),
    Entry("Wan causal (autoregressive)", ("comfy.ldm.wan.ar_model.CausalWanModel",),
          refused="its frame-by-frame generation, the way it is meant to run, calls the blocks directly with "
                  "key/value caches across frames, past any per-block hook"),
    Entry("HiDream O1", ("comfy.ldm.hidream_o1.model.HiDreamO1Transformer",),
          refused="its layers' attention is bound to the options of the whole model call, so the per-block "
                  "attention hooks that CAT's cache and proportional attention need cannot reach it; and any block "
                  "hook turns off its cache of the prompt's keys and values"),
    Entry("AuraFlow", ("comfy.ldm.aura.mmdit.MMDiT",), refused=_UNVERIFIED),
    Entry("Mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",),
          refused="its attention packs the valid text tokens with the video (num_tokens) and takes separate rotary "
                  "cos and sin tables, a layout no adapter describes yet"),
    Entry("HunyuanDiT", ("comfy.ldm.hydit.models.HunYuanDiT",),
          refused="its blocks receive no transformer_options, so per-call state cannot reach them, and its long "
                  "skip connections carry every token between blocks"),
    Entry("SeedVR2", ("comfy.ldm.seedvr.model.NaDiT",),
          refused="its blocks work on variable-length packed video and text sequences (NaDiT), a layout no adapter "
                  "describes yet"),
    Entry("JoyImage", ("comfy.ldm.joyimage.model.JoyImageTransformer3DModel",), refused=_UNVERIFIED),
    Entry("Lens", ("comfy.ldm.lens.model.LensTransformer2DModel",), refused=_UNVERIFIED),
    Entry("Mage-Flow", ("comfy.ldm.mage_flow.model.MageFlowTransformer2DModel",), refused=_UNVERIFIED),
    Entry("Cosmos", ("comfy.ldm.cosmos.model.GeneralDIT",), refused=_NO_HOOK),
    Entry("Cosmos Predict 2", ("comfy.ldm.cosmos.predict2.MiniTrainDIT",), refused=_NO_HOOK),
    Entry("Anima", ("comfy.ldm.anima.model.Anima",), refused=_NO_HOOK),
    Entry("OmniGen 2", ("comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel",), refused=_NO_HOOK),
    Entry("Boogu", ("comfy.ldm.boogu.model.BooguTransformer2DModel",), refused=_NO_HOOK),
    Entry("CogVideoX", ("comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel",), refused=_NO_HOOK),
    Entry("Ernie-Image", ("comfy.ldm.ernie.model.ErnieImageModel",), refused=_NO_HOOK),
    Entry("Ideogram 4", ("comfy.ldm.ideogram4.model.Ideogram4Transformer2DModel",), refused=_NO_HOOK),
    Entry("PixelDiT", ("comfy.ldm.pixeldit.model.PixDiT_T2I", "comfy.ldm.pixeldit.pid.PidNet"), refused=_NO_HOOK),
    Entry("U-Net models (SD 1.x, SDXL, Stable Cascade)",
          ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel", "comfy.ldm.cascade.stage_b.StageB",
           "comfy.ldm.cascade.stage_c.StageC"),
          refused="a convolutional U-Net, not a transformer over image tokens"),
    Entry("audio, 3-D and vision models",
          ("comfy.ldm.audio.dit.AudioDiffusionTransformer", "comfy.ldm.ace.model.ACEStepTransformer2DModel",
           "comfy.ldm.ace.ace_step15.AceStepConditionGenerationModel", "comfy.ldm.minimax_music.dit.MiniMaxMusic3DiT",
           "comfy.ldm.hunyuan3d.model.Hunyuan3Dv2", "comfy.ldm.hunyuan3dv2_1.hunyuandit.HunYuanDiTPlain",
           "comfy.ldm.trellis2.model.Trellis2", "comfy.ldm.triposplat.model.LatentSeqMMFlowModel",
           "comfy.ldm.rt_detr.rtdetr_v4.RTv4", "comfy.ldm.sam3.detector.SAM3Model",
           "comfy.ldm.depth_anything_3.model.DepthAnything3Net"),
          refused="not an image or video generator: the pack reduces image tokens"),
)

SUPPORTED = tuple(e for e in REGISTRY if not e.refused)
SUPPORTED_TEXT = ", ".join(e.label for e in SUPPORTED)


def class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def entry_for(diffusion_model) -> Entry | None:
    for e in _entries_of(type(diffusion_model)):
        if e.when is None or e.when(diffusion_model):
            return e
    return None


def entry_for_class(cls) -> Entry | None:
    """The first entry naming the host class `cls` (or a parent, for entries that match subclasses)."""
    return next(_entries_of(cls), None)


def _entries_of(cls):
    own = class_path(cls)
    parents = {class_path(c) for c in cls.__mro__[1:]}
    return (e for e in REGISTRY if own in e.classes or (e.subclasses and parents.intersection(e.classes)))


def describe(diffusion_model, method_name: str, model_name: str = "", feature: str = "") -> ModelInfo:
    """The family and patch size of a host diffusion model, or an error naming the family and why. `feature`
    ("maps", "calibration"): also refuse it where the family does (Entry.refused_features)."""
    kind = type(diffusion_model).__name__
    e = entry_for(diffusion_model)
    if e is None or e.refused:
        reason = f": {e.label}: {e.refused}" if e is not None else ""
        raise UnsupportedModelError(
            f"{method_name} cannot patch this model: its diffusion model is {kind}"
            f"{f' (model type {model_name})' if model_name else ''}{reason}. Supported families: {SUPPORTED_TEXT}.")
    why = e.refused_features.get(feature)
    if why:
        raise UnsupportedModelError(f"{method_name} cannot patch {e.label}: {why}.")
    try:
        patch = e.patch(diffusion_model, e.label)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{method_name}: {err}") from None
    return ModelInfo(e.describe(diffusion_model), patch)
