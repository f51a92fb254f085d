// The dashboard's only script (the CSP allows no inline script). Each live page opens one
// server-sent-events stream: "live" events carry the page's live part as HTML the server
// rendered (and escaped), "curves" events a job's metrics for the uPlot chart. Nothing here
// sends anything but GET.
"use strict";

(function () {
  const stateEl = document.getElementById("live-state");
  const live = document.getElementById("live");
  window.labLoadedAt = Date.now();  // tests read this to tell an update from a reload

  function setState(text, cls) {
    if (!stateEl) return;
    stateEl.textContent = text;
    stateEl.className = "live-state " + cls;
  }

  // --- the job page's chart ------------------------------------------------------------------
  const box = document.getElementById("chart-box");
  let chart = null;

  function drawCurves(c) {
    if (!box || typeof uPlot === "undefined") return;
    if (!c.steps || c.steps.length === 0) {
      box.classList.add("empty");
      document.getElementById("chart-note").textContent = "no training curves for this job (no metrics.jsonl)";
      return;
    }
    box.classList.remove("empty");
    document.getElementById("chart-note").textContent =
      "train and validation loss by step (metrics.jsonl), live while it runs";
    const cols = [c.steps, c.train, c.val];
    if (chart) {
      chart.setData(cols);
      return;
    }
    const width = Math.max(320, Math.min(1100, box.clientWidth - 20));
    chart = new uPlot({
      width: width, height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "loss" }],
      series: [
        { label: "step" },
        { label: "train loss", stroke: "#2257c9", width: 1.5, spanGaps: true },
        { label: "val loss", stroke: "#dc2626", width: 2, spanGaps: true, points: { show: true, size: 5 } },
      ],
    }, cols, document.getElementById("chart"));
  }

  if (box) {
    fetch(box.dataset.curves, { credentials: "same-origin" })
      .then((r) => r.json()).then(drawCurves)
      .catch(() => { document.getElementById("chart-note").textContent = "curves could not be read"; });
  }

  // --- the live part -------------------------------------------------------------------------
  if (live && live.dataset.stream && window.EventSource) {
    const src = new EventSource("/stream?page=" + encodeURIComponent(live.dataset.stream));
    src.addEventListener("open", () => setState("live", "on"));
    src.addEventListener("error", () => setState("reconnecting…", "off"));
    src.addEventListener("live", (e) => {
      live.innerHTML = JSON.parse(e.data);
      live.dataset.updated = String(Date.now());
    });
    src.addEventListener("curves", (e) => drawCurves(JSON.parse(e.data)));
    src.addEventListener("problem", (e) => setState("read failed: " + JSON.parse(e.data), "off"));
  }

  // A filter takes effect as soon as a select changes (the form also works without script).
  const filters = document.getElementById("filters");
  if (filters) {
    filters.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => filters.submit()));
  }
})();
