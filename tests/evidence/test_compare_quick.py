"""tools/compare.py on the trained reference models: the ordering the docs claim, on a few images.

PSNR against the unpatched images of the same seeds and classes. Baselines at equal FLOPs: sampling
with fewer steps (Euler, and the second-order AB2 sampler), and a naive ToMe-style merge (fixed ratio in
every block of every step); their FLOPs are swept and PSNR interpolated at the method's FLOPs. The token
artifact ratio (tools/metrics.py) is 1 as unpatched and above 1 with per-token noise.

Claims (their thresholds live in the asserts):
- every node at its defaults, on both reference models at 10 steps and on the 64 px model at 20: a
  bounded share of the FLOPs, about as close as fewer steps at equal FLOPs, little token artifact;
- CAT beats fewer steps at equal FLOPs (Euler and AB2, 10 and 20 steps), and its forecast beats the
  paper's plain reuse;
- merging at every step leaves per-token noise the artifact ratio sees; the defaults are far closer;
- SDTM driven by a calibrated schedule beats the naive merge at equal FLOPs, and the paper's stage
  layout falls below it.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kernels.methods import SPECS
from tools import compare as C
from tools import metrics as M
from tools.report import Report

SETTINGS = C.Settings(samples=6, batch=6, sweep_samples=6, steps=10,
                      naive_sweep=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75))
DEFAULTS = [f"{spec.name} balanced (defaults)" for spec in SPECS]
EARLIER = "SDTM, every step merged (the earlier defaults)"
PLAIN_REUSE = "CAT, forecast 0 (cached noise held, as the paper)"
CALIBRATED = f"SDTM every step + calibrated ratio schedule ({100 * C.CALIBRATED_SAVINGS[0]:.0f}% of block FLOPs saved)"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(model_name: str, names, settings=SETTINGS):
    """(model, source, results) of the registry's rows `names` (and the unpatched row)."""
    model, source = C.reference_model(model_name)
    rows = [r for r in C.reference_rows(settings) if r.name == "unpatched" or r.name in names]
    assert len(rows) == len(set(names)) + 1, [r.name for r in rows]
    return model, source, C.run_reference(model, rows, settings, timing=False, kid=False)


@pytest.fixture(scope="module")
def measured():
    return run(C.DEFAULT_MODEL, [*DEFAULTS, EARLIER, PLAIN_REUSE, CALIBRATED])


def _against(measured, row: str, kind: str, settings=SETTINGS):
    """(method PSNR, the baseline's PSNR at the method's FLOPs, FLOPs fraction, source)."""
    model, source, res = measured
    base, method = res["unpatched"], res[row]
    assert base.images.shape[0] == settings.samples and torch.isfinite(method.images).all()
    assert base.psnr == float("inf") and M.ssim(base.images, base.images) == pytest.approx(1.0)
    f = method.flops / base.flops
    assert 0.3 < f < 0.8, f
    curve = C.sweep(model, base, settings, kind, near=f)
    p, (lo, hi, _) = curve.at(f)
    print(f"[{source}] {row}: FLOPs {f:.3f}, PSNR {method.psnr:.2f} dB, artifacts {method.artifact[0]:.2f}; "
          f"{curve.name} at equal FLOPs (between {lo} and {hi}): {p:.2f} dB")
    return method.psnr, p, f, source


def _check_defaults(measured, row, settings=SETTINGS):
    psnr, p_steps, f, source = _against(measured, row, "steps", settings)
    median, mean = measured[2][row].artifact
    assert f <= 0.6, f"[{source}] {row}: {f:.3f} of the FLOPs"
    assert psnr >= p_steps - 1.0, f"[{source}] {row}: {psnr:.2f} dB vs fewer steps {p_steps:.2f} dB at {f:.3f}"
    assert median <= 1.25 and mean <= 1.25, f"[{source}] {row}: artifact ratio {median:.2f} / {mean:.2f}"


def test_registry_rows_are_all_reported():
    rows = C.reference_rows()
    names = [r.name for r in rows]
    assert names[0] == "unpatched" and len(set(names)) == len(names)
    assert any(r.name.startswith("naive merge") and r.baseline for r in rows)
    fewer = [r for r in rows if r.name.startswith("fewer steps")]
    assert len(fewer) == 4 and all(r.baseline for r in fewer)
    assert sorted(r.sampler for r in fewer) == ["ab2", "ab2", "euler", "euler"]
    keys = {r.key for r in rows if r.key}
    for spec in SPECS:  # every node preset has a row the docs can quote
        assert {f"{spec.key}:{p}" for p in spec.presets} <= keys, spec.key
    assert all(r.build is not None or r.baseline for r in rows)


def test_naive_config_is_plain_tome():
    c = C.naive_config(0.5)
    assert (c.dynamic_merge, c.ratio_adjust, c.prompt_reweight, c.skip_first_blocks, c.skip_last_blocks,
            c.start_percent, c.end_percent, c.detail_cache) == (False, False, False, 0, 0, 0.0, 1.0, False)


@pytest.mark.parametrize("row", list(DEFAULTS))
def test_defaults_keep_the_picture_64px_10_steps(measured, row):
    _check_defaults(measured, row)


@pytest.mark.parametrize("row", list(DEFAULTS))
def test_defaults_keep_the_picture_128px_10_steps(row):
    _check_defaults(run("128px", [row]), row)


@pytest.mark.parametrize("row", list(DEFAULTS))
def test_defaults_keep_the_picture_64px_20_steps(row):
    settings = dataclasses.replace(SETTINGS, steps=20)
    _check_defaults(run(C.DEFAULT_MODEL, [row], settings), row, settings)


def test_merging_every_step_leaves_token_noise_the_defaults_do_not(measured):
    _, source, res = measured
    earlier, defaults = res[EARLIER], res["SDTM balanced (defaults)"]
    assert res["unpatched"].artifact == (pytest.approx(1.0), pytest.approx(1.0))
    assert earlier.artifact[0] > 2.0, f"[{source}] every-step merging: artifact ratio {earlier.artifact[0]:.2f}"
    assert defaults.psnr > earlier.psnr + 5.0, f"[{source}] {defaults.psnr:.2f} vs {earlier.psnr:.2f} dB"


def test_cat_forecast_beats_plain_reuse(measured):
    """Same tokens, same FLOPs: moving the cached noise along the last full steps' trend instead of holding
    it (the paper's reuse)."""
    _, source, res = measured
    on, off = res["CAT balanced (defaults)"], res[PLAIN_REUSE]
    assert on.flops == off.flops
    assert on.psnr > off.psnr + 1.0, f"[{source}] forecast {on.psnr:.2f} dB vs plain reuse {off.psnr:.2f} dB"


@pytest.mark.parametrize("steps", [10, 20])
def test_cat_beats_fewer_steps_at_equal_flops(measured, steps):
    """Fewer steps with the same (Euler) sampler, and with the second-order AB2 sampler (a multistep
    sampler makes up part of what fewer steps lose)."""
    cat = "CAT balanced (defaults)"
    settings = dataclasses.replace(SETTINGS, steps=steps)
    result = measured if steps == SETTINGS.steps else run(C.DEFAULT_MODEL, [cat], settings)
    for kind in ("steps", "steps-ab2"):
        psnr, p_steps, f, source = _against(result, cat, kind, settings)
        assert psnr > p_steps + 1.0, f"[{source}] CAT {psnr:.2f} dB vs {kind} {p_steps:.2f} dB at {f:.3f}"


def test_calibrated_schedule_beats_naive_merge_at_equal_flops(measured):
    psnr, p_naive, f, source = _against(measured, CALIBRATED, "naive")
    assert psnr > p_naive + 1.0, f"[{source}] calibrated {psnr:.2f} dB vs naive merge {p_naive:.2f} dB at {f:.3f}"


def test_sdtm_paper_layout_falls_below_the_naive_merge():
    """With the paper's stage layout (merging from the first step, structure stage until 40%, skipped first
    and last blocks) SDTM falls below a plain merge at the same FLOPs on these models."""
    name = "SDTM, paper's stage layout (from step 1, switch 0.4, skip 1/1, no detail cache)"
    p_paper, p_naive, f, source = _against(run(C.DEFAULT_MODEL, [name]), name, "naive")
    assert p_paper < p_naive, f"[{source}] paper layout {p_paper:.2f} dB vs naive merge {p_naive:.2f} dB at {f:.3f}"


def test_curve_interpolates_psnr_and_kid_alike():
    curve = C.Curve("fewer steps (count)", [(0.4, 25.0, "4"), (0.5, 27.0, "5")], {"4": 0.003, "5": 0.001})
    assert curve.at(0.45) == (pytest.approx(26.0), ("4", "5", pytest.approx(0.5)))
    assert curve.at(0.45, "kid")[0] == pytest.approx(0.002)
    assert curve.at(0.6) is None and curve.at(0.6, "kid") is None
    assert C.Curve("no KID", [(0.4, 25.0, "4"), (0.5, 27.0, "5")]).at(0.45, "kid") is None


def test_quick_run_reports_kid_at_equal_flops(tmp_path):
    """The whole reference section, quick: every method row gets a KID and a fewer-steps KID at its FLOPs.
    The KID table is printed from KID_MIN_IMAGES images per sweep point on; quick has fewer and says so."""
    out = C.main(["--quick", "--sections", "reference", "--steps", "4", "--out", str(tmp_path / "r.md")])
    ref = out["reference"]
    text = (tmp_path / "r.md").read_text()
    assert "### (a) Fidelity at equal FLOPs" in text and "KID at equal FLOPs: not shown for 2 images" in text
    assert "token artifact ratio (median / mean)" in text and "| unpatched |" in text
    assert json.loads((tmp_path / "r.json").read_text())["rows"], "the numbers beside the page, for tools/docs.py"
    for r in ref["results"].values():
        if r.row.missing is None and r.error is None:
            assert all(a == a and a > 0 for a in r.artifact), r.row.name
    rep = Report()
    C.report_equal_flops(rep, ref["curves"], ref["equal_flops"], C.Settings(samples=64, sweep_samples=64))
    shown = "\n".join(rep.lines)
    assert "### (a) KID at equal FLOPs (x1e3, first 64 images" in shown
    assert all(len(c.kids) == len(c.points) for c in ref["curves"])
    assert [c.name for c in ref["curves"]] == list(C.CURVE_NAMES.values())
    for e in ref["equal_flops"]:
        assert e["kid"] is not None and e["kid"] == e["kid"], e["name"]
        hit = e["kid_curves"]["fewer steps (count)"]
        assert hit is None or hit[0] == hit[0], e["name"]
        assert e["name"] in text and e["name"] in shown.split("### (a) KID at equal FLOPs")[1]
