"""Generated parts of the docs: the support matrix comes from kernels/registry.py, never typed by hand.

    python tools/docs.py            # rewrite the generated blocks of README.md and docs/*.md
    python tools/docs.py --check    # exit 1 if any generated block is out of date (the tests run this)

A generated block sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->` lines.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import urllib.parse  # noqa: E402

from kernels.methods import BY_KEY, SPECS  # noqa: E402
from kernels.registry import REGISTRY, TESTED_COMFYUI  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def support_matrix() -> str:
    columns = [spec.name for spec in SPECS] + ["Maps"]
    rows = ["| family | " + " | ".join(columns) + " | example workflow |",
            "|---|" + "---|" * len(columns) + "---|"]
    for e in REGISTRY:
        if e.refused:
            cells = [f"no: {e.refused}"] + ["no"] * (len(columns) - 1)
        else:
            cells = ["yes"] * len(SPECS) + [f"no: {e.refused_features['maps']}" if "maps" in e.refused_features else "yes"]
        workflow = f"[`{e.workflow}`](workflows/{urllib.parse.quote(e.workflow)})" if e.workflow else ""
        rows.append(f"| {e.label} | " + " | ".join(cells) + f" | {workflow} |")
    rows.append("")
    rows.append(f"Tested on ComfyUI {' and '.join(TESTED_COMFYUI)}, the oldest and the newest this pack supports.")
    return "\n".join(rows)


EVIDENCE = ROOT / "docs" / "evidence"


def _flux_dev_flops() -> dict:
    """Block FLOPs relative to unpatched at Flux-dev 1024x1024, 28 steps, per node preset (a dry run)."""
    from tools import benchmark
    arch = benchmark.ARCHS["flux-1024"]
    return {key: benchmark.dry_run(arch, make()).flops_share(arch.width, arch.mlp_ratio)
            for key, make in benchmark.preset_methods().items()}


BAR_STEPS = 28         # the step-cache bar's evidence the README's table quotes (issue 22: Flux-dev's 20-50 steps)
FEW_STEPS = (4, 8)     # the few-step runs it compares with fewer steps
BAR_MODEL = "128px"    # the reference model the table lists; the lines below it cover every model


def bar_evidence(steps: int) -> list | None:
    """tools/cache_bar.py's results on the held-out split at `steps` (one entry per reference model)."""
    path = EVIDENCE / f"step-cache-{steps}steps.json"
    return json.loads(path.read_text()) if path.is_file() else None


def bar_command(steps: int) -> str:
    page = (EVIDENCE / f"step-cache-{steps}steps.md").read_text()
    return re.search(r"^- Command: `(.+)`$", page, re.M).group(1)


def _node_preset(key: str) -> tuple[str, str]:
    node, preset = key.split(":")
    return BY_KEY[node].display_name, preset


def _db(value) -> str:
    return "n/a" if value is None else f"{value:+.1f} dB"


def _magnitudes(values) -> str:
    lo, hi = min(abs(v) for v in values), max(abs(v) for v in values)
    return f"{lo:.1f} dB" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f} to {hi:.1f} dB"


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:+.1f} dB" if f"{lo:+.1f}" == f"{hi:+.1f}" else f"{lo:+.1f} to {hi:+.1f} dB"


def choose() -> str:
    """Which node and preset for which goal: FLOPs at Flux-dev size; fidelity on the reference models against
    the plain step cache and fewer steps at the same work (tools/cache_bar.py, held-out split)."""
    ev = bar_evidence(BAR_STEPS)
    if ev is None:
        return (f"No evidence run yet: `python tools/cache_bar.py --model 128px,64px --split held-out --steps "
                f"{BAR_STEPS} --out docs/evidence/step-cache-{BAR_STEPS}steps.md` writes the numbers this table quotes.")
    flux = _flux_dev_flops()
    entry = next(e for e in ev if e["model"] == BAR_MODEL)
    rows = {r["name"]: r for r in entry["results"]}
    lines = ["| node | preset | work kept at Flux-dev 1024², 28 steps | work kept here | PSNR vs unpatched | "
             "best step cache at no more work | vs that cache | vs the median step cache | "
             "vs fewer Euler / AB2 steps, same work | token artifacts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(flux, key=lambda k: (list(BY_KEY).index(k.split(":")[0]), flux[k])):
        r = rows.get(key)
        if r is None:
            continue
        node, preset = _node_preset(key)
        best = "none" if r.get("best") is None else f"{r['best']:.1f} dB ({r['best_layout']})"
        lines.append(f"| {node} | {preset} | {flux[key]:.2f} | {r['flops']:.2f} | {r['psnr']:.1f} dB | {best} | "
                     f"{_db(r.get('over_best'))} | {_db(r.get('over_median'))} | "
                     f"{_db(r.get('over_euler_equal'))} / {_db(r.get('over_ab2_equal'))} | {r['artifacts']:.2f} |")
    every = [r for e in ev for r in e["results"] if r.get("over_best") is not None]
    at_best = [r for r in every if r["over_best"] >= 0]
    below = [r["over_best"] for r in every if r["over_best"] < 0]
    models = " and ".join(e["model"] for e in ev)
    lines += ["",
              f"Work kept: the transformer blocks' FLOPs relative to the unpatched model, counted at Flux-dev size "
              f"by the dry run of `python tools/benchmark.py --sections flops` (the same count as "
              f"[docs/benchmark.md](docs/benchmark.md)), and on the reference model. Fidelity: the pack's "
              f"{BAR_MODEL} reference model, {BAR_STEPS} Euler steps at CFG {entry['cfg']}, the held-out split "
              f"({_images(entry)} images whose seeds and classes no setting was tuned on), on the CPU, made by "
              f"`{bar_command(BAR_STEPS)}` (`docs/evidence/step-cache-{BAR_STEPS}steps.md`). A plain step cache runs "
              "the full model at a warm-up and then every few steps and carries its last output along the trend "
              "in between, with no token work (`tools/step_cache.py`); every such layout whose work is no higher "
              "than the preset's is compared (layout: warm-up w, a full step every r). \"vs fewer steps\": "
              "simply sampling fewer steps at the same work. Above 0: the node is the better choice. Token "
              "artifacts: 1 as unpatched, above 1 per-token noise, below 1 softer detail.",
              "",
              f"On both reference models ({models}) at {BAR_STEPS} steps, every preset is "
              f"{_span([r['over_median'] for r in every])} against the median step cache at no more work. "
              + (f"Against the best such cache, {len(at_best)} of {len(every)} are at or above it and the others "
                 f"{_magnitudes(below)} below it. Which layout is best differs by model and by budget ("
                 f"{_and(sorted({r['best_layout'] for r in every if r['name'].endswith(':balanced')}))} for the "
                 "balanced presets), so a layout picked without measuring lands near the median; one picked by "
                 "measuring on your model keeps the picture as well as these presets at the same work. The pack's "
                 "own bar (at least 1 dB over the median cache and no worse than the best) is not met at "
                 f"{BAR_STEPS} steps" + _where_met() + " ([docs/evidence.md](docs/evidence.md))." if below else
                 "Every preset is at or above the best such cache.")]
    return "\n".join(lines)


def _where_met() -> str:
    """'; it is met at 10 steps on 128px by A and B, ...' over every bar run of 10 steps or more."""
    met = []
    for path in _bar_pages():
        for e in json.loads(path.read_text()):
            by_node: dict = {}
            for r in e["results"]:
                if ":" in r["name"] and r["meets_bar"]:
                    node, preset = _node_preset(r["name"])
                    by_node.setdefault(node, []).append(preset)
            if e["steps"] >= 10 and e["steps"] != BAR_STEPS and by_node:
                names = [f"{node} {_and(presets)}" for node, presets in by_node.items()]
                met.append(f"at {e['steps']} steps on {e['model']} by {_and(names)}")
    return f"; it is met {'; '.join(met)}" if met else ""


def _bar_pages() -> list[Path]:
    """The step-cache bar's JSON pages, fewest steps first."""
    return sorted(EVIDENCE.glob("step-cache-*steps*.json"), key=lambda p: (int(re.search(r"(\d+)steps", p.name)[1]), p.name))


def _images(entry: dict) -> int:
    from tools.cache_bar import SPLITS
    return SPLITS[entry["split"]].images


def few_steps() -> str:
    """Each preset at a few steps against simply sampling fewer steps at no more work, every model."""
    evs = {k: bar_evidence(k) for k in FEW_STEPS}
    if any(ev is None for ev in evs.values()):
        return ("No few-step evidence yet: `python tools/cache_bar.py --model 128px,64px --split held-out --steps "
                "4 --cfg 4 --out docs/evidence/step-cache-4steps.md` (and 8) writes it.")
    columns = [(k, e["model"]) for k, ev in evs.items() for e in ev]
    results = {(k, e["model"]): {r["name"]: r for r in e["results"]} for k, ev in evs.items() for e in ev}
    keys = [k for k in results[columns[0]] if ":" in k]
    lines = ["| node | preset | " + " | ".join(f"{k} steps, {m}" for k, m in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    ahead = {k: [] for k in FEW_STEPS}  # the presets above fewer steps on every model, per step count
    for key in keys:
        cells = []
        for col in columns:
            margin, mark = _few_steps_margin(results[col].get(key))
            cells.append(_db(margin) + mark)
        for k in FEW_STEPS:
            margins = [_few_steps_margin(results[col].get(key))[0] for col in columns if col[0] == k]
            if all(m is not None and m >= 0 for m in margins):
                ahead[k].append(key)
        node, preset = _node_preset(key)
        lines.append(f"| {node} | {preset} | " + " | ".join(cells) + " |")
    commands = ", ".join(f"`{bar_command(k)}`" for k in FEW_STEPS)
    lines += ["",
              "Each cell: the preset's PSNR against the better of fewer Euler or fewer AB2 steps at the same work "
              "(PSNR interpolated between the neighbouring step counts; \\* where the preset keeps more work than "
              "one step less: against one step less), on the held-out split; below 0, sampling fewer steps is the "
              f"better choice. Made by {commands}.",
              ""]
    lines.append(" ".join(
        f"At {k} steps, " + ("no preset beats fewer steps on every reference model." if not ahead[k] else
                             f"only {_and([' '.join(_node_preset(key)) for key in ahead[k]])} beat fewer steps on "
                             "every reference model.") for k in FEW_STEPS))
    return "\n".join(lines)


def splits() -> str:
    """The tuning and held-out splits of tools/cache_bar.py (the code is their one home)."""
    from tools.cache_bar import SPLITS
    lines = ["| split | images | noise seeds | classes |", "|---|---|---|---|"]
    for split in SPLITS.values():
        seeds = [seed for seed, _ in split.batches]
        classes = sorted({c for _, cs in split.batches for c in cs})
        lines.append(f"| {split.name} | {split.images} | {min(seeds)}-{max(seeds)} | {_and([str(c) for c in classes])} |")
    return "\n".join(lines)


def bar_summary() -> str:
    """Every step-cache bar run: per step count and model, the presets against the plain step caches."""
    lines = ["| steps | model | presets | vs the median step cache | vs the best step cache | at or above the best | "
             "meet the bar | page |", "|---|---|---|---|---|---|---|---|"]
    for path in _bar_pages():
        for e in json.loads(path.read_text()):
            rs = [r for r in e["results"] if ":" in r["name"] and r.get("caches")]
            if not rs:
                continue
            lines.append(f"| {e['steps']} | {e['model']} | {len(rs)} | {_span([r['over_median'] for r in rs])} | "
                         f"{_span([r['over_best'] for r in rs])} | {sum(r['over_best'] >= 0 for r in rs)} | "
                         f"{sum(bool(r['meets_bar']) for r in rs)} | [{path.stem}.md](evidence/{path.stem}.md) |")
    return "\n".join(lines)


def _and(items: list) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _few_steps_margin(r: dict | None) -> tuple[float | None, str]:
    """(margin over the better fewer-steps sampler at equal work, or at no more work marked "\\*"; mark)."""
    if r is None:
        return None, ""
    for suffix, mark in (("_equal", ""), ("", "\\*")):
        vs = [r.get(f"over_{sampler}{suffix}") for sampler in ("euler", "ab2")]
        if all(v is not None for v in vs):
            return min(vs), mark
    return None, ""


BLOCKS = {"support-matrix": support_matrix, "choose": choose, "few-steps": few_steps, "splits": splits,
          "bar-summary": bar_summary}


def render(text: str) -> str:
    def fill(m):
        name = m.group(1)
        if name not in BLOCKS:
            raise SystemExit(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return f"<!-- generated: {name} -->\n{BLOCKS[name]()}\n<!-- end: {name} -->"
    return re.sub(r"<!-- generated: ([\w-]+) -->\n.*?<!-- end: \1 -->", fill, text, flags=re.S)


def stale() -> list[Path]:
    return [p for p in DOCS if p.is_file() and render(p.read_text()) != p.read_text()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report out-of-date generated blocks (exit 1)")
    args = p.parse_args(argv)
    out_of_date = stale()
    if args.check:
        for path in out_of_date:
            print(f"{path.relative_to(ROOT)}: generated block out of date; run python tools/docs.py")
        return 1 if out_of_date else 0
    for path in out_of_date:
        path.write_text(render(path.read_text()))
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
