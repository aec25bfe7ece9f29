"""Token Map Recorder and Token Map Overlay nodes.

The recorder's store (kernels.maps.TokenMapStore) is the runtime's observer: the recorder installs it with a
method that reduces nothing (kernels.runtime.Unreduced, which steps aside for any reducing method on the
model), so its runs start and end with the sampler's, and every method on the model reports to it. The
store travels in model_options["transformer_options"][OBSERVER_KEY].
"""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..kernels.maps import KIND_HELP, KINDS, RecorderConfig, TokenMapStore, parse_selection, run_summary
from ..kernels.maps_render import overlay
from ..kernels.runtime import OBSERVER_KEY, Unreduced
from . import maps_route
from .patching import CATEGORY, detect_family, install

log = logging.getLogger("token_reduction")


def _selection_input(name: str, default: str, what: str):
    return io.String.Input(name, default=default,
                           tooltip=f"{what}: 'all', 'none', 'first', 'middle', 'last', indices from 0 (negative "
                                   "count from the end) and ranges 'a..b', separated by commas.")


class TokenMapRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = RecorderConfig()
        return io.Schema(
            node_id="TokenMapRecorder",
            display_name="Token Map Recorder",
            category=CATEGORY,
            description=(
                "Records, per step and block, which image tokens the patch nodes merged, pruned or served "
                "from cache (redundancy maps), and for the chosen steps and blocks the attention each image "
                "token receives. Never changes the generated image. Place it after the patch nodes, before "
                "the sampler; feed its MODEL (after sampling) and the decoded image to Token Map Overlay."),
            inputs=[
                io.Model.Input("model", tooltip="The model to observe, patched (SDTM, ...) or not."),
                _selection_input("steps", d.steps, "Steps whose redundancy maps are kept"),
                _selection_input("blocks", d.blocks, "Transformer blocks whose redundancy maps are kept"),
                _selection_input("attention_steps", d.attention_steps, "Steps whose attention is recorded"),
                _selection_input("attention_blocks", d.attention_blocks, "Blocks whose attention is recorded"),
                io.Int.Input("queries", default=d.queries, min=1, max=4096,
                             tooltip="Text and image queries sampled (evenly spaced) per attention map. More is "
                                     "more exact and costs more; the model's own attention is unaffected."),
                io.Int.Input("max_megabytes", default=d.max_bytes // 2 ** 20, min=1, max=65536,
                             tooltip="Memory budget of one run's maps. A run that could need more records "
                                     "nothing and says so (about 2 bytes per token per step and block for "
                                     "merge maps, 4 for attention maps)."),
            ],
            outputs=[io.Model.Output(tooltip="The same model, now recording token maps while it samples.")],
        )

    @classmethod
    def execute(cls, model, steps, blocks, attention_steps, attention_blocks, queries,
                max_megabytes) -> io.NodeOutput:
        info = detect_family(model, "Token Map Recorder", "maps")
        n_blocks = info.family.num_blocks
        for name, text in (("steps", steps), ("attention_steps", attention_steps)):
            try:
                parse_selection(text, None)
            except ValueError as e:
                raise ValueError(f"Token Map Recorder: {name}: {e}") from None
        for name, text in (("blocks", blocks), ("attention_blocks", attention_blocks)):
            try:
                parse_selection(text, n_blocks)
            except ValueError as e:
                raise ValueError(f"Token Map Recorder: {name} ({n_blocks} blocks in this model): {e}") from None
        config = RecorderConfig(steps=steps, blocks=blocks, attention_steps=attention_steps,
                                attention_blocks=attention_blocks, queries=queries,
                                max_bytes=max_megabytes * 2 ** 20)
        patched = model.clone()
        install(patched, Unreduced(), "maps", info, observer=TokenMapStore(config, info.family))
        return io.NodeOutput(patched)


def recorder_store(model) -> TokenMapStore | None:
    return model.model_options.get("transformer_options", {}).get(OBSERVER_KEY)


class TokenMapOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenMapOverlay",
            display_name="Token Map Overlay",
            category=CATEGORY,
            is_output_node=True,  # its viewer is an output: it runs even with nothing connected after it
            description=(
                "Draws the token maps of the last sampling run over the decoded image, with a legend (map kind, "
                "step, block, colour scale), and reports tokens saved, estimated FLOPs saved and seconds per "
                "step. The node shows an interactive viewer in the UI. Video: one overlay per frame."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Token Map Recorder that did the sampling."),
                io.Image.Input("image", tooltip="The decoded image (or video frames) of that sampling run."),
                io.Combo.Input("kind", options=list(KINDS), default="merge_size",
                               tooltip="Which map to draw: " + "; ".join(f"{k}: {v}" for k, v in KIND_HELP.items())),
                _selection_input("steps", "first, middle, last", "Steps to draw"),
                _selection_input("blocks", "middle", "Blocks to draw"),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the heat map over the image."),
                io.Int.Input("max_images", default=16, min=1, max=256,
                             tooltip="At most this many overlays (steps x blocks x frames) are drawn."),
            ],
            outputs=[
                io.Image.Output("overlays", tooltip="One image per drawn step and block (per frame for video), "
                                                    "with the legend strip below."),
                io.String.Output("stats", tooltip="Tokens saved, estimated FLOPs saved and seconds per step of the "
                                                  "last run, then one line per step."),
            ],
        )

    @classmethod
    def execute(cls, model, image, kind, steps, blocks, opacity, max_images) -> io.NodeOutput:
        store = recorder_store(model)
        if store is None:
            raise ValueError("Token Map Overlay: this MODEL has no Token Map Recorder; connect the MODEL output "
                             "of a Token Map Recorder that the sampler used.")
        head, lines = run_summary(store)
        stats = "\n".join([head] + lines)
        frames = []
        if store.refused is None and store.n_steps:
            try:
                step_sel = parse_selection(steps, store.n_steps)
                block_sel = parse_selection(blocks, store.family.num_blocks)
            except ValueError as e:
                raise ValueError(f"Token Map Overlay ({store.n_steps} steps, {store.family.num_blocks} blocks "
                                 f"in the last run): {e}") from None
            frames = _draw(store, image, kind, step_sel, block_sel, opacity, max_images)
        if not frames:
            stats += f"\nNo {kind} map was recorded for the selected steps and blocks; the image is passed through."
            out = image
        else:
            out = torch.stack(frames)
        map_id = maps_route.issue(store, image, stats)
        ui = {"token_maps": [{"id": map_id, "kind": kind}], "text": [stats]}
        return io.NodeOutput(out, stats, ui=ui)


def _draw(store, image, kind, step_sel, block_sel, opacity, max_images) -> list:
    grid = store.grid
    video = len(grid) == 3 and grid[0] > 1
    frames = []
    for step in step_sel:
        for block in block_sel:
            values = store.map(kind, step, block)
            if values is None:
                continue
            vmap = values.reshape(grid)
            spec = store.family.blocks[block]
            title = f"{kind.replace('_', ' ')}  step {step + 1}/{store.n_steps}  block {block} ({spec.key[0]} {spec.key[1]})"
            targets = range(image.shape[0]) if video else range(1)
            for f in targets:
                if len(frames) >= max_images:
                    return frames
                if video:
                    t = round(f * (grid[0] - 1) / max(image.shape[0] - 1, 1))
                    m = vmap[t]
                else:
                    m = vmap.reshape(grid[-2], grid[-1]) if len(grid) == 2 else vmap[0]
                frames.append(overlay(image[f], m, title, opacity, kind, vmax=float(values.max())))
    return frames
