"""Token Density Schedule node: MODEL in, patched MODEL out (training-free FlexDiT pooling)."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.density import DensityConfig, DensitySchedule, parse_stage_windows
from ..kernels.maps import RecordingMethod
from .patching import FAMILIES_SHORT, detail_cache_input, detect_family, install, model_input
from .types import TokenRatioScheduleType

DEFAULTS = DensityConfig()


class TokenDensityPatchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="TokenDensityPatchModel",
            display_name="Token Density Schedule",
            category="model_patches/token_reduction",
            description=(
                f"Training-free FlexDiT (arXiv 2412.06028) for {FAMILIES_SHORT}: in chosen blocks and "
                "steps the image tokens are average-pooled into a coarser grid, the block runs on the pooled "
                "tokens plus the full text, and its update is upsampled back onto every token. Defaults: the "
                "first 20% of progress dense, then 2x2 pooling in every block (measured closer to the "
                "unpatched images than FlexDiT's own layout, which stays available)."),
            inputs=[
                model_input(),
                io.String.Input("stage_windows", default=", ".join(str(k) for k in d.stage_windows),
                                tooltip="Pooling window per noise stage, noisiest first, 4 entries in 1..4 "
                                        "(2 = 2x2 average, 1 = full density). Stages end at progress 0.15 / 0.47 "
                                        "/ 0.76 (FlexDiT's timestep stages matched by signal-to-noise ratio). "
                                        "\"2, 2, 2, 2\" default, \"2, 2, 2, 1\" FlexDiT's (last stage dense), \"3, 3, 2, 2\" faster."),
                io.Float.Input("bottom_dense", default=d.bottom_dense, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the first blocks that always run at full density "
                                       "(rounded up, so any value above 0 keeps at least one)."),
                io.Float.Input("top_dense", default=d.top_dense, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the last blocks that always run at full density (detail "
                                       "refinement; rounded up)."),
                io.Boolean.Input("span_pattern", default=d.span_pattern,
                                 tooltip="Middle blocks follow FlexDiT's 6-block span: 4 pooled, then 2 at full "
                                         "density to refresh detail. Off: every middle block is pooled."),
                io.Boolean.Input("proportional_attention", default=d.proportional_attention,
                                 tooltip="Each pooled key gets a log(window size) attention bias, so a window "
                                         "draws the attention its tokens drew and the prompt keeps its share."),
                io.Float.Input("start_percent", default=d.start_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress at which pooling starts (1.0 = never, identical to "
                                       "the unpatched model)."),
                io.Float.Input("end_percent", default=d.end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress at which pooling stops."),
                detail_cache_input(d.detail_cache, "pooled"),
                TokenRatioScheduleType.Input("schedule", optional=True,
                                             tooltip="Optional ratio schedule from the Token Ratio Schedule node. "
                                                     "When connected it decides every block and step: ratio r "
                                                     "pools with the window k whose 1 - 1/k^2 is nearest "
                                                     "(r < 0.375 dense, up to 0.82 2x2, 3x3, above 0.91 4x4); "
                                                     "stage_windows, bottom/top_dense and span_pattern are "
                                                     "then unused."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the token density schedule.")],
        )

    @classmethod
    def execute(cls, model, stage_windows, bottom_dense, top_dense, span_pattern, proportional_attention,
                start_percent, end_percent, detail_cache=False, schedule=None) -> io.NodeOutput:
        config = DensityConfig(stage_windows=parse_stage_windows(stage_windows), bottom_dense=bottom_dense,
                               top_dense=top_dense, span_pattern=span_pattern,
                               proportional_attention=proportional_attention, start_percent=start_percent,
                               end_percent=end_percent, detail_cache=detail_cache)
        method = RecordingMethod(DensitySchedule(config, schedule=schedule))  # feeds a Token Map Recorder, if any
        info = detect_family(model, "Token Density Schedule")
        patched = model.clone()
        install(patched, method, "density", info)
        return io.NodeOutput(patched)
