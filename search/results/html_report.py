"""``slimtune report``: one self-contained HTML file to look at a search (no torch, no Ray, no network).

The page holds its data once, as a JSON block (``<script type="application/json"
id="slimtune-data">``), and draws everything from it with its own inline SVG and JavaScript: the
front for each pair of objectives (every completed trial, the front highlighted, the baseline as
a star; hovering a point shows its recipe, metrics, MLflow run and export command, a click pins
it), the hypervolume after each completed trial, and the table of the front. The data block:

- ``pareto``: exactly what ``slimtune pareto NAME --json`` prints;
- ``trials``: what ``slimtune pareto NAME --json --all`` prints under ``trials`` (every completed trial);
- ``hypervolume_history``: :func:`search.results.ranking.hypervolume_history`;
- ``links``: trial name -> ``{"mlflow": URL of its run, "export": the export command}``;
- ``search``: name, task, model, tracking URI, MLflow experiment and parent run, the ``mlflow ui``
  command the links need for a database store, and when the report was made.
"""

from __future__ import annotations

import datetime
import html
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from search.results.ranking import hypervolume_history, pareto_document, pareto_table, rank_records
from search.results.record import SearchRecord, completed_records
from search.results.report import mlflow_ui, results_dir_option

__all__ = ["report_data", "write_report", "log_report", "REPORT_ARTIFACT"]

#: Name of the report among the parent run's artifacts.
REPORT_ARTIFACT = "report.html"


def report_data(record: SearchRecord) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (see the module docstring for the keys)."""
    records = completed_records(record)
    rank_records(record, records)
    tracker = record.tracker()
    experiment_id = tracker.experiment_id
    ui, start_ui = mlflow_ui(record.tracking_uri)
    space = yaml.safe_load(record.space_yaml)
    space = space if isinstance(space, dict) else {}
    links = {
        r.name: {
            "mlflow": f"{ui}/#/experiments/{experiment_id}/runs/{r.run_id}" if r.run_id else None,
            "export": f"slimtune export {record.name} --run {r.run_id} --out exports/{record.name}-{r.name}{results_dir_option(record)}"
            if r.run_id
            else None,
        }
        for r in records
    }
    return {
        "pareto": pareto_document(record, records),
        "trials": pareto_table(record, records, only_front=False),
        "hypervolume_history": hypervolume_history(record, records),
        "links": links,
        "search": {
            "name": record.name,
            "task": _named(space.get("task")),
            "model": _named(space.get("model")),
            "budget": record.trials,
            "constraints": [f"{c.metric} {c.op} {c.bound:g}" for c in record.constraints],
            "tracking_uri": record.tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": record.parent_run_id,
            "parent_run": f"{ui}/#/experiments/{experiment_id}/runs/{record.parent_run_id}" if record.parent_run_id else None,
            "mlflow_ui": start_ui,
            "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
    }


def _named(entry: Any) -> str | None:
    """A space's ``task:`` or ``model:`` entry (a name, or ``{name, options}``) as its name."""
    if isinstance(entry, dict):
        return entry.get("name")
    return None if entry is None else str(entry)


def write_report(record: SearchRecord, path: Path) -> Path:
    """Write the report of ``record`` to ``path`` (its folder is created) and return the path."""
    data = json.dumps(report_data(record), indent=1, default=str)
    # A JSON string may hold "</script>"; escaped, it cannot end the block early.
    data = data.replace("</", "<\\/")
    page = _PAGE.replace("__TITLE__", html.escape(f"slimtune report: {record.name}")).replace("__DATA__", data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def log_report(record: SearchRecord, path: Path) -> None:
    """Log the report at ``path`` on the search's parent run as ``report.html`` (replacing an older one)."""
    if not record.parent_run_id:
        return
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / REPORT_ARTIFACT
        shutil.copyfile(path, named)
        record.tracker().client.log_artifact(record.parent_run_id, str(named))


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; margin: 2px 0; }
.meta code, td code { font-size: 12px; background: #eee; padding: 1px 4px; border-radius: 3px; overflow-wrap: anywhere; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plot { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
.plot svg text { font-size: 11px; fill: #333; }
.plot .title { font-size: 13px; font-weight: 600; }
.legend { color: #555; font-size: 12px; margin: 6px 0 0; }
.trial { fill: #c9c9c9; stroke: #888; cursor: pointer; }
.trial.infeasible { fill: #fff; stroke: #b0b0b0; stroke-dasharray: 2 1; }
.trial.front { fill: #d62728; stroke: #7f1415; }
.trial.hot { stroke: #000; stroke-width: 2.5; }
.frontline { fill: none; stroke: #d62728; stroke-width: 1.5; opacity: 0.6; }
.baseline { fill: #1f77b4; stroke: #0d3d63; cursor: pointer; }
.grid { stroke: #eee; }
.axis { stroke: #999; }
.hv { fill: none; stroke: #2ca02c; stroke-width: 2; }
.hvdot { fill: #2ca02c; cursor: pointer; }
#tip { position: fixed; display: none; max-width: 460px; background: #fff; border: 1px solid #888; border-radius: 6px;
       box-shadow: 0 4px 14px rgba(0,0,0,.18); padding: 8px 10px; font-size: 12px; z-index: 10; }
#tip.pinned { border-color: #d62728; }
#tip table { border-collapse: collapse; margin: 4px 0; }
#tip td { padding: 0 8px 0 0; }
#tip code { font-size: 11px; background: #f2f2f2; padding: 1px 3px; border-radius: 3px; overflow-wrap: anywhere; }
table.front { border-collapse: collapse; background: #fff; }
table.front th, table.front td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
table.front th { background: #f0f0f0; }
table.front .text { text-align: left; }
table.front tr.base td { color: #1f77b4; }
table.front tr:hover td { background: #fff6e0; }
</style>
</head>
<body>
<h1 id="title"></h1>
<div id="meta"></div>
<h2>Trade-offs: each pair of objectives</h2>
<div class="plots" id="plots"></div>
<p class="legend">Red: the Pareto front (feasible, not dominated in all objectives; joined when there are two objectives);
grey: other completed trials (dashed outline: breaks a constraint); blue star: the uncompressed baseline.
Hover a point for its recipe, metrics, MLflow run and export command; click to pin it.</p>
<h2>Hypervolume after each completed trial</h2>
<div class="plots" id="hv"></div>
<h2>The front</h2>
<div id="table"></div>
<div id="tip"></div>
<script type="application/json" id="slimtune-data">
__DATA__
</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("slimtune-data").textContent);
const P = DATA.pareto, S = DATA.search, NS = "http://www.w3.org/2000/svg";
const OBJ = Object.keys(P.objectives);
const COST = ["macs", "flops", "params", "size_bytes", "artifact_bytes"];

function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function fmt(metric, v) {
  if (typeof v !== "number") return v === undefined || v === null ? "-" : esc(v);
  if (COST.includes(metric)) {
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(3) + "M";
    if (Math.abs(v) >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return String(v);
  }
  return Math.abs(v) <= 1 ? v.toFixed(4) : v.toFixed(3);
}
function el(name, attrs, parent) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}
function ticks(lo, hi, n) {
  const span = hi - lo || Math.abs(hi) || 1, raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
  return out;
}
function tickText(metric, t) {
  if (COST.includes(metric)) return fmt(metric, t);
  const a = Math.abs(t);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? t.toExponential(1) : String(+t.toPrecision(4));
}

// -- tooltip ---------------------------------------------------------------------------------
const tip = document.getElementById("tip");
let pinned = null;
function tipHtml(row) {
  if (row === "baseline") {
    return "<b>baseline</b> (uncompressed)<table>" +
      Object.entries(P.baseline).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${fmt(k, v)}</td></tr>`).join("") + "</table>";
  }
  const link = DATA.links[row.trial] || {};
  const metrics = Object.keys(row).filter(k => !["trial", "run_id", "rank", "feasible", "pipeline"].includes(k));
  return `<b>${esc(row.trial)}</b> &middot; rank ${row.rank}${row.feasible ? "" : " (breaks a constraint)"}` +
    `<div>recipe: <code>${esc(row.pipeline)}</code></div><table>` +
    metrics.map(k => `<tr><td>${esc(k)}${k in P.objectives ? " (" + P.objectives[k] + ")" : ""}</td><td>${fmt(k, row[k])}</td></tr>`).join("") +
    "</table>" +
    (row.run_id ? `<div>MLflow run: <a href="${esc(link.mlflow)}" target="_blank">${esc(row.run_id)}</a></div>` : "<div>no MLflow run</div>") +
    (link.export ? `<div>export: <code>${esc(link.export)}</code></div>` : "");
}
function show(row, evt, pin) {
  tip.innerHTML = tipHtml(row) + (pin ? '<div style="color:#888">pinned: click elsewhere to close</div>' : "");
  tip.className = pin ? "pinned" : "";
  tip.style.display = "block";
  const w = tip.offsetWidth, h = tip.offsetHeight;
  let x = evt.clientX + 14, y = evt.clientY + 14;
  if (x + w > window.innerWidth - 8) x = evt.clientX - w - 14;
  if (y + h > window.innerHeight - 8) y = Math.max(8, evt.clientY - h - 14);
  tip.style.left = x + "px";
  tip.style.top = y + "px";
}
function hot(name, on) { document.querySelectorAll(`[data-trial="${name}"]`).forEach(n => n.classList.toggle("hot", on)); }
function bind(node, row) {
  const name = row === "baseline" ? "baseline" : row.trial;
  node.setAttribute("data-trial", name);
  node.addEventListener("mouseenter", e => { hot(name, true); if (!pinned) show(row, e, false); });
  node.addEventListener("mouseleave", () => { hot(name, false); if (!pinned) tip.style.display = "none"; });
  node.addEventListener("click", e => { e.stopPropagation(); pinned = row; show(row, e, true); });
}
document.addEventListener("click", e => { if (!tip.contains(e.target)) { pinned = null; tip.style.display = "none"; } });

// -- header ----------------------------------------------------------------------------------
document.getElementById("title").textContent = `slimtune search '${S.name}'`;
const completed = DATA.trials.length, onFront = P.trials.length, U = P.unfinished || {};
document.getElementById("meta").innerHTML = [
  `${esc(S.task)} / ${esc(S.model)}: ${completed} completed trial${completed === 1 ? "" : "s"} of ${S.budget}, ` +
    `${onFront} on the front, hypervolume <b>${P.hypervolume.toFixed(4)}</b> (reference point ` +
    Object.entries(P.hypervolume_reference || {}).map(([m, v]) => `${esc(m)} ${Number(v).toPrecision(4)}`).join(", ") +
    ", each objective divided by the baseline's)",
  ...(U.failed ? [`<b>${U.failed} failed trial${U.failed === 1 ? "" : "s"}</b>: ` + (Object.entries(U.failure_reasons)
    .sort((a, b) => b[1] - a[1]).map(([reason, n]) => `<code>${esc(reason)}</code> (${n})`).join("; ") || "no reason recorded")] : []),
  ...(U.stopped ? [`${U.stopped} trial${U.stopped === 1 ? "" : "s"} stopped early by the scheduler (budget.scheduler): counted in the budget, never on the front`] : []),
  "objectives: " + OBJ.map(m => `${esc(m)} (${P.objectives[m]})`).join(", ") +
    (S.constraints.length ? "; constraints: " + S.constraints.map(esc).join(", ") : ""),
  `MLflow: <code>${esc(S.tracking_uri)}</code>, experiment ${esc(S.experiment_id)}` +
    (S.parent_run ? `, <a href="${esc(S.parent_run)}" target="_blank">search run ${esc(S.parent_run_id)}</a>` : "") +
    (S.mlflow_ui ? ` (links need <code>${esc(S.mlflow_ui)}</code>)` : ""),
  `made ${esc(S.generated)}`,
].map(line => `<p class="meta">${line}</p>`).join("");

// -- scatter plots ---------------------------------------------------------------------------
const W = 430, H = 330, M = {l: 64, r: 14, t: 26, b: 42};
function scatter(xm, ym) {
  const box = document.createElement("div");
  box.className = "plot";
  const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`}, box);
  const rows = DATA.trials.filter(r => typeof r[xm] === "number" && typeof r[ym] === "number");
  const base = typeof P.baseline[xm] === "number" && typeof P.baseline[ym] === "number" ? P.baseline : null;
  const xs = rows.map(r => r[xm]).concat(base ? [base[xm]] : []), ys = rows.map(r => r[ym]).concat(base ? [base[ym]] : []);
  const pad = (lo, hi) => { const d = (hi - lo) || Math.abs(hi) * 0.1 || 1; return [lo - d * 0.06, hi + d * 0.06]; };
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs)), [y0, y1] = pad(Math.min(...ys), Math.max(...ys));
  const X = v => M.l + (v - x0) / (x1 - x0) * (W - M.l - M.r), Y = v => H - M.b - (v - y0) / (y1 - y0) * (H - M.t - M.b);
  for (const t of ticks(x0, x1, 5)) {
    el("line", {x1: X(t), x2: X(t), y1: M.t, y2: H - M.b, class: "grid"}, svg);
    el("text", {x: X(t), y: H - M.b + 14, "text-anchor": "middle"}, svg).textContent = tickText(xm, t);
  }
  for (const t of ticks(y0, y1, 5)) {
    el("line", {x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t), class: "grid"}, svg);
    el("text", {x: M.l - 5, y: Y(t) + 4, "text-anchor": "end"}, svg).textContent = tickText(ym, t);
  }
  el("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "none", class: "axis"}, svg);
  el("text", {x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle"}, svg).textContent = `${xm} (${P.objectives[xm]})`;
  el("text", {x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(M.t + H - M.b) / 2})`}, svg).textContent = `${ym} (${P.objectives[ym]})`;
  el("text", {x: M.l, y: 16, class: "title"}, svg).textContent = `${ym} against ${xm}`;
  const front = rows.filter(r => r.rank === 0 && r.feasible).sort((a, b) => a[xm] - b[xm]);
  if (OBJ.length === 2 && front.length > 1) {
    el("polyline", {points: front.map(r => `${X(r[xm])},${Y(r[ym])}`).join(" "), class: "frontline"}, svg);
  }
  if (base) {  // under the trials: a trial equal to the baseline stays hoverable
    const cx = X(base[xm]), cy = Y(base[ym]), pts = [];
    for (let i = 0; i < 10; i++) {
      const rad = i % 2 ? 4 : 10, a = Math.PI / 2 + i * Math.PI / 5;
      pts.push(`${cx + rad * Math.cos(a)},${cy - rad * Math.sin(a)}`);
    }
    bind(el("polygon", {points: pts.join(" "), class: "baseline"}, svg), "baseline");
  }
  const ordered = rows.filter(r => !(r.rank === 0 && r.feasible)).concat(front);
  for (const r of ordered) {
    const isFront = r.rank === 0 && r.feasible;
    const c = el("circle", {cx: X(r[xm]), cy: Y(r[ym]), r: isFront ? 6 : 4.5, class: "trial" + (isFront ? " front" : "") + (r.feasible ? "" : " infeasible")}, svg);
    bind(c, r);
    if (isFront) el("text", {x: X(r[xm]) + 7, y: Y(r[ym]) - 6}, svg).textContent = "#" + Number(r.trial.slice(-3));
  }
  return box;
}
const plots = document.getElementById("plots");
for (let i = 0; i < OBJ.length; i++) for (let j = i + 1; j < OBJ.length; j++) plots.appendChild(scatter(OBJ[j], OBJ[i]));
if (OBJ.length < 2) plots.textContent = "one objective: no trade-off to plot.";

// -- hypervolume history ---------------------------------------------------------------------
(function () {
  const hist = DATA.hypervolume_history, box = document.createElement("div");
  box.className = "plot";
  document.getElementById("hv").appendChild(box);
  if (!hist.length) { box.textContent = "no completed trial yet."; return; }
  const w = 560, h = 260, svg = el("svg", {width: w, height: h, viewBox: `0 0 ${w} ${h}`}, box);
  const top = Math.max(...hist.map(p => p.hypervolume)) || 1;
  const X = k => M.l + (k - 0.5) / hist.length * (w - M.l - M.r), Y = v => h - M.b - v / (top * 1.08) * (h - M.t - M.b);
  for (const t of ticks(0, top * 1.08, 5)) {
    el("line", {x1: M.l, x2: w - M.r, y1: Y(t), y2: Y(t), class: "grid"}, svg);
    el("text", {x: M.l - 5, y: Y(t) + 4, "text-anchor": "end"}, svg).textContent = tickText("hypervolume", t);
  }
  for (const t of ticks(1, hist.length, Math.min(8, hist.length)).filter(t => Number.isInteger(t))) {
    el("text", {x: X(t), y: h - M.b + 14, "text-anchor": "middle"}, svg).textContent = t;
  }
  el("rect", {x: M.l, y: M.t, width: w - M.l - M.r, height: h - M.t - M.b, fill: "none", class: "axis"}, svg);
  el("text", {x: (M.l + w - M.r) / 2, y: h - 8, "text-anchor": "middle"}, svg).textContent = "completed trials (in the order they completed)";
  el("text", {x: 14, y: (M.t + h - M.b) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(M.t + h - M.b) / 2})`}, svg).textContent = "hypervolume";
  const pts = [];
  hist.forEach((p, i) => { if (i) pts.push(`${X(p.completed)},${Y(hist[i - 1].hypervolume)}`); pts.push(`${X(p.completed)},${Y(p.hypervolume)}`); });
  el("polyline", {points: pts.join(" "), class: "hv"}, svg);
  const rows = Object.fromEntries(DATA.trials.map(r => [r.trial, r]));
  for (const p of hist) {
    const dot = el("circle", {cx: X(p.completed), cy: Y(p.hypervolume), r: 4, class: "hvdot"}, svg);
    const row = rows[p.trial];
    dot.addEventListener("mouseenter", e => { if (!pinned) { show(row, e, false); tip.insertAdjacentHTML("afterbegin", `<div>after ${p.completed} completed: hypervolume <b>${p.hypervolume.toFixed(4)}</b></div>`); } });
    dot.addEventListener("mouseleave", () => { if (!pinned) tip.style.display = "none"; });
  }
})();

// -- table of the front ----------------------------------------------------------------------
(function () {
  const extra = ["macs", "params", "size_bytes", "latency_ms"];
  const cols = [...new Set(OBJ.concat(extra))].filter(m => P.trials.some(r => m in r) || m in P.baseline);
  let html = '<table class="front"><tr><th>trial</th>' + cols.map(m => `<th>${esc(m)}${m in P.objectives ? " (" + P.objectives[m] + ")" : ""}</th>`).join("") +
    '<th class="text">recipe</th><th class="text">MLflow run</th><th class="text">export</th></tr>';
  html += '<tr class="base"><td class="text">baseline</td>' + cols.map(m => `<td>${fmt(m, P.baseline[m])}</td>`).join("") + '<td class="text">(uncompressed)</td><td></td><td></td></tr>';
  for (const r of P.trials) {
    const link = DATA.links[r.trial] || {};
    html += `<tr data-row="${esc(r.trial)}"><td class="text">${esc(r.trial)}</td>` + cols.map(m => `<td>${fmt(m, r[m])}</td>`).join("") +
      `<td class="text"><code>${esc(r.pipeline)}</code></td>` +
      `<td class="text">${r.run_id ? `<a href="${esc(link.mlflow)}" target="_blank">${esc(r.run_id.slice(0, 12))}</a>` : "-"}</td>` +
      `<td class="text">${link.export ? `<code>${esc(link.export)}</code>` : "-"}</td></tr>`;
  }
  document.getElementById("table").innerHTML = html + "</table>" + (P.trials.length ? "" : "<p>No feasible trial on the front yet.</p>");
  document.querySelectorAll("tr[data-row]").forEach(tr => {
    tr.addEventListener("mouseenter", () => hot(tr.dataset.row, true));
    tr.addEventListener("mouseleave", () => hot(tr.dataset.row, false));
  });
})();
</script>
</body>
</html>
"""
