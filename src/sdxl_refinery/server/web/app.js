// Refinery's web page: a client of the server's public API (the same routes any client uses).
"use strict";

const KEY_STORAGE = "refinery.apiKey";
const PAGE_SIZE = 12;
const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  apiKey: localStorage.getItem(KEY_STORAGE) || "",
  galleryOffset: 0,
  watching: new Map(), // job id -> {element, controller}
  viewing: null, // {job, index}
  result: null, // the newest finished image shown large: {job, index}
  resultUrl: null, // its blob URL (kept apart from the gallery's, which a gallery refresh revokes)
  blobUrls: [],
  schema: null, // GET /v1/schema: every request field with its default, bounds and face names
  loras: [], // the LoRAs chosen for the next job: [{name, weight}]
  control: null, // the control image for the next job's ControlNet unit: {dataUrl}
  controlSliders: {}, // each preprocessor's sliders, from GET /controlnet/module_list's module_detail
  reference: null, // the reference image for the next job's image prompt: {dataUrl}
  init: null, // the image to start from: {dataUrl, image, width, height}
  mask: null, // an offscreen canvas the size of the image: white where the image is repainted
  masked: false, // whether anything is painted or uploaded on the mask
};

// ---------------------------------------------------------------- talking to the server

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.apiKey) headers.set("Authorization", `Bearer ${state.apiKey}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    showBanner("The server is unreachable. Is `refinery serve` running? Retrying…");
    throw error;
  }
  if (response.status === 401) {
    showKeyPanel(state.apiKey ? "That key was refused." : "");
    throw new Unauthorized("API key required");
  }
  hideBanner("unreachable");
  return response;
}

async function blobUrl(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  const url = URL.createObjectURL(await response.blob());
  state.blobUrls.push(url);
  return url;
}

// Server-Sent Events over fetch, so the Authorization header travels (EventSource cannot send it).
async function streamEvents(path, onEvent, signal) {
  const response = await api(path, { signal, headers: { Accept: "text/event-stream" } });
  if (!response.ok) throw new Error(`events: ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (data.length) onEvent(event, JSON.parse(data.join("\n")));
        event = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        event = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).trimStart());
      }
    }
  }
}

// ---------------------------------------------------------------- banners and the key prompt

function showBanner(text, kind = "unreachable") {
  const banner = $("#banner");
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}

function hideBanner(kind) {
  const banner = $("#banner");
  if (!kind || banner.dataset.kind === kind) banner.hidden = true;
}

function showKeyPanel(message) {
  $("#app").hidden = true;
  $("#key-panel").hidden = false;
  $("#key-error").textContent = message || "";
  $("#api-key").focus();
}

async function start() {
  let response;
  try {
    response = await api("/v1/jobs?limit=1");
  } catch (error) {
    if (!(error instanceof Unauthorized)) setTimeout(start, 3000);
    return;
  }
  if (!response.ok) {
    showBanner(`The server answered ${response.status}.`, "server");
    return;
  }
  const schema = await api("/v1/schema");
  if (!schema.ok) {
    showBanner(`The server answered ${schema.status} for its request schema.`, "server");
    return;
  }
  if (!state.schema) applySchema(await schema.json());
  $("#key-panel").hidden = true;
  $("#app").hidden = false;
  await Promise.all([loadGallery(), resumeActiveJobs(), loadLoras(), loadCheckpoints(), loadUpscalers(),
    loadControlNets(), loadIpAdapters()]);
}

// ---------------------------------------------------------------- the form

// The form follows the server's field table: defaults and limits come from GET /v1/schema, and a
// field the page has no input for yet gets a generated one under Advanced.
function applySchema(schema) {
  state.schema = schema;
  const form = $("#generate-form");
  for (const field of schema.fields) {
    if (!field.web || field.name === "prompt") continue;
    let input = form.elements[field.name];
    if (!input) input = generatedInput(field);
    if (field.type === "int" || field.type === "float") {
      // An exclusive bound is still the nearest limit the browser can show; the server refuses the bound itself.
      const low = field.minimum ?? field.exclusive_minimum;
      const high = field.maximum ?? field.exclusive_maximum;
      if (low !== null) input.min = low;
      if (high !== null) input.max = high;
      if (field.multiple_of) input.step = field.multiple_of;
      else if (field.type === "int") input.step = 1;
      else if (!input.getAttribute("step")) input.step = "any";
    }
    input.title = field.description;
    setField(input, field, field.default);
  }
  const size = `${fieldDefault("width")}x${fieldDefault("height")}`;
  const known = [...form.elements.size.options].some((option) => option.value === size);
  form.elements.size.value = known ? size : "custom";
  $("#custom-size").hidden = known;
  $("#switch-row").hidden = form.elements.mode.value !== "handoff";
  for (const [key] of GROUPS) {  // a group without fields has nothing to show
    const group = $(`#group-${key}`);
    if (group && group.children.length <= 1) group.remove();
  }
  updateGroups();
}

function fieldDefault(name) {
  return state.schema.fields.find((field) => field.name === name).default;
}

// Advanced fields, grouped by what they control; "From an image" shows once there is one, "Hires fix" once it
// is on. The order is the groups' order on the page.
const GROUPS = [
  ["sampling", "Sampling"],
  ["refiner", "Refiner"],
  ["image", "From an image"],
  ["hires", "Hires fix"],
];
const WEB_LABELS = {  // where the PNG label (A1111's, shared by two fields) would read the same twice
  hr_resize_x: "Hires width (0: by the scale)",
  hr_resize_y: "Hires height (0: by the scale)",
  inpaint_full_res: "Inpaint only the masked area",
  mask_invert: "Invert the mask",
};

function groupOf(name) {
  if (name.startsWith("refiner_") || ["aesthetic_score", "negative_aesthetic_score"].includes(name)) return "refiner";
  if (name.startsWith("hr_")) return "hires";
  if (name.startsWith("mask") || name.startsWith("inpaint") || name === "resize_mode") return "image";
  return "sampling";
}

function groupElement(key) {
  let group = $(`#group-${key}`);
  if (!group) {
    for (const [name, title] of GROUPS) {
      if ($(`#group-${name}`)) continue;
      const fieldset = document.createElement("fieldset");
      fieldset.id = `group-${name}`;
      fieldset.className = "group";
      const legend = document.createElement("legend");
      legend.textContent = title;
      fieldset.append(legend);
      $("#generated-fields").append(fieldset);
    }
    group = $(`#group-${key}`);
  }
  return group;
}

function updateGroups() {
  const image = $("#group-image");
  if (image) image.hidden = !state.init;
  const hires = $("#group-hires");
  if (hires) hires.hidden = !$("#enable_hr").checked;
}

function generatedInput(field) {
  const wrapper = document.createElement("div");
  const label = document.createElement("label");
  label.htmlFor = field.name;
  // A1111's wording where the field has a PNG label ("Schedule type"), else its name in words.
  label.textContent = WEB_LABELS[field.name] || field.label ||
    field.name.replaceAll("_", " ").replace(/^./, (c) => c.toUpperCase());
  let input;
  if (field.type === "enum") {
    input = document.createElement("select");
    if (field.optional) input.add(new Option("(same as the base)", "")); // refiner_sampler, refiner_scheduler
    for (const choice of field.choices) input.add(new Option(choice, choice));
  } else {
    input = document.createElement("input");
    input.type = field.type === "bool" ? "checkbox" : field.type === "str" ? "text" : "number";
  }
  input.id = input.name = field.name;
  const error = document.createElement("p");
  error.className = "field-error";
  error.dataset.errorFor = field.name;
  error.setAttribute("role", "alert");
  if (field.type === "bool") {
    wrapper.className = "check";
    wrapper.append(input, label, error);
  } else {
    wrapper.append(label, input, error);
  }
  groupElement(groupOf(field.name)).append(wrapper);
  return input;
}

function setField(input, field, value) {
  if (field.type === "bool") input.checked = value !== false;
  else input.value = value ?? "";
}

function readField(input, field) {
  if (field.type === "bool") return input.checked;
  if (field.type === "int" || field.type === "float") return input.value === "" ? null : Number(input.value);
  if (field.optional && input.value === "") return null;
  return input.value;
}

function formRequest() {
  const form = $("#generate-form");
  const request = { prompt: form.elements.prompt.value };
  for (const field of state.schema.fields) {
    const input = form.elements[field.name];
    if (!field.web || field.name === "prompt" || field.name === "seed" || !input) continue;
    const value = readField(input, field);
    if (value !== null) request[field.name] = value;
  }
  const size = form.elements.size.value;
  if (size !== "custom") [request.width, request.height] = size.split("x").map(Number);
  if (request.mode !== "handoff") delete request.switch_at;
  if (!$("#random-seed").checked && form.elements.seed.value !== "") request.seed = Number(form.elements.seed.value);
  if (state.loras.length) request.loras = state.loras.map(({ name, weight }) => ({ name, weight }));
  if (state.control && $("#control-model").value) {
    request.controlnets = [{
      model: $("#control-model").value, image: state.control.dataUrl,
      weight: Number($("#control-weight").value), preprocessor: $("#control-preprocessor").value,
      control_mode: $("#control-mode").value, ...controlSliders(),
    }];
  }
  if (state.reference && $("#image-prompt-model").value) {
    request.image_prompts = [{ model: $("#image-prompt-model").value, image: state.reference.dataUrl,
      weight: Number($("#image-prompt-weight").value) }];
  }
  if ($("#base-model").value) request.base_model = $("#base-model").value;
  if ($("#refiner-model").value) request.refiner_model = $("#refiner-model").value;
  if (state.init) {
    request.init_image = state.init.dataUrl;
    if (state.masked) request.mask_image = state.mask.toDataURL("image/png");
    delete request.enable_hr; // hires fix is for text to image
  } else {
    delete request.strength; // used only with an image (or hires fix, which sends its own)
    if (request.enable_hr && form.elements.strength) request.strength = Number(form.elements.strength.value);
  }
  return request;
}

function clearFieldErrors() {
  document.querySelectorAll("[data-error-for]").forEach((p) => (p.textContent = ""));
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
}

function showFieldErrors(details) {
  for (const detail of details) {
    const field = String((detail.loc || []).slice(-1)[0] || "request");
    const target = $(`[data-error-for="${field}"]`) || $('[data-error-for="request"]');
    const input = $(`#generate-form [name="${field}"]`);
    if (field === "width" || field === "height") {
      $("#size").value = "custom";
      $("#custom-size").hidden = false;
    }
    if (input && input.closest("details")) input.closest("details").open = true;
    target.textContent = `${field}: ${detail.msg}`;
    if (input) input.classList.add("invalid");
  }
}

async function submit(event) {
  if (event) event.preventDefault();
  clearFieldErrors();
  const request = formRequest();
  let response;
  try {
    response = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
  } catch (error) {
    return;
  }
  if (response.status === 422) {
    showFieldErrors((await response.json()).detail || []);
    return;
  }
  if (response.status === 429) {
    const retry = response.headers.get("Retry-After") || "a few";
    showBanner(`The queue is full. Try again in ${retry} seconds.`, "queue");
    return;
  }
  if (!response.ok) {
    showBanner(`The server refused the job (${response.status}).`, "server");
    return;
  }
  hideBanner("queue");
  const accepted = await response.json();
  watchJob(accepted.id, request.prompt, `Queued, position ${accepted.position ?? "?"}`);
}

function fillForm(request, seed) {
  const form = $("#generate-form");
  form.elements.prompt.value = request.prompt;
  for (const field of state.schema.fields) {
    const input = form.elements[field.name];
    if (field.web && field.name !== "prompt" && input && request[field.name] !== undefined) {
      setField(input, field, request[field.name]);
    }
  }
  const preset = `${request.width}x${request.height}`;
  const known = [...form.elements.size.options].some((option) => option.value === preset);
  form.elements.size.value = known ? preset : "custom";
  $("#custom-size").hidden = known;
  $("#switch-row").hidden = request.mode !== "handoff";
  state.loras = (request.loras || []).map(({ name, weight }) => ({ name, weight }));
  renderLoras();
  for (const [select, name] of [[$("#base-model"), request.base_model], [$("#refiner-model"), request.refiner_model]]) {
    select.value = [...select.options].some((option) => option.value === name) ? name : "";
  }
  // A recorded job keeps only its image's hash: say so, rather than silently rendering from noise.
  const recorded = request.init_image;
  $("#init-note").hidden = !recorded;
  $("#init-note").textContent = recorded
    ? `This job started from an image (${recorded.width} × ${recorded.height}, sha256 ` +
      `${String(recorded.sha256).slice(0, 12)}); drop it again to redo it.`
    : "";
  updateGroups();
  form.elements.n.value = 1;
  form.elements.seed.value = seed;
  $("#random-seed").checked = false;
  form.elements.prompt.focus();
}

// ---------------------------------------------------------------- starting from an image

// The dropped image is sent as a data: URL (init_image); the mask is painted on an offscreen canvas the size
// of the image and sent the same way (mask_image, white = repaint). The visible canvas shows both.
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("not an image the browser can read"));
    image.src = url;
  });
}

async function useInitFile(file) {
  if (!file) return;
  const error = $('[data-error-for="init_image"]');
  error.textContent = "";
  try {
    const dataUrl = await readFile(file);
    const image = await loadImage(dataUrl);
    state.init = { dataUrl, image, width: image.naturalWidth, height: image.naturalHeight };
  } catch (failure) {
    error.textContent = `init_image: ${failure.message}`;
    return;
  }
  state.mask = document.createElement("canvas");
  state.mask.width = state.init.width;
  state.mask.height = state.init.height;
  clearMask();
  // The result keeps the image's size (floored to multiples of 8, as the server does when none is sent).
  const form = $("#generate-form");
  const fit = Math.min(1, fieldMaximum("width") / Math.max(state.init.width, state.init.height));
  form.elements.size.value = "custom";
  $("#custom-size").hidden = false;
  form.elements.width.value = Math.max(64, Math.floor((state.init.width * fit) / 8) * 8);
  form.elements.height.value = Math.max(64, Math.floor((state.init.height * fit) / 8) * 8);
  $("#init-editor").hidden = false;
  $("#drop-zone").hidden = true;
  $("#init-note").hidden = true;
  updateGroups();
  drawEditor();
}

function fieldMaximum(name) {
  return state.schema.fields.find((field) => field.name === name).maximum;
}

function clearMask() {
  const context = state.mask.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, state.mask.width, state.mask.height);
  state.masked = false;
  drawEditor();
}

function removeInit() {
  state.init = state.mask = null;
  state.masked = false;
  $("#init-editor").hidden = true;
  $("#drop-zone").hidden = false;
  $("#init-file").value = "";
  updateGroups();
}

function drawEditor() {
  if (!state.init) return;
  const canvas = $("#init-canvas");
  canvas.width = state.init.width;
  canvas.height = state.init.height;
  const context = canvas.getContext("2d");
  context.drawImage(state.init.image, 0, 0);
  if (state.masked) {
    // The mask in translucent red: white (repaint) shows, black stays clear.
    const tint = document.createElement("canvas");
    tint.width = canvas.width;
    tint.height = canvas.height;
    const tinted = tint.getContext("2d");
    tinted.drawImage(state.mask, 0, 0);
    tinted.globalCompositeOperation = "multiply";
    tinted.fillStyle = "rgb(255, 60, 60)";
    tinted.fillRect(0, 0, tint.width, tint.height);
    context.globalAlpha = 0.5;
    context.globalCompositeOperation = "screen";
    context.drawImage(tint, 0, 0);
    context.globalAlpha = 1;
    context.globalCompositeOperation = "source-over";
  }
  $("#mask-state").textContent = state.masked
    ? "Only the painted (red) area is repainted; the rest stays exactly as it is."
    : "No mask: the whole image is redrawn. Paint on it to repaint only part.";
  $("#strength-value").textContent = $("#strength").value;
}

// One stroke segment from the previous pointer position (brush size in screen pixels, drawn in image pixels).
function paintAt(event, from) {
  const canvas = $("#init-canvas");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const point = [(event.clientX - box.left) * scale, (event.clientY - box.top) * scale];
  const context = state.mask.getContext("2d");
  context.strokeStyle = "white";
  context.lineCap = context.lineJoin = "round";
  context.lineWidth = Number($("#brush").value) * scale;
  context.beginPath();
  context.moveTo(...(from || point));
  context.lineTo(...point);
  context.stroke();
  state.masked = true;
  drawEditor();
  return point;
}

async function useMaskFile(file) {
  if (!file || !state.init) return;
  try {
    const image = await loadImage(await readFile(file));
    const context = state.mask.getContext("2d");
    context.drawImage(image, 0, 0, state.mask.width, state.mask.height); // stretched onto the image, as the server does
    state.masked = true;
  } catch (failure) {
    $('[data-error-for="mask_image"]').textContent = `mask_image: ${failure.message}`;
  }
  drawEditor();
}

function wireImageInputs() {
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    useInitFile(event.dataTransfer.files[0]);
  });
  $("#init-file").addEventListener("change", (event) => useInitFile(event.target.files[0]));
  $("#mask-file").addEventListener("change", (event) => useMaskFile(event.target.files[0]));
  $("#clear-mask").addEventListener("click", clearMask);
  $("#clear-init").addEventListener("click", removeInit);
  $("#strength").addEventListener("input", () => ($("#strength-value").textContent = $("#strength").value));
  const canvas = $("#init-canvas");
  let last = null; // the stroke's previous point while the pointer is down
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = paintAt(event, null);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last) last = paintAt(event, last);
  });
  canvas.addEventListener("pointerup", () => (last = null));
}

// ---------------------------------------------------------------- checkpoints

// The server's models folder (GET /v1/checkpoints) fills the model pickers; "" is the server's own pair.
async function loadCheckpoints() {
  const response = await api("/v1/checkpoints");
  if (!response.ok) return;
  const { default: own, checkpoints } = await response.json();
  const fill = (select, roles, ownName) => {
    const options = [new Option(`Server default (${ownName})`, "")];
    for (const entry of checkpoints.filter((item) => roles.includes(item.role))) {
      const note = entry.role === "inpainting" ? ", inpainting" : entry.sampling !== "epsilon" ? `, ${entry.sampling}` : "";
      options.push(new Option(`${entry.name}${note}`, entry.name));
    }
    select.replaceChildren(...options);
  };
  fill($("#base-model"), ["base", "inpainting"], own.base);
  fill($("#refiner-model"), ["refiner"], own.refiner);
  $("#model-row").hidden = checkpoints.length === 0;
}

// ---------------------------------------------------------------- upscaler models

// Hires fix may enlarge by an upscaler model of the server's folder (GET /v1/upscalers): listed after the
// built-in choices of the Hires upscaler field.
async function loadUpscalers() {
  const select = $("#hr_upscaler");
  if (!select) return;
  const response = await api("/v1/upscalers");
  if (!response.ok) return;
  const { models } = await response.json();
  for (const model of models) {
    if (![...select.options].some((option) => option.value === model.name)) {
      select.add(new Option(`${model.name} (${model.architecture} ×${model.scale})`, model.name));
    }
  }
}

// ---------------------------------------------------------------- ControlNet

// The server's ControlNet folder and preprocessors (the A1111 extension's routes) fill the unit's form; the map
// the ControlNet will see is shown before generating (POST /controlnet/detect).
async function loadControlNets() {
  const [models, modules] = await Promise.all([api("/controlnet/model_list"), api("/controlnet/module_list")]);
  if (!models.ok || !modules.ok) return;
  const { model_list: names } = await models.json();
  const { module_list: preprocessors, module_detail: detail } = await modules.json();
  state.controlSliders = detail || {};
  $("#control-model").replaceChildren(...names.map((name) => new Option(name, name)));
  $("#control-preprocessor").replaceChildren(...preprocessors.map((name) => new Option(name, name)));
  $("#control-empty").hidden = names.length > 0;
  $("#control-form").hidden = names.length === 0;
  showControlSliders();
}

// The preprocessor's own sliders (canny's thresholds, a blur's sigma...), named and bounded as the server's
// module list says, at their defaults whenever the preprocessor changes.
function showControlSliders() {
  const sliders = (state.controlSliders[$("#control-preprocessor").value] || {}).sliders || [];
  ["a", "b"].forEach((letter, index) => {
    const slider = sliders[index];
    $(`#control-slider-${letter}`).hidden = !slider;
    if (!slider) return;
    const input = $(`#control-threshold-${letter}`);
    $(`label[for="control-threshold-${letter}"]`).textContent = slider.name;
    Object.assign(input, { min: slider.min, max: slider.max, step: "any",
      value: slider.value });
  });
}

function controlSliders() {
  const values = {};
  ["a", "b"].forEach((letter) => {
    const input = $(`#control-threshold-${letter}`);
    if (!$(`#control-slider-${letter}`).hidden) values[`threshold_${letter}`] = Number(input.value);
  });
  return values;
}

async function showControlMap() {
  const error = $('[data-error-for="controlnets"]');
  error.textContent = "";
  if (!state.control) {
    $("#control-preview").hidden = true;
    return;
  }
  const sliders = controlSliders();
  const body = { controlnet_module: $("#control-preprocessor").value,
    controlnet_input_images: [state.control.dataUrl], controlnet_threshold_a: sliders.threshold_a,
    controlnet_threshold_b: sliders.threshold_b };
  const response = await api("/controlnet/detect", { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" } });
  if (!response.ok) {
    error.textContent = `controlnets: the map could not be made (${response.status})`;
    return;
  }
  const { images } = await response.json();
  $("#control-map").src = `data:image/png;base64,${images[0]}`;
  $("#control-preview").hidden = false;
}

async function useControlFile(file) {
  if (!file) return;
  try {
    state.control = { dataUrl: await readFile(file) };
  } catch (failure) {
    $('[data-error-for="controlnets"]').textContent = `controlnets: ${failure.message}`;
    return;
  }
  await showControlMap();
}

function clearControl() {
  state.control = null;
  $("#control-file").value = "";
  $("#control-preview").hidden = true;
}

// ---------------------------------------------------------------- image prompts (IP-Adapter)

async function loadIpAdapters() {
  const response = await api("/v1/ip-adapters");
  if (!response.ok) return;
  const { ip_adapters: names } = await response.json();
  $("#image-prompt-model").replaceChildren(...names.map((name) => new Option(name, name)));
  $("#image-prompt-empty").hidden = names.length > 0;
  $("#image-prompt-form").hidden = names.length === 0;
}

async function useReferenceFile(file) {
  if (!file) return;
  try {
    state.reference = { dataUrl: await readFile(file) };
  } catch (failure) {
    $('[data-error-for="image_prompts"]').textContent = `image_prompts: ${failure.message}`;
    return;
  }
  $("#image-prompt-thumb").src = state.reference.dataUrl;
  $("#image-prompt-preview").hidden = false;
}

function clearReference() {
  state.reference = null;
  $("#image-prompt-file").value = "";
  $("#image-prompt-preview").hidden = true;
}

// ---------------------------------------------------------------- LoRAs

// The server's LoRA folder (GET /v1/loras) fills the picker; chosen LoRAs go in the request's `loras`.
async function loadLoras() {
  const response = await api("/v1/loras");
  if (!response.ok) return;
  const { loras } = await response.json();
  const select = $("#lora-name");
  select.replaceChildren(...loras.map((lora) => new Option(lora.name, lora.name)));
  $("#lora-empty").hidden = loras.length > 0;
  $("#lora-add-row").hidden = loras.length === 0;
}

function renderLoras() {
  const list = $("#lora-list");
  list.replaceChildren(
    ...state.loras.map((lora, index) => {
      const item = document.createElement("li");
      const text = document.createElement("span");
      text.textContent = `${lora.name} × ${lora.weight}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "lora-remove";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove LoRA ${lora.name}`);
      remove.addEventListener("click", () => {
        state.loras.splice(index, 1);
        renderLoras();
      });
      item.append(text, remove);
      return item;
    }),
  );
}

function addLora() {
  const name = $("#lora-name").value;
  const weight = Number($("#lora-weight").value);
  if (!name || Number.isNaN(weight)) return;
  state.loras.push({ name, weight });
  renderLoras();
}

// ---------------------------------------------------------------- jobs being watched

function jobElement(id, prompt) {
  const element = $("#job-template").content.firstElementChild.cloneNode(true);
  element.dataset.job = id;
  $(".job-prompt", element).textContent = prompt;
  $(".cancel", element).addEventListener("click", async () => {
    $(".cancel", element).disabled = true;
    try {
      await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
    } catch (error) {
      $(".cancel", element).disabled = false;
    }
  });
  $("#jobs").prepend(element);
  $("#no-jobs").hidden = true;
  return element;
}

function describeProgress(progress) {
  const eta = progress.eta_seconds == null ? "" : `, about ${Math.ceil(progress.eta_seconds)} s left`;
  return `${progress.stage_name} step ${progress.step} of ${progress.total}${eta}`;
}

// One bar per stage: the base's steps, then the refiner's (each job reports its own stage, step and total).
function setStageBars(element, progress) {
  const share = progress.total ? (100 * progress.step) / progress.total : 0;
  $(".stage-base", element).value = progress.stage >= 2 ? 100 : progress.stage === 1 ? share : 0;
  $(".stage-refiner", element).value = progress.stage === 2 ? share : 0;
}

// The newest finished image, large, beside the form: where the eye already is.
async function showResult(id) {
  const response = await api(`/v1/jobs/${id}`);
  if (!response.ok) return;
  const job = await response.json();
  const image = await api(`/v1/images/${job.id}/${job.result.images[0]}`);
  if (!image.ok) return;
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(await image.blob());
  state.result = { job, index: 0 };
  $("#result-image").src = state.resultUrl;
  $("#result-image").alt = job.request.prompt;
  const more = job.result.images.length > 1 ? ` (1 of ${job.result.images.length}: the others are in the gallery)` : "";
  $("#result-caption").textContent = `${job.request.prompt} — seed ${job.result.seeds[0]}${more}`;
  $("#result").hidden = false;
}

// "Send to image to image / inpaint / upscale": the image becomes the start image, with its recipe in the form.
// Upscale (as Fooocus's "Upscale (2x)") enlarges it to twice its size, within the server's limit, and redraws
// it lightly through base and refiner; the user presses Generate.
const UPSCALE_STRENGTH = 0.35;

async function sendToStart(job, index, purpose) {
  if ($("#viewer").open) $("#viewer").close();
  fillForm(job.request, job.result.seeds[index]);
  const response = await api(`/v1/images/${job.id}/${job.result.images[index]}`);
  if (!response.ok) return;
  const blob = await response.blob();
  await useInitFile(new File([blob], job.result.images[index], { type: "image/png" }));
  if (purpose === "inpaint") {
    $("#mask-state").textContent = "Paint over the area to repaint: only that area is redrawn.";
    $("#init-canvas").focus();
  } else if (purpose === "upscale") {
    const form = $("#generate-form");
    const fit = Math.min(2, fieldMaximum("width") / Math.max(state.init.width, state.init.height));
    form.elements.width.value = Math.max(64, Math.floor((state.init.width * fit) / 8) * 8);
    form.elements.height.value = Math.max(64, Math.floor((state.init.height * fit) / 8) * 8);
    $("#strength").value = UPSCALE_STRENGTH;
    $("#strength-value").textContent = UPSCALE_STRENGTH;
    $("#mask-state").textContent = `Upscale: enlarged to ${form.elements.width.value} × ${form.elements.height.value} ` +
      `and redrawn lightly (strength ${UPSCALE_STRENGTH}); press Generate.`;
  }
  $("#start-image").scrollIntoView({ block: "center" });
}

function finishJob(id, status, error) {
  const watched = state.watching.get(id);
  if (!watched) return;
  const element = watched.element;
  state.watching.delete(id);
  $(".cancel", element).hidden = true;
  if (status === "succeeded") {
    setStageBars(element, { stage: 2, step: 1, total: 1 });
    $(".job-state", element).textContent = "Done";
    showResult(id);
    element.classList.add("succeeded");
    state.galleryOffset = 0;
    loadGallery();
    setTimeout(() => {
      element.remove();
      $("#no-jobs").hidden = state.watching.size > 0 || $("#jobs").children.length > 0;
    }, 1500);
  } else {
    element.classList.add(status);
    $(".job-state", element).textContent = status === "cancelled" ? "Cancelled" : `Failed: ${error || "unknown error"}`;
  }
}

function applyJobView(element, job) {
  if (job.status === "queued") {
    $(".job-state", element).textContent = `Queued, position ${job.position ?? "?"}`;
  } else if (job.status === "running") {
    $(".job-state", element).textContent = job.progress.step ? describeProgress(job.progress) : "Starting…";
    setStageBars(element, job.progress);
  }
}

function watchJob(id, prompt, initialState) {
  if (state.watching.has(id)) return;
  const element = jobElement(id, prompt);
  $(".job-state", element).textContent = initialState;
  const controller = new AbortController();
  state.watching.set(id, { element, controller });
  const onEvent = (event, data) => {
    if (event === "state") {
      applyJobView(element, data);
      if (["succeeded", "failed", "cancelled"].includes(data.status)) finishJob(id, data.status, data.error);
    } else if (event === "queued") {
      $(".job-state", element).textContent = `Queued, position ${data.position ?? "?"}`;
    } else if (event === "started") {
      $(".job-state", element).textContent = "Starting…";
    } else if (event === "progress") {
      setStageBars(element, data);
      $(".job-state", element).textContent = describeProgress(data);
    } else if (event === "preview") {
      const preview = $(".preview", element);
      preview.src = data.image;
      preview.hidden = false;
    } else if (event === "done") {
      finishJob(id, data.status, data.error);
    }
  };
  const follow = async () => {
    while (state.watching.has(id)) {
      try {
        await streamEvents(`/v1/jobs/${id}/events`, onEvent, controller.signal);
      } catch (error) {
        if (error instanceof Unauthorized) return;
      }
      if (state.watching.has(id)) await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };
  follow();
}

async function resumeActiveJobs() {
  for (const status of ["running", "queued"]) {
    const response = await api(`/v1/jobs?status=${status}&limit=50`);
    if (!response.ok) continue;
    for (const job of (await response.json()).items.reverse()) watchJob(job.id, job.request.prompt, "…");
  }
}

// ---------------------------------------------------------------- gallery and viewer

async function loadGallery() {
  const response = await api(`/v1/jobs?status=succeeded&limit=${PAGE_SIZE}&offset=${state.galleryOffset}`);
  if (!response.ok) return;
  const page = await response.json();
  const gallery = $("#gallery");
  state.blobUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  gallery.replaceChildren();
  for (const job of page.items) {
    for (const [index, name] of job.result.images.entries()) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thumb";
      button.dataset.job = job.id;
      const image = document.createElement("img");
      image.alt = `${job.request.prompt} (seed ${job.result.seeds[index]})`;
      const caption = document.createElement("span");
      caption.className = "caption";
      caption.textContent = job.request.prompt;
      const seed = document.createElement("span");
      seed.className = "caption seed";
      seed.textContent = `seed ${job.result.seeds[index]}`;
      button.append(image, caption, seed);
      button.addEventListener("click", () => openViewer(job, index));
      gallery.append(button);
      blobUrl(`/v1/images/${job.id}/${name}`).then((url) => (image.src = url)).catch(() => {});
    }
  }
  $("#no-images").hidden = page.total > 0;
  $("#pager").hidden = page.total <= PAGE_SIZE;
  const pages = Math.max(1, Math.ceil(page.total / PAGE_SIZE));
  $("#page-info").textContent = `Page ${Math.floor(state.galleryOffset / PAGE_SIZE) + 1} of ${pages}`;
  $("#newer").disabled = state.galleryOffset === 0;
  $("#older").disabled = state.galleryOffset + PAGE_SIZE >= page.total;
}

async function openViewer(job, index) {
  if (job.brief) {
    // Listings shorten prompts; the viewer shows (and "use these settings" reuses) the whole recipe.
    const response = await api(`/v1/jobs/${job.id}`);
    if (response.ok) job = await response.json();
  }
  state.viewing = { job, index };
  const metadata = job.result.metadata;
  const request = job.request;
  const rows = [
    ["Prompt", request.prompt],
    ["Negative prompt", request.negative_prompt || "—"],
    ["Seed", job.result.seeds[index]],
    ["Size", `${request.width} × ${request.height}`],
    ["Steps", `${metadata.base_steps} base + ${metadata.refiner_steps} refiner`],
    ["Guidance", request.guidance_scale],
    ["Sampler", `${request.sampler}, ${request.scheduler} schedule` +
      (request.refiner_sampler ? `; refiner ${request.refiner_sampler}, ${request.refiner_scheduler || request.scheduler}` : "")],
    ["LoRAs", (request.loras || []).map(({ name, weight }) => `${name} (${weight})`).join(", ") || "none"],
    ["Hires fix", !request.enable_hr ? "off" : `${request.hr_resize_x && request.hr_resize_y
      ? `to ${request.hr_resize_x} × ${request.hr_resize_y}` : `× ${request.hr_scale}`}, ${request.hr_upscaler}`],
    ["Mode", request.mode === "handoff" ? `handoff at ${request.switch_at}` : "sequential"],
    ["Refined", metadata.refined ? "yes" : `no: ${metadata.refinement_error || "refinement was turned off"}`],
    ["Device", `${metadata.device} (${metadata.precision})`],
    ["Timings", Object.entries(metadata.timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(", ")],
    ["Models", `${metadata.models.base} + ${metadata.models.refiner}`],
  ];
  const list = $("#viewer-meta");
  list.replaceChildren();
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }
  $("#viewer-title").textContent = request.prompt;
  const url = await blobUrl(`/v1/images/${job.id}/${job.result.images[index]}`);
  $("#viewer-image").src = url;
  $("#viewer-image").alt = request.prompt;
  $("#download").href = url;
  $("#download").download = `refinery-${job.result.seeds[index]}.png`;
  $("#viewer").showModal();
}

async function copySeed() {
  const seed = String(state.viewing.job.result.seeds[state.viewing.index]);
  try {
    await navigator.clipboard.writeText(seed);
  } catch (error) {
    const field = document.createElement("textarea");
    field.value = seed;
    document.body.append(field);
    field.select();
    document.execCommand("copy");
    field.remove();
  }
  $("#copy-seed").textContent = `Copied ${seed}`;
  setTimeout(() => ($("#copy-seed").textContent = "Copy seed"), 1500);
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("#generate-form").addEventListener("submit", submit);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("#app").hidden) submit(event);
  });
  $("#size").addEventListener("change", (event) => ($("#custom-size").hidden = event.target.value !== "custom"));
  $("#mode").addEventListener("change", (event) => ($("#switch-row").hidden = event.target.value !== "handoff"));
  $("#enable_hr").addEventListener("change", updateGroups);
  $("#dice").addEventListener("click", () => {
    $("#seed").value = Math.floor(Math.random() * (state.schema.max_seed + 1));
    $("#random-seed").checked = false;
  });
  $("#newer").addEventListener("click", () => {
    state.galleryOffset = Math.max(0, state.galleryOffset - PAGE_SIZE);
    loadGallery();
  });
  $("#older").addEventListener("click", () => {
    state.galleryOffset += PAGE_SIZE;
    loadGallery();
  });
  $("#lora-add").addEventListener("click", addLora);
  $("#control-file").addEventListener("change", (event) => useControlFile(event.target.files[0]));
  $("#control-preprocessor").addEventListener("change", () => {
    showControlSliders();
    showControlMap();
  });
  ["#control-threshold-a", "#control-threshold-b"].forEach((id) => $(id).addEventListener("change", showControlMap));
  $("#control-clear").addEventListener("click", clearControl);
  $("#image-prompt-file").addEventListener("change", (event) => useReferenceFile(event.target.files[0]));
  $("#image-prompt-clear").addEventListener("click", clearReference);
  wireImageInputs();
  $("#close-viewer").addEventListener("click", () => $("#viewer").close());
  $("#copy-seed").addEventListener("click", copySeed);
  $("#reuse").addEventListener("click", () => {
    const { job, index } = state.viewing;
    $("#viewer").close();
    fillForm(job.request, job.result.seeds[index]);
  });
  for (const purpose of ["img2img", "inpaint", "upscale"]) {
    $(`#send-${purpose}`).addEventListener("click", () => sendToStart(state.viewing.job, state.viewing.index, purpose));
    $(`#result-${purpose}`).addEventListener("click", () => sendToStart(state.result.job, state.result.index, purpose));
  }
  for (const button of ["#result-open", "#result-recipe"]) {
    $(button).addEventListener("click", () => openViewer(state.result.job, state.result.index));
  }
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = $("#api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, state.apiKey);
    start();
  });
}

wire();
start();
