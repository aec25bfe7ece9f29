"""CAT Cached Token Pruning node: MODEL in, patched MODEL out."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.cat import CACHE_DTYPES, PRESETS, SCHEDULE_REPLACES, CATConfig, CATPruning
from .patching import CATEGORY, FAMILIES_SHORT, advanced, model_input, patch_model, preset_config, preset_input
from .types import TokenRatioScheduleType

DEFAULTS = CATConfig()


class CATPruningPatchModel(io.ComfyNode):
    PRESETS = PRESETS
    SCHEDULE_REPLACES = SCHEDULE_REPLACES

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="CATPruningPatchModel",
            display_name="CAT Cached Token Pruning",
            category=CATEGORY,
            description=(
                f"Cluster-aware cached token pruning (arXiv 2502.00433) for {FAMILIES_SHORT}: after the first "
                "steps, most steps compute only the image tokens whose prediction changes most; the others reuse "
                "their cached values, carried along their recent trend. Place between the model loader and the "
                "sampler."),
            inputs=[
                model_input(),
                preset_input(PRESETS, "How much to prune"),
                advanced(io.Float.Input(
                    "ratio", default=d.ratio, min=0.0, max=0.99, step=0.01,
                    tooltip="Fraction of image tokens not computed in a pruned step. Higher is faster.")),
                advanced(io.Float.Input(
                    "full_percent", default=d.full_percent, min=0.0, max=1.0, step=0.01,
                    tooltip="Progress before which every step runs on every token (the layout forms there).")),
                advanced(io.Int.Input(
                    "refresh_every", default=d.refresh_every, min=0, max=100,
                    tooltip="One full step after this many pruned steps refreshes every cached value (0 = never, "
                            "as the paper).")),
                advanced(io.Int.Input(
                    "clusters", default=d.clusters, min=1, max=256,
                    tooltip="Spatial clusters; those whose prediction changes most get the most recomputed "
                            "tokens.")),
                advanced(io.Float.Input(
                    "balance", default=d.balance, min=0.0, max=1.0, step=0.01,
                    tooltip="Share of the computed tokens given to those computed least recently.")),
                advanced(io.Float.Input(
                    "start_percent", default=d.start_percent, min=0.0, max=1.0, step=0.01,
                    tooltip="Progress at which pruning starts (1 = never, the unpatched model).")),
                advanced(io.Float.Input(
                    "end_percent", default=d.end_percent, min=0.0, max=1.0, step=0.01,
                    tooltip="Progress at which pruning stops; later steps run on every token.")),
                advanced(io.Float.Input(
                    "forecast", default=d.forecast, min=0.0, max=1.0, step=0.05,
                    tooltip="How far a cached token follows the trend of its last two full steps (0 = holds its "
                            "last value, as the paper); switched off while the trend predicts worse than holding.")),
                advanced(io.Combo.Input(
                    "cache_dtype", options=list(CACHE_DTYPES), default=d.cache_dtype,
                    tooltip="Storage of the cached keys and values: the model's dtype, or fp8 (float8 with a scale "
                            "per token) for a smaller cache at a small cost in fidelity.")),
                TokenRatioScheduleType.Input(
                    "schedule", optional=True,
                    tooltip="Fraction pruned per progress from the Token Ratio Schedule node (averaged over depth); "
                            "replaces ratio (in every preset)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with CAT cached token pruning.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def config(cls, preset="balanced", **settings) -> CATConfig:
        return preset_config(CATConfig, PRESETS, preset, settings).validate()

    @classmethod
    def execute(cls, model, preset="balanced", schedule=None, **settings) -> io.NodeOutput:
        method = CATPruning(cls.config(preset, **settings), schedule=schedule)
        return io.NodeOutput(patch_model(model, method, "cat", "CAT Cached Token Pruning", cls.hidden.unique_id))
