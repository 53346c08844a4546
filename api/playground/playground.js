// The darkroom playground: a plain client of the public API, nothing more.
// GET /v1/models for the model menu, POST /v1/generations, follow GET /v1/generations/{id}/events (status,
// progress, then the final job), show the images. The server is the only validator: its problem+json errors
// go next to their fields, in plain words (a LoRA name it does not offer too: no endpoint lists them, its
// answer does). After a generation the result is scrolled into view.
// With API keys on, every call carries `Authorization: Bearer <key>` — which `EventSource` cannot send, so
// the event stream is read with fetch and parsed here (see EventStreamParser).

const form = document.getElementById("generate");
const fields = form.elements;
const byId = (id) => document.getElementById(id);
// Relative to the page, so the playground also works when the API is served under a path prefix.
const apiUrl = (path) => new URL(path, document.baseURI);

const QUEUE_POLL_MS = 1000; // SSE carries no queue position: re-read the job while it waits
const POLL_MS = 1000; // following a job by reading it, when its event stream cannot be had
const POLL_MISSES = 5; // failed reads in a row before the page gives up on a job
const STREAM_RETRY_MS = 2000; // reconnection delay until the stream's own `retry:` field says otherwise
const STREAM_ATTEMPTS = 3; // connections in a row that deliver nothing before falling back to polling
const TERMINAL = ["succeeded", "failed", "canceled"];
const CUSTOM_SIZE = "custom"; // the size menu's entry for the width and height fields
// sessionStorage, never localStorage: the key is gone when the tab closes and is never put in a URL.
const KEY_STORAGE = "darkroom.apiKey";

let initImage = null; // data: URL of the chosen input image
let maskImage = null; // data: URL of the chosen inpainting mask (only ever with an input image)
let sentLoraRows = []; // the LoRA rows the last request sent, in order: `loras.1.name` is the second
let modelsLoad = null; // AbortController of the GET /v1/models in flight
let sizeBeforeImage = null; // { choice, width, height } before "match the input image" took over
let current = null; // { id, controller, poll } of the job being followed

// --- the API key -----------------------------------------------------------------------------------------

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return ""; // storage blocked (private mode, policies): the key just is not remembered
  }
}

function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // as above
  }
}

fields.api_key.value = storedKey();
fields.api_key.addEventListener("input", () => storeKey(fields.api_key.value.trim()));
fields.api_key.addEventListener("change", () => loadModels()); // the model list needs the key too

// fetch() for an API path, with the API key (if one was entered) as a bearer token.
function api(path, { headers = {}, ...options } = {}) {
  const key = fields.api_key.value.trim();
  if (key) headers = { ...headers, Authorization: `Bearer ${key}` };
  return fetch(apiUrl(path), { ...options, headers, cache: "no-store" });
}

// A 401: the key is missing or wrong. Says so next to the key field; returns the line for the status text.
function showKeyProblem(problem, outcome = "Not submitted") {
  byId("api_key-field").hidden = false; // in case the server's auth setting changed since the page loaded
  const entered = fields.api_key.value.trim() !== "";
  placeFieldError(
    "api_key",
    entered ? "The server did not accept this API key." : "This server needs an API key: enter it here.",
  );
  const detail = problem?.detail ?? "missing or invalid API key";
  showAlert(problem?.title ?? "Unauthorized", `${detail} — check the API key field.`);
  fields.api_key.focus();
  return `${outcome}: check the API key.`;
}

async function problemOf(response) {
  return response.json().catch(() => null);
}

// --- the request -----------------------------------------------------------------------------------------

function numberField(name) {
  const value = fields[name].value.trim();
  return value === "" ? undefined : Number(value); // empty: let the server apply its default
}

function requestBody() {
  const body = {
    prompt: fields.prompt.value,
    num_inference_steps: numberField("num_inference_steps"),
    guidance_scale: numberField("guidance_scale"),
    num_images: numberField("num_images"),
  };
  if (fields.negative_prompt.value.trim()) body.negative_prompt = fields.negative_prompt.value;
  if (fields.aspect_ratio.value === CUSTOM_SIZE) {
    body.width = numberField("width");
    body.height = numberField("height");
  } else if (fields.aspect_ratio.value) {
    body.aspect_ratio = fields.aspect_ratio.value;
  }
  if (fields.seed_locked.checked) body.seed = numberField("seed");
  if (!byId("model-field").hidden && fields.model.value) body.model = fields.model.value;
  const loras = loraRequest();
  if (loras.length) body.loras = loras;
  if (initImage) {
    body.init_image = initImage;
    body.strength = numberField("strength");
    if (maskImage) body.mask_image = maskImage;
  }
  return body;
}

// The filled-in LoRA rows as `loras` (a row without a name is left out); remembers which rows went.
function loraRequest() {
  sentLoraRows = [];
  const loras = [];
  for (const row of byId("lora-rows").children) {
    const name = row.querySelector(".lora-name").value.trim();
    if (!name) continue;
    const scale = row.querySelector(".lora-scale").value.trim();
    loras.push(scale === "" ? { name } : { name, scale: Number(scale) }); // empty: the server's default
    sentLoraRows.push(row);
  }
  return loras;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  stopFollowing();
  clearErrors();
  byId("gallery").replaceChildren();
  showList("warnings", []);
  showProgress(null);
  setBusy(true);
  showStatus("Submitting…");
  let response;
  let payload = null;
  try {
    response = await api("v1/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(requestBody()),
    });
    payload = await response.json().catch(() => null);
  } catch (error) {
    return fail(`Cannot reach the server (${error.message}).`);
  }
  if (response.status === 401) return fail(showKeyProblem(payload));
  if (!response.ok) return fail(showProblem(payload, response));
  follow(payload);
});

fields.prompt.addEventListener("keydown", (event) => {
  const ready = !byId("submit").disabled;
  if (ready && event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});

byId("cancel").addEventListener("click", async () => {
  const followed = current;
  if (!followed) return;
  showStatus("Canceling…");
  const response = await api(`v1/generations/${followed.id}/cancel`, {
    method: "POST",
    headers: { Accept: "application/json" },
  }).catch(() => null);
  if (response?.status === 401 && current === followed) {
    showStatus(showKeyProblem(await problemOf(response), "Not canceled"));
  }
  // Otherwise the job's own event stream reports the outcome.
});

// --- following a job -------------------------------------------------------------------------------------

function follow(job) {
  const followed = { id: job.id, controller: new AbortController(), poll: null };
  current = followed;
  showJobStatus(job);
  if (job.status === "queued") {
    followed.poll = setInterval(async () => {
      const latest = await readJob(followed);
      if (latest?.status === "queued" && current === followed) showJobStatus(latest);
    }, QUEUE_POLL_MS);
  }
  streamJob(followed);
}

// The job's event stream, read with fetch: reconnects after a dropped connection (resuming after the last
// event id, like EventSource), and falls back to reading the job when the stream is refused or keeps failing.
async function streamJob(followed) {
  const stream = { lastEventId: "", retryMs: STREAM_RETRY_MS };
  let fruitless = 0; // connections in a row that delivered no event
  while (current === followed) {
    let response = null;
    let delivered = false;
    try {
      const headers = { Accept: "text/event-stream" };
      if (stream.lastEventId) headers["Last-Event-ID"] = stream.lastEventId;
      response = await api(`v1/generations/${followed.id}/events`, {
        headers,
        signal: followed.controller.signal,
      });
      if (response.ok && isEventStream(response)) {
        const parser = new EventStreamParser(stream, (message) => {
          delivered = true;
          onStreamEvent(followed, message);
        });
        await readEventStream(response.body, parser);
      }
    } catch {
      // Aborted (the job is over, or another took its place) or a network error: a dropped connection.
    }
    if (current !== followed) return;
    if (response?.status === 401) return fail(showKeyProblem(await problemOf(response), "Stopped"));
    if (response && (!response.ok || !isEventStream(response))) return pollJob(followed); // refused
    fruitless = delivered ? 0 : fruitless + 1;
    if (fruitless >= STREAM_ATTEMPTS) return pollJob(followed);
    await pause(stream.retryMs, followed.controller.signal);
  }
}

function isEventStream(response) {
  return (response.headers.get("Content-Type") ?? "").split(";")[0].trim() === "text/event-stream";
}

function onStreamEvent(followed, message) {
  let data;
  try {
    data = JSON.parse(message.data);
  } catch {
    return; // not ours to understand
  }
  if (message.type === "status") {
    if (data.status !== "queued") stopPolling(followed);
    if (data.status === "running") showStatus("Running…");
  } else if (message.type === "progress") {
    showProgress(data);
  } else if (message.type === "job") {
    finish(data);
  }
}

// Reads a byte stream to its end, feeding the parser text (UTF-8, as the format requires).
async function readEventStream(body, parser) {
  const reader = body.getReader();
  const decoder = new TextDecoder(); // drops a leading byte order mark, as the format says
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
    }
    parser.push(decoder.decode());
  } finally {
    reader.releaseLock();
  }
}

// The "text/event-stream" format, as the HTML standard parses it: lines end in CRLF, LF or CR; a line
// "field: value" (one optional space after the colon) or "field"; ":" starts a comment; a blank line
// dispatches the event gathered so far. An event cut off before its blank line is never dispatched.
// `stream` outlives one connection: it carries the last event id and the reconnection delay.
class EventStreamParser {
  constructor(stream, onEvent) {
    this.stream = stream;
    this.onEvent = onEvent;
    this.buffer = "";
    this.lineEnd = /\r\n|\r|\n/g;
    this.type = "";
    this.data = "";
    this.id = stream.lastEventId;
  }

  push(text) {
    this.buffer += text;
    this.lineEnd.lastIndex = 0;
    let start = 0;
    for (let match; (match = this.lineEnd.exec(this.buffer)); ) {
      // A CR at the very end may be the first half of a CRLF whose LF is still on its way.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      this.line(this.buffer.slice(start, match.index));
      start = this.lineEnd.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return; // a comment (the server's keep-alive pings)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data += `${value}\n`;
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^[0-9]+$/.test(value)) this.stream.retryMs = Number(value);
  }

  dispatch() {
    this.stream.lastEventId = this.id;
    const { type, data } = this;
    this.type = "";
    this.data = "";
    if (data === "") return;
    this.onEvent({ type: type || "message", data: data.slice(0, -1), lastEventId: this.id });
  }
}

// Following a job by reading it, once its event stream cannot be had.
async function pollJob(followed) {
  stopPolling(followed); // this loop shows the queue position too
  let misses = 0;
  while (current === followed) {
    const response = await api(`v1/generations/${followed.id}`, {
      headers: { Accept: "application/json" },
      signal: followed.controller.signal,
    }).catch(() => null);
    if (current !== followed) return;
    const job = response?.ok ? await response.json().catch(() => null) : null;
    if (response?.status === 401) return fail(showKeyProblem(await problemOf(response), "Stopped"));
    if (job && TERMINAL.includes(job.status)) return finish(job);
    // A 4xx other than "try later" (e.g. 404: the job is gone) will not change by asking again.
    const final = response?.status >= 400 && response.status < 500 && ![408, 429].includes(response.status);
    if (job) {
      misses = 0;
      showJobStatus(job);
    } else if (final || ++misses >= POLL_MISSES) {
      const detail = `Neither its events nor the job could be read; ${followed.id} may still finish.`;
      showAlert("Lost track of the job", detail);
      return fail("Lost track of the job.");
    }
    await pause(POLL_MS, followed.controller.signal);
  }
}

async function readJob(followed) {
  const response = await api(`v1/generations/${followed.id}`, {
    headers: { Accept: "application/json" },
    signal: followed.controller.signal,
  }).catch(() => null);
  return response?.ok ? response.json().catch(() => null) : null;
}

// Resolves after `ms`, or at once when the job stops being followed.
function pause(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

function showJobStatus(job) {
  if (job.status === "queued") {
    showStatus(job.queue_position ? `Queued — position ${job.queue_position}` : "Queued");
  } else if (job.status === "running") {
    showStatus("Running…");
  }
  if (job.progress) showProgress(job.progress);
}

function finish(job) {
  stopFollowing();
  setBusy(false);
  loadModels(); // the ready-worker counts may have moved on since the page loaded
  showList("warnings", job.warnings ?? []);
  if (job.status === "succeeded") {
    if (job.progress) showProgress(job.progress);
    showStatus(`Done: ${job.images.length} image${job.images.length === 1 ? "" : "s"}${elapsed(job)}.`);
    showImages(job);
    revealResult();
  } else if (job.status === "canceled") {
    showStatus("Canceled.");
  } else {
    showStatus("Failed.");
    showAlert("Generation failed", job.error ? `${job.error.message} (${job.error.type})` : "");
  }
}

function stopPolling(followed) {
  if (followed.poll) clearInterval(followed.poll);
  followed.poll = null;
}

function stopFollowing() {
  if (!current) return;
  stopPolling(current);
  current.controller.abort();
  current = null;
}

function elapsed(job) {
  if (!job.started_at || !job.completed_at) return "";
  const seconds = (Date.parse(job.completed_at) - Date.parse(job.started_at)) / 1000;
  return ` in ${seconds.toFixed(1)} s`;
}

// --- results ---------------------------------------------------------------------------------------------

function showImages(job) {
  const items = job.images.map((image, index) => {
    if (!image.url) {
      // Withheld by the content filter: say so in the image's place, never show a broken or blank image.
      const reason = image.filter_reason ? ` (${image.filter_reason})` : "";
      return element("li", {}, [
        element("figure", { className: "withheld" }, [
          element("p", {}, [`Image ${index + 1}, seed ${image.seed}: withheld by the content filter${reason}.`]),
        ]),
      ]);
    }
    const extension = image.content_type.split("/")[1].replace("jpeg", "jpg");
    const figure = element("figure", {}, [
      element("a", { href: image.url, target: "_blank", rel: "noopener" }, [
        element("img", {
          src: image.url,
          width: image.width,
          height: image.height,
          alt: `Image ${index + 1} of ${job.images.length}, seed ${image.seed}: ${job.request.prompt}`,
        }),
      ]),
      element("figcaption", {}, [
        element("span", { className: "seed" }, [`Seed ${image.seed}`]),
        element("span", { className: "size" }, [`${image.width}×${image.height}`]),
        element("button", {
          type: "button",
          className: "reuse-seed",
          "aria-label": `Reuse seed ${image.seed}`,
        }, ["Reuse seed"]),
        element("a", {
          className: "download",
          href: image.url,
          download: `darkroom-${image.seed}.${extension}`,
        }, ["Download"]),
      ]),
    ]);
    figure.querySelector(".reuse-seed").addEventListener("click", () => reuseSeed(image.seed));
    return element("li", {}, [figure]);
  });
  byId("gallery").replaceChildren(...items);
}

// The finished images in view: after a long form the Generate button sits far below the result panel. The
// status line (a live region) has announced "Done"; focus moves to the result's heading only when nothing
// else holds it (the Generate button was disabled while the job ran), never out of a field being edited.
function revealResult() {
  const panel = byId("output");
  const first = byId("gallery").firstElementChild ?? panel;
  const box = first.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) {
    const reduce = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    panel.scrollIntoView({ block: "start", behavior: reduce ? "auto" : "smooth" });
  }
  const focused = document.activeElement;
  if (!focused || focused === document.body || focused.disabled || focused.closest("[hidden]")) {
    byId("output-heading").focus({ preventScroll: true });
  }
}

function reuseSeed(seed) {
  fields.seed_locked.checked = true;
  syncSeed();
  fields.seed.value = String(seed);
  fields.seed.focus();
}

// --- errors ----------------------------------------------------------------------------------------------

// Shows a problem+json answer; returns the line for the status text.
function showProblem(problem, response) {
  if (!problem || typeof problem !== "object" || !problem.title) {
    showAlert(`The server answered ${response.status}`, response.statusText);
    return "Not submitted.";
  }
  const elsewhere = [];
  const errors = problem.errors ?? [];
  // Only an inline image makes a body that big: say so where the image was chosen.
  if (problem.code === "payload_too_large" && initImage) {
    errors.push({ field: "init_image", message: problem.detail });
  }
  for (const { field, message, type } of errors) {
    const name = field.split(".")[0];
    if (name === "loras") {
      placeLoraError(field, message);
    } else if (!placeFieldError(name, plainMessage({ field, message, type }))) {
      elsewhere.push(field === "body" ? message : `${field}: ${message}`);
    }
  }
  showAlert(problem.title, problem.detail ?? "", elsewhere);
  form.querySelector("[aria-invalid=true]")?.focus();
  return errors.length ? "Not submitted: fix the marked fields." : "Not submitted.";
}

// Plain words for the validation errors the API words in its library's terms ("String should have at least
// 1 character"): by field and type first, then by type alone (the limit read from the library's message).
// The API's own messages (sizes, seeds, LoRA names) are already plain and pass through, as does anything
// these tables do not know.
const PLAIN_BY_FIELD = {
  "prompt:string_too_short": () => "Write a prompt.",
  "prompt:missing": () => "Write a prompt.",
};
const PLAIN_BY_TYPE = {
  greater_than_equal: (message) => withLimit(message, (limit) => `Must be at least ${limit}.`),
  less_than_equal: (message) => withLimit(message, (limit) => `Must be at most ${limit}.`),
  greater_than: (message) => withLimit(message, (limit) => `Must be more than ${limit}.`),
  less_than: (message) => withLimit(message, (limit) => `Must be less than ${limit}.`),
  string_too_long: (message) => withLimit(message, (limit) => `Too long: at most ${limit} characters.`),
  int_type: () => "Enter a whole number.",
  int_parsing: () => "Enter a whole number.",
  int_from_float: () => "Enter a whole number.",
  float_type: () => "Enter a number.",
  float_parsing: () => "Enter a number.",
  finite_number: () => "Enter a number.",
  missing: () => "Fill this in.",
};

function plainMessage({ field, message, type }) {
  const words = PLAIN_BY_FIELD[`${field}:${type}`] ?? PLAIN_BY_TYPE[type];
  return words?.(message) ?? message;
}

// The last number in a library message ("... greater than or equal to 1"), or null (then the message stays).
function withLimit(message, words) {
  const numbers = String(message).match(/-?\d+(?:\.\d+)?/g);
  return numbers ? words(numbers[numbers.length - 1]) : null;
}

function placeFieldError(name, message) {
  const slot = byId(`${name}-error`);
  if (!slot || slot.parentElement.closest("[hidden]")) return false; // no control shown for it here
  slot.textContent = slot.hidden ? message : `${slot.textContent} ${message}`;
  slot.hidden = false;
  fields[name]?.setAttribute("aria-invalid", "true");
  return true;
}

// `loras.1.name` (e.g. lora_not_found, which lists the names on offer): the message under the adapters,
// and the row's own input marked.
function placeLoraError(field, message) {
  placeFieldError("loras", message);
  const [, index, part] = field.split(".");
  const row = sentLoraRows[Number(index)];
  const control = row?.querySelector(part === "scale" ? ".lora-scale" : ".lora-name");
  control?.setAttribute("aria-invalid", "true");
}

function clearErrors() {
  for (const slot of form.querySelectorAll(".error")) {
    slot.hidden = true;
    slot.textContent = "";
  }
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  byId("alert").hidden = true;
}

function showAlert(title, detail, items = []) {
  const alert = byId("alert");
  alert.replaceChildren(element("strong", {}, [title]), detail ? ` ${detail}` : "");
  if (items.length) alert.append(element("ul", {}, items.map((item) => element("li", {}, [item]))));
  alert.hidden = false;
}

function fail(statusText) {
  stopFollowing();
  setBusy(false);
  showStatus(statusText);
}

// --- small view helpers ----------------------------------------------------------------------------------

function showStatus(text) {
  byId("status").textContent = text;
}

function showProgress(progress) {
  const bar = byId("progress");
  bar.hidden = !progress;
  if (!progress) return;
  bar.max = progress.total;
  bar.value = progress.step;
  bar.setAttribute("aria-valuetext", `step ${progress.step} of ${progress.total}`);
  if (current) showStatus(`Running — step ${progress.step}/${progress.total}`);
}

function showList(id, lines) {
  const list = byId(id);
  list.replaceChildren(...lines.map((line) => element("li", {}, [line])));
  list.hidden = lines.length === 0;
}

function setBusy(busy) {
  byId("submit").disabled = busy;
  byId("submit").textContent = busy ? "Generating…" : "Generate";
  byId("cancel").hidden = !busy;
}

function element(tag, properties, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(properties)) {
    if (key in node && !key.includes("-")) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// --- seed lock and image-to-image ------------------------------------------------------------------------

function syncSeed() {
  const locked = fields.seed_locked.checked;
  fields.seed.disabled = !locked;
  byId("seed-hint").textContent = locked
    ? "Locked: every run uses this seed."
    : "Unlocked: a new random seed every run.";
}

fields.seed_locked.addEventListener("change", syncSeed);
syncSeed();

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

fields.init_image.addEventListener("change", async () => {
  const [file] = fields.init_image.files;
  if (!file) return clearImage();
  initImage = await readDataUrl(file);
  byId("init-preview-image").src = initImage;
  byId("init-preview").hidden = false;
  fields.strength.disabled = false;
  fields.mask_image.disabled = false;
  byId("match-image").disabled = false;
  if (fields.aspect_ratio.value) {
    sizeBeforeImage = {
      choice: fields.aspect_ratio.value,
      width: fields.width.value,
      height: fields.height.value,
    };
  }
  fields.aspect_ratio.value = ""; // the API's default for image-to-image: keep the input image's shape
  syncSizeFields();
});

function clearImage() {
  initImage = null;
  fields.init_image.value = "";
  byId("init-preview").hidden = true;
  byId("init-preview-image").removeAttribute("src");
  clearMask(); // a mask applies to its input image only
  fields.mask_image.disabled = true;
  fields.strength.disabled = true;
  byId("match-image").disabled = true;
  if (!fields.aspect_ratio.value) {
    const before = sizeBeforeImage ?? { choice: "1:1" };
    fields.aspect_ratio.value = before.choice;
    if (before.choice === CUSTOM_SIZE) {
      fields.width.value = before.width;
      fields.height.value = before.height;
    }
    syncSizeFields();
  }
}

byId("clear-image").addEventListener("click", clearImage);
fields.strength.addEventListener("input", () => {
  byId("strength-value").value = fields.strength.value;
});

// --- size: a preset or width and height ---------------------------------------------------------------------

// A preset shows its size in the width and height fields; "match the input image" leaves them empty.
function syncSizeFields() {
  const option = fields.aspect_ratio.selectedOptions[0];
  if (fields.aspect_ratio.value === CUSTOM_SIZE) return; // the fields hold the size to send
  fields.width.value = option?.dataset.width ?? "";
  fields.height.value = option?.dataset.height ?? "";
}

fields.aspect_ratio.addEventListener("change", syncSizeFields);
for (const side of [fields.width, fields.height]) {
  // Typing a size is choosing one: the request sends width and height instead of a preset.
  side.addEventListener("input", () => {
    fields.aspect_ratio.value = CUSTOM_SIZE;
  });
}

// --- inpainting ------------------------------------------------------------------------------------------

fields.mask_image.addEventListener("change", async () => {
  const [file] = fields.mask_image.files;
  if (!file) return clearMask();
  maskImage = await readDataUrl(file);
  byId("mask-preview-image").src = maskImage;
  byId("mask-preview").hidden = false;
  syncStrengthHint();
});

function clearMask() {
  maskImage = null;
  fields.mask_image.value = "";
  byId("mask-preview").hidden = true;
  byId("mask-preview-image").removeAttribute("src");
  syncStrengthHint();
}

function syncStrengthHint() {
  byId("strength-hint").textContent = maskImage
    ? "How far to repaint the masked area (1 = from noise)."
    : "How far to move away from the input image (1 = ignore it).";
}

byId("clear-mask").addEventListener("click", clearMask);

// --- LoRA adapters ---------------------------------------------------------------------------------------

function addLoraRow() {
  const row = byId("lora-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".remove-lora").addEventListener("click", () => {
    row.remove();
    syncLoraRows();
    byId("add-lora").focus();
  });
  byId("lora-rows").append(row);
  syncLoraRows();
  row.querySelector(".lora-name").focus();
}

// Numbers the rows' labels ("LoRA 2 scale") and stops adding at the request's limit.
function syncLoraRows() {
  const list = byId("lora-rows");
  [...list.children].forEach((row, index) => {
    row.querySelector(".lora-name").setAttribute("aria-label", `LoRA ${index + 1} name`);
    row.querySelector(".lora-scale").setAttribute("aria-label", `LoRA ${index + 1} scale`);
    row.querySelector(".remove-lora").setAttribute("aria-label", `Remove LoRA ${index + 1}`);
  });
  byId("add-lora").disabled = list.children.length >= Number(list.dataset.max);
}

byId("add-lora").addEventListener("click", addLoraRow);

// --- models ----------------------------------------------------------------------------------------------

// Fills the model menu from GET /v1/models (with the key, when there is one). The menu shows only when the
// server accepts more than one model; until then (no key yet, one model) requests name none: the default.
// A failed reload keeps the menu as it was, so a passing fault never drops the model chosen.
async function loadModels() {
  modelsLoad?.abort();
  const load = new AbortController();
  modelsLoad = load;
  let models = null;
  try {
    const response = await api("v1/models", { headers: { Accept: "application/json" }, signal: load.signal });
    const list = response.ok ? await response.json() : null;
    if (Array.isArray(list?.data)) models = list.data;
  } catch {
    // aborted by a newer load, or the server cannot be reached: a generation request will say so
  }
  if (modelsLoad !== load) return;
  modelsLoad = null;
  if (models) showModels(models);
}

function showModels(models) {
  const select = fields.model;
  const chosen = select.value;
  select.replaceChildren(
    ...models.map((model) => {
      const option = element("option", { value: model.id }, [modelLabel(model)]);
      option.dataset.ready = String(model.ready_workers ?? "");
      return option;
    }),
  );
  const keep = models.find((model) => model.id === chosen) ?? models.find((model) => model.default);
  if (keep) select.value = keep.id;
  byId("model-field").hidden = models.length < 2;
  syncModelHint();
}

function modelLabel(model) {
  const ready = model.ready_workers;
  const parts = [`${ready} worker${ready === 1 ? "" : "s"} ready`];
  if (model.queued) parts.push(`${model.queued} queued`);
  return `${model.id}${model.default ? " (default)" : ""} — ${parts.join(", ")}`;
}

function syncModelHint() {
  const hint = byId("model-hint");
  const option = fields.model.selectedOptions[0];
  hint.hidden = option?.dataset.ready !== "0";
  hint.textContent = "No worker holds this model right now: its jobs wait until one starts.";
}

fields.model.addEventListener("change", syncModelHint);
loadModels();
