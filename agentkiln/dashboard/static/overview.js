"use strict";
(() => {
  const { api, el, table, card, fmtTime, fmtNum, poll } = kiln;

  async function refresh() {
    const [data, engine] = await Promise.all([api("/api/v1/dashboard/overview"), api("/api/v1/engine")]);
    const s = data.summary;
    const failedRecent = Object.values(s.recent_failures_by_kind).reduce((a, b) => a + b, 0);
    document.getElementById("cards").replaceChildren(
      card("queue depth", s.queue_depth, "queue-depth"),
      card("running", s.rollouts_by_status.running || 0),
      card("rollouts/s (1 min)", fmtNum(s.rollouts_per_s)),
      card("failure rate (1 min)", s.recent_attempts ? (100 * failedRecent / s.recent_attempts).toFixed(1) + " %" : "–"),
      card("succeeded", s.rollouts_by_status.succeeded || 0),
      card("failed", s.rollouts_by_status.failed || 0),
    );
    const kinds = Object.keys(s.failures_by_kind).sort();
    table(document.getElementById("failures"), ["kind", "attempts (all)", "last minute", ""],
      kinds.map((k) => [k, s.failures_by_kind[k], s.recent_failures_by_kind[k] || 0,
        el("a", { href: "/rollouts?failure_kind=" + encodeURIComponent(k), text: "show" })]));
    const agents = Object.entries(engine.agent_versions || {});
    document.getElementById("engine").replaceChildren(
      el("p", { text: (engine.engine || "no engine") + (engine.model ? " serving " + engine.model : "") }),
      el("p", { text: "main weights: " + (engine.model_version || "–") + (engine.loaded_resources_id ? " (" + engine.loaded_resources_id + ")" : "") }),
      el("table", { class: "table", id: "agent-versions" }, [el("tbody", {}, agents.map(([a, v]) => el("tr", {}, [el("td", { text: a }), el("td", { text: v })])))]),
      el("p", { class: "error", text: engine.weights_error || engine.last_error || "" }),
    );
    table(document.getElementById("workers"), ["worker", "status", "last heartbeat", "current rollout", "attempt"],
      data.workers.map((w) => [w.worker_id, w.status, fmtTime(w.last_heartbeat),
        w.current_rollout_id ? el("a", { href: "/rollout?id=" + encodeURIComponent(w.current_rollout_id), text: w.current_rollout_id }) : "",
        w.current_attempt_id || ""]));
  }
  poll(refresh, 5000);
})();
