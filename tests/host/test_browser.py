"""Browser tests: ComfyUI's real frontend, with this pack, in headless Chromium.

A ComfyUI server starts on 127.0.0.1 (free port, --cpu, --disable-api-nodes) with a temporary base
directory whose custom_nodes/ holds a symlink to this pack and a few test-only nodes (a tiny random
Flux, random conditioning, a latent-to-image stand-in for the VAE); tools/frontend.py drives Chromium
over the DevTools protocol. Checked:
- every workflow in workflows/ loads through the UI, the pack's nodes are known to the frontend and
  show their widgets, and the viewer widgets are not saved into widgets_values;
- a run on the tiny model makes the Token Map Overlay viewer draw a map, and the Token Ratio
  Schedule node draws its graph;
- no JavaScript exception is thrown and nothing is logged as an error by the page, except the host's
  own noise, each kind named in HOST_NOISE (and never anything that names the pack).
Screenshots go to out/browser/ (not committed). Skips with the reason when Chromium or ComfyUI (with
its frontend package) is missing.
"""
from __future__ import annotations

import json
import re
import time
import urllib.parse

import pytest

from tools import frontend
from tools.comfy_host import PACK_ROOT, workflow_needs_newer_host
from tools.thumbnails import QUICK_START, SIZE as THUMBNAIL_SIZE
from tools.workflows import overlapping

OUT = PACK_ROOT / "out" / "browser"
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
PACK_TYPES = ["SDTMPatchModel", "TokenRatioSchedule", "TokenDensityPatchModel", "CATPruningPatchModel",
              "TokenMapRecorder", "TokenMapOverlay"]

TINY_NODES = '''
import sys
import torch
import torch.nn.functional as F
import importlib.util
_spec = importlib.util.spec_from_file_location("token_reduction_comfy_host", {comfy_host!r})
_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_host)


class TinyFluxLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{}}}}

    def load(self):
        return (_host.tiny_flux(seed=0),)


class TinyConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"seed": ("INT", {{"default": 0}})}}}}

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 16, 32, generator=g), {{"pooled_output": torch.randn(1, 32, generator=g)}}]],)


class TinyDecode:
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"samples": ("LATENT",)}}}}

    def decode(self, samples):
        x = torch.sigmoid(samples["samples"][:, :3].float())
        return (F.interpolate(x, scale_factor=8).permute(0, 2, 3, 1).contiguous(),)


NODE_CLASS_MAPPINGS = {{"TinyFluxLoader": TinyFluxLoader, "TinyConditioning": TinyConditioning,
                       "TinyDecode": TinyDecode}}
'''


@pytest.fixture(scope="module")
def comfy_server(host):
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        pytest.skip("ComfyUI's frontend package (comfyui-frontend-package) is not installed in this venv")
    tiny = TINY_NODES.format(comfy_host=str(PACK_ROOT / "tools" / "comfy_host.py"))
    try:
        with frontend.comfy_server(host.find_comfyui()[0], {"tiny_test_nodes": tiny}) as server:
            yield server
    except frontend.StartError as e:
        pytest.fail(str(e))


LOADED_HINTS: set = set()  # the model download URLs of every workflow this page has opened


@pytest.fixture(scope="module")
def page(comfy_server):
    chromium = frontend.chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium chromium-driver)")
    try:
        with frontend.open_page(comfy_server["url"], chromium) as cdp:
            # What the stock frontend logs while it starts in a fresh user directory: each must be named
            # host noise (a 404 for user.css and the like, its own settings code) or be explained by the
            # default workflow it opens (0.33's asks for the sizes of its model downloads), nothing of the pack's.
            start = cdp.new_errors()
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "startup_errors.txt").write_text("\n".join(f"[{host_noise(e)}] {e}" for e in start))
            LOADED_HINTS.update(frontend.model_hints(cdp.eval("app.graph.serialize()")))
            assert unexplained(start, LOADED_HINTS) == []
            yield cdp
    except frontend.StartError as e:
        pytest.fail(str(e))


# ---- which page errors are the host's own ------------------------------------------------------------

_LOCAL = r"http://127\.0\.0\.1:\d+"
_FRAME = re.compile(r"^\s*at (?:.*? \()?(https?://[^\s)]+?)(?::\d+){0,2}\)?$", re.M)
_URL = re.compile(r"https?://[^\s'\"]+")
_404 = "console error: network: Failed to load resource: the server responded with a status of 404 (Not Found) "
# Outside hosts the stock frontend calls by itself: the Comfy registry, when a workflow loads (which pack
# each node type belongs to). Refused by the Content-Security-Policy that 0.3.75 sends with
# --disable-api-nodes (connect-src 'self'), unreachable offline.
HOST_OUTSIDE = ("https://api.comfy.org/",)
_REFUSED = ("console error: security: ", "console error: javascript: Fetch API cannot load ",
            "console error: network: ")
SIZE_FETCH = "console error: Error fetching file size: TypeError: Failed to fetch"


def ours(message: str) -> bool:
    """Names this pack (its folder, extension file or name, routes) or any extension's file."""
    return (frontend.PACK_DIR_NAME in message or "token_maps.js" in message or "token_reduction" in message
            or "/extensions/" in message)


def _in_host_bundle(message: str) -> bool:
    """Carries a stack, and every frame of it is in the stock frontend's own bundle (/assets/)."""
    frames = _FRAME.findall(message)
    return bool(frames) and all(re.match(_LOCAL + r"/assets/", f) for f in frames)


def _refused_call(message: str, prefixes: tuple) -> bool:
    """A refused or failed request to outside URLs that all start with one of `prefixes`, made from the
    stock frontend's bundle (the only local URL the message may name)."""
    if not message.startswith(_REFUSED):
        return False
    urls = _URL.findall(message)
    outside = [u for u in urls if not re.match(_LOCAL, u)]
    return (bool(outside) and all(u.startswith(prefixes) for u in outside)
            and all(re.match(_LOCAL + r"/assets/", u) for u in urls if re.match(_LOCAL, u)))


def _local_404(path_pattern: str):
    return lambda m: re.fullmatch(re.escape(_404) + _LOCAL + path_pattern, m) is not None


# (name, test) of each kind of host noise: what the stock frontend logs by itself in a fresh user
# directory, offline, under the CSP (the same with no custom node at all). Every error of a test must
# be one of these, or explained by the workflow just loaded (`unexplained`), and name nothing of the pack.
HOST_NOISE = (
    ("the frontend's registry lookup at api.comfy.org, refused by the CSP or offline",
     lambda m: _refused_call(m, HOST_OUTSIDE)),
    ("404 for user.css (a fresh user directory has none)", _local_404(r"/(api/userdata/)?user\.css")),
    ("404 for favicon.ico (ComfyUI serves none)", _local_404(r"/favicon\.ico")),
    ("404 for the listings of the user's saved workflows and subgraphs (a fresh user directory has none)",
     _local_404(r"/api/userdata\?dir=(workflows|subgraphs(%2F)?)&[\w=&]+")),
    ("404 for the user's comfy.templates.json (a fresh user directory has none)",
     _local_404(r"/api/userdata/comfy\.templates\.json")),
    ("the stock frontend's TypeError (reading 'id') in a settings onChange at start, all in its bundle",
     lambda m: m.startswith(("exception: TypeError: Cannot read properties of undefined (reading 'id')",
                             "console error: TypeError: Cannot read properties of undefined (reading 'id')"))
     and _in_host_bundle(m)),
    ("frontend 1.49's settings store reading the graph before the app made it, all in its bundle",
     lambda m: m.startswith("console error: ComfyApp graph accessed before initialization") and _in_host_bundle(m)),
)


def host_noise(message: str) -> str | None:
    """The name of the host noise `message` is, or None; never for a message that names the pack."""
    if ours(message):
        return None
    return next((name for name, test in HOST_NOISE if test(message)), None)


UPLOAD_NODES = ("LoadImage", "LoadVideo")  # nodes whose first widget names a file the user uploads


def unexplained(errors: list, model_urls=(), input_files=()) -> list:
    """The errors that are neither host noise nor explained by the workflows loaded: their model download
    hints (`model_urls`: the missing-models dialog asks each for its size, refused by the CSP or offline,
    and may log one "Error fetching file size" per refused request) and the example files the user supplies to
    UPLOAD_NODES (`input_files`: their previews are 404s)."""
    refused = [e for e in errors if model_urls and not ours(e) and _refused_call(e, tuple(model_urls))]
    left, sizes = [], 0
    for e in errors:
        if host_noise(e):
            continue
        if not ours(e):
            if e in refused:
                continue
            if e.startswith(SIZE_FETCH) and _in_host_bundle(e) and sizes < len(refused):
                sizes += 1
                continue
            if any(e.startswith(_404) and re.search(_LOCAL + r"/api/view\?type=input&filename="
                                                    + re.escape(urllib.parse.quote(f)) + "&", e)
                   for f in input_files):
                continue
        left.append(e)
    return left


def test_pack_nodes_registered_in_frontend(page):
    missing = page.eval(f"{json.dumps(PACK_TYPES)}.filter(t => !LiteGraph.registered_node_types[t])")
    assert missing == []
    assert page.eval("app.extensions.some(e => e.name === 'token_reduction.token_maps')")
    assert unexplained(page.new_errors()) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_in_ui(page, path):
    wf = json.loads(path.read_text())
    why = workflow_needs_newer_host(wf)
    if why:
        pytest.skip(f"{path.name} {why}")
    frontend.load_workflow(page, wf)
    report = page.eval("""(() => {
        const pack = %s;
        return app.graph._nodes.map(n => ({id: n.id, type: n.type, known: !!LiteGraph.registered_node_types[n.type],
            widgets: (n.widgets || []).map(w => w.name), pack: pack.includes(n.type)}));
    })()""" % json.dumps(PACK_TYPES))
    by_id = {frontend.node_key(n["id"]): n for n in report}
    for node in wf["nodes"]:
        got = by_id.get(frontend.node_key(node["id"]))
        assert got is not None and got["type"] == node["type"], f"{path.name}: node {node['id']} not loaded"
        assert got["known"], f"{path.name}: node type {node['type']} unknown to the frontend"
        if got["pack"]:
            assert got["widgets"], f"{path.name}: {node['type']} shows no widgets"
        if node["type"] == "TokenMapOverlay":
            assert "token_map_viewer" in got["widgets"]
    # As this frontend draws them (a node may grow to fit its widgets: 0.33's CreateVideo has one more), no
    # two nodes overlap on screen.
    assert overlapping(frontend.drawn_rectangles(page)) == [], f"{path.name}: nodes overlap as drawn"
    # Saving gives back the file's widget values: the viewer widgets add nothing to them.
    saved = {frontend.node_key(n["id"]): n for n in page.eval("app.graph.serialize()")["nodes"]}
    for node in wf["nodes"]:
        if node["type"] in PACK_TYPES:
            assert saved[frontend.node_key(node["id"])].get("widgets_values") == node["widgets_values"], node["type"]
    page.screenshot(OUT / f"workflow_{path.stem}.png")
    errors = page.new_errors()
    (OUT / f"workflow_{path.stem}_errors.txt").write_text("\n".join(f"[{host_noise(e)}] {e}" for e in errors))
    # Frontend 1.49 keeps the workflows loaded before open, and asks again for their model downloads' sizes.
    LOADED_HINTS.update(frontend.model_hints(wf))
    inputs = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] in UPLOAD_NODES}
    assert unexplained(errors, LOADED_HINTS, inputs) == []


# A new, empty workflow as the frontend opens one. (Clearing the graph instead lets frontend 1.49 give a new node
# the widget values it keeps for an earlier node of the same id.)
NEW_GRAPH = ("await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, "
             "extra: {}, version: 0.4});")

BUILD_TINY_GRAPH = """(async () => {
    """ + NEW_GRAPH + """
    const mk = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
    const set = (n, name, v) => { n.widgets.find(w => w.name === name).value = v; };
    const loader = mk("TinyFluxLoader", 20, 20), sdtm = mk("SDTMPatchModel", 260, 20);
    const rec = mk("TokenMapRecorder", 620, 20), pos = mk("TinyConditioning", 20, 420);
    const neg = mk("TinyConditioning", 20, 560), lat = mk("EmptySD3LatentImage", 260, 460);
    const ks = mk("KSampler", 980, 20), dec = mk("TinyDecode", 980, 400), ov = mk("TokenMapOverlay", 1240, 20);
    const sched = mk("TokenRatioSchedule", 620, 420);
    set(neg, "seed", 1); set(lat, "width", 128); set(lat, "height", 128);
    set(ks, "steps", 3); set(ks, "cfg", 2.0); set(ks, "seed", 3);
    set(rec, "attention_steps", "first, last"); set(rec, "attention_blocks", "all");
    set(ov, "kind", "attention_text"); set(ov, "blocks", "all");
    loader.connect(0, sdtm, 0); sdtm.connect(0, rec, 0); rec.connect(0, ks, 0);
    pos.connect(0, ks, 1); neg.connect(0, ks, 2); lat.connect(0, ks, 3);
    ks.connect(0, dec, 0); rec.connect(0, ov, 0); dec.connect(0, ov, 1);
    app.graph.setDirtyCanvas(true, true);
    return [ov.id, sched.id];
})()"""

# JS: the node's rectangle on screen (title bar included) and whether element `e` lies inside it.
INSIDE_NODE = """((n, e) => {
    const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect(), t = LiteGraph.NODE_TITLE_HEIGHT;
    const node = {left: c.left + (n.pos[0] + ds.offset[0]) * ds.scale, top: c.top + (n.pos[1] - t + ds.offset[1]) * ds.scale};
    node.right = node.left + n.size[0] * ds.scale; node.bottom = node.top + (n.size[1] + t) * ds.scale;
    const r = e.getBoundingClientRect();
    return {inside: r.width > 0 && r.height > 0 && r.left >= node.left - 1 && r.right <= node.right + 1
                    && r.top >= node.top - 1 && r.bottom <= node.bottom + 1,
            node, element: {left: r.left, top: r.top, right: r.right, bottom: r.bottom}};
})"""
NODE = "app.graph._nodes.find(n => n.type === '%s')"


def show(page, node_type: str):
    page.eval(f"(() => {{ app.canvas.centerOnNode?.({NODE % node_type}); app.graph.setDirtyCanvas(true, true); "
              "return true; })()")
    time.sleep(0.6)  # a few frames: the frontend moves DOM widgets with the canvas


def test_viewer_and_schedule_graph_after_a_run(page, comfy_server):
    page.eval(BUILD_TINY_GRAPH)
    graph = NODE % "TokenRatioSchedule" + ".tokenScheduleGraph"
    page.wait_for(f"{graph}.canvas.dataset.drawn === 'schedule'", 30, "the ratio schedule graph")
    page.eval("app.queuePrompt(0, 1).then(() => true)")
    viewer = NODE % "TokenMapOverlay" + ".tokenMapViewer"
    try:
        page.wait_for(f"{viewer}.canvas.dataset.drawn === 'map'", 120, "the token-map viewer to draw a map after the run")
    except AssertionError as e:
        page.screenshot(OUT / "viewer_timeout.png")
        raise AssertionError(f"{e}; viewer status: {page.eval(viewer + '.status.textContent')!r}; errors: "
                             f"{page.new_errors()}; server log:\n{comfy_server['log'].read_text()[-3000:]}")
    state = page.eval("""(async () => {
        const n = %s, v = n.tokenMapViewer, kind = n.widgets.find(w => w.name === 'kind');
        const opacity = n.widgets.find(w => w.name === 'opacity');
        const out = {steps: v.meta.steps, blocks: v.meta.blocks.length, attentionSteps: [...v.steps],
                     first: {status: v.status.textContent, legend: [v.legendMin.textContent, v.legendMax.textContent]}};
        // The node's kind widget drives the viewer, and the viewer's menu sets the widget.
        kind.value = 'merge_size'; kind.callback(kind.value); await v.fetchMap();
        out.linkedKind = v.kind.value;
        v.kind.value = 'computed'; v.kind.dispatchEvent(new Event('change')); await v.fetchMap();
        out.widgetKind = kind.value;
        opacity.value = 0.3; opacity.callback(0.3);
        out.linkedOpacity = v.opacity.input.value;
        v.opacity.input.value = '0.8'; v.opacity.input.dispatchEvent(new Event('input'));
        out.widgetOpacity = opacity.value;
        // merge_size at the first step (before start_percent, nothing merged): a flat map, drawn as such.
        kind.value = 'merge_size'; kind.callback(kind.value); await v.fetchMap();
        v.step.input.value = '0'; v.pickBlocks(); await v.fetchMap();
        out.flat = {drawn: v.canvas.dataset.drawn, status: v.status.textContent, legend: v.legendText.textContent};
        v.step.input.value = String(v.steps.length - 1); v.pickBlocks(); await v.fetchMap();
        out.merged = {drawn: v.canvas.dataset.drawn, status: v.status.textContent,
                      legend: [v.legendMin.textContent, v.legendMax.textContent], stats: v.stats.textContent};
        // A kind with nothing recorded says why.
        v.meta.recorded.computed = []; kind.value = 'computed'; kind.callback(kind.value); await v.fetchMap();
        out.none = {drawn: v.canvas.dataset.drawn, status: v.status.textContent};
        kind.value = 'merge_size'; kind.callback(kind.value); await v.fetchMap();
        return out;
    })()""" % (NODE % "TokenMapOverlay"))
    assert state["steps"] == 3 and state["blocks"] == 4
    assert state["attentionSteps"] == [0, 2], "the sliders skip steps with nothing recorded"
    assert state["first"]["status"].startswith("attention_text, step ") and all(state["first"]["legend"]), state
    assert state["linkedKind"] == "merge_size" and state["widgetKind"] == "computed", state
    assert state["linkedOpacity"] == "0.3" and state["widgetOpacity"] == 0.8, state
    assert state["flat"]["drawn"] == "flat" and "flat, every token 1.00" in state["flat"]["status"], state
    assert state["flat"]["legend"].startswith("flat map, every token 1.00"), state
    assert state["merged"]["drawn"] == "map" and "merge_size, step 3" in state["merged"]["status"], state
    assert all(state["merged"]["legend"]) and "tokens saved" in state["merged"]["stats"], state
    assert state["none"]["drawn"] == "empty" and "No computed map in this run: the Token Map Recorder" in \
        state["none"]["status"], state

    show(page, "TokenMapOverlay")
    inside = page.eval(f"{INSIDE_NODE}({NODE % 'TokenMapOverlay'}, {viewer}.root)")
    assert inside["inside"], inside
    lines = page.eval(f"""(() => {{ const v = {viewer}, s = v.status.getBoundingClientRect(),
        t = v.stats.getBoundingClientRect(); return {{statusBottom: s.bottom, statsTop: t.top, h: s.height}}; }})()""")
    assert lines["statusBottom"] <= lines["statsTop"] + 0.5 and lines["h"] < 20, lines  # one line, above the stats
    page.screenshot(OUT / "viewer_after_run.png")
    page.screenshot(OUT / "viewer_widget.png", viewer + ".root")

    show(page, "TokenRatioSchedule")
    inside = page.eval(f"{INSIDE_NODE}({NODE % 'TokenRatioSchedule'}, {graph}.root)")
    assert inside["inside"], inside
    ignored = page.eval(f"{NODE % 'TokenRatioSchedule'}.widgets.filter(w => w.tokenReductionIgnored).map(w => w.name)")
    assert set(ignored) == {"switch_percent", "flops_saving", "width", "height", "calibration_steps"}, ignored
    page.screenshot(OUT / "schedule_graph.png", f"{graph}.root")
    # A model connected: the node calibrates; its graph says so and the preset and curves look ignored.
    page.eval(f"(() => {{ {NODE % 'TinyFluxLoader'}.connect(0, {NODE % 'TokenRatioSchedule'}, 0); return true; }})()")
    page.wait_for(f"{graph}.canvas.dataset.drawn === 'calibrate'", 30, "the graph to say it will calibrate")
    ignored = page.eval(f"{NODE % 'TokenRatioSchedule'}.widgets.filter(w => w.tokenReductionIgnored).map(w => w.name)")
    assert set(ignored) == {"preset", "ratio", "end_scale", "switch_percent", "progress_curve", "depth_curve"}, ignored
    show(page, "TokenRatioSchedule")
    page.screenshot(OUT / "schedule_calibrate.png")
    assert unexplained(page.new_errors()) == []


def test_patch_node_presets_show_their_values_greyed(page):
    """A patch node's expert widgets hold the running preset's values (from /token_reduction/presets) and
    look ignored; picking a preset fills them; editing one switches to custom; a connected schedule greys
    what it replaces."""
    table = frontend.http_json(page.url + "/token_reduction/presets")
    entry = table["SDTMPatchModel"]
    state = page.eval("""(async () => {
        """ + NEW_GRAPH + """
        const n = LiteGraph.createNode('SDTMPatchModel'); n.pos = [100, 100]; app.graph.add(n);
        const w = name => n.widgets.find(x => x.name === name), preset = w('preset');
        const snap = () => ({preset: preset.value,
            values: Object.fromEntries(n.widgets.map(x => [x.name, x.value])),
            ignored: Object.fromEntries(n.widgets.map(x => [x.name, x.tokenReductionIgnored || null]))});
        const out = {created: snap()};
        preset.value = 'fast'; preset.callback('fast'); out.fast = snap();
        const ratio = w('ratio'); ratio.value = 0.5; ratio.callback(0.5); out.edited = snap();
        preset.value = 'quality'; preset.callback('quality'); out.quality = snap();
        const s = LiteGraph.createNode('TokenRatioSchedule'); s.pos = [500, 100]; app.graph.add(s);
        s.connect(0, n, 1); out.scheduled = snap();
        return out;
    })()""")
    expert = entry["expert"]
    created = state["created"]
    assert created["preset"] == "balanced" and created["ignored"]["preset"] is None, created
    assert all(created["ignored"][k] == "set by preset balanced" for k in expert), created
    assert {k: state["fast"]["values"][k] for k in expert} == entry["presets"]["fast"], state["fast"]
    edited = state["edited"]
    assert edited["preset"] == "custom" and edited["values"]["ratio"] == 0.5, edited
    assert not any(edited["ignored"].values()), edited
    assert {k: state["quality"]["values"][k] for k in expert} == entry["presets"]["quality"]
    scheduled = state["scheduled"]["ignored"]
    assert {k for k, v in scheduled.items() if v == "replaced by the connected schedule"} == \
        set(entry["schedule_replaces"]), scheduled
    assert unexplained(page.new_errors()) == []


def test_template_browser_lists_every_workflow_with_its_thumbnail(comfy_server):
    """The real server: GET /workflow_templates names every workflow of the pack, and the frontend's
    template browser can fetch each one and its <stem>.jpg picture."""
    listed = frontend.http_json(comfy_server["url"] + "/workflow_templates")
    assert sorted(listed.get(frontend.PACK_DIR_NAME, [])) == sorted(p.stem for p in WORKFLOWS), listed
    base = f"{comfy_server['url']}/api/workflow_templates/{frontend.PACK_DIR_NAME}/"
    for path in WORKFLOWS:
        with urllib.request.urlopen(base + urllib.parse.quote(path.name), timeout=10) as r:
            assert json.loads(r.read()) == json.loads(path.read_text()), path.name
        with urllib.request.urlopen(base + urllib.parse.quote(path.stem) + ".jpg", timeout=10) as r:
            assert r.headers.get_content_type() == "image/jpeg" and r.read() == path.with_suffix(".jpg").read_bytes()


def test_template_browser_shows_the_pack_cards(page):
    """Templates -> Extensions -> the pack: one card per workflow, each with its picture loaded and its name
    as its title, not cut off (the dialog found by its role, which every frontend gives it); the quick start
    first (web/templates.js), then by name, so by model family."""
    page.eval("(async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); return true; })()")
    page.wait_for("[...document.querySelectorAll('[role=dialog] *')].some(e => e.children.length === 0 && "
                  f"e.textContent.trim() === '{frontend.PACK_DIR_NAME}')", 30, "the pack in the template browser")
    page.eval("""(() => { const e = [...document.querySelectorAll('[role=dialog] *')].find(e => e.children.length === 0
        && e.textContent.trim() === '%s'); (e.closest('[role=button], button, a, li, [role=option]') || e).click();
        return true; })()""" % frontend.PACK_DIR_NAME)
    # The cards render, and load their pictures, as they scroll into view: scroll through the list, a
    # step per poll, and note each card seen with its picture loaded, the order the titles come in, and
    # any title drawn narrower than its text.
    names = [p.stem for p in WORKFLOWS]
    scan = """(() => { const names = %s, seen = (window.__trSeen ??= new Set()), order = (window.__trOrder ??= []);
        const cut = (window.__trCut ??= new Set());
        const leaves = [...document.querySelectorAll('[role=dialog] *')].filter(e => e.children.length === 0
            && names.includes(e.textContent.trim()));
        for (const t of leaves) {
            const name = t.textContent.trim();
            if (!order.includes(name)) order.push(name);
            if (t.scrollWidth > t.clientWidth + 1) cut.add(name);
            let c = t; while (c && !c.querySelector('img')) c = c.parentElement;
            const imgs = c ? c.querySelectorAll('img') : [];
            if (imgs.length === 1 && imgs[0].complete && imgs[0].naturalWidth === %d) seen.add(name);
        }
        let box = leaves[0]?.parentElement;
        while (box && !(box.scrollHeight > box.clientHeight + 4 && /auto|scroll/.test(getComputedStyle(box).overflowY)))
            box = box.parentElement;
        // Down half a view per poll; at the bottom wait for more cards while some are missing, then start over.
        const bottom = box && box.scrollTop >= box.scrollHeight - box.clientHeight - 2;
        if (box && !bottom) box.scrollTop += box.clientHeight / 2;
        else if (box && leaves.length === names.length) box.scrollTop = 0;
        return seen.size === names.length; })()""" % (json.dumps(names), THUMBNAIL_SIZE[0])
    page.wait_for("(() => { const e = [...document.querySelectorAll('[role=dialog] img')]; return e.some(i => i.complete "
                  f"&& i.naturalWidth === {THUMBNAIL_SIZE[0]}); }})()", 30, "the first card pictures")
    time.sleep(1)
    page.screenshot(OUT / "templates_dialog.png", close_dialogs=False)
    try:
        page.wait_for(scan, 90, "every card with its picture")
    except AssertionError:
        page.screenshot(OUT / "templates_dialog_timeout.png", close_dialogs=False)
        raise AssertionError(f"cards seen with their picture: {page.eval('[...window.__trSeen]')}") from None
    order, cut = page.eval("window.__trOrder"), page.eval("[...window.__trCut]")
    page.close_dialogs()
    quick = [n for n in names if n.endswith(QUICK_START)]
    # The browser sorts with localeCompare, which orders these ASCII names as casefold does.
    assert order == quick + sorted(set(names) - set(quick), key=str.casefold), order
    assert cut == [], f"titles cut off on their card: {cut}"
    assert unexplained(page.new_errors()) == []


# ---- the allow-list itself: the host's noise passes, the pack's errors never do -----------------------

_L = "http://127.0.0.1:8188"
_BUNDLE_STACK = (f"\n    at onChange ({_L}/assets/index-BKdH1OFt.js:58:253162)"
                 f"\n    at load ({_L}/assets/GraphView-DVNkY3oT.js:8:222161)")
_PACK_FRAME = f"\n    at draw ({_L}/extensions/{frontend.PACK_DIR_NAME}/token_maps.js:210:7)"
_HF = "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"
# As logged by frontends 1.32.9 (0.3.75, under the CSP), 1.27.10 (0.3.64, offline) and 1.49.6 (0.33).
HOST_EXAMPLES = [
    "console error: security: Connecting to 'https://api.comfy.org/nodes?node_id=comfy-core' violates the "
    "following Content Security Policy directive: \"connect-src 'self'\". The action has been blocked. "
    f"{_L}/assets/vendor-other-Co5CJDU0.js",
    "console error: javascript: Fetch API cannot load https://api.comfy.org/comfy-nodes/SDTMPatchModel/node. "
    f"Refused to connect because it violates the document's Content Security Policy. {_L}/assets/index-B.js",
    "console error: network: Failed to load resource: net::ERR_NAME_NOT_RESOLVED "
    "https://api.comfy.org/nodes?node_id=comfy-core",
    _404 + f"{_L}/user.css", _404 + f"{_L}/api/userdata/user.css", _404 + f"{_L}/favicon.ico",
    _404 + f"{_L}/api/userdata?dir=workflows&recurse=true&split=false&full_info=true",
    _404 + f"{_L}/api/userdata?dir=subgraphs%2F&recurse=true&split=false&full_info=true",
    _404 + f"{_L}/api/userdata/comfy.templates.json",
    "console error: TypeError: Cannot read properties of undefined (reading 'id')" + _BUNDLE_STACK,
    "exception: TypeError: Cannot read properties of undefined (reading 'id')" + _BUNDLE_STACK,
    # frontend 1.49.6 (0.33)
    "console error: ComfyApp graph accessed before initialization" + _BUNDLE_STACK,
    _404 + f"{_L}/api/userdata?dir=subgraphs&recurse=true&split=false&full_info=true",
]


@pytest.mark.parametrize("message", HOST_EXAMPLES, ids=range(len(HOST_EXAMPLES)))
def test_host_noise_is_named_and_pack_errors_are_not(message):
    assert host_noise(message), message
    assert unexplained([message]) == []
    # The same text from the pack's own file, or naming the pack, is an error.
    for theirs in (message + _PACK_FRAME, message.replace("SDTMPatchModel", "token_reduction/presets"),
                   message.replace("user.css", "extensions/comfyui-token-reduction/token_maps.js")):
        if theirs != message:
            assert host_noise(theirs) is None and unexplained([theirs]) == [theirs], theirs


def test_workflow_allowances_are_bounded():
    size = SIZE_FETCH + f"\n    at fetchFileSize ({_L}/assets/index-BKdH1OFt.js:171:3646)"
    refused = f"console error: network: Failed to load resource: net::ERR_NAME_NOT_RESOLVED {_HF}"
    preview = _404 + f"{_L}/api/view?type=input&filename=example.png&subfolder=&rand=0.71"
    assert unexplained([refused, size, preview], [_HF], ["example.png"]) == []
    assert unexplained([refused, size, size], [_HF]) == [size]     # one size error per refused request
    assert unexplained([refused]) == [refused]                      # not a hint of this workflow
    assert unexplained([preview], [], ["other.png"]) == [preview]   # not an input of this workflow
    assert unexplained([size + _PACK_FRAME], [_HF]) == [size + _PACK_FRAME]
    other = "console error: security: Connecting to 'https://example.com/x' violates ... " + f"{_L}/assets/a.js"
    assert unexplained([other]) == [other]                          # an outside host nobody named


def test_pack_errors_in_the_page_are_caught(page):
    """Live: an exception thrown inside the pack's extension, and an error that names the pack, fail."""
    page.new_errors()
    page.eval("""(() => {
        const viewer = LiteGraph.createNode('TokenMapOverlay').tokenMapViewer;
        setTimeout(() => viewer.draw.call(null), 0);        // TypeError thrown in token_maps.js
        console.error('token_reduction: a test error');
        return true; })()""")
    time.sleep(1)
    errors = unexplained(page.new_errors())
    assert any(e.startswith("exception: TypeError") and "token_maps.js" in e for e in errors), errors
    assert any("token_reduction: a test error" in e for e in errors), errors
