"""tools/merge_error.py: why merged calls add little on the reference model.

Claim (docs/evidence.md, "Why the merged calls add little"): on the trained reference DiT a merged call's prediction
is farther from the full prediction than the previous step's prediction held, even after a low
pass over the merge window, at every step from the second on, and end to end: pooled calls
between full steps land farther from the unpatched images than computing nothing between them.
"""
from __future__ import annotations

import pytest
import torch

from tools import merge_error as E
from tools import reference_dit as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, SAMPLES = 10, 4


@pytest.fixture(scope="module")
def model():
    assert R.WEIGHTS_PATH.is_file(), "the trained weights ship with the repository (tools/weights/)"
    return R.build_model()[0]


def test_relative_error():
    b = torch.ones(2, 3)
    assert E.relative_error(b, b) == 0.0
    assert E.relative_error(2 * b, b) == pytest.approx(1.0)


def test_full_step_indices_round_and_clip():
    assert E.full_step_indices((0.0, 0.1, 0.4, 0.7), 10) == (0, 1, 4, 7)
    assert E.full_step_indices((0.0, 0.99), 4) == (0, 3)


def test_merged_call_is_farther_than_the_held_prediction(model):
    rows = E.per_step_errors(model, STEPS, SAMPLES)
    assert len(rows) == STEPS and "held" not in rows[0] and "forecast" in rows[2]
    for i, r in enumerate(rows[2:], start=2):  # step 1 holds the pure-noise step's prediction
        for merged in E.MERGED:
            full, low = r[merged]
            assert full > r["held"][0], (i, merged, r)
            assert low > r["held"][1], (i, merged, r)


def test_end_to_end_pooled_steps_lose_to_holding(model):
    """Full steps at 0 and 1 of 10: pooled calls between them cost FLOPs and land farther away."""
    base, base_flops = E.end_to_end(model, STEPS, SAMPLES, tuple(range(STEPS)), "held")
    merged, merged_flops = E.end_to_end(model, STEPS, SAMPLES, (0, 1), "merged")
    held, held_flops = E.end_to_end(model, STEPS, SAMPLES, (0, 1), "held")
    assert held_flops == pytest.approx(0.2 * base_flops, rel=1e-6)
    assert held_flops < merged_flops < base_flops
    assert R.psnr(held, base) > R.psnr(merged, base) + 2.0
