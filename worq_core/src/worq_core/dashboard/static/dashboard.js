// worq dashboard: live updates without reloading the page. No framework, nothing from a CDN.
// Data from the server is only ever put into the page as text (textContent) or as markup the
// server rendered and escaped; nothing here builds HTML from job data.
"use strict";

(function () {
  const body = document.body;
  const refreshMs = Number(body.dataset.refreshMs) || 2000;
  const live = document.getElementById("live");

  function stale(isStale) {
    if (!live) return;
    live.classList.toggle("stale", isStale);
    live.textContent = isStale ? "offline" : "live";
  }

  // Every element marked data-live (with an id) is replaced by its fresh copy from the same URL.
  async function refreshRegions() {
    const regions = document.querySelectorAll("[data-live][id]");
    if (!regions.length) return;
    const response = await fetch(window.location.href, { headers: { "accept": "text/html" } });
    if (!response.ok) throw new Error(String(response.status));
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const region of regions) {
      const replacement = fresh.getElementById(region.id);
      if (replacement && replacement.innerHTML !== region.innerHTML) {
        region.replaceWith(document.importNode(replacement, true));
      }
    }
  }

  // The throughput chart: jobs finished per second by live workers, from /api/overview.
  const canvas = document.getElementById("throughput");
  const samples = [];
  let previous = null;

  async function sampleThroughput() {
    const response = await fetch("/api/overview", { headers: { "accept": "application/json" } });
    if (!response.ok) throw new Error(String(response.status));
    const data = await response.json();
    if (previous !== null) {
      const seconds = Math.max(0.001, data.at - previous.at);
      // A worker that stops takes its count with it: never chart a negative rate.
      const rate = Math.max(0, data.processed - previous.processed) / seconds;
      samples.push(rate);
      if (samples.length > 90) samples.shift();
      const label = document.getElementById("rate");
      if (label) label.textContent = rate.toFixed(1) + " jobs/s";
    }
    previous = data;
    draw();
  }

  function draw() {
    if (!canvas) return;
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    const top = Math.max(1, ...samples) * 1.15;
    ctx.strokeStyle = "#dde1e6";
    ctx.fillStyle = "#5b6572";
    ctx.font = "11px system-ui, sans-serif";
    for (let i = 0; i <= 4; i++) {
      const y = pad / 2 + (h - pad) * i / 4;
      ctx.beginPath(); ctx.moveTo(pad + 20, y); ctx.lineTo(w - 4, y); ctx.stroke();
      ctx.fillText((top * (4 - i) / 4).toFixed(top < 10 ? 1 : 0), 2, y + 4);
    }
    if (samples.length < 2) return;
    ctx.strokeStyle = "#1f4e79";
    ctx.lineWidth = 2;
    ctx.beginPath();
    const step = (w - pad - 24) / 89;
    samples.forEach((value, i) => {
      const x = pad + 20 + step * (90 - samples.length + i);
      const y = pad / 2 + (h - pad) * (1 - value / top);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }

  async function tick() {
    if (!document.hidden) {
      try {
        await Promise.all([refreshRegions(), canvas ? sampleThroughput() : null]);
        stale(false);
      } catch (error) {
        stale(true);
      }
    }
    window.setTimeout(tick, refreshMs);
  }

  // Actions that cannot be undone ask first (the server still needs the form's token).
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  draw();
  window.setTimeout(tick, canvas ? 0 : refreshMs);
})();
