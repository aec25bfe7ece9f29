"""Host tests: Token Density Schedule and Token Ratio Schedule nodes on tiny models of ComfyUI's own
Flux and SD3 classes (random weights: these check plumbing and bounds, not image quality)."""
from __future__ import annotations

import pytest
import torch

from test_host_sdtm import assert_same_snapshot, build, rel_l2, run_with_stats, snapshot

FAMILIES = ["flux", "sd3"]
# Relative L2 vs. unpatched with every-step pooling (the `pooling` fixture), 6 euler steps, CFG 3: set from
# measurements on these random models over several grids, well below the distance between two noise seeds.
# Random weights amplify every perturbation; the bounds check plumbing, not quality.
REL_L2_BOUND = {"flux": 0.50, "sd3": 0.12}
MIN_DIFFERENCE = 1e-3


@pytest.fixture(scope="module")
def nodes(host):
    return host.pack_nodes()


@pytest.fixture(scope="module")
def pooling(host, nodes):
    """Pooling 2x2 at every step after a short warm-up, no detail cache: the mechanics these tests check
    (test_defaults_refresh_with_a_full_step covers the node's defaults)."""
    return host.every_step_inputs(nodes["TokenDensityPatchModel"])


def density(host, nodes, model, pooling, **kw):
    (out,) = host.run_node(nodes["TokenDensityPatchModel"], model=model, **dict(pooling, **kw))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_window_is_bit_identical(host, nodes, pooling, family):
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    assert torch.equal(host.sample(density(host, nodes, model, pooling, start_percent=1.0), height=128,
                                   width=128), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_pools_and_stays_close(host, nodes, pooling, family, caplog):
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    out, computed, calls, reduced = run_with_stats(host, density(host, nodes, model, pooling), caplog,
                                                   height=128, width=128)
    # Every block pools 2x2 at each step from start_percent on (6 steps, simple scheduler).
    import importlib
    import comfy.samplers
    sched_mod = importlib.import_module(host.load_pack().__name__ + ".kernels.schedule")
    ms = model.get_model_object("model_sampling")
    pm = sched_mod.ProgressMap(ms.percent_to_sigma)
    active = sum(pm(s) >= pooling["start_percent"] for s in comfy.samplers.calculate_sigmas(ms, "simple", 6)[:-1])
    per_step = calls // (6 * 4)
    assert 0 < active < 6 and reduced == 4 * active * per_step, (active, reduced, calls)
    assert computed < 80.0
    # FlexDiT's layout: progress < 0.76 for the first 5 steps; blocks 1 and 2 of 4 pool 2x2.
    dens = importlib.import_module(host.load_pack().__name__ + ".kernels.density")
    layout = dict(dens.FLEXDIT_LAYOUT, stage_windows="2, 2, 2, 1")
    _, _, calls, reduced = run_with_stats(host, density(host, nodes, model, pooling, **layout), caplog,
                                          height=128, width=128)
    assert reduced == 2 * (calls // 4 * 5 // 6)
    err = rel_l2(base, out)
    other = rel_l2(base, host.sample(model, seed=1, height=128, width=128))
    assert MIN_DIFFERENCE < err < REL_L2_BOUND[family], err
    assert err < 0.5 * other


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_refresh_with_a_full_step(host, nodes, family, caplog):
    """The defaults' detail cache: the first call is full, then two pooled steps per full refresh step."""
    model = build(host, family)
    defaults = host.node_inputs(nodes["TokenDensityPatchModel"])
    assert defaults["refresh_every"] == 2
    out, _, calls, reduced = run_with_stats(host, density(host, nodes, model, defaults, start_percent=0.0), caplog,
                                            height=128, width=128)
    assert reduced * 6 == calls * 4, "steps 1, 2, 4, 5 of 6 pool in every block; 0 and 3 are full"
    base = host.sample(model, height=128, width=128)
    out = host.sample(density(host, nodes, model, defaults), height=128, width=128)
    err = rel_l2(base, out)
    assert MIN_DIFFERENCE < err < 0.5 * rel_l2(base, host.sample(model, seed=1, height=128, width=128)), err


@pytest.mark.parametrize("family", FAMILIES)
def test_input_model_unchanged(host, nodes, pooling, family):
    model = build(host, family)
    base = host.sample(model, height=128, width=128)
    before = snapshot(model)
    patched = density(host, nodes, model, pooling)
    assert_same_snapshot(before, snapshot(model))
    host.sample(patched, height=128, width=128)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(host.sample(model, height=128, width=128), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_with_cfg(host, nodes, pooling, family):
    model = build(host, family)
    base = host.sample(model, batch=2, height=128, width=128, cfg=3.0)
    out = host.sample(density(host, nodes, model, pooling), batch=2, height=128, width=128, cfg=3.0)
    assert out.shape == base.shape == (2, 16, 16, 16)
    for row in range(2):
        assert MIN_DIFFERENCE < rel_l2(base[row], out[row]) < REL_L2_BOUND[family]
    # each row equals the same row sampled alone: pooling is per sample
    single = host.sample(density(host, nodes, model, pooling), batch=1, height=128, width=128, cfg=3.0)
    assert torch.allclose(out[0], single[0], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("latent_hw, windows", [((10, 14), "2, 2, 2, 1"), ((18, 18), "3, 3, 2, 1")],
                         ids=["grid5x7_k2", "grid9x9_k3_k2"])
def test_grid_not_divisible_by_the_window(host, nodes, pooling, family, latent_hw, windows, caplog):
    h, w = latent_hw
    model = build(host, family)
    base = host.sample(model, height=8 * h, width=8 * w)
    out, computed, _, reduced = run_with_stats(host, density(host, nodes, model, pooling, stage_windows=windows),
                                               caplog, height=8 * h, width=8 * w)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert reduced > 0 and computed < 85.0
    assert MIN_DIFFERENCE < rel_l2(base, out) < REL_L2_BOUND[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_obeys_a_connected_schedule(host, nodes, pooling, family, caplog):
    model = build(host, family)
    (sched, heatmap, text) = host.run_node(nodes["TokenRatioSchedule"], preset="constant", ratio=0.75,
                                           end_scale=1.0, switch_percent=0.4, progress_curve="0:0.75, 0.5:0.0",
                                           depth_curve="", schedule_json="")
    assert heatmap.ndim == 4 and heatmap.shape[-1] == 3 and '"ratios"' in text
    patched = density(host, nodes, model, pooling, schedule=sched, span_pattern=False, start_percent=0.0)
    _, computed, calls, reduced = run_with_stats(host, patched, caplog, height=128, width=128)
    # The ratio falls from 0.75 (2x2) to 0 at progress 0.5; below 0.375 the window is 1 (dense). Every block
    # (no bottom/top rule with a schedule) pools exactly at the steps where the schedule says so.
    import importlib
    import comfy.samplers
    pack = host.load_pack()
    dens = importlib.import_module(pack.__name__ + ".kernels.density")
    sched_mod = importlib.import_module(pack.__name__ + ".kernels.schedule")
    ms = model.get_model_object("model_sampling")
    pm = sched_mod.ProgressMap(ms.percent_to_sigma)
    sig = comfy.samplers.calculate_sigmas(ms, "simple", 6)[:-1]
    pooled_steps = sum(dens.window_for_ratio(sched.ratio(0.5, pm(s))) > 1 for s in sig)
    assert 0 < pooled_steps < 6
    calls_per_step_and_block = calls // (6 * 4)
    assert reduced == 4 * pooled_steps * calls_per_step_and_block


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_drives_sdtm(host, nodes, family, caplog):
    model = build(host, family)
    sdtm = nodes["SDTMPatchModel"]
    sdefaults = host.every_step_inputs(sdtm)
    (zero, _, _) = host.run_node(nodes["TokenRatioSchedule"], preset="constant", ratio=0.0, end_scale=1.0,
                                 switch_percent=0.4, progress_curve="", depth_curve="", schedule_json="")
    base = host.sample(model, height=128, width=128)
    (off,) = host.run_node(sdtm, model=model, schedule=zero, **sdefaults)
    assert torch.equal(host.sample(off, height=128, width=128), base), "a zero schedule changes nothing"
    (sched, _, _) = host.run_node(nodes["TokenRatioSchedule"], preset="diffcr_like", ratio=0.6, end_scale=0.25,
                                  switch_percent=0.4, progress_curve="", depth_curve="", schedule_json="")
    (on,) = host.run_node(sdtm, model=model, schedule=sched, **dict(sdefaults, skip_first_blocks=0,
                                                                   skip_last_blocks=0))
    out, computed, calls, reduced = run_with_stats(host, on, caplog, height=128, width=128)
    assert reduced > 0 and computed < 90.0 and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors(host, nodes, pooling):
    model = build(host, "flux")
    before = snapshot(model)
    with pytest.raises(ValueError, match="stage_windows needs 4"):
        density(host, nodes, model, pooling, stage_windows="2, 2")
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ValueError, match="progress_curve: point 2"):
        host.run_node(nodes["TokenRatioSchedule"], preset="constant", ratio=0.5, end_scale=1.0, switch_percent=0.4,
                      progress_curve="0:0.5, 2:0.1", depth_curve="", schedule_json="")


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_free_attention_matches_the_bias_on_the_host_blocks(host, family):
    """ComfyUI's own attention calls (Flux: heads split, SD3: v with split heads, heads by keyword): the
    value-channel form of proportional attention gives the biased run's result."""
    import importlib
    pack = host.load_pack().__name__
    dens = importlib.import_module(pack + ".kernels.density")
    patching = importlib.import_module(pack + ".nodes.patching")
    model = build(host, family)
    outs = [host.sample(patching.patch_model(model, dens.DensitySchedule(dens.DensityConfig(), bias_free_attention=free),
                                             "density", "Token Density"), height=128, width=128)
            for free in (False, True)]
    assert not torch.equal(outs[0], host.sample(model, height=128, width=128))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
