"""Core (host-free) tests of kernels/schedule.py: progress from sigma, the ratio schedule table."""
from __future__ import annotations

import copy
import json
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.schedule import ProgressMap, TokenRatioSchedule, block_depth, flow_percent_to_sigma

SETTINGS = settings(max_examples=40, deadline=None)


def shifted_flow(shift):
    """Shifted rectified flow, as Flux/SD3 model_sampling: sigma = shift*s / (1 + (shift-1)*s), s = 1 - p."""
    def percent_to_sigma(p):
        s = min(max(1.0 - p, 0.0), 1.0)
        return shift * s / (1.0 + (shift - 1.0) * s)
    return percent_to_sigma


def shifted_flow_inverse(shift, sigma):
    s = sigma / (shift - (shift - 1.0) * sigma)
    return 1.0 - s


# ---- ProgressMap ---------------------------------------------------------------------------

@SETTINGS
@given(p=st.floats(0.0, 1.0))
def test_progress_map_inverts_unshifted_flow(p):
    pm = ProgressMap(flow_percent_to_sigma)
    assert pm(flow_percent_to_sigma(p)) == pytest.approx(p, abs=1e-9)
    # a tensor sigma (float32, as samplers pass it) is read from its first entry
    assert pm(torch.tensor([1.0 - p, 0.3])) == pytest.approx(p, abs=1e-6)


@SETTINGS
@given(p=st.floats(0.0, 1.0), shift=st.sampled_from([1.15, 3.0, 6.0]))
def test_progress_map_inverts_shifted_flow(p, shift):
    f = shifted_flow(shift)
    pm = ProgressMap(f)
    sigma = f(p)
    # exact inverse, up to the piecewise-linear table (1001 points)
    assert pm(sigma) == pytest.approx(shifted_flow_inverse(shift, sigma), abs=2e-4)
    assert pm(sigma) == pytest.approx(p, abs=2e-4)


def test_progress_map_is_monotone_and_clamps():
    f = shifted_flow(3.0)
    pm = ProgressMap(f)
    sigmas = torch.linspace(0.0, 1.0, 200)
    progress = [pm(s) for s in sigmas]
    assert all(b <= a + 1e-12 for a, b in zip(progress, progress[1:])), "larger sigma, earlier progress"
    assert pm(5.0) == 0.0, "sigma above the schedule is the start"
    assert pm(-1.0) == 1.0, "sigma below the schedule is the end"
    assert pm(torch.tensor(1.0, dtype=torch.float16)) == 0.0
    assert pm(0.0) == 1.0


def test_progress_map_midpoint_of_shifted_flow_is_not_linear():
    # with shift 3, half-way in percent is sigma 0.75, not 0.5: a map that assumed sigma = 1 - p would be wrong
    pm = ProgressMap(shifted_flow(3.0))
    assert pm(0.75) == pytest.approx(0.5, abs=1e-4)
    assert pm(0.5) == pytest.approx(shifted_flow_inverse(3.0, 0.5), abs=1e-4)
    assert abs(pm(0.5) - 0.5) > 0.2


def test_flow_percent_to_sigma_clamps():
    assert flow_percent_to_sigma(-0.5) == 1.0
    assert flow_percent_to_sigma(1.5) == 0.0
    assert flow_percent_to_sigma(0.25) == 0.75


def test_block_depth():
    assert block_depth(0, 1) == 0.0
    assert block_depth(0, 5) == 0.0 and block_depth(4, 5) == 1.0 and block_depth(2, 5) == 0.5


# ---- TokenRatioSchedule -------------------------------------------------------------------

def _table():
    return copy.deepcopy(TABLE)


TABLE = dict(depth=[0.0, 0.5, 1.0], progress=[0.0, 0.4, 1.0],
             ratios=[[0.6, 0.4, 0.1], [0.5, 0.3, 0.0], [0.2, 0.2, 0.2]])


def bilinear_reference(s: TokenRatioSchedule, d: float, p: float) -> float:
    def seg(xs, x):
        x = min(max(x, xs[0]), xs[-1])
        for i in range(1, len(xs)):
            if x <= xs[i]:
                return i - 1, (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return len(xs) - 2, 1.0
    i, wd = seg(s.depth, d)
    j, wp = seg(s.progress, p)
    r = s.ratios
    top = r[i][j] * (1 - wp) + r[i][j + 1] * wp
    bot = r[i + 1][j] * (1 - wp) + r[i + 1][j + 1] * wp
    return top * (1 - wd) + bot * wd


def test_schedule_hits_table_points():
    s = TokenRatioSchedule(**_table())
    for i, d in enumerate(TABLE["depth"]):
        for j, p in enumerate(TABLE["progress"]):
            assert s.ratio(d, p) == pytest.approx(TABLE["ratios"][i][j])


def test_schedule_bilinear_centre():
    s = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0.1, 0.3], [0.5, 0.7]])
    assert s.ratio(0.5, 0.5) == pytest.approx(0.4)
    assert s.ratio(0.25, 0.0) == pytest.approx(0.2)
    assert s.ratio(0.0, 0.75) == pytest.approx(0.25)


@SETTINGS
@given(d=st.floats(-0.5, 1.5), p=st.floats(-0.5, 1.5))
def test_schedule_matches_bilinear_reference_and_clamps(d, p):
    s = TokenRatioSchedule(**_table())
    assert s.ratio(d, p) == pytest.approx(bilinear_reference(s, d, p), abs=1e-12)
    # outside the points, the value is the one at the nearest edge
    dc, pc = min(max(d, 0.0), 1.0), min(max(p, 0.0), 1.0)
    assert s.ratio(d, p) == pytest.approx(s.ratio(dc, pc), abs=1e-12)
    lo = min(min(r) for r in TABLE["ratios"])
    hi = max(max(r) for r in TABLE["ratios"])
    assert lo - 1e-12 <= s.ratio(d, p) <= hi + 1e-12


def test_schedule_clamps_with_inner_points():
    s = TokenRatioSchedule(depth=[0.2, 0.8], progress=[0.3, 0.6], ratios=[[0.1, 0.2], [0.3, 0.4]])
    assert s.ratio(0.0, 0.0) == pytest.approx(0.1)
    assert s.ratio(1.0, 1.0) == pytest.approx(0.4)
    assert s.ratio(0.0, 1.0) == pytest.approx(0.2)
    assert s.ratio(1.0, 0.0) == pytest.approx(0.3)


def test_single_point_axes_are_constant():
    s = TokenRatioSchedule(depth=[0.5], progress=[0.5], ratios=[[0.3]])
    for d, p in ((0, 0), (1, 1), (0.5, 0.9)):
        assert s.ratio(d, p) == pytest.approx(0.3)


def test_default_schedule_is_zero():
    s = TokenRatioSchedule()
    assert s.ratio(0.3, 0.7) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=[0.0, 0.0], progress=[0.0, 1.0], ratios=[[0, 0], [0, 0]]), "depth points"),
    (dict(depth=[0.6, 0.4], progress=[0.0, 1.0], ratios=[[0, 0], [0, 0]]), "depth points"),
    (dict(depth=[0.0, 1.0], progress=[0.5, 0.2], ratios=[[0, 0], [0, 0]]), "progress points"),
    (dict(depth=[0.0, 1.2], progress=[0.0, 1.0], ratios=[[0, 0], [0, 0]]), "depth points"),
    (dict(depth=[-0.1, 1.0], progress=[0.0, 1.0], ratios=[[0, 0], [0, 0]]), "depth points"),
    (dict(depth=[], progress=[0.0, 1.0], ratios=[]), "depth points"),
    (dict(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0, 0]]), "table"),
    (dict(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0, 0], [0, 0, 0]]), "table"),
    (dict(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0, 1.0], [0, 0]]), r"\[0, 1\)"),
    (dict(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0, -0.1], [0, 0]]), r"\[0, 1\)"),
    (dict(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[0, float("nan")], [0, 0]]), r"\[0, 1\)"),
    (dict(depth=[0.0, float("nan")], progress=[0.0, 1.0], ratios=[[0, 0], [0, 0]]), "depth points"),
])
def test_schedule_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenRatioSchedule(**kwargs)


def test_schedule_json_round_trip():
    s = TokenRatioSchedule(**_table(), name="my schedule")
    text = s.to_json()
    assert json.loads(text)["name"] == "my schedule"
    t = TokenRatioSchedule.from_json(text)
    assert t == s
    for d in (0.0, 0.3, 0.77, 1.0):
        for p in (0.0, 0.2, 0.5, 0.99):
            assert t.ratio(d, p) == s.ratio(d, p)
    # name is optional, numbers may be ints
    u = TokenRatioSchedule.from_json('{"depth": [0, 1], "progress": [0, 1], "ratios": [[0, 0.5], [0.25, 0]]}')
    assert u.name == "custom" and u.ratio(1, 0) == 0.25


@pytest.mark.parametrize("text", [
    "", "not json", "[1, 2]", "null", "42", "{}",
    '{"depth": [0, 1], "progress": [0, 1]}',
    '{"depth": 5, "progress": [0, 1], "ratios": [[0, 0], [0, 0]]}',
    '{"depth": [0, 1], "progress": [0, 1], "ratios": [0, 0]}',
    '{"depth": [0, 1], "progress": [0, 1], "ratios": [[0, 0], [0, 1.5]]}',
    '{"depth": [1, 0], "progress": [0, 1], "ratios": [[0, 0], [0, 0]]}',
    '{"depth": ["a", 1], "progress": [0, 1], "ratios": [[0, 0], [0, 0]]}',
])
def test_from_json_rejects_garbage_with_value_error(text):
    with pytest.raises(ValueError):
        TokenRatioSchedule.from_json(text)


def test_from_json_error_message_is_clear():
    with pytest.raises(ValueError, match="not a token ratio schedule"):
        TokenRatioSchedule.from_json("{oops")
    with pytest.raises(ValueError, match="not a token ratio schedule"):
        TokenRatioSchedule.from_json('{"progress": [0, 1], "ratios": [[0, 0]]}')
