// The darkroom playground: a plain client of the public API, nothing more.
// POST /v1/generations, follow GET /v1/generations/{id}/events (status, progress, then the final job),
// show the images. The server is the only validator: its problem+json errors go next to their fields.

const form = document.getElementById("generate");
const fields = form.elements;
const byId = (id) => document.getElementById(id);
// Relative to the page, so the playground also works when the API is served under a path prefix.
const apiUrl = (path) => new URL(path, document.baseURI);

const QUEUE_POLL_MS = 1000; // SSE carries no queue position: re-read the job while it waits
// A field the page has no control for is reported on the control that decides it.
const FIELD_ALIASES = { width: "aspect_ratio", height: "aspect_ratio" };

let initImage = null; // data: URL of the chosen input image
let aspectBeforeImage = null; // the preset chosen before "match the input image" took over
let current = null; // { id, events, poll } of the job being followed

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
  if (fields.aspect_ratio.value) body.aspect_ratio = fields.aspect_ratio.value;
  if (fields.seed_locked.checked) body.seed = numberField("seed");
  if (initImage) {
    body.init_image = initImage;
    body.strength = numberField("strength");
  }
  return body;
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
    response = await fetch(apiUrl("v1/generations"), {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(requestBody()),
    });
    payload = await response.json().catch(() => null);
  } catch (error) {
    return fail(`Cannot reach the server (${error.message}).`);
  }
  if (!response.ok) return fail(showProblem(payload, response));
  follow(payload);
});

fields.prompt.addEventListener("keydown", (event) => {
  const ready = !byId("submit").disabled;
  if (ready && event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});

byId("cancel").addEventListener("click", async () => {
  if (!current) return;
  showStatus("Canceling…");
  await fetch(apiUrl(`v1/generations/${current.id}/cancel`), { method: "POST" }).catch(() => null);
  // The job's own event stream reports the outcome.
});

// --- following a job -------------------------------------------------------------------------------------

function follow(job) {
  const events = new EventSource(apiUrl(`v1/generations/${job.id}/events`));
  current = { id: job.id, events, poll: null };
  showJobStatus(job);
  events.addEventListener("status", (message) => {
    const { status } = JSON.parse(message.data);
    if (status !== "queued") stopPolling();
    if (status === "running") showStatus("Running…");
  });
  events.addEventListener("progress", (message) => showProgress(JSON.parse(message.data)));
  events.addEventListener("job", (message) => finish(JSON.parse(message.data)));
  events.addEventListener("error", async () => {
    // The browser reconnects (with Last-Event-ID) by itself; only a refused stream ends here.
    if (events.readyState !== EventSource.CLOSED || current?.id !== job.id) return;
    const latest = await readJob(job.id);
    if (latest?.status && ["succeeded", "failed", "canceled"].includes(latest.status)) return finish(latest);
    showAlert("Lost track of the job", `Its event stream was refused; ${job.id} may still finish.`);
    fail("Lost track of the job.");
  });
  if (job.status === "queued") {
    current.poll = setInterval(async () => {
      const latest = await readJob(job.id);
      if (latest && latest.status === "queued" && current?.id === job.id) showJobStatus(latest);
    }, QUEUE_POLL_MS);
  }
}

async function readJob(id) {
  const response = await fetch(apiUrl(`v1/generations/${id}`)).catch(() => null);
  return response?.ok ? response.json() : null;
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
  showList("warnings", job.warnings ?? []);
  if (job.status === "succeeded") {
    if (job.progress) showProgress(job.progress);
    showStatus(`Done: ${job.images.length} image${job.images.length === 1 ? "" : "s"}${elapsed(job)}.`);
    showImages(job);
  } else if (job.status === "canceled") {
    showStatus("Canceled.");
  } else {
    showStatus("Failed.");
    showAlert("Generation failed", job.error ? `${job.error.message} (${job.error.type})` : "");
  }
}

function stopPolling() {
  if (current?.poll) clearInterval(current.poll);
  if (current) current.poll = null;
}

function stopFollowing() {
  stopPolling();
  current?.events.close();
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
  for (const { field, message } of errors) {
    const name = field.split(".")[0];
    if (!placeFieldError(FIELD_ALIASES[name] ?? name, message)) {
      elsewhere.push(field === "body" ? message : `${field}: ${message}`);
    }
  }
  showAlert(problem.title, problem.detail ?? "", elsewhere);
  form.querySelector("[aria-invalid=true]")?.focus();
  return errors.length ? "Not submitted: fix the marked fields." : "Not submitted.";
}

function placeFieldError(name, message) {
  const slot = byId(`${name}-error`);
  if (!slot) return false;
  slot.textContent = slot.hidden ? message : `${slot.textContent} ${message}`;
  slot.hidden = false;
  fields[name]?.setAttribute("aria-invalid", "true");
  return true;
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

fields.init_image.addEventListener("change", async () => {
  const [file] = fields.init_image.files;
  if (!file) return clearImage();
  initImage = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  byId("init-preview-image").src = initImage;
  byId("init-preview").hidden = false;
  fields.strength.disabled = false;
  byId("match-image").disabled = false;
  if (fields.aspect_ratio.value) aspectBeforeImage = fields.aspect_ratio.value;
  fields.aspect_ratio.value = ""; // the API's default for image-to-image: keep the input image's shape
});

function clearImage() {
  initImage = null;
  fields.init_image.value = "";
  byId("init-preview").hidden = true;
  byId("init-preview-image").removeAttribute("src");
  fields.strength.disabled = true;
  byId("match-image").disabled = true;
  if (!fields.aspect_ratio.value) fields.aspect_ratio.value = aspectBeforeImage ?? "1:1";
}

byId("clear-image").addEventListener("click", clearImage);
fields.strength.addEventListener("input", () => {
  byId("strength-value").value = fields.strength.value;
});
