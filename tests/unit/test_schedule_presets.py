"""Core tests of kernels/schedule_presets.py and kernels/schedule_plot.py (no ComfyUI needed)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.schedule import TokenRatioSchedule
from kernels.schedule_plot import colormap, render
from kernels.schedule_presets import (FLEXDIT_STAGE_BOUNDS, MAX_RATIO, PRESETS, build_schedule, curve_value,
                                      parse_curve)

SETTINGS = settings(max_examples=40, deadline=None)
GRID = [i / 20 for i in range(21)]


# ---- curves ----------------------------------------------------------------------------------

def test_parse_curve_reads_points_and_interpolates_linearly():
    pts = parse_curve("0:0.7, 0.4:0.5, 1:0.2", "progress_curve")
    assert pts == [(0.0, 0.7), (0.4, 0.5), (1.0, 0.2)]
    assert curve_value(pts, 0.2) == pytest.approx(0.6)
    assert curve_value(pts, 0.7) == pytest.approx(0.35)
    assert curve_value(pts, 0.4) == pytest.approx(0.5)


def test_parse_curve_separators_and_spaces():
    a = parse_curve(" 0 : 0.1 ;0.5:0.3\n1:0.2 ,", "c")
    assert a == [(0.0, 0.1), (0.5, 0.3), (1.0, 0.2)]


def test_curve_clamps_outside_its_points():
    pts = parse_curve("0.3:0.6, 0.6:0.2", "c")
    assert curve_value(pts, 0.0) == 0.6 and curve_value(pts, 1.0) == 0.2
    assert curve_value(parse_curve("0.5:0.4", "c"), 0.9) == 0.4  # a single point is a constant


@pytest.mark.parametrize("text, match", [
    ("", r"progress_curve: no control points"),
    ("  , ", r"progress_curve: no control points"),
    ("0:0.7, 0.4-0.5", r"point 2 '0.4-0.5' is not position:value"),
    ("0:0.7:1", r"point 1 '0:0.7:1' is not position:value"),
    ("0:abc", r"point 1 '0:abc' holds something that is not a number"),
    ("1.2:0.5", r"position must lie in \[0, 1\], got 1.2"),
    ("-0.1:0.5", r"position must lie in \[0, 1\], got -0.1"),
    ("0:0.5, 0.5:0.96", r"point 2 '0.5:0.96': value must lie in \[0, 0.9375\], got 0.96"),
    ("0:-0.2", r"value must lie in \[0, 0.9375\], got -0.2"),
    ("0:0.5, 0.5:0.4, 0.5:0.3", r"point 3 '0.5:0.3': positions must increase, but 0.5 follows 0.5"),
    ("0.6:0.5, 0.2:0.4", r"positions must increase, but 0.2 follows 0.6"),
])
def test_bad_curves_are_rejected_with_clear_messages(text, match):
    with pytest.raises(ValueError, match=match):
        parse_curve(text, "progress_curve", MAX_RATIO)


def test_build_schedule_names_the_bad_curve():
    with pytest.raises(ValueError, match="depth_curve: point 1 '0:1.5': value must lie in \\[0, 1\\]"):
        build_schedule("constant", 0.5, depth_curve="0:1.5")
    with pytest.raises(ValueError, match="progress_curve"):
        build_schedule("constant", 0.5, progress_curve="x")


# ---- presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_peaks_at_ratio_and_stays_in_range(preset):
    s = build_schedule(preset, ratio=0.6, end_scale=0.25)
    values = [s.ratio(d, p) for d in GRID for p in GRID]
    assert max(values) == pytest.approx(0.6)
    assert min(values) >= 0.0


@pytest.mark.parametrize("preset", ["linear", "cosine", "structure_then_detail", "diffcr_like", "flexdit"])
@pytest.mark.parametrize("depth", [0.3, 0.5])
def test_presets_fall_with_progress(preset, depth):
    """Every preset but constant claims: high ratios at noisy steps, lower as the image clears."""
    s = build_schedule(preset, ratio=0.6, end_scale=0.25)
    ps = [i / 200 for i in range(201)]
    vals = [s.ratio(depth, p) for p in ps]
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:])), preset
    assert vals[0] == pytest.approx(0.6) and vals[-1] == pytest.approx(0.15)


def test_constant_is_constant():
    s = build_schedule("constant", ratio=0.45)
    assert {round(s.ratio(d, p), 12) for d in GRID for p in GRID} == {0.45}


def test_cosine_follows_sdtm_cra_shape():
    import math
    s = build_schedule("cosine", ratio=0.6, end_scale=0.25)
    for p in (0.0, 0.3, 0.5, 0.9, 1.0):
        exact = 0.15 + 0.45 * math.cos(p * math.pi / 2)
        assert s.ratio(0.5, p) == pytest.approx(exact, abs=0.01)  # 17-point table


def test_structure_then_detail_switches_at_switch_percent():
    s = build_schedule("structure_then_detail", ratio=0.6, end_scale=0.5, switch=0.3)
    assert s.ratio(0.5, 0.29) == pytest.approx(0.6)
    assert s.ratio(0.5, 0.3) == pytest.approx(0.3)
    assert s.ratio(0.5, 0.9) == pytest.approx(0.3)


def test_flexdit_has_four_stages_and_dense_ends():
    s = build_schedule("flexdit", ratio=0.75, end_scale=0.0)
    stage_mid = [0.07, 0.3, 0.6, 0.9]
    assert [s.ratio(0.5, p) for p in stage_mid] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert FLEXDIT_STAGE_BOUNDS == (0.15, 0.47, 0.76)
    assert s.ratio(0.0, 0.0) == 0.0 and s.ratio(0.05, 0.0) == 0.0, "bottom 7% dense"
    assert s.ratio(1.0, 0.0) == 0.0 and s.ratio(0.95, 0.0) == 0.0, "top 7% dense"


def test_diffcr_like_is_highest_in_middle_layers():
    s = build_schedule("diffcr_like", ratio=0.6)
    depth = [s.ratio(d, 0.0) for d in GRID]
    assert depth[0] == 0.0 and depth[-1] == 0.0
    mid = max(depth)
    assert mid == pytest.approx(0.6) and all(s.ratio(d, 0.0) == pytest.approx(mid) for d in (0.3, 0.5, 0.7))
    up = [s.ratio(d / 100, 0.0) for d in range(0, 26)]
    assert all(b >= a for a, b in zip(up, up[1:])), "rises over the first quarter"


@SETTINGS
@given(d=st.floats(0, 1), p=st.floats(0, 1), ratio=st.floats(0, MAX_RATIO), e=st.floats(0, 1))
def test_separable_table_equals_product_of_curves(d, p, ratio, e):
    """Bilinear interpolation of the table is exactly ratio * time(p) * depth(d) for piecewise-linear curves."""
    s = build_schedule("diffcr_like", ratio=ratio, end_scale=e)
    depth = parse_curve("0:0, 0.1:0.5, 0.25:1, 0.7:1, 0.9:0.4, 1:0", "d")
    expected = ratio * (1 + (e - 1) * p) * curve_value(depth, d)
    assert s.ratio(d, p) == pytest.approx(expected, abs=1e-9)


def test_progress_curve_gives_absolute_ratios_and_depth_curve_scales():
    s = build_schedule("linear", ratio=0.1, progress_curve="0:0.7, 0.4:0.5, 1:0.2", depth_curve="0:0, 0.5:1, 1:0.5")
    assert s.ratio(0.5, 0.2) == pytest.approx(0.6)
    assert s.ratio(0.25, 0.2) == pytest.approx(0.3)
    assert s.ratio(1.0, 1.0) == pytest.approx(0.1)
    assert "progress curve" in s.name and "depth curve" in s.name


def test_results_are_clamped_to_max_ratio():
    s = build_schedule("constant", ratio=MAX_RATIO)
    assert s.ratio(0.5, 0.5) == MAX_RATIO
    with pytest.raises(ValueError, match="ratio must lie"):
        build_schedule("constant", ratio=0.99)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        build_schedule("nope")


# ---- JSON ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_json_round_trip_readable_and_compact(preset):
    s = build_schedule(preset, ratio=0.55, end_scale=0.3)
    for text in (s.to_json(), s.to_json(indent=2)):
        t = TokenRatioSchedule.from_json(text)
        assert t == s
    pretty = s.to_json(indent=2)
    assert pretty.count("\n") >= len(s.ratios) + 4, "one table row per line"
    assert json.loads(pretty)["ratios"] == s.ratios


def test_json_input_wins_over_everything():
    saved = build_schedule("flexdit", ratio=0.7).to_json(indent=2)
    s = build_schedule("constant", ratio=0.1, progress_curve="0:0.3", json_text=saved)
    assert s == TokenRatioSchedule.from_json(saved)
    with pytest.raises(ValueError, match="not a token ratio schedule"):
        build_schedule("constant", json_text="{broken")


# ---- heat map -------------------------------------------------------------------------------

def test_heatmap_is_an_image_and_shows_the_schedule():
    low = render(build_schedule("constant", ratio=0.1), vmax=0.75)
    high = render(build_schedule("constant", ratio=0.7), vmax=0.75)
    assert low.shape == high.shape and low.shape[0] == 1 and low.shape[-1] == 3
    assert low.dtype == torch.float32 and 0.0 <= float(low.min()) and float(low.max()) <= 1.0
    # plot-area centre pixel: the colour of its ratio on the shared scale
    h, w = low.shape[1:3]
    y, x = 30 + 72, 40 + 120
    assert torch.allclose(low[0, y, x], colormap(torch.tensor(0.1 / 0.75)), atol=1e-5)
    assert torch.allclose(high[0, y, x], colormap(torch.tensor(0.7 / 0.75)), atol=1e-5)
    assert not torch.equal(low, high)


def test_heatmap_rows_follow_depth_and_columns_progress():
    s = build_schedule("diffcr_like", ratio=0.6)
    img = render(s, num_blocks=10)[0]
    top, left, height, width = 30, 40, 144, 240
    plot = img[top:top + height, left:left + width]
    # bottom row is block 0 (dense: darkest colour), a middle row is the brightest at progress 0
    assert torch.allclose(plot[-1, 0], colormap(torch.tensor(0.0)), atol=1e-5)
    mid = plot[height // 2]
    assert mid[0].sum() > mid[-1].sum(), "ratio falls with progress, so the colour darkens to the right"
    assert len({tuple(r.tolist()) for r in plot[:, 5]}) <= 10, "one band per block"
    assert (img[:top] > 0.5).any(), "a title is drawn"
