"""SDTM Token Merging node: MODEL in, patched MODEL out."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.maps import RecordingMethod
from ..kernels.sdtm import SDTM, SDTMConfig
from .patching import FAMILIES_SHORT, detail_cache_input, detect_family, install, model_input
from .types import TokenRatioScheduleType

DEFAULTS = SDTMConfig()


class SDTMPatchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="SDTMPatchModel",
            display_name="SDTM Token Merging",
            category="model_patches/token_reduction",
            description=(
                f"Structure-then-detail token merging (arXiv 2505.11707) for {FAMILIES_SHORT}: "
                "merges redundant image tokens inside each transformer block and restores full density "
                "after it, so every step costs less. Place between the model loader and the sampler."),
            inputs=[
                model_input(),
                io.Float.Input("ratio", default=d.ratio, min=0.0, max=0.75, step=0.01,
                               tooltip="Mean fraction of image tokens merged away in each patched block. "
                                       "Higher is faster and less faithful. 0 disables merging."),
                io.Float.Input("deviation", default=d.deviation, min=0.0, max=0.5, step=0.01,
                               tooltip="Compression-ratio adjusting: the ratio runs from ratio+deviation at the "
                                       "first step to ratio-deviation at the last (aggressive while structure "
                                       "forms, gentle while detail forms). Both ends must stay in [0, 0.75]."),
                io.Float.Input("switch_percent", default=d.switch_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress where the structure stage (whole-window merging) "
                                       "hands over to the detail stage (fine per-token matching)."),
                io.Int.Input("window", default=d.window, min=2, max=4,
                             tooltip="Merge window on the token grid (2 = 2x2). The structure stage merges whole "
                                     "windows; the detail stage keeps one destination per window and merges "
                                     "other tokens into their most similar destination anywhere in the image."),
                io.Int.Input("skip_first_blocks", default=d.skip_first_blocks, min=0, max=64,
                             tooltip="Run this many first transformer blocks at full density."),
                io.Int.Input("skip_last_blocks", default=d.skip_last_blocks, min=0, max=64,
                             tooltip="Run this many last transformer blocks at full density."),
                io.Boolean.Input("dynamic_merge", default=d.dynamic_merge,
                                 tooltip="DTM: merge whole similar windows in the structure stage and single "
                                         "tokens in the detail stage. Off: single-token matching throughout."),
                io.Boolean.Input("ratio_adjust", default=d.ratio_adjust,
                                 tooltip="CRA: vary the ratio with progress as 'deviation' describes. Off: "
                                         "constant ratio."),
                io.Boolean.Input("prompt_reweight", default=d.prompt_reweight,
                                 tooltip="PR: weight each merged token's attention by the number of tokens it "
                                         "stands for, so the prompt keeps its share of attention."),
                io.Float.Input("start_percent", default=d.start_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress at which merging starts (1.0 = never, identical "
                                       "to the unpatched model)."),
                io.Float.Input("end_percent", default=d.end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress at which merging stops."),
                detail_cache_input(d.detail_cache, "merged"),
                TokenRatioScheduleType.Input("schedule", optional=True,
                                             tooltip="Optional per-layer x per-progress ratio schedule from the "
                                                     "Token Ratio Schedule node; overrides ratio/deviation."),
            ],
            outputs=[io.Model.Output(tooltip="The model with SDTM token merging.")],
        )

    @classmethod
    def execute(cls, model, ratio, deviation, switch_percent, window, skip_first_blocks, skip_last_blocks,
                dynamic_merge, ratio_adjust, prompt_reweight, start_percent, end_percent, detail_cache=False,
                schedule=None) -> io.NodeOutput:
        config = SDTMConfig(ratio=ratio, deviation=deviation, switch_percent=switch_percent, window=window,
                            skip_first_blocks=skip_first_blocks, skip_last_blocks=skip_last_blocks,
                            dynamic_merge=dynamic_merge, ratio_adjust=ratio_adjust, prompt_reweight=prompt_reweight,
                            start_percent=start_percent, end_percent=end_percent, detail_cache=detail_cache)
        method = RecordingMethod(SDTM(config, schedule=schedule))  # feeds a Token Map Recorder, if any
        info = detect_family(model, "SDTM Token Merging")
        patched = model.clone()
        install(patched, method, "sdtm", info)
        return io.NodeOutput(patched)
