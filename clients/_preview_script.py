"""The preview page's script (``/preview.js``): the live picture with each model's boxes drawn
over the frame they were computed on.

How it works, in the browser:

* The picture: it reads ``/stream.mjpg`` itself with ``fetch()`` and splits the multipart
  stream into its parts; each part carries its frame's seq and capture time in headers
  (``X-Frame-Seq``, ``X-Frame-Time``), which an ``<img>`` ignores and this script keeps. Each
  JPEG is decoded (``createImageBitmap``) and drawn on a canvas. The picture is not re-encoded.
* The results: ``/results`` is a stream of Server-Sent Events, a ``result`` event per result of
  every model (model, seq, capture time, boxes) and a ``models`` event every second (each
  model's colour, whether its writer lives, its latency).
* The match: a frame is held back until every model shown has published a result for that
  frame or a later one (then the frame's own result is known, or that the model skipped it), or
  until it has waited about the model's p99 latency (at most ``MAX_HOLD_MS``, and at most
  ``MAX_FRAMES`` frames are held). It is then drawn with, per model, the result of that very
  frame (solid lines), or the model's latest earlier result if it skipped the frame (dashed, at
  most ``CARRY_MS`` old). So the boxes belong to the picture under them, not to whatever
  result is newest.
* A checkbox per model shows or hides its boxes (remembered by the browser); a hidden model is
  not waited for. Without ``fetch()`` streaming the page falls back to a plain ``<img>``.

``window.framebrokerShown`` describes the frame on the canvas (its seq and the results drawn),
for whoever wants to check what the page shows (the tests do).
"""

SCRIPT = r"""
"use strict";
(() => {
  const MAX_HOLD_MS = 1000;     // a frame waits at most this long for its results
  const UNKNOWN_HOLD_MS = 500;  // ... while a model's latency is not known yet
  const HOLD_MARGIN_MS = 100;   // on top of a model's p99 latency: the way to the browser
  const MAX_FRAMES = 60;        // frames held at most
  const CARRY_MS = 1000;        // an earlier result is drawn on a skipped frame at most this late
  const KEEP_RESULTS = 300;     // results kept per model
  const RECONNECT_MS = 2000;

  const canvas = document.getElementById("picture");
  const context = canvas.getContext("2d");
  const caption = document.getElementById("models");
  const models = new Map();     // name -> {colour, alive, holdMs, results (by seq), newestSeq, ...}
  const frames = [];            // decoded, not yet drawn, in seq order
  let hidden = new Set();
  try { hidden = new Set(JSON.parse(localStorage.getItem("framebroker.hidden") || "[]")); } catch (e) {}
  window.framebrokerShown = null;

  // --- the status part refreshes itself ----------------------------------------------------------
  const statusBox = document.getElementById("status");
  setInterval(() => {
    fetch("status.html", {cache: "no-store"})
      .then((reply) => reply.ok ? reply.text() : Promise.reject(reply.status))
      .then((text) => { statusBox.innerHTML = text; })
      .catch(() => {});
  }, 1000);

  // --- models and their results ------------------------------------------------------------------
  function model(name) {
    let entry = models.get(name);
    if (!entry) {
      entry = {name, colour: "#00ff00", alive: true, holdMs: UNKNOWN_HOLD_MS, results: [], newestSeq: 0, p50: null, rate: 0};
      models.set(name, entry);
    }
    return entry;
  }

  function shown(entry) { return !hidden.has(entry.name); }

  function onModels(list) {
    const listed = new Set(list.map((m) => m.name));
    for (const m of list) {
      const entry = model(m.name);
      entry.colour = m.colour;
      entry.alive = m.alive;
      entry.p50 = m.latency_p50_ms;
      entry.rate = m.results_per_s;
      entry.holdMs = m.latency_p99_ms == null ? UNKNOWN_HOLD_MS : Math.min(MAX_HOLD_MS, m.latency_p99_ms + HOLD_MARGIN_MS);
    }
    for (const [name, entry] of models) {
      if (!listed.has(name)) entry.alive = false;
    }
    renderToggles();
  }

  function onResult(result) {
    const entry = model(result.model);
    if (result.seq <= entry.newestSeq) entry.results = [];  // its writer or the daemon restarted
    entry.results.push(result);
    if (entry.results.length > KEEP_RESULTS) entry.results.splice(0, entry.results.length - KEEP_RESULTS);
    entry.newestSeq = result.seq;
  }

  function resultFor(entry, frame) {
    for (let i = entry.results.length - 1; i >= 0; i--) {
      const result = entry.results[i];
      if (result.seq === frame.seq) return {result, exact: true};
      if (result.seq < frame.seq) return frame.t - result.t <= CARRY_MS ? {result, exact: false} : null;
    }
    return null;
  }

  function renderToggles() {
    const names = [...models.keys()].sort();
    if (caption.dataset.names !== names.join("\n")) {
      caption.dataset.names = names.join("\n");
      caption.textContent = "";
      for (const name of names) {
        const row = document.createElement("label");
        row.className = "model";
        const box = document.createElement("input");
        box.type = "checkbox";
        box.checked = !hidden.has(name);
        box.dataset.model = name;
        box.addEventListener("change", () => {
          if (box.checked) hidden.delete(name); else hidden.add(name);
          try { localStorage.setItem("framebroker.hidden", JSON.stringify([...hidden])); } catch (e) {}
        });
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        const text = document.createElement("span");
        text.className = "figures";
        row.append(box, swatch, text);
        caption.append(row);
      }
    }
    for (const row of caption.querySelectorAll("label.model")) {
      const entry = models.get(row.querySelector("input").dataset.model);
      row.querySelector(".swatch").style.background = entry.colour;
      const latency = entry.p50 == null ? "" : `, p50 ${Math.round(entry.p50)} ms after capture`;
      const state = entry.alive ? `${entry.rate.toFixed(1)} results/s${latency}` : "not publishing";
      row.querySelector(".figures").textContent = ` ${entry.name}: ${state}`;
    }
  }

  const events = new EventSource("results");
  events.addEventListener("models", (event) => onModels(JSON.parse(event.data)));
  events.addEventListener("result", (event) => onResult(JSON.parse(event.data)));

  // --- drawing -----------------------------------------------------------------------------------
  function drawBox(object, colour, exact) {
    const [x, y, w, h] = object.box;
    const line = Math.max(2, Math.round(canvas.width / 320));
    context.lineWidth = line;
    context.strokeStyle = colour;
    context.setLineDash(exact ? [] : [3 * line, 2 * line]);
    // The line lies just outside the box, so that what was found stays visible.
    context.strokeRect(x - line / 2, y - line / 2, w + line, h + line);
    context.setLineDash([]);
    let text = object.label || "";
    if (object.score !== undefined) text += (text ? " " : "") + object.score.toFixed(2);
    if (object.id !== undefined) text += ` #${object.id}`;
    if (!text) return;
    const size = Math.max(12, 6 * line);
    context.font = `${size}px sans-serif`;
    const width = context.measureText(text).width + 6;
    const top = Math.max(0, y - line - size - 4);
    context.fillStyle = "rgba(0, 0, 0, 0.6)";
    context.fillRect(x - line, top, width, size + 4);
    context.fillStyle = colour;
    context.textBaseline = "top";
    context.fillText(text, x - line + 3, top + 2);
  }

  function draw(frame, heldMs) {
    const bitmap = frame.bitmap;
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    context.drawImage(bitmap, 0, 0);
    bitmap.close();
    const drawn = [];
    for (const entry of models.values()) {
      if (!shown(entry)) continue;
      const found = resultFor(entry, frame);
      if (!found) continue;
      for (const object of found.result.objects) drawBox(object, entry.colour, found.exact);
      drawn.push({model: entry.name, seq: found.result.seq, exact: found.exact, objects: found.result.objects});
    }
    window.framebrokerShown = {seq: frame.seq, heldMs: Math.round(heldMs), results: drawn};
  }

  // A frame is ready once every model shown has got to it, or it has waited long enough.
  function ready(frame, now) {
    const waited = now - frame.arrived;
    for (const entry of models.values()) {
      if (!entry.alive || !shown(entry) || entry.newestSeq >= frame.seq) continue;
      if (waited < entry.holdMs) return false;
    }
    return true;
  }

  function tick() {
    const now = performance.now();
    let next = null;
    while (frames.length && (frames.length > MAX_FRAMES || ready(frames[0], now))) {
      if (next) next.bitmap.close();  // a newer frame is ready too: show that one
      next = frames.shift();
    }
    if (next) draw(next, now - next.arrived);
  }
  setInterval(tick, 10);

  // --- the picture: the MJPEG stream, read part by part ------------------------------------------
  const HEADER_END = [13, 10, 13, 10];

  function indexOf(bytes, pattern, from) {
    outer: for (let i = from; i <= bytes.length - pattern.length; i++) {
      for (let j = 0; j < pattern.length; j++) if (bytes[i + j] !== pattern[j]) continue outer;
      return i;
    }
    return -1;
  }

  // One part from the start of `bytes`, or null until all of it has arrived.
  function nextPart(bytes) {
    const end = indexOf(bytes, HEADER_END, 0);
    if (end < 0) return null;
    const headers = {};
    for (const line of new TextDecoder().decode(bytes.subarray(0, end)).split("\r\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
    const length = Number(headers["content-length"]);
    const start = end + HEADER_END.length;
    if (!(length >= 0)) throw new Error("a part without Content-Length");
    if (bytes.length < start + length + 2) return null;
    return {
      seq: Number(headers["x-frame-seq"] || 0),
      t: Number(headers["x-frame-time"] || 0),
      jpeg: bytes.slice(start, start + length),
      size: start + length + 2,  // the part ends with CRLF
    };
  }

  async function addFrame(part) {
    const bitmap = await createImageBitmap(new Blob([part.jpeg], {type: "image/jpeg"}));
    const last = frames.length ? frames[frames.length - 1].seq : 0;
    if (part.seq < last) {  // the daemon restarted: its frames count from 1 again
      for (const frame of frames.splice(0)) frame.bitmap.close();
    }
    frames.push({seq: part.seq, t: part.t, bitmap, arrived: performance.now()});
  }

  async function readPictures() {
    const reply = await fetch("stream.mjpg", {cache: "no-store"});
    if (!reply.ok || !reply.body) throw new Error(`stream.mjpg: HTTP ${reply.status}`);
    const reader = reply.body.getReader();
    let bytes = new Uint8Array(0);
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      const joined = new Uint8Array(bytes.length + value.length);
      joined.set(bytes);
      joined.set(value, bytes.length);
      bytes = joined;
      let part;
      while ((part = nextPart(bytes)) !== null) {
        bytes = bytes.subarray(part.size);
        await addFrame(part);
      }
    }
  }

  function plainPicture() {
    const img = document.createElement("img");
    img.id = "picture";
    img.src = "stream.mjpg";
    img.alt = canvas.getAttribute("aria-label");
    canvas.replaceWith(img);
  }

  async function run() {
    if (!window.ReadableStream || !window.createImageBitmap || !window.fetch) {
      plainPicture();
      return;
    }
    for (;;) {
      try { await readPictures(); } catch (error) { console.log("framebroker view:", error); }
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  }
  run();
})();
"""
