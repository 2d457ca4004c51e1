"use strict";
(() => {
  const { api, el, table, fmtTime } = kiln;
  async function load() {
    const { versions } = await api("/api/v1/dashboard/resources");
    const asc = versions.slice().reverse();
    if (asc.length) {
      const t0 = asc[0].created_at;
      kiln.lineChart(document.getElementById("versions-chart"), ["version"], { xLabel: "seconds since v1", yLabel: "version", height: 160 })(
        asc.map((v) => v.created_at - t0), [asc.map((v) => v.version)]);
    }
    table(document.getElementById("versions"), ["version", "id", "published", "adapters per agent", "prompts", "note"],
      versions.map((v) => [
        "v" + v.version, v.resources_id, fmtTime(v.created_at),
        el("div", {}, Object.entries(v.adapters).map(([agent, a]) => el("div", { text: `${agent === "*" ? "every agent" : agent}: ${a.model}${a.adapter_path ? " + " + a.adapter_path : ""}` }))),
        Object.keys(v.prompts).join(", "), JSON.stringify(v.metadata),
      ]));
    const diffs = versions.filter((v) => Object.keys(v.prompt_diffs).length);
    document.getElementById("diffs").replaceChildren(...(diffs.length ? diffs.flatMap((v) =>
      Object.entries(v.prompt_diffs).map(([name, diff]) => el("div", { class: "diff" }, [
        el("h3", { text: `v${v.version}: ${name}` }),
        el("pre", {}, diff.split("\n").map((line) => el("span", {
          class: line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : "", text: line + "\n" }))),
      ]))) : [el("p", { class: "muted", text: "no prompt changed between versions" })]));
  }
  load().catch(kiln.showError);
})();
