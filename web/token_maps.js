// The pack's frontend: the token-map viewer (Token Map Overlay node), the ratio-schedule graph (Token
// Ratio Schedule node), and ignored widgets drawn greyed on the pack's nodes (a patch node's expert
// widgets while a preset runs, what a connected schedule or model replaces).
// Plain JavaScript, no build step. Data comes only from this pack's own routes on the ComfyUI server
// (/token_reduction/...); user-visible strings are set with textContent, never as HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MAPS = "/token_reduction/maps/";
const SCHEDULE = "/token_reduction/schedule";
const PRESETS = "/token_reduction/presets";
// How the viewer's map menu groups the map kinds (the kinds themselves come from the node's widget).
const KIND_GROUPS = { attention: ["attention_text", "attention_image"], redundancy: ["merge_size", "merge_groups"],
  "cached/pruned": ["computed"] };
// Viridis at 9 points, as in kernels/maps_render.py.
const VIRIDIS = [
  [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.53], [0.207, 0.372, 0.553],
  [0.164, 0.471, 0.558], [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.267, 0.749, 0.441],
  [0.993, 0.906, 0.144],
];
const VIEWER_MIN = [340, 430];    // the viewer's smallest useful size inside the node
const GRAPH_MIN_HEIGHT = 190;     // the schedule graph's
const IGNORED_ALPHA = 0.4;

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
  const out = el("span", { style: { minWidth: "6.5em", textAlign: "right", whiteSpace: "nowrap" } });
  const row = el("label", { style: { display: "flex", gap: "6px", alignItems: "center", flex: "none" } },
    [el("span", { text: label, style: { minWidth: "4.5em" } }), input, out]);
  return { row, input, out };
}

async function getJSON(url) {
  const r = await api.fetchApi(url);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function widget(node, name) {
  return (node.widgets || []).find((w) => w.name === name);
}

function inputLinked(node, name) {
  return (node.inputs || []).find((i) => i.name === name)?.link != null;
}

// Run `fn` after a widget's own callback (what the frontend calls when the user changes it).
function afterChange(w, fn) {
  if (!w) return;
  const cb = w.callback;
  w.callback = function () {
    const out = cb?.apply(this, arguments);
    fn(w);
    return out;
  };
}

// ---- ignored widgets --------------------------------------------------------------------------------

// A widget the node will not use is drawn at reduced opacity, its value still shown and still editable;
// `why` says what replaces it (kept on the widget as tokenReductionIgnored).
function setIgnored(w, why) {
  if (!w.tokenReductionDraw) {
    w.tokenReductionDraw = true;
    for (const name of ["draw", "drawWidget"]) {
      const original = w[name];
      if (typeof original !== "function") continue;
      w[name] = function (ctx) {
        if (!this.tokenReductionIgnored) return original.apply(this, arguments);
        const alpha = ctx.globalAlpha;
        ctx.globalAlpha = alpha * IGNORED_ALPHA;
        try { return original.apply(this, arguments); } finally { ctx.globalAlpha = alpha; }
      };
    }
  }
  w.tokenReductionIgnored = why || null;
}

function fitHeight(node, minWidth = 0) {
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], minWidth, min[0]), Math.max(node.size[1], min[1])]);
}

// ---- patch nodes: presets --------------------------------------------------------------------------

// entry (from /token_reduction/presets): {custom, expert: [names], presets: {name: {widget: value}},
// schedule_replaces: [names]}.
class PresetControl {
  constructor(node, entry) {
    this.node = node;
    this.entry = entry;
    this.filling = false;
    this.preset = widget(node, "preset");
    this.expert = entry.expert.map((n) => widget(node, n)).filter(Boolean);
    afterChange(this.preset, () => this.update());
    for (const w of this.expert) {
      afterChange(w, () => {
        // Editing an expert widget means the user wants their own settings: the preset becomes custom.
        if (!this.filling && this.preset.value !== entry.custom) this.preset.value = entry.custom;
        this.update();
      });
    }
  }

  update() {
    const p = this.preset?.value;
    const values = this.entry.presets[p];
    if (values) {  // a named preset runs its own values: show them
      this.filling = true;
      for (const w of this.expert) if (w.name in values && w.value !== values[w.name]) w.value = values[w.name];
      this.filling = false;
    }
    const scheduled = inputLinked(this.node, "schedule");
    for (const w of this.expert) {
      const why = scheduled && this.entry.schedule_replaces.includes(w.name) ? "replaced by the connected schedule"
        : values ? `set by preset ${p}` : null;
      setIgnored(w, why);
    }
    this.node.setDirtyCanvas?.(true, true);
  }
}

// ---- token-map viewer -------------------------------------------------------------------------------

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

function fmt(v) {
  return Number(v).toPrecision(3);
}

// A map is flat when all its values are equal (to a part in a million of their size).
function isFlat(m) {
  return m.max - m.min <= 1e-6 * Math.max(Math.abs(m.max), Math.abs(m.min), 1e-12);
}

class MapViewer {
  constructor(node) {
    this.node = node;
    this.meta = null;
    this.thumb = null;
    this.map = null;
    this.seq = 0;
    this.steps = [];   // recorded steps of the chosen kind
    this.blocks = [];  // recorded blocks of the chosen kind at the chosen step
    const row = (children) => el("div", { style: { display: "flex", gap: "6px", alignItems: "center",
      flex: "none" } }, children);
    this.canvas = el("canvas", { width: 256, height: 256,
      style: { width: "100%", height: "100%", objectFit: "contain", imageRendering: "pixelated", display: "block" } });
    this.picture = el("div", { style: { flex: "1 1 0", minHeight: "120px", background: "#111",
      borderRadius: "4px", overflow: "hidden" } }, [this.canvas]);
    this.legendBar = el("canvas", { width: 128, height: 1,
      style: { flex: "1", height: "10px", minWidth: "40px", imageRendering: "pixelated", borderRadius: "2px" } });
    this.legendMin = el("span", { style: { whiteSpace: "nowrap" } });
    this.legendMax = el("span", { style: { whiteSpace: "nowrap" } });
    this.legendText = el("div", { style: { fontSize: "10px", opacity: "0.8", whiteSpace: "nowrap", overflow: "hidden",
      textOverflow: "ellipsis", flex: "none" } });
    this.legend = el("div", { className: "token-map-legend", style: { display: "flex", flexDirection: "column",
      gap: "1px", flex: "none", fontSize: "10px" } }, [row([this.legendMin, this.legendBar, this.legendMax]),
      this.legendText]);
    this.kind = el("select", { style: { flex: "1", minWidth: "0" } });
    this.step = slider("step", 0, 0, 0);
    this.block = slider("block", 0, 0, 0);
    this.frame = slider("frame", 0, 0, 0);
    this.opacity = slider("opacity", 0, 1, 0.6, 0.05);
    this.status = el("div", { className: "token-map-status", style: { fontSize: "11px", opacity: "0.85",
      whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", flex: "none", minHeight: "1.3em" } });
    this.stats = el("pre", { className: "token-map-stats", style: { fontSize: "10px", whiteSpace: "pre-wrap",
      height: "64px", overflow: "auto", margin: "0", flex: "none" } });
    this.root = el("div", { className: "token-map-viewer", style: { display: "flex", flexDirection: "column",
      gap: "3px", fontSize: "12px", padding: "2px 4px", boxSizing: "border-box", height: "100%",
      overflow: "hidden" } }, [
      this.picture, this.legend,
      row([el("span", { text: "map", style: { minWidth: "4.5em" } }), this.kind]),
      this.step.row, this.block.row, this.frame.row, this.opacity.row, this.status, this.stats,
    ]);
    this.frame.row.style.display = "none";
    // The map kind and the opacity are the node's own `kind` and `opacity` widgets, shown here too.
    this.kindWidget = widget(node, "kind");
    this.opacityWidget = widget(node, "opacity");
    this.fillKinds();
    this.kind.addEventListener("change", () => this.setWidget(this.kindWidget, this.kind.value));
    this.opacity.input.addEventListener("input", () => this.setWidget(this.opacityWidget, Number(this.opacity.input.value)));
    afterChange(this.kindWidget, () => this.syncFromWidgets(true));
    afterChange(this.opacityWidget, () => this.syncFromWidgets(false));
    this.step.input.addEventListener("input", () => { this.pickBlocks(); this.fetchMap(); });
    this.block.input.addEventListener("input", () => this.fetchMap());
    this.frame.input.addEventListener("input", () => this.draw());
    this.syncFromWidgets(false);
    this.setStatus("Run the workflow to see the token maps here.");
    this.draw();
  }

  fillKinds() {
    const kinds = this.kindWidget?.options?.values || Object.values(KIND_GROUPS).flat();
    const grouped = new Set();
    for (const [group, members] of Object.entries(KIND_GROUPS)) {
      const og = el("optgroup", { label: group });
      for (const k of members.filter((m) => kinds.includes(m))) {
        og.appendChild(el("option", { value: k, text: k.replace("_", " ") }));
        grouped.add(k);
      }
      if (og.children.length) this.kind.appendChild(og);
    }
    for (const k of kinds.filter((m) => !grouped.has(m))) this.kind.appendChild(el("option", { value: k, text: k }));
  }

  setWidget(w, value) {
    if (!w) { this.syncFromWidgets(true); return; }
    w.value = value;
    w.callback?.(value, app.canvas, this.node);
    this.node.setDirtyCanvas?.(true, true);
  }

  syncFromWidgets(kindChanged) {
    if (this.kindWidget) this.kind.value = String(this.kindWidget.value);
    if (this.opacityWidget) this.opacity.input.value = String(this.opacityWidget.value);
    this.opacity.out.textContent = Number(this.opacity.input.value).toFixed(2);
    if (kindChanged && this.meta) { this.pickSteps(); this.fetchMap(); } else this.draw();
  }

  setStatus(text) {
    this.status.textContent = text;
    this.status.title = text;  // the whole line, where the node is too narrow for it
  }

  recorded() {
    return (this.meta?.recorded?.[this.kind.value] || []);
  }

  // The sliders run over recorded positions only: steps that hold a map of this kind, then the blocks
  // that hold one at the chosen step.
  pickSteps() {
    const rec = this.recorded();
    const keep = this.steps[Number(this.step.input.value)];
    this.steps = [...new Set(rec.map((p) => p[0]))];
    let i = this.steps.indexOf(keep);
    if (i < 0) i = Math.floor(this.steps.length / 2);
    this.step.input.max = String(Math.max(this.steps.length - 1, 0));
    this.step.input.value = String(Math.max(i, 0));
    this.step.input.disabled = this.steps.length < 2;
    this.pickBlocks();
  }

  pickBlocks() {
    const step = this.steps[Number(this.step.input.value)];
    const keep = this.blocks[Number(this.block.input.value)];
    this.blocks = this.recorded().filter((p) => p[0] === step).map((p) => p[1]);
    let i = this.blocks.indexOf(keep);
    if (i < 0) i = Math.floor(this.blocks.length / 2);
    this.block.input.max = String(Math.max(this.blocks.length - 1, 0));
    this.block.input.value = String(Math.max(i, 0));
    this.block.input.disabled = this.blocks.length < 2;
  }

  async load(id) {
    const seq = ++this.seq;
    try {
      const meta = await getJSON(MAPS + encodeURIComponent(id));
      if (seq !== this.seq) return;
      this.meta = meta;
      this.thumb = decodeThumb(meta.image);
      this.syncFromWidgets(false);  // the run used the node's kind: show that one
      this.stats.textContent = meta.stats || "";
      if (meta.refused) { this.map = null; this.setStatus(meta.refused); this.draw(); return; }
      const video = meta.grid.length === 3 && meta.grid[0] > 1;
      this.frame.row.style.display = video ? "flex" : "none";
      this.frame.input.max = String(video ? meta.grid[0] - 1 : 0);
      this.pickSteps();
      await this.fetchMap();
    } catch (e) {
      this.setStatus("Token maps unavailable: " + e.message);
    }
  }

  async fetchMap() {
    if (!this.meta) return;
    const kind = this.kind.value;
    const step = this.steps[Number(this.step.input.value)];
    const block = this.blocks[Number(this.block.input.value)];
    this.step.out.textContent = step === undefined ? "-" : `${step + 1}/${this.meta.steps}`;
    this.block.out.textContent = block === undefined ? "-" : this.meta.blocks[block];
    const seq = ++this.seq;
    if (step === undefined || block === undefined) {
      this.map = null;
      this.setStatus(`No ${kind} map in this run: ${this.meta.not_recorded?.[kind] || "nothing was recorded"}.`);
      this.draw();
      return;
    }
    const q = new URLSearchParams({ kind, step: String(step), block: String(block) });
    try {
      const m = await getJSON(MAPS + encodeURIComponent(this.meta.id) + "/map?" + q.toString());
      if (seq !== this.seq) return;
      this.map = m.values ? m : null;
      if (!m.values) { this.setStatus(m.reason || "nothing recorded here"); this.draw(); return; }
      const p = this.meta.progress[step];
      this.step.out.title = p == null ? "" : `progress ${p.toFixed(2)}`;
      this.setStatus(`${m.kind}, step ${step + 1}/${this.meta.steps}, ${this.meta.blocks[block]}: ` +
        (isFlat(m) ? `flat, every token ${fmt(m.min)}` : `${fmt(m.min)} .. ${fmt(m.max)}`));
    } catch (e) {
      if (seq !== this.seq) return;
      this.map = null;
      this.setStatus(e.message);
    }
    this.draw();
  }

  drawLegend() {
    const m = this.map;
    const kind = this.kind.value;
    const help = this.meta?.kind_help?.[kind] || kind.replace("_", " ");
    const bar = this.legendBar.getContext("2d");
    const img = bar.createImageData(this.legendBar.width, 1);
    const groups = kind === "merge_groups";
    for (let x = 0; x < this.legendBar.width; x++) {
      const c = groups ? groupColour(Math.floor(x / 8) + 1) : viridis(x / (this.legendBar.width - 1));
      img.data.set([...c, m && !isFlat(m) ? 255 : 60], 4 * x);
    }
    bar.putImageData(img, 0, 0);
    if (!m) {
      this.legendMin.textContent = this.legendMax.textContent = "";
      this.legendText.textContent = help;
    } else if (isFlat(m)) {
      this.legendMin.textContent = this.legendMax.textContent = "";
      this.legendText.textContent = `flat map, every token ${fmt(m.min)} (no overlay): ${help}`;
    } else {
      this.legendMin.textContent = groups ? "groups" : fmt(m.min);
      this.legendMax.textContent = groups ? "" : fmt(m.max);
      this.legendText.textContent = help;
    }
    this.legendText.title = this.legendText.textContent;
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const thumb = this.thumb;
    const w = thumb ? thumb.width : 256, h = thumb ? thumb.height : 256;
    this.canvas.width = w;
    this.canvas.height = h;
    const img = thumb ? new ImageData(new Uint8ClampedArray(thumb.data), w, h) : ctx.createImageData(w, h);
    if (!thumb) for (let i = 3; i < img.data.length; i += 4) img.data[i] = 255;
    const m = this.map;
    const alpha = Number(this.opacity.input.value);
    this.opacity.out.textContent = alpha.toFixed(2);
    this.drawLegend();
    if (m && m.values.length && !isFlat(m)) {
      const g = m.grid, gh = g[g.length - 2], gw = g[g.length - 1];
      const frame = g.length === 3 ? Math.min(Number(this.frame.input.value), g[0] - 1) : 0;
      this.frame.out.textContent = String(frame);
      const lo = m.min, span = m.max - m.min;  // the colour scale runs from the map's min to its max
      for (let y = 0; y < h; y++) {
        const ty = Math.min(Math.floor((y * gh) / h), gh - 1);
        for (let x = 0; x < w; x++) {
          const tx = Math.min(Math.floor((x * gw) / w), gw - 1);
          const v = m.values[frame * gh * gw + ty * gw + tx];
          let c, a = alpha;
          if (m.kind === "merge_groups") { c = groupColour(v); if (v <= 0) a = 0; }
          else c = viridis((v - lo) / span);
          const i = 4 * (y * w + x);
          for (let j = 0; j < 3; j++) img.data[i + j] = img.data[i + j] * (1 - a) + c[j] * a;
          img.data[i + 3] = 255;
        }
      }
    }
    ctx.putImageData(img, 0, 0);
    this.canvas.dataset.drawn = !m ? "empty" : isFlat(m) ? "flat" : "map";
  }
}

// ---- ratio schedule graph ---------------------------------------------------------------------------

class ScheduleGraph {
  constructor(node) {
    this.node = node;
    this.seq = 0;
    this.timer = null;
    this.canvas = el("canvas", { width: 300, height: 160, style: { width: "100%", height: "100%",
      objectFit: "contain", display: "block" } });
    this.caption = el("div", { style: { fontSize: "11px", opacity: "0.8", whiteSpace: "nowrap", overflow: "hidden",
      textOverflow: "ellipsis", flex: "none" } });
    this.root = el("div", { className: "token-ratio-schedule-graph", style: { display: "flex",
      flexDirection: "column", gap: "2px", padding: "2px 4px", boxSizing: "border-box", height: "100%",
      overflow: "hidden" } }, [el("div", { style: { flex: "1 1 0", minHeight: "100px", background: "#111" } },
      [this.canvas]), this.caption]);
  }

  widgetValue(name) {
    return widget(this.node, name)?.value;
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
    q.set("calibrate", inputLinked(this.node, "model") ? "1" : "0");
    const seq = ++this.seq;
    try {
      const s = await getJSON(SCHEDULE + "?" + q.toString());
      if (seq !== this.seq) return;
      for (const w of this.node.widgets || []) {
        if (w.name === "ratio_schedule_graph") continue;
        setIgnored(w, s.unused.includes(w.name) ? (s.calibrate ? "replaced by calibration" : "unused") : null);
      }
      this.node.setDirtyCanvas?.(true, true);
      if (s.calibrate) this.drawCalibrate(); else this.draw(s);
    } catch (e) {
      if (seq === this.seq) { this.caption.textContent = e.message; this.canvas.dataset.drawn = "error"; }
    }
  }

  drawCalibrate() {
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, W, H);
    ctx.fillStyle = "#ccc";
    ctx.font = "13px sans-serif";
    ctx.textAlign = "center";
    const lines = ["Calibrated when the workflow runs:", "one unpatched pass of the connected model",
      "measures where its tokens are redundant.", "The heatmap output shows the result."];
    lines.forEach((t, i) => ctx.fillText(t, W / 2, H / 2 - 30 + 20 * i));
    ctx.textAlign = "left";
    this.caption.textContent = "calibrated to the connected model (preset and curves unused)";
    this.canvas.dataset.drawn = "calibrate";
  }

  draw(s) {
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height, L = 34, B = 18;
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
    ctx.font = "11px sans-serif";
    ctx.fillText("layer", 0, 11);
    ctx.fillText("last", 2, 26);
    ctx.fillText("first", 2, H - B - 2);
    ctx.fillText("progress 0", L, H - 4);
    ctx.textAlign = "right";
    ctx.fillText("1", W - 2, H - 4);
    ctx.textAlign = "left";
    this.caption.textContent = `${s.name}: ratio up to ${max.toFixed(2)} (layer x progress)`;
    this.caption.title = this.caption.textContent;
    this.canvas.dataset.drawn = "schedule";
  }
}

// ---- registration -----------------------------------------------------------------------------------

function addPanel(node, name, element, minHeight, minWidth) {
  const w = node.addDOMWidget(name, name, element, { serialize: false, getMinHeight: () => minHeight });
  w.serialize = false;  // never part of widgets_values: saved workflows keep their layout
  fitHeight(node, minWidth);
  return w;
}

function hook(nodeType, name, fn) {
  const original = nodeType.prototype[name];
  nodeType.prototype[name] = function () {
    const r = original?.apply(this, arguments);
    fn.apply(this, arguments);
    return r;
  };
}

let presetTable = null;
function presets() {
  presetTable ??= getJSON(PRESETS).catch((e) => {
    console.error("token_reduction: the patch nodes' presets are unavailable:", e.message);
    return {};
  });
  return presetTable;
}

app.registerExtension({
  name: "token_reduction.token_maps",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const entry = (await presets())[nodeData.name];
    if (entry) {
      hook(nodeType, "onNodeCreated", function () {
        this.tokenReductionPresets = new PresetControl(this, entry);
        this.tokenReductionPresets.update();
      });
      hook(nodeType, "onConfigure", function () { this.tokenReductionPresets?.update(); });
      hook(nodeType, "onConnectionsChange", function () { this.tokenReductionPresets?.update(); });
    }
    if (nodeData.name === "TokenMapOverlay") {
      hook(nodeType, "onNodeCreated", function () {
        this.tokenMapViewer = new MapViewer(this);
        addPanel(this, "token_map_viewer", this.tokenMapViewer.root, VIEWER_MIN[1], VIEWER_MIN[0]);
      });
      hook(nodeType, "onConfigure", function () { this.tokenMapViewer?.syncFromWidgets(false); });
      hook(nodeType, "onExecuted", function (message) {
        const first = message?.token_maps?.[0];
        if (first && typeof first.id === "string") this.tokenMapViewer?.load(first.id);
      });
    }
    if (nodeData.name === "TokenRatioSchedule") {
      hook(nodeType, "onNodeCreated", function () {
        const graph = (this.tokenScheduleGraph = new ScheduleGraph(this));
        for (const w of this.widgets || []) afterChange(w, () => graph.schedule());
        addPanel(this, "ratio_schedule_graph", graph.root, GRAPH_MIN_HEIGHT, 300);
        graph.schedule();
      });
      hook(nodeType, "onConfigure", function () { this.tokenScheduleGraph?.schedule(); });
      hook(nodeType, "onConnectionsChange", function () { this.tokenScheduleGraph?.schedule(); });
    }
  },
});
