// The simple-dit page: the form posts to /api/generate and reads its Server-Sent Events stream
// (start, frame..., done | error) with fetch; the training charts are SVG drawn from /api/run.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let info = null;

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return Number.isInteger(v) ? String(v) : v.toPrecision(digits);
}

// ---- the model and the form -------------------------------------------------------------------

async function loadInfo() {
  const r = await fetch("/api/info");
  info = await r.json();
  if (!r.ok) throw new Error(info.error || r.statusText);
  const params = (info.parameters / 1e6).toFixed(2);
  $("model-line").textContent =
    `${info.name}: ${info.preset} (${info.arch}, ${params}M parameters, ${info.objective} objective, ${info.dataset}, on ${info.device})`;
  const box = $("classes");
  info.class_names.forEach((name, k) => {
    const input = el("input", { type: "checkbox", value: String(k), id: `class-${k}` });
    input.checked = k === 0;
    const label = el("label", { for: `class-${k}`, title: `${k}: ${name}` });
    label.append(input, document.createTextNode(name));
    box.append(label);
  });
  for (const s of info.samplers) $("sampler").append(el("option", { value: s }, s));
  $("sampler").addEventListener("change", () => ($("steps").value = info.default_steps[$("sampler").value]));
  $("steps").max = info.limits.steps;
  $("steps").value = info.default_steps[info.samplers[0]];
  $("per-class").max = info.limits.images;
  for (const id of ["guidance", "guidance-range"]) $(id).max = info.limits.guidance[1];
  $("guidance").value = $("guidance-range").value = info.guidance;
  $("generate").disabled = false;
}

function wireForm() {
  $("guidance-range").addEventListener("input", () => ($("guidance").value = $("guidance-range").value));
  $("guidance").addEventListener("input", () => ($("guidance-range").value = $("guidance").value));
  $("random-seed").addEventListener("click", () => ($("seed").value = Math.floor(Math.random() * 2 ** 31)));
  const tick = (on) => () => document.querySelectorAll("#classes input").forEach((c) => (c.checked = on));
  $("all-classes").addEventListener("click", tick(true));
  $("no-classes").addEventListener("click", tick(false));
  $("generate-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    generate().catch((e) => setStatus(String(e.message || e), true)).finally(() => ($("generate").disabled = false));
  });
}

function readForm() {
  const classes = [...document.querySelectorAll("#classes input:checked")].map((c) => Number(c.value));
  const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  return { classes, per_class: num("per-class"), sampler: $("sampler").value, steps: num("steps"), guidance: num("guidance"), seed: num("seed") };
}

// ---- generating: a POST whose answer is a stream of Server-Sent Events --------------------------

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { name, data: JSON.parse(data) };
    }
  }
}

function showFrame(src) {
  const frame = $("frame");
  frame.onload = () => {
    // Scale the tiles up by a whole factor (at most 3) that fits the panel.
    const scale = Math.max(1, Math.min(3, Math.floor($("frame-box").clientWidth / frame.naturalWidth)));
    frame.width = frame.naturalWidth * scale;
  };
  frame.src = src;
  frame.hidden = false;
}

async function generate() {
  const body = readForm();
  if (body.classes.length === 0) return setStatus("choose at least one class", true);
  $("generate").disabled = true;
  setStatus("waiting for the model…");
  $("progress").value = 0;
  $("progress-text").textContent = "";
  const response = await fetch("/api/generate", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) {
    const err = await response.json().catch(() => ({ error: response.statusText }));
    return setStatus(err.error || response.statusText, true);
  }
  let total = 1, finished = false;
  for await (const { name, data } of events(response)) {
    if (name === "start") {
      total = data.frames;
      const settings = `${data.sampler}, ${data.steps} steps, guidance ${data.guidance}, seed ${data.seed}`;
      $("status").dataset.settings = settings;
      setStatus(`sampling ${data.labels.length} image(s): ${settings}`);
    } else if (name === "frame") {
      $("progress").value = data.index / total;
      $("progress-text").textContent = `frame ${data.index} of ${total}`;
      showFrame(data.image);
    } else if (name === "done") {
      finished = true;
      showFrame(data.grid);
      showImages(data);
      $("progress").value = 1;
      setStatus(`done in ${data.seconds.toFixed(2)} s (${$("status").dataset.settings})`);
    } else if (name === "error") {
      finished = true;
      setStatus(data.error, true);
    }
  }
  if (!finished) setStatus("the server closed the stream early", true);
}

function showImages(data) {
  const gallery = $("gallery");
  gallery.replaceChildren();
  data.images.forEach((item, i) => {
    const fig = el("figure", { class: "sample", "data-label": String(item.label) });
    const img = el("img", { src: item.image, alt: `sample ${i + 1}: ${item.class_name}`, class: "sample-image" });
    fig.append(img, el("figcaption", {}, item.class_name));
    gallery.append(fig);
  });
}

// ---- the training record ----------------------------------------------------------------------

function chart(title, points, { logY = false, xLabel = "step" } = {}) {
  points = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y) && (!logY || p.y > 0));
  if (points.length === 0) return null;
  const W = 320, H = 170, L = 48, R = 10, T = 8, B = 28;
  const ty = (y) => (logY ? Math.log10(y) : y);
  const xs = points.map((p) => p.x), ys = points.map((p) => ty(p.y));
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (ty(y) - y0) / (y1 - y0)) * (H - T - B);
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4, yy = T + (1 - i / 4) * (H - T - B);
    s.append(svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid" }));
    s.append(svg("text", { x: L - 4, y: yy + 3, "text-anchor": "end" }, fmt(logY ? 10 ** yv : yv, 3)));
  }
  s.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  s.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  s.append(svg("text", { x: L, y: H - B + 13, "text-anchor": "start" }, fmt(x0)));
  s.append(svg("text", { x: W - R, y: H - B + 13, "text-anchor": "end" }, fmt(x1)));
  s.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xLabel + (logY ? " (log y)" : "")));
  s.append(svg("polyline", { points: points.map((p) => `${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`).join(" "), class: "series" }));
  if (points.length <= 40) for (const p of points) s.append(svg("circle", { cx: px(p.x), cy: py(p.y), r: 2.2, class: "dot" }));
  const box = el("div", { class: "chart" });
  box.append(el("h3", {}, title), s);
  return box;
}

function table(head, rows) {
  const t = el("table");
  const tr = el("tr");
  head.forEach((h) => tr.append(el("th", {}, h)));
  const thead = el("thead");
  thead.append(tr);
  t.append(thead);
  const tbody = el("tbody");
  for (const row of rows) {
    const r = el("tr");
    row.forEach((c) => r.append(el("td", {}, c)));
    tbody.append(r);
  }
  t.append(tbody);
  return t;
}

async function loadRun() {
  const r = await fetch("/api/run");
  const run = await r.json();
  const charts = $("charts");
  charts.replaceChildren();
  const series = (records, key) => records.filter((rec) => rec[key] !== undefined && rec[key] !== null).map((rec) => ({ x: rec.step, y: rec[key] }));
  const specs = [
    [run.train, "loss", "training loss", true], [run.train, "lr", "learning rate", false],
    [run.train, "images_per_s", "training images / s", false], [run.train, "grad_norm", "gradient norm", true],
    [run.eval, "eval_fid", "FID (evaluator features; lower is better)", true],
    [run.eval, "eval_label_accuracy", "label accuracy", false],
    [run.eval, "eval_precision", "precision", false], [run.eval, "eval_recall", "recall", false],
  ];
  for (const [records, key, title, logY] of specs) {
    const c = chart(title, series(records, key), { logY });
    if (c) charts.append(c);
  }
  if (!charts.children.length) charts.append(el("p", { class: "note" }, "no training records (metrics.jsonl) in this run"));
  const scores = $("scores");
  scores.replaceChildren();
  if (run.eval.length) {
    const keys = ["fid", "label_accuracy", "precision", "recall"];
    scores.append(el("h3", {}, "Evaluation during training (EMA weights, 20 steps, guidance 3)"));
    scores.append(table(["step", ...keys.map((k) => k.replace("_", " "))], run.eval.map((e) => [fmt(e.step), ...keys.map((k) => fmt(e["eval_" + k]))])));
  }
  const g = run.guidance;
  if (g && g.error) scores.append(el("p", { class: "note" }, g.error));
  else if (g && Array.isArray(g.scores)) {
    scores.append(el("h3", {}, `Guidance scales scored by simple-dit eval (picked: ${fmt(g.guidance)}; ${g.rule || ""})`));
    scores.append(table(["guidance", "FID", "label accuracy", "precision", "recall"],
      g.scores.map((s) => [fmt(s.guidance) + (s.guidance === g.guidance ? " *" : ""), fmt(s.fid), fmt(s.label_accuracy), fmt(s.precision), fmt(s.recall)])));
  }
  if (run.samples) {
    $("samples-png").src = run.samples;
    $("samples-figure").hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireForm();
  loadInfo().catch((e) => setStatus(`cannot load the model: ${e.message || e}`, true));
  loadRun().catch((e) => $("charts").replaceChildren(el("p", { class: "note" }, `cannot load the training record: ${e.message || e}`)));
});
