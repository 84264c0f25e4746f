// The live overview: polls /api/upstreams and /api/aggregates every second (no reload).
"use strict";
(function () {
  const PERIOD_MS = 1000;
  const upstreamBody = document.querySelector("#upstreams tbody");
  const aggregateBody = document.querySelector("#aggregates tbody");
  const failedBox = document.getElementById("failed");
  const slowestBox = document.getElementById("slowest");
  const live = document.getElementById("live");
  let newestSeen = null;

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    return value < 10 ? value.toFixed(2) + " ms" : value < 1000 ? value.toFixed(1) + " ms"
      : (value / 1000).toFixed(2) + " s";
  }

  function percent(value) {
    return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + "%";
  }

  function drawUpstreams(rows) {
    const fragment = document.createDocumentFragment();
    for (const u of rows) {
      const tr = document.createElement("tr");
      cell(tr, u.name);
      cell(tr, u.kind);
      cell(tr, u.endpoints.active + " / " + u.endpoints.ejected, "num");
      cell(tr, u.breaker, "breaker-" + u.breaker);
      cell(tr, u.in_flight + " / " + u.concurrency_limit, "num");
      cell(tr, String(u.targets), "num");
      cell(tr, ms(u.p50_ms), "num");
      cell(tr, ms(u.p99_ms), "num");
      cell(tr, percent(u.error_rate), "num");
      cell(tr, percent(u.cache_hit_ratio), "num");
      fragment.appendChild(tr);
    }
    upstreamBody.replaceChildren(fragment);
  }

  function drawAggregates(answer) {
    document.getElementById("kept").textContent =
      answer.kept + " kept of the last " + answer.keep;
    const fragment = document.createDocumentFragment();
    const previous = newestSeen;
    for (const a of answer.aggregates) {
      const tr = document.createElement("tr");
      tr.dataset.requestId = a.request_id;
      if (previous !== null && a.seq > previous) tr.className = "fresh";
      newestSeen = Math.max(newestSeen === null ? 0 : newestSeen, a.seq);
      cell(tr, new Date(a.ended_at * 1000).toLocaleTimeString());
      const link = document.createElement("a");
      link.href = "/aggregates/" + encodeURIComponent(a.request_id) + "?seq=" + a.seq;
      link.textContent = a.request_id;
      cell(tr, "").appendChild(link);
      cell(tr, a.aggregate);
      cell(tr, a.status, a.status === "OK" ? "status-OK" : "status-bad");
      cell(tr, String(a.targets), "num");
      const failed = cell(tr, a.failed ? a.failed + ": " + a.failed_ids.join(", ") +
        (a.failed > a.failed_ids.length ? " …" : "") : "", a.failed ? "status-bad" : "");
      failed.title = a.failed_ids.join(", ");
      cell(tr, ms(a.elapsed_ms), "num");
      fragment.appendChild(tr);
    }
    if (newestSeen === null) newestSeen = 0;
    aggregateBody.replaceChildren(fragment);
    document.getElementById("empty").hidden = answer.aggregates.length > 0;
  }

  function drawConfig(info) {
    const shown = document.getElementById("config");
    if (!info.sha256) { shown.textContent = ""; return; }
    let text = "config " + info.sha256.slice(0, 12);
    if (info.same === false) text += " (workers differ: a reload is spreading)";
    const last = info.last_reload;
    if (last) {
      text += " · last reload " + new Date(last.at * 1000).toLocaleTimeString() + ": " +
        (last.result === "ok" ? "applied" : "refused, " + last.problems + " problems (see the log)");
      if (last.needs_restart.length) text += " · needs a restart: " + last.needs_restart.join(", ");
    }
    shown.textContent = text;
    shown.className = last && last.result !== "ok" ? "status-bad" : "muted";
  }

  function aggregatesUrl() {
    const params = new URLSearchParams();
    if (failedBox.checked) params.set("failed", "true");
    if (slowestBox.value) params.set("slowest", slowestBox.value);
    else params.set("limit", "200");
    return "/api/aggregates?" + params.toString();
  }

  async function getJson(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  async function refresh() {
    try {
      const [upstreams, aggregates, config] = await Promise.all([
        getJson("/api/upstreams"), getJson(aggregatesUrl()), getJson("/api/config")]);
      drawUpstreams(upstreams.upstreams);
      drawAggregates(aggregates);
      drawConfig(config);
      live.classList.remove("stale");
      live.textContent = "live";
    } catch (problem) {
      live.classList.add("stale");
      live.textContent = "not reachable";
    } finally {
      setTimeout(refresh, PERIOD_MS);
    }
  }

  failedBox.addEventListener("change", () => { newestSeen = null; });
  slowestBox.addEventListener("change", () => { newestSeen = null; });
  refresh();
})();
