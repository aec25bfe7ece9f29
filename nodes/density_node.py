"""Token Density Schedule node: MODEL in, patched MODEL out (training-free FlexDiT pooling)."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.density import PRESETS, SCHEDULE_REPLACES, DensityConfig, DensitySchedule, parse_stage_windows
from .patching import (CATEGORY, FAMILIES_SHORT, advanced, detail_cache_inputs, model_input, patch_model,
                       preset_config, preset_input, progress_window_inputs, widget_value)
from .types import TokenRatioScheduleType

DEFAULTS = DensityConfig()


class TokenDensityPatchModel(io.ComfyNode):
    PRESETS = PRESETS
    SCHEDULE_REPLACES = SCHEDULE_REPLACES

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="TokenDensityPatchModel",
            display_name="Token Density Schedule",
            category=CATEGORY,
            description=(
                f"Training-free FlexDiT (arXiv 2412.06028) for {FAMILIES_SHORT}: in chosen blocks and steps "
                "the image tokens are average-pooled into a coarser grid, the block runs on the pooled tokens "
                "plus the full text, and its update is spread back onto every token."),
            inputs=[
                model_input(),
                preset_input(PRESETS, "How much to pool"),
                advanced(io.String.Input(
                    "stage_windows", default=widget_value(d.stage_windows),
                    tooltip="Pooling window per noise stage, noisiest first: 4 entries in 1-4 (2 = 2x2 tokens "
                            "averaged, 1 = every token), e.g. \"2, 2, 2, 1\" as FlexDiT.")),
                advanced(io.Float.Input(
                    "bottom_dense", default=d.bottom_dense, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of the first blocks that always run on every token (rounded up).")),
                advanced(io.Float.Input(
                    "top_dense", default=d.top_dense, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of the last blocks that always run on every token (rounded up).")),
                advanced(io.Boolean.Input(
                    "span_pattern", default=d.span_pattern,
                    tooltip="Middle blocks in FlexDiT's spans of 6: 4 pooled, then 2 on every token.")),
                advanced(io.Boolean.Input(
                    "proportional_attention", default=d.proportional_attention,
                    tooltip="A pooled token draws the attention of the tokens it stands for, so the prompt keeps "
                            "its share.")),
                *progress_window_inputs(d, "pool"),
                *detail_cache_inputs(d, "pooled"),
                TokenRatioScheduleType.Input(
                    "schedule", optional=True,
                    tooltip="Ratios from the Token Ratio Schedule node decide every block and step (each ratio "
                            "picks the nearest pooling window); stage_windows and the dense blocks are unused."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the token density schedule.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def config(cls, preset="balanced", **settings) -> DensityConfig:
        if "stage_windows" in settings:
            settings["stage_windows"] = parse_stage_windows(settings["stage_windows"])
        return preset_config(DensityConfig, PRESETS, preset, settings).validate()

    @classmethod
    def execute(cls, model, preset="balanced", schedule=None, **settings) -> io.NodeOutput:
        method = DensitySchedule(cls.config(preset, **settings), schedule=schedule)
        return io.NodeOutput(patch_model(model, method, "density", "Token Density Schedule", cls.hidden.unique_id))
