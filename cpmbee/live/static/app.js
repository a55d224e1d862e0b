// CPM-Bee live dashboard: draws /api/snapshot, then applies records pushed on /api/stream (Server-Sent Events).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TRAIN_FIELDS = ["loss", "lr", "grad_norm", "tokens", "tokens_seen", "tokens_per_s", "step_time", "mfu",
    "mem_gb", "loss_scale", "fill"];
  const LAST_COLUMNS = new Set(["step", "time", "tokens_seen"]);
  const COLORS = ["#3b6fd8", "#e0702b", "#1f9d55", "#c53a8e", "#7a6fd8", "#c98a00", "#1b9aaa", "#8c564b",
    "#d64545", "#5a6b7b", "#9acd32", "#ff69b4"];

  const S = {
    seq: 0, records: 0, serverOffset: 0, xKey: "step", smoothing: 0, maxPoints: 3000,
    run: {}, status: {}, eta: {}, train: null, evals: [], checkpoints: [], samples: [], incidents: [],
    events: [], rewinds: [], mixtures: [], data: null, nonfinite: [],
    inspect: { stats: [], groups: [], latest: null, points: 0 }, inspectView: null,
  };
  const charts = {};
  const api = { S, charts, ready: false, updates: 0, connected: false };
  window.cpmbeeLive = api;

  // ------------------------------------------------------------------------------------------ formatting
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const num = (v) => (typeof v === "number" ? v : null);
  function fmtNum(v, digits = 4) {
    if (v === null || v === undefined) return "—";
    if (!Number.isFinite(v)) return String(v);
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
    return String(Number(v.toPrecision(digits)));
  }
  function fmtCount(v) {
    if (!isNum(v)) return "—";
    for (const [u, s] of [["T", 1e12], ["B", 1e9], ["M", 1e6], ["k", 1e3]]) {
      if (Math.abs(v) >= s) return (v / s).toFixed(2) + " " + u;
    }
    return String(Math.round(v));
  }
  function fmtDur(s) {
    if (!isNum(s)) return "—";
    s = Math.round(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    return m ? `${m} min ${s % 60} s` : `${s % 60} s`;
  }
  const parseTime = (t) => (typeof t === "string" ? Date.parse(t) / 1000 : null);
  function fmtTime(posix) {
    if (!isNum(posix)) return "—";
    const d = new Date(posix * 1000);
    return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
    return node;
  }
  const answerOf = (out) => {
    if (out && typeof out === "object" && "<ans>" in out) out = out["<ans>"];
    return typeof out === "string" ? out : JSON.stringify(out);
  };

  // ------------------------------------------------------------------------------------------ training series
  function emptyTrain() {
    const t = { step: [], time: [], task_loss: {} };
    for (const f of TRAIN_FIELDS) t[f] = [];
    return t;
  }
  function trainFromSnapshot(src) {
    const t = emptyTrain();
    t.step = src.step || [];
    t.time = src.time || [];
    for (const f of TRAIN_FIELDS) t[f] = src[f] || new Array(t.step.length).fill(null);
    t.task_loss = src.task_loss || {};
    return t;
  }
  function cutTrain(step) {
    const t = S.train;
    let i = t.step.length;
    while (i > 0 && t.step[i - 1] >= step) i--;
    for (const k of ["step", "time", ...TRAIN_FIELDS]) t[k].length = i;
    for (const k in t.task_loss) t.task_loss[k].length = i;
    S.evals = S.evals.filter((e) => e.step < step);
    S.nonfinite = S.nonfinite.filter((s) => s < step);
  }
  function compactTrain() {
    // halve the resolution: pairs of points become one (mean, or the last value for cumulative columns)
    const t = S.train, n = t.step.length;
    const halve = (arr, last) => {
      const out = [];
      for (let i = 0; i < n; i += 2) {
        if (i + 1 >= n) { out.push(arr[i]); break; }
        if (last) { out.push(arr[i + 1]); continue; }
        const a = arr[i], b = arr[i + 1];
        out.push(isNum(a) && isNum(b) ? (a + b) / 2 : (isNum(b) ? b : (isNum(a) ? a : null)));
      }
      return out;
    };
    for (const k of ["step", "time", ...TRAIN_FIELDS]) t[k] = halve(t[k], LAST_COLUMNS.has(k));
    for (const k in t.task_loss) t.task_loss[k] = halve(t.task_loss[k], false);
  }
  function appendTrain(rec) {
    const t = S.train, step = rec.step;
    if (typeof step !== "number") return;
    const last = t.step[t.step.length - 1];
    if (t.step.length && step <= last) {
      cutTrain(step);
      S.rewinds.push({ from_step: last, to_step: step, time: rec.time });
      dirty.incidents = true;
    }
    t.step.push(step);
    t.time.push(parseTime(rec.time));
    for (const f of TRAIN_FIELDS) t[f].push(num(rec[f]));
    const tl = rec.task_loss || {};
    for (const task of Object.keys(tl)) {
      if (!(task in t.task_loss)) t.task_loss[task] = new Array(t.step.length - 1).fill(null);
    }
    for (const task in t.task_loss) t.task_loss[task].push(num(tl[task]));
    if (rec.loss === null || rec.loss === undefined) S.nonfinite.push(step);
    if (t.step.length > 2 * S.maxPoints) compactTrain();
  }

  // ------------------------------------------------------------------------------------------ charts
  function smooth(values, w) {
    if (!w) return values;
    let last = 0, n = 0;
    return values.map((v) => {
      if (!isNum(v)) return null;
      last = last * w + (1 - w) * v; n++;
      return last / (1 - Math.pow(w, n));
    });
  }
  function xColumn() {
    return S.xKey === "time" ? S.train.time : S.xKey === "tokens_seen" ? S.train.tokens_seen : S.train.step;
  }
  function xAtStep(step) {
    // x position of a step (for markers and eval points): the nearest logged training step at or after it
    const t = S.train, xs = xColumn();
    if (S.xKey === "step") return step;
    let lo = 0, hi = t.step.length - 1;
    if (hi < 0) return null;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (t.step[mid] < step) lo = mid + 1; else hi = mid; }
    return xs[lo];
  }
  function markerX(m) {
    if (S.xKey === "time" && m.time) return parseTime(m.time);
    return typeof m.step === "number" ? xAtStep(m.step) : null;
  }
  function markers() {
    const out = [];
    for (const i of S.incidents) out.push({ x: markerX(i), color: "#d64545", dash: [] });
    for (const e of S.events) if (e.event === "resume" || e.event === "crash") out.push({ x: markerX(e), color: "#c98a00", dash: [4, 3] });
    return out.filter((m) => isNum(m.x));
  }
  const markerPlugin = () => ({
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
        ctx.save();
        ctx.lineWidth = 1.5 * devicePixelRatio;
        for (const m of markers()) {
          const x = Math.round(u.valToPos(m.x, "x", true));
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = m.color; ctx.setLineDash(m.dash.map((d) => d * devicePixelRatio));
          ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + h); ctx.stroke();
        }
        ctx.restore();
      }],
    },
  });

  // definitions: each returns {series: [{label, values}], extra?: eval overlay}
  const CHART_DEFS = [
    { key: "loss", title: "Loss (overall and per task; red: incidents, orange: crash/resume)", big: true, height: 300, markers: true,
      series: () => [{ label: "loss", values: smooth(S.train.loss, S.smoothing) },
        ...Object.keys(S.train.task_loss).sort().map((task) => ({ label: task, values: smooth(S.train.task_loss[task], S.smoothing) }))],
      overlay: () => (S.evals.length ? { label: "eval loss", points: S.evals.map((e) => [S.xKey === "time" ? parseTime(e.time) : xAtStep(e.step), num(e.loss)]) } : null) },
    { key: "lr", title: "Learning rate", series: () => [{ label: "lr", values: S.train.lr }] },
    { key: "grad_norm", title: "Gradient norm", series: () => [{ label: "grad norm", values: S.train.grad_norm }] },
    { key: "tokens_per_s", title: "Throughput (tokens/s)", series: () => [{ label: "tokens/s", values: S.train.tokens_per_s }] },
    { key: "tokens_seen", title: "Tokens seen", count: true, series: () => [{ label: "tokens seen", values: S.train.tokens_seen }] },
    { key: "mfu", title: "MFU (model FLOPs utilisation)", optional: true, series: () => [{ label: "MFU", values: S.train.mfu }] },
    { key: "mem_gb", title: "Memory (GB)", optional: true, series: () => [{ label: "memory", values: S.train.mem_gb }] },
    { key: "loss_scale", title: "Loss scale", optional: true, log: true, series: () => [{ label: "loss scale", values: S.train.loss_scale }] },
    { key: "fill", title: "Batch fill (non-padding fraction)", optional: true, series: () => [{ label: "fill", values: S.train.fill }] },
  ];

  function chartData(def) {
    const xs = xColumn();
    const rows = [];
    for (let i = 0; i < xs.length; i++) if (isNum(xs[i])) rows.push(i);
    const series = def.series();
    let data = [rows.map((i) => xs[i]), ...series.map((s) => rows.map((i) => s.values[i] ?? null))];
    const labels = series.map((s) => s.label);
    const overlay = def.overlay ? def.overlay() : null;
    if (overlay) {
      const pts = overlay.points.filter((p) => isNum(p[0])).sort((a, b) => a[0] - b[0]);
      if (pts.length) {
        data = uPlot.join([data, [pts.map((p) => p[0]), pts.map((p) => p[1])]]);
        labels.push(overlay.label);
      }
    }
    return { data, labels, overlay: !!overlay };
  }

  function fmtShort(v) {
    // compact axis labels: 150k, 1.25M
    if (!isNum(v)) return "";
    for (const [u, s] of [["T", 1e12], ["B", 1e9], ["M", 1e6], ["k", 1e3]]) {
      if (Math.abs(v) >= s) return Number((v / s).toPrecision(3)) + u;
    }
    return String(v);
  }
  function fmtTicks(vals, incr) {
    // as many decimals as the tick spacing needs (a loss axis from 11.30 to 11.36 keeps two)
    const big = vals.some((v) => isNum(v) && Math.abs(v) >= 1e6);
    const tiny = isNum(incr) && incr > 0 && incr < 1e-3;
    if (big || tiny) return vals.map((v) => (isNum(v) ? (v === 0 ? "0" : v.toExponential(big ? 2 : 1)) : ""));
    const dec = isNum(incr) && incr > 0 ? Math.max(0, Math.min(6, -Math.floor(Math.log10(incr) + 1e-9))) : 2;
    return vals.map((v) => (isNum(v) ? v.toFixed(dec) : ""));
  }
  // tick increments for step axes: whole numbers only
  const STEP_INCRS = [];
  for (let e = 0; e <= 9; e++) for (const m of [1, 2, 5]) STEP_INCRS.push(m * 10 ** e);
  function axisValues(kind) {
    if (kind === "tokens_seen") return (u, vals) => vals.map(fmtShort);
    return (u, vals, axis, space, incr) => fmtTicks(vals, incr);
  }
  function shortNames(names) {
    // drop the dotted prefix all names share: "cpmbee.encoder.layers.*.ffn" -> "layers.*.ffn"
    if (names.length < 2) return names;
    let prefix = names[0];
    for (const n of names) while (!n.startsWith(prefix)) prefix = prefix.slice(0, -1);
    const cut = prefix.lastIndexOf(".") + 1;
    return names.map((n) => n.slice(cut) || n);
  }

  function buildChart(def, cd, box) {
    const body = box.querySelector(".plot");
    body.innerHTML = "";
    const width = Math.max(body.clientWidth || box.clientWidth - 12, 280);
    const n = cd.labels.length;
    const opts = {
      width, height: def.height || 190,
      scales: { x: { time: S.xKey === "time" }, y: def.log ? { distr: 3 } : {} },
      axes: [
        { values: S.xKey === "time" ? undefined : axisValues(S.xKey), space: S.xKey === "tokens_seen" ? 70 : 50,
          incrs: S.xKey === "step" ? STEP_INCRS : undefined, stroke: "#6b7385", grid: { stroke: "#eef0f4" } },
        { size: 62, values: axisValues(def.count ? "tokens_seen" : "y"), stroke: "#6b7385", grid: { stroke: "#eef0f4" } },
      ],
      series: [
        { label: S.xKey === "time" ? "time" : S.xKey.replace("_", " "),
          value: S.xKey === "time" ? (u, v) => fmtTime(v) : (u, v) => (S.xKey === "tokens_seen" ? fmtCount(v) : v) },
        ...cd.labels.map((label, i) => {
          const isOverlay = cd.overlay && i === n - 1;
          return {
            label, stroke: isOverlay ? "#111" : COLORS[i % COLORS.length], width: i === 0 ? 2 : 1.3,
            spanGaps: isOverlay, points: { show: isOverlay, size: 6 }, value: (u, v) => fmtNum(v),
          };
        }),
      ],
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      plugins: def.markers ? [markerPlugin()] : [],
      hooks: { setSelect: [(u) => { if (u.select.width > 0) charts[def.key].zoomed = true; }] },
    };
    const u = new uPlot(opts, cd.data, body);
    body.addEventListener("dblclick", () => { charts[def.key].zoomed = false; });
    return u;
  }

  function renderCharts() {
    const container = $("charts");
    const hasTrain = S.train && S.train.step.length > 0;
    $("no-train").hidden = hasTrain;
    for (const def of CHART_DEFS) {
      const present = def.optional ? (S.train[def.key] || []).some(isNum) : hasTrain;
      let entry = charts[def.key];
      if (!present) {
        if (entry) { entry.u.destroy(); entry.box.remove(); delete charts[def.key]; }
        continue;
      }
      const cd = chartData(def);
      const signature = S.xKey + "|" + cd.labels.join("|");
      if (!entry) {
        const box = el("div", { class: "chart-box" + (def.big ? " big" : ""), id: "chart-" + def.key },
          el("h3", {}, def.title), el("div", { class: "plot" }));
        const order = CHART_DEFS.indexOf(def);
        const next = [...container.children].find((c) => CHART_DEFS.findIndex((d) => "chart-" + d.key === c.id) > order);
        container.insertBefore(box, next || null);
        entry = charts[def.key] = { box, u: null, signature: null, zoomed: false };
      }
      if (entry.signature !== signature) {
        if (entry.u) entry.u.destroy();
        entry.u = buildChart(def, cd, entry.box);
        entry.signature = signature;
        entry.zoomed = false;
      } else {
        entry.u.setData(cd.data, !entry.zoomed);
      }
    }
  }
  window.addEventListener("resize", () => {
    for (const entry of Object.values(charts)) {
      const w = entry.box.querySelector(".plot").clientWidth;
      if (entry.u && w > 0) entry.u.setSize({ width: w, height: entry.u.height });
    }
    if (inspectChart) inspectChart.setSize({ width: $("inspect-chart").clientWidth, height: inspectChart.height });
  });

  // ------------------------------------------------------------------------------------------ header
  function renderHeader() {
    const run = S.run || {};
    $("run-name").textContent = run.name || S.runDir || "";
    document.title = `CPM-Bee live · ${run.name || ""}`;
    const st = S.status || {};
    const state = st.state || "unknown";
    const badge = $("state");
    badge.textContent = state === "lost" ? "not running (process gone)" : state === "stale" ? "running? (no updates)" : state;
    badge.className = "badge state-" + state;
    const t = S.train, n = t ? t.step.length : 0;
    const lastOf = (arr) => { for (let i = arr.length - 1; i >= 0 && i >= arr.length - 50; i--) if (isNum(arr[i])) return arr[i]; return null; };
    const meanLast = (arr, k) => { const v = arr.slice(-k).filter(isNum); return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null; };
    $("k-step").textContent = n ? String(t.step[n - 1]) : (isNum(st.step) ? String(st.step) : "—");
    $("k-loss").textContent = n ? fmtNum(lastOf(t.loss)) : "—";
    $("k-tokens").textContent = fmtCount(n ? lastOf(t.tokens_seen) : st.tokens_seen);
    $("k-speed").textContent = n ? fmtCount(meanLast(t.tokens_per_s, 20)) + " tok/s" : "—";
    $("k-lr").textContent = n ? fmtNum(lastOf(t.lr), 3) : "—";
    $("k-grad").textContent = n ? fmtNum(lastOf(t.grad_norm), 3) : "—";
    const eta = S.eta || {};
    if (isNum(eta.progress)) {
      $("k-progress-bar").style.width = (100 * eta.progress).toFixed(2) + "%";
      const unit = eta.unit === "tokens" ? " tokens" : " steps";
      $("k-progress").textContent = `${(100 * eta.progress).toFixed(2)} % of ${fmtCount(eta.total)}${unit}`;
    } else {
      $("k-progress").textContent = "no plan in run.json";
    }
    const running = state === "running";
    let etaText = "—";
    if (isNum(eta.progress) && eta.progress >= 1) etaText = "plan complete";
    else if (state === "finished") etaText = "run finished";
    else if (isNum(eta.eta_s)) etaText = fmtDur(eta.eta_s) + (running ? "" : " (not running)");
    $("k-eta").textContent = etaText;
    $("run-dir").textContent = S.runDir || "";
    $("records-count").textContent = String(S.records);
    renderAge();
  }
  function renderAge() {
    const st = S.status || {};
    const updated = parseTime(st.updated);
    if (!isNum(updated)) { $("updated").textContent = st.state ? "" : "no status.json yet"; return; }
    const now = Date.now() / 1000 + S.serverOffset;
    $("updated").textContent = `status updated ${fmtDur(Math.max(now - updated, 0))} ago · step ${st.step ?? "—"}`;
  }
  setInterval(renderAge, 1000);

  // ------------------------------------------------------------------------------------------ lists
  function renderIncidents() {
    const rows = [];
    for (const i of S.incidents) rows.push({ t: parseTime(i.time), step: i.step, kind: i.kind || "incident", what: i.message || "", file: i.file, detail: i.detail });
    for (const e of S.events) rows.push({ t: parseTime(e.time), step: e.step, kind: e.event || "event", what: e.message || "" });
    for (const r of S.rewinds) rows.push({ t: parseTime(r.time), step: r.to_step, kind: "rewind", what: `steps went back from ${r.from_step} to ${r.to_step} (resumed from a checkpoint)` });
    rows.sort((a, b) => (b.t || 0) - (a.t || 0));
    const body = $("incident-rows");
    body.replaceChildren(...rows.slice(0, 300).map((r) => {
      let what = r.what;
      if (r.detail && typeof r.detail === "object" && !what) what = JSON.stringify(r.detail);
      const button = r.file ? el("button", { onclick: () => showIncident(r.file) }, "batch samples") : "";
      return el("tr", {}, el("td", {}, fmtTime(r.t)), el("td", {}, String(r.step ?? "")),
        el("td", { class: "kind kind-" + r.kind }, r.kind.replace("_", " ")), el("td", {}, what), el("td", {}, button));
    }));
    $("no-incidents").hidden = rows.length > 0;
  }
  async function showIncident(file) {
    const pre = $("incident-detail");
    const name = file.replace(/^incidents\//, "");
    const res = await fetch("/api/incidents/" + encodeURIComponent(name));
    const data = await res.json();
    pre.textContent = `${file}\n` + JSON.stringify(data, null, 2);
    pre.hidden = false;
    pre.scrollIntoView({ block: "nearest" });
  }

  function renderCheckpoints() {
    const body = $("checkpoint-rows");
    const list = [...S.checkpoints].sort((a, b) => (b.step || 0) - (a.step || 0));
    body.replaceChildren(...list.map((c) => el("tr", {}, el("td", {}, String(c.step ?? "")), el("td", {}, fmtTime(parseTime(c.time))),
      el("td", {}, fmtCount(c.tokens_seen)), el("td", {}, el("code", {}, c.path || "")),
      el("td", { class: "muted" }, c.exists === false ? "pruned (keep-last)" : ""))));
    $("no-checkpoints").hidden = list.length > 0;
    // samples: one card per fixed prompt, its outputs at every checkpoint (newest first)
    const byPrompt = new Map();
    const samples = [...S.samples].sort((a, b) => (a.step || 0) - (b.step || 0));
    for (const s of samples) {
      (s.samples || []).forEach((item, idx) => {
        const prompt = item && typeof item === "object" && "prompt" in item ? item.prompt : item;
        const key = JSON.stringify(prompt);
        if (!byPrompt.has(key)) byPrompt.set(key, { prompt, idx, outputs: [] });
        byPrompt.get(key).outputs.push({ step: s.step, checkpoint: s.checkpoint, answer: answerOf(item && item.output) });
      });
    }
    const cards = [...byPrompt.values()].sort((a, b) => a.idx - b.idx).map((p) => {
      const outs = p.outputs.slice().reverse().slice(0, 8);
      return el("div", { class: "sample" }, el("div", { class: "prompt" }, JSON.stringify(p.prompt)),
        el("ol", {}, ...outs.map((o, i) => el("li", { class: i === 0 ? "latest" : "" },
          el("span", { class: "at" }, `step ${o.step}`), el("span", { class: "answer" }, o.answer)))));
    });
    $("samples").replaceChildren(...cards);
  }

  function renderMixture() {
    const mix = S.mixtures.length ? S.mixtures[S.mixtures.length - 1] : null;
    const data = S.data || {};
    const names = new Set([...Object.keys((mix && mix.shares) || {}), ...Object.keys(data.consumed || {}), ...Object.keys(data.skipped_too_long || {})]);
    const rows = [...names].sort().map((name) => {
      const share = mix && mix.shares ? mix.shares[name] : null;
      const bar = isNum(share) ? el("span", {}, el("span", { class: "bar", style: `width:${Math.max(1, 200 * share)}px` }), ` ${(100 * share).toFixed(1)} %`) : "—";
      const get = (o, f = fmtCount) => (o && name in o ? (isNum(o[name]) ? f(o[name]) : String(o[name])) : "—");
      return el("tr", {}, el("td", {}, name), el("td", {}, bar), el("td", {}, get(mix && mix.weights, fmtNum)), el("td", {}, get(mix && mix.records)),
        el("td", {}, get(data.consumed)), el("td", {}, get(data.epochs)), el("td", {}, get(data.skipped_too_long)));
    });
    $("mixture-rows").replaceChildren(...rows);
    $("mixture-note").textContent = mix ? `Mixture logged at step ${mix.step} (${fmtTime(parseTime(mix.time))}); ${S.mixtures.length} change(s) in this run.` : "No mixture logged yet.";
  }

  // ------------------------------------------------------------------------------------------ parameters
  let inspectChart = null;
  function renderInspectControls() {
    const sel = $("inspect-stat");
    const stats = S.inspect.stats;
    if (sel.options.length !== stats.length) {
      const current = sel.value || (stats.includes("norm") ? "norm" : stats[0]);
      sel.replaceChildren(...stats.map((s) => el("option", { value: s }, s)));
      if (current) sel.value = current;
    }
    $("inspect-note").textContent = S.inspect.points
      ? `${S.inspect.points} inspection(s) of ${S.inspect.groups.length} parameter groups; the chart shows up to 12 groups matching the filter.`
      : "No inspection records yet.";
  }
  function renderInspectTable() {
    const latest = S.inspect.latest;
    const stats = S.inspect.stats;
    if (!latest) { $("inspect-head").replaceChildren(); $("inspect-rows").replaceChildren(); return; }
    let re = null;
    try { re = $("inspect-filter").value ? new RegExp($("inspect-filter").value) : null; } catch (e) { re = null; }
    $("inspect-head").replaceChildren(el("tr", {}, el("th", {}, `group (step ${latest.step})`), ...stats.map((s) => el("th", {}, s))));
    const groups = Object.keys(latest.params).sort().filter((g) => !re || re.test(g)).slice(0, 400);
    $("inspect-rows").replaceChildren(...groups.map((g) => el("tr", {}, el("td", {}, g),
      ...stats.map((s) => el("td", {}, fmtNum((latest.params[g] || {})[s]))))));
  }
  async function loadInspect() {
    if (!S.inspect.points) return;
    const stat = $("inspect-stat").value || "norm";
    const groups = $("inspect-filter").value;
    const res = await fetch(`/api/inspect?stat=${encodeURIComponent(stat)}&limit=12&groups=${encodeURIComponent(groups)}`);
    const data = await res.json();
    if (!res.ok) { $("inspect-note").textContent = data.error || "bad request"; return; }
    S.inspectView = data;
    drawInspect();
    renderInspectTable();
  }
  function drawInspect() {
    const v = S.inspectView, box = $("inspect-chart");
    if (inspectChart) { inspectChart.destroy(); inspectChart = null; }
    if (!v || !v.groups.length) { box.textContent = v ? "No group matches." : ""; return; }
    box.textContent = "";
    const data = [v.step, ...v.groups.map((g) => v.series[g])];
    inspectChart = new uPlot({
      width: Math.max(box.clientWidth - 10, 300), height: 260,
      scales: { x: { time: false } },
      axes: [{ incrs: STEP_INCRS, stroke: "#6b7385", grid: { stroke: "#eef0f4" } },
        { size: 62, values: axisValues("y"), stroke: "#6b7385", grid: { stroke: "#eef0f4" } }],
      series: [{ label: "step" }, ...shortNames(v.groups).map((g, i) => ({ label: g, stroke: COLORS[i % COLORS.length], width: 1.3, value: (u, x) => fmtNum(x) }))],
      cursor: { drag: { x: true, y: false } },
    }, data, box);
  }
  function appendInspect(rec) {
    if (!rec.params) return;
    S.inspect.points += 1;
    const groups = new Set(S.inspect.groups);
    const stats = new Set(S.inspect.stats);
    for (const [g, vals] of Object.entries(rec.params)) { groups.add(g); for (const s of Object.keys(vals || {})) stats.add(s); }
    S.inspect.groups = [...groups].sort();
    // as the server's view: every group known so far, empty where this inspection did not cover it
    S.inspect.latest = { step: rec.step, params: Object.fromEntries(S.inspect.groups.map((g) => [g, rec.params[g] || {}])) };
    const order = ["mean", "std", "max_abs", "norm", "grad_mean", "grad_std", "grad_max_abs", "grad_norm"];
    S.inspect.stats = [...stats].sort((a, b) => ((order.indexOf(a) + 99) % 99) - ((order.indexOf(b) + 99) % 99) || a.localeCompare(b));
    const v = S.inspectView;
    if (v) {
      while (v.step.length && v.step[v.step.length - 1] >= rec.step) { v.step.pop(); for (const g of v.groups) v.series[g].pop(); }
      v.step.push(rec.step);
      for (const g of v.groups) v.series[g].push(rec.params[g] ? num(rec.params[g][v.stat]) : null);
    }
    dirty.inspect = true;
  }

  // ------------------------------------------------------------------------------------------ reports
  async function loadReports() {
    try {
      const res = await fetch("/api/reports");
      const data = await res.json();
      const rows = data.days.slice().reverse().map((d) => el("tr", {},
        el("td", {}, d.day),
        el("td", {}, el("a", { href: `/reports/${d.day}`, target: "_blank", class: "button" }, "view"), " ",
          el("a", { href: `/reports/${d.day}?format=md`, target: "_blank", class: "button" }, "markdown"), " ",
          el("span", { class: "muted" }, d.markdown ? "written to reports/" : "not written yet")),
        el("td", {}, el("button", { onclick: () => writeReport(d.day) }, d.markdown ? "rewrite files" : "write files"))));
      $("report-rows").replaceChildren(...rows);
      const off = data.utc_offset_hours;
      $("report-note").textContent = `Log days end at midnight UTC${off >= 0 ? "+" : ""}${off}. Rewriting keeps the "Comment" section of a report.`;
    } catch (e) { /* the next refresh tries again */ }
  }
  async function writeReport(day) {
    const res = await fetch(`/api/reports/${day}`, { method: "POST" });
    const data = await res.json();
    $("report-note").textContent = res.ok ? `Wrote ${data.written.join(", ")}` : (data.error || "failed");
    loadReports();
  }
  setInterval(loadReports, 60000);

  // ------------------------------------------------------------------------------------------ updates
  const dirty = { charts: false, header: false, incidents: false, checkpoints: false, mixture: false, inspect: false };
  let frame = 0;
  function schedule() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      if (dirty.charts) renderCharts();
      if (dirty.header) renderHeader();
      if (dirty.incidents) renderIncidents();
      if (dirty.checkpoints) renderCheckpoints();
      if (dirty.mixture) renderMixture();
      if (dirty.inspect) {
        renderInspectControls(); renderInspectTable();
        if (S.inspectView) drawInspect(); else loadInspect();
      }
      for (const k in dirty) dirty[k] = false;
      api.updates += 1;
    });
  }

  function applyRecords(msg) {
    for (const rec of msg.records) {
      if (rec.seq <= S.seq) continue;
      S.seq = rec.seq;
      S.records += 1;
      switch (rec.type) {
        case "train": appendTrain(rec); dirty.charts = true; break;
        case "eval": S.evals = S.evals.filter((e) => e.step < rec.step); S.evals.push(rec); dirty.charts = true; break;
        case "checkpoint": S.checkpoints = S.checkpoints.filter((c) => c.path !== rec.path); S.checkpoints.push({ ...rec, exists: true }); dirty.checkpoints = true; break;
        case "sample": {
          const key = rec.checkpoint || rec.step;
          S.samples = S.samples.filter((s) => (s.checkpoint || s.step) !== key); S.samples.push(rec); dirty.checkpoints = true; break;
        }
        case "incident": S.incidents.push(rec); dirty.incidents = true; dirty.charts = true; break;
        case "event": S.events.push(rec); dirty.incidents = true; dirty.charts = true; break;
        case "mixture": S.mixtures.push(rec); dirty.mixture = true; break;
        case "data": S.data = rec; dirty.mixture = true; break;
        case "inspect": appendInspect(rec); break;
        default: break;
      }
    }
    if (msg.eta) S.eta = msg.eta;
    dirty.header = true;
    schedule();
  }

  async function loadSnapshot() {
    const res = await fetch("/api/snapshot?max_points=" + S.maxPoints);
    const snap = await res.json();
    S.seq = snap.seq; S.records = snap.seq; S.runDir = snap.run_dir; S.run = snap.run || {};
    S.status = snap.status || {}; S.eta = snap.eta || {};
    S.serverOffset = snap.server_time - Date.now() / 1000;
    S.train = trainFromSnapshot(snap.train);
    S.evals = snap.eval || []; S.checkpoints = snap.checkpoints || []; S.samples = snap.samples || [];
    S.incidents = snap.incidents || []; S.events = snap.events || []; S.rewinds = snap.rewinds || [];
    S.mixtures = snap.mixtures || []; S.data = snap.data; S.nonfinite = snap.nonfinite_steps || [];
    S.inspect = { stats: snap.inspect.stats, groups: snap.inspect.groups, latest: snap.inspect.latest, points: snap.inspect.points };
    for (const k in dirty) dirty[k] = true;
    S.inspectView = null;
    schedule();
  }

  let source = null;
  function connect() {
    if (source) source.close();
    source = new EventSource("/api/stream?after=" + S.seq);
    source.addEventListener("open", () => { $("conn").className = "conn live"; $("conn").title = "live: receiving updates"; api.connected = true; });
    source.addEventListener("records", (ev) => applyRecords(JSON.parse(ev.data)));
    source.addEventListener("status", (ev) => {
      const msg = JSON.parse(ev.data);
      S.status = msg.status || S.status; if (msg.eta) S.eta = msg.eta; if (msg.run) S.run = msg.run;
      dirty.header = true; schedule();
    });
    source.addEventListener("reset", () => { source.close(); resync(); });
    source.addEventListener("error", () => {
      $("conn").className = "conn down"; $("conn").title = "disconnected: retrying"; api.connected = false;
      source.close();
      setTimeout(resync, 2000);
    });
  }
  async function resync() {
    try { await loadSnapshot(); connect(); } catch (e) { setTimeout(resync, 3000); }
  }

  $("x-axis").addEventListener("change", (e) => { S.xKey = e.target.value; dirty.charts = true; schedule(); });
  $("smoothing").addEventListener("change", (e) => { S.smoothing = Number(e.target.value); dirty.charts = true; schedule(); });
  $("inspect-apply").addEventListener("click", loadInspect);
  $("inspect-filter").addEventListener("keydown", (e) => { if (e.key === "Enter") loadInspect(); });
  $("inspect-stat").addEventListener("change", loadInspect);

  S.train = emptyTrain();
  resync().then(() => { loadReports(); api.ready = true; });
})();
