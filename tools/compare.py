"""Side-by-side comparison: every token-reduction method against the baselines users would reach for.

    python tools/compare.py                 # full run: 256 images per row on the reference model
    python tools/compare.py --quick         # reduced samples and repeats (about 2 minutes on 2 cores)
    python tools/compare.py --samples 512 --sections reference --out compare.md
    python tools/compare.py --device cuda   # reference model on the GPU; full-size wall time (benchmark.py)

One table per model. Rows come from a registry (`reference_rows`, `host_rows`): a name and a
function that returns what the sampler needs (transformer_options for tools/reference_dit.sample,
a patched ModelPatcher for ComfyUI). A method added to the pack adds one entry. Entries whose
module is missing are printed as "not available" with the reason, never dropped silently.

(a) Reference model (tools/reference_dit.build_model(): the trained weights when
    tools/weights/reference_dit.safetensors exists, else seeded random init of the training
    config, labelled as such). Columns: FLOPs per image (torch FlopCounterMode over one sampling
    run of one image, CFG's unconditional half included), wall time (median of interleaved
    repeats, ratio to the unpatched row of the same run), peak memory of one timed run (CPU: peak
    of torch.profiler's recorded tensor allocations minus frees, weights excluded; CUDA:
    max_memory_allocated above what was held), PSNR and SSIM against the unpatched images of the
    same seed and class (tools/metrics.py), KID against an independent set of unpatched samples
    (other seeds; the unpatched row's own KID is the noise floor).
    Then "fidelity at equal FLOPs": the naive merge's ratio and the step count are swept, and the
    PSNR and KID of those baselines are interpolated (linearly in FLOPs) at each method's FLOPs
    (both on the first --sweep-samples images of every row; KID wants a few hundred). And the plain step
    caches (tools/step_cache.py, every layout, the pack's forecast and a second-order one): per method row the
    median and the best layout whose FLOPs are no higher (issue 22's bar).
(b) Tiny ComfyUI models (tools/comfy_host.py builders, random weights) through comfy.sample.sample,
    with the pack's own node and ComfyUI's EasyCache (LazyCache on SD3, which has no
    DIFFUSION_MODEL wrapper) and one stack. PSNR on latents, scaled by the unpatched latents'
    range; random weights, so fidelity here shows how far a method moves the network, not quality.
(c) Full-size Flux-dev and SD3.5-large (random weights on the meta device): FLOPs per image from
    tools/benchmark.py's counting; wall time only with --device cuda (benchmark.run_full_size).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from kernels.methods import BY_KEY, SPECS  # noqa: E402
from kernels.runtime import RUNS_KEY  # noqa: E402
from kernels.sdtm import SDTM, SDTMConfig  # noqa: E402
from tools import benchmark as B  # noqa: E402
from tools import cli  # noqa: E402
from tools.report import Report, peak_memory, sync  # noqa: E402
from tools import metrics as M  # noqa: E402
from tools import reference_dit as R  # noqa: E402
from tools import step_cache  # noqa: E402



def comparison_name(spec, label: str) -> str:
    """A row of a method's named comparison settings (MethodSpec.comparisons)."""
    return f"{spec.name}, {label}"


# The rows that show where the presets' fidelity comes from; tools/docs.py quotes them in the README.
MERGED_CALLS_IGNORED = comparison_name(BY_KEY["sdtm"], "merged calls ignored (detail_weight 0)")
REUSE_ONLY = comparison_name(BY_KEY["cat"], "ratio 0.99 (reuse between full steps only)")
# Calibrated schedules drive every step's merging: the schedule node's default target and an aggressive one.
CALIBRATED_SAVINGS = (0.4, 0.55)
NAIVE_RATIO = 0.5
STEP_FRACTIONS = (0.6, 0.5)
# Plain step caches (tools/step_cache.py), every layout: kind -> (label, forecast order, damping). The
# second-order one is in the spirit of TaylorSeer, damped as the pack's forecast.
CACHE_SWEEPS = {"cache": ("plain step cache (the pack's forecast)", 1, 0.5),
                "cache-taylor": ("second-order step cache (TaylorSeer-style)", 2, 0.5)}


def naive_config(ratio: float) -> SDTMConfig:
    """ToMe-style merge: bipartite matching at one fixed ratio in every block of every step, no DTM / CRA /
    PR, no detail cache."""
    return SDTMConfig(ratio=ratio, deviation=0.0, window=2, dynamic_merge=False, ratio_adjust=False,
                      prompt_reweight=False, skip_first_blocks=0, skip_last_blocks=0, start_percent=0.0,
                      detail_cache=False)


# ---- the row registry ---------------------------------------------------------------------------------

@dataclass
class Row:
    """One table row. `build(model)` returns the sampler's patch (None: unpatched)."""

    name: str
    build: Callable | None = None
    key: str = ""                 # method/preset id quoted by the docs (e.g. "sdtm:balanced"), or ""
    steps: float = 1.0            # fraction of the sampling steps
    sampler: str = "euler"        # reference_dit.sample's sampler (the unpatched reference is euler)
    baseline: bool = False        # a baseline to beat, not a method of the pack
    missing: str | None = None    # why the row is not available


def sdtm_row(name: str, config: SDTMConfig, baseline: bool = False, schedule=None) -> Row:
    return Row(name, lambda model: R.method_options(SDTM(config, schedule), model, "sdtm"), baseline=baseline)


def calibrated_schedule(model, s: "Settings", saving: float = 0.4):
    """kernels.calibration on the reference model, as the schedule node does it (one unpatched probe
    pass; classes 0-3, noise seed 100, not an evaluation seed), for the sampler settings `s`; cached."""
    from kernels.calibration import calibrate
    key = (id(model), s.steps, s.cfg, saving)
    if key not in _CALIBRATED:
        def run_pass(probe):
            R.sample(model, [0, 1, 2, 3], steps=s.steps, cfg=s.cfg, seed=100, device=s.device,
                     transformer_options=R.method_options(probe, model, "calibration"))
        _CALIBRATED[key] = calibrate(run_pass, model.family().num_blocks, model.config.txt_len, saving).schedule
    return _CALIBRATED[key]


_CALIBRATED: dict = {}


def method_row(name: str, make: Callable, key: str = "") -> Row:
    """A row for the method `make(model)` returns, on the reference model; `key` names a node preset."""
    return Row(name, lambda model: R.method_options(make(model), model, "method"), key=key)


def preset_rows() -> list[Row]:
    """Every node preset, keyed for the docs ("sdtm:balanced" is the node's defaults)."""
    return [method_row(f"{spec.name} {preset}" + (" (defaults)" if preset == "balanced" else ""),
                       lambda model, spec=spec, preset=preset: spec.build(preset), key=f"{spec.key}:{preset}")
            for spec in SPECS for preset in spec.presets]


def comparison_rows() -> list[Row]:
    """Every method's named comparison settings."""
    return [method_row(comparison_name(spec, label), lambda model, spec=spec, c=overrides: spec.with_settings(c))
            for spec in SPECS for label, overrides in spec.comparisons.items()]


def reference_rows(s: "Settings | None" = None) -> list[Row]:
    s = s or Settings()
    rows = [Row("unpatched", baseline=True)]
    rows += [Row(f"fewer steps ({int(100 * f)}%)", steps=f, baseline=True) for f in STEP_FRACTIONS]
    rows += [Row(f"fewer steps ({int(100 * f)}%), second-order sampler (AB2)", steps=f, sampler="ab2",
                 baseline=True) for f in STEP_FRACTIONS]
    rows.append(sdtm_row(f"naive merge (ToMe-style, ratio {NAIVE_RATIO}, every block of every step)",
                         naive_config(NAIVE_RATIO), baseline=True))
    rows += preset_rows()
    rows += comparison_rows()
    every_step = SDTMConfig(**{**BY_KEY["sdtm"].every_step, "start_percent": 0.0})
    for saving in CALIBRATED_SAVINGS:
        rows.append(method_row(f"SDTM every step + calibrated ratio schedule ({100 * saving:.0f}% of block FLOPs "
                               "saved)", lambda m, saving=saving: SDTM(every_step, calibrated_schedule(m, s, saving))))
    return rows


# ---- reference model ----------------------------------------------------------------------------------

@dataclass
class Settings:
    steps: int = 10               # Euler steps of the unpatched run
    cfg: float = 3.0
    samples: int = 256            # images per row (PSNR, SSIM, KID)
    batch: int = 32               # images per sampling call; noise seed = seed + chunk index
    sweep_samples: int = 64       # first images used for the equal-FLOPs sweep
    time_images: int = 4          # images per timed run
    repeats: int = 3
    kid_subsets: int = 100
    seed: int = 0
    naive_sweep: tuple = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75)
    step_fractions: tuple | None = None   # swept step counts as fractions; default every count from 30% to steps - 1
    cache_sweeps: tuple = tuple(CACHE_SWEEPS)   # plain step caches over every layout (CACHE_SWEEPS)
    device: str = "cpu"


QUICK = dict(samples=4, batch=4, sweep_samples=2, time_images=1, repeats=1, kid_subsets=10,
             naive_sweep=(0.2, 0.4, 0.6, 0.75), step_fractions=(0.3, 0.5, 0.6, 0.8))


REFERENCE_MODELS = R.MODELS
DEFAULT_MODEL = "64px"


def reference_model(name: str = DEFAULT_MODEL):
    """(model, source): trained weights if present, else seeded random init of the model's training config,
    labelled as not trained."""
    path = REFERENCE_MODELS[name]
    if path.is_file():
        return R.build_model(weights=path)
    model, source = R.build_model(R.MODEL_CONFIGS[name], seed=0, weights=None)
    return model, f"{source}: the {name} weights are not trained yet (tools/weights/README.md)"


def row_steps(row: Row, s: Settings) -> int:
    return max(1, round(s.steps * row.steps))


def class_ids(n: int, num_classes: int) -> list[int]:
    return [i % num_classes for i in range(n)]


def _tokens(to) -> tuple[int, int]:
    runs = (to or {}).get(RUNS_KEY, {})
    return sum(r.stats.tokens_computed for r in runs.values()), sum(r.stats.tokens_in for r in runs.values())


def generate(model, row: Row, s: Settings, n: int, seed_offset: int = 0):
    """(images (n, C, H, W), image tokens computed / in) for the first n images of the row."""
    ids = class_ids(n, model.config.num_classes)
    out, comp, tin = [], 0, 0
    for j, start in enumerate(range(0, n, s.batch)):
        to = row.build(model) if row.build else None
        out.append(R.sample(model, ids[start:start + s.batch], steps=row_steps(row, s), cfg=s.cfg,
                            seed=s.seed + seed_offset + j, transformer_options=to, device=s.device,
                            sampler=row.sampler).cpu())
        c, i = _tokens(to)
        comp, tin = comp + c, tin + i
    return torch.cat(out), (comp / tin if tin else 1.0)


def flops_per_image(model, row: Row, s: Settings) -> int:
    """FLOPs of one sampling run of one image (class 0), CFG's unconditional half included."""
    to = row.build(model) if row.build else None
    with R.flop_counter() as fc:
        R.sample(model, [0], steps=row_steps(row, s), cfg=s.cfg, seed=s.seed, transformer_options=to,
                 device=s.device, sampler=row.sampler)
    return fc.get_total_flops()


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Result:
    row: Row
    flops: int = 0
    images: torch.Tensor | None = None
    tokens: float = 1.0
    times: list = field(default_factory=list)
    memory: int = 0
    psnr: float = math.nan
    ssim: float = math.nan
    kid: tuple = (math.nan, math.nan)
    artifact: tuple = (math.nan, math.nan)   # token artifact ratio against unpatched: (median, mean)
    error: str | None = None
    run: Callable | None = None   # host rows: one timed sampling run


@dataclass
class KidReference:
    """The feature extractor and the features of unpatched images from other seeds (KID's other set)."""
    extractor: Callable
    features: torch.Tensor

    def kid(self, images: torch.Tensor, s: Settings) -> tuple:
        n = images.shape[0]
        return M.kid(self.extractor(images), self.features, subsets=s.kid_subsets, subset_size=max(2, n // 2))


def kid_reference(model, s: Settings) -> KidReference:
    ext = M.RandomFeatures(device=s.device)
    images, _ = generate(model, Row("unpatched"), s, s.samples, seed_offset=1_000_003)
    return KidReference(ext, ext(images))


def run_reference(model, rows: list[Row], s: Settings, timing: bool = True,
                  kid: "bool | KidReference" = True) -> dict:
    """Measure every available row; returns {name: Result}. Row 0 must be the unpatched row.
    `kid`: False, True (build the KID reference set here) or a KidReference built before."""
    res = {}
    for row in rows:
        r = res[row.name] = Result(row)
        if row.missing:
            continue
        try:
            r.flops = flops_per_image(model, row, s)
            r.images, r.tokens = generate(model, row, s, s.samples)
        except Exception as e:  # a method that fails is reported in its row, with the error
            r.error = f"FAILED: {type(e).__name__}: {e}"
    ok = [r for r in res.values() if r.row.missing is None and r.error is None]
    base = res[rows[0].name]
    if timing:
        ids = class_ids(s.time_images, model.config.num_classes)

        def run(r):
            to = r.row.build(model) if r.row.build else None
            return lambda: R.sample(model, ids, steps=row_steps(r.row, s), cfg=s.cfg, seed=s.seed,
                                    transformer_options=to, device=s.device, sampler=r.row.sampler)
        for _ in range(max(s.repeats, 1)):
            for r in ok:  # interleaved: load from other processes hits every row alike
                r.times.append(_timed(run(r), s.device))
        for r in ok:
            r.memory = peak_memory(run(r), s.device)
    ref = kid if isinstance(kid, KidReference) else (kid_reference(model, s) if kid else None)
    for r in ok:
        r.psnr = R.psnr(r.images, base.images)
        r.ssim = M.ssim(r.images, base.images)
        ratios = M.token_artifact_ratios(r.images, base.images, model.patch_size)
        r.artifact = (float(ratios.quantile(0.5)), float(ratios.mean()))
        if ref is not None:
            r.kid = ref.kid(r.images, s)
    return res


def _db(x: float) -> str:
    return "inf" if x == math.inf else ("-" if math.isnan(x) else f"{x:.2f}")


def weights_line(weights: Path) -> str:
    """The training record of a weights file, as the evidence pages state it."""
    meta = R.weights_metadata(weights)
    return "Weights: " + ", ".join(f"{k} {meta[k]}" for k in ("steps", "final_loss", "complete", "date") if k in meta)


def report_reference(rep: Report, res: dict, s: Settings, source: str, model, weights: Path | None = None):
    """`weights`: the file the trained model came from, whose training metadata the page states."""
    c = model.config
    base = next(iter(res.values()))
    rep(f"## (a) Reference DiT: {source}")
    rep()
    if source.startswith("trained") and weights is not None:
        rep(weights_line(weights))
        rep()
    rep(f"{c.depth_double} double + {c.depth_single} single blocks, hidden {c.hidden}; "
        f"{c.image_size}x{c.image_size} px, "
        f"patch {c.patch_size} -> {(c.image_size // c.patch_size) ** 2} image + {c.txt_len} text tokens; Euler "
        f"{s.steps} steps, CFG {s.cfg}; {s.samples} images per row (classes 0..{c.num_classes - 1} in turn, noise "
        f"seeds {s.seed}+chunk of {s.batch}); wall time: median of {s.repeats} interleaved runs of {s.time_images} "
        f"images on {torch.get_num_threads()} torch threads.")
    rep()
    rows = []
    bt = statistics.median(base.times) if base.times else None
    for r in res.values():
        if r.row.missing or r.error:
            rows.append([r.row.name] + [r.row.missing or r.error] + [""] * 9)
            continue
        t = statistics.median(r.times) if r.times else None
        rows.append([r.row.name, f"{r.flops / 1e9:.2f}", f"{r.flops / base.flops:.3f}", f"{100 * r.tokens:.1f}%",
                     "-" if t is None else f"{t:.2f} s", "-" if t is None else f"{t / bt:.3f}",
                     "-" if not r.memory else f"{r.memory / 2**20:.1f}", _db(r.psnr),
                     "-" if math.isnan(r.ssim) else f"{r.ssim:.4f}",
                     "-" if math.isnan(r.kid[0]) else f"{1e3 * r.kid[0]:.2f} ± {1e3 * r.kid[1]:.2f}",
                     "-" if math.isnan(r.artifact[0]) else f"{r.artifact[0]:.2f} / {r.artifact[1]:.2f}"])
    rep.table(["row", "GFLOPs / image", "FLOPs / unpatched", "image tokens computed", "wall time (median)",
               "time / unpatched", "peak memory MiB", "PSNR dB", "SSIM", "KID x1e3 (± std)",
               "token artifact ratio (median / mean)"], rows)
    mem = ("CUDA max_memory_allocated above what was held" if torch.device(s.device).type == "cuda" else
           "peak of torch.profiler's recorded tensor allocations minus frees (CPU, op granularity; weights and "
           "inputs excluded)")
    hits = [r.row.name for r in res.values() if r.row.missing is None and r.error is None
            and r.flops <= 0.5 * base.flops and r.psnr >= 30.0]
    rep(f"Rows with at most half the unpatched FLOPs and PSNR >= 30 dB: {', '.join(hits) if hits else 'none'}.")
    rep()
    rep(f"Peak memory: one timed run of {s.time_images} images; {mem}. PSNR / SSIM: against the unpatched images of "
        f"the same seed and class (pixel fidelity, not quality). KID: random-feature KID (tools/metrics.py) against "
        f"{s.samples} unpatched images of other seeds; the unpatched row is the noise floor; mean ± std over "
        f"{s.kid_subsets} random subsets of {max(2, s.samples // 2)} images per set. Token artifact ratio "
        f"(tools/metrics.token_artifact_ratio, {c.patch_size} px tokens): per image, the token-scale energy (each "
        f"token's mean colour against its 3x3 token neighbourhood) over the unpatched image's, median / mean over "
        f"images; 1 = the unpatched detail, above 1 per-token noise, below 1 blur.")
    rep()


# ---- fidelity at equal FLOPs --------------------------------------------------------------------------

@dataclass
class Curve:
    name: str
    points: list      # (FLOPs / unpatched, PSNR dB, setting), sorted by FLOPs
    kids: dict = field(default_factory=dict)   # setting -> KID (mean), when measured

    def at(self, f: float, metric: str = "psnr"):
        """(PSNR or KID, (setting below, setting above, weight)) linearly interpolated at FLOPs
        fraction f, or None outside the swept range (or for a KID that was not measured)."""
        pts = [(p[0], p[1] if metric == "psnr" else self.kids.get(p[2]), p[2]) for p in self.points]
        if not pts or f < pts[0][0] - 1e-9 or f > pts[-1][0] + 1e-9 or any(p[1] is None for p in pts):
            return None
        for (f0, p0, s0), (f1, p1, s1) in zip(pts, pts[1:]):
            if f0 - 1e-9 <= f <= f1 + 1e-9:
                w = 0.0 if f1 == f0 else (f - f0) / (f1 - f0)
                return p0 + w * (p1 - p0), (s0, s1, w)
        return pts[0][1], (pts[0][2], pts[0][2], 0.0)


def sweep(model, base: Result, s: Settings, kind: str, near: float | None = None,
          kid: KidReference | None = None) -> Curve:
    """PSNR (and KID, given `kid`) vs FLOPs of the naive merge over its ratio (`kind` "naive"), or of
    the unpatched model over its step count, with the reference's Euler sampler ("steps") or the
    second-order AB2 sampler ("steps-ab2": a user who cuts steps may also switch to a multistep sampler).

    With `near` (a FLOPs fraction), only the two sweep points around it are sampled (FLOPs are
    counted for all first, on one image each): enough to interpolate at that one point.
    """
    n = min(s.sweep_samples, s.samples)
    if kind == "naive":
        rows = [sdtm_row(f"{r}", naive_config(r)) for r in s.naive_sweep]
    else:
        if s.step_fractions:
            counts = sorted({max(1, round(f * s.steps)) for f in s.step_fractions} - {s.steps})
        else:
            counts = range(max(1, math.ceil(0.3 * s.steps)), s.steps)
        rows = [Row(f"{k}", steps=k / s.steps, sampler="ab2" if kind == "steps-ab2" else "euler")
                for k in counts]
    fl = sorted((flops_per_image(model, row, s) / base.flops, i) for i, row in enumerate(rows))
    if near is not None:
        below = [p for p in fl if p[0] <= near]
        above = [p for p in fl if p[0] >= near]
        fl = sorted(set(below[-1:] + above[:1]))
    pts, kids = [], {}
    for f, i in fl:
        images, _ = generate(model, rows[i], s, n)
        pts.append((f, R.psnr(images, base.images[:n]), rows[i].name))
        if kid is not None:
            kids[rows[i].name] = kid.kid(images, s)[0]
    return Curve(CURVE_NAMES[kind], sorted(pts), kids)


CURVE_NAMES = {"naive": "naive merge (ratio)", "steps": "fewer steps (count)",
               "steps-ab2": "fewer steps, AB2 sampler (count)"}


@dataclass
class CacheSweep:
    """PSNR of a step cache at every layout: (FLOPs / unpatched, PSNR dB, layout), sorted by FLOPs."""
    name: str
    points: list

    def at_most(self, f: float) -> dict | None:
        """The median and the best layout whose FLOPs are no higher than f (None: none is that cheap)."""
        return step_cache.at_most(self.points, f)


def cache_sweep(model, base: Result, s: Settings, kind: str) -> CacheSweep:
    """Every step-cache layout (step_cache.layouts) on the first sweep images; a layout's FLOPs are its
    full steps over all steps (a skipped step calls no model)."""
    label, order, forecast = CACHE_SWEEPS[kind]
    n = min(s.sweep_samples, s.samples)
    pts = []
    for layout in step_cache.layouts(s.steps):
        row = Row(layout.name, step_cache.cache_options(layout, forecast, order))
        images, _ = generate(model, row, s, n)
        pts.append((layout.full_steps(s.steps) / s.steps, R.psnr(images, base.images[:n]), layout.name))
    return CacheSweep(label, sorted(pts))


def equal_flops(res: dict, curves: list[Curve], s: Settings, kid: KidReference | None = None,
                caches: list[CacheSweep] = ()) -> list[dict]:
    """Per method row: its PSNR (and KID) on the sweep images, each baseline curve's at its FLOPs and the
    step caches' (median and best) at no more FLOPs."""
    base = next(iter(res.values()))
    n = min(s.sweep_samples, s.samples)
    out = []
    for r in res.values():
        if r.row.baseline or r.row.missing or r.error:
            continue
        f = r.flops / base.flops
        entry = {"name": r.row.name, "flops": f, "psnr": R.psnr(r.images[:n], base.images[:n]),
                 "kid": kid.kid(r.images[:n], s)[0] if kid is not None else None}
        entry["psnr_curves"] = {c.name: c.at(f) for c in curves}
        entry["kid_curves"] = {c.name: c.at(f, "kid") for c in curves}
        entry["caches"] = {c.name: c.at_most(f) for c in caches}
        out.append(entry)
    return out


def _against_baselines(curves: list[Curve], table: list[dict], metric: str, scale: float, fmt) -> list[list]:
    """Table rows: method, FLOPs, its `metric`, then per baseline curve its value at equal FLOPs and
    the difference (times `scale`)."""
    rows = []
    for e in table:
        row = [e["name"], f"{e['flops']:.3f}", fmt(e[metric])]
        for c in curves:
            hit = e[f"{metric}_curves"][c.name]
            row += ["outside the swept range", "-"] if hit is None else [
                f"{fmt(hit[0])} (between {hit[1][0]} and {hit[1][1]})", f"{scale * (e[metric] - hit[0]):+.2f}"]
        rows.append(row)
    return rows


def _sweeps_header(rep: Report, sweeps: list) -> list[str]:
    """List each sweep's points (label, [(FLOPs, PSNR, setting)]); the first columns of the table after them."""
    rep()
    for label, points in sweeps:
        rep(f"- {label}: " + ", ".join(f"{k} -> {f:.3f} FLOPs, {_db(p)} dB" for f, p, k in points))
    rep()
    return ["method", "FLOPs / unpatched", "method PSNR dB"]


def report_equal_flops(rep: Report, curves: list[Curve], table: list[dict], s: Settings):
    n = min(s.sweep_samples, s.samples)
    rep(f"### (a) Fidelity at equal FLOPs (PSNR vs unpatched, first {n} images)")
    header = _sweeps_header(rep, [(f"{c.name} sweep", c.points) for c in curves])
    for c in curves:
        header += [f"{c.name} PSNR at equal FLOPs", "method - baseline dB"]
    rep.table(header, _against_baselines(curves, table, "psnr", 1.0, _db))
    rep("Baseline PSNR is interpolated linearly in FLOPs between the two neighbouring sweep points "
        "(for step counts this stands for a fractional step count).")
    rep()
    if any(e["kid"] is None for e in table):
        return
    if n < KID_MIN_IMAGES:
        rep(f"KID at equal FLOPs: not shown for {n} images per sweep point (its subsets of {max(2, n // 2)} "
            f"are noise; give --sweep-samples {KID_MIN_IMAGES} or more).")
        rep()
    else:
        report_kid_equal_flops(rep, curves, table, n)


def report_caches(rep: Report, caches: list[CacheSweep], table: list[dict], s: Settings):
    """Each method row against the plain step caches whose FLOPs are no higher: the median and the best."""
    if not caches:
        return
    n = min(s.sweep_samples, s.samples)
    rep(f"### (a) Against plain step caches at no more FLOPs (PSNR vs unpatched, first {n} images)")
    header = _sweeps_header(rep, [(c.name, c.points) for c in caches])
    for c in caches:
        header += [f"{c.name}: median / best at <= FLOPs", "method - median", "method - best"]
    rows = []
    for e in table:
        row = [e["name"], f"{e['flops']:.3f}", _db(e["psnr"])]
        for c in caches:
            hit = e["caches"][c.name]
            row += ["none this cheap", "-", "-"] if hit is None else [
                f"{_db(hit['median'])} / {_db(hit['best'])} ({hit['best_layout']}; {hit['layouts']} layouts)",
                f"{e['psnr'] - hit['median']:+.2f}", f"{e['psnr'] - hit['best']:+.2f}"]
        rows.append(row)
    rep.table(header, rows)
    rep("A layout: a warm-up of full steps, then one full step every few steps; the others carry each batch row's "
        "last full output along its trend (tools/step_cache.py), with no token-level work.")
    rep()


KID_MIN_IMAGES = 64   # below this, KID's subsets are too small to rank methods (the sign flips)


def report_kid_equal_flops(rep: Report, curves: list[Curve], table: list[dict], n: int):
    """The same comparison on the distribution-level score: lower KID is closer to unpatched samples."""
    rep(f"### (a) KID at equal FLOPs (x1e3, first {n} images of each row and sweep point)")
    rep()
    for c in curves:
        rep(f"- {c.name} sweep: " + ", ".join(f"{k} -> {f:.3f} FLOPs, KID {1e3 * c.kids[k]:.2f}"
                                             for f, _, k in c.points if k in c.kids))
    rep()
    header = ["method", "FLOPs / unpatched", "method KID"]
    for c in curves:
        header += [f"{c.name} KID at equal FLOPs", "method - baseline (below 0: closer)"]
    rep.table(header, _against_baselines(curves, table, "kid", 1e3, lambda v: f"{1e3 * v:.2f}"))
    rep(f"KID against the same independent set of unpatched samples as the table above, on {n} images per "
        f"row (subsets of {max(2, n // 2)}); interpolated in FLOPs like PSNR. The noise floor is the "
        "unpatched row's own KID in the table above.")
    rep()


# ---- (b) tiny ComfyUI models --------------------------------------------------------------------------

def host_rows(family: str, steps: int = 6, px: int = 256) -> list[Row]:
    """Rows for a tiny host model; build(patcher) returns a patched ModelPatcher (None: unpatched)."""
    from tools import comfy_host as H

    try:
        from comfy_extras import nodes_easycache as EC
    except Exception as e:  # noqa: BLE001  (reported in the table)
        EC, ec_err = None, f"not available: comfy_extras.nodes_easycache ({type(e).__name__}: {e})"
    cache_cls = None if EC is None else (EC.LazyCacheNode if family == "sd3" else EC.EasyCacheNode)
    cache_name = "LazyCache" if family == "sd3" else "EasyCache"

    def cache(threshold):
        return lambda m: H.run_node(cache_cls, model=m, reuse_threshold=threshold, start_percent=0.15,
                                    end_percent=0.95, verbose=False)[0]

    def pack_node(node_id: str, **overrides):
        return lambda m: H.run_node(H.pack_nodes()[node_id], model=m,
                                    **H.node_inputs(H.pack_nodes()[node_id], **overrides))[0]

    def node(cfg: SDTMConfig, **extra):
        return pack_node("SDTMPatchModel", **dataclasses.asdict(cfg), **extra)

    def calibrated(saving: float):
        """The SDTM node driven by the Token Ratio Schedule node calibrated on the model itself, wired as a
        user would: the sampler's steps, image size and prompt; merging at every step, so that the schedule
        decides every step."""
        def build(m):
            schedule = H.run_node(H.pack_nodes()["TokenRatioSchedule"], model=m, positive=H.conditioning()[0],
                                  **H.node_inputs(H.pack_nodes()["TokenRatioSchedule"], flops_saving=saving,
                                                  width=px, height=px, calibration_steps=steps))[0]
            return node(SDTMConfig(**{**BY_KEY["sdtm"].every_step, "start_percent": 0.0}), schedule=schedule)(m)
        return build

    rows = [Row("unpatched", baseline=True)]
    rows += [Row(f"fewer steps ({int(100 * f)}%)", steps=f, baseline=True) for f in STEP_FRACTIONS]
    rows.append(Row(f"naive merge (ratio {NAIVE_RATIO}, every block of every step)", node(naive_config(NAIVE_RATIO)),
                    baseline=True))
    for spec in SPECS:
        rows += [Row(f"{spec.name} {preset} (node)", pack_node(spec.node_id, preset=preset)) for preset in spec.presets]
    rows += [Row(f"SDTM every step + calibrated schedule ({100 * saving:.0f}% of block FLOPs saved, node)",
                 calibrated(saving)) for saving in CALIBRATED_SAVINGS]
    for label, thr in (("default, threshold 0.2", 0.2), ("stronger, threshold 0.5", 0.5)):
        name = f"ComfyUI {cache_name} ({label})"
        rows.append(Row(name, cache(thr), baseline=True) if cache_cls else Row(name, missing=ec_err))
    name = f"stack: SDTM balanced + {cache_name} 0.2"
    rows.append(Row(name, (lambda m: cache(0.2)(pack_node("SDTMPatchModel", preset="balanced")(m))))
                if cache_cls else Row(name, missing=ec_err))
    return rows


def run_host(rep: Report, quick: bool, steps: int):
    from tools import comfy_host as H
    err = H.import_host()
    rep("## (b) Tiny ComfyUI models through comfy.sample.sample (random weights)")
    rep()
    if err:
        rep(f"Not available: {err}")
        rep()
        return
    # One latent per sampling run: ComfyUI 0.3.64's EasyCache.apply_cache_diff adds each cond's cached diff to
    # the whole batch, which fails (or, with batch 1, mixes cond and uncond diffs) for batched latents.
    n, repeats, px = (1, 1, 256) if quick else (4, 3, 256)
    # Deep enough that skip_first / skip_last (1 / 1 by default) leave blocks to merge.
    for family, make, depth in (("flux", H.tiny_flux, dict(depth=2, depth_single=4)),
                                ("sd3", H.tiny_sd3, dict(depth=3))):
        patcher = make(seed=0, **depth)
        rows = host_rows(family, steps, px)
        res = {}
        for row in rows:
            r = res[row.name] = Result(row)
            if row.missing:
                continue
            m = row.build(patcher) if row.build else patcher
            k = max(1, round(steps * row.steps))
            r.run = lambda m=m, k=k: torch.cat([H.sample(m, seed=i, steps=k, height=px, width=px) for i in range(n)])
            with R.flop_counter() as fc:
                H.sample(m, seed=0, steps=k, height=px, width=px, batch=1)
            r.flops = fc.get_total_flops()
            r.images = r.run()
        ok = [r for r in res.values() if r.row.missing is None]
        for _ in range(repeats):
            for r in ok:
                r.times.append(_timed(r.run, "cpu"))
        for r in ok:
            r.memory = peak_memory(r.run, "cpu")
        base = res["unpatched"]
        lo, hi = base.images.min(), base.images.max()

        def scaled(x):
            return 2 * (x - lo) / (hi - lo) - 1
        kw = ", ".join(f"{k}={v}" for k, v in depth.items())
        rep(f"### {family}: tools/comfy_host.tiny_{family}({kw}) ({px}x{px} px -> {(px // 16) ** 2} image tokens), "
            f"{steps} steps euler/simple, CFG 3, {n} latents (seeds 0..{n - 1}); wall time: median of {repeats} "
            f"interleaved runs")
        rep()
        table = []
        bt = statistics.median(base.times)
        for r in res.values():
            if r.row.missing:
                table.append([r.row.name, r.row.missing, "", "", "", "", ""])
                continue
            t = statistics.median(r.times)
            table.append([r.row.name, f"{r.flops / 1e9:.3f}", f"{r.flops / base.flops:.3f}", f"{t:.2f} s",
                          f"{t / bt:.3f}", f"{r.memory / 2**20:.1f}",
                          _db(R.psnr(scaled(r.images), scaled(base.images)))])
        rep.table(["row", "GFLOPs / latent", "FLOPs / unpatched", "wall time", "time / unpatched",
                   "peak memory MiB", "PSNR dB (latents, unpatched range)"], table)
    rep("EasyCache skips whole model calls when the output is predicted to change little, so its FLOPs "
        "count what really ran. SD3 uses LazyCache: ComfyUI's MMDiT has no DIFFUSION_MODEL wrapper for EasyCache.")
    rep()


# ---- (c) full-size architectures: FLOPs ---------------------------------------------------------------

def run_full_size(rep: Report):
    rep("## (c) Full-size architectures: FLOPs per image")
    rep()
    rep("From tools/benchmark.py (seconds per image on a GPU: `python tools/benchmark.py --device cuda`). Fewer steps "
        "cost in proportion: 60% of the steps is 0.600 of the FLOPs.")
    rep()
    B.flops_table(rep)


# ---- main ---------------------------------------------------------------------------------------------

SECTIONS = ("reference", "host", "full")


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few samples and repeats")
    p.add_argument("--samples", type=cli.positive_int,
                   help=f"images per row on the reference model (default {Settings.samples}, quick {QUICK['samples']})")
    p.add_argument("--sweep-samples", type=cli.positive_int,
                   help=f"images per point of the equal-FLOPs sweeps (default {Settings.sweep_samples})")
    p.add_argument("--steps", type=cli.positive_int, default=10, help="sampling steps of the unpatched runs (at least 2)")
    p.add_argument("--repeats", type=cli.positive_int,
                   help=f"timed runs per row (default {Settings.repeats}, quick {QUICK['repeats']})")
    p.add_argument("--sections", type=cli.choice_list(SECTIONS), default=list(SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--model", choices=sorted(REFERENCE_MODELS), default=DEFAULT_MODEL,
                   help="which trained reference model the reference section samples")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=cli.non_negative_int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared CPU; 0 = torch's default)")
    p.add_argument("--no-host", action="store_true", help="skip the tiny ComfyUI models")
    p.add_argument("--out", type=cli.out_file, help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here")
    if "reference" in args.sections and REFERENCE_MODELS[args.model].is_file():  # else: random init, said so
        cli.weights_file(p, REFERENCE_MODELS[args.model], f"--model {args.model}")
    cli.writable_file(p, args.out)
    return args


def settings_from(args) -> Settings:
    s = Settings(steps=args.steps, device=args.device, **(QUICK if args.quick else {}))
    for name in ("samples", "sweep_samples", "repeats"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.batch = min(s.batch, s.samples)
    return s


def main(argv=None) -> dict:
    args = parse_args(argv)
    with cli.torch_threads(args.threads):
        return _main(args, sys.argv[1:] if argv is None else list(argv))


def _main(args, argv: list[str]) -> dict:
    t_start = time.perf_counter()
    s = settings_from(args)
    sections = set(args.sections)
    rep = Report()
    rep.header(f"Side-by-side comparison ({'quick' if args.quick else 'full'})", args.device, "tools/compare.py", argv)
    out = {}
    if "reference" in sections:
        model, source = reference_model(args.model)
        model = model.to(s.device)
        rows = reference_rows(s)
        kid = kid_reference(model, s)
        res = run_reference(model, rows, s, kid=kid)
        report_reference(rep, res, s, source, model, REFERENCE_MODELS[args.model])
        base = res[rows[0].name]
        curves = [sweep(model, base, s, kind, kid=kid) for kind in CURVE_NAMES]
        caches = [cache_sweep(model, base, s, kind) for kind in s.cache_sweeps]
        table = equal_flops(res, curves, s, kid, caches)
        report_equal_flops(rep, curves, table, s)
        report_caches(rep, caches, table, s)
        out["reference"] = {"source": source, "results": res, "curves": curves, "caches": caches,
                            "equal_flops": table}
    if "host" in sections and not args.no_host:
        run_host(rep, args.quick, 20 if not args.quick else 12)
    if "full" in sections:
        run_full_size(rep)
    rep(f"Total wall time: {time.perf_counter() - t_start:.1f} s")
    rep.write(args.out, summary(args, s, out["reference"]) if args.out and "reference" in out else None)
    out["report"] = "\n".join(rep.lines)
    return out


def summary(args, s: Settings, ref: dict) -> dict:
    """The reference section's numbers, for the docs that quote them (tools/docs.py): one home."""
    res, base = ref["results"], next(iter(ref["results"].values()))
    rows = []
    for r in res.values():
        if r.row.missing or r.error:
            continue
        rows.append({"name": r.row.name, "key": r.row.key, "baseline": r.row.baseline, "flops": r.flops / base.flops,
                     "psnr": None if math.isinf(r.psnr) else r.psnr, "artifacts": r.artifact[0]})
    def versus(curve):  # {row name: its PSNR minus the curve's at its FLOPs, on the sweep images}
        return {e["name"]: None if e["psnr_curves"][curve] is None else e["psnr"] - e["psnr_curves"][curve][0]
                for e in ref["equal_flops"]}
    euler, ab2 = versus(CURVE_NAMES["steps"]), versus(CURVE_NAMES["steps-ab2"])
    plain = CACHE_SWEEPS["cache"][0]
    caches = {e["name"]: e["caches"].get(plain) for e in ref["equal_flops"]}
    for row in rows:
        row["vs_fewer_steps"], row["vs_fewer_steps_ab2"] = euler.get(row["name"]), ab2.get(row["name"])
        hit = caches.get(row["name"])
        if hit is not None:  # the plain step cache at no more FLOPs, on the sweep images
            psnr = next(e["psnr"] for e in ref["equal_flops"] if e["name"] == row["name"])
            row.update(vs_cache_median=psnr - hit["median"], vs_cache_best=psnr - hit["best"],
                       cache_best_layout=hit["best_layout"])
    return {"model": args.model, "steps": s.steps, "samples": s.samples, "sweep_samples": s.sweep_samples,
            "source": ref["source"], "rows": rows}


if __name__ == "__main__":
    main()
