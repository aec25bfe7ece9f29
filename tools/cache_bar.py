"""The step-cache bar (issue 22): a candidate against every plain step cache at no more FLOPs.

    python tools/cache_bar.py --model 128px --split tuning --candidates cat:balanced,sdtm:balanced
    python tools/cache_bar.py --model 64px,128px --split held-out --steps 28 --out bar.md

For each candidate: its FLOPs (whole model, FlopCounterMode, relative to unpatched at the same steps), PSNR
against the unpatched images of the split, token artifact ratio, and against the plain step caches
(tools/step_cache.py, every layout) whose FLOPs are no higher: the median and the best cache, and the margins.
Also fewer Euler / AB2 steps at no more FLOPs. The splits are fixed here (one home; docs/evidence.md names
them): tune on "tuning", never on "held-out". Unpatched images and the cache table are kept under
--cache-dir, so a candidate costs one sampling pass over the split.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from tools import cli  # noqa: E402
from tools import metrics as M  # noqa: E402
from tools import reference_dit as R  # noqa: E402
from tools import step_cache as SC  # noqa: E402
from tools.report import Report  # noqa: E402


@dataclass(frozen=True)
class Split:
    """Images as sampling batches: (noise seed, class ids); a batch's noise is drawn from its seed."""

    name: str
    batches: tuple

    @property
    def images(self) -> int:
        return sum(len(c) for _, c in self.batches)

    def key(self) -> str:
        return hashlib.sha1(repr(self.batches).encode()).hexdigest()[:8]


# Tuning: classes 0-4, noise seeds 1101-1104. Held out: classes 5-9, noise seeds 2101-2108. No seed or class
# of one is in the other; neither meets the evidence pages' seeds (0, 1, ... and 1000003) or the calibration's (100).
SPLITS = {
    "tuning": Split("tuning", ((1101, (0, 1)), (1102, (2, 3)), (1103, (4, 0)), (1104, (1, 2)))),
    "held-out": Split("held-out", tuple((2101 + i, ((5 + 2 * i) % 5 + 5, (6 + 2 * i) % 5 + 5)) for i in range(8))),
}
STEPS, CFG = 28, 4.5
DEFAULT_CACHE_DIR = ROOT / "out" / "cache_bar"


@dataclass
class Setup:
    model_name: str
    split: Split
    steps: int = STEPS
    cfg: float = CFG
    cache_dir: Path = DEFAULT_CACHE_DIR

    def __post_init__(self):
        self.model = R.load_weights(R.MODELS[self.model_name])

    def path(self, what: str) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir / f"{self.model_name}-{self.split.name}-{self.split.key()}-{self.steps}-{self.cfg}-{what}"


def sample_split(setup: Setup, build: Callable | None, steps: int | None = None, sampler: str = "euler"):
    """Images of the split; `build(model)` gives fresh transformer_options per sampling run (None: unpatched)."""
    out = []
    for seed, classes in setup.split.batches:
        to = build(setup.model) if build else None
        out.append(R.sample(setup.model, list(classes), steps=steps or setup.steps, cfg=setup.cfg, seed=seed,
                            transformer_options=to, sampler=sampler))
    return torch.cat(out)


def flops(setup: Setup, build: Callable | None, steps: int | None = None) -> float:
    """Whole-model FLOPs of one image's run, relative to the unpatched run at setup.steps."""
    def count(b, k):
        with R.flop_counter() as fc:
            R.sample(setup.model, [0], steps=k, cfg=setup.cfg, seed=0, transformer_options=b(setup.model) if b else None)
        return fc.get_total_flops()
    key = ("unpatched", setup.model_name, setup.steps, setup.cfg)
    if key not in _FLOPS:
        _FLOPS[key] = count(None, setup.steps)
    return count(build, steps or setup.steps) / _FLOPS[key]


_FLOPS: dict = {}


def unpatched(setup: Setup) -> torch.Tensor:
    p = setup.path("unpatched.pt")
    if not p.is_file():
        torch.save(sample_split(setup, None), p)
    return torch.load(p)


def measure(setup: Setup, build: Callable | None, steps: int | None = None, sampler: str = "euler",
            flops_share: float | None = None) -> dict:
    """{flops, psnr, artifacts} of a candidate (or of fewer steps, with `steps`)."""
    ref = unpatched(setup)
    images = sample_split(setup, build, steps, sampler)
    return {"flops": flops(setup, build, steps) if flops_share is None else flops_share,
            "psnr": R.psnr(images, ref),
            "artifacts": M.token_artifact_ratio(images, ref, setup.model.patch_size)}


def cache_table(setup: Setup, log=print) -> list[dict]:
    """Every plain step cache layout (order 1, the pack's forecast at 0.5) measured on the split; cached."""
    p = setup.path("caches.json")
    table = json.loads(p.read_text()) if p.is_file() else []
    done = {(e["warmup"], e["every"]) for e in table}
    todo = [layout for layout in SC.layouts(setup.steps) if (layout.warmup, layout.every) not in done]
    if not todo:
        return table
    replay = SC.SharedWarmup()  # the unpatched run's calls up to the longest warm-up, recorded once
    longest = max(layout.warmup for layout in todo)
    # A layout with no full step after its warm-up: the recording pass computes the warm-up calls only.
    sample_split(setup, SC.cache_options(SC.Layout(longest, setup.steps + 1), replay=replay))
    replay.recording = False
    for layout in todo:
        t = time.perf_counter()
        e = measure(setup, SC.cache_options(layout, replay=replay),
                    flops_share=layout.full_steps(setup.steps) / setup.steps)
        table.append({"warmup": layout.warmup, "every": layout.every, **e})
        p.write_text(json.dumps(table, indent=1))
        log(f"  cache {layout.name}: {e['flops']:.3f} FLOPs, {e['psnr']:.2f} dB ({time.perf_counter() - t:.0f} s)")
    return table


def fewer_steps(setup: Setup, share: float, sampler: str) -> dict | None:
    """The most steps whose FLOPs are no higher than `share` (None below one step); cached per count."""
    k = math.floor(share * setup.steps + 1e-9)
    if k < 1:
        return None
    k = min(k, setup.steps - 1)
    p = setup.path(f"steps-{sampler}-{k}.json")
    if not p.is_file():
        p.write_text(json.dumps({"steps": k, **measure(setup, None, steps=k, sampler=sampler,
                                                       flops_share=k / setup.steps)}))
    return json.loads(p.read_text())


def fewer_steps_at(setup: Setup, share: float, sampler: str) -> float | None:
    """Fewer steps' PSNR at exactly `share` of the FLOPs: linear between the neighbouring step counts (a
    fractional step count, as compare.py interpolates); None outside 1 .. steps - 1."""
    below = fewer_steps(setup, share, sampler)
    if below is None:
        return None
    k = below["steps"]
    if k / setup.steps >= share - 1e-9:
        return below["psnr"]
    if k + 1 >= setup.steps:
        return None
    above = fewer_steps(setup, (k + 1) / setup.steps, sampler)
    w = share * setup.steps - k
    return below["psnr"] + w * (above["psnr"] - below["psnr"])


def against_caches(result: dict, table: list[dict]) -> dict:
    """Median and best cache at no more FLOPs than `result`, and the margins over them."""
    hit = SC.at_most([(e["flops"], e["psnr"], f"w{e['warmup']} r{e['every']}") for e in table], result["flops"])
    if hit is None:
        return {"caches": 0}
    return {"caches": hit["layouts"], "median": hit["median"], "best": hit["best"], "best_layout": hit["best_layout"],
            "over_median": result["psnr"] - hit["median"], "over_best": result["psnr"] - hit["best"]}


def meets_bar(result: dict, artifact_limit: float = 1.2) -> bool:
    """Issue 22's bar: >= 1 dB over the median cache, no worse than the best, artifact ratio <= the limit."""
    return (result.get("caches", 0) > 0 and result["over_median"] >= 1.0 and result["over_best"] >= 0.0
            and result["artifacts"] <= artifact_limit)


# ---- candidates ---------------------------------------------------------------------------------------

def candidates(steps: int = STEPS, cfg: float = CFG) -> dict[str, Callable]:
    """name -> build(model): every node preset (key as the docs quote it, e.g. "cat:balanced") and compare.py's
    other method rows (the specs' comparison settings, the calibrated schedules), their names as slugs."""
    from tools import compare
    out = {row.key: row.build for row in compare.preset_rows()}
    for row in compare.reference_rows(compare.Settings(steps=steps, cfg=cfg)):
        if row.build is not None and not row.key and not row.baseline:
            out[slug(row.name)] = row.build
    return out


def slug(name: str) -> str:
    """A row name as a command-line word: "CAT, forecast 0 (...)" -> "cat-forecast-0-..."."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def evaluate(setup: Setup, name: str, build: Callable, table: list[dict]) -> dict:
    r = {"name": name, **measure(setup, build)}
    r.update(against_caches(r, table))
    for sampler in ("euler", "ab2"):
        few = fewer_steps(setup, r["flops"], sampler)
        r[f"over_{sampler}"] = None if few is None else r["psnr"] - few["psnr"]
        at = fewer_steps_at(setup, r["flops"], sampler)
        r[f"over_{sampler}_equal"] = None if at is None else r["psnr"] - at
    r["meets_bar"] = meets_bar(r)
    return r


def report(rep: Report, setup: Setup, results: list[dict], table: list[dict]):
    rep(f"## {setup.model_name}, split {setup.split.name} ({setup.split.images} images), {setup.steps} steps, "
        f"CFG {setup.cfg}")
    rep()
    rows = []
    for r in results:
        def db(key):
            v = r.get(key)
            return "-" if v is None else f"{v:+.2f}"
        rows.append([r["name"], f"{r['flops']:.3f}", f"{r['psnr']:.2f}", f"{r['artifacts']:.2f}", r.get("caches", 0),
                     "-" if "median" not in r else f"{r['median']:.2f}",
                     "-" if "best" not in r else f"{r['best']:.2f} ({r['best_layout']})",
                     db("over_median"), db("over_best"), f"{db('over_euler')} / {db('over_euler_equal')}",
                     f"{db('over_ab2')} / {db('over_ab2_equal')}", "yes" if r["meets_bar"] else "no"])
    rep.table(["candidate", "FLOPs", "PSNR dB", "artifacts", "caches at <= FLOPs", "median cache", "best cache",
               "over median", "over best", "over fewer Euler (<= / = FLOPs)", "over fewer AB2 (<= / = FLOPs)",
               "meets bar"], rows)
    rep("Fewer steps: at no more FLOPs (the most steps that fit) / at equal FLOPs (linear between the neighbouring "
        "step counts). Meets bar: >= 1 dB over the median cache, >= the best, artifact ratio <= 1.2.")
    rep()


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=cli.choice_list(sorted(R.MODELS)), default=["128px"])
    p.add_argument("--split", choices=sorted(SPLITS), default="tuning")
    p.add_argument("--steps", type=cli.positive_int, default=STEPS, help="sampling steps (at least 3)")
    p.add_argument("--cfg", type=cli.non_negative_float, default=CFG)
    p.add_argument("--candidates", default="sdtm:balanced,density:balanced,cat:balanced",
                   help="comma list of candidate names (--list shows them); empty: the cache table only")
    p.add_argument("--list", action="store_true", help="print the candidate names and exit")
    p.add_argument("--cache-dir", type=cli.out_dir, default=DEFAULT_CACHE_DIR,
                   help="where the unpatched images, the cache table and the fewer-steps runs are kept")
    p.add_argument("--threads", type=cli.non_negative_int, default=1)
    p.add_argument("--out", type=cli.out_file, help="also write the report (markdown) here, and the results as JSON beside it")
    args = p.parse_args(argv)
    if args.steps < 3:  # a layout needs a warm-up of 2 below the steps
        p.error(f"--steps must be at least 3, got {args.steps}")
    known = candidates(args.steps, args.cfg)
    args.names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown candidate {', '.join(unknown)}; --list shows them")
    cli.writable_file(p, args.out)
    if not args.list:
        for name in args.model:
            cli.weights_file(p, R.MODELS[name], f"--model {name}")
        cli.writable_dir(p, args.cache_dir, "--cache-dir")
    return args, known


def main(argv=None):
    args, known = parse_args(argv)
    if args.list:
        print("\n".join(known))
        return []
    rep = Report()
    rep.header("Step-cache bar", "cpu", "tools/cache_bar.py", sys.argv[1:] if argv is None else list(argv))
    out = []
    with cli.torch_threads(args.threads), torch.inference_mode():
        for name in args.model:
            setup = Setup(name, SPLITS[args.split], args.steps, args.cfg, args.cache_dir)
            table = cache_table(setup)
            results = [evaluate(setup, n, known[n], table) for n in args.names]
            report(rep, setup, results, table)
            out.append({"model": name, "split": args.split, "steps": args.steps, "cfg": args.cfg,
                        "caches": table, "results": results})
    rep.write(args.out, out)
    return out


if __name__ == "__main__":
    main()
