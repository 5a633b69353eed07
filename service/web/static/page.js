// The "try the model" page: talks to the service only through its public HTTP API
// (GET /v2/models, GET /v2/models/{name}, POST /classify), like any other client.
// Plain browser JavaScript on purpose: no build step, nothing fetched from elsewhere.
"use strict";

const KEY_STORE = "seresnet-serve.api-key";
// Multipart bytes around each part (boundary, headers) beyond the file itself; generous, so a
// planned request never trips the service's body limit.
const PART_OVERHEAD = 320;
const MAX_503_RETRIES = 3;

// Short words for the service's error codes (its message follows them): the service's own
// table (static/error-words.js), plus the page's own failure to reach it.
const ERROR_WORDS = {
  ...SERVICE_ERROR_WORDS,
  network_error: "Could not reach the service",
};

const $ = (id) => document.getElementById(id);
const state = { meta: null, limits: null, numClasses: null, run: 0, urls: [] };

// ------------------------------------------------------------------ HTTP

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function getJSON(path, method = "GET") {
  const response = await fetch(path, { method, headers: authHeaders() });
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's HTML page, say): the status alone has to do
  }
  return { status: response.status, ok: response.ok, body };
}

function problemOf(status, body, statusText) {
  const error = body && body.error;
  if (error && typeof error.code === "string") return error;
  // KServe V2 routes answer {"error": "<message>"}.
  if (typeof error === "string") return { code: `http_${status}`, message: error };
  // Under /v2 the service answers the KServe V2 protocol's {"error": "<string>"}.
  if (typeof error === "string") return { code: `http_${status}`, message: error };
  return { code: `http_${status}`, message: statusText || `HTTP ${status}` };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ model card

function cardStatus(text, warn = false) {
  const p = $("card-status");
  p.textContent = text;
  p.className = warn ? "warn" : "muted";
  p.hidden = !text;
}

function needKey(message) {
  const field = $("api-key");
  field.classList.add("warn");
  field.focus();
  cardStatus(message || "This service needs an API key: enter it at the top right.", true);
}

function firstName(list) {
  if (!Array.isArray(list) || list.length === 0) return null;
  return typeof list[0] === "string" ? list[0] : list[0].name || null;
}

async function discoverModel() {
  // GET /v2/models lists the served models; a service without it may answer Triton's
  // repository index, or carry the list in GET /v2 (server metadata).
  const tries = [
    ["v2/models", "GET", (body) => firstName(body && body.models)],
    ["v2/repository/index", "POST", (body) => firstName(body)],
    ["v2", "GET", (body) => firstName(body && body.models)],
  ];
  for (const [path, method, pick] of tries) {
    const res = await getJSON(path, method);
    if (res.status === 401) return { unauthorized: true };
    const name = res.ok ? pick(res.body) : null;
    if (name) return { name };
  }
  return {};
}

async function loadCard(name) {
  if (!name) {
    const found = await discoverModel();
    if (found.unauthorized) return needKey();
    name = found.name;
  }
  if (!name) {
    cardStatus("The service does not list its models; the card appears after the first image.");
    return;
  }
  const res = await getJSON(`v2/models/${encodeURIComponent(name)}`);
  if (res.status === 401) return needKey();
  if (!res.ok || !res.body || !res.body.card) {
    const problem = problemOf(res.status, res.body);
    cardStatus(`Could not read the model card of ${name}: ${problem.message}`, true);
    return;
  }
  $("api-key").classList.remove("warn");
  renderCard(res.body);
}

function percent(x) {
  return `${(x * 100).toFixed(2)} %`;
}

function bytes(n) {
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(n % 2 ** 20 ? 1 : 0)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} KiB`;
  return `${n} bytes`;
}

function renderCard(meta) {
  const card = meta.card;
  const input = card.input || {};
  const labels = card.labels || [];
  state.meta = meta;
  state.limits = meta.limits || null;
  state.numClasses = labels.length || card.num_classes || null;
  if (state.numClasses) $("top-k").max = String(state.numClasses);

  $("card-title").textContent = `${card.name} · version ${card.version}` +
    (card.architecture ? ` · ${card.architecture}` : "");

  // " · " between labels: ImageNet's labels have commas of their own ("tabby, tabby cat").
  const shown = labels.slice(0, 20);
  let classes = `${labels.length} classes: ${shown.join(" · ")}`;
  if (shown.length < labels.length) classes += ` … and ${labels.length - shown.length} more`;
  $("card-classes").replaceChildren(classes + ". Any other picture still gets one of these.");
  if (shown.length < labels.length) {
    const all = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "all classes";
    const list = document.createElement("ol");
    list.start = 0; // numbered by class id
    for (const label of labels) {
      const li = document.createElement("li");
      li.textContent = label;
      list.append(li);
    }
    all.append(summary, list);
    $("card-classes").append(all);
  }

  const colour = input.color === "L" ? "grayscale" : input.color === "RGB" ? "RGB colour" : input.color;
  $("card-input").textContent = `${input.width}×${input.height} ${colour}; ` +
    "images of other sizes or colours are converted first";

  const metrics = card.metrics || {};
  if (typeof metrics.test_top1 === "number") {
    let text = `top-1 ${percent(metrics.test_top1)}`;
    if (typeof metrics.test_top5 === "number") text += `, top-5 ${percent(metrics.test_top5)}`;
    if (metrics.test_images) text += ` on ${metrics.test_images.toLocaleString("en")} test images`;
    $("card-accuracy").textContent = text;
  } else {
    $("card-accuracy").textContent = "not recorded in the card";
  }

  const engine = meta.engine || {};
  const graph = engine.graph === "fused"
    ? "fused SE graph (each SE block one custom op)"
    : engine.graph === "unfused" ? "unfused graph" : engine.graph || "graph unknown";
  const why = document.createElement("small");
  why.className = "muted";
  why.textContent = engine.reason ? ` · ${engine.reason}` : "";
  $("card-engine").replaceChildren(`${engine.provider || "provider unknown"}, ${graph}`, why);

  const limits = state.limits;
  $("card-limits").textContent = limits
    ? `${limits.max_images_per_request} images and ${bytes(limits.max_body_bytes)} per request ` +
      `(larger selections are sent in several requests); ` +
      `${limits.max_image_pixels.toLocaleString("en")} pixels per image`
    : "not published";

  cardStatus("");
  $("card-facts").hidden = false;
}

// ------------------------------------------------------------------ results

function makeView(file) {
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  node.dataset.filename = file.name;
  node.dataset.state = "pending";
  node.querySelector(".filename").textContent = file.name;
  node.querySelector(".filename").title = file.name;
  const img = node.querySelector("img");
  const url = URL.createObjectURL(file);
  state.urls.push(url);
  img.alt = file.name;
  img.addEventListener("load", () => {
    // Tiny images (28x28 Fashion-MNIST) are blown up with hard pixels, not blurred.
    if (img.naturalWidth <= 64 && img.naturalHeight <= 64) img.classList.add("pixelated");
    img.title = `${img.naturalWidth}×${img.naturalHeight}`;
  });
  img.addEventListener("error", () => {
    const none = document.createElement("span");
    none.className = "none";
    none.textContent = "no preview";
    img.replaceWith(none);
  });
  img.src = url;
  $("results").append(node);
  return node;
}

function showPredictions(view, predictions) {
  const list = view.querySelector(".bars");
  list.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    label.title = `${p.label} (class ${p.class_id})`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(p.score * 100).toFixed(1)} %`;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
    track.append(fill);
    li.append(label, score, track);
    list.append(li);
  }
  view.dataset.state = "ok";
}

function showError(view, problem) {
  const p = view.querySelector(".error");
  const words = ERROR_WORDS[problem.code] || "Could not classify";
  const strong = document.createElement("strong");
  strong.textContent = words;
  const code = document.createElement("code");
  code.textContent = ` (${problem.code})`;
  p.replaceChildren(strong, document.createTextNode(`: ${problem.message}`), code);
  p.hidden = false;
  view.dataset.state = "error";
}

// ------------------------------------------------------------------ classifying

function partBytes(file) {
  return file.size + PART_OVERHEAD + 3 * file.name.length;
}

// Requests within the service's published limits; a file too large for any request is
// reported at once instead of being sent.
function plan(items) {
  const limits = state.limits;
  const maxImages = limits ? limits.max_images_per_request : Infinity;
  const maxBytes = limits ? limits.max_body_bytes : Infinity;
  const batches = [];
  const tooLarge = [];
  let batch = [];
  let size = 0;
  for (const item of items) {
    const need = partBytes(item.file);
    if (need > maxBytes) {
      tooLarge.push(item);
      continue;
    }
    if (batch.length && (batch.length >= maxImages || size + need > maxBytes)) {
      batches.push(batch);
      batch = [];
      size = 0;
    }
    batch.push(item);
    size += need;
  }
  if (batch.length) batches.push(batch);
  return { batches, tooLarge };
}

async function post(batch, topK) {
  const form = new FormData();
  for (const item of batch) form.append("images", item.file, item.file.name);
  for (let attempt = 0; ; attempt++) {
    const started = performance.now();
    let response;
    try {
      response = await fetch(`classify?top_k=${topK}`, {
        method: "POST", body: form, headers: authHeaders(),
      });
    } catch (e) {
      return { status: 0, ms: performance.now() - started,
               problem: { code: "network_error", message: String(e.message || e) } };
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      // handled below as a problem without a body
    }
    const ms = performance.now() - started;
    if (response.status === 503 && attempt < MAX_503_RETRIES) {
      const wait = Number(response.headers.get("Retry-After")) || 1;
      await sleep(Math.min(wait, 5) * 1000);
      continue;
    }
    return { status: response.status, ms, body, statusText: response.statusText };
  }
}

// Sends one planned request; returns the times of the requests it took (a request the
// service still finds too large is split in halves, as the batch client does).
async function send(batch, topK) {
  const res = await post(batch, topK);
  const results = res.body && res.body.results;
  if (res.status === 200 && Array.isArray(results) && results.length === batch.length) {
    batch.forEach((item, i) => {
      const r = results[i];
      if (r.error) showError(item.view, r.error);
      else showPredictions(item.view, r.predictions || []);
    });
    if (!state.meta && res.body.model) loadCard(res.body.model);
    return [res.ms];
  }
  if ([400, 413, 415].includes(res.status) && batch.length > 1) {
    const half = Math.ceil(batch.length / 2);
    return [...await send(batch.slice(0, half), topK), ...await send(batch.slice(half), topK)];
  }
  const problem = res.problem || problemOf(res.status, res.body, res.statusText);
  if (res.status === 401) needKey(`The service refused the API key: ${problem.message}`);
  for (const item of batch) showError(item.view, problem);
  return res.status ? [res.ms] : [];
}

function topK() {
  const field = $("top-k");
  let k = Math.round(Number(field.value)) || 5;
  k = Math.max(1, Math.min(k, state.numClasses || 100));
  field.value = String(k);
  return k;
}

function setStatus(text, done) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = done ? "done" : "busy";
}

async function classify(files) {
  const run = ++state.run;
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls = [];
  $("results").replaceChildren();
  if (!files.length) return;
  const items = files.map((file) => ({ file, view: makeView(file) }));
  const { batches, tooLarge } = plan(items);
  for (const item of tooLarge) {
    showError(item.view, {
      code: "body_too_large",
      message: `${bytes(item.file.size)} is more than the service accepts in one request ` +
        `(${bytes(state.limits.max_body_bytes)})`,
    });
  }
  const k = topK();
  const noun = (n, one, many) => `${n} ${n === 1 ? one : many}`;
  setStatus(`Classifying ${noun(items.length, "image", "images")}…`, false);
  const times = [];
  for (const batch of batches) {
    times.push(...await send(batch, k));
    if (run !== state.run) return; // a newer selection replaced this one
  }
  const failed = items.filter((item) => item.view.dataset.state === "error").length;
  const total = times.reduce((a, b) => a + b, 0);
  let text = `${noun(items.length - failed, "image", "images")} classified`;
  if (failed) text += `, ${failed} not`;
  if (times.length) {
    text += ` · ${noun(times.length, "request", "requests")}, ${Math.round(total)} ms`;
    if (times.length > 1) text += ` (${times.map((t) => Math.round(t)).join(" + ")} ms)`;
  }
  setStatus(text, true);
}

// ------------------------------------------------------------------ wiring

function setUpKey() {
  const field = $("api-key");
  field.value = sessionStorage.getItem(KEY_STORE) || "";
  field.addEventListener("change", () => {
    const key = field.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    field.classList.remove("warn");
    loadCard(state.meta && state.meta.name);
  });
}

function setUpDrop() {
  const zone = $("drop");
  const input = $("files");
  input.addEventListener("change", () => {
    classify([...input.files]);
    input.value = ""; // choosing the same files again is a new run
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  // A file dropped beside the zone must not make the browser navigate away to it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  zone.addEventListener("dragover", () => zone.classList.add("over"));
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    zone.classList.remove("over");
    classify([...e.dataTransfer.files]);
  });
}

setUpKey();
setUpDrop();
loadCard();
