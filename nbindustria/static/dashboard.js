// nbindustria dashboard: the header (run facts, counts, progress per task name) and the task graph.
//
// An anywidget ES module: no build step, no dependencies. The kernel sends two traits, computed by
// nbindustria/panels.py:
//   state   = { header: {...}, graph: {...} }      (see panels.header / panels.graph)
//   details = { nodeId: { label, state, rows, why, error, traceback } }
// Groups expand here, without a round trip to the kernel (which is busy running the pipeline):
// their members come with the graph, and are laid out by the same rule as panels.layout_positions.
// Copied verbatim to nbindustria/static/dashboard.js, which the widget loads.

const SVGNS = "http://www.w3.org/2000/svg";
const NODE_W = 144; // node box, px (the SVG scales down to fit the output area)
const NODE_H = 24;
const PITCH_X = 176;
const PITCH_Y = 30;
const PAD = 14;
const ORDER = ["done", "cached", "failed", "skipped", "running", "queued", "added"];
const STYLE_ID = "nbi-dashboard-style-v1";

const CSS = `
.nbi-dash {
  --nbi-fg: var(--jp-ui-font-color1, #1f2328);
  --nbi-fg2: var(--jp-ui-font-color2, #57606a);
  --nbi-fg3: var(--jp-ui-font-color3, #8c959f);
  --nbi-bg: var(--jp-layout-color1, #ffffff);
  --nbi-bg2: var(--jp-layout-color2, #f3f4f6);
  --nbi-border: var(--jp-border-color2, #d8dee4);
  --nbi-accent: var(--jp-brand-color1, #1976d2);
  font-family: var(--jp-ui-font-family, system-ui, -apple-system, "Segoe UI", sans-serif);
  font-size: 12.5px;
  color: var(--nbi-fg);
  background: var(--nbi-bg);
  border: 1px solid var(--nbi-border);
  border-radius: 8px;
  padding: 14px 16px 12px;
  box-sizing: border-box;
  line-height: 1.35;
}
.nbi-dash * { box-sizing: border-box; }
.nbi-top { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
.nbi-name { font-size: 15px; font-weight: 600; letter-spacing: .1px; }
.nbi-meta { color: var(--nbi-fg2); }
.nbi-meta b { color: var(--nbi-fg); font-weight: 600; }
.nbi-spacer { flex: 1 1 auto; }
.nbi-pill { display: inline-flex; align-items: center; gap: 6px; padding: 1px 9px; border-radius: 999px;
  font-size: 11.5px; font-weight: 600; border: 1px solid currentColor; white-space: nowrap; }
.nbi-pill::before { content: ""; width: 7px; height: 7px; border-radius: 50%; background: currentColor; }
.nbi-pill.running::before { animation: nbi-pulse 1.2s ease-in-out infinite; }
@keyframes nbi-pulse { 50% { opacity: .25; } }
.nbi-elapsed { font-variant-numeric: tabular-nums; color: var(--nbi-fg2); }
.nbi-elapsed b { color: var(--nbi-fg); font-weight: 600; }
.nbi-overall { display: flex; align-items: center; gap: 12px; margin: 10px 0 8px; }
.nbi-bar { position: relative; display: flex; height: 10px; border-radius: 5px; overflow: hidden;
  background: var(--nbi-bg2); flex: 1 1 auto; box-shadow: inset 0 0 0 1px var(--nbi-border); }
.nbi-bar > span { height: 100%; transition: width .3s ease; }
.nbi-bar.small { height: 7px; border-radius: 4px; }
.nbi-bar > span.running { background-image: linear-gradient(90deg, rgba(255,255,255,.0), rgba(255,255,255,.35), rgba(255,255,255,0));
  background-size: 40px 100%; animation: nbi-stripes 1s linear infinite; }
@keyframes nbi-stripes { from { background-position: 0 0; } to { background-position: 40px 0; } }
.nbi-frac { font-variant-numeric: tabular-nums; color: var(--nbi-fg2); white-space: nowrap; min-width: 92px; text-align: right; }
.nbi-frac b { color: var(--nbi-fg); }
.nbi-counts { display: flex; gap: 6px 16px; flex-wrap: wrap; margin-bottom: 10px; }
.nbi-count { display: inline-flex; align-items: center; gap: 6px; color: var(--nbi-fg2); font-variant-numeric: tabular-nums; }
.nbi-count b { color: var(--nbi-fg); font-weight: 600; }
.nbi-count.zero { opacity: .45; }
.nbi-swatch { width: 10px; height: 10px; border-radius: 3px; display: inline-block; flex: none; }
.nbi-tasks { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 5px 22px;
  max-height: 132px; overflow-y: auto; padding: 8px 2px 2px; border-top: 1px solid var(--nbi-border); }
.nbi-task { display: grid; grid-template-columns: minmax(70px, 110px) 1fr auto; align-items: center; gap: 8px; }
.nbi-task-name { display: flex; align-items: center; gap: 6px; overflow: hidden; white-space: nowrap; text-overflow: ellipsis;
  font-family: var(--jp-code-font-family, ui-monospace, monospace); font-size: 11.5px; }
.nbi-task-frac { font-variant-numeric: tabular-nums; color: var(--nbi-fg2); font-size: 11.5px; min-width: 44px; text-align: right; }
.nbi-graph { position: relative; margin-top: 12px; border: 1px solid var(--nbi-border); border-radius: 6px;
  background: var(--nbi-bg); overflow: hidden; }
.nbi-toolbar { display: flex; align-items: center; gap: 14px; flex-wrap: wrap; padding: 7px 10px;
  border-bottom: 1px solid var(--nbi-border); background: var(--nbi-bg2); color: var(--nbi-fg2); font-size: 11.5px; }
.nbi-toolbar .nbi-title { font-weight: 600; color: var(--nbi-fg); font-size: 12px; }
.nbi-legend { display: inline-flex; align-items: center; gap: 4px 12px; flex-wrap: wrap; }
.nbi-legend span { display: inline-flex; align-items: center; gap: 5px; }
.nbi-chip { display: inline-flex; align-items: center; gap: 4px; padding: 0 4px 0 8px; border-radius: 999px;
  border: 1px solid var(--nbi-border); background: var(--nbi-bg); color: var(--nbi-fg); cursor: pointer; font: inherit; }
.nbi-chip:hover { border-color: var(--nbi-accent); }
.nbi-chip i { font-style: normal; opacity: .6; padding: 0 3px; }
.nbi-scroll { overflow: auto; max-height: 440px; }
.nbi-svg { display: block; height: auto; }
.nbi-edge { fill: none; stroke: var(--jp-ui-font-color3, #8c959f); stroke-opacity: .45; stroke-width: 1.2; }
.nbi-edge.hot { stroke: var(--nbi-accent); stroke-opacity: .95; stroke-width: 1.8; }
.nbi-node { cursor: pointer; }
.nbi-node .box { stroke-width: 1.4; }
.nbi-node .label { fill: var(--nbi-fg); font-size: 11.5px; dominant-baseline: central; }
.nbi-node .label .args { fill: var(--nbi-fg2); }
.nbi-node .label .name { font-weight: 600; }
.nbi-node:hover .box { stroke-width: 2.4; }
.nbi-node.selected .box { stroke: var(--nbi-accent) !important; stroke-width: 2.6; }
.nbi-node.dim { opacity: .35; }
.nbi-node[data-state="running"] .box { animation: nbi-pulse 1.2s ease-in-out infinite; }
.nbi-node.group .count { fill: var(--nbi-fg2); font-size: 10.5px; dominant-baseline: central; text-anchor: end; }
.nbi-empty { padding: 28px; text-align: center; color: var(--nbi-fg3); }
.nbi-drawer { position: absolute; top: 36px; right: 0; bottom: 0; width: min(420px, 62%); background: var(--nbi-bg);
  border-left: 1px solid var(--nbi-border); box-shadow: -8px 0 18px rgba(0,0,0,.10); overflow-y: auto;
  padding: 12px 14px; transform: translateX(102%); transition: transform .18s ease; }
.nbi-drawer.open { transform: none; }
.nbi-graph.has-drawer .nbi-scroll { min-height: 420px; }
.nbi-dash .nbi-drawer h4 { margin: 0 0 8px; display: flex; align-items: flex-start; gap: 8px; font-size: 12.5px; font-weight: 600;
  font-family: var(--jp-code-font-family, ui-monospace, monospace); word-break: break-all; }
.nbi-drawer h4 .nbi-label { flex: 1 1 auto; }
.nbi-close { border: none; background: none; color: var(--nbi-fg2); cursor: pointer; font-size: 16px; line-height: 1; padding: 0 2px; }
.nbi-close:hover { color: var(--nbi-fg); }
.nbi-state { display: inline-block; padding: 1px 8px; border-radius: 999px; color: #fff; font-size: 11px; font-weight: 600; margin-bottom: 8px; }
.nbi-rows { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 3px 14px; margin: 0 0 10px; }
.nbi-rows .nbi-k { color: var(--nbi-fg2); white-space: nowrap; }
.nbi-rows .nbi-v { font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.nbi-dash p.nbi-why { margin: 0 0 8px; padding: 7px 9px; border-radius: 5px; background: var(--nbi-bg2); line-height: 1.4; }
.nbi-error { color: var(--jp-error-color1, #d32f2f); font-weight: 600; word-break: break-word; }
/* ".nbi-dash pre" outranks JupyterLab's ".jp-OutputArea-output pre" */
.nbi-dash pre.nbi-tb { margin: 0 0 10px; padding: 8px 10px; border-radius: 5px; background: var(--jp-cell-editor-background, var(--nbi-bg2));
  border: 1px solid var(--nbi-border); color: var(--nbi-fg); font-family: var(--jp-code-font-family, ui-monospace, monospace);
  font-size: 11px; line-height: 1.45; white-space: pre-wrap; word-break: normal; overflow-wrap: break-word; overflow-y: auto; max-height: 240px; }
/* plotly charts next to the widget (same VBox): follow the JupyterLab theme */
.nbi-dashboard .js-plotly-plot .main-svg .xtick text, .nbi-dashboard .js-plotly-plot .main-svg .ytick text,
.nbi-dashboard .js-plotly-plot .main-svg .g-xtitle text, .nbi-dashboard .js-plotly-plot .main-svg .g-ytitle text
  { fill: var(--jp-ui-font-color2, #57606a) !important; }
.nbi-dashboard .js-plotly-plot .main-svg .annotation-text,
.nbi-dashboard .js-plotly-plot .main-svg .gtitle, .nbi-dashboard .js-plotly-plot .main-svg .legendtext,
.nbi-dashboard .js-plotly-plot .main-svg .legendtitletext { fill: var(--jp-ui-font-color1, #1f2328) !important; }
.nbi-dashboard .js-plotly-plot .main-svg .gridlayer path, .nbi-dashboard .js-plotly-plot .main-svg .zerolinelayer path {
  stroke: var(--jp-border-color2, #d8dee4) !important; }
.nbi-dashboard .js-plotly-plot .main-svg .shapelayer path.nbi-limit { stroke: var(--jp-error-color1, #d32f2f) !important; }
.nbi-dashboard .js-plotly-plot .modebar { background: transparent !important; }
.nbi-dashboard .js-plotly-plot .modebar-btn path { fill: var(--jp-ui-font-color3, #8c959f) !important; }
.nbi-dashboard .nbi-chart { border: 1px solid var(--jp-border-color2, #d8dee4); border-radius: 8px; overflow: hidden;
  background: var(--jp-layout-color1, #fff); padding: 6px 8px 2px; }
.nbi-dashboard .nbi-chart > * { flex: 1 1 auto; min-width: 0; width: 100%; }
`;

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatElapsed(seconds) {
  if (!(seconds >= 0)) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  return h ? `${h} h ${String(m).padStart(2, "0")} min` : `${m} min ${sec} s`;
}

function stackedBar(counts, total, colors, small) {
  const bar = el("div", small ? "nbi-bar small" : "nbi-bar");
  if (!total) return bar;
  for (const state of ORDER) {
    const n = counts[state] || 0;
    if (!n || state === "added") continue;
    const seg = el("span", state);
    seg.style.width = `${(100 * n) / total}%`;
    seg.style.background = colors[state];
    seg.title = `${n} ${state}`;
    bar.appendChild(seg);
  }
  return bar;
}

// Same rule as panels.layout_positions: x by depth, y by (task rank, seq) within the depth, a
// depth with more than maxRows nodes wrapping into sub-columns.
function layout(items, maxRows) {
  const byDepth = new Map();
  for (const item of items) {
    if (!byDepth.has(item.depth)) byDepth.set(item.depth, []);
    byDepth.get(item.depth).push(item);
  }
  const positions = new Map();
  let col = 0;
  let rows = 0;
  for (const depth of [...byDepth.keys()].sort((a, b) => a - b)) {
    const column = byDepth.get(depth).sort((a, b) => a.rank - b.rank || a.seq - b.seq);
    column.forEach((item, i) => positions.set(item.id, [col + Math.floor(i / maxRows), i % maxRows]));
    rows = Math.max(rows, Math.min(column.length, maxRows));
    col += Math.floor((column.length - 1) / maxRows) + 1;
  }
  return { positions, columns: col, rows };
}

// Text widths, measured with the page's own font: labels are cut to what fits in a node.
const measure = { ctx: null, font: "" };
function textWidth(text, weight, family) {
  if (!measure.ctx) measure.ctx = document.createElement("canvas").getContext("2d");
  const font = `${weight} 11.5px ${family}`;
  if (measure.font !== font) { measure.ctx.font = font; measure.font = font; }
  return measure.ctx.measureText(text).width;
}

function cut(text, width, weight, family) {
  if (textWidth(text, weight, family) <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (textWidth(`${text.slice(0, mid)}…`, weight, family) <= width) lo = mid;
    else hi = mid - 1;
  }
  return `${text.slice(0, lo)}…`;
}

// "<name> <args>", the name bold, both cut to the node's width.
function nodeLabel(name, args, width, family) {
  const shownName = cut(name, width, 600, family);
  const rest = width - textWidth(`${shownName} `, 600, family);
  const shownArgs = args && shownName === name && rest > 14 ? cut(args, rest, 400, family) : "";
  return `<tspan class="name">${esc(shownName)}</tspan>${shownArgs ? `<tspan class="args"> ${esc(shownArgs)}</tspan>` : ""}`;
}

export default {
  render({ model, el: host }) {
    ensureStyle();
    const root = el("div", "nbi-dash");
    host.appendChild(root);
    const head = el("div", "nbi-head");
    const graphBox = el("div", "nbi-graph");
    const toolbar = el("div", "nbi-toolbar");
    const scroller = el("div", "nbi-scroll");
    const drawer = el("div", "nbi-drawer");
    graphBox.append(toolbar, scroller, drawer);
    root.append(head, graphBox);

    const ui = { selected: null, expanded: new Set(), receivedAt: performance.now(), elapsedEl: null };

    function state() {
      return model.get("state") || {};
    }

    function renderHeader() {
      const h = state().header;
      head.replaceChildren();
      if (!h) return;
      const colors = h.colors;
      const labels = h.labels;
      const top = el("div", "nbi-top");
      top.appendChild(el("span", "nbi-name", h.pipeline));
      const meta = el("span", "nbi-meta");
      const engines = h.engines || (h.n_engines != null ? `${h.n_engines} engine${h.n_engines === 1 ? "" : "s"}` : "");
      meta.innerHTML = [
        h.run != null ? `run <b>${esc(h.run)}</b>` : "",
        engines ? esc(engines) : "",
        h.status === "running" ? `<b>${esc(h.busy)}</b>${h.n_engines != null ? ` of ${esc(h.n_engines)}` : ""} busy` : "",
        h.dryrun ? "<b>dry run</b>" : "",
      ].filter(Boolean).join(" · ");
      top.appendChild(meta);
      top.appendChild(el("span", "nbi-spacer"));
      const statusText = { waiting: "waiting", running: "running", finished: "finished",
        failed: `finished · ${h.counts.failed} failed` }[h.status] || h.status;
      const statusColor = { waiting: colors.added, running: colors.running, finished: colors.done,
        failed: colors.failed, interrupted: colors.skipped }[h.status] || colors.added;
      const pill = el("span", `nbi-pill ${h.status}`, statusText);
      pill.style.color = statusColor;
      top.appendChild(pill);
      const elapsed = el("span", "nbi-elapsed");
      elapsed.innerHTML = `elapsed <b>${formatElapsed(h.elapsed)}</b>`;
      ui.elapsedEl = elapsed.querySelector("b");
      top.appendChild(elapsed);
      head.appendChild(top);

      const overall = el("div", "nbi-overall");
      overall.appendChild(stackedBar(h.counts, h.total, colors, false));
      const frac = el("span", "nbi-frac");
      frac.innerHTML = `<b>${h.finished}</b> / ${h.total} tasks · ${Math.floor(100 * h.progress)}%`;
      overall.appendChild(frac);
      head.appendChild(overall);

      const counts = el("div", "nbi-counts");
      for (const stateName of ORDER) {
        const n = h.counts[stateName] || 0;
        const item = el("span", `nbi-count${n ? "" : " zero"}`);
        item.dataset.state = stateName;
        item.innerHTML = `<span class="nbi-swatch" style="background:${colors[stateName]}"></span>${esc(labels[stateName])} <b>${n}</b>`;
        counts.appendChild(item);
      }
      head.appendChild(counts);

      if (h.tasks.length) {
        const tasks = el("div", "nbi-tasks");
        for (const t of h.tasks) {
          const row = el("div", "nbi-task");
          row.dataset.task = t.name;
          const name = el("span", "nbi-task-name");
          name.innerHTML = `<span class="nbi-swatch" style="background:${t.color}"></span>${esc(t.name)}`;
          name.title = t.name;
          row.append(name, stackedBar(t.counts, t.total, colors, true), el("span", "nbi-task-frac", `${t.finished}/${t.total}`));
          tasks.appendChild(row);
        }
        head.appendChild(tasks);
      }
    }

    function displayed(graph) {
      // The drawn items (groups replaced by their members when expanded) and a rep() that maps any
      // node id to the item drawn for it.
      const memberOf = new Map();
      const items = [];
      const all = [];
      for (const node of graph.nodes) {
        if (node.group && node.members) {
          for (const m of node.members) { memberOf.set(m.id, node.task); all.push(m); }
        } else if (!node.group) {
          all.push(node);
        }
        if (node.group && node.members && ui.expanded.has(node.task)) items.push(...node.members);
        else items.push(node);
      }
      const rep = (id) => (memberOf.has(id) && !ui.expanded.has(memberOf.get(id)) ? `group:${memberOf.get(id)}` : id);
      return { items, all, memberOf, rep };
    }

    function edgesFor(graph, view) {
      if (!ui.expanded.size) return graph.edges;
      const expandedIds = new Set([...ui.expanded].map((n) => `group:${n}`));
      const seen = new Set();
      const edges = [];
      const add = (s, t) => {
        const k = `${s}>${t}`;
        if (s !== t && !seen.has(k)) { seen.add(k); edges.push([s, t]); }
      };
      for (const [s, t] of graph.edges) if (!expandedIds.has(s) && !expandedIds.has(t)) add(s, t);
      const inExpanded = (id) => view.memberOf.has(id) && ui.expanded.has(view.memberOf.get(id));
      for (const item of view.all) {
        for (const dep of item.deps || []) {
          if (inExpanded(item.id) || inExpanded(dep)) add(view.rep(dep), view.rep(item.id));
        }
      }
      return edges;
    }

    function renderToolbar(graph) {
      toolbar.replaceChildren();
      toolbar.appendChild(el("span", "nbi-title", "Task graph"));
      const legend = el("span", "nbi-legend");
      const h = state().header || {};
      for (const s of ORDER) {
        const item = el("span");
        item.innerHTML = `<span class="nbi-swatch" style="background:${graph.state_colors[s]}"></span>${esc((h.labels || {})[s] || s)}`;
        legend.appendChild(item);
      }
      toolbar.appendChild(legend);
      toolbar.appendChild(el("span", "nbi-spacer"));
      for (const name of ui.expanded) {
        const chip = el("button", "nbi-chip");
        chip.type = "button";
        chip.title = `Collapse the ${name} nodes into one group`;
        chip.innerHTML = `${esc(name)} expanded <i>✕</i>`;
        chip.addEventListener("click", () => { ui.expanded.delete(name); renderGraph(); });
        toolbar.appendChild(chip);
      }
      const hint = graph.grouped.length && !ui.expanded.size ? "click a group to expand it · a node for details" : "click a node for details";
      toolbar.appendChild(el("span", "nbi-hint", hint));
    }

    function renderGraph() {
      const graph = state().graph;
      if (!graph) return;
      for (const name of [...ui.expanded]) if (!graph.grouped.includes(name)) ui.expanded.delete(name);
      renderToolbar(graph);
      if (!graph.nodes.length) {
        scroller.innerHTML = `<div class="nbi-empty">No tasks yet.</div>`;
        return;
      }
      const view = displayed(graph);
      const { positions, columns, rows } = layout(view.items, graph.max_rows);
      const edges = edgesFor(graph, view);
      const width = 2 * PAD + (columns - 1) * PITCH_X + NODE_W;
      const height = 2 * PAD + (rows - 1) * PITCH_Y + NODE_H + 6;
      const colors = graph.state_colors;
      const family = getComputedStyle(root).fontFamily || "sans-serif";
      const hot = new Set();
      if (ui.selected) for (const [s, t] of edges) if (s === ui.selected || t === ui.selected) hot.add(`${s}>${t}`);
      const parts = [];
      parts.push(`<svg xmlns="${SVGNS}" class="nbi-svg" viewBox="0 0 ${width} ${height}" width="${width}" style="width:100%;max-width:${width}px;min-width:${Math.round(width * 0.62)}px" role="img" aria-label="task graph">`);
      const xy = (id) => {
        const p = positions.get(id);
        return p ? [PAD + p[0] * PITCH_X, PAD + p[1] * PITCH_Y] : null;
      };
      const edgeParts = [];
      for (const [s, t] of edges) {
        const a = xy(s);
        const b = xy(t);
        if (!a || !b) continue;
        const x1 = a[0] + NODE_W;
        const y1 = a[1] + NODE_H / 2;
        const x2 = b[0];
        const y2 = b[1] + NODE_H / 2;
        const dx = Math.max(24, Math.abs(x2 - x1) / 2);
        const cls = hot.has(`${s}>${t}`) ? "nbi-edge hot" : "nbi-edge";
        edgeParts.push(`<path class="${cls}" data-source="${esc(s)}" data-target="${esc(t)}" d="M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}"/>`);
      }
      parts.push(`<g class="nbi-edges">${edgeParts.join("")}</g><g class="nbi-nodes">`);
      for (const item of view.items) {
        const [x, y] = xy(item.id);
        const color = colors[item.state] || colors.added;
        const sel = item.id === ui.selected ? " selected" : "";
        const title = item.group ? `${item.label}: ${ORDER.filter((s) => item.counts[s]).map((s) => `${item.counts[s]} ${s}`).join(", ")}` : `${item.label} — ${item.state}`;
        if (item.group) {
          const label = nodeLabel(item.task, "", NODE_W - 52, family);
          let bar = "";
          let bx = x + 6;
          const bw = NODE_W - 12;
          for (const s of ORDER) {
            const n = item.counts[s] || 0;
            if (!n) continue;
            const w = (bw * n) / item.count;
            bar += `<rect x="${bx.toFixed(1)}" y="${y + NODE_H - 5}" width="${w.toFixed(1)}" height="3" fill="${colors[s]}"/>`;
            bx += w;
          }
          parts.push(`<g class="nbi-node group${sel}" data-id="${esc(item.id)}" data-state="${item.state}" data-task="${esc(item.task)}" data-count="${item.count}">` +
            `<title>${esc(title)}</title>` +
            `<rect x="${x + 6}" y="${y - 6}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="${color}" fill-opacity=".10" stroke="${color}" stroke-opacity=".45"/>` +
            `<rect x="${x + 3}" y="${y - 3}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="var(--nbi-bg)" stroke="${color}" stroke-opacity=".7"/>` +
            `<rect class="box" x="${x}" y="${y}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="var(--nbi-bg)" stroke="${color}"/>` +
            `<rect x="${x}" y="${y}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="${color}" fill-opacity=".16" pointer-events="none"/>` +
            `<text class="label" x="${x + 8}" y="${y + NODE_H / 2 - 2}">${label}</text>` +
            `<text class="count" x="${x + NODE_W - 7}" y="${y + NODE_H / 2 - 2}">×${item.count}</text>${bar}</g>`);
        } else {
          const label = nodeLabel(item.task, item.args, NODE_W - 17, family);
          parts.push(`<g class="nbi-node${sel}" data-id="${esc(item.id)}" data-state="${item.state}" data-task="${esc(item.task)}">` +
            `<title>${esc(title)}</title>` +
            `<rect class="box" x="${x}" y="${y}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="var(--nbi-bg)" stroke="${color}"/>` +
            `<rect x="${x}" y="${y}" width="${NODE_W}" height="${NODE_H}" rx="5" fill="${color}" fill-opacity="${item.state === "failed" ? ".30" : ".16"}" pointer-events="none"/>` +
            `<rect x="${x}" y="${y}" width="4" height="${NODE_H}" rx="2" fill="${color}" pointer-events="none"/>` +
            `<text class="label" x="${x + 10}" y="${y + NODE_H / 2}">${label}</text></g>`);
        }
      }
      parts.push("</g></svg>");
      scroller.innerHTML = parts.join("");
    }

    function renderDetails() {
      const id = ui.selected;
      drawer.replaceChildren();
      graphBox.classList.toggle("has-drawer", !!id);
      if (!id) { drawer.classList.remove("open"); return; }
      const d = (model.get("details") || {})[id];
      const graph = state().graph || { state_colors: {} };
      drawer.classList.add("open");
      const title = el("h4");
      title.appendChild(el("span", "nbi-label", d ? d.label : id));
      const close = el("button", "nbi-close", "✕");
      close.type = "button";
      close.title = "Close";
      close.addEventListener("click", () => select(null));
      title.appendChild(close);
      drawer.appendChild(title);
      if (!d) { drawer.appendChild(el("div", "nbi-why", "No details for this node yet.")); return; }
      const badge = el("span", "nbi-state", (state().header?.labels || {})[d.state] || d.state);
      badge.style.background = graph.state_colors[d.state] || "#888";
      drawer.appendChild(badge);
      // What matters first: why it ran (or its error and traceback), then the facts.
      if (d.why) drawer.appendChild(el("p", d.state === "failed" ? "nbi-why nbi-error" : "nbi-why", d.why));
      if (d.traceback) drawer.appendChild(el("pre", "nbi-tb", d.traceback));
      const rows = el("div", "nbi-rows");
      for (const [k, v] of d.rows) rows.append(el("span", "nbi-k", k), el("span", "nbi-v", v));
      drawer.appendChild(rows);
    }

    function select(id) {
      ui.selected = id;
      renderGraph();
      renderDetails();
    }

    scroller.addEventListener("click", (event) => {
      const node = event.target.closest(".nbi-node");
      if (!node) { if (ui.selected) select(null); return; }
      const id = node.dataset.id;
      if (node.classList.contains("group")) {
        const graph = state().graph;
        const group = graph && graph.nodes.find((n) => n.id === id);
        if (group && group.members) ui.expanded.add(group.task);
      }
      select(id);
    });
    const onKey = (event) => { if (event.key === "Escape" && ui.selected) select(null); };
    root.addEventListener("keydown", onKey);

    function onState() {
      ui.receivedAt = performance.now();
      renderHeader();
      renderGraph();
      renderDetails();
    }
    onState();
    model.on("change:state", onState);
    model.on("change:details", renderDetails);
    // The elapsed time ticks here between updates from the kernel.
    const timer = setInterval(() => {
      const h = state().header;
      if (!h || h.status !== "running" || !ui.elapsedEl) return;
      ui.elapsedEl.textContent = formatElapsed(h.elapsed + (performance.now() - ui.receivedAt) / 1000);
    }, 200);
    return () => {
      clearInterval(timer);
      model.off("change:state", onState);
      model.off("change:details", renderDetails);
    };
  },
};
