"""SDTM Token Merging node: MODEL in, patched MODEL out."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.sdtm import PRESETS, SCHEDULE_REPLACES, SDTM, SDTMConfig
from ..kernels.schedule_presets import MAX_RATIO
from .patching import (CATEGORY, FAMILIES_SHORT, advanced, detail_cache_inputs, model_input, patch_model,
                       preset_config, preset_input, progress_window_inputs)
from .types import TokenRatioScheduleType

DEFAULTS = SDTMConfig()


class SDTMPatchModel(io.ComfyNode):
    PRESETS = PRESETS
    SCHEDULE_REPLACES = SCHEDULE_REPLACES

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="SDTMPatchModel",
            display_name="SDTM Token Merging",
            category=CATEGORY,
            description=(
                f"Structure-then-detail token merging (arXiv 2505.11707) for {FAMILIES_SHORT}: similar image "
                "tokens are merged inside each transformer block and restored after it, so every step costs "
                "less. Place between the model loader and the sampler."),
            inputs=[
                model_input(),
                preset_input(PRESETS, "How much to merge"),
                advanced(io.Float.Input(
                    "ratio", default=d.ratio, min=0.0, max=MAX_RATIO, step=0.01,
                    tooltip="Mean fraction of image tokens merged away in each merged block. Higher is faster.")),
                advanced(io.Float.Input(
                    "deviation", default=d.deviation, min=0.0, max=0.5, step=0.01,
                    tooltip="The ratio runs from ratio + deviation at the first step to ratio - deviation at the "
                            "last; both ends must stay below what the window allows (8/9 for 3x3).")),
                advanced(io.Float.Input(
                    "switch_percent", default=d.switch_percent, min=0.0, max=1.0, step=0.01,
                    tooltip="Progress where whole-window merging (structure) hands over to per-token matching "
                            "(detail); 1 keeps whole windows throughout.")),
                advanced(io.Int.Input(
                    "window", default=d.window, min=2, max=4,
                    tooltip="Merge window on the token grid (2 = 2x2 tokens).")),
                advanced(io.Int.Input(
                    "skip_first_blocks", default=d.skip_first_blocks, min=0, max=64,
                    tooltip="This many first transformer blocks always run on every token.")),
                advanced(io.Int.Input(
                    "skip_last_blocks", default=d.skip_last_blocks, min=0, max=64,
                    tooltip="This many last transformer blocks always run on every token.")),
                advanced(io.Boolean.Input(
                    "dynamic_merge", default=d.dynamic_merge,
                    tooltip="Whole similar windows early, single tokens later (the paper's DTM). Off: single "
                            "tokens throughout.")),
                advanced(io.Boolean.Input(
                    "ratio_adjust", default=d.ratio_adjust,
                    tooltip="Vary the ratio with progress as `deviation` says (the paper's CRA). Off: constant.")),
                advanced(io.Boolean.Input(
                    "prompt_reweight", default=d.prompt_reweight,
                    tooltip="A merged token draws the attention of the tokens it stands for, so the prompt keeps "
                            "its share (the paper's PR).")),
                *progress_window_inputs(d, "merge"),
                *detail_cache_inputs(d, "merged"),
                TokenRatioScheduleType.Input(
                    "schedule", optional=True,
                    tooltip="Per-layer, per-progress ratios from the Token Ratio Schedule node; replaces ratio "
                            "and deviation (in every preset)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with SDTM token merging.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def config(cls, preset="balanced", **settings) -> SDTMConfig:
        return preset_config(SDTMConfig, PRESETS, preset, settings).validate()

    @classmethod
    def execute(cls, model, preset="balanced", schedule=None, **settings) -> io.NodeOutput:
        method = SDTM(cls.config(preset, **settings), schedule=schedule)
        return io.NodeOutput(patch_model(model, method, "sdtm", "SDTM Token Merging", cls.hidden.unique_id))
