"""ComfyUI glue shared by every patch node: family detection, wrappers, block replaces.

`install` binds a method to a cloned MODEL through kernels.runtime.Runtime: an APPLY_MODEL wrapper per
model call, an OUTER_SAMPLE wrapper that frees each run's state in a `finally` (an interrupted run
leaks nothing), and a `patches_replace["dit"]` entry per block, chained over any already there.
"""
from __future__ import annotations

import inspect
import logging
import re
import sys
import weakref

import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io

import torch

from ..kernels.families import CONDS_KEY, Family, first_stream, with_first_stream
from ..kernels.registry import SUPPORTED, SUPPORTED_TEXT, ModelInfo, UnsupportedModelError, describe
from ..kernels.runtime import METHODS_KEY, OBSERVER_KEY, Installed, Runtime, row_keys, warn_once
from ..kernels.schedule import ProgressMap

__all__ = ["ModelInfo", "UnsupportedModelError"]

CATEGORY = "model_patches/token_reduction"
FAMILIES_SHORT = ", ".join(re.sub(r" \(.*\)", "", e.label) for e in SUPPORTED)  # for node descriptions

log = logging.getLogger("token_reduction")


def model_input():
    """The MODEL input of every patch node."""
    return io.Model.Input("model", tooltip=f"The diffusion model to accelerate: {SUPPORTED_TEXT}.")


def detect_family(model, method_name: str, feature: str = "") -> ModelInfo:
    """The family adapter for a MODEL, or a clear error naming the family and what is supported (and whether
    it supports `feature`: registry.Entry.refused_features)."""
    return describe(model.get_model_object("diffusion_model"), method_name, type(model.model).__name__, feature)


_progress_maps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def progress_map(model_sampling) -> ProgressMap:
    pm = _progress_maps.get(model_sampling)
    if pm is None:
        pm = ProgressMap(model_sampling.percent_to_sigma)
        _progress_maps[model_sampling] = pm
    return pm


def check_composable(model, method):
    """Refuse at patch time a non-composable method stacked with any other reducing method."""
    if method.observes_only:
        return
    installed = model.model_options.get("transformer_options", {}).get(METHODS_KEY, [])
    for other in installed:
        if not other.observes_only and not (method.composable and other.composable):
            pruning = method if not method.composable else other
            raise ValueError(
                f"{method.name} cannot be stacked with {other.name}: {pruning.name} computes a changing subset of "
                f"image tokens and caches the others, while the other method changes the image tokens each block "
                f"sees. Use one of them on this model.")


def patch_model(model, method, method_key: str, method_name: str, node_id=None):
    """Detect the family, clone the MODEL and install `method`; node `node_id` shows each run's summary."""
    info = detect_family(model, method_name)
    patched = model.clone()
    install(patched, method, method_key, info, node_id)
    return patched


def show_on_node(node_id, text: str):
    """Text under a node in the frontend (ComfyUI's progress text), when a server runs and the node is known."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if node_id is not None and server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)


_signatures: dict = {}


def call_arguments(executor, args: tuple, kwargs: dict) -> dict:
    """A wrapped host call's arguments by the host's own parameter names (never by position)."""
    func = getattr(executor.original, "__func__", executor.original)
    signature = _signatures.get(func)
    if signature is None:
        signature = _signatures[func] = inspect.signature(executor.original)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def install(model, method, method_key: str, info: ModelInfo, node_id=None, observer=None):
    """Patch a cloned ModelPatcher `model` so that `method` reduces tokens; with `observer` (the token-map
    recorder), this method's runs start and end the observer's, and every method on the model reports to it."""
    check_composable(model, method)
    runtime = Runtime(method, info.family, info.patch_size, method_key, observer)

    def apply_model_wrapper(executor, *args, **kwargs):
        named = call_arguments(executor, args, kwargs)
        packed, sigma, context = named["x"], named["t"], named["c_crossattn"]
        transformer_options, conds = named["transformer_options"], named.get("kwargs", {})
        transformer_options[CONDS_KEY] = conds  # the call's own conditioning, for the families that read it
        shapes = conds.get("latent_shapes")  # LTX-2, MiniMax H3: video and audio packed in one latent
        x = first_stream(packed, shapes)
        n_txt = context.shape[1] if context is not None and context.ndim == 3 else 0
        # one device sync per call: the first row's sigma (progress) and the smallest (noise recoverable)
        sigma_value, sigma_min = torch.stack([sigma.flatten()[0], sigma.min()]).tolist()
        progress = progress_map(executor.class_obj.model_sampling)(sigma_value)
        runtime.begin_call(transformer_options, x, sigma_value, progress, n_txt,
                           row_keys(transformer_options, x.shape[0]), replaceable=sigma_min > 0)
        packed_out = executor(*args, **kwargs)
        if runtime.stateful(transformer_options) and sigma_min > 0:
            # Methods work on the predicted noise (x - denoised) / sigma: eps, or a flow model's velocity.
            out = first_stream(packed_out, shapes)
            s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(out.dtype)
            reused = runtime.end_call(transformer_options, (x.to(out.dtype) - out) / s)
            if reused is not None:
                new_noise, computed = reused
                out = torch.where(computed, out, x.to(out.dtype) - new_noise.to(out.dtype) * s)
                packed_out = with_first_stream(packed_out, shapes, out)
        return packed_out

    def outer_sample_wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        named = call_arguments(executor, args, kwargs)
        run = runtime.start_run(guider.model_options["transformer_options"], named["sigmas"], named["noise"].shape)
        try:
            return executor(*args, **kwargs)
        finally:
            lines = runtime.end_run(run)
            for line in lines:
                log.info(line)
            show_on_node(node_id, lines[0])
            guider.model_options = original_options

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, method_key, apply_model_wrapper)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, method_key, outer_sample_wrapper)
    to = model.model_options.setdefault("transformer_options", {})
    to[METHODS_KEY] = list(to.get(METHODS_KEY, [])) + [Installed.of(method_key, method)]
    if observer is not None:
        to[OBSERVER_KEY] = observer
    existing = to.get("patches_replace", {}).get("dit", {})
    set_block_replaces(model, info.family, runtime.block_replaces(existing))


def set_block_replaces(model, family: Family, replaces: dict):
    """Register {block key: replace} as `patches_replace["dit"]` entries on a cloned ModelPatcher.

    Families without that hook (`family.layer_list`) get an object patch of each layer's `forward` that
    looks the entry up, so they chain and unpatch alike; weights stay untouched (LoRA, offloading).
    """
    for key, replace in replaces.items():
        model.set_model_patch_replace(replace, "dit", key[0], key[1])
    if family.layer_list:
        masked = {"mask": None, "any": False}  # shared by the layers: one mask check per model call
        for spec in family.blocks:
            name = f"diffusion_model.{family.layer_list}.{spec.key[1]}"
            if name + ".forward" not in model.object_patches:
                model.add_object_patch(name + ".forward", _hooked_layer_forward(model.get_model_object(name),
                                                                                spec.key, family, masked))


def _hooked_layer_forward(layer, key, family: Family, masked: dict):
    """A layer's forward routed through the call's `patches_replace["dit"][key]` entry (NextDiT, Krea 2,
    Kandinsky 5), its arguments named for the replace by `family.layer_args`.

    Arguments are bound by the host's own signature: any the pack does not read (0.33's
    `timestep_zero_index`) travel in the block args under their own name, so the replace sees them and the
    original layer gets them back. A key mask (`family.layer_mask`: NextDiT's caption mask) that masks any
    key means rows' image tokens start at different places: passed as `attn_mask`, the call then runs
    unreduced."""
    names = dict(family.layer_args)  # layer parameter -> block-args key
    run = type(layer).forward.__get__(layer)
    signature = inspect.signature(run)
    params = signature.parameters
    missing = [name for name in names if name not in params]
    if missing:  # a layer the pack cannot read: it runs as the host wrote it, unreduced
        warn_once(("layer forward", type(layer).__name__), f"token reduction: {type(layer).__name__}'s layer forward "
                  f"has no {', '.join(missing)} argument; its layers run unreduced")
        return run
    passed_on = [name for name, p in params.items() if name not in names
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_keyword = next((name for name, p in params.items() if p.kind == p.VAR_KEYWORD), None)

    def original(a):
        kwargs = {name: a[ours] for name, ours in names.items()}
        kwargs.update((name, a[name]) for name in passed_on if name in a)
        kwargs.update(a.get(UNNAMED_LAYER_KWARGS, {}))
        return {"img": run(**kwargs)}

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        to = named["transformer_options"] or {}
        replace = to.get("patches_replace", {}).get("dit", {}).get(key)
        if replace is None:
            return run(*args, **kwargs)
        block_args = {ours: named[name] for name, ours in names.items()}
        block_args.update((name, named[name]) for name in passed_on if name in named)
        if var_keyword and named.get(var_keyword):
            block_args[UNNAMED_LAYER_KWARGS] = named[var_keyword]
        mask = block_args.get(family.layer_mask) if family.layer_mask else None
        if mask is not None:
            if masked["mask"] is not mask:
                masked.update(mask=mask, any=bool((mask != 0).any()))
            if masked["any"]:
                block_args["attn_mask"] = mask
        return replace(block_args, {"original_block": original})["img"]

    return forward


UNNAMED_LAYER_KWARGS = "layer_kwargs"  # block-args key of keyword arguments a layer takes through **kwargs
