"""tools/cache_bar.py on the trained 64 px reference model: the orderings the README's tables claim, on a few
held-out images (docs/evidence/step-cache-*steps.md hold the whole split).

Claims (README "Which node for which goal" and "Few-step models"):
- at 28 steps every node's balanced preset is well above the median plain step cache at no more work;
- but a plain step cache with its full steps well placed keeps the picture about as well at no more work
  (the best such cache is not far below the preset, or above it);
- at 4 steps every balanced preset does worse than simply sampling fewer steps at no more work.
"""
from __future__ import annotations

import dataclasses

import pytest

from kernels.methods import SPECS
from tools import cache_bar as B

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELD_OUT = dataclasses.replace(B.SPLITS["held-out"], name="held-out-subset",
                               batches=B.SPLITS["held-out"].batches[:2])  # 4 of its 16 images
BALANCED = [f"{spec.key}:balanced" for spec in SPECS]


def bar(tmp_path_factory, steps: int, cfg: float) -> list[dict]:
    setup = B.Setup("64px", HELD_OUT, steps, cfg, tmp_path_factory.mktemp(f"bar{steps}"))
    table = B.cache_table(setup, log=lambda *_: None)
    known = B.candidates(steps, cfg)
    return [B.evaluate(setup, name, known[name], table) for name in BALANCED]


@pytest.fixture(scope="module")
def at_28(tmp_path_factory):
    return bar(tmp_path_factory, 28, B.CFG)


def test_balanced_presets_beat_the_median_step_cache(at_28):
    for r in at_28:
        print(f"{r['name']}: {r['flops']:.3f} of the work, {r['psnr']:.2f} dB; median cache {r['median']:.2f}, "
              f"best {r['best']:.2f} ({r['best_layout']})")
        assert r["caches"] >= 10, r
        assert r["over_median"] >= 1.0, r


def test_a_well_placed_step_cache_keeps_the_picture_as_well(at_28):
    for r in at_28:
        assert r["over_best"] <= 0.5, r


def test_at_four_steps_fewer_steps_is_the_better_choice(tmp_path_factory):
    for r in bar(tmp_path_factory, 4, 4.0):
        assert min(r["over_euler"], r["over_ab2"]) < 0.0, r
