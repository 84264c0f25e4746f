// One aggregate as a waterfall: a bar per target on a shared time axis from the aggregate's
// start, coloured by outcome, with attempts, cache hits, fallbacks and the cut-off marked (when
// the server stopped waiting: the deadline less its margin, docs/api.md "Deadlines").
"use strict";
(function () {
  const OUTCOMES = ["ok", "error", "timeout", "unavailable", "circuit_open", "rejected",
    "skipped", "cancelled"];
  const DENSE_ABOVE = 200;  // targets: beyond this, thin rows without labels
  const requestId = decodeURIComponent(location.pathname.split("/").pop());
  const rowsBox = document.getElementById("rows");
  const details = document.getElementById("details");
  let record = null;
  let chosen = null;

  function ms(value) {
    return value < 10 ? value.toFixed(2) + " ms" : value < 1000 ? value.toFixed(1) + " ms"
      : (value / 1000).toFixed(2) + " s";
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function failed(t) { return t.outcome !== "ok" || t.from_fallback; }

  function legend() {
    const box = document.getElementById("legend");
    for (const outcome of OUTCOMES) {
      const item = el("span", "", "");
      const swatch = el("i", "swatch");
      swatch.style.background = "var(--" + outcome + ")";
      item.append(swatch, outcome.replace("_", " "));
      box.appendChild(item);
    }
    const hit = el("span", ""); const hitSwatch = el("i", "swatch bar cache-hit");
    hitSwatch.style.position = "static"; hitSwatch.style.background = "var(--cache-hit)";
    hit.append(hitSwatch, "cache hit");
    const fallback = el("span", ""); const fbSwatch = el("i", "swatch bar fallback");
    fbSwatch.style.position = "static"; fbSwatch.style.background = "var(--ok)";
    fallback.append(fbSwatch, "fallback value");
    const attempt = el("span", "", "| retry or hedge (attempts > 1)");
    const deadline = el("span", "", "┆ cut-off (deadline less its margin)");
    deadline.style.color = "var(--error)";
    box.append(hit, fallback, attempt, deadline);
  }

  function axisEnd(r) {
    let end = r.elapsed_ms;
    for (const t of r.targets) end = Math.max(end, t.start_offset_ms + t.latency_ms);
    // The cut-off is drawn when it is near enough not to squash every bar.
    if (r.cutoff_ms > 0 && r.cutoff_ms <= end * 3) end = Math.max(end, r.cutoff_ms);
    return end > 0 ? end : 1;
  }

  function niceStep(span) {
    const rough = span / 8;
    const power = Math.pow(10, Math.floor(Math.log10(rough)));
    for (const m of [1, 2, 5, 10]) if (power * m >= rough) return power * m;
    return power * 10;
  }

  function drawAxis(end) {
    const axis = document.getElementById("axis");
    axis.replaceChildren();
    const step = niceStep(end);
    for (let at = 0; at <= end * 0.93; at += step) {  // none where its label would not fit
      const tick = el("div", "tick", ms(at));
      tick.style.left = (at / end * 100) + "%";
      axis.appendChild(tick);
    }
  }

  function show(t, row) {
    if (chosen) chosen.classList.remove("chosen");
    chosen = row; row.classList.add("chosen");
    const list = el("dl");
    const facts = [
      ["target", t.id], ["upstream", t.upstream], ["method", t.method], ["path", t.path],
      ["outcome", t.outcome + (t.from_fallback ? " (fallback value)" : "")],
      ["status", t.status === null ? "–" : String(t.status)], ["error", t.error || "–"],
      ["start", ms(t.start_offset_ms)], ["latency", ms(t.latency_ms)],
      ["attempts", String(t.attempts)], ["cache", t.cache],
    ];
    for (const [name, value] of facts) {
      if (name === "path" && !value) continue;
      list.append(el("dt", "", name), el("dd", "", value));
    }
    details.replaceChildren(list);
    details.hidden = false;
  }

  function bar(t, end) {
    const box = el("div", "bar" + (t.cache === "hit" ? " cache-hit" : "") +
      (t.from_fallback ? " fallback" : ""));
    box.dataset.outcome = t.outcome;
    box.style.left = (t.start_offset_ms / end * 100) + "%";
    box.style.width = (t.latency_ms / end * 100) + "%";
    const colour = t.outcome === "ok" && t.cache === "hit" ? "cache-hit"
      : OUTCOMES.includes(t.outcome) ? t.outcome : "unspecified";
    box.style.background = "var(--" + colour + ")";
    // Attempts beyond the first: evenly spaced ticks (when each began is not kept).
    for (let n = 1; n < Math.min(t.attempts, 10); n++) {
      const tick = el("i", "attempt");
      tick.style.left = (n / t.attempts * 100) + "%";
      box.appendChild(tick);
    }
    return box;
  }

  function draw() {
    const r = record;
    const end = axisEnd(r);
    const dense = r.targets.length > DENSE_ABOVE;
    document.getElementById("waterfall").classList.toggle("dense", dense);
    drawAxis(end);
    let targets = r.targets.slice();
    if (document.getElementById("only-failed").checked) targets = targets.filter(failed);
    if (document.getElementById("order").value === "latency") {
      targets.sort((a, b) => b.latency_ms - a.latency_ms);
    } else {
      targets.sort((a, b) => a.start_offset_ms - b.start_offset_ms);
    }
    const fragment = document.createDocumentFragment();
    for (const t of targets) {
      const row = el("div", "row");
      row.dataset.target = t.id;
      const label = el("div", "label", t.id);
      label.title = t.id;
      const track = el("div", "track");
      const b = bar(t, end);
      if (!dense) {
        const note = [ms(t.latency_ms)];
        if (t.attempts > 1) note.push(t.attempts + " attempts");
        if (t.cache === "hit") note.push("cache hit");
        if (t.from_fallback) note.push("fallback");
        // The note goes inside a wide bar, before one that ends near the axis's end.
        const where = t.latency_ms / end > 0.3 ? " inside"
          : (t.start_offset_ms + t.latency_ms) / end > 0.75 ? " before" : "";
        b.appendChild(el("span", "bar-text" + where, note.join(" · ")));
      }
      track.appendChild(b);
      row.append(label, track);
      row.addEventListener("mouseenter", () => show(t, row));
      row.addEventListener("click", () => show(t, row));
      fragment.appendChild(row);
    }
    rowsBox.replaceChildren(fragment);
    const old = document.querySelector(".deadline");
    if (old) old.remove();
    if (r.cutoff_ms > 0 && r.cutoff_ms <= end) {
      const line = el("div", "deadline");
      line.title = cutoff(r);
      line.style.left = "calc(" + (dense ? "0px" : "var(--label)") + " + (100% - " +
        (dense ? "0px" : "var(--label)") + " - 0.8em) * " + (r.cutoff_ms / end) + " + 0.4em)";
      document.getElementById("waterfall").appendChild(line);
    }
  }

  // "cut-off 10.0 ms (deadline 30.0 ms less a 20.0 ms margin)": when the server stopped waiting.
  function cutoff(r) {
    return "cut-off " + ms(r.cutoff_ms) + " (deadline " + ms(r.deadline_ms) + " less a " +
      ms(r.deadline_ms - r.cutoff_ms) + " margin)";
  }

  function summarize(r) {
    const parts = [
      r.aggregate, r.status, r.targets.length + " targets",
      r.failed + " failed", ms(r.elapsed_ms) + " elapsed",
      cutoff(r) + (r.cutoff_ms > axisEnd(r) ? " (beyond the axis)" : ""),
      new Date(r.ended_at * 1000).toLocaleString(),
    ];
    document.getElementById("summary").textContent = parts.join(" · ");
  }

  async function load() {
    document.getElementById("request-id").textContent = requestId;
    legend();
    const response = await fetch("/api/aggregates/" + encodeURIComponent(requestId) + location.search,
      { cache: "no-store" });
    if (!response.ok) {
      const problem = document.getElementById("problem");
      problem.textContent = response.status === 404
        ? "This aggregate is no longer among the recent ones." : "HTTP " + response.status;
      problem.hidden = false;
      return;
    }
    record = await response.json();
    summarize(record);
    draw();
    if (record.targets.length === 0) {
      const problem = document.getElementById("problem");
      problem.textContent = "No target ran: the call ended " + record.status + " before any did.";
      problem.hidden = false;
    }
  }

  document.getElementById("only-failed").addEventListener("change", () => record && draw());
  document.getElementById("order").addEventListener("change", () => record && draw());
  load();
})();
