"""Thumbnails of the example workflows for ComfyUI's template browser: workflows/<stem>.jpg.

The template browser (Templates -> Extensions -> the pack's folder) shows `<stem>.jpg`, next to
`<stem>.json`, as the picture of that workflow's card. Each thumbnail is a screenshot of the workflow
in the real frontend (tools/frontend.py: ComfyUI on 127.0.0.1 and headless Chromium), the whole graph
fitted into a 1600x1000 window with the frontend's panels hidden, cropped to the graph; it is saved as a
small JPEG
whose comment holds the sha256 of the workflow file it shows (tests/host/test_workflows.py checks that
each is current).

    COMFYUI_PATH=~/ComfyUI <host venv>/bin/python tools/thumbnails.py [stem ...]

Run it with the newest supported host: it loads every workflow. It first saves the node sizes the frontend
draws back into each workflow (nodes grow when an input is added), so the files and pictures agree.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import comfy_host, frontend, workflows  # noqa: E402

WORKFLOWS = ROOT / "workflows"
SIZE = (640, 400)    # the thumbnail, from the 1600x1000 window
QUALITY = 80
# The frontend's panels off and its text drawn at any zoom, so that the picture is the graph.
SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1}
COMMENT = "workflow sha256 "


def workflow_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


# JS: the screen rectangle [left, top, right, bottom] around every node, title bars included.
GRAPH_BOUNDS = """(() => {
    const ds = app.canvas.ds, t = LiteGraph.NODE_TITLE_HEIGHT, b = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of app.graph._nodes) {
        b[0] = Math.min(b[0], (n.pos[0] + ds.offset[0]) * ds.scale);
        b[1] = Math.min(b[1], (n.pos[1] - t + ds.offset[1]) * ds.scale);
        b[2] = Math.max(b[2], (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale);
        b[3] = Math.max(b[3], (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale);
    }
    return b;
})()"""


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


def shoot(page, path: Path):
    """(screenshot PNG bytes, the graph's screen bounds) of the workflow just loaded, fitted into view."""
    page.close_dialogs()
    page.eval("(async () => { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); "
              "app.graph.setDirtyCanvas(true, true); return true; })()")
    time.sleep(1.0)  # a few frames: DOM widgets follow the canvas
    return page.screenshot(ROOT / "out" / "thumbnails" / f"{path.stem}.png"), page.eval(GRAPH_BOUNDS)


def frame(bounds, width: int, height: int, margin: int = 16):
    """A crop box around `bounds` with the thumbnail's aspect, inside the width x height screenshot."""
    left, top, right, bottom = bounds[0] - margin, bounds[1] - margin, bounds[2] + margin, bounds[3] + margin
    aspect = SIZE[0] / SIZE[1]
    w, h = right - left, bottom - top
    if w / h < aspect:
        w = h * aspect
    else:
        h = w / aspect
    w, h = min(w, width), min(h, height)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0 = min(max(cx - w / 2, 0), width - w)
    y0 = min(max(cy - h / 2, 0), height - h)
    return round(x0), round(y0), round(x0 + w), round(y0 + h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stems", nargs="*", help="only these workflows (default: all)")
    args = p.parse_args(argv)
    from PIL import Image

    paths = [WORKFLOWS / f"{s}.json" for s in args.stems] if args.stems else sorted(WORKFLOWS.glob("*.json"))
    too_new = [f"{q.name} {why}" for q in paths if (why := comfy_host.workflow_needs_newer_host(json.loads(q.read_text())))]
    if too_new:
        print("this host cannot load every workflow; run with the newest one:\n" + "\n".join(too_new), file=sys.stderr)
        return 1
    chromium = frontend.chromium()
    comfy_root = comfy_host.find_comfyui()[0]
    if chromium is None or comfy_root is None:
        print("needs Chromium and a ComfyUI checkout (COMFYUI_PATH)", file=sys.stderr)
        return 1
    with frontend.comfy_server(comfy_root) as server, frontend.open_page(server["url"], chromium) as page:
        page.eval("(async () => { for (const [k, v] of Object.entries(%s)) await app.extensionManager.setting.set(k, v); "
                  "await app.extensionManager.command.execute('Workspace.ToggleFocusMode'); return true; })()"
                  % json.dumps(SETTINGS))
        time.sleep(0.5)
        for path in paths:
            if load_fitted(page, path):
                print(f"{path.relative_to(ROOT)}: node sizes now as drawn")
            png, bounds = shoot(page, path)
            picture = Image.open(io.BytesIO(png)).convert("RGB")
            picture = picture.crop(frame(bounds, *picture.size)).resize(SIZE, Image.LANCZOS)
            out = path.with_suffix(".jpg")
            picture.save(out, "JPEG", quality=QUALITY, optimize=True,
                         comment=(COMMENT + workflow_digest(path)).encode("ascii"))
            print(f"{out.relative_to(ROOT)}: {out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
