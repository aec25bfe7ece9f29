"""The example workflows in workflows/ load in ComfyUI's frontend and validate against the host.

- Core (no host): every file is JSON in the frontend's UI format (what "Save" writes and
  drag-and-drop reads), with links that agree with the nodes' input and output slots; no two node
  rectangles (title bar included) overlap and the note starts in view; the note is titled with what
  the pack does there (its methods, the family) and names a preset to try and every model file; every
  model file has a download hint.
- Host: every node type is registered (ComfyUI's built-in nodes, comfy_extras included, plus this
  pack's nodes), every link carries the type its source declares and its target accepts, the
  widgets_values of each node fit the node's widgets in the order the frontend saves them (a DynamicCombo's
  chosen option brings its own; inputs and outputs a newer host added after the saved ones are left to
  their defaults), and a patch node running a named preset holds that preset's values. A workflow whose
  extra.requires_comfyui is newer than the host skips there, with that reason
  (tools.comfy_host.workflow_needs_newer_host).
"""
from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

from kernels.registry import SUPPORTED, TESTED_COMFYUI
from tools.comfy_host import PACK_ROOT, parse_requirement, workflow_needs_newer_host
from tools.thumbnails import COMMENT, SIZE, card, card_text, jpeg_comment, pack_display_names
from tools.workflows import overlapping

WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
IDS = [p.name for p in WORKFLOWS]

# Nodes that only exist in the frontend: they have no Python class and never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a combo whose chosen option brings its own widgets (0.33's SaveVideo)
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Model file combos list the files under ComfyUI/models/, which is empty here: such values
# cannot be checked against the options, only their type.
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- core: the UI format itself ----------------------------------------------------------------

def test_workflows_present():
    assert WORKFLOWS, "workflows/ holds no .json example"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_ui_format(path):
    wf = load(path)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, f"{path.name}: missing top-level {key!r}"
    assert wf["version"] == 0.4
    nodes = {}
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"):
            assert key in n, f"{path.name}: node {n.get('id')} lacks {key!r}"
        assert n["id"] not in nodes, f"{path.name}: duplicate node id {n['id']}"
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        assert n["mode"] == 0, f"{path.name}: node {n['id']} is muted or bypassed"
        assert isinstance(n.get("widgets_values", []), list)
        if n["type"] not in FRONTEND_ONLY:
            assert n["properties"].get("Node name for S&R") == n["type"]
        # Model download hints the frontend shows for missing files: each names a file the node uses.
        for m in n["properties"].get("models", []):
            assert set(m) == {"name", "url", "directory"} and m["url"].startswith("https://"), m
            assert m["name"] in n.get("widgets_values", []), f"{path.name}: node {n['id']} hint {m['name']}"
        nodes[n["id"]] = n
    assert wf["last_node_id"] >= max(nodes)
    assert sorted(n["order"] for n in nodes.values()) == list(range(len(nodes)))

    links = {}
    for link in wf["links"]:
        assert len(link) == 6, f"{path.name}: link {link} is not [id, from, from_slot, to, to_slot, type]"
        lid, src, src_slot, dst, dst_slot, typ = link
        assert lid not in links, f"{path.name}: duplicate link id {lid}"
        links[lid] = link
        assert src in nodes and dst in nodes, f"{path.name}: link {lid} joins unknown nodes"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in (out.get("links") or []), f"{path.name}: output {src}:{src_slot} does not list link {lid}"
        assert inp.get("link") == lid, f"{path.name}: input {dst}:{dst_slot} does not point at link {lid}"
        assert out["type"] == typ == inp["type"], f"{path.name}: link {lid} types {out['type']}/{typ}/{inp['type']}"
        assert nodes[src]["order"] < nodes[dst]["order"], f"{path.name}: link {lid} runs against the order"
    assert wf["last_link_id"] >= max(links, default=0)
    # The other direction: every slot that names a link names one that exists and ends there.
    for n in nodes.values():
        for slot, inp in enumerate(n["inputs"]):
            if inp.get("link") is not None:
                assert links[inp["link"]][3:5] == [n["id"], slot], f"{path.name}: input {n['id']}:{slot}"
        for slot, out in enumerate(n["outputs"]):
            for lid in out.get("links") or []:
                assert links[lid][1:3] == [n["id"], slot], f"{path.name}: output {n['id']}:{slot}"


# ---- core: what a person sees ---------------------------------------------------------------------

TITLE_BAR = 30       # LiteGraph.NODE_TITLE_HEIGHT in both pinned frontends (1.27.10 and 1.32.9)
VIEW = (1600, 1000)  # the canvas the notes must start in, at the workflow's own zoom (extra.ds)
NOTE_TITLE_SHOWN = 200  # this much of a note's title bar (canvas units) must be in view too
# Both pinned frontends draw nodes without text below 8 px / 14 px text = 0.57 zoom (their default level of
# detail): a workflow opens at a zoom where its text is drawn.
MIN_ZOOM = 0.6
NOTES = FRONTEND_ONLY
# The loader types that name model files, and the models/ folder (or folders) each reads.
LOADER_DIRS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
               "TripleCLIPLoader": "text_encoders", "VAELoader": "vae", "CheckpointLoaderSimple": "checkpoints",
               "CLIPVisionLoader": "clip_vision", "LTXVAudioVAELoader": "checkpoints",
               "LTXAVTextEncoderLoader": ("text_encoders", "checkpoints")}
# What a note's title must name for each pack node in the workflow.
METHOD_WORDS = {"SDTMPatchModel": "SDTM", "CATPruningPatchModel": "CAT", "TokenDensityPatchModel": "Density",
                "TokenRatioSchedule": "Token Ratio Schedule", "TokenMapRecorder": "Token Map Recorder",
                "TokenMapOverlay": "Overlay"}
# The family each registry entry's example workflow is for, as its note's title must name it.
FAMILY_OF = {e.workflow: re.split(r" \(| / ", e.label)[0] for e in SUPPORTED}


def rectangles(wf: dict) -> dict:
    """{node id: (left, top, right, bottom)} as drawn, the title bar above pos included."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in wf["nodes"]}


def model_files(node: dict) -> list:
    return [v for v in node.get("widgets_values", []) if isinstance(v, str) and v.lower().endswith(MODEL_FILE_SUFFIXES)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_nodes_do_not_overlap(path):
    assert overlapping(rectangles(load(path))) == [], f"{path.name}: nodes overlap"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_opens_readable_with_the_note_in_view(path):
    wf = load(path)
    ds = wf["extra"].get("ds", {"scale": 1.0, "offset": [0, 0]})
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert scale >= MIN_ZOOM, f"{path.name} opens at zoom {scale}, where the frontend draws no text"
    notes = [n for n in wf["nodes"] if n["type"] in NOTES]
    assert notes, f"{path.name} has no note"
    for n in notes:
        left, top = (n["pos"][0] + ox) * scale, (n["pos"][1] - TITLE_BAR + oy) * scale
        right, bottom = left + NOTE_TITLE_SHOWN * scale, top + TITLE_BAR * scale
        assert 0 <= left and right <= VIEW[0] and 0 <= top and bottom <= VIEW[1], (
            f"{path.name}: note {n['id']} starts at ({left:.0f}, {top:.0f}) on a {VIEW[0]}x{VIEW[1]} canvas")


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_note_says_what_the_pack_does_here(path):
    wf = load(path)
    notes = [n for n in wf["nodes"] if n["type"] in NOTES]
    assert len(notes) == 1, f"{path.name}: one note, titled, says what the pack does here"
    title, text = notes[0].get("title", ""), notes[0]["widgets_values"][0]
    used = {n["type"] for n in wf["nodes"]}
    for t in sorted(used & set(METHOD_WORDS)):
        assert METHOD_WORDS[t] in title, f"{path.name}: note title {title!r} does not name {METHOD_WORDS[t]}"
    if path.name in FAMILY_OF:
        assert FAMILY_OF[path.name] in title, f"{path.name}: note title {title!r} does not name {FAMILY_OF[path.name]}"
    assert "preset" in text, f"{path.name}: the note names no preset to try"
    for n in wf["nodes"]:
        for f in model_files(n):
            assert f in text, f"{path.name}: the note does not list the model file {f}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_every_model_file_has_a_download_hint(path):
    for n in load(path)["nodes"]:
        files = model_files(n)
        hints = {m["name"]: m for m in n["properties"].get("models", [])}
        assert sorted(hints) == sorted(files), f"{path.name}: node {n['id']} hints {sorted(hints)} for {files}"
        for m in hints.values():
            dirs = LOADER_DIRS[n["type"]]
            dirs = (dirs,) if isinstance(dirs, str) else dirs
            assert m["directory"] in dirs, f"{path.name}: {m['name']} goes to {m['directory']}"
            assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"]), m


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_required_comfyui_is_a_tested_version(path):
    extra = load(path)["extra"]
    if "requires_comfyui" in extra:
        version = parse_requirement(extra["requires_comfyui"])
        tested = [tuple(int(x) for x in v.split(".")) for v in TESTED_COMFYUI]
        assert min(tested) < version <= max(tested), f"{path.name}: {extra['requires_comfyui']} vs {TESTED_COMFYUI}"
        assert extra.get("requires_comfyui_reason"), f"{path.name}: say why it needs {extra['requires_comfyui']}"


@pytest.fixture(scope="module")
def display_names(host):
    return pack_display_names()


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_thumbnail_is_current(path, display_names):
    """The template browser shows <name>.jpg as the workflow's picture: a small square JPEG card that
    tools/thumbnails.py drew for this very workflow (its comment holds the card's text: family, the pack's
    nodes in it, what it makes, the ComfyUI it needs)."""
    jpg = path.with_suffix(".jpg")
    assert jpg.is_file(), f"no {jpg.name}: run tools/thumbnails.py"
    data = jpg.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 64 * 1024, f"{jpg.name} is not a small JPEG"
    assert jpeg_comment(data) == COMMENT + card_text(card(path, display_names)), \
        f"{jpg.name} shows an older {path.name}: run tools/thumbnails.py --cards-only '{path.stem}'"
    sof = re.search(rb"\xff[\xc0\xc2]..\x08(..)(..)", data, re.S)
    assert sof and (int.from_bytes(sof[2], "big"), int.from_bytes(sof[1], "big")) == SIZE, jpg.name


def test_every_supported_family_has_its_workflow():
    assert {e.workflow for e in SUPPORTED} <= {p.name for p in WORKFLOWS}


# ---- host: node types, link types, widget values -----------------------------------------------

@pytest.fixture(scope="module")
def registry(host):
    """{node type: class}: ComfyUI's NODE_CLASS_MAPPINGS with comfy_extras loaded, plus this pack."""
    comfy_root = host.find_comfyui()[0].resolve()
    if "nodes" not in sys.modules:
        # ComfyUI's main.py imports its `utils` package before `nodes`; nodes.py then puts comfy/
        # on sys.path, where comfy/utils.py would shadow that package for later imports.
        import utils.install_util  # noqa: F401
    import nodes
    assert Path(nodes.__file__).resolve().parent == comfy_root, f"`nodes` is {nodes.__file__}, not ComfyUI's"
    failed = asyncio.run(nodes.init_builtin_extra_nodes())
    mapping = dict(nodes.NODE_CLASS_MAPPINGS)
    pack = host.pack_nodes()
    mapping.update(pack)
    return mapping, set(pack), failed


def input_type(entry) -> tuple[str, dict]:
    """(type, options) of one INPUT_TYPES entry; a list of choices is a COMBO."""
    typ = entry[0]
    opts = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(typ, (list, tuple)):
        typ, opts = "COMBO", {**opts, "options": list(typ)}
    return typ, opts


def split_inputs(cls) -> tuple[dict, set]:
    """({input name: (type, options)}, {required names})."""
    spec = cls.INPUT_TYPES()
    inputs = {name: input_type(entry) for section in ("required", "optional")
              for name, entry in (spec.get(section) or {}).items()}
    return inputs, set(spec.get("required") or {})


def is_widget(typ: str, opts: dict) -> bool:
    """Also an input of several widget types ("FLOAT,INT"), which the frontend draws as a widget."""
    return ((all(t in WIDGET_TYPES for t in typ.split(",")) or typ == DYNAMIC_COMBO) and not opts.get("forceInput")
            and not opts.get("hidden"))


def expected_widgets(spec: dict, values: list, start: int = 0, prefix: str = "") -> list:
    """[(name, type, options)] of the widgets the frontend draws for these INPUT_TYPES, in the order it saves
    their widgets_values: required then optional inputs; a "control" entry after an input with
    control_after_generate; after a DynamicCombo, the widgets of the option its value chose, named
    "<combo>.<input>" (the frontend's dynamicComboWidget inserts them right after the combo). `start`: the
    position of these widgets' values in `values`."""
    out = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            typ, opts = input_type(entry)
            if not is_widget(typ, opts):
                continue
            out.append((prefix + name, typ, opts))
            if opts.get("control_after_generate"):
                out.append((prefix + name, "control", {}))
            if typ == DYNAMIC_COMBO:
                at = start + len(out) - 1
                chosen = next((o for o in opts["options"] if at < len(values) and o["key"] == values[at]), None)
                if chosen is not None:
                    out += expected_widgets(chosen["inputs"], values, start + len(out), f"{prefix}{name}.")
    return out


def check_value(where: str, typ: str, opts: dict, value):
    if "," in typ:  # several widget types: a value of one of them
        kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}.get(type(value))
        typ = kind if kind in typ.split(",") else typ.split(",")[0]
    if typ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
    elif typ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), \
            f"{where}: {value!r} is not a FLOAT"
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
        return
    elif typ == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
        return
    elif typ == DYNAMIC_COMBO:
        keys = [o["key"] for o in opts["options"]]
        assert value in keys, f"{where}: {value!r} is not one of {keys}"
        return
    elif typ == "COMBO":
        assert isinstance(value, str), f"{where}: {value!r} is not a COMBO choice"
        if value.lower().endswith(MODEL_FILE_SUFFIXES) or any(k.endswith("_upload") for k in opts):
            return  # a model file or the user's own upload: the options list the files on disk, nothing to check
        assert value in opts.get("options", []), f"{where}: {value!r} is not one of {opts.get('options')}"
        return
    if "min" in opts:
        assert value >= opts["min"], f"{where}: {value} < min {opts['min']}"
    if "max" in opts:
        assert value <= opts["max"], f"{where}: {value} > max {opts['max']}"


def check_patch_node(node_cls, values: dict, where: str):
    try:
        node_cls.SPEC.config_for(**values)
    except ValueError as e:
        pytest.fail(f"{where}: the node would reject these settings: {e}")


# Pack nodes whose widget values are checked as a whole (the node's own config validation).
PATCH_NODES = ("SDTMPatchModel", "TokenDensityPatchModel", "CATPruningPatchModel")


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_against_host(host, registry, path):
    mapping, pack_types, failed_extras = registry
    wf = load(path)
    why = workflow_needs_newer_host(wf)
    if why:
        pytest.skip(f"{path.name} {why}")
    nodes = {n["id"]: n for n in wf["nodes"]}
    used = {n["type"] for n in wf["nodes"]}
    missing = sorted(used - set(mapping) - FRONTEND_ONLY)
    assert not missing, (f"{path.name}: node types not registered: {missing}"
                         + (f" (comfy_extras that failed to import: {failed_extras})" if failed_extras else ""))
    assert used & pack_types, f"{path.name} uses none of this pack's nodes ({sorted(pack_types)})"

    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        cls = mapping[n["type"]]
        where = f"{path.name}: node {n['id']} ({n['type']})"
        inputs, required = split_inputs(cls)
        values = list(n.get("widgets_values", []))
        expected = expected_widgets(cls.INPUT_TYPES(), values)
        widgets = [name for name, typ, _ in expected if typ != "control" and "." not in name]
        outputs = list(cls.RETURN_TYPES)

        # Slots: named inputs of the class with its types; outputs in RETURN_TYPES order.
        for inp in n["inputs"]:
            assert inp["name"] in inputs, f"{where}: no input named {inp['name']!r}"
            assert inp["type"] == inputs[inp["name"]][0], f"{where}: input {inp['name']!r} type {inp['type']}"
        linked = {inp["name"] for inp in n["inputs"] if inp.get("link") is not None}
        for name, (typ, _) in inputs.items():
            if name in required and name not in widgets:
                assert name in linked, f"{where}: required input {name!r} ({typ}) is not connected"
        # A file lists the outputs the class had when it was saved: a host may add outputs after them (0.33's
        # SaveImage returns its IMAGE), which the frontend adds on load; never other or more outputs.
        assert len(n["outputs"]) <= len(outputs), f"{where}: {len(n['outputs'])} outputs, class has {outputs}"
        for slot, out in enumerate(n["outputs"]):
            assert out["type"] == outputs[slot], f"{where}: output {slot} is {out['type']}, class says {outputs[slot]}"

        # Widgets: one value per widget, in the frontend's order (expected_widgets). A file saved before a host
        # added optional inputs with defaults after them (0.33's CreateVideo bit_depth) holds no values for
        # those: the frontend leaves them at their defaults.
        missing = [name for name, typ, opts in expected[len(values):]
                   if not (name in inputs and name not in required and "default" in opts)]
        assert len(values) <= len(expected) and not missing, (
            f"{where}: {len(values)} widgets_values for {len(expected)} widgets {[w[0] for w in expected]}")
        for (name, typ, opts), value in zip(expected, values):
            if typ == "control":
                assert value in SEED_CONTROL_VALUES, f"{where}: {name} control {value!r}"
            else:
                check_value(f"{where} {name}", typ, opts, value)

        # Values the widgets accept one by one can still be rejected together at execution.
        if n["type"] in PATCH_NODES:
            check_patch_node(host.pack_nodes()[n["type"]], dict(zip(widgets, values)), where)
            # A named preset runs its own values, and the frontend shows them: the file holds them too.
            patch_node = importlib.import_module(host.PACK_NAME + ".nodes.patch_node")
            preset = values[widgets.index("preset")]
            runs = patch_node.preset_widgets(host.pack_nodes()[n["type"]].SPEC)["presets"].get(preset)
            if runs is not None:
                assert {k: dict(zip(widgets, values))[k] for k in runs} == runs, f"{where}: preset {preset}"

    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        declared = list(mapping[nodes[src]["type"]].RETURN_TYPES)[src_slot]
        accepted = split_inputs(mapping[nodes[dst]["type"]])[0][nodes[dst]["inputs"][dst_slot]["name"]][0]
        assert typ == declared, f"{path.name}: link {lid} is {typ}, its source outputs {declared}"
        assert accepted in (typ, "*"), f"{path.name}: link {lid} is {typ}, its target accepts {accepted}"
