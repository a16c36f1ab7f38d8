"""The report page's template, CSS and JavaScript (kept here as text so the package needs no
data files). The Bokeh document holds the scatter; this script adds the controls, the class
gallery, the traversals and the selection file. It publishes ``window.cryolatentReport``:
``ready`` (true once Bokeh has drawn the map), ``loadMs`` (navigation start to that
moment), ``points()``, ``selectRows(rows)``, ``selectionDoc()`` and ``errors`` — for the
tests and ``benchmarks/report_bench.py``."""

from __future__ import annotations

import json


def script_json(obj) -> str:
    """``obj`` as JSON inside a ``<script type="application/json">`` block."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="cl-meta">{text}</script>'


def blob_tags(blobs: dict[str, str]) -> str:
    """One ``<script type="application/octet-stream">`` block of base64 per array."""
    return "\n".join(f'<script type="application/octet-stream" id="blob-{k}">{v}</script>'
                     for k, v in blobs.items())


def template() -> str:
    """The page (a Jinja template extending Bokeh's ``file.html``)."""
    return _TEMPLATE


_TEMPLATE = """
{% block postamble %}
<style>{{ report_css }}</style>
{% endblock %}
{% block inner_body %}
<div id="cl-app">
  <header id="cl-head">
    <h1>{{ title_html }}</h1>
    <div id="cl-sub"></div>
  </header>
  <div id="cl-main">
    <section id="cl-left">
      <div id="cl-controls">
        <label>map <select id="cl-map"></select></label>
        <label>colour by <select id="cl-colour"></select></label>
        <span id="cl-count">loading…</span>
        <button id="cl-save" type="button" title="Download the selected particles as a
selection file for cryolatent select --selection">Save selection</button>
        <button id="cl-clear" type="button">Clear</button>
        <button id="cl-invert" type="button">Invert</button>
      </div>
      <div id="cl-hint">Drag a box (or the lasso: toolbar) to select; Shift+drag adds. Click a
        class to select it, Shift/Ctrl+click to add or remove it.</div>
      <div id="cl-map-box">{{ embed(roots[0]) }}</div>
      <div id="cl-saved"></div>
    </section>
    <aside id="cl-right">
      <div id="cl-gallery"></div>
      <div id="cl-traversal"></div>
    </aside>
  </div>
</div>
{{ blobs }}
{{ meta_json }}
<script type="text/javascript">{{ report_js }}</script>
{{ plot_script }}
{% endblock %}
"""

CSS = """
body { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       background: #fafafa; }
#cl-app { display: flex; flex-direction: column; height: 100vh; }
#cl-head { padding: 6px 12px 4px; border-bottom: 1px solid #ddd; background: #fff; }
#cl-head h1 { font-size: 16px; margin: 0; }
#cl-sub { color: #666; font-size: 12px; }
#cl-main { flex: 1; display: flex; min-height: 0; }
#cl-left { flex: 1 1 60%; display: flex; flex-direction: column; min-width: 420px;
           padding: 6px 8px; }
#cl-right { flex: 0 1 38%; overflow-y: auto; padding: 6px 10px; border-left: 1px solid #ddd;
            background: #fff; min-width: 300px; max-width: 720px; }
#cl-controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
#cl-colour { max-width: 13em; }
#cl-controls select { font: inherit; }
#cl-controls button { font: inherit; padding: 2px 8px; cursor: pointer; }
#cl-save { background: #0072B2; color: #fff; border: 1px solid #005a8c; border-radius: 3px; }
#cl-count { font-weight: 600; white-space: nowrap; }
#cl-hint { color: #777; font-size: 11px; margin: 3px 0; }
#cl-map-box { flex: 1; min-height: 400px; position: relative; }
#cl-saved { font-size: 12px; color: #333; min-height: 1.4em; word-break: break-all; }
#cl-saved code, .cl-warn code { background: #eef; padding: 0 3px; }
h2 { font-size: 14px; margin: 8px 0 4px; }
.cl-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
           gap: 6px; }
.cl-card { border: 2px solid #ddd; border-radius: 4px; padding: 4px; cursor: pointer;
           background: #fff; user-select: none; }
.cl-card:hover { border-color: #999; }
.cl-card.cl-on { border-color: #0072B2; background: #eef6fc; }
.cl-card.cl-bad { background: #fff6f0; }
.cl-card .cl-title { font-weight: 600; display: flex; align-items: center; gap: 5px; }
.cl-swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; }
.cl-imgs { display: flex; gap: 3px; margin: 3px 0; }
.cl-imgs figure { margin: 0; flex: 1; text-align: center; }
.cl-imgs img { width: 100%; max-width: 96px; image-rendering: auto; background: #000; }
.cl-imgs figcaption { font-size: 9px; color: #888; }
.cl-meta { font-size: 11px; color: #444; }
.cl-selcount { font-size: 11px; color: #0072B2; font-weight: 600; }
.cl-warn { font-size: 11px; color: #b34700; margin-top: 2px; }
.cl-global { color: #b34700; font-size: 12px; margin: 2px 0 6px 0; padding-left: 16px; }
.cl-trav-row { display: flex; align-items: center; gap: 3px; margin-bottom: 4px; }
.cl-trav-row .cl-lab { width: 70px; font-size: 11px; color: #444; flex: none; }
.cl-trav-row figure { margin: 0; text-align: center; flex: 1; }
.cl-trav-row img { width: 100%; max-width: 80px; background: #000; }
.cl-trav-row figcaption { font-size: 9px; color: #888; }
.cl-note { font-size: 11px; color: #666; }
"""

JS = r"""
(function () {
  "use strict";
  const T0 = performance.now();
  const META = JSON.parse(document.getElementById("cl-meta").textContent);
  const R = window.cryolatentReport = {ready: false, loadMs: null, meta: META, errors: [],
                                       marks: {script: T0}};
  window.addEventListener("error", (e) => R.errors.push(String(e.message || e)));
  const $ = (id) => document.getElementById(id);
  const fmt = (x) => Number(x).toLocaleString("en-US");
  const cache = {};

  // ---------------------------------------------------------------- typed arrays
  function bytes(id) {
    const s = $("blob-" + id).textContent.trim();
    if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(s);
    const bin = atob(s), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    return u;
  }
  const TYPES = {u8: Uint8Array, u16: Uint16Array, u32: Uint32Array, f32: Float32Array};
  function typed(id, dtype) {
    if (cache[id]) return cache[id];
    const u = bytes(id), T = TYPES[dtype];
    const a = T === Uint8Array ? u : new T(u.buffer, u.byteOffset, u.byteLength / T.BYTES_PER_ELEMENT);
    return (cache[id] = a);
  }
  function columnValues(col) {
    const key = "values:" + col.name;
    if (cache[key]) return cache[key];
    const codes = typed(col.blob, col.dtype);
    let v = codes;
    if (col.kind !== "class") {
      v = new Float32Array(codes.length);
      const o = col.offset, s = col.scale;
      for (let i = 0; i < codes.length; i++) { const q = codes[i]; v[i] = q === 255 ? NaN : o + q * s; }
    }
    return (cache[key] = v);
  }
  function classOf() { return typed("col-class", "u16"); }

  // ---------------------------------------------------------------- Bokeh models
  let doc = null, src = null, mapper = null, plot = null, colorbar = null, base = null;
  let curMap = 0, lastSet = null, actions = [];
  function models() {
    const B = window.Bokeh;
    if (!B || !B.documents || !B.documents.length) return false;
    doc = B.documents[0];
    src = doc.get_model_by_name("cl-points");
    mapper = doc.get_model_by_name("cl-mapper");
    plot = doc.get_model_by_name("cl-plot");
    colorbar = doc.get_model_by_name("cl-colorbar");
    return !!(src && mapper && plot);
  }
  R.points = () => (src ? src.data.x.length : 0);

  function status() {
    const n = src ? src.selected.indices.length : 0;
    $("cl-count").textContent = fmt(n) + " of " + fmt(META.n) + " particles selected";
    const cards = document.querySelectorAll(".cl-card");
    if (!cards.length) return;
    const per = new Map();
    if (n) { const cls = classOf(); for (const i of src.selected.indices) per.set(cls[i], (per.get(cls[i]) || 0) + 1); }
    for (const card of cards) {
      const k = +card.dataset.cls, size = +card.dataset.size, s = per.get(k) || 0;
      card.classList.toggle("cl-on", s > 0 && s === size);
      card.querySelector(".cl-selcount").textContent = s ? (fmt(s) + " selected") : "";
    }
  }
  function same(a, b) {
    if (!a || !b || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }
  // Bokeh calls this (maybe later) on every change of the selection: ours (class clicks,
  // Clear, Invert) or the box/lasso tools'
  R.onSelect = function () {
    if (!src) return;
    const now = src.selected.indices;
    if (!same(now, lastSet)) {
      const m = META.maps[curMap].name;
      if (now.length) actions.push("box/lasso in the " + m + " map"); else actions = [];
      lastSet = null;
    }
    status();
  };
  function select(rows, how) {
    lastSet = Array.from(rows);
    src.selected.indices = lastSet;
    if (how) actions.push(how); else if (!rows.length) actions = [];
    status();
  }
  R.selectRows = (rows) => select(rows, "rows " + rows.length);

  // ---------------------------------------------------------------- colour and map
  function setColumns(patch) {
    // new arrays in place of old ones; the selection stays (Bokeh may clear it on new data)
    const keep = Array.from(src.selected.indices);
    for (const k in patch) src.data[k] = patch[k];
    src.change.emit();
    if (keep.length && !same(src.selected.indices, keep)) {
      lastSet = keep;
      src.selected.indices = keep;
    }
  }
  function setColour(name) {
    const col = META.columns.find((c) => c.name === name);
    const v = columnValues(col);
    const pal = typeof col.palette === "string" ? META.palettes[col.palette] : col.palette;
    mapper.setv({palette: pal, low: col.lo, high: col.hi});
    if (colorbar) colorbar.title = col.label;
    setColumns({c: v});
  }
  function setMap(i) {
    const m = META.maps[i];
    let x, y;
    if (i === 0) { x = base.x; y = base.y; }
    else {
      const q = typed(m.blob, "u16"), n = q.length / 2;
      x = new Float32Array(n); y = new Float32Array(n);
      const ox = m.offset[0], sx = m.scale[0], oy = m.offset[1], sy = m.scale[1];
      for (let j = 0; j < n; j++) { x[j] = ox + q[2 * j] * sx; y[j] = oy + q[2 * j + 1] * sy; }
    }
    curMap = i;
    const keep = Array.from(src.selected.indices);
    setColumns({x: x, y: y});
    if (plot.below.length) plot.below[0].axis_label = m.labels[0];
    if (plot.left.length) plot.left[0].axis_label = m.labels[1];
    plot.reset.emit();   // the new map's ranges (a reset clears the selection: put it back)
    if (keep.length) { lastSet = keep; src.selected.indices = keep; }
  }

  // ---------------------------------------------------------------- selection file
  function names(rows) {
    const nm = META.names;
    if (nm.kind === "compact") {
      const num = typed("names-num", "u32"), st = typed("names-stack", nm.stack_dtype);
      return rows.map((r) => String(num[r]).padStart(nm.width, "0") + "@" + nm.stacks[st[r]]);
    }
    if (!cache.namesJson) cache.namesJson = JSON.parse(new TextDecoder().decode(bytes("names-json")));
    return rows.map((r) => cache.namesJson[r]);
  }
  R.selectionDoc = function () {
    const rows = Array.from(Int32Array.from(src.selected.indices).sort());
    const d = {format: "cryolatent-selection", version: 1, star: META.star,
               star_particles: META.n, how: actions.slice(-6).join("; "), count: rows.length,
               rlnImageName: names(rows)};
    if (META.names.occurrence) { const occ = typed("names-occ", "u16"); d.occurrence = rows.map((r) => occ[r]); }
    d.rows = rows;
    return d;
  };
  function save() {
    if (!src.selected.indices.length) { $("cl-saved").textContent = "Nothing selected: drag a box in the map or click a class."; return; }
    const d = R.selectionDoc();
    const blob = new Blob([JSON.stringify(d)], {type: "application/json"});
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = META.selection_file;
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 2000);
    $("cl-saved").innerHTML = "Saved " + fmt(d.count) + " particles to <b>" + esc(META.selection_file) +
      "</b> (your downloads folder). Then: <code>cryolatent select " + esc(META.star_name) +
      " --selection " + esc(META.selection_file) + " -o subset.star</code>";
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }

  // ---------------------------------------------------------------- gallery, traversals
  function classRows(k) {
    const cls = classOf(), out = [];
    for (let i = 0; i < cls.length; i++) if (cls[i] === k) out.push(i);
    return out;
  }
  function clickClass(k, ev) {
    const add = ev.shiftKey || ev.ctrlKey || ev.metaKey;
    if (!add) { select(classRows(k), "class " + k); return; }
    const mask = new Uint8Array(META.n);
    for (const i of src.selected.indices) mask[i] = 1;
    const rows = classRows(k);
    const all = rows.length && rows.every((i) => mask[i]);
    for (const i of rows) mask[i] = all ? 0 : 1;
    const sel = [];
    for (let i = 0; i < mask.length; i++) if (mask[i]) sel.push(i);
    select(sel, (all ? "minus class " : "plus class ") + k);
  }
  function gallery() {
    const g = META.gallery, box = $("cl-gallery");
    if (!g) { box.innerHTML = "<p class='cl-note'>No rlnClassNumber column: no class gallery.</p>"; return; }
    const col = META.columns.find((c) => c.kind === "class");
    let h = "<h2>Classes (" + g.classes.length + ")</h2>";
    h += g.report ? "<div class='cl-note'>trust report: " + esc(g.report) + "</div>"
                  : "<div class='cl-note'>no trust report matching these classes (embed and refine write OUT_summary.json)</div>";
    if (g.warnings.length) h += "<ul class='cl-global'>" + g.warnings.map((w) => "<li>" + esc(w) + "</li>").join("") + "</ul>";
    h += "<div class='cl-grid'>";
    for (const c of g.classes) {
      const colr = col ? col.palette[c.class - (col.lo + 0.5)] : "#999";
      const bad = (c.warnings || []).length ? " cl-bad" : "";
      h += "<div class='cl-card" + bad + "' data-cls='" + c.class + "' data-size='" + c.size + "'>" +
        "<div class='cl-title'><span class='cl-swatch' style='background:" + colr + "'></span>class " + c.class +
        (c.class === 0 ? " (unassigned)" : "") + "</div><div class='cl-imgs'>";
      c.images.forEach((u, j) => { if (u) h += "<figure><img alt='class " + c.class + "' src='" + u + "'><figcaption>" + esc(g.image_kinds[j]) + "</figcaption></figure>"; });
      h += "</div><div class='cl-meta'>" + fmt(c.size) + " particles (" + (100 * c.fraction).toFixed(1) + " %)" +
        (c.resolution ? " · " + esc(c.resolution) : "") + "</div><div class='cl-selcount'></div>";
      for (const w of c.warnings || []) h += "<div class='cl-warn'>⚠ " + esc(w) + "</div>";
      h += "</div>";
    }
    box.innerHTML = h + "</div>";
    for (const card of box.querySelectorAll(".cl-card")) card.addEventListener("click", (ev) => clickClass(+card.dataset.cls, ev));
  }
  function traversal() {
    const t = META.traversal, box = $("cl-traversal");
    if (!t) { box.innerHTML = META.run ? "" : "<p class='cl-note'>Give the training run folder to see the generator's traversals.</p>"; return; }
    let h = "<h2>Generator along the principal axes of z</h2><div class='cl-note'>The axes of the PCA map; offsets in standard deviations of z along each axis (2.5th to 97.5th percentile of the particles), the other coordinates at the mean.</div>";
    for (const r of t.rows) {
      h += "<div class='cl-trav-row'><div class='cl-lab'>PC " + r.axis + "<br>" + (100 * r.explained).toFixed(0) + " %</div>";
      r.images.forEach((u, j) => { h += "<figure><img alt='PC " + r.axis + "' src='" + u + "'><figcaption>" + r.offsets[j].toFixed(1) + " sd</figcaption></figure>"; });
      h += "</div>";
    }
    box.innerHTML = h;
  }

  // ---------------------------------------------------------------- start
  function controls() {
    const ms = $("cl-map");
    META.maps.forEach((m, i) => ms.add(new Option(m.name, String(i))));
    ms.disabled = META.maps.length < 2;
    ms.addEventListener("change", () => setMap(+ms.value));
    const cs = $("cl-colour");
    for (const c of META.columns) cs.add(new Option(c.label, c.name));
    cs.addEventListener("change", () => setColour(cs.value));
    $("cl-save").addEventListener("click", save);
    $("cl-clear").addEventListener("click", () => select([], null));
    $("cl-invert").addEventListener("click", () => {
      const mask = new Uint8Array(META.n);
      for (const i of src.selected.indices) mask[i] = 1;
      const sel = [];
      for (let i = 0; i < mask.length; i++) if (!mask[i]) sel.push(i);
      select(sel, "inverted");
    });
    $("cl-count").textContent = "0 of " + fmt(META.n) + " particles selected";
    $("cl-sub").textContent = fmt(META.n) + " particles · latents of dimension " + META.z_dim +
      " from " + META.z_from + " · " + META.star + (META.run ? " · run " + META.run : "") +
      " · cryolatent " + META.version + ", " + META.made;
  }
  function start() {
    if (!models()) { setTimeout(start, 5); return; }
    R.marks.models = performance.now();
    base = {x: src.data.x, y: src.data.y};
    status();
    (function idle() {
      if (!doc.is_idle) { setTimeout(idle, 5); return; }
      R.marks.idle = performance.now();
      // Bokeh has issued the drawing; reading a pixel of the map's canvas waits until the
      // (WebGL) drawing is done, so that loadMs is the time the points are on the canvas
      try {
        const pv = Bokeh.index.get_one(plot), layer = pv.canvas_view.primary;
        const f = pv.frame.bbox;
        layer.ctx.getImageData(Math.floor(f.left + f.width / 2), Math.floor(f.top + f.height / 2), 1, 1);
      } catch (e) { R.marks.noSync = String(e); }
      R.marks.drawn = performance.now();
      requestAnimationFrame(() => { R.marks.frame1 = performance.now(); requestAnimationFrame(() => {
        R.loadMs = performance.now();
        R.ready = true;
        document.body.dataset.ready = "1";
      }); });
    })();
  }
  // the page around the map is built before Bokeh lays the map out (no second layout)
  try { controls(); gallery(); traversal(); } catch (e) { R.errors.push(String(e)); throw e; }
  R.marks.built = performance.now();
  start();
})();
"""
