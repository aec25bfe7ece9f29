// Token-map viewer (Token Map Overlay node) and ratio-schedule graph (Token Ratio Schedule node).
// Plain JavaScript, no build step. Data comes only from this pack's own routes on the ComfyUI
// server (/token_reduction/...); user-visible strings are set with textContent, never as HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MAPS = "/token_reduction/maps/";
const SCHEDULE = "/token_reduction/schedule";
const KIND_GROUPS = [
  ["attention", ["attention_text", "attention_image"]],
  ["redundancy", ["merge_size", "merge_groups"]],
  ["cached/pruned", ["computed"]],
];
// Viridis at 9 points, as in kernels/maps_render.py.
const VIRIDIS = [
  [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.53], [0.207, 0.372, 0.553],
  [0.164, 0.471, 0.558], [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.267, 0.749, 0.441],
  [0.993, 0.906, 0.144],
];

function viridis(v) {
  const x = Math.min(Math.max(Number.isFinite(v) ? v : 0, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const w = x - i;
  return VIRIDIS[i].map((c, j) => Math.round(255 * (c * (1 - w) + VIRIDIS[i + 1][j] * w)));
}

function groupColour(id) {
  const h = (id * 0.61803398875) % 1;
  const f = (n) => {
    const k = (n + h * 6) % 6;
    return Math.round(255 * (1 - 0.8 * Math.min(Math.max(Math.min(k, 4 - k), 0), 1)));
  };
  return [f(5), f(3), f(1)];
}

function el(tag, props = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "style") Object.assign(e.style, v);
    else if (k === "text") e.textContent = v;
    else e[k] = v;
  }
  for (const c of children) e.appendChild(c);
  return e;
}

function slider(label, min, max, value, step = 1) {
  const input = el("input", { type: "range", min: String(min), max: String(max), step: String(step),
    value: String(value), style: { flex: "1", minWidth: "60px" } });
  const out = el("span", { style: { minWidth: "4.5em", textAlign: "right" } });
  const row = el("label", { style: { display: "flex", gap: "6px", alignItems: "center" } },
    [el("span", { text: label, style: { minWidth: "4.5em" } }), input, out]);
  return { row, input, out };
}

async function getJSON(url) {
  const r = await api.fetchApi(url);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function decodeThumb(image) {
  if (!image) return null;
  const bin = atob(image.rgb_base64);
  const data = new ImageData(image.width, image.height);
  for (let i = 0, j = 0; i < image.width * image.height; i++, j += 3) {
    data.data[4 * i] = bin.charCodeAt(j);
    data.data[4 * i + 1] = bin.charCodeAt(j + 1);
    data.data[4 * i + 2] = bin.charCodeAt(j + 2);
    data.data[4 * i + 3] = 255;
  }
  return data;
}

class MapViewer {
  constructor(node) {
    this.node = node;
    this.meta = null;
    this.thumb = null;
    this.map = null;
    this.seq = 0;
    this.canvas = el("canvas", { width: 256, height: 256,
      style: { width: "100%", imageRendering: "pixelated", background: "#111", borderRadius: "4px" } });
    this.kind = el("select", { style: { flex: "1" } });
    for (const [group, kinds] of KIND_GROUPS) {
      const og = el("optgroup", { label: group });
      for (const k of kinds) og.appendChild(el("option", { value: k, text: k.replace("_", " ") }));
      this.kind.appendChild(og);
    }
    this.step = slider("step", 0, 0, 0);
    this.block = slider("block", 0, 0, 0);
    this.opacity = slider("opacity", 0, 1, 0.6, 0.05);
    this.frame = slider("frame", 0, 0, 0);
    this.status = el("div", { style: { fontSize: "11px", opacity: "0.8", minHeight: "1.2em" } });
    this.stats = el("pre", { style: { fontSize: "10px", whiteSpace: "pre-wrap", maxHeight: "120px",
      overflow: "auto", margin: "0" } });
    this.root = el("div", { className: "token-map-viewer",
      style: { display: "flex", flexDirection: "column", gap: "4px", fontSize: "12px", padding: "4px" } }, [
      this.canvas,
      el("label", { style: { display: "flex", gap: "6px", alignItems: "center" } },
        [el("span", { text: "map", style: { minWidth: "4.5em" } }), this.kind]),
      this.step.row, this.block.row, this.frame.row, this.opacity.row, this.status, this.stats,
    ]);
    this.frame.row.style.display = "none";
    this.kind.addEventListener("change", () => this.fetchMap());
    for (const s of [this.step, this.block]) s.input.addEventListener("input", () => this.fetchMap());
    this.frame.input.addEventListener("input", () => this.draw());
    this.opacity.input.addEventListener("input", () => this.draw());
    this.setStatus("Run the workflow to see the token maps here.");
  }

  setStatus(text) { this.status.textContent = text; }

  async load(id, kind) {
    const seq = ++this.seq;
    try {
      const meta = await getJSON(MAPS + encodeURIComponent(id));
      if (seq !== this.seq) return;
      this.meta = meta;
      this.thumb = decodeThumb(meta.image);
      this.stats.textContent = meta.stats || "";
      if (meta.refused) { this.setStatus(meta.refused); return; }
      if (kind) this.kind.value = kind;
      this.step.input.max = String(Math.max(meta.steps - 1, 0));
      this.block.input.max = String(Math.max(meta.blocks.length - 1, 0));
      const video = meta.grid.length === 3 && meta.grid[0] > 1;
      this.frame.row.style.display = video ? "flex" : "none";
      this.frame.input.max = String(video ? meta.grid[0] - 1 : 0);
      const rec = meta.recorded[this.kind.value] || [];
      if (rec.length) {  // start on a recorded pair of the chosen kind
        const [s, b] = rec[Math.floor(rec.length / 2)];
        this.step.input.value = String(s);
        this.block.input.value = String(b);
      }
      await this.fetchMap();
    } catch (e) {
      this.setStatus("Token maps unavailable: " + e.message);
    }
  }

  async fetchMap() {
    if (!this.meta) return;
    const step = Number(this.step.input.value), block = Number(this.block.input.value);
    this.step.out.textContent = `${step + 1}/${this.meta.steps}`;
    this.block.out.textContent = this.meta.blocks[block] || String(block);
    const seq = ++this.seq;
    const q = new URLSearchParams({ kind: this.kind.value, step: String(step), block: String(block) });
    try {
      const m = await getJSON(MAPS + encodeURIComponent(this.meta.id) + "/map?" + q.toString());
      if (seq !== this.seq) return;
      this.map = m.values ? m : null;
      if (!m.values) { this.setStatus(m.reason || "nothing recorded here"); this.draw(); return; }
      const p = this.meta.progress[step];
      this.setStatus(`${m.kind}, step ${step + 1}, block ${this.meta.blocks[block]}` +
        (p == null ? "" : `, progress ${p.toFixed(2)}`) + `: ${m.min.toPrecision(3)} .. ${m.max.toPrecision(3)}`);
    } catch (e) {
      if (seq !== this.seq) return;
      this.map = null;
      this.setStatus(e.message);
    }
    this.draw();
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const thumb = this.thumb;
    const w = thumb ? thumb.width : 256, h = thumb ? thumb.height : 256;
    this.canvas.width = w;
    this.canvas.height = h;
    const img = thumb ? new ImageData(new Uint8ClampedArray(thumb.data), w, h) : ctx.createImageData(w, h);
    const m = this.map;
    const alpha = Number(this.opacity.input.value);
    this.opacity.out.textContent = alpha.toFixed(2);
    if (m && m.values.length) {
      const g = m.grid, gh = g[g.length - 2], gw = g[g.length - 1];
      const frame = g.length === 3 ? Math.min(Number(this.frame.input.value), g[0] - 1) : 0;
      this.frame.out.textContent = String(frame);
      const span = m.max > 0 ? m.max : 1;
      for (let y = 0; y < h; y++) {
        const ty = Math.min(Math.floor((y * gh) / h), gh - 1);
        for (let x = 0; x < w; x++) {
          const tx = Math.min(Math.floor((x * gw) / w), gw - 1);
          const v = m.values[frame * gh * gw + ty * gw + tx];
          let c, a = alpha;
          if (m.kind === "merge_groups") { c = groupColour(v); if (v <= 0) a = 0; }
          else c = viridis(v / span);
          const i = 4 * (y * w + x);
          for (let j = 0; j < 3; j++) img.data[i + j] = img.data[i + j] * (1 - a) + c[j] * a;
          img.data[i + 3] = 255;
        }
      }
    }
    ctx.putImageData(img, 0, 0);
    this.canvas.dataset.drawn = m ? "map" : "empty";
  }
}

// ---- ratio schedule graph -----------------------------------------------------------------------

class ScheduleGraph {
  constructor(node) {
    this.node = node;
    this.seq = 0;
    this.timer = null;
    this.canvas = el("canvas", { width: 240, height: 150, style: { width: "100%", background: "#111" } });
    this.caption = el("div", { style: { fontSize: "11px", opacity: "0.8" } });
    this.root = el("div", { className: "token-ratio-schedule-graph",
      style: { display: "flex", flexDirection: "column", gap: "2px", padding: "4px" } },
      [this.canvas, this.caption]);
  }

  widgetValue(name) {
    const w = (this.node.widgets || []).find((x) => x.name === name);
    return w ? w.value : undefined;
  }

  schedule() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), 150);
  }

  async refresh() {
    const q = new URLSearchParams();
    q.set("preset", String(this.widgetValue("preset") ?? "constant"));
    for (const k of ["ratio", "end_scale", "switch_percent"]) {
      const v = Number(this.widgetValue(k));
      q.set(k, (Number.isFinite(v) ? Math.min(Math.max(v, 0), 1) : 0).toFixed(4));
    }
    for (const k of ["progress_curve", "depth_curve", "schedule_json"]) {
      const v = this.widgetValue(k);
      if (typeof v === "string" && v.trim()) q.set(k, v);
    }
    const seq = ++this.seq;
    try {
      const s = await getJSON(SCHEDULE + "?" + q.toString());
      if (seq === this.seq) this.draw(s);
    } catch (e) {
      if (seq === this.seq) { this.caption.textContent = e.message; this.canvas.dataset.drawn = "error"; }
    }
  }

  draw(s) {
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height, L = 28, B = 18;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, W, H);
    const nd = s.depth.length, np = s.progress.length;
    let max = 0;
    for (const row of s.ratios) for (const v of row) max = Math.max(max, v);
    const cw = (W - L) / np, ch = (H - B) / nd;
    for (let i = 0; i < nd; i++) {
      for (let j = 0; j < np; j++) {
        const [r, g, b] = viridis(s.ratios[i][j] / (max > 0 ? max : 1));
        ctx.fillStyle = `rgb(${r},${g},${b})`;
        // depth 0 (first block) at the bottom, progress left to right
        ctx.fillRect(L + j * cw, H - B - (i + 1) * ch, Math.ceil(cw), Math.ceil(ch));
      }
    }
    ctx.fillStyle = "#ccc";
    ctx.font = "10px sans-serif";
    ctx.fillText("layer", 0, 10);
    ctx.fillText("0", 14, H - B);
    ctx.fillText("1", 14, 10 + 10);
    ctx.fillText("progress 0", L, H - 4);
    ctx.fillText("1", W - 8, H - 4);
    this.caption.textContent = `${s.name}: ratio up to ${max.toFixed(2)} (layer x progress)`;
    this.canvas.dataset.drawn = "schedule";
  }
}

app.registerExtension({
  name: "token_reduction.token_maps",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "TokenMapOverlay") {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        this.tokenMapViewer = new MapViewer(this);
        const w = this.addDOMWidget("token_map_viewer", "token_map_viewer", this.tokenMapViewer.root,
          { serialize: false });
        w.serialize = false;  // never part of widgets_values: saved workflows keep their layout
        this.setSize([Math.max(this.size[0], 340), Math.max(this.size[1], 700)]);
        return r;
      };
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = executed?.apply(this, arguments);
        const entry = message?.token_maps?.[0];
        if (entry && typeof entry.id === "string") this.tokenMapViewer?.load(entry.id, entry.kind);
        return r;
      };
    }
    if (nodeData.name === "TokenRatioSchedule") {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        const graph = (this.tokenScheduleGraph = new ScheduleGraph(this));
        const gw = this.addDOMWidget("ratio_schedule_graph", "ratio_schedule_graph", graph.root, { serialize: false });
        gw.serialize = false;
        for (const w of this.widgets || []) {
          const cb = w.callback;
          w.callback = function () {
            const out = cb?.apply(this, arguments);
            graph.schedule();
            return out;
          };
        }
        graph.schedule();
        return r;
      };
      const configure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = configure?.apply(this, arguments);
        this.tokenScheduleGraph?.schedule();
        return r;
      };
    }
  },
});
