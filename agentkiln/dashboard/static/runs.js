"use strict";
(() => {
  const { api, el, table, card, fmtNum, poll } = kiln;
  const HEALTH = ["loss", "kl", "clip_frac", "zero_advantage_frac", "zero_adv_frac", "entropy"];
  const TIMES = ["sample_s", "learn_s"];
  const params = new URLSearchParams(location.search);
  let current = params.get("run");
  const charts = {};

  // {"agents": {"a": {"loss": 1}}} -> {"agents.a.loss": 1}
  function flat(record, prefix = "", out = {}) {
    for (const [k, v] of Object.entries(record)) {
      if (v && typeof v === "object" && !Array.isArray(v)) flat(v, prefix + k + ".", out);
      else out[prefix + k] = v;
    }
    return out;
  }

  function chart(id, names, opts) {
    const key = id + ":" + names.join(",");
    if (!charts[key]) {
      document.getElementById(id).replaceChildren();
      charts[key] = kiln.lineChart(document.getElementById(id), names, opts);
    }
    return charts[key];
  }

  function draw(run) {
    const history = run.history.map((h) => flat(h));
    const steps = history.map((h) => h.step);
    const xs = run.val_before !== null && run.val_before !== undefined ? [0, ...steps] : steps;
    const pad = xs.length - steps.length;
    const col = (k) => [...Array(pad).fill(null), ...history.map((h) => (typeof h[k] === "number" ? h[k] : null))];
    const val = col("val_reward");
    if (pad) val[0] = run.val_before;
    chart("reward-chart", ["train reward", "validation reward"], { yLabel: "reward", yRange: [0, 1] })(xs, [col("train_reward"), val]);

    const byStep = new Map();
    for (const p of run.rollout_rewards) {
      const s = byStep.get(p.step) || []; s.push(p.reward); byStep.set(p.step, s);
    }
    const rsteps = [...byStep.keys()].sort((a, b) => a - b);
    chart("rollout-chart", ["mean rollout reward", "max", "min"], { yLabel: "reward", yRange: [0, 1] })(rsteps, [
      rsteps.map((s) => byStep.get(s).reduce((a, b) => a + b, 0) / byStep.get(s).length),
      rsteps.map((s) => Math.max(...byStep.get(s))), rsteps.map((s) => Math.min(...byStep.get(s)))]);

    const keys = new Set(history.flatMap((h) => Object.keys(h)));
    const health = [...keys].filter((k) => HEALTH.some((h) => k === h || k.endsWith("." + h)));
    if (health.length) chart("health-chart", health, {})(steps, health.map((k) => history.map((h) => h[k] ?? null)));
    const times = [...keys].filter((k) => TIMES.includes(k));
    if (times.length) chart("time-chart", times, { yLabel: "seconds" })(steps, times.map((k) => history.map((h) => h[k] ?? null)));

    const last = history[history.length - 1] || {};
    document.getElementById("run-cards").replaceChildren(
      card("steps", history.length, "run-steps"),
      card("last train reward", fmtNum(last.train_reward)),
      card("validation before / best", (fmtNum(run.val_before) || "–") + " / " + (fmtNum(run.best_val) || "–")),
      card("tokens/s", fmtNum(last.tokens_per_s, 1)),
      card("best checkpoint", run.best_checkpoint || "–"),
      card("resume points", run.resume_points.length ? run.resume_points.join(", ") : "none"),
    );
    const cols = ["step", ...[...keys].filter((k) => k !== "step").sort()];
    table(document.getElementById("steps"), cols, history.slice().reverse().map((h) => cols.map((c) => fmtNum(h[c]))));
  }

  async function refresh() {
    const { runs } = await api("/api/v1/dashboard/runs");
    const select = document.getElementById("run-select");
    document.getElementById("no-runs").hidden = runs.length > 0;
    if (!runs.length) return;
    if (!current || !runs.some((r) => r.key === current)) current = runs[0].key;
    if (select.options.length !== runs.length) {
      select.replaceChildren(...runs.map((r) => el("option", { value: r.key, text: r.key + " (" + r.steps + " steps)" })));
    }
    select.value = current;
    const run = await api("/api/v1/dashboard/runs/" + encodeURIComponent(current));
    document.getElementById("run-path").textContent = run.path;
    draw(run);
  }

  document.getElementById("run-select").addEventListener("change", (e) => {
    current = e.target.value;
    for (const k of Object.keys(charts)) delete charts[k];
    refresh().catch(kiln.showError);
  });
  poll(refresh, 2000);
})();
