"""Host tests: Token Ratio Schedule calibration on tiny models of ComfyUI's own Flux and SD3 classes.

Measured (CPU, 2 cores, 2026-12-03; 192x192 px = 12x12 tokens, 6 euler steps, CFG 3; calibration: one
cfg-1 pass of 6 steps, target 25% of block FLOPs; SDTM driven by the schedule vs. a constant ratio at
equal FLOPs in every block but the last; relative L2 to the unpatched latent):
  Flux (2 double + 4 single, hidden 64) model seed 0: 0.225 vs 0.222, seed 1: 0.170 vs 0.182
  SD3 (6 joint blocks, hidden 384)       model seed 0: 0.0733 vs 0.0748, seed 1: 0.0725 vs 0.0738
Realised block-FLOPs saving 0.247 - 0.251. On these tiny random models the calibrated schedule is only
level with a constant one (margins of 1-7%, both signs); the reference-model tests (test_calibration.py,
test_compare_quick.py) show a clear margin. So here the fidelity check is "not worse than constant by
more than 5%".
"""
from __future__ import annotations

import re

import pytest

from test_host_sdtm import assert_same_snapshot, count_flops, rel_l2, snapshot

FAMILIES = ["flux", "sd3"]
PX, STEPS, TARGET = 192, 6, 0.25


def build(host, family, seed=0):
    if family == "flux":
        return host.tiny_flux(seed=seed, depth=2, depth_single=4)
    return host.tiny_sd3(seed=seed, depth=6)


def schedule_node(host, nodes, **kw):
    args = dict(preset="constant", ratio=0.5, end_scale=1.0, switch_percent=0.4, progress_curve="", depth_curve="",
                schedule_json="", flops_saving=TARGET, width=PX, height=PX, calibration_steps=STEPS)
    args.update(kw)
    return host.run_node(nodes["TokenRatioSchedule"], **args)


def block_flops(counts):
    return sum(v for k, v in counts.items() if re.search(r"_blocks\.\d+$", k))


@pytest.fixture(scope="module")
def nodes(host):
    return host.pack_nodes()


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_meets_the_flops_target(host, nodes, family):
    import importlib
    model = build(host, family)
    before = snapshot(model)
    sched, heatmap, text = schedule_node(host, nodes, model=model, positive=host.conditioning()[0])
    assert_same_snapshot(before, snapshot(model))  # calibration patches a clone only
    assert "calibrated" in sched.name and heatmap.shape[0] == 1 and '"ratios"' in text
    sdtm = nodes["SDTMPatchModel"]
    sdefaults = host.every_step_inputs(sdtm)
    # The schedule decides every step (docs/schedule.md); the last block dense, as the calibration and
    # constant_ratio_for_saving below assume.
    sdefaults.update(start_percent=0.0, skip_first_blocks=0, skip_last_blocks=1)
    (patched,) = host.run_node(sdtm, model=model, schedule=sched, **sdefaults)
    kw = dict(height=PX, width=PX, steps=STEPS)
    base_counts, _ = count_flops(host, model, **kw)
    counts, _ = count_flops(host, patched, **kw)
    saved = 1 - block_flops(counts) / block_flops(base_counts)
    assert abs(saved - TARGET) <= 0.05 * TARGET, saved

    # Fidelity against a constant ratio at equal block FLOPs.
    pack = host.load_pack()
    cal = importlib.import_module(pack.__name__ + ".kernels.calibration")
    sch = importlib.import_module(pack.__name__ + ".kernels.schedule")
    dm = model.model.diffusion_model
    if family == "flux":
        width, n_blocks = dm.double_blocks[0].hidden_size, len(dm.double_blocks) + len(dm.single_blocks)
    else:
        width, n_blocks = dm.joint_blocks[0].x_block.attn.qkv.in_features, len(dm.joint_blocks)
    r = cal.constant_ratio_for_saving(saved, (PX // 16) ** 2, 16, width, n_blocks)
    const = sch.TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[r, r], [r, r]])
    (patched_c,) = host.run_node(sdtm, model=model, schedule=const, **sdefaults)
    counts_c, _ = count_flops(host, patched_c, **kw)
    assert abs(1 - block_flops(counts_c) / block_flops(base_counts) - saved) <= 0.01, "equal FLOPs"
    base = host.sample(model, **kw)
    err = rel_l2(base, host.sample(patched, **kw))
    err_c = rel_l2(base, host.sample(patched_c, **kw))
    assert err < 1.05 * err_c, (err, err_c)


def test_calibration_is_cached_per_model_and_resolution(host, nodes):
    model = build(host, "flux")
    a = schedule_node(host, nodes, model=model, positive=host.conditioning()[0])[0]
    b = schedule_node(host, nodes, model=model, positive=host.conditioning()[0])[0]
    assert a is b, "the second call is a cache hit"
    c = schedule_node(host, nodes, model=model, positive=host.conditioning()[0], width=PX + 32)[0]
    assert c is not a and c.progress == a.progress
    d = schedule_node(host, nodes, model=model.clone(), positive=host.conditioning()[0])[0]
    assert d is a, "a clone with the same weights and patches shares the entry"


def test_calibration_needs_conditioning_and_json_still_wins(host, nodes):
    model = build(host, "flux")
    with pytest.raises(ValueError, match="calibration needs the 'positive' conditioning"):
        schedule_node(host, nodes, model=model)
    saved = '{"name": "mine", "depth": [0, 1], "progress": [0, 1], "ratios": [[0.1, 0.2], [0.3, 0.4]]}'
    sched = schedule_node(host, nodes, model=model, schedule_json=saved)[0]
    assert sched.name == "mine"
