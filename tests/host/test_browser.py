"""Browser tests: ComfyUI's real frontend, with this pack, in headless Chromium.

A ComfyUI server starts on 127.0.0.1 (free port, --cpu) with a temporary base directory whose
custom_nodes/ holds a symlink to this pack and a few test-only nodes (a tiny random Flux,
random conditioning, a latent-to-image stand-in for the VAE). Chromium is driven over the
DevTools protocol with aiohttp's websocket client (no extra package). Checked:
- every workflow in workflows/ loads through the UI, the pack's nodes are known to the
  frontend and show their widgets, and the viewer widgets are not saved into widgets_values;
- a run on the tiny model makes the Token Map Overlay viewer draw a map, and the Token Ratio
  Schedule node draws its graph;
- no JavaScript exception is thrown and nothing is logged as an error by the page.
Screenshots go to out/browser/ (not committed). Skips with the reason when Chromium or
ComfyUI (with its frontend package) is missing.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tools.comfy_host import PACK_ROOT

OUT = PACK_ROOT / "out" / "browser"
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
PACK_DIR_NAME = "comfyui-token-reduction"
PACK_TYPES = ["SDTMPatchModel", "TokenRatioSchedule", "TokenDensityPatchModel", "CATPruningPatchModel",
              "TokenMapRecorder", "TokenMapOverlay"]
SERVER_START_S = 120
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1600,1000", "--remote-debugging-port=0", "--remote-allow-origins=*"]

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


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def comfy_server(host):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium chromium-driver)")
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        pytest.skip("ComfyUI's frontend package (comfyui-frontend-package) is not installed in this venv")
    comfy_root = host.find_comfyui()[0]
    base = Path(tempfile.mkdtemp(prefix="token-reduction-browser-"))
    (base / "custom_nodes").mkdir()
    os.symlink(PACK_ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    (base / "custom_nodes" / "tiny_test_nodes").mkdir()
    (base / "custom_nodes" / "tiny_test_nodes" / "__init__.py").write_text(
        TINY_NODES.format(comfy_host=str(PACK_ROOT / "tools" / "comfy_host.py")))
    port = _free_port()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    log_path = base / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-auto-launch", "--disable-api-nodes", "--use-pytorch-cross-attention"],
        cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                info = _http_json(url + "/object_info/TokenMapOverlay")
                if "TokenMapOverlay" in info:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"ComfyUI did not serve the pack within {SERVER_START_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "chromium": chromium, "base": base, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


class CDP:
    """A minimal Chrome DevTools Protocol client on aiohttp, run on its own event-loop thread."""

    def __init__(self, ws_url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.next_id = 0
        self.pending: dict = {}
        self.exceptions: list = []
        self.errors: list = []
        self._run(self._connect(ws_url))

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, ws_url):
        import aiohttp
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)
        self.reader = self.loop.create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.exceptions.append((d.get("exception") or {}).get("description") or d.get("text"))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in
                                            data["params"]["args"]))
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                e = data["params"]["entry"]
                self.errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}")

    async def _call(self, method, params):
        self.next_id += 1
        fut = self.loop.create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        return await fut

    def call(self, method, params=None, timeout=60):
        data = self._run(self._call(method, params), timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data["result"]

    def eval(self, expression: str, timeout=60):
        r = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                      timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError((d.get("exception") or {}).get("description") or d.get("text"))
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def screenshot(self, name: str, selector_js: str | None = None):
        """Full page, or the element `selector_js` evaluates to; open dialogs are closed first."""
        OUT.mkdir(parents=True, exist_ok=True)
        self.eval("document.querySelectorAll('.p-dialog-close-button, .p-dialog [aria-label=\"Close\"]')"
                  ".forEach(b => b.click()); true")
        time.sleep(0.3)
        params = {"format": "png"}
        if selector_js:
            r = self.eval(f"(() => {{ const r = ({selector_js}).getBoundingClientRect(); "
                          "return [r.x, r.y, r.width, r.height]; })()")
            if r[2] > 0 and r[3] > 0:
                params["clip"] = {"x": r[0], "y": r[1], "width": r[2], "height": r[3], "scale": 1}
        data = self.call("Page.captureScreenshot", params)["data"]
        (OUT / name).write_bytes(base64.b64decode(data))

    def close(self):
        async def _close():
            await self.ws.close()
            await self.session.close()
        try:
            self._run(_close(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def page(comfy_server):
    profile = Path(tempfile.mkdtemp(prefix="token-reduction-chromium-"))
    proc = subprocess.Popen([comfy_server["chromium"], *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = _http_json(f"http://127.0.0.1:{port}/json/list")
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        cdp = CDP(ws_url)
        for domain in ("Runtime", "Log", "Page"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", {"url": comfy_server["url"] + "/"})
        cdp.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                     "LiteGraph.registered_node_types['TokenMapOverlay'])", 90, "the ComfyUI frontend to load")
        cdp.wait_for("(app.extensions || []).some(e => e.name === 'token_reduction.token_maps')", 30,
                     "the pack's extension to register")
        time.sleep(2)
        # What the stock frontend logs by itself while starting offline (404s for user.css and the
        # like, its own settings code) is the baseline; the tests look at what comes after it.
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "baseline_errors.txt").write_text("\n".join(_all_errors(cdp)))
        assert not [e for e in _all_errors(cdp) if _ours(e)], _all_errors(cdp)
        cdp.baseline = (len(cdp.exceptions), len(cdp.errors))
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _all_errors(page) -> list:
    return [f"exception: {e}" for e in page.exceptions] + [f"console error: {e}" for e in page.errors]


def _ours(message: str) -> bool:
    return PACK_DIR_NAME in message or "token_maps.js" in message or "token_reduction" in message


OUTSIDE_URL = re.compile(r"https?://(?!127\.0\.0\.1[:/]|localhost[:/])")
HOST_BLOCKED = ("console error: security: ", "console error: javascript: Fetch API cannot load ",
                "console error: network: ")


def _host_outside_call(message: str) -> bool:
    """The host frontend's own calls to outside services (its registry lookups when a workflow loads),
    refused offline or by the Content-Security-Policy the server sends with --disable-api-nodes. Never
    the pack's: any message naming the pack counts as an error."""
    return message.startswith(HOST_BLOCKED) and bool(OUTSIDE_URL.search(message)) and not _ours(message)


def _page_errors(page) -> list:
    """JavaScript exceptions and console errors since the frontend finished starting (the host's own
    outside calls left out)."""
    e0, c0 = page.baseline
    errors = [f"exception: {e}" for e in page.exceptions[e0:]] + [f"console error: {e}" for e in page.errors[c0:]]
    return [e for e in errors if not _host_outside_call(e)]


def test_pack_nodes_registered_in_frontend(page):
    missing = page.eval(f"{json.dumps(PACK_TYPES)}.filter(t => !LiteGraph.registered_node_types[t])")
    assert missing == []
    assert page.eval("app.extensions.some(e => e.name === 'token_reduction.token_maps')")
    assert _page_errors(page) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_in_ui(page, path):
    wf = json.loads(path.read_text())
    page.eval(f"app.loadGraphData({json.dumps(wf)}).then(() => true)")
    time.sleep(0.5)
    report = page.eval("""(() => {
        const pack = %s;
        return app.graph._nodes.map(n => ({id: n.id, type: n.type, known: !!LiteGraph.registered_node_types[n.type],
            widgets: (n.widgets || []).map(w => w.name), pack: pack.includes(n.type)}));
    })()""" % json.dumps(PACK_TYPES))
    by_id = {n["id"]: n for n in report}
    for node in wf["nodes"]:
        got = by_id.get(node["id"])
        assert got is not None and got["type"] == node["type"], f"{path.name}: node {node['id']} not loaded"
        assert got["known"], f"{path.name}: node type {node['type']} unknown to the frontend"
        if got["pack"]:
            assert got["widgets"], f"{path.name}: {node['type']} shows no widgets"
        if node["type"] == "TokenMapOverlay":
            assert "token_map_viewer" in got["widgets"]
    # Saving gives back the file's widget values: the viewer widgets add nothing to them.
    saved = {n["id"]: n for n in page.eval("app.graph.serialize()")["nodes"]}
    for node in wf["nodes"]:
        if node["type"] in PACK_TYPES:
            assert saved[node["id"]].get("widgets_values") == node["widgets_values"], node["type"]
    page.screenshot(f"workflow_{path.stem}.png")
    errors = _page_errors(page)
    (OUT / f"workflow_{path.stem}_errors.txt").write_text("\n".join(errors))
    # Offline, the stock frontend's missing-models dialog fails to fetch the size of each model
    # download hint (properties.models): one network error and one console error per hint.
    hints = {m["url"] for n in wf["nodes"] for m in n["properties"].get("models", [])}
    # A LoadImage example names an input file the user supplies; offline its preview is a 404.
    inputs = {f"filename={n['widgets_values'][0]}&" for n in wf["nodes"] if n["type"] == "LoadImage"}
    size_errors = 0
    left = []
    for e in errors:
        if any(e.startswith("console error: network:") and e.endswith(u) for u in hints):
            continue
        if e.startswith("console error: network:") and "/api/view?type=input&" in e and any(i in e for i in inputs):
            continue
        if e.startswith("console error: Error fetching file size: TypeError: Failed to fetch") and size_errors < len(hints):
            size_errors += 1
            continue
        left.append(e)
    page.baseline = (len(page.exceptions), len(page.errors))  # before asserting: one failure stays one
    assert left == []


BUILD_TINY_GRAPH = """(() => {
    app.graph.clear();
    const mk = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
    const set = (n, name, v) => { n.widgets.find(w => w.name === name).value = v; };
    const loader = mk("TinyFluxLoader", 20, 20), sdtm = mk("SDTMPatchModel", 260, 20);
    const rec = mk("TokenMapRecorder", 620, 20), pos = mk("TinyConditioning", 20, 420);
    const neg = mk("TinyConditioning", 20, 560), lat = mk("EmptySD3LatentImage", 260, 460);
    const ks = mk("KSampler", 980, 20), dec = mk("TinyDecode", 980, 400), ov = mk("TokenMapOverlay", 1240, 20);
    const sched = mk("TokenRatioSchedule", 620, 420);
    set(neg, "seed", 1); set(lat, "width", 128); set(lat, "height", 128);
    set(ks, "steps", 3); set(ks, "cfg", 2.0); set(ks, "seed", 3);
    set(rec, "attention_steps", "all"); set(rec, "attention_blocks", "all");
    set(ov, "kind", "attention_text"); set(ov, "blocks", "all");
    loader.connect(0, sdtm, 0); sdtm.connect(0, rec, 0); rec.connect(0, ks, 0);
    pos.connect(0, ks, 1); neg.connect(0, ks, 2); lat.connect(0, ks, 3);
    ks.connect(0, dec, 0); rec.connect(0, ov, 0); dec.connect(0, ov, 1);
    app.graph.setDirtyCanvas(true, true);
    return [ov.id, sched.id];
})()"""


def test_viewer_draws_after_a_run_and_schedule_graph_draws(page, comfy_server):
    page.eval(BUILD_TINY_GRAPH)
    page.wait_for("document.querySelector('.token-ratio-schedule-graph canvas')?.dataset.drawn === 'schedule'", 30,
                  "the ratio schedule graph")
    page.eval("app.queuePrompt(0, 1).then(() => true)")
    viewer = "app.graph._nodes.find(n => n.type === 'TokenMapOverlay').tokenMapViewer"
    try:
        page.wait_for(f"{viewer}.canvas.dataset.drawn === 'map'", 120,
                      "the token-map viewer to draw a map after the run")
    except AssertionError as e:
        page.screenshot("viewer_timeout.png")
        raise AssertionError(f"{e}; viewer status: {page.eval(viewer + '.status.textContent')!r}; errors: "
                             f"{_page_errors(page)}; server log:\n{comfy_server['log'].read_text()[-3000:]}")
    # Switch the kind and move the sliders: the viewer fetches and draws again.
    state = page.eval("""(async () => {
        const v = app.graph._nodes.find(n => n.type === 'TokenMapOverlay').tokenMapViewer;
        v.kind.value = 'merge_size'; await v.fetchMap();
        const a = v.canvas.dataset.drawn, s1 = v.status.textContent;
        v.block.input.value = '1'; await v.fetchMap();
        return {a, s1, s2: v.status.textContent, drawn: v.canvas.dataset.drawn, w: v.canvas.width,
                stats: v.stats.textContent, steps: v.meta.steps, blocks: v.meta.blocks.length};
    })()""")
    assert state["drawn"] == "map" and state["w"] > 0, state
    assert state["steps"] == 3 and state["blocks"] == 4
    assert "merge_size, step" in state["s2"] and "block double_block 1" in state["s2"], state
    assert "tokens saved" in state["stats"]
    page.eval("(() => { const n = app.graph._nodes.find(n => n.type === 'TokenMapOverlay'); "
              "app.canvas.centerOnNode?.(n); app.graph.setDirtyCanvas(true, true); return true; })()")
    time.sleep(0.5)
    page.screenshot("viewer_after_run.png")
    page.screenshot("viewer_widget.png", viewer + ".root")
    assert _page_errors(page) == []
