"""ComfyUI's real frontend in headless Chromium, for tests/host/test_browser.py and tools/thumbnails.py.

- `comfy_server()`: a ComfyUI server on 127.0.0.1 (free port, --cpu, --disable-api-nodes) with a
  temporary base directory whose custom_nodes/ holds a symlink to this pack and any extra node files.
- `open_page()`: Chromium driven over the DevTools protocol with aiohttp's websocket client (no extra
  package), on that server's frontend, once the pack's extension has registered.

Needs the host's venv (aiohttp, the frontend package) and a Chromium on PATH.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
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

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-token-reduction"
EXTENSION = "token_reduction.token_maps"
SERVER_START_S = 120
WINDOW = (1600, 1000)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                  f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class StartError(RuntimeError):
    pass


@contextlib.contextmanager
def comfy_server(comfy_root: Path, extra_nodes: dict[str, str] | None = None, python: str = sys.executable):
    """Yields {"url", "base", "log"} of a running server; `extra_nodes` maps a custom_nodes folder name to
    the text of its __init__.py."""
    base = Path(tempfile.mkdtemp(prefix="token-reduction-browser-"))
    (base / "custom_nodes").mkdir()
    os.symlink(PACK_ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    for name, text in (extra_nodes or {}).items():
        (base / "custom_nodes" / name).mkdir()
        (base / "custom_nodes" / name / "__init__.py").write_text(text)
    port = _free_port()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    log_path = base / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch", "--disable-api-nodes", "--use-pytorch-cross-attention"],
        cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise StartError(f"ComfyUI exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if "TokenMapOverlay" in http_json(url + "/object_info/TokenMapOverlay"):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise StartError(f"ComfyUI did not serve the pack within {SERVER_START_S} s:\n"
                                 f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "base": base, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


class CDP:
    """A minimal Chrome DevTools Protocol client on aiohttp, run on its own event-loop thread. Collects
    exceptions and console / log errors as "exception: ..." and "console error: ..." lines."""

    def __init__(self, ws_url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.next_id = 0
        self.pending: dict = {}
        self.errors: list = []
        self.mark = 0
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
            method, params = data.get("method"), data.get("params") or {}
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.errors.append("exception: " + ((d.get("exception") or {}).get("description") or d.get("text")))
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                # The caller's frames as a stack, so that an error logged by an extension names its file.
                frames = "".join(f"\n    at {f.get('functionName') or '<anonymous>'} ({f['url']}:{f['lineNumber'] + 1})"
                                 for f in (params.get("stackTrace") or {}).get("callFrames", []) if f.get("url"))
                self.errors.append("console error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]) + frames)
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                e = params["entry"]
                self.errors.append(f"console error: {e.get('source')}: {e.get('text')} {e.get('url', '')}")

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

    def new_errors(self) -> list:
        """Errors since the last call (or since the page opened); moves the mark first, so that one
        failing check does not fail the next."""
        errors, self.mark = self.errors[self.mark:], len(self.errors)
        return errors

    def close_dialogs(self):
        """Click every open dialog's close button ([role=dialog]: PrimeVue's in frontend 1.27 and 1.32, its own
        in 1.49, whose button reads "Close dialog")."""
        self.eval("document.querySelectorAll('.p-dialog-close-button, [role=dialog] [aria-label^=\"Close\"]')"
                  ".forEach(b => b.click()); true")
        time.sleep(0.3)

    def screenshot(self, path: Path, selector_js: str | None = None, fmt: str = "png", close_dialogs=True) -> bytes:
        """Full page, or the element `selector_js` evaluates to; open dialogs are closed first (by default)."""
        if close_dialogs:
            self.close_dialogs()
        params = {"format": fmt}
        if selector_js:
            r = self.eval(f"(() => {{ const r = ({selector_js}).getBoundingClientRect(); "
                          "return [r.x, r.y, r.width, r.height]; })()")
            if r[2] > 0 and r[3] > 0:
                params["clip"] = {"x": r[0], "y": r[1], "width": r[2], "height": r[3], "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def close(self):
        async def _close():
            await self.ws.close()
            await self.session.close()
        try:
            self._run(_close(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


@contextlib.contextmanager
def open_page(url: str, chromium_path: str):
    """A CDP client on the frontend at `url`, after the pack's extension registered."""
    profile = Path(tempfile.mkdtemp(prefix="token-reduction-chromium-"))
    proc = subprocess.Popen([chromium_path, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.time() > deadline:
                raise StartError("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = http_json(f"http://127.0.0.1:{port}/json/list")
        cdp = CDP(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
        cdp.url = url
        for domain in ("Runtime", "Log", "Page"):
            cdp.call(f"{domain}.enable")
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
        # A returning user: no first-run templates dialog over the canvas, no "Nodes 2.0" banner above it.
        cdp.call("Page.addScriptToEvaluateOnNewDocument",
                 {"source": "localStorage.setItem('vueNodesBannerDismissed', 'true');"})
        req = urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        cdp.call("Page.navigate", {"url": url + "/"})
        cdp.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                     "LiteGraph.registered_node_types['TokenMapOverlay'])", 90, "the ComfyUI frontend to load")
        cdp.wait_for(f"(app.extensions || []).some(e => e.name === '{EXTENSION}')", 30,
                     "the pack's extension to register")
        time.sleep(2)
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


def load_workflow(page: CDP, wf: dict):
    page.eval(f"app.loadGraphData({json.dumps(wf)}).then(() => true)")
    time.sleep(0.5)


def node_key(node_id) -> str:
    """A node id as both forms agree on it: workflow files hold numbers, frontend 1.49 keeps them as strings."""
    return str(node_id)


def drawn_sizes(page: CDP) -> dict:
    """{node_key(id): [w, h]} as the frontend draws the loaded graph (a node grows to fit its widgets)."""
    return {node_key(n["id"]): n["size"]
            for n in page.eval("app.graph._nodes.map(n => ({id: n.id, size: [...n.size]}))")}


def drawn_rectangles(page: CDP) -> dict:
    """{node_key(id): (left, top, right, bottom)} of the loaded graph's nodes as the frontend draws them, its own
    title bar height above pos included."""
    return {node_key(n["id"]): tuple(n["box"]) for n in page.eval("""app.graph._nodes.map(n => ({id: n.id,
        box: [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]}))""")}


def model_hints(graph: dict) -> set:
    """The download URLs of the model hints anywhere in a serialized graph (subgraph definitions included)."""
    found = set()
    if isinstance(graph, dict):
        for m in (graph.get("properties") or {}).get("models", []) if isinstance(graph.get("properties"), dict) else []:
            if isinstance(m, dict) and isinstance(m.get("url"), str):
                found.add(m["url"])
        values = graph.values()
    elif isinstance(graph, list):
        values = graph
    else:
        return found
    for v in values:
        found |= model_hints(v)
    return found
