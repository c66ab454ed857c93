// The sdtrt playground: reads the served models (GET v1/models), draws with the native API (POST v1/txt2img),
// follows its own request on the progress route (GET v1/progress?id=, the X-Request-Id it chose; the preview is
// the model's tiny VAE's where it has one) and cancels by aborting its request: the server stops the job at its
// next step.
// URLs are relative, so the page works behind a proxy that serves it under a path.
"use strict";

const KEY_STORAGE = "sdtrt-api-key"; // sessionStorage: the key lives as long as the tab
const POLL_MS = 300;
const $ = (id) => document.getElementById(id);

let catalogue = null; // the answer of GET v1/models
let drawing = null; // {id, controller} of the request in flight

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response.json();
  let message = `the server answered HTTP ${response.status}`;
  try {
    message = (await response.json()).error.message || message;
  } catch {
    // not sdtrt's JSON error (a proxy's page): keep the status line
  }
  throw new ApiError(response.status, message);
}

// -- the API key --------------------------------------------------------------------------------------------

function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("api-key").value = "";
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
}

$("key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  loadModels();
});

// -- the models and their options ---------------------------------------------------------------------------

async function loadModels() {
  try {
    catalogue = await api("v1/models");
  } catch (error) {
    if (error.status === 401) {
      setServerStatus("This server needs an API key.");
      askForKey(error.message);
    } else {
      setServerStatus(`The server cannot be reached: ${error.message}`);
      setTimeout(loadModels, 2000);
    }
    return;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(
    ...catalogue.data.map((model) => new Option(model.ready ? model.id : `${model.id} (loading)`, model.id)),
  );
  if (catalogue.data.some((model) => model.id === chosen)) select.value = chosen;
  const scheduler = $("scheduler");
  scheduler.replaceChildren(new Option("the model's own", ""), ...catalogue.schedulers.map((s) => new Option(s, s)));
  $("steps").max = catalogue.max_steps;
  if (!$("steps").value) $("steps").value = catalogue.defaults.num_inference_steps;
  if (!$("guidance").value) $("guidance").value = catalogue.defaults.guidance_scale;
  showModel();
  const loading = catalogue.data.filter((model) => !model.ready).map((model) => model.id);
  if (loading.length) {
    setServerStatus(`Loading ${loading.join(", ")}…`);
    setTimeout(loadModels, 2000);
  } else {
    setServerStatus(`${catalogue.data.length} model(s) served.`);
  }
}

function currentModel() {
  return catalogue && catalogue.data.find((model) => model.id === $("model").value);
}

function showModel() {
  const model = currentModel();
  if (!model || !model.ready) return;
  for (const side of ["width", "height"]) {
    const input = $(side);
    input.max = model.max_side;
    if (!input.value || input.dataset.model !== model.id) input.value = model[side];
    input.dataset.model = model.id;
  }
  $("num-images").max = model.max_images;
  $("lora-list").replaceChildren(...model.loras.map((name, i) => numberField(`lora-${i}`, name, "0", name)));
  $("loras").hidden = model.loras.length === 0;
  $("controlnet-list").replaceChildren(...model.controlnets.map(controlNetFields));
  $("controlnets").hidden = model.controlnets.length === 0;
}

function numberField(id, label, value, name) {
  const box = document.createElement("div");
  box.className = "field";
  const text = Object.assign(document.createElement("label"), { htmlFor: id, textContent: label });
  const input = Object.assign(document.createElement("input"), { id, type: "number", step: "0.05", value });
  input.dataset.name = name;
  box.append(text, input);
  return box;
}

function controlNetFields(name, i) {
  const box = document.createElement("div");
  box.className = "controlnet";
  box.dataset.name = name;
  const file = document.createElement("div");
  const label = Object.assign(document.createElement("label"), {
    htmlFor: `control-image-${i}`,
    textContent: `${name}: control image`,
  });
  const input = Object.assign(document.createElement("input"), { id: `control-image-${i}`, type: "file" });
  input.accept = "image/png,image/jpeg,image/webp";
  file.append(label, input);
  box.append(file, numberField(`control-weight-${i}`, `${name}: weight`, "1", name));
  return box;
}

$("model").addEventListener("change", showModel);

// -- drawing ------------------------------------------------------------------------------------------------

function numberOf(id, parse = Number) {
  const text = $(id).value.trim();
  return text === "" ? undefined : parse(text);
}

function randomSeed() {
  // below 2**53: a JavaScript number holds it exactly, so the seed shown is the seed used
  const [high, low] = crypto.getRandomValues(new Uint32Array(2));
  return (high & 0x1fffff) * 2 ** 32 + low;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name} could not be read`));
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const body = {
    model: $("model").value,
    prompt: $("prompt").value,
    width: numberOf("width", (t) => parseInt(t, 10)),
    height: numberOf("height", (t) => parseInt(t, 10)),
    num_images: numberOf("num-images", (t) => parseInt(t, 10)),
    num_inference_steps: numberOf("steps", (t) => parseInt(t, 10)),
    guidance_scale: numberOf("guidance"),
    seed: numberOf("seed", (t) => parseInt(t, 10)) ?? randomSeed(),
    scheduler: $("scheduler").value || undefined,
    negative_prompt: $("negative-prompt").value || undefined,
  };
  const loras = {};
  for (const input of $("lora-list").querySelectorAll("input")) {
    const scale = Number(input.value);
    if (input.value.trim() !== "" && scale !== 0) loras[input.dataset.name] = scale;
  }
  if (Object.keys(loras).length) body.loras = loras;
  const units = [...$("controlnet-list").querySelectorAll(".controlnet")].filter(
    (unit) => unit.querySelector("input[type=file]").files.length,
  );
  if (units.length) {
    body.controlnet = units.map((unit) => unit.dataset.name);
    body.control_image = await Promise.all(units.map((unit) => readFile(unit.querySelector("input[type=file]").files[0])));
    body.controlnet_conditioning_scale = units.map((unit) => Number(unit.querySelector("input[type=number]").value));
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (drawing) return;
  showError(null);
  let body;
  try {
    body = await requestBody();
  } catch (error) {
    showError(error.message);
    return;
  }
  const id = `playground-${randomSeed().toString(36)}`;
  drawing = { id, controller: new AbortController() };
  setBusy(true);
  followProgress(id);
  const started = performance.now();
  try {
    const answer = await api("v1/txt2img", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Request-Id": id },
      body: JSON.stringify(body),
      signal: drawing.controller.signal,
    });
    showResults(answer, body);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setStatus(`Drew ${answer.images.length} image(s) in ${seconds} s (seed ${body.seed}).`);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Cancelled.");
    } else if (error.status === 401) {
      askForKey(error.message);
    } else {
      showError(error.message);
    }
  } finally {
    drawing = null;
    setBusy(false);
  }
}

async function followProgress(id) {
  const label = $("progress-label");
  label.textContent = "Waiting…";
  $("progress").value = 0;
  $("preview").hidden = true;
  while (drawing && drawing.id === id) {
    try {
      const answer = await api(`v1/progress?id=${encodeURIComponent(id)}`);
      if (!drawing || drawing.id !== id) break;
      const job = answer.jobs[0];
      if (job.state === "queued") {
        label.textContent = "Waiting in the queue…";
      } else if (job.steps > 0) {
        $("progress").value = job.progress;
        label.textContent = `Step ${job.step} of ${job.steps}`;
        if (job.preview) {
          const source = job.preview_source === "tiny_vae" ? "the tiny VAE" : "a linear latent map";
          $("preview").src = `data:image/png;base64,${job.preview}`;
          $("preview").title = `After step ${job.preview_step}, by ${source}`;
          $("preview").hidden = false;
        }
      }
    } catch {
      // a missed poll is no error (404 before the request is queued): the next one may answer
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function cancel() {
  if (drawing) drawing.controller.abort();
}

function showResults(answer, body) {
  const template = $("result-template");
  const total = answer.timings.total;
  const items = answer.images.map((image, index) => {
    const item = template.content.firstElementChild.cloneNode(true);
    const url = `data:image/png;base64,${image}`;
    const img = item.querySelector(".result-image");
    img.src = url;
    img.alt = body.prompt;
    img.dataset.seed = String(body.seed);
    img.dataset.index = String(index);
    const size = `${body.width ?? "?"}×${body.height ?? "?"}`;
    const summary = `seed ${body.seed} · image ${index + 1} of ${answer.images.length} · ${answer.model} · ${size}`;
    item.querySelector(".result-summary").textContent = `${summary} · ${answer.scheduler} · ${total.toFixed(2)} s`;
    const timings = item.querySelector(".result-timings");
    for (const [stage, seconds] of Object.entries(answer.timings)) {
      const term = Object.assign(document.createElement("dt"), { textContent: stage });
      const value = Object.assign(document.createElement("dd"), { textContent: `${seconds.toFixed(3)} s` });
      timings.append(term, value);
    }
    const download = item.querySelector(".result-download");
    download.href = url;
    download.download = `sdtrt-${answer.model}-${body.seed}-${index}.png`;
    item.querySelector(".result-seed").addEventListener("click", () => {
      $("seed").value = String(body.seed);
      $("seed").focus();
    });
    return item;
  });
  $("gallery").prepend(...items); // the newest first, a request's images in their order
}

// -- state shown --------------------------------------------------------------------------------------------

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  $("progress-box").hidden = !busy;
  $("output").setAttribute("aria-busy", String(busy));
  if (busy) {
    setStatus("Drawing…");
    $("cancel").focus();
  } else if (document.activeElement === $("cancel") || document.activeElement === document.body) {
    $("generate").focus();
  }
}

function setStatus(text) {
  $("status").textContent = text;
}

function setServerStatus(text) {
  $("server-status").textContent = text;
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
  if (message) setStatus("");
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && $("form").contains(event.target)) {
    $("form").requestSubmit();
  } else if (event.key === "Escape" && drawing && !$("key-dialog").open) {
    cancel();
  }
});
loadModels();
