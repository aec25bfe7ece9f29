"""Token Ratio Schedule node: a per-layer x per-progress ratio schedule, and its heat map."""
from __future__ import annotations

import logging
import time
import weakref

from comfy_api.latest import io

from ..kernels.calibration import CACHE, calibrate
from ..kernels.schedule_plot import render
from ..kernels.schedule_presets import MAX_RATIO, PRESETS, build_schedule
from .patching import CATEGORY, detect_family, install
from .types import TokenRatioScheduleType

log = logging.getLogger("token_reduction")
CALIBRATION_SEED = 0


class TokenRatioSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenRatioSchedule",
            display_name="Token Ratio Schedule",
            category=CATEGORY,
            description=(
                "Fraction of image tokens each transformer block removes, per layer depth and denoising "
                "progress (after DiffCR / DiffRatio-MoD: compress redundant layers and noisy steps most). "
                "Connect it to SDTM Token Merging, Token Density Schedule or CAT Cached Token Pruning. The image "
                "output is a heat map of the schedule for Preview Image."),
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="diffcr_like",
                               tooltip="Shape of the schedule. constant: the same everywhere. linear / cosine: "
                                       "falls from 'ratio' at the first step to ratio*end_scale at the last. "
                                       "structure_then_detail: 'ratio' until 'switch_percent', then "
                                       "ratio*end_scale. diffcr_like: linear in progress, highest in the middle "
                                       "layers, zero in the first and last layers. flexdit: four noise stages "
                                       "stepping down, bottom and top 7% of layers dense."),
                io.Float.Input("ratio", default=0.5, min=0.0, max=MAX_RATIO, step=0.01,
                               tooltip="Largest ratio the preset reaches (fraction of image tokens removed); "
                                       "higher is faster. SDTM caps it at what its merge window allows."),
                io.Float.Input("end_scale", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Ratio at the end of denoising, as a fraction of 'ratio' (unused by "
                                       "'constant')."),
                io.Float.Input("switch_percent", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Progress where structure_then_detail drops to the detail ratio."),
                io.String.Input("progress_curve", default="", multiline=False,
                                tooltip="Optional ratio over progress as position:value points, e.g. "
                                        "\"0:0.7, 0.4:0.5, 1:0.2\" (linear in between). Replaces the preset's "
                                        "progress shape, 'ratio' and 'end_scale'."),
                io.String.Input("depth_curve", default="", multiline=False,
                                tooltip="Optional scale over layer depth (0 = first block, 1 = last) as "
                                        "position:value points with values in [0, 1], e.g. "
                                        "\"0:0, 0.2:1, 0.8:1, 1:0\". Replaces the preset's depth shape."),
                io.String.Input("schedule_json", default="", multiline=True,
                                tooltip="Optional saved schedule (the 'json' output of this node). When not "
                                        "empty it wins over every other input."),
                io.Float.Input("flops_saving", default=0.4, min=0.0, max=0.6, step=0.01,
                               tooltip="Calibration only: share of the transformer blocks' FLOPs to save; higher is "
                                       "faster."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=16,
                             tooltip="Calibration only: image width in pixels (the schedule is cached per "
                                     "model and resolution)."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=16,
                             tooltip="Calibration only: image height in pixels."),
                io.Int.Input("calibration_steps", default=10, min=2, max=100,
                             tooltip="Calibration only: euler steps of the one unpatched calibration pass "
                                     "(cfg 1). Use your sampler's step count for a table that fits it exactly."),
                io.Model.Input("model", optional=True,
                               tooltip="Connect to calibrate: one unpatched sampling pass finds where the model's "
                                       "tokens are most redundant and places the ratios to meet flops_saving, "
                                       "instead of the preset and curves. On SDTM, set start_percent 0 so that "
                                       "the schedule decides every step."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Calibration only: the prompt conditioning to calibrate with "
                                              "(required when a model is connected)."),
            ],
            outputs=[
                TokenRatioScheduleType.Output("schedule", tooltip="The schedule, for SDTM, Token Density or CAT."),
                io.Image.Output("heatmap", tooltip="Heat map: progress left to right, depth bottom to top."),
                io.String.Output("json", tooltip="The schedule as readable JSON, to save, share or paste back."),
            ],
        )

    @classmethod
    def execute(cls, preset, ratio, end_scale, switch_percent, progress_curve, depth_curve, schedule_json,
                flops_saving=0.4, width=1024, height=1024, calibration_steps=10, model=None,
                positive=None) -> io.NodeOutput:
        num_blocks = None
        if model is not None and not schedule_json.strip():
            schedule, num_blocks = calibrate_model(model, positive, flops_saving, width, height, calibration_steps)
        else:
            schedule = build_schedule(preset, ratio, end_scale, switch_percent, progress_curve, depth_curve,
                                      schedule_json)
        return io.NodeOutput(schedule, render(schedule, num_blocks=num_blocks), schedule.to_json(indent=2))


SHAPE_WIDGETS = ("preset", "ratio", "end_scale", "switch_percent", "progress_curve", "depth_curve")
CALIBRATION_WIDGETS = ("flops_saving", "width", "height", "calibration_steps")


def unused_widgets(preset: str, progress_curve: str = "", depth_curve: str = "", schedule_json: str = "",
                   calibrating: bool = False) -> list[str]:
    """The widgets that do not shape execute()'s schedule now (the frontend greys them): schedule_json
    wins, then calibration, then build_schedule's precedence."""
    if schedule_json.strip():
        return [*SHAPE_WIDGETS, *CALIBRATION_WIDGETS]
    if calibrating:
        return list(SHAPE_WIDGETS)
    unused = list(CALIBRATION_WIDGETS)
    if progress_curve.strip():
        unused += ["ratio", "end_scale", "switch_percent"]
        if depth_curve.strip():
            unused.append("preset")
    else:
        if preset == "constant":
            unused.append("end_scale")
        if preset != "structure_then_detail":
            unused.append("switch_percent")
    return unused


def calibrate_model(model, positive, flops_saving: float, width: int, height: int, steps: int):
    """(calibrated schedule, number of blocks), from one unpatched euler pass at cfg 1; cached."""
    import torch
    import comfy.sample

    if positive is None:
        raise ValueError("Token Ratio Schedule: calibration needs the 'positive' conditioning when a model is "
                         "connected (the prompt to calibrate with)")
    info = detect_family(model, "Token Ratio Schedule calibration", "calibration")
    n_txt = int(positive[0][0].shape[1])
    key = (id(model.model), str(model.patches_uuid), info.family.name, width, height, steps, round(flops_saving, 4),
           n_txt)
    cached = CACHE.get(key)
    if cached is not None and cached[0]() is model.model:
        return cached[1], info.family.num_blocks
    fmt = model.model.latent_format
    down = int(getattr(fmt, "spacial_downscale_ratio", 8))
    latent = torch.zeros(1, fmt.latent_channels, height // down, width // down)

    def run_pass(probe):
        probed = model.clone()
        install(probed, probe, "calibration", info)
        noise = comfy.sample.prepare_noise(latent, CALIBRATION_SEED)
        comfy.sample.sample(probed, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                            disable_pbar=True, seed=CALIBRATION_SEED)

    start = time.perf_counter()
    result = calibrate(run_pass, info.family.num_blocks, n_txt, flops_saving,
                       name=f"calibrated {info.family.name} {width}x{height}, {100 * flops_saving:.0f}% saved")
    log.info("Token Ratio Schedule: calibrated %s at %dx%d in %.1f s; %.1f%% of block FLOPs saved (target %.1f%%)",
             info.family.name, width, height, time.perf_counter() - start, 100 * result.predicted_saving,
             100 * flops_saving)
    CACHE.put(key, (weakref.ref(model.model), result.schedule))  # never keeps a model alive
    return result.schedule, info.family.num_blocks
