"""Ways to build a TokenRatioSchedule: presets, typed control-point curves, JSON.

A preset is separable, r = ratio * time(progress) * layer(depth) with both profiles in [0, 1], shaped
after DiffCR (arXiv 2412.16822) and FlexDiT (arXiv 2412.06028) but untrained (docs/schedule.md).
A curve is "position:value" points, e.g. "0:0.7, 0.4:0.5, 1:0.2": linear between, held outside.
"""
from __future__ import annotations

import math

from .schedule import TokenRatioSchedule, _interp

# Largest ratio any method of the pack can use: a 4x4 pooling window keeps 1/16.
MAX_RATIO = 0.9375

# FlexDiT's four equal DDPM timestep stages, matched by log-SNR to rectified flow and read as
# progress on the shifted schedules of Flux and SD3 (docs/density.md).
FLEXDIT_STAGE_BOUNDS = (0.15, 0.47, 0.76)

PRESETS = ("constant", "linear", "cosine", "structure_then_detail", "diffcr_like", "flexdit")

# Depth profile of "diffcr_like": first and last layers dense, middle layers the most compressed.
DIFFCR_DEPTH = ((0.0, 0.0), (0.1, 0.5), (0.25, 1.0), (0.7, 1.0), (0.9, 0.4), (1.0, 0.0))
# Depth profile of "flexdit": bottom and top layers dense.
FLEXDIT_DEPTH = ((0.0, 0.0), (0.069, 0.0), (0.07, 1.0), (0.93, 1.0), (0.931, 0.0), (1.0, 0.0))
_STEP = 1e-3  # width of the ramp that stands for a jump between two control points
_COSINE_POINTS = 17


def parse_curve(text: str, what: str, max_value: float = 1.0, max_inclusive: bool = True) -> list[tuple[float, float]]:
    """Control points from "x:y, x:y, ..." (commas, semicolons or new lines between); x in [0, 1] strictly
    increasing, y in [0, max_value] (or [0, max_value)). Errors name `what` and the point."""
    entries = [e.strip() for e in text.replace(";", ",").replace("\n", ",").split(",")]
    entries = [e for e in entries if e]
    if not entries:
        raise ValueError(f"{what}: no control points; write them as position:value, e.g. \"0:0.7, 0.4:0.5, 1:0.2\"")
    points = []
    top = f"[0, {max_value:g}]" if max_inclusive else f"[0, {max_value:g})"
    for n, entry in enumerate(entries, 1):
        parts = entry.split(":")
        if len(parts) != 2:
            raise ValueError(f"{what}: point {n} {entry!r} is not position:value (e.g. \"0.4:0.5\")")
        try:
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"{what}: point {n} {entry!r} holds something that is not a number") from None
        if not (0.0 <= x <= 1.0):
            raise ValueError(f"{what}: point {n} {entry!r}: position must lie in [0, 1], got {x:g}")
        ok = 0.0 <= y <= max_value if max_inclusive else 0.0 <= y < max_value
        if not ok:
            raise ValueError(f"{what}: point {n} {entry!r}: value must lie in {top}, got {y:g}")
        if points and x <= points[-1][0]:
            raise ValueError(f"{what}: point {n} {entry!r}: positions must increase, but {x:g} follows "
                             f"{points[-1][0]:g}")
        points.append((x, y))
    return points


def curve_value(points, x: float) -> float:
    return _interp([p[0] for p in points], [p[1] for p in points], x)


def format_curve(points) -> str:
    return ", ".join(f"{x:g}:{y:g}" for x, y in points)


def time_profile(preset: str, end_scale: float, switch: float = 0.4) -> list[tuple[float, float]]:
    """Control points of the progress profile of a preset, 1 at the first step."""
    e = end_scale
    if preset == "constant":
        return [(0.0, 1.0)]
    if preset in ("linear", "diffcr_like"):
        return [(0.0, 1.0), (1.0, e)]
    if preset == "cosine":  # as SDTM's CRA: cos from 1 at the first step to end_scale at the last
        xs = [i / (_COSINE_POINTS - 1) for i in range(_COSINE_POINTS)]
        return [(x, e + (1.0 - e) * math.cos(x * math.pi / 2)) for x in xs]
    if preset == "structure_then_detail":
        s = min(max(switch, _STEP), 1.0)
        return [(0.0, 1.0), (s - _STEP, 1.0), (s, e)] + ([(1.0, e)] if s < 1.0 else [])
    if preset == "flexdit":  # 4 stages, linear in the stage index from 1 down to end_scale
        pts = []
        bounds = (0.0,) + FLEXDIT_STAGE_BOUNDS
        for s, b in enumerate(bounds):
            v = 1.0 - s * (1.0 - e) / 3.0
            if s > 0:
                pts.append((b - _STEP, pts[-1][1]))
            pts.append((b, v))
        return pts + [(1.0, e)]
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def depth_profile(preset: str) -> list[tuple[float, float]]:
    if preset == "diffcr_like":
        return list(DIFFCR_DEPTH)
    if preset == "flexdit":
        return list(FLEXDIT_DEPTH)
    if preset in PRESETS:
        return [(0.0, 1.0)]
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def separable(time_points, depth_points, scale: float = 1.0, name: str = "custom") -> TokenRatioSchedule:
    """The table of r = scale * time(p) * depth(d), clamped to [0, MAX_RATIO]; on the control points'
    grid, bilinear interpolation equals the product of the two curves everywhere."""
    progress = [p[0] for p in time_points]
    depth = [d[0] for d in depth_points]
    ratios = [[min(max(scale * t * dv, 0.0), MAX_RATIO) for _, t in time_points] for _, dv in depth_points]
    return TokenRatioSchedule(depth=depth, progress=progress, ratios=ratios, name=name)


def build_schedule(preset: str = "constant", ratio: float = 0.5, end_scale: float = 0.25, switch: float = 0.4,
                   progress_curve: str = "", depth_curve: str = "", json_text: str = "") -> TokenRatioSchedule:
    """The Token Ratio Schedule node's schedule. `json_text` wins outright; else the preset's profiles,
    with `progress_curve` (absolute ratios: `ratio`, `end_scale` unused) and `depth_curve` replacing theirs."""
    if json_text.strip():
        return TokenRatioSchedule.from_json(json_text)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not (0.0 <= ratio <= MAX_RATIO):
        raise ValueError(f"ratio must lie in [0, {MAX_RATIO}], got {ratio}")
    if not (0.0 <= end_scale <= 1.0):
        raise ValueError(f"end_scale must lie in [0, 1], got {end_scale}")
    name = preset
    if progress_curve.strip():
        time_points, scale = parse_curve(progress_curve, "progress_curve", MAX_RATIO), 1.0
        name = f"progress curve {format_curve(time_points)}"
    else:
        time_points, scale = time_profile(preset, end_scale, switch), ratio
    if depth_curve.strip():
        depth_points = parse_curve(depth_curve, "depth_curve", 1.0)
        name += f", depth curve {format_curve(depth_points)}"
    else:
        depth_points = depth_profile(preset)
    return separable(time_points, depth_points, scale, name=name)
