"""The plain step caches (tools/step_cache.py) and the step-cache bar (tools/cache_bar.py), on a small
random-init reference model: which steps call the model, what a skipped step returns, what a layout costs."""
from __future__ import annotations

import pytest
import torch

from kernels.forecast import Trend
from tools import cache_bar as CB
from tools import reference_dit as R
from tools import step_cache as SC

CFG = R.DiTConfig(image_size=32, hidden=64, heads=2, axes_dim=(8, 12, 12), depth_double=1, depth_single=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return R.build_model(CFG, seed=0, weights=None)[0]


def test_layout_full_steps_are_the_warm_up_then_one_in_every():
    layout = SC.Layout(warmup=3, every=3)
    assert [i for i in range(12) if layout.is_full(i)] == [0, 1, 2, 5, 8, 11]
    assert layout.full_steps(12) == 6 and layout.name == "warm-up 3, every 3"


def test_layouts_list_each_distinct_layout_once():
    assert len(SC.layouts(28)) == 13 * 5  # w 2..14, r 2..6: all distinct at 28 steps
    assert max(lay.warmup for lay in SC.layouts(50)) == 25 and max(lay.warmup for lay in SC.layouts(12)) == 10
    short = SC.layouts(4)
    masks = [tuple(lay.is_full(i) for i in range(4)) for lay in short]
    assert len(masks) == len(set(masks)) == 3 and all(lay.warmup < 4 for lay in short)


class Spy:
    """An inner wrapper that records the sigma of every model call that really runs."""

    def __init__(self):
        self.sigmas = []

    def __call__(self, call_next, x, sigma, class_ids, options):
        self.sigmas.append(float(sigma))
        return call_next(x, sigma, class_ids, options)


@pytest.mark.parametrize("order", [1, 2])
def test_a_cache_calls_the_model_on_its_full_steps_only(model, order):
    steps, layout = 10, SC.Layout(3, 3)
    spy = Spy()
    options = SC.StepCache(layout, order=order).options({R.MODEL_WRAPPERS_KEY: [spy]})
    out = R.sample(model, [0, 1], steps=steps, cfg=3.0, seed=0, transformer_options=options)
    assert spy.sigmas == [s for i, s in enumerate(R.sigmas(steps)[:-1]) if layout.is_full(i)]
    assert torch.isfinite(out).all()
    assert not torch.equal(out, R.sample(model, [0, 1], steps=steps, cfg=3.0, seed=0))


def test_a_cache_that_never_skips_is_the_unpatched_model(model):
    options = SC.StepCache(SC.Layout(10, 2)).options()
    assert torch.equal(R.sample(model, [0], steps=6, cfg=3.0, seed=1, transformer_options=options),
                       R.sample(model, [0], steps=6, cfg=3.0, seed=1))


def test_a_skipped_step_carries_each_row_along_the_packs_trend(model):
    """Order 1 is kernels.forecast.Trend per batch row, at the cache's damping."""
    cache = SC.StepCache(SC.Layout(3, 4), forecast=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 1])
    options = cache.options()
    trends = [Trend(), Trend()]
    with torch.inference_mode():
        for sigma in (1.0, 0.9, 0.8):
            full = R.model_call(model, x, sigma, ids, options)
            for t, o in zip(trends, full.unbind(0)):
                t.record(o, sigma, 0.5)
        skipped = R.model_call(model, x, 0.7, ids, options)
    expected = torch.stack([t.carry(t.full, t.sigma, 0.7, 0.5) for t in trends])
    assert torch.allclose(skipped, expected) and not torch.equal(skipped, trends[0].full.expand_as(skipped))


def test_the_second_order_forecast_is_exact_on_a_quadratic_when_undamped():
    """Three full outputs after the first lie on a quadratic in sigma: undamped, the forecast is exact; the
    run's first output starts no trend (held alone), and two give the line through them."""
    taylor = SC.Taylor((1.0, 1.0))
    f = lambda s: torch.tensor([1.0 + 2.0 * s - 3.0 * s * s])  # noqa: E731
    taylor.record(torch.tensor([100.0]), 1.0)          # the first full step: ignored by the trend
    assert torch.equal(taylor.carry(0.5), torch.tensor([100.0]))
    taylor.record(f(0.9), 0.9)
    taylor.record(f(0.8), 0.8)
    line = f(0.8) + (f(0.8) - f(0.9)) / (0.8 - 0.9) * (0.5 - 0.8)
    assert torch.allclose(taylor.carry(0.5), line)
    taylor.record(f(0.7), 0.7)
    assert torch.allclose(taylor.carry(0.4), f(0.4), atol=1e-5)


def test_a_replayed_warm_up_is_the_computed_one_bit_for_bit(model):
    """SharedWarmup serves the recorded unpatched calls to every layout (fewer calls), and the images are the same."""
    steps, layout, replay = 10, SC.Layout(4, 3), SC.SharedWarmup()
    R.sample(model, [0, 1], steps=steps, cfg=3.0, seed=0, transformer_options=SC.StepCache(SC.Layout(6, 99)).options(
        replay.options()))
    replay.recording = False
    spy = Spy()
    replayed = SC.StepCache(layout).options({R.MODEL_WRAPPERS_KEY: [replay, spy]})
    out = R.sample(model, [0, 1], steps=steps, cfg=3.0, seed=0, transformer_options=replayed)
    assert spy.sigmas == [s for i, s in enumerate(R.sigmas(steps)[:-1]) if layout.is_full(i) and i >= 6]
    assert torch.equal(out, R.sample(model, [0, 1], steps=steps, cfg=3.0, seed=0,
                                     transformer_options=SC.StepCache(layout).options()))
    other_seed = SC.StepCache(layout).options({R.MODEL_WRAPPERS_KEY: [replay, spy]})
    spy.sigmas.clear()
    R.sample(model, [0, 1], steps=steps, cfg=3.0, seed=1, transformer_options=other_seed)
    assert len(spy.sigmas) == layout.full_steps(steps)  # another noise: nothing to replay


def test_a_layout_costs_its_full_steps(model):
    steps, layout = 8, SC.Layout(2, 3)
    with R.flop_counter() as fc:
        R.sample(model, [0], steps=steps, cfg=3.0, seed=0)
    full = fc.get_total_flops()
    with R.flop_counter() as fc:
        R.sample(model, [0], steps=steps, cfg=3.0, seed=0, transformer_options=SC.StepCache(layout).options())
    assert fc.get_total_flops() * steps == full * layout.full_steps(steps)


def test_order_must_be_one_or_two():
    with pytest.raises(ValueError, match="order"):
        SC.StepCache(SC.Layout(2, 2), order=3)


def test_the_splits_share_no_seed_and_no_class():
    tuning, held = CB.SPLITS["tuning"], CB.SPLITS["held-out"]
    assert not {s for s, _ in tuning.batches} & {s for s, _ in held.batches}
    assert not {c for _, cs in tuning.batches for c in cs} & {c for _, cs in held.batches for c in cs}
    assert held.images >= tuning.images >= 8


TABLE = [{"warmup": 2, "every": 2, "flops": 0.5, "psnr": 30.0}, {"warmup": 4, "every": 3, "flops": 0.4, "psnr": 28.0},
         {"warmup": 3, "every": 4, "flops": 0.3, "psnr": 24.0}, {"warmup": 6, "every": 2, "flops": 0.6, "psnr": 40.0}]


def test_a_candidate_is_held_against_the_caches_no_dearer_than_itself():
    r = {"flops": 0.5, "psnr": 31.0, "artifacts": 1.0}
    r.update(CB.against_caches(r, TABLE))
    assert (r["caches"], r["median"], r["best"], r["best_layout"]) == (3, 28.0, 30.0, "w2 r2")
    assert r["over_median"] == 3.0 and r["over_best"] == 1.0 and CB.meets_bar(r)
    assert not CB.meets_bar({**r, "artifacts": 1.3})
    assert not CB.meets_bar({**r, "over_best": -0.1})
    assert not CB.meets_bar({**r, "over_median": 0.9})
    cheap = {"flops": 0.2, "psnr": 50.0, "artifacts": 1.0}
    cheap.update(CB.against_caches(cheap, TABLE))
    assert cheap == {"flops": 0.2, "psnr": 50.0, "artifacts": 1.0, "caches": 0} and not CB.meets_bar(cheap)


def test_fewer_steps_at_equal_flops_interpolates_between_step_counts(monkeypatch):
    """At a share between k and k + 1 steps of 10, fewer steps' PSNR is linear between theirs; at a whole
    count it is that count's; below one step or past steps - 1 there is none."""
    setup = type("S", (), {"steps": 10})()
    psnr = {k: 20.0 + 2.0 * k for k in range(1, 10)}

    def fewer(setup_, share, sampler):
        import math
        k = min(math.floor(share * setup_.steps + 1e-9), setup_.steps - 1)
        return None if k < 1 else {"steps": k, "psnr": psnr[k]}
    monkeypatch.setattr(CB, "fewer_steps", fewer)
    assert CB.fewer_steps_at(setup, 0.5, "euler") == psnr[5]
    assert CB.fewer_steps_at(setup, 0.525, "euler") == pytest.approx(psnr[5] + 0.25 * (psnr[6] - psnr[5]))
    assert CB.fewer_steps_at(setup, 0.05, "euler") is None
    assert CB.fewer_steps_at(setup, 0.95, "euler") is None


def test_the_bars_candidates_are_every_preset_and_comparison_of_the_registry():
    from kernels.methods import SPECS
    from tools import compare
    known = CB.candidates(steps=10, cfg=3.0)
    assert {f"{s.key}:{p}" for s in SPECS for p in s.presets} <= set(known)
    assert {CB.slug(compare.comparison_name(s, label)) for s in SPECS for label in s.comparisons} <= set(known)
    assert all(" " not in name for name in known)


def test_cache_bar_refuses_bad_arguments_in_one_line(capsys):
    for argv, words in ((["--candidates", "nope"], "unknown candidate nope"), (["--steps", "2"], "--steps"),
                        (["--model", "1px"], "unknown 1px")):
        with pytest.raises(SystemExit):
            CB.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
