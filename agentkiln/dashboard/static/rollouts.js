"use strict";
(() => {
  const { api, el, table, fmtTime, fmtNum, dur } = kiln;
  const form = document.getElementById("filters");
  const LIMIT = 50;
  let offset = 0;
  let latest = 0; // the newest request: an older answer arriving after it must not overwrite the table

  // The URL holds the filters, so a filtered table can be linked to (the overview links failure kinds here).
  for (const [k, v] of new URLSearchParams(location.search)) {
    if (form.elements[k]) form.elements[k].value = v;
    if (k === "offset") offset = Number(v) || 0;
  }

  function query() {
    const q = new URLSearchParams();
    for (const field of form.elements) if (field.name && field.value) q.set(field.name, field.value);
    return q;
  }

  async function load() {
    const mine = ++latest;
    const q = query();
    history.replaceState(null, "", "/rollouts?" + q.toString() + (offset ? "&offset=" + offset : ""));
    q.set("limit", LIMIT); q.set("offset", offset);
    const page = await api("/api/v1/dashboard/rollouts?" + q.toString());
    if (mine !== latest) return; // a newer filter was asked for while this one was on its way
    const node = document.getElementById("rollouts");
    table(node, ["rollout", "status", "mode", "failure", "reward", "version", "attempts", "created", "duration", "input"],
      page.rows.map((r) => [
        el("a", { href: "/rollout?id=" + encodeURIComponent(r.rollout_id), text: r.rollout_id, class: "rollout-link" }),
        el("span", { class: "status " + r.status, text: r.status }), r.mode || "",
        r.failure_kind ? el("span", { class: "kind", title: r.failure_message || "", text: r.failure_kind }) : "",
        fmtNum(r.reward), r.version ? "v" + r.version : "", r.num_attempts, fmtTime(r.created_at),
        dur(r.start_time, r.end_time), el("code", { text: r.input_preview }),
      ]));
    node.dataset.rows = String(page.rows.length);
    const total = page.total ?? "?";
    document.getElementById("count").textContent = page.rows.length
      ? `${offset + 1}–${offset + page.rows.length} of ${total}` : "no rollouts match";
    document.getElementById("prev").disabled = offset === 0;
    document.getElementById("next").disabled = !page.has_more;
  }

  const run = () => load().catch(kiln.showError);
  form.addEventListener("submit", (e) => { e.preventDefault(); offset = 0; run(); });
  form.addEventListener("change", () => { offset = 0; run(); });
  document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - LIMIT); run(); });
  document.getElementById("next").addEventListener("click", () => { offset += LIMIT; run(); });
  run();
})();
