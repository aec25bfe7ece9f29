"""Skipped steps: a model call whose output a method serves alone runs no block (a begin_call decision whose
`skip` is true; kernels/runtime.py).

CAT at ratio 1 and the merging methods at detail_weight 0 (whose merged calls would be ignored) skip their
reduced steps: on the reference model they then equal the plain step cache with the same full steps
(tools/step_cache.py), and cost only their full steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kernels.cat import CATConfig, CATPruning
from kernels.density import DensityConfig, DensitySchedule
from kernels.runtime import RUNS_KEY, CallInfo, TokenMethod
from kernels.sdtm import SDTM, SDTMConfig
from tools import reference_dit as R
from tools import step_cache as SC

CFG = R.DiTConfig(image_size=32, hidden=64, heads=2, axes_dim=(8, 12, 12), depth_double=1, depth_single=2)
STEPS = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return R.build_model(CFG, seed=0, weights=None)[0]


@dataclass
class Skip:
    skip: bool


class SkipOdd(TokenMethod):
    """Skips every call at an odd step and serves zeros there; records each call's decision."""

    name = "skip odd"

    class config:
        start_percent, end_percent = 0.0, 1.0

    def new_run_state(self):
        return {"step": -1, "sigma": None, "skips": []}

    def begin_call(self, state, call, x):
        if call.sigma != state["sigma"]:
            state["step"], state["sigma"] = state["step"] + 1, call.sigma
        state["skips"].append(state["step"] % 2 == 1)
        return Skip(state["skips"][-1])

    def end_call(self, state, call, decision, noise):
        if decision.skip:
            return torch.zeros_like(noise), torch.zeros((1,) * noise.ndim, dtype=torch.bool)
        return None


def test_a_skipped_call_runs_no_block_and_costs_nothing(model, monkeypatch):
    ran = []
    for block in list(model.double_blocks) + list(model.single_blocks):
        monkeypatch.setattr(block, "forward", lambda *a, _f=block.forward, **k: ran.append(1) or _f(*a, **k))
    options = R.method_options(SkipOdd(), model, "skip")
    peaks = []

    def spy(call_next, x, sigma, class_ids, to):
        out = call_next(x, sigma, class_ids, to)
        peaks.append(float(out.abs().max()))
        return out
    options[R.MODEL_WRAPPERS_KEY] = [spy]
    R.sample(model, [0], steps=4, cfg=3.0, seed=0, transformer_options=options)
    run = options[RUNS_KEY]["skip"]
    assert run.state["skips"] == [False, True, False, True]
    assert [p == 0.0 for p in peaks] == run.state["skips"]    # a skipped call's output is what end_call served
    assert len(ran) == 2 * model.family().num_blocks          # the blocks ran in the two full calls only
    assert run.stats.block_calls == 4 * model.family().num_blocks and run.stats.flops_share() == pytest.approx(0.5)


def _run(model, method=None, layout=None):
    options = R.method_options(method, model, "m") if method is not None else SC.StepCache(layout).options()
    images = R.sample(model, [0, 1], steps=STEPS, cfg=3.0, seed=3, transformer_options=options)
    return images, (options[RUNS_KEY]["m"] if method is not None else None)


# warm-up: progress < 0.25 at 12 steps is steps 0..2; a full step after every 2 reduced ones
LAYOUT = SC.Layout(3, 3)


@pytest.mark.parametrize("make", [
    lambda: CATPruning(CATConfig(ratio=1.0, full_percent=0.25, refresh_every=2)),
    lambda: SDTM(SDTMConfig(detail_weight=0.0, start_percent=0.25, refresh_every=2)),
    lambda: DensitySchedule(DensityConfig(detail_weight=0.0, start_percent=0.25, refresh_every=2)),
], ids=["cat ratio 1", "sdtm detail_weight 0", "density detail_weight 0"])
def test_skipping_methods_are_the_step_cache_with_their_full_steps(model, make):
    cache, _ = _run(model, layout=LAYOUT)
    images, run = _run(model, make())
    assert torch.allclose(images, cache, atol=1e-5), (images - cache).abs().max()
    assert run.stats.flops_share() == pytest.approx(LAYOUT.full_steps(STEPS) / STEPS)
    assert run.stats.tokens_computed * STEPS == run.stats.tokens_in * LAYOUT.full_steps(STEPS)


def test_cat_at_ratio_one_keeps_no_keys_or_values(model):
    _, run = _run(model, CATPruning(CATConfig(ratio=1.0, full_percent=0.25)))
    assert not run.state.kv
    _, pruning = _run(model, CATPruning(CATConfig(ratio=0.9, full_percent=0.25)))
    assert pruning.state.kv and pruning.state.peak_cache_bytes > run.state.peak_cache_bytes > 0


def test_a_merged_call_that_counts_is_not_skipped(model):
    """detail_weight above 0 uses the merged call, so it runs (and costs more than its full steps)."""
    _, run = _run(model, SDTM(SDTMConfig(detail_weight=0.1, start_percent=0.25, refresh_every=2)))
    assert run.stats.flops_share() > LAYOUT.full_steps(STEPS) / STEPS + 0.05


def test_a_step_where_no_block_merges_runs_in_full_even_at_weight_zero(model):
    """Density windows of 1 in the last stage: those steps merge nothing, so they are full steps, not skipped."""
    method = DensitySchedule(DensityConfig(stage_windows=(2, 2, 2, 1), detail_weight=0.0, start_percent=0.0,
                                           refresh_every=0))
    call = CallInfo((16, 16), 256, 4, 0.5, num_blocks=3)
    assert method.merges(call) and not method.merges(CallInfo((16, 16), 256, 4, 0.99, num_blocks=3))
    images, run = _run(model, method)
    assert torch.isfinite(images).all()
    last_stage = sum(1 for s in R.sigmas(STEPS)[:-1] if R.progress_map()(s) >= method.config.stage_bounds[2])
    assert last_stage > 0
    assert run.stats.tokens_computed >= last_stage * run.stats.tokens_in / STEPS


@pytest.mark.parametrize("make", [
    lambda: CATPruning(CATConfig(ratio=1.0, full_percent=0.0, refresh_every=0)),
    lambda: SDTM(SDTMConfig(detail_weight=0.0, start_percent=0.0, refresh_every=0)),
], ids=["cat", "sdtm"])
def test_a_call_the_host_cannot_replace_is_never_skipped(model, make):
    """A call whose output end_call never sees (ComfyUI at sigma 0) runs its blocks: skipping it would leave
    the blocks' inputs as the model's output."""
    method = make()
    state = method.new_run_state()
    x = torch.zeros(2, 3, 32, 32)
    for i, sigma in enumerate((1.0, 0.9, 0.8)):
        call = CallInfo((16, 16), 256, 4, i / 10, sigma, num_blocks=3, replaceable=False)
        decision = method.begin_call(state, call, x)
        assert not getattr(decision, "skip", False)
        method.end_call(state, call, decision, torch.randn(2, 3, 32, 32))
    replaceable = CallInfo((16, 16), 256, 4, 0.3, 0.7, num_blocks=3)
    assert method.begin_call(state, replaceable, x).skip   # the same call, replaceable, is skipped
