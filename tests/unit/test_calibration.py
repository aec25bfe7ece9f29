"""Core tests of kernels/calibration.py, and calibration end to end on the embedded reference model.

The end-to-end model has random weights: beating a constant ratio at equal block FLOPs there shows the
allocator works; what it gains on the trained models is in docs/schedule.md and tests/evidence.
"""
from __future__ import annotations

import re

import pytest
import torch

from kernels.flops import block_flops
from kernels.calibration import (RATIO_OPTIONS, CalibrationCache, RedundancyProbe, allocate, calibrate,
                                 constant_ratio_for_saving, merge_errors, remaining_weights)
from kernels.token_ops import bipartite_merge_plan
from kernels.schedule import TokenRatioSchedule
from kernels.sdtm import EVERY_STEP_MERGED, SDTM, SDTMConfig
from tools import reference_dit as R

CFG = R.DiTConfig(image_size=32, hidden=64, heads=2, axes_dim=(8, 12, 12), depth_double=2, depth_single=4)
CLASSES = [0, 1, 2, 3]
STEPS = 8
N_IMG = 256


def test_block_flops_match_torch_flop_counter():
    """The one FLOPs formula (families.block_flops) against torch's count of real reference blocks."""
    model = R.ReferenceDiT(CFG).init_weights(0)
    for tokens in (20, 260):
        x = torch.randn(1, tokens, CFG.hidden)
        vec = torch.randn(1, CFG.hidden)
        pe = model.pe_embedder(torch.zeros(1, tokens, 3))
        double, single = model.double_blocks[0], model.single_blocks[0]
        for run, modulation in ((lambda: double(x[:, 4:], x[:, :4], vec, pe), (double.img_mod, double.txt_mod)),
                                (lambda: single(x, vec, pe), (single.modulation,))):
            with R.flop_counter() as fc:
                run()
            with R.flop_counter() as per_sequence:  # adaLN modulation: once per sequence, not per token
                for m in modulation:
                    m(vec)
            assert fc.get_total_flops() - per_sequence.get_total_flops() == block_flops(tokens, CFG.hidden,
                                                                                        CFG.mlp_ratio)


def test_merge_errors_are_the_group_mean_update_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 8, generator=g)
    delta = torch.randn(2, 48, 8, generator=g)
    errs = merge_errors(x, delta, (6, 8), RATIO_OPTIONS, seed=3)
    assert errs[0] == 0.0 and all(e > 0 for e in errs[1:])
    assert errs == sorted(errs), "merging more tokens costs more"
    plan = bipartite_merge_plan(x, (6, 8), (2, 2), int(0.5 * 48), 3)
    direct = 0.0
    for b in range(2):
        for slot in range(plan.n_out):
            members = delta[b, plan.assign[b] == slot]
            direct += float((members - members.mean(0)).pow(2).sum())
    assert errs[RATIO_OPTIONS.index(0.5)] == pytest.approx(direct, rel=1e-4)
    # tokens that share their update cost nothing to merge
    assert merge_errors(x, torch.ones(2, 48, 8), (6, 8), RATIO_OPTIONS) == [0.0] * len(RATIO_OPTIONS)


def _synthetic_probe(errors: dict, n_img=64, width=32):
    p = RedundancyProbe()
    p.n_img, p.width = n_img, width
    for key, scale in errors.items():
        p.errors[key] = [scale * r * r for r in RATIO_OPTIONS]  # convex in the ratio
        p.energy[key] = 1.0
    return p


def test_allocate_compresses_the_cheapest_cells_first_and_meets_the_target():
    cheap, dear = 1.0, 50.0
    errors = {(b, p): (cheap if b == 2 else dear) for b in range(4) for p in (0.0, 0.5)}
    probe = _synthetic_probe(errors)
    result = allocate(probe, num_blocks=5, n_txt=8, target_saving=0.1, protect_first=1)
    r = result.cell_ratio
    assert r[(2, 0.0)] > 0 and r[(2, 0.0)] >= r[(1, 0.0)] and r[(2, 0.5)] >= r[(3, 0.5)]
    assert r[(0, 0.0)] == 0 and r[(0, 0.5)] == 0, "protected first block"
    assert result.schedule.ratio(1.0, 0.0) == 0.0, "the last block (never probed) stays dense"
    # the cost model's saving is the target, up to one option step of one cell
    full = block_flops(64 + 8, 32)
    step = (full - block_flops(64 - int(0.1 * 64) + 8, 32)) / (full * 5 * 2)
    assert 0.1 <= result.predicted_saving <= 0.1 + 3 * step
    # the table reproduces the chosen ratios at every block depth and step
    for (b, p), ratio in r.items():
        assert result.schedule.ratio(b / 4, p) == pytest.approx(ratio)


def test_allocate_weights_steps():
    errors = {(b, p): 1.0 for b in range(1, 3) for p in (0.0, 0.5)}
    probe = _synthetic_probe(errors)
    # a step that counts 100x more (bigger sigma step) is compressed less
    res = allocate(probe, 3, 8, 0.15, step_weights={0.0: 100.0, 0.5: 1.0})
    assert res.cell_ratio[(1, 0.5)] > res.cell_ratio[(1, 0.0)]
    with pytest.raises(ValueError, match="target FLOPs saving"):
        allocate(probe, 3, 8, 1.2)
    with pytest.raises(ValueError, match="saw no block calls"):
        allocate(RedundancyProbe(), 3, 8, 0.2)


def test_step_weights_and_constant_ratio():
    assert remaining_weights([0.0, 0.5, 0.75]) == pytest.approx({0.0: 1.0, 0.5: 0.25, 0.75: 0.0625})
    # by default a later step's error weighs less, so it is compressed more
    errors = {(b, p): 1.0 for b in range(0, 2) for p in (0.0, 0.5)}
    res = allocate(_synthetic_probe(errors), 3, 8, 0.15)
    assert res.cell_ratio[(0, 0.5)] > res.cell_ratio[(0, 0.0)], "the first block is not protected by default"
    r = constant_ratio_for_saving(0.3, 256, 4, 64, num_blocks=6)
    full = block_flops(256 + 4, 64)
    saved = 5 * (full - block_flops(256 - int(r * 256) + 4, 64)) / (6 * full)  # every block but the last
    assert saved == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="cannot save"):
        constant_ratio_for_saving(0.9, 256, 4, 64, num_blocks=6)


def test_cache_is_a_small_lru():
    c = CalibrationCache(size=2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3


# ---- end to end on the reference model -------------------------------------------------------

@pytest.fixture(scope="module")
def model(one_torch_thread):
    m, _ = R.build_model(CFG, seed=0, weights=None)
    return m


def _block_flops(model, options):
    with R.flop_counter() as fc:
        R.sample(model, CLASSES, steps=STEPS, seed=0, transformer_options=options)
    return sum(sum(v.values()) for k, v in fc.get_flop_counts().items() if re.search(r"_blocks\.\d+$", k))


def _calibrate(model, target):
    def run_pass(probe):
        R.sample(model, CLASSES, steps=STEPS, seed=100, transformer_options=R.method_options(probe, model, "cal"))
    return calibrate(run_pass, model.family().num_blocks, CFG.txt_len, target)


def test_probe_changes_nothing(model):
    base = R.sample(model, CLASSES[:2], steps=2, seed=0)
    probe = RedundancyProbe()
    out = R.sample(model, CLASSES[:2], steps=2, seed=0, transformer_options=R.method_options(probe, model, "cal"))
    assert torch.equal(out, base)
    # every block but the last, at both steps, was measured
    assert sorted(probe.errors) == [(b, p) for b in range(5) for p in (0.0, 0.5)]


@pytest.mark.parametrize("target", [0.3])
def test_calibrated_schedule_meets_target_and_beats_constant(model, target):
    cal = _calibrate(model, target)
    # The schedule decides every step; the last block dense, as the calibration and the constant ratio
    # below assume.
    sdtm = SDTMConfig(**{**EVERY_STEP_MERGED, "ratio": 0.5, "ratio_adjust": False, "start_percent": 0.0,
                         "skip_last_blocks": 1})
    base = R.sample(model, CLASSES, steps=STEPS, seed=0)
    base_flops = _block_flops(model, None)
    saved = 1 - _block_flops(model, R.method_options(SDTM(sdtm, cal.schedule), model)) / base_flops
    assert abs(saved - target) <= 0.05 * target, saved
    r = constant_ratio_for_saving(saved, N_IMG, CFG.txt_len, CFG.hidden, model.family().num_blocks)
    const = TokenRatioSchedule(depth=[0.0, 1.0], progress=[0.0, 1.0], ratios=[[r, r], [r, r]])
    saved_const = 1 - _block_flops(model, R.method_options(SDTM(sdtm, const), model)) / base_flops
    assert abs(saved_const - saved) <= 0.01, "equal FLOPs"
    out = R.sample(model, CLASSES, steps=STEPS, seed=0, transformer_options=R.method_options(SDTM(sdtm, cal.schedule),
                                                                                            model))
    out_c = R.sample(model, CLASSES, steps=STEPS, seed=0, transformer_options=R.method_options(SDTM(sdtm, const),
                                                                                              model))
    err = float((out - base).norm() / base.norm())
    err_c = float((out_c - base).norm() / base.norm())
    # 0.95: a margin well inside the one measured at this seed
    assert err < 0.95 * err_c, (err, err_c)
