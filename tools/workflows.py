"""Keep the example workflows in step with the pack's node inputs (needs a ComfyUI checkout).

    python tools/workflows.py            # rewrite the widget values of the pack's patch nodes in workflows/
    python tools/workflows.py --check    # exit 1 if any would change

A patch node with a named preset holds that preset's values (what the frontend shows and what runs); a
custom node keeps its values by input name, and an input it does not have yet gets its default.
tests/host/test_workflows.py checks the same.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import importlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402

from tools import cli, comfy_host, frontend  # noqa: E402


def synced(node_cls, patching, values: list, old_names: list[str] | None) -> list:
    """The widget values a node of `node_cls` should hold, from its stored `values` (named `old_names`)."""
    widgets = [i for i in node_cls.define_schema().inputs if i.id != "model" and not getattr(i, "optional", False)]
    stored = dict(zip(old_names or [w.id for w in widgets], values))
    preset = stored.get("preset", "custom")
    named = patching.preset_widgets(node_cls)["presets"].get(preset, {})
    return [named.get(w.id, stored.get(w.id, w.default)) for w in widgets]


def overlapping(boxes: dict) -> list:
    """The pairs of {id: (left, top, right, bottom)} rectangles that overlap."""
    return [((a, ra), (b, rb)) for (a, ra), (b, rb) in itertools.combinations(boxes.items(), 2)
            if not (ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1])]


def fit_sizes(wf: dict, drawn: dict) -> bool:
    """Give each node the size the frontend draws it at (`drawn`: frontend.drawn_sizes, as tools/thumbnails.py
    reads it); a node that grew pushes the nodes below it in its column down by as much, so none comes to
    overlap. True when anything changed."""
    changed = False
    for node in sorted(wf["nodes"], key=lambda n: n["pos"][1]):
        size = [round(v) for v in drawn.get(frontend.node_key(node["id"]), node["size"])]
        if size == list(node["size"]):
            continue
        grow = size[1] - node["size"][1]
        if grow > 0:
            left, bottom = node["pos"][0], node["pos"][1] + node["size"][1]
            right = left + max(size[0], node["size"][0])
            for other in wf["nodes"]:
                below = other is not node and other["pos"][1] >= bottom
                if below and other["pos"][0] < right and left < other["pos"][0] + other["size"][0]:
                    other["pos"] = [other["pos"][0], other["pos"][1] + grow]
        node["size"], changed = size, True
    return changed


OLD_ORDER = {  # widget names of workflows saved before an input was added, by value count
    ("SDTMPatchModel", 13): ["preset", "ratio", "deviation", "switch_percent", "window", "skip_first_blocks",
                             "skip_last_blocks", "dynamic_merge", "ratio_adjust", "prompt_reweight", "start_percent",
                             "end_percent", "detail_cache"],
    ("TokenDensityPatchModel", 9): ["preset", "stage_windows", "bottom_dense", "top_dense", "span_pattern",
                                    "proportional_attention", "start_percent", "end_percent", "detail_cache"],
    ("CATPruningPatchModel", 9): ["preset", "ratio", "full_percent", "refresh_every", "clusters", "balance",
                                  "start_percent", "end_percent", "forecast"],
}


def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report workflows that are out of step (exit 1)")
    args = p.parse_args(argv)
    err = comfy_host.import_host()
    if err:
        p.error(f"needs the ComfyUI host: {err}")
    nodes = comfy_host.pack_nodes()
    patching = importlib.import_module(f"{comfy_host.PACK_NAME}.nodes.patching")
    stale = []
    for path in sorted((ROOT / "workflows").glob("*.json")):
        wf = json.loads(path.read_text())
        changed = False
        for n in wf["nodes"]:
            cls = nodes.get(n["type"])
            if cls is None or not hasattr(cls, "PRESETS"):
                continue
            values = n.get("widgets_values", [])
            new = synced(cls, patching, values, OLD_ORDER.get((n["type"], len(values))))
            if new != values:
                n["widgets_values"], changed = new, True
        if changed:
            stale.append(path)
            if not args.check:
                path.write_text(json.dumps(wf, indent=2) + "\n")
    for path in stale:
        print(f"{path.relative_to(ROOT)}: {'out of step' if args.check else 'rewritten'}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
