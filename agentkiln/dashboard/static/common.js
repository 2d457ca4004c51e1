// Shared by every dashboard page: API calls with the session's key, login, DOM and chart helpers.
"use strict";
const kiln = (() => {
  const KEY = "kiln.apiKey";
  class AuthNeeded extends Error {}

  function authHeaders() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function api(path) {
    const resp = await fetch(path, { headers: authHeaders() });
    if (resp.status === 401) {
      showLogin(sessionStorage.getItem(KEY) ? "That key was refused." : "");
      throw new AuthNeeded("login needed");
    }
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error((body.error && body.error.message) || "HTTP " + resp.status);
    return body;
  }

  function showLogin(message) {
    const dialog = document.getElementById("login");
    document.getElementById("login-error").textContent = message || "";
    if (!dialog.open) dialog.showModal();
  }

  function setupLogin() {
    document.getElementById("login-form").addEventListener("submit", () => {
      sessionStorage.setItem(KEY, document.getElementById("login-key").value.trim());
      location.reload();
    });
    const state = document.getElementById("auth-state");
    if (sessionStorage.getItem(KEY)) {
      const out = el("a", { href: "#", text: "sign out" });
      out.addEventListener("click", (e) => { e.preventDefault(); sessionStorage.removeItem(KEY); location.reload(); });
      state.append(out);
    }
  }

  // el("td", {text: "x", class: "y"}, [children])
  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function table(node, headers, rows) {
    node.replaceChildren(
      el("thead", {}, [el("tr", {}, headers.map((h) => el("th", { text: h })))]),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => c instanceof Node ? el("td", {}, [c]) : el("td", { text: c ?? "" }))))),
    );
  }

  function card(label, value, id) {
    return el("div", { class: "card", id }, [el("div", { class: "label", text: label }), el("div", { class: "value", text: String(value ?? "–") })]);
  }

  const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
  const fmtNum = (x, d = 3) => (x === null || x === undefined ? "" : typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(d)) : String(x));
  const dur = (a, b) => (a && b ? (b - a).toFixed(2) + " s" : "");

  function showError(err) {
    if (err instanceof AuthNeeded) return;
    let box = document.getElementById("page-error");
    if (!box) { box = el("p", { id: "page-error", class: "error" }); document.getElementById("main").prepend(box); }
    box.textContent = String(err.message || err);
  }

  // Runs fn now and every ms while the tab is visible; stops on a login prompt.
  function poll(fn, ms) {
    let stopped = false;
    async function tick() {
      if (stopped) return;
      try { if (!document.hidden) await fn(); } catch (err) { if (err instanceof AuthNeeded) { stopped = true; return; } showError(err); }
      setTimeout(tick, ms);
    }
    tick();
  }

  const COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"];

  // A uPlot line chart in `node` that can be given new data; node.dataset.points says how many x values it shows.
  function lineChart(node, seriesNames, opts = {}) {
    let plot = null;
    return function update(xs, ys) {
      node.dataset.points = String(xs.length);
      const data = [xs, ...ys];
      if (!plot) {
        const series = [{ label: opts.xLabel || "step" }, ...seriesNames.map((name, i) => ({
          label: name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
          points: { show: true, size: opts.scatter ? 5 : 4 }, paths: opts.scatter ? () => null : undefined,
        }))];
        plot = new uPlot({ width: Math.max(node.clientWidth, 320), height: opts.height || 240, series,
          scales: { x: { time: false }, y: opts.yRange ? { range: (u, lo, hi) => [Math.min(opts.yRange[0], lo ?? 0), Math.max(opts.yRange[1], hi ?? 1)] } : {} }, axes: [{ label: opts.xLabel || "step" }, { label: opts.yLabel || "" }] }, data, node);
      } else {
        plot.setData(data);
      }
    };
  }

  document.addEventListener("DOMContentLoaded", setupLogin);
  return { api, el, table, card, fmtTime, fmtNum, dur, poll, showError, lineChart, AuthNeeded };
})();
