// peaknet live monitor: polls state.json every refresh_s and redraws. Plain JS, no build step;
// charts by uPlot (vendored beside this file).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292"];
const HIT_WIDTH = 300;        // px: each latest hit is drawn this wide
const MAX_HIST_BARS = 60;     // peaks-per-frame bins are grouped beyond this
let refreshMs = 1000;
let plots = { fps: null, hits: null, hist: null, runs: "" };
const hitImages = new Map();  // hit id -> HTMLImageElement (loaded once)
let powderSrc = "";

function fmt(v, digits = 0) {
  if (v === null || v === undefined || Number.isNaN(v)) return "\u2013";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function setText(id, text) { const el = $(id); if (el.textContent !== String(text)) el.textContent = text; }

function plotWidth(el) { return Math.max(260, el.clientWidth - 4); }

function ratePlot(el, title, runs, unit) {
  const series = [{}].concat(runs.map((r, i) => ({
    label: "run " + r, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
    value: (u, v) => v === null ? "\u2013" : fmt(v, 1) + unit,
  })));
  return new uPlot({
    width: plotWidth(el), height: 200, series,
    axes: [{ stroke: "#9aa0a6", grid: { stroke: "#2c3038" } },
           { stroke: "#9aa0a6", grid: { stroke: "#2c3038" }, size: 50 }],
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi * 1.1, 1)] } },
    legend: { live: false },
  }, [[]].concat(runs.map(() => [])), el);
}

function drawRates(s) {
  const keys = Object.keys(s.series.runs);
  const sig = keys.join("\u0000");
  if (plots.runs !== sig || !plots.fps) {
    for (const p of [plots.fps, plots.hits]) if (p) p.destroy();
    $("plot-fps").textContent = ""; $("plot-hits").textContent = "";
    plots.fps = ratePlot($("plot-fps"), "frames/s", keys.map((k) => s.series.runs[k].run), " /s");
    plots.hits = ratePlot($("plot-hits"), "hit rate", keys.map((k) => s.series.runs[k].run), " %");
    plots.runs = sig;
  }
  const t = s.series.t;
  plots.fps.setData([t].concat(keys.map((k) => s.series.runs[k].fps)));
  plots.hits.setData([t].concat(keys.map((k) => s.series.runs[k].hit_pct)));
}

function drawHistogram(s) {
  const counts = s.histogram.counts;
  const width = Math.max(1, Math.ceil(counts.length / MAX_HIST_BARS));
  const x = [], below = [], above = [];
  for (let start = 0; start < Math.max(counts.length, 1); start += width) {
    let n = 0;
    for (let i = start; i < Math.min(start + width, counts.length); i++) n += counts[i];
    x.push(start);
    const hit = start >= s.hit_threshold;
    below.push(hit ? null : n);
    above.push(hit ? n : null);
  }
  setText("hist-run", s.histogram.run === null ? "" : "(run " + s.histogram.run +
          (width > 1 ? ", " + width + " per bar" : "") + "; hits from " + s.hit_threshold + " peaks)");
  if (!plots.hist) {
    const bars = uPlot.paths.bars({ size: [0.9, 40], align: 1 });
    plots.hist = new uPlot({
      width: plotWidth($("plot-hist")), height: 200,
      series: [{ label: "peaks" },
               { label: "frames", fill: "#4fc3f7aa", stroke: "#4fc3f7", paths: bars, points: { show: false } },
               { label: "hits", fill: "#ff5a4faa", stroke: "#ff5a4f", paths: bars, points: { show: false } }],
      axes: [{ stroke: "#9aa0a6", grid: { show: false } }, { stroke: "#9aa0a6", grid: { stroke: "#2c3038" }, size: 50 }],
      scales: { x: { time: false }, y: { range: (u, lo, hi) => [0, Math.max(hi * 1.1, 1)] } },
      legend: { live: false },
    }, [x, below, above], $("plot-hist"));
  } else {
    plots.hist.setData([x, below, above]);
  }
}

function drawPowder(s) {
  const p = s.powder;
  if (!p) { powderSrc = ""; $("powder").removeAttribute("src"); setText("powder-info", ""); return; }
  const src = "powder.png?run=" + encodeURIComponent(p.run) + "&v=" + p.version + "&e=" + s.epoch;
  if (src !== powderSrc) { $("powder").src = src; powderSrc = src; }
  setText("powder-info", "(run " + p.run + ", " + fmt(p.peaks) + " peaks, panels tiled, log scale)");
}

function drawHit(canvas, img, hit) {
  const scale = HIT_WIDTH / hit.width;
  canvas.width = Math.round(hit.width * scale);
  canvas.height = Math.round(hit.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#ff3b30";
  ctx.lineWidth = 1.5;
  const radius = Math.max(4, 1.5 * scale);
  for (let i = 0; i < hit.rows.length; i++) {
    ctx.beginPath();
    ctx.arc((hit.cols[i] + 0.5) * scale, (hit.rows[i] + 0.5) * scale, radius, 0, 2 * Math.PI);
    ctx.stroke();
  }
  // How many pixels are not black: the test reads this to know the image was drawn.
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] | data[i + 1] | data[i + 2]) lit++;
  canvas.dataset.drawn = String(lit);
}

function drawHits(s) {
  const box = $("hits");
  const ids = new Set(s.hits.map((h) => String(h.id)));
  for (const card of Array.from(box.children)) if (!ids.has(card.dataset.id)) card.remove();
  for (const id of Array.from(hitImages.keys())) if (!ids.has(String(id))) hitImages.delete(id);
  s.hits.forEach((hit, i) => {
    let card = box.querySelector('[data-id="' + hit.id + '"]');
    if (!card) {
      card = document.createElement("div");
      card.className = "hit-card";
      card.dataset.id = String(hit.id);
      const canvas = document.createElement("canvas");
      canvas.className = "hit";
      canvas.width = HIT_WIDTH; canvas.height = Math.round(HIT_WIDTH * hit.height / hit.width);
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = "run " + hit.run + " \u00b7 " + hit.source + " #" + hit.seq + " \u00b7 " +
        hit.n_peaks + " peaks \u00b7 " + fmt(hit.latency_ms, 1) + " ms";
      card.append(canvas, caption);
      const img = new Image();
      img.onload = () => drawHit(canvas, img, hit);
      img.src = "hit/" + hit.id + ".png";
      hitImages.set(hit.id, img);
    }
    if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
  });
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.textContent = "";
  for (const cells of rows) {
    const tr = body.insertRow();
    for (const c of cells) tr.insertCell().textContent = c;
  }
}

function render(s) {
  refreshMs = Math.round(1000 * s.refresh_s);
  const run = s.runs.find((r) => r.key === s.current_run);
  setText("run-id", run ? String(run.run) : "\u2013");
  setText("run-frames", fmt(run ? run.frames : 0));
  setText("run-hits", fmt(run ? run.hits : 0));
  setText("run-hitrate", run && run.frames ? fmt(100 * run.hit_rate, 1) + " %" : "\u2013");
  setText("run-peaks-per-frame", run && run.frames ? fmt(run.peaks / run.frames, 1) : "\u2013");
  const rate = s.actors.reduce((a, x) => a + (x.rate_fps || 0), 0);
  setText("rate", s.actors.length ? fmt(rate, 1) : "\u2013");
  setText("missing", fmt(s.totals.missing));
  setText("dropped", fmt(s.totals.dropped));
  drawRates(s);
  drawHistogram(s);
  drawPowder(s);
  drawHits(s);
  fillTable("runs", s.runs.map((r) => [String(r.run), r.sources.join(", "), fmt(r.frames), fmt(r.hits),
                                       fmt(100 * r.hit_rate, 1) + " %", fmt(r.peaks)]));
  fillTable("actors", s.actors.map((a) => [a.name, a.alive ? "yes" : "no", fmt(a.rate_fps, 1), fmt(a.p50_ms, 1),
    fmt(a.p99_ms, 1), fmt(a.received),
    Object.entries(a.rejected).map(([k, v]) => k + ": " + v).join(", ") || "0", fmt(a.restarts)]));
  fillTable("gpus", s.gpus.length ? s.gpus.map((g) => [g.gpu, fmt(g.utilization_percent) + " %",
    fmt((g.memory_used_bytes || 0) / 2 ** 30, 1) + " GiB", fmt(g.temperature_celsius) + " \u00b0C"])
    : [["none (CPU actors, or no NVML)", "", "", ""]]);
  document.body.dataset.updated = String(s.time);
}

async function poll() {
  try {
    const r = await fetch("state.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("status").className = "status";
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("status").className = "status error";
    $("status").textContent = "no answer from the daemon (" + e.message + ")";
  } finally {
    setTimeout(poll, refreshMs);
  }
}

$("reset").addEventListener("click", async () => {
  await fetch("reset", { method: "POST" });
  powderSrc = "";
});

window.addEventListener("resize", () => {
  for (const [p, el] of [[plots.fps, "plot-fps"], [plots.hits, "plot-hits"], [plots.hist, "plot-hist"]]) {
    if (p) p.setSize({ width: plotWidth($(el)), height: 200 });
  }
});

poll();
