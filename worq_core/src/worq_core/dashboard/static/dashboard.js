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

  // A request that hangs must not stop the updates: each one gives up after a few refreshes.
  async function get(url, accept) {
    const controller = new AbortController();
    const timer = window.setTimeout(() => controller.abort(), Math.max(5000, 3 * refreshMs));
    try {
      const response = await fetch(url, {
        headers: { "accept": accept, "x-worq-live": "1" },
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(String(response.status));
      return accept === "application/json" ? await response.json() : await response.text();
    } finally {
      window.clearTimeout(timer);
    }
  }

  // Times are rendered as <time data-ts=...> in UTC; the words relative to now are added here,
  // so the server's markup stays the same while the data does.
  function span(seconds) {
    seconds = Math.abs(seconds);
    if (seconds < 60) return Math.round(seconds) + " s";
    if (seconds < 3600) return Math.round(seconds / 60) + " min";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }

  function elapsed(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function formatTimes(root) {
    const now = Date.now() / 1000;
    for (const element of root.querySelectorAll("time[data-ts]")) {
      const delta = now - Number(element.dataset.ts);
      const relative = delta < 0 ? "in " + span(delta) : span(delta) + " ago";
      const style = element.dataset.style;
      if (style === "ago") element.textContent = relative;
      else if (style === "since") element.textContent = elapsed(delta);
      else element.textContent = element.dataset.abs + " (" + relative + ")";
      element.title = element.dataset.abs;
    }
  }

  // Every element marked data-live (with an id) is replaced by its fresh copy from the same URL
  // when the server's markup for it changed.
  const rendered = new Map();
  for (const region of document.querySelectorAll("[data-live][id]")) {
    rendered.set(region.id, region.innerHTML);
  }

  async function refreshRegions() {
    if (!rendered.size) return;
    const html = await get(window.location.href, "text/html");
    const fresh = new DOMParser().parseFromString(html, "text/html");
    for (const [id, before] of rendered) {
      const region = document.getElementById(id);
      const replacement = fresh.getElementById(id);
      if (region && replacement && replacement.innerHTML !== before) {
        rendered.set(id, replacement.innerHTML);
        const adopted = document.importNode(replacement, true);
        formatTimes(adopted);
        region.replaceWith(adopted);
      }
    }
  }

  // The throughput chart: jobs finished per second by the live workers, from /api/overview.
  const canvas = document.getElementById("throughput");
  const samples = [];

  async function sampleThroughput() {
    const data = await get("/api/overview", "application/json");
    samples.push(data.throughput);
    if (samples.length > 90) samples.shift();
    const label = document.getElementById("rate");
    if (label) label.textContent = data.throughput.toFixed(1) + " jobs/s";
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
      formatTimes(document);
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

  formatTimes(document);
  draw();
  window.setTimeout(tick, canvas ? 0 : refreshMs);
})();
