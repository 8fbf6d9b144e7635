// The try-a-model page: lists the models (GET /v1/models), sends an image to
// POST /v1/models/{m}:localize (or :classify), and draws what comes back. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], image: null, answer: null };

function headers(extra = {}) {
  const token = $("token").value || sessionStorage.getItem("imgclf-token") || "";
  if (token) sessionStorage.setItem("imgclf-token", token);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) {
    say(body.error || `cannot list the models (${response.status})`, true);
    return;
  }
  const ready = body.models.filter((m) => m.state === "ready");
  state.models = ready;
  $("model").replaceChildren(
    ...ready.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.name} (version ${m.version}, ${m.task})`;
      return option;
    })
  );
  say(ready.length ? "" : "no model is ready yet");
}

function selected() {
  return state.models.find((m) => m.name === $("model").value);
}

async function send(file) {
  const model = selected();
  if (!model) return say("pick a model first", true);
  const localizes = model.has_boxes || model.has_cam;
  const heatmap = model.has_cam ? "&heatmap=1" : "";
  const topK = Math.max(1, Number($("top-k").value) || 5);
  const route = localizes ? "localize" : "classify";
  const url = `/v1/models/${encodeURIComponent(model.name)}:${route}?top_k=${topK}${heatmap}`;
  say(`asking ${model.name}…`);
  const response = await fetch(url, {
    method: "POST",
    body: file,
    headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
  });
  const body = await response.json();
  if (!response.ok) return say(body.error || `failed (${response.status})`, true);
  state.answer = body.results[0];
  state.image = await createImageBitmap(file, { imageOrientation: "from-image" });
  say(`answered by ${body.model} version ${body.version}`);
  render();
}

function colour(v) {
  // black → red → yellow, as the CLI's --heatmap draws it
  return [Math.min(1, 2 * v) * 255, Math.max(0, 2 * v - 1) * 255, 0];
}

function heatmapCanvas(heatmap) {
  const canvas = document.createElement("canvas");
  canvas.width = heatmap.width;
  canvas.height = heatmap.height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(heatmap.width, heatmap.height);
  heatmap.values.forEach((row, y) =>
    row.forEach((v, x) => {
      const [r, g, b] = colour(v);
      const at = 4 * (y * heatmap.width + x);
      pixels.data.set([r, g, b, 255], at);
    })
  );
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function render() {
  const { image, answer } = state;
  if (!image || !answer) return;
  const canvas = $("canvas");
  canvas.width = image.width;
  canvas.height = image.height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const showHeatmap = $("heatmap-toggle").checked && answer.heatmap;
  canvas.dataset.heatmap = showHeatmap ? "shown" : "hidden";
  if (showHeatmap) {
    context.globalAlpha = 0.45;
    context.imageSmoothingEnabled = true;
    context.drawImage(heatmapCanvas(answer.heatmap), 0, 0, image.width, image.height);
    context.globalAlpha = 1;
  }
  const top = answer.predictions[0];
  $("top-label").textContent = `${top.label} — ${(100 * top.score).toFixed(1)}%`;
  $("results").replaceChildren(
    ...answer.predictions.map((p) => {
      const item = document.createElement("li");
      item.dataset.label = p.label;
      item.dataset.score = String(p.score);
      item.innerHTML = `<span></span> <small></small><span class="bar"></span>`;
      item.children[0].textContent = p.label;
      item.children[1].textContent = `${(100 * p.score).toFixed(1)}%`;
      item.children[2].style.width = `${Math.max(2, 100 * p.score)}%`;
      return item;
    })
  );
  if (answer.box) {
    const b = answer.box;
    context.lineWidth = Math.max(2, Math.round(Math.max(image.width, image.height) / 200));
    context.strokeStyle = "#00e676";
    context.strokeRect(b.x_min, b.y_min, b.x_max - b.x_min, b.y_max - b.y_min);
    canvas.dataset.box = [b.x_min, b.y_min, b.x_max, b.y_max].map(Math.round).join(",");
    $("box-info").textContent =
      `box ${canvas.dataset.box} (${answer.box_source}, score ${b.score.toFixed(2)})`;
  } else {
    delete canvas.dataset.box;
    $("box-info").textContent = "";
  }
  $("answer").hidden = false;
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) send(e.target.files[0]);
  });
  $("heatmap-toggle").addEventListener("change", render);
  $("token").addEventListener("change", loadModels);
  loadModels().catch((e) => say(String(e), true));
}

setUp();
