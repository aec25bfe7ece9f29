"""Thumbnails of the example workflows for ComfyUI's template browser: workflows/<name>.jpg.

The template browser shows `<name>.jpg`, next to `<name>.json`, as the picture of that workflow's card, in a
square about 260 px wide (frontends 1.27 and 1.49), under the file name as the card's title; it reads no
description from a pack (1.49 shows none, 1.27 repeats the name). So each picture is a card that says what the
workflow is about in type that reads at that size: the model family, the pack's nodes in it (their display
names), what it makes, the ComfyUI it needs when that is newer than the oldest supported, and, on the quick
start, "start here". Its JPEG comment holds that text; tests/host/test_workflows.py checks that every picture
shows its workflow's current text.

    COMFYUI_PATH=~/ComfyUI <host venv>/bin/python tools/thumbnails.py [--cards-only] [name ...]

Run it with the newest supported host. It first loads every workflow in the real frontend (tools/frontend.py:
ComfyUI on 127.0.0.1 and headless Chromium) and saves the node sizes the frontend draws back into the
workflow (nodes grow when an input is added); --cards-only skips that and only draws the cards.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import cli, comfy_host, frontend, workflows  # noqa: E402

WORKFLOWS = ROOT / "workflows"
SIZE = (512, 512)    # the browser shows a square
QUALITY = 88
COMMENT = "card: "
QUICK_START = "(start here)"   # the quick start's name ends so (web/templates.js puts it first)
# Each card's colour: that of the first of these node types in the workflow.
ACCENT = {"CATPruningPatchModel": (64, 196, 170), "SDTMPatchModel": (150, 120, 240),
          "TokenDensityPatchModel": (236, 170, 60)}
VIDEO_OUTPUTS = {"SaveVideo", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM", "CreateVideo"}
IMAGE_INPUTS = {"LoadImage", "LoadVideo"}


def jpeg_comment(data: bytes) -> str | None:
    """The text of a JPEG's first comment (COM) segment, read without an imaging library."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xFE:
            return data[i + 4:i + 2 + length].decode("ascii", "replace")
        if marker == 0xDA:  # start of scan: no header segment follows
            return None
        i += 2 + length
    return None


def pack_display_names() -> dict[str, str]:
    """{node type: display name} of the pack's nodes (needs the host imported)."""
    return {t: cls.define_schema().display_name for t, cls in comfy_host.pack_nodes().items()}


def card(path: Path, display_names: dict[str, str]) -> dict:
    """What the card of the workflow at `path` says, from its name (`<family> - <what it shows>`) and nodes;
    `display_names`: {node type: display name} of the pack's nodes."""
    wf = json.loads(path.read_text())
    types = [n["type"] for n in wf["nodes"]]
    pack = list(dict.fromkeys(t for t in types if t in display_names))
    source = "image" if IMAGE_INPUTS & set(types) else "text"
    target = "video" if VIDEO_OUTPUTS & set(types) else "image"
    needs = wf.get("extra", {}).get("requires_comfyui", "")
    return {"family": path.stem.split(" - ")[0], "nodes": [display_names[t] for t in pack],
            "makes": f"{source} to {target}", "needs": f"needs ComfyUI {needs.lstrip('>=')} or newer" if needs else "",
            "start_here": path.stem.endswith(QUICK_START),
            "accent": next((ACCENT[t] for t in ACCENT if t in pack), (120, 160, 220))}


def card_text(c: dict) -> str:
    """The card's text in one line (its JPEG comment)."""
    return " | ".join([c["family"], " + ".join(c["nodes"]), c["makes"], c["needs"], "start here" * c["start_here"]])


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _fit(draw, texts: list[str], width: int, height: int, sizes: range, spacing: float):
    """(font, lines): the largest of `sizes` at which `texts`, each wrapped at spaces to `width`, fit in
    `height` (the smallest size regardless)."""
    from PIL import ImageFont
    for size in sizes:
        font = ImageFont.load_default(size=size)
        lines = [line for text in texts for line in _wrap(draw, text, font, width)]
        if len(lines) * size * spacing <= height and all(draw.textlength(x, font=font) <= width for x in lines):
            break
    return font, lines


def draw_card(c: dict):
    """The card as a PIL image: the family in large type, the nodes (one a line) in the card's colour, what it
    makes and the ComfyUI it needs."""
    from PIL import Image, ImageDraw, ImageFont, features
    if not features.check("freetype2"):
        raise RuntimeError("Pillow without FreeType cannot draw the cards' type")
    w, h = SIZE
    foot = ImageFont.load_default(size=24)
    margin, accent, muted, white = 36, c["accent"], (150, 156, 168), (240, 242, 246)
    img = Image.new("RGB", SIZE, (22, 24, 30))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, 14], fill=accent)
    small = ImageFont.load_default(size=28)
    # The top left stays free of text: frontend 1.49 lays its "Node graph" badge over it.
    if c["start_here"]:
        label = "START HERE"
        right = w - margin
        left = right - draw.textlength(label, font=small) - 28
        draw.rounded_rectangle([left, 40, right, 88], radius=24, fill=accent)
        draw.text((left + 14, 48), label, font=small, fill=(16, 18, 22))
    footer = [x for x in (c["makes"].upper(), c["needs"], "Token Reduction") if x]
    bottom = h - margin - 32 * len(footer)
    # The family on one line if it reads large enough so, else on two.
    font, lines = _fit(draw, [c["family"]], w - 2 * margin, 110, range(104, 63, -4), 1.15)
    if len(lines) > 1:
        font, lines = _fit(draw, [c["family"]], w - 2 * margin, 220, range(104, 47, -4), 1.15)
    y = 112
    for line in lines:
        draw.text((margin, y), line, font=font, fill=white, stroke_width=2, stroke_fill=white)
        y += round(font.size * 1.15)
    y += 16
    font, lines = _fit(draw, c["nodes"], w - 2 * margin, bottom - y, range(44, 23, -2), 1.25)
    for line in lines:
        draw.text((margin, y), line, font=font, fill=accent)
        y += round(font.size * 1.25)
    for k, line in enumerate(footer):
        draw.text((margin, h - margin - 32 * (len(footer) - k) + 4), line, font=small if k == 0 else foot, fill=muted)
    return img


def save_card(path: Path, display_names: dict[str, str]) -> Path:
    c = card(path, display_names)
    out = path.with_suffix(".jpg")
    draw_card(c).save(out, "JPEG", quality=QUALITY, optimize=True, comment=(COMMENT + card_text(c)).encode("ascii"))
    return out


def load_fitted(page, path: Path) -> bool:
    """Load the workflow; when the frontend draws a node larger than saved (an input was added), save the
    drawn sizes back, with the nodes below moved down (tools/workflows.fit_sizes), and load it again.
    True when the file changed."""
    wf = json.loads(path.read_text())
    frontend.load_workflow(page, wf)
    if not workflows.fit_sizes(wf, frontend.drawn_sizes(page)):
        return False
    path.write_text(json.dumps(wf, indent=2) + "\n")
    frontend.load_workflow(page, wf)
    return True


def fit_sizes_in_frontend(paths: list[Path]) -> int:
    """Load each workflow in the real frontend and save the sizes it draws back; 1 when that cannot run."""
    chromium = frontend.chromium()
    comfy_root = comfy_host.find_comfyui()[0]
    if chromium is None or comfy_root is None:
        print("fitting node sizes needs Chromium and a ComfyUI checkout (COMFYUI_PATH); --cards-only skips it",
              file=sys.stderr)
        return 1
    with frontend.comfy_server(comfy_root) as server, frontend.open_page(server["url"], chromium) as page:
        for path in paths:
            if load_fitted(page, path):
                print(f"{path.relative_to(ROOT)}: node sizes now as drawn")
    return 0


def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="only these workflows (file names without .json; default: all)")
    p.add_argument("--cards-only", action="store_true", help="draw the cards without fitting node sizes first")
    args = p.parse_args(argv)
    paths = [WORKFLOWS / f"{n}.json" for n in args.names] if args.names else sorted(WORKFLOWS.glob("*.json"))
    missing = [q.name for q in paths if not q.is_file()]
    if missing:
        p.error(f"no workflow {', '.join(missing)} in {WORKFLOWS}")
    err = comfy_host.import_host()
    if err:
        p.error(f"needs the ComfyUI host (the pack's node names): {err}")
    if not args.cards_only:
        too_new = [f"{q.name} {why}" for q in paths
                   if (why := comfy_host.workflow_needs_newer_host(json.loads(q.read_text())))]
        if too_new:
            print("this host cannot load every workflow; run with the newest one:\n" + "\n".join(too_new),
                  file=sys.stderr)
            return 1
        if fit_sizes_in_frontend(paths):
            return 1
    names = pack_display_names()
    for path in paths:
        out = save_card(path, names)
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
