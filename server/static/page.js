"use strict";
// The page at /: photos to /predict (one) or /predict/batch (several), answers shown with bars, and feedback to
// /feedback. Same-origin requests only; no inline script or style (the page's CSP forbids them).

const MESSAGES = {
  payload_too_large: "This file is too big to upload. Try a smaller photo.",
  image_too_large: "This image has too many pixels for the service. Try a smaller photo.",
  invalid_image: "This file is not an image the service can read.",
  corrupt_image: "This image is damaged or cut off. Try another copy of it.",
  empty_image: "This file is empty.",
  unsupported_format: "This image format is not supported. Use JPEG, PNG, WebP, BMP or GIF.",
  unsupported_media_type: "The service could not read the upload. Choose the photo again.",
  too_many_files: "Too many photos at once. Choose fewer and try again.",
  model_not_loaded: "The service is not ready yet: no model is loaded. Try again in a minute.",
  network: "The service could not be reached. Check your connection and try again.",
};

const byId = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function capitalise(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function explain(error) {
  if (MESSAGES[error.code]) return MESSAGES[error.code];
  if (error.status === 503 || error.status === 429) {
    const wait = Number.parseInt(error.retryAfter || "", 10);
    return Number.isFinite(wait)
      ? `The service is busy. Try again in ${wait} second${wait === 1 ? "" : "s"}.`
      : "The service is busy. Try again in a moment.";
  }
  const detail = error.code ? ` (${error.code})` : error.status ? ` (HTTP ${error.status})` : "";
  return `Something went wrong${detail}. Try again.`;
}

async function errorOf(response) {
  const error = { status: response.status, retryAfter: response.headers.get("Retry-After"), code: "" };
  try {
    const body = await response.json();
    error.code = (body.error && body.error.code) || "";
  } catch (_) {
    // not JSON: the status alone explains it
  }
  return error;
}

function makeCard(file) {
  const card = element("li", "card pending");
  card.setAttribute("aria-busy", "true");
  const image = element("img", "thumb");
  image.alt = `Your photo ${file.name}`;
  image.src = URL.createObjectURL(file);
  image.addEventListener("load", () => URL.revokeObjectURL(image.src), { once: true });
  image.addEventListener("error", () => {
    URL.revokeObjectURL(image.src);
    image.replaceWith(element("div", "thumb none", "No preview"));
  }, { once: true });
  const body = element("div", "body");
  body.append(element("p", "file", file.name), element("p", "answer", "Classifying…"));
  card.append(image, body);
  card.fileName = file.name;
  return card;
}

function bar(label, probability) {
  const row = element("div", "bar");
  const track = element("span", "bar-track");
  const fill = element("span", `bar-fill ${label}`);
  fill.style.width = percent(probability); // CSSOM, allowed by the CSP (inline style attributes are not)
  track.setAttribute("aria-hidden", "true");
  track.append(fill);
  row.append(element("span", "bar-name", label), track, element("span", "bar-value", percent(probability)));
  return row;
}

function verdict(result) {
  if (typeof result.is_pet !== "boolean") return null; // null: the model has no pet output
  const score = typeof result.pet_score === "number" ? ` (pet score ${result.pet_score.toFixed(2)})` : "";
  return result.is_pet
    ? element("p", "verdict pet", `Looks like a pet${score}`)
    : element("p", "verdict not-pet", `This does not look like a cat or a dog${score}`);
}

function feedbackControls(result) {
  const box = element("div", "feedback");
  const thanks = element("span", "thanks");
  thanks.setAttribute("role", "status");
  const buttons = [];
  const send = async (label) => {
    buttons.forEach((button) => { button.disabled = true; });
    try {
      const response = await fetch("/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prediction_id: result.prediction_id, label }),
      });
      if (!response.ok) {
        const error = await errorOf(response);
        throw new Error(error.status === 404
          ? "This answer is too old for feedback: the service no longer remembers it."
          : explain(error));
      }
      thanks.textContent = `Thanks, recorded as ${label}.`;
    } catch (error) {
      thanks.className = "thanks failed";
      thanks.textContent = error instanceof TypeError ? MESSAGES.network : error.message;
      buttons.forEach((button) => { button.disabled = false; });
    }
  };
  const right = element("button", "right", "Yes, right");
  right.type = "button";
  right.addEventListener("click", () => send(result.label));
  buttons.push(right);
  for (const other of Object.keys(result.probabilities).filter((label) => label !== result.label)) {
    const wrong = element("button", "wrong", `This is wrong: it is a ${other}`);
    wrong.type = "button";
    wrong.dataset.testid = "wrong";
    wrong.addEventListener("click", () => send(other));
    buttons.push(wrong);
  }
  box.append(element("span", "ask", "Is this right?"), ...buttons, thanks);
  return box;
}

function showResult(card, result) {
  const body = card.querySelector(".body");
  const answer = element("p", "answer", capitalise(result.label));
  answer.dataset.testid = "label";
  answer.dataset.label = result.label;
  answer.append(element("span", "pct", percent(result.probabilities[result.label])));
  const bars = element("div", "bars");
  for (const [label, probability] of Object.entries(result.probabilities)) bars.append(bar(label, probability));
  const meta = element("p", "meta", `Model ${result.model_version} · ${Math.round(result.latency_ms)} ms`);
  body.replaceChildren(element("p", "file", card.fileName), answer, bars);
  const pet = verdict(result);
  if (pet) body.append(pet);
  body.append(meta);
  if (result.prediction_id) body.append(feedbackControls(result));
  card.classList.remove("pending");
  card.removeAttribute("aria-busy");
  return `${card.fileName}: ${result.label}, ${percent(result.probabilities[result.label])}`;
}

function showError(card, error) {
  const body = card.querySelector(".body");
  const message = explain(error);
  const text = element("p", "error", message);
  text.dataset.testid = "error";
  text.dataset.code = error.code || "";
  body.replaceChildren(element("p", "file", card.fileName), text);
  card.classList.add("failed");
  card.classList.remove("pending");
  card.removeAttribute("aria-busy");
  return `${card.fileName}: ${message}`;
}

async function classify(files) {
  const results = byId("results");
  const cards = files.map(makeCard);
  results.replaceChildren(...cards);
  byId("summary").textContent = `Classifying ${files.length} photo${files.length === 1 ? "" : "s"}…`;
  let lines;
  try {
    const form = new FormData();
    const single = files.length === 1;
    files.forEach((file) => form.append(single ? "file" : "files", file, file.name));
    const response = await fetch(single ? "/predict" : "/predict/batch", { method: "POST", body: form });
    if (!response.ok) {
      const error = await errorOf(response);
      lines = cards.map((card) => showError(card, error));
    } else if (single) {
      const result = await response.json();
      lines = [showResult(cards[0], result)];
    } else {
      const body = await response.json();
      lines = body.results.map((item, i) => (item.error
        ? showError(cards[i], { code: item.error.code, status: 200 })
        : showResult(cards[i], item)));
    }
  } catch (_) {
    lines = cards.map((card) => showError(card, { code: "network" }));
  }
  byId("summary").textContent = lines.join(". ");
}

async function checkService() {
  const status = byId("service");
  try {
    const response = await fetch("/ready");
    if (response.ok) {
      const body = await response.json();
      status.textContent = `Ready: model ${body.model_version} (${body.precision})`;
      status.className = "service ok";
    } else {
      status.textContent = explain(await errorOf(response));
      status.className = "service down";
    }
  } catch (_) {
    status.textContent = MESSAGES.network;
    status.className = "service down";
  }
}

function start() {
  const input = byId("file");
  const drop = byId("drop");
  input.addEventListener("change", () => {
    if (input.files.length) classify(Array.from(input.files));
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = Array.from(event.dataTransfer.files);
    if (files.length) classify(files);
  });
  checkService();
}

start();
