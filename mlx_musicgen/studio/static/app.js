// The studio's page: submit a job, follow its events, hear its audio while it is made (Web Audio, from the
// streamed WAV), and keep the takes. No build step, no outside resources.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
let info = {};
let current = null; // {id, events, player}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(body && body.detail ? body.detail : `${response.status} ${response.statusText}`);
  return body;
}

function showError(message) {
  const box = $("#form-error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ---- live playback: the job's float32 WAV, scheduled buffer after buffer as it arrives

class StreamPlayer {
  constructor(rate, channels) {
    this.context = new AudioContext({ sampleRate: rate });
    this.rate = rate;
    this.channels = channels;
    this.next = 0;
    this.frames = 0; // scheduled so far
    this.stopped = false;
    this.abort = new AbortController();
  }

  async play(url) {
    let response;
    try {
      response = await fetch(url, { signal: this.abort.signal });
    } catch (error) {
      return; // stopped
    }
    if (!response.ok || !response.body) return;
    const reader = response.body.getReader();
    let pending = new Uint8Array(0);
    let dataStart = null;
    while (!this.stopped) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        break; // stopped
      }
      const { done, value } = chunk;
      if (done) break;
      pending = concat(pending, value);
      if (dataStart === null) {
        dataStart = findData(pending);
        if (dataStart === null) continue;
        pending = pending.slice(dataStart);
      }
      const frameBytes = 4 * this.channels;
      const usable = pending.length - (pending.length % frameBytes);
      if (usable === 0) continue;
      const samples = new Float32Array(pending.slice(0, usable).buffer);
      pending = pending.slice(usable);
      this.schedule(samples);
    }
    reader.cancel().catch(() => {});
  }

  schedule(samples) {
    const frames = samples.length / this.channels;
    const buffer = this.context.createBuffer(this.channels, frames, this.rate);
    for (let c = 0; c < this.channels; c++) {
      const out = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) out[i] = samples[i * this.channels + c];
    }
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    this.next = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
    this.frames += frames;
  }

  stop() {
    this.stopped = true;
    this.abort.abort(); // frees the connection (a queued job's stream is silent until it runs)
    this.context.close().catch(() => {});
  }
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function findData(bytes) {
  // RIFF chunks after the 12-byte header: the samples start after the "data" chunk's 8-byte head
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let offset = 12;
  while (offset + 8 <= bytes.length) {
    const id = String.fromCharCode(...bytes.slice(offset, offset + 4));
    if (id === "data") return offset + 8;
    offset += 8 + view.getUint32(offset + 4, true);
  }
  return null;
}

// ---- jobs

function followJob(id) {
  if (current) { // one job followed at a time: let go of the last one
    current.events.close();
    if (current.player) current.player.stop();
  }
  const box = $("#job");
  box.hidden = false;
  $("#bar").style.width = "0%";
  $("#cancel").disabled = false;
  setBusy(true);
  const events = new EventSource(`/api/jobs/${id}/events`);
  const followed = { id, events, player: null };
  current = followed;
  if ($("#listen").checked && info.sampling_rate) {
    followed.player = new StreamPlayer(info.sampling_rate, info.channels);
    followed.player.play(`/api/jobs/${id}/audio`);
  }
  events.onmessage = (event) => {
    if (current !== followed) return;
    const job = JSON.parse(event.data);
    const p = job.progress;
    const share = p.seconds_total ? Math.min(1, p.seconds_done / p.seconds_total) : 0;
    $("#bar").style.width = `${(100 * share).toFixed(1)}%`;
    const speed = p.realtime_factor ? `, ${p.realtime_factor.toFixed(2)}x real time` : "";
    const place = job.status === "queued" && job.position ? ` (place ${job.position} in the queue)` : "";
    $("#job-status").textContent =
      `${job.status}${place}: ${p.seconds_done.toFixed(1)} of ${p.seconds_total.toFixed(1)} s${speed}`;
    if (["done", "failed", "cancelled"].includes(job.status)) {
      events.close();
      $("#cancel").disabled = true;
      setBusy(false);
      if (job.status === "failed") showError(job.error);
      if (job.status !== "done" && followed.player) followed.player.stop();
      loadTakes();
    }
  };
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const form = new FormData($("#job-form"));
  for (const [name, value] of [...form.entries()]) {
    if (value === "" || (value instanceof File && value.size === 0)) form.delete(name);
  }
  await sendJob(() => api("/api/jobs", { method: "POST", body: form }));
}

function setBusy(busy) {
  // while a job is followed, the buttons that start another wait for it
  $("#generate").disabled = busy;
  document.querySelectorAll("li.take .again").forEach((button) => { button.disabled = busy; });
}

async function sendJob(request) {
  setBusy(true);
  try {
    followJob((await request()).id);
  } catch (error) {
    showError(error.message);
    setBusy(false);
  }
}

// ---- takes

function describe(settings) {
  const parts = [`${settings.duration} s`, `seed ${settings.seed}`, `guidance ${settings.guidance_scale}`,
    `top-k ${settings.top_k}`];
  if (settings.top_p) parts.push(`top-p ${settings.top_p}`);
  if (settings.temperature !== 1) parts.push(`temperature ${settings.temperature}`);
  if (settings.audio_prompt) parts.push("continues audio");
  if (settings.melody) parts.push("follows a melody");
  return parts.join(" · ");
}

async function drawWave(canvas, id) {
  const peaks = await api(`/api/takes/${id}/peaks?points=${canvas.width / 2}`);
  const g = canvas.getContext("2d");
  const mid = canvas.height / 2;
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.fillStyle = "#7cc4ff";
  peaks.low.forEach((low, i) => {
    const top = mid - Math.max(0, peaks.high[i]) * mid;
    const bottom = mid - Math.min(0, low) * mid;
    g.fillRect(i * 2, top, 1.5, Math.max(1, bottom - top));
  });
}

function renderTake(take) {
  const item = $("#take-template").content.firstElementChild.cloneNode(true);
  const settings = take.settings;
  const url = `${location.origin}/api/takes/${take.id}/audio`;
  const file = `${take.id}.${take.format}`;
  item.dataset.id = take.id;
  $(".take-title", item).textContent = settings.text || "(no text)";
  $(".take-meta", item).textContent = describe(settings);
  $(".player", item).src = take.audio;
  const download = $(".download", item);
  download.href = take.audio;
  download.download = file;
  item.addEventListener("dragstart", (event) => {
    // Chromium saves a dragged DownloadURL as a file where it is dropped (desktop, DAW)
    event.dataTransfer.setData("DownloadURL", `audio/${take.format}:${file}:${url}`);
    event.dataTransfer.setData("text/uri-list", url);
  });
  $(".again", item).disabled = $("#generate").disabled;
  $(".again", item).addEventListener("click", () =>
    sendJob(() => api(`/api/takes/${take.id}/again`, { method: "POST" })));
  $(".delete", item).addEventListener("click", async () => {
    if (!confirm(`Delete ${file}?`)) return;
    await api(`/api/takes/${take.id}`, { method: "DELETE" }).catch((e) => showError(e.message));
    loadTakes();
  });
  drawWave($(".wave", item), take.id).catch(() => {});
  return item;
}

async function loadTakes() {
  const takes = await api("/api/takes");
  const list = $("#takes");
  list.replaceChildren(...takes.map(renderTake));
  $("#take-count").textContent = takes.length ? `(${takes.length})` : "";
}

async function start() {
  info = await api("/api/info");
  $("#model").textContent = `${info.model} · ${info.sampling_rate} Hz · ${info.channels === 2 ? "stereo" : "mono"}`;
  $("#melody-field").hidden = !info.melody;
  const fields = $("#job-form").elements;  // the settings' defaults and limits are the server's (GenerationConfig)
  for (const [name, value] of Object.entries(info.defaults)) {
    if (value !== null && fields[name]) fields[name].value = value;
  }
  fields.duration.max = info.kind === "magnet" ? info.window_seconds : info.max_duration;  // MAGNeT: its clip
  fields.guidance_scale.max = info.max_guidance;
  fields.top_k.max = info.vocab_size;
  $("#job-form").addEventListener("submit", submit);
  $("#cancel").addEventListener("click", () => current &&
    api(`/api/jobs/${current.id}`, { method: "DELETE" }).catch((e) => showError(e.message)));
  await loadTakes();
}

start().catch((error) => showError(error.message));
