// The demo page: load a model built by onnxlrp, preprocess a picture as `onnxlrp explain` does, run it with
// onnxruntime-web, and draw the relevance as onnxlrp/heatmaps.py does (bwr, normalised by the largest |R|).
"use strict";

const params = new URLSearchParams(location.search);
const DEFAULT_MODEL = params.get("model") || "digits_epsilon_plus_flat.onnx";
const DEFAULT_SIDE = 224;  // for models whose input size is dynamic
// Colour stops of onnxlrp's "bwr" map: position 0..255, RGB.
const BWR = [[0, [0, 0, 255]], [128, [255, 255, 255]], [255, [255, 0, 0]]];
const $ = (id) => document.getElementById(id);

ort.env.wasm.numThreads = 1;  // a plain static server gives no cross-origin isolation, hence no threads

const state = {
  source: null, label: null, session: null, input: null, shape: null, logits: null, picture: null, last: null,
  targetFed: false,
};
// onnxruntime-web lists no input that has a default (a model built without --no-target-default): `target` cannot
// be fed there, and the predicted class is always explained.
const NO_TARGET = "This model was built without --no-target-default: onnxruntime-web cannot feed it a class, " +
  "so the predicted class is explained. Rebuild it with --no-target-default to choose one.";

/** numpy's rint: halves to the even neighbour, so that the colours match onnxlrp's pictures. */
function rint(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The colormap as 256 RGB rows, linear between its stops (heatmaps.lookup_table). */
function lookupTable(stops) {
  const table = [];
  for (let i = 0; i < 256; i++) {
    let k = 0;
    while (k < stops.length - 2 && i > stops[k + 1][0]) k++;
    const [p0, c0] = stops[k], [p1, c1] = stops[k + 1];
    const t = (i - p0) / (p1 - p0);
    table.push(c0.map((v, j) => rint(v + t * (c1[j] - v))));
  }
  return table;
}
const TABLE = lookupTable(BWR);

/** Input name and [C, H, W] of the model's picture input (the first input that is not `target`). */
function inputOf(session) {
  const meta = (session.inputMetadata || []).find((m) => m.name !== "target");
  const name = meta ? meta.name : session.inputNames.find((n) => n !== "target");
  const dims = meta && meta.shape && meta.shape.length === 4 ? meta.shape.slice(1) : [1, "H", "W"];
  const [c, h, w] = dims.map((d, i) => (typeof d === "number" && d > 0 ? d : i === 0 ? 3 : DEFAULT_SIDE));
  return { name, shape: [c, h, w] };
}

async function loadModel(source, label) {
  $("result").textContent = "Loading the model…";
  Object.assign(state, { source, label });  // a backend change loads the same model again
  const copy = typeof source === "string" ? source : source.slice();
  state.session = await ort.InferenceSession.create(copy, { executionProviders: [$("backend").value] });
  const { name, shape } = inputOf(state.session);
  state.input = name;
  state.shape = shape;
  state.logits = state.session.outputNames.find((n) => n !== "relevance" && !n.startsWith("relevance/"));
  state.targetFed = state.session.inputNames.includes("target");
  if (!state.targetFed) $("target").value = "-1";
  $("target").disabled = !state.targetFed;
  $("target-note").textContent = state.targetFed ? "" : NO_TARGET;
  $("model-info").textContent = `Model: ${label} · input '${name}' [N, ${shape.join(", ")}] · ` +
    `backend ${$("backend").value}`;
  $("result").textContent = "Drop an image (or pick one) to explain it.";
  if (state.picture) await explainPicture(state.picture);
}

/** Resize the shorter side to cover H x W (bilinear), crop the centre, and scale by 1/255 (explain.Preprocessing):
 * gray as ITU-R 601 luma (PIL's "L") for one channel, RGB for three; layout NCHW. */
function preprocess(image, [channels, height, width]) {
  const factor = Math.max(height / image.height, width / image.width);
  const rw = Math.max(width, Math.round(image.width * factor));
  const rh = Math.max(height, Math.round(image.height * factor));
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.imageSmoothingQuality = "high";
  context.drawImage(image, -Math.floor((rw - width) / 2), -Math.floor((rh - height) / 2), rw, rh);
  const rgba = context.getImageData(0, 0, width, height).data;
  const plane = width * height;
  const x = new Float32Array(channels * plane);
  for (let i = 0; i < plane; i++) {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    if (channels === 1) {
      x[i] = Math.floor((r * 299 + g * 587 + b * 114 + 500) / 1000) / 255;
    } else {
      [r, g, b].slice(0, channels).forEach((v, c) => { x[c * plane + i] = v / 255; });
    }
  }
  return x;
}

/** Run the model on one input [C, H, W] for class `target` (-1: the predicted one; a model that cannot be fed
 * `target` explains the predicted class whatever is asked, and says so). */
async function explainArray(x, shape, target = -1) {
  const feeds = { [state.input]: new ort.Tensor("float32", x, [1, ...shape]) };
  if (state.targetFed) {
    feeds.target = new ort.Tensor("int64", BigInt64Array.from([BigInt(target)]), [1]);
  } else {
    target = -1;
  }
  const out = await state.session.run(feeds);
  const logits = Array.from(out[state.logits].data);
  const relevance = out.relevance.data;
  const predicted = logits.indexOf(Math.max(...logits));
  const explained = target >= 0 ? target : predicted;
  state.last = { logits, relevance: Array.from(relevance), predicted, explained, input: Array.from(x) };
  return state.last;
}

/** A picture of values [C, H, W]: gray for one channel, RGB for three, values 0..1. */
function drawInput(canvas, x, [channels, height, width]) {
  const plane = width * height;
  drawPixels(canvas, width, height, (i) => {
    const v = (c) => Math.round(255 * Math.min(1, Math.max(0, x[(channels === 1 ? 0 : c) * plane + i])));
    return [v(0), v(1), v(2)];
  });
}

/** The heatmap of relevance [C, H, W]: summed over channels, divided by the largest |R|, bwr colours. */
function drawHeatmap(canvas, relevance, [channels, height, width]) {
  const plane = width * height;
  const summed = new Float64Array(plane);
  for (let c = 0; c < channels; c++) for (let i = 0; i < plane; i++) summed[i] += relevance[c * plane + i];
  const largest = summed.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  drawPixels(canvas, width, height, (i) => TABLE[rint(((largest > 0 ? summed[i] / largest : 0) + 1) * 127.5)]);
}

function drawPixels(canvas, width, height, color) {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    pixels.data.set([...color(i), 255], 4 * i);
  }
  context.putImageData(pixels, 0, 0);
}

function updateTargets(classes) {
  const select = $("target");
  if (select.options.length === classes + 1) return;
  select.length = 1;
  for (let c = 0; c < classes; c++) select.add(new Option(`class ${c}`, String(c)));
}

async function explainPicture(image) {
  state.picture = image;
  const x = preprocess(image, state.shape);
  const result = await explainArray(x, state.shape, Number($("target").value));
  updateTargets(result.logits.length);
  drawInput($("input"), x, state.shape);
  drawHeatmap($("heatmap"), result.relevance, state.shape);
  const total = result.relevance.reduce((s, v) => s + v, 0);
  const logit = result.logits[result.predicted].toFixed(3);
  $("result").textContent = `Predicted class ${result.predicted} (logit ${logit}); ` +
    `explained class ${result.explained}, relevance sum ${total.toFixed(3)}`;
  document.body.dataset.state = "explained";
}

async function readImage(file) {
  const image = new Image();
  image.src = URL.createObjectURL(file);
  await image.decode();
  return image;
}

async function guarded(task) {
  try {
    await task();
  } catch (error) {
    $("result").textContent = `Error: ${error.message || error}`;
    document.body.dataset.state = "error";
    console.error(error);
  }
}

$("image").addEventListener("change", (e) => guarded(async () => explainPicture(await readImage(e.target.files[0]))));
$("model").addEventListener("change", (e) => guarded(async () => {
  const file = e.target.files[0];
  await loadModel(new Uint8Array(await file.arrayBuffer()), file.name);
}));
$("target").addEventListener("change", () => guarded(async () => state.picture && explainPicture(state.picture)));
$("backend").addEventListener("change", () => guarded(async () => loadModel(state.source, state.label)));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  guarded(async () => explainPicture(await readImage(e.dataTransfer.files[0])));
});
if (navigator.gpu) $("backend").add(new Option("WebGPU", "webgpu"));

// For scripts and tests: window.onnxlrp.ready resolves once the model is loaded.
window.onnxlrp = { state, loadModel, explainArray, ready: guarded(() => loadModel(DEFAULT_MODEL, DEFAULT_MODEL)) };
