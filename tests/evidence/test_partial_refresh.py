"""tools/refresh_ceiling.py on the trained 64 px reference model, a few held-out images
(docs/evidence/refresh-ceiling-28steps.md holds the whole split and the 128 px model).

Claims (docs/evidence.md, "What was tried to make the token work pay"): between a plain step cache's full
steps, exact values on a share of the tokens drawn at random make the picture worse than the forecast alone;
the tokens the forecast misses most help, but no method can know them, and those it missed most at the last
full step (which a method can know) help less.
"""
from __future__ import annotations

import dataclasses

import pytest

from tools import cache_bar as B
from tools import refresh_ceiling as RC
from tools import step_cache as SC

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELD_OUT = dataclasses.replace(B.SPLITS["held-out"], name="held-out-subset",
                               batches=B.SPLITS["held-out"].batches[:2])  # 4 of its 16 images
LAYOUT = SC.Layout(8, 3)  # CAT balanced's full steps at 28 steps


@pytest.fixture(scope="module")
def psnr(tmp_path_factory):
    setup = B.Setup("64px", HELD_OUT, 28, B.CFG, tmp_path_factory.mktemp("ceiling"))

    def run(part):
        build = ((lambda model: SC.StepCache(LAYOUT).options()) if part is None else
                 (lambda model: RC.OracleRefresh(LAYOUT, part, model.patch_size).options()))
        return B.measure(setup, build, flops_share=0.0)["psnr"]
    out = {"cache": run(None)}
    out.update({choice: run(RC.exact_share(0.2, choice)) for choice in RC.CHOICES})
    print(out)
    return out


def test_exact_tokens_at_random_make_the_picture_worse_than_the_forecast(psnr):
    assert psnr["random"] < psnr["cache"] - 0.3


def test_only_the_tokens_missed_now_lift_the_picture_clearly(psnr):
    assert psnr["missed now"] > psnr["cache"] + 0.3
    assert psnr["missed before"] < psnr["missed now"] - 0.3
