"""CAT Cached Token Pruning node: MODEL in, patched MODEL out."""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.cat import CATConfig, CATPruning
from .patching import FAMILIES_SHORT, detect_family, install, model_input
from .types import TokenRatioScheduleType

DEFAULTS = CATConfig()


class CATPruningPatchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DEFAULTS
        return io.Schema(
            node_id="CATPruningPatchModel",
            display_name="CAT Cached Token Pruning",
            category="model_patches/token_reduction",
            description=(
                f"Cluster-aware cached token pruning (arXiv 2502.00433) for {FAMILIES_SHORT}: after the "
                "first steps, each step computes only the image tokens whose predicted noise changes most (plus "
                "the least recently computed ones); the others reuse their cached keys/values and noise "
                "(moved along its recent trend). "
                "Place between the model loader and the sampler."),
            inputs=[
                model_input(),
                io.Float.Input("ratio", default=d.ratio, min=0.0, max=0.99, step=0.01,
                               tooltip="Fraction of image tokens NOT computed in each pruned step (paper: 0.7). "
                                       "Higher is faster. The default prunes 95% and relies on the full refresh "
                                       "steps (refresh_every) for fidelity. 0 disables pruning."),
                io.Float.Input("full_percent", default=d.full_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress before which every step runs in full (0.28: the "
                                       "first 8 of 28 steps, the paper's t0). Lower (0.18: the faster preset) is "
                                       "faster and less faithful: the layout forms in these steps."),
                io.Int.Input("refresh_every", default=d.refresh_every, min=0, max=100,
                             tooltip="Run one full step after this many pruned steps, refreshing every cached "
                                     "key, value and noise. 2 (default): two pruned steps, then a full one. "
                                     "0 = never (the paper): faster, and the cache grows stale."),
                io.Int.Input("clusters", default=d.clusters, min=1, max=256,
                             tooltip="Spatial clusters of the token grid (paper: 20). Clusters whose noise changes "
                                     "most get the largest share of the recomputed tokens."),
                io.Float.Input("balance", default=d.balance, min=0.0, max=1.0, step=0.01,
                               tooltip="Distribution balance: fraction of the computed tokens given to the least "
                                       "recently computed tokens (paper's code: 0.75). The rest follow the noise "
                                       "change, cluster by cluster."),
                io.Float.Input("start_percent", default=d.start_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress at which CAT starts (1.0 = never, identical to the "
                                       "unpatched model)."),
                io.Float.Input("end_percent", default=d.end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising progress at which CAT stops (later steps run in full)."),
                io.Float.Input("forecast", default=d.forecast, min=0.0, max=1.0, step=0.05,
                               tooltip="How far a token that is not computed follows the trend of its noise "
                                       "between the last two full steps (0 = keeps its last noise, as the paper; "
                                       "1 = the full linear trend). 0.5 (default) was about 3 dB closer to the "
                                       "unpatched image than 0 at the same speed on the pack's reference model. "
                                       "Each full step checks the trend and stops following it while it predicts "
                                       "worse than holding (as with ancestral / SDE samplers)."),
                TokenRatioScheduleType.Input("schedule", optional=True,
                                             tooltip="Optional ratio schedule (fraction pruned per progress; "
                                                     "averaged over depth, since CAT prunes all blocks alike); "
                                                     "overrides ratio."),
            ],
            outputs=[io.Model.Output(tooltip="The model with CAT cached token pruning.")],
        )

    @classmethod
    def execute(cls, model, ratio, full_percent, refresh_every, clusters, balance, start_percent, end_percent,
                forecast=DEFAULTS.forecast, schedule=None) -> io.NodeOutput:
        config = CATConfig(ratio=ratio, full_percent=full_percent, refresh_every=refresh_every, clusters=clusters,
                           balance=balance, start_percent=start_percent, end_percent=end_percent,
                           forecast=forecast)
        method = CATPruning(config, schedule=schedule)
        info = detect_family(model, "CAT Cached Token Pruning")
        patched = model.clone()
        install(patched, method, "cat", info)
        return io.NodeOutput(patched)
