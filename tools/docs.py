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
PRIMARY = ("128px", 10)  # the evidence run the README quotes


def evidence(model: str, steps: int) -> dict | None:
    path = EVIDENCE / f"{model}-{steps}steps.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evidence_command(model: str, steps: int) -> str:
    """The command that wrote an evidence page, as its header (tools/report.py) records it."""
    page = (EVIDENCE / f"{model}-{steps}steps.md").read_text()
    return re.search(r"^- Command: `(.+)`$", page, re.M).group(1)


def _flux_dev_flops() -> dict:
    """Block FLOPs relative to unpatched at Flux-dev 1024x1024, 28 steps, per node preset (a dry run)."""
    from tools import benchmark
    arch = benchmark.ARCHS["flux-1024"]
    return {key: benchmark.dry_run(arch, make()).flops_share(arch.width, arch.mlp_ratio)
            for key, make in benchmark.preset_methods().items()}


def choose() -> str:
    """Which node and preset for which goal: FLOPs at Flux-dev size, fidelity on the reference model."""
    ev = evidence(*PRIMARY)
    model, steps = PRIMARY
    if ev is None:
        return (f"No evidence run yet: `python tools/compare.py --model {model} --steps {steps} --sections reference "
                f"--out docs/evidence/{model}-{steps}steps.md` writes the numbers this table quotes.")
    flux = _flux_dev_flops()
    rows = {r["key"]: r for r in ev["rows"] if r["key"]}
    lines = ["| node | preset | work kept at Flux-dev 1024², 28 steps | work kept here | PSNR vs unpatched | "
             "vs fewer Euler steps, same work | vs fewer AB2 steps, same work | token artifacts |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(flux, key=lambda k: (list(BY_KEY).index(k.split(":")[0]), flux[k])):
        r = rows.get(key)
        if r is None:
            continue
        node, preset = key.split(":")
        vs = ["n/a" if r.get(k) is None else f"{r[k]:+.1f} dB" for k in ("vs_fewer_steps", "vs_fewer_steps_ab2")]
        lines.append(f"| {BY_KEY[node].display_name} | {preset} | {flux[key]:.2f} | {r['flops']:.2f} | {r['psnr']:.1f} dB | "
                     f"{vs[0]} | {vs[1]} | {r['artifacts']:.2f} |")
    better = [f"{BY_KEY[k.split(':')[0]].display_name} {k.split(':')[1]}" for k, r in rows.items()
              if min((r.get(v) for v in ("vs_fewer_steps", "vs_fewer_steps_ab2") if r.get(v) is not None),
                     default=0.0) < 0]
    lines += ["",
              f"Work kept: the transformer blocks' FLOPs relative to the unpatched model, counted at Flux-dev size "
              f"by the dry run of `python tools/benchmark.py --sections flops` (the same count as "
              f"[docs/benchmark.md](docs/benchmark.md)). Fidelity: the pack's {model} reference model, {steps} Euler "
              f"steps, {ev['samples']} images per row, on the CPU, made by `{evidence_command(model, steps)}` "
              f"(`docs/evidence/{model}-{steps}steps.md`): PSNR against the unpatched picture of the same seed; "
              "\"vs fewer steps\": against simply sampling with fewer steps at the same work, with Euler and with "
              "the second-order AB2 sampler (above 0: the node is the better choice); token artifacts: 1 as "
              "unpatched, above 1 per-token noise, below 1 softer detail."]
    if better:
        lines.append(f"Where fewer steps is the better choice on this model: {', '.join(sorted(better))}.")
    elif any(r.get("vs_fewer_steps_ab2") is not None for r in rows.values()):
        key, r = min(((k, r) for k, r in rows.items() if r.get("vs_fewer_steps_ab2") is not None),
                     key=lambda kr: kr[1]["vs_fewer_steps_ab2"])
        lines.append(f"On this model every preset beats fewer steps at the same work, with either sampler; the "
                     f"smallest margin is {BY_KEY[key.split(':')[0]].display_name} {key.split(':')[1]}'s, "
                     f"{r['vs_fewer_steps_ab2']:+.1f} dB over AB2.")
    named = {r["name"]: r for r in ev["rows"]}
    from tools.compare import MERGED_CALLS_IGNORED, REUSE_ONLY
    ablations = [(name, named[name]) for name in (MERGED_CALLS_IGNORED, REUSE_ONLY) if name in named]
    if ablations:
        lines += ["", "What the merging and the token choice add, on the same run:"]
        lines += [f"- {name}: {r['flops']:.2f} of the work, {r['psnr']:.1f} dB" for name, r in ablations]
    return "\n".join(lines)


BLOCKS = {"support-matrix": support_matrix, "choose": choose}


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
