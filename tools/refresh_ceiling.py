"""What refreshing part of the image can buy at best, between a plain step cache's full steps.

    python tools/refresh_ceiling.py --model 64px --split held-out --layout 8,3
    python tools/refresh_ceiling.py --model 128px,64px --split held-out --out docs/evidence/refresh-ceiling-28steps.md

At each step the cache skips, an oracle runs the full model and hands back a part of its exact output; the
cache's forecast (tools/step_cache.py) serves the rest:
- exact on a share of the tokens: drawn at random (as DuCa finds competitive), those the forecast missed most
  at the last full step (a choice a method can know), or those it misses most now (no choice can do better);
- the exact correction's low frequencies only (averaged over k x k tokens, spread back);
- a uniform share of the exact correction on every token.
The oracle's calls are not counted, so each row bounds any method of its shape from above: CAT and ToCa
refresh a share of the tokens, a control variate on a pooled call approximates the low frequencies. The
"cost" column is what a real method would pay (the layout's full steps plus the refreshed share of the
skipped ones, no overhead), and the best plain step cache at no more cost comes from tools/cache_bar.py's
table (computed if missing).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.token_ops import patchify, unpatchify  # noqa: E402
from tools import cache_bar as CB  # noqa: E402
from tools import cli  # noqa: E402
from tools import reference_dit as R  # noqa: E402
from tools import step_cache as SC  # noqa: E402
from tools.report import Report  # noqa: E402

SHARES = (0.05, 0.2, 0.5)   # of the tokens, for the random and worst-missed rows
POOLS = (2, 4)              # low frequencies over k x k tokens
BLENDS = (0.25, 0.5)        # uniform shares of the exact correction


class OracleRefresh(SC.StepCache):
    """A plain step cache whose skipped steps also get part of the exact output: `part(forecast, exact, grid,
    step, missed)` on (B, N, D) tokens of a (H, W) grid returns the output tokens; `missed` (B, N) is how far
    the forecast missed each token at the last full step (None before a trend exists)."""

    def __init__(self, layout: SC.Layout, part, patch: int):
        super().__init__(layout)
        self.part, self.patch = part, patch
        self.missed = None

    def _record(self, out: torch.Tensor, sigma: float):
        if len(self.rows) == out.shape[0] and all(row.trend.slope is not None for row in self.rows):
            guess = self.forecast_at(sigma)
            grid = (out.shape[-2] // self.patch, out.shape[-1] // self.patch)
            self.missed = patchify(guess - out.float(), grid, self.patch).pow(2).sum(-1)
        super()._record(out, sigma)

    def skipped(self, call_next, x, sigma, class_ids, options):
        forecast = super().skipped(call_next, x, sigma, class_ids, options)
        exact = call_next(x, sigma, class_ids, options)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        tokens = self.part(patchify(forecast, grid, self.patch), patchify(exact, grid, self.patch), grid, self.step,
                           self.missed)
        return unpatchify(tokens, forecast.shape, self.patch)


CHOICES = {"random": "at random", "missed before": "those the forecast missed most at the last full step",
           "missed now": "those the forecast misses most"}


def exact_share(share: float, choice: str):
    """`share` of the tokens exact, chosen as CHOICES says."""
    def part(forecast, exact, grid, step, missed):
        if choice == "missed now":
            score = (forecast - exact).pow(2).sum(-1)
        elif choice == "missed before" and missed is not None:
            score = missed
        else:  # the same draw for every run at a step: rows compare like for like
            score = torch.rand(forecast.shape[:2], generator=torch.Generator().manual_seed(step))
        keep = torch.zeros(forecast.shape[:2], dtype=torch.bool).scatter(1, score.topk(int(share * score.shape[1]),
                                                                                        1).indices, True)
        return torch.where(keep[..., None], exact, forecast)
    return part


def low_frequencies(k: int):
    def part(forecast, exact, grid, step, missed):
        d = (exact - forecast).unflatten(1, grid).permute(0, 3, 1, 2)
        d = F.interpolate(F.avg_pool2d(d, k), size=grid, mode="bilinear", align_corners=False)
        return forecast + d.permute(0, 2, 3, 1).flatten(1, 2)
    return part


def uniform_share(share: float):
    return lambda forecast, exact, grid, step, missed: forecast + share * (exact - forecast)


def rows() -> list[tuple[str, object, float]]:
    """(name, part or None for the cache alone, share of a skipped step a real method would compute)."""
    out = [("plain step cache (nothing refreshed)", None, 0.0)]
    for s in SHARES:
        for choice, words in CHOICES.items():
            out.append((f"{s:.0%} of the tokens exact, {words}", exact_share(s, choice), s))
    for k in POOLS:
        out.append((f"exact correction averaged over {k}x{k} tokens", low_frequencies(k), 1.0 / (k * k)))
    for s in BLENDS:
        out.append((f"{s:.0%} of the exact correction on every token", uniform_share(s), None))
    return out


def measure(setup: CB.Setup, layout: SC.Layout, table: list[dict], log=print) -> list[dict]:
    skipped = (setup.steps - layout.full_steps(setup.steps)) / setup.steps
    results = []
    for name, part, share in rows():
        build = ((lambda model: SC.StepCache(layout).options()) if part is None else
                 (lambda model, part=part: OracleRefresh(layout, part, model.patch_size).options()))
        cost = None if share is None else layout.full_steps(setup.steps) / setup.steps + share * skipped
        r = {"name": name, "cost": cost, **CB.measure(setup, build, flops_share=0.0)}
        del r["flops"]  # the oracle's calls are not a cost: `cost` is what a real method would pay
        if cost is not None:
            r.update(CB.against_caches({**r, "flops": cost}, table))
        results.append(r)
        log(f"  {name}: {r['psnr']:.2f} dB")
    return results


def report(rep: Report, setup: CB.Setup, layout: SC.Layout, results: list[dict]):
    rep(f"## {setup.model_name}, split {setup.split.name} ({setup.split.images} images), {setup.steps} steps, "
        f"CFG {setup.cfg}, full steps: {layout.name}")
    rep()
    base = results[0]["psnr"]
    body = []
    for r in results:
        best = "-" if "best" not in r else f"{r['best']:.2f} ({r['best_layout']})"
        body.append([r["name"], "-" if r["cost"] is None else f"{r['cost']:.3f}", f"{r['psnr']:.2f}",
                     f"{r['psnr'] - base:+.2f}", f"{r['artifacts']:.2f}", best,
                     "-" if "best" not in r else f"{r['psnr'] - r['best']:+.2f}"])
    rep.table(["skipped steps get", "cost (FLOPs share)", "PSNR dB", "over the cache alone", "artifacts",
               "best cache at <= cost", "over it"], body)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=cli.choice_list(sorted(R.MODELS)), default=["64px"])
    p.add_argument("--split", choices=sorted(CB.SPLITS), default="held-out")
    p.add_argument("--steps", type=cli.positive_int, default=CB.STEPS)
    p.add_argument("--cfg", type=cli.non_negative_float, default=CB.CFG)
    p.add_argument("--layout", type=cli.int_list, default=[8, 3],
                   help="warm-up,every of the cache's full steps (default 8,3: CAT balanced's at 28 steps)")
    p.add_argument("--cache-dir", type=cli.out_dir, default=CB.DEFAULT_CACHE_DIR)
    p.add_argument("--threads", type=cli.non_negative_int, default=1)
    p.add_argument("--out", type=cli.out_file, help="also write the report (markdown) here, and JSON beside it")
    args = p.parse_args(argv)
    if len(args.layout) != 2 or args.layout[0] < 2 or args.layout[1] < 2 or args.layout[0] >= args.steps:
        p.error(f"--layout is warm-up,every with a warm-up of 2 or more below --steps and every >= 2, "
                f"got {','.join(map(str, args.layout))}")
    cli.writable_file(p, args.out)
    for name in args.model:
        cli.weights_file(p, R.MODELS[name], f"--model {name}")
    cli.writable_dir(p, args.cache_dir, "--cache-dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    layout = SC.Layout(*args.layout)
    rep, out = Report(), []
    with cli.torch_threads(args.threads), torch.inference_mode():
        rep.header("What refreshing part of the image can buy at best", "cpu", "tools/refresh_ceiling.py",
                   sys.argv[1:] if argv is None else list(argv))
        rep("An oracle runs the full model at each step the cache skips and hands back part of its exact output; "
            "the forecast serves the rest. Its calls are not counted: each row is an upper bound for a method of its "
            "shape. Cost: the layout's full steps plus the refreshed share of the skipped ones (no overhead); the best "
            "plain step cache at no more cost is from the split's cache table.")
        rep()
        for name in args.model:
            setup = CB.Setup(name, CB.SPLITS[args.split], args.steps, args.cfg, args.cache_dir)
            results = measure(setup, layout, CB.cache_table(setup))
            report(rep, setup, layout, results)
            out.append({"model": name, "split": args.split, "steps": args.steps, "cfg": args.cfg,
                        "layout": [layout.warmup, layout.every], "results": results})
    rep.write(args.out, out)
    return out


if __name__ == "__main__":
    main()
