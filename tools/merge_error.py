"""Why merging stays below fewer steps on the reference model: the error of a merged call, step by step.

    python tools/merge_error.py [--steps 10] [--samples 16] [--out FILE.md]

Along the unpatched sampling trajectory of the trained reference DiT (Euler, CFG 3), every step
computes the full prediction and measures, against it, the relative L2 error (over all images) of:
- the same call merged: SDTM's defaults and the density schedule's defaults, here merging from the
  first step (`start_percent` 0) so that every step has a merged call to compare;
- the previous step's full prediction, held (what step reuse does);
- CAT's forecast: the previous prediction moved along the trend of the two before it, damped by the
  node's default `forecast`;
each also after a low pass over the merge window (2x2 tokens), which keeps only the coarse picture
that a merged call can represent at all.

Then end to end: sampling runs that compute some steps in full and, between them, either run the
merged (pooled) call, or the merged call with the detail cache, or hold the last full prediction
(computing nothing). PSNR against the unpatched images; FLOPs counted with torch's flop counter.
No ComfyUI needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import torch  # noqa: E402

from kernels.cat import CATConfig  # noqa: E402
from kernels.methods import BY_KEY, SPECS  # noqa: E402
from kernels.forecast import along_trend  # noqa: E402
from kernels.detail_cache import low_pass  # noqa: E402
from tools import cli  # noqa: E402
from tools import compare as C  # noqa: E402
from tools import reference_dit as R  # noqa: E402
from tools.report import Report  # noqa: E402

CFG = 3.0
# A merged call on its own (every step merged, no detail cache), the thing this tool measures.
MERGED = {spec.key: (lambda spec=spec: spec.with_settings({**spec.every_step, "start_percent": 0.0}))
          for spec in SPECS if spec.every_step is not None}
# End-to-end layouts: steps computed in full (fractions of the run, rounded to step indices).
LAYOUTS = ((0.0, 0.1), (0.0, 0.1, 0.4, 0.7))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _setup(model, samples: int):
    """(starting noise, class ids) of the first `samples` images of tools/compare.py's rows."""
    return R.initial_noise(model.config, samples, 0), torch.tensor(C.class_ids(samples, model.config.num_classes))


@torch.inference_mode()
def per_step_errors(model, steps: int, samples: int) -> list[dict]:
    """One dict per step: sigma and the relative errors (full size, low-passed) of each approximation."""
    x, ids = _setup(model, samples)
    window = 2 * model.config.patch_size
    damping = CATConfig().forecast
    options = {name: R.method_options(make(), model, "m") for name, make in MERGED.items()}
    history, rows = [], []
    sig = R.sigmas(steps)
    for s, s_next in zip(sig[:-1], sig[1:]):
        full = R.guided_velocity(model, x, s, ids, CFG, None)
        guesses = {name: R.guided_velocity(model, x, s, ids, CFG, o) for name, o in options.items()}
        if history:
            guesses["held"] = history[-1][1]
        if len(history) >= 2:
            (s1, v1), (s2, v2) = history[-2:]
            guesses["forecast"] = along_trend(v2, s2, s, (v2 - v1) / (s2 - s1), damping)
        row = {"sigma": s}
        for name, g in guesses.items():
            row[name] = (relative_error(g, full), relative_error(low_pass(g, window), low_pass(full, window)))
        rows.append(row)
        history.append((s, full))
        x = x + (s_next - s) * full
    return rows


@torch.inference_mode()
def end_to_end(model, steps: int, samples: int, full_steps: tuple, mode: str) -> tuple:
    """(images, FLOPs per image) of a run that computes `full_steps` in full and, in between, runs the
    density schedule's pooled call (`mode` "merged"), that call with the detail cache ("detail
    cache"), or holds the last full prediction ("held")."""
    x, ids = _setup(model, samples)
    window = 2 * model.config.patch_size
    options = R.method_options(MERGED["density"](), model, "m")
    sig = R.sigmas(steps)
    last = None
    with R.flop_counter() as counter:
        for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:])):
            if i in full_steps or last is None:
                v = last = R.guided_velocity(model, x, s, ids, CFG, None)
            elif mode == "held":
                v = last
            else:
                v = R.guided_velocity(model, x, s, ids, CFG, options)
                if mode == "detail cache":
                    v = last + low_pass(v - last, window)
            x = x + (s_next - s) * v
    return x, counter.get_total_flops() / samples


def full_step_indices(layout: tuple, steps: int) -> tuple:
    return tuple(sorted({min(steps - 1, round(f * steps)) for f in layout}))


def report(rep: Report, model, steps: int, samples: int):
    rows = per_step_errors(model, steps, samples)
    names = [*MERGED, "held", "forecast"]
    header = ["step", "sigma"] + [f"{n}: full / low-passed" for n in (
        *(f"{BY_KEY[k].name} reduced call" for k in MERGED), "previous prediction held", "CAT forecast")]
    table = []
    for i, r in enumerate(rows):
        table.append([i, f"{r['sigma']:.2f}"] + [f"{r[n][0]:.3f} / {r[n][1]:.3f}" if n in r else "-" for n in names])
    rep(f"### Relative error of each approximation against the full prediction ({samples} images, {steps} steps)")
    rep()
    rep.table(header, table)
    base, base_flops = end_to_end(model, steps, samples, tuple(range(steps)), "held")
    table = []
    for layout in LAYOUTS:
        full = full_step_indices(layout, steps)
        for mode in ("merged", "detail cache", "held"):
            images, flops = end_to_end(model, steps, samples, full, mode)
            table.append([", ".join(map(str, full)), mode, f"{flops / base_flops:.3f}", f"{R.psnr(images, base):.2f}"])
    rep("### End to end: full steps, and between them the density schedule's pooled call or the held prediction")
    rep()
    rep.table(["full steps", "steps between", "FLOPs / unpatched", "PSNR dB"], table)
    return rows


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=cli.positive_int, default=10, help="sampling steps (at least 3)")
    p.add_argument("--samples", type=cli.positive_int, default=16, help="images sampled")
    p.add_argument("--model", choices=sorted(C.REFERENCE_MODELS), default=C.DEFAULT_MODEL,
                   help="which trained reference model to sample")
    p.add_argument("--threads", type=cli.non_negative_int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", type=cli.out_file, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error(f"--steps must be at least 3, got {args.steps}")
    if C.REFERENCE_MODELS[args.model].is_file():  # else: random init, said so in the report
        cli.weights_file(p, C.REFERENCE_MODELS[args.model], f"--model {args.model}")
    cli.writable_file(p, args.out)
    with cli.torch_threads(args.threads):
        model, source = C.reference_model(args.model)
        rep = Report()
        rep.header(f"Merged calls against reuse, step by step ({source})", "cpu", "tools/merge_error.py",
                   sys.argv[1:] if argv is None else list(argv))
        rows = report(rep, model, args.steps, args.samples)
        rep.write(args.out)
    return rows


if __name__ == "__main__":
    main()
