"use strict";
(() => {
  const { api, el, table, card, fmtTime, fmtNum, dur } = kiln;
  const rid = new URLSearchParams(location.search).get("id") || "";
  document.getElementById("rid").textContent = rid;

  // Logprob -> background colour: 0 (certain) green, -5 and below red.
  function lpColour(lp) {
    if (lp === null || lp === undefined) return "transparent";
    const t = Math.min(1, Math.max(0, -lp / 5));
    return `hsl(${Math.round(120 * (1 - t))}, 70%, 85%)`;
  }

  function message(m) {
    const parts = [el("div", { class: "who", text: m.role + (m.name ? " · " + m.name : "") + (m.reply ? " (reply)" : "") })];
    if (m.content) parts.push(el("pre", { class: "content", text: m.content }));
    for (const c of m.tool_calls) {
      parts.push(el("div", { class: "tool-call" }, [el("span", { class: "tag", text: "tool call" }),
        el("b", { text: " " + (c.name || "?") }), el("code", { text: " " + (c.arguments || "") })]));
    }
    if (m.role === "tool") parts.unshift(el("span", { class: "tag tool-result", text: "tool result" + (m.tool_call_id ? " " + m.tool_call_id : "") }));
    return el("div", { class: "msg " + m.role }, parts);
  }

  function tokens(call) {
    const box = el("div", { class: "tokens" });
    for (const t of call.tokens) {
      const text = t.text ?? "#" + t.id;
      box.append(el("span", { class: "tok", style: "background:" + lpColour(t.logprob), title: `id ${t.id} logprob ${fmtNum(t.logprob)}`, text }));
    }
    if (call.tokens_cut) box.append(el("span", { class: "muted", text: " … (cut)" }));
    return box;
  }

  function timeline(spans) {
    const node = document.getElementById("timeline");
    if (!spans.length) { node.replaceChildren(el("p", { class: "muted", text: "no spans" })); return; }
    const t0 = Math.min(...spans.map((s) => s.start_time));
    const t1 = Math.max(...spans.map((s) => s.end_time || s.start_time));
    const span = Math.max(t1 - t0, 1e-6);
    node.replaceChildren(...spans.map((s) => {
      const left = (100 * (s.start_time - t0)) / span;
      const width = Math.max(0.5, (100 * ((s.end_time || s.start_time) - s.start_time)) / span);
      return el("div", { class: "lane" }, [
        el("span", { class: "lane-label", text: `${s.sequence_id}. ${s.label}`, title: s.attempt_id }),
        el("span", { class: "lane-track" }, [el("span", { class: "bar " + s.name.replaceAll(".", "-") + (s.status === "ERROR" ? " err" : ""),
          style: `left:${left}%;width:${width}%`, title: `${dur(s.start_time, s.end_time)} ${s.error || ""}` })]),
      ]);
    }));
  }

  async function load() {
    const d = await api("/api/v1/dashboard/rollouts/" + encodeURIComponent(rid));
    const r = d.rollout;
    document.getElementById("rollout-cards").replaceChildren(
      card("status", r.status, "rollout-status"), card("mode", r.mode || "–"), card("reward", fmtNum(d.reward)),
      card("attempts", d.attempts.length), card("transitions", d.transitions), card("resources", r.resources_id || "–"),
    );
    table(document.getElementById("attempts"), ["#", "attempt", "status", "worker", "started", "duration", "failure", "message"],
      d.attempts.map((a) => [a.sequence_id, a.attempt_id, a.status, a.worker_id || "", fmtTime(a.start_time),
        dur(a.start_time, a.end_time), a.error ? a.error.kind : "", a.error ? a.error.message : ""]));
    timeline(d.timeline);
    document.getElementById("conversations").replaceChildren(...d.conversations.map((c) =>
      el("div", { class: "conversation" }, [el("h3", { text: "agent " + (c.agent || "(unnamed)") + " · attempt " + c.attempt_id }),
        ...c.messages.map(message)])));
    if (!d.conversations.length) document.getElementById("conversations").replaceChildren(el("p", { class: "muted", text: "no LLM calls recorded" }));
    document.getElementById("calls").replaceChildren(...d.calls.map((c) => el("div", { class: "call" }, [
      el("div", { class: "call-head" }, [
        el("b", { text: `#${c.sequence_id} ${c.agent || "(unnamed agent)"}` }),
        el("span", { class: "muted", text: ` ${c.prompt_tokens} prompt + ${c.response_tokens} response tokens · ${c.finish_reason || ""} · ${c.model_version || ""} · ${fmtNum(c.latency_s)} s ` }),
        c.became_transition ? el("span", { class: "tag ok", text: "became a transition" })
          : el("span", { class: "tag skip", text: "not trained: " + (c.skip_reason || "?") + (c.skip_detail ? " (" + c.skip_detail + ")" : "") }),
      ]),
      tokens(c),
    ])));
    table(document.getElementById("rewards"), ["#", "attempt", "name", "value", "final", "dims"],
      d.rewards.map((w) => [w.sequence_id, w.attempt_id, w.name, fmtNum(w.value), w.final ? "yes" : "no", w.dims ? JSON.stringify(w.dims) : ""]));
  }
  load().catch(kiln.showError);
})();
