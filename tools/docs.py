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
import re  # noqa: E402

from kernels.registry import METHODS, REGISTRY, TESTED_COMFYUI  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def support_matrix() -> str:
    rows = ["| family | " + " | ".join(METHODS.values()) + " | example workflow |",
            "|---|" + "---|" * len(METHODS) + "---|"]
    for e in REGISTRY:
        if e.refused:
            cells = [f"no: {e.refused}"] + ["no"] * (len(METHODS) - 1)
        else:
            cells = [f"no: {e.refused_methods[k]}" if k in e.refused_methods else "yes" for k in METHODS]
        workflow = f"[`{e.workflow}`](workflows/{e.workflow})" if e.workflow else ""
        rows.append(f"| {e.label} | " + " | ".join(cells) + f" | {workflow} |")
    rows.append("")
    rows.append(f"Tested on ComfyUI {' and '.join(TESTED_COMFYUI)}, the oldest and the newest this pack supports.")
    return "\n".join(rows)


BLOCKS = {"support-matrix": support_matrix}


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
