// The console's script. Pages are shells; their data is HTML rendered by the server at /ui/fragments/..., fetched
// here with the bearer token the user pasted (kept in sessionStorage: this tab only, never a cookie). Forms and
// buttons call the API itself. No framework, no build step.
"use strict";

const TOKEN_KEY = "cbd-token";
const main = document.getElementById("content");
const tokenForm = document.getElementById("token-form");
const authOn = document.body.dataset.auth === "on";
let refreshTimer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path, body) {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) {
    askForToken(token() ? "The service refused that token (unknown, revoked or mistyped): paste another." : null);
    throw new Error("unauthorized");
  }
  return response;
}

async function problem(response) {
  try {
    const body = await response.json();
    return body.detail || body.title || response.statusText;
  } catch (error) {
    return `${response.status} ${response.statusText}`;
  }
}

function askForToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(refreshTimer);
  main.replaceChildren();
  document.getElementById("session").hidden = true;
  if (message) document.getElementById("token-message").textContent = message;
  tokenForm.hidden = false;
  document.getElementById("token-input").focus();
}

async function load() {
  clearTimeout(refreshTimer);
  if (authOn && !token()) return askForToken(null);
  tokenForm.hidden = true;
  document.getElementById("session").hidden = !token();
  let response;
  try {
    response = await api("GET", main.dataset.fragment);
  } catch (error) {
    return;
  }
  if (!response.ok || !(response.headers.get("content-type") || "").startsWith("text/html")) {
    const alert = document.createElement("p");
    alert.className = "error";
    alert.setAttribute("role", "alert");
    alert.textContent = response.ok ? "not a page of the console" : await problem(response);
    main.replaceChildren(alert);
    return;
  }
  const focused = document.activeElement && document.activeElement.id;
  main.innerHTML = await response.text();  // rendered by the server's templates, every value escaped there
  if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
  wire();
  const refresh = main.querySelector("[data-refresh]");
  if (refresh) refreshTimer = setTimeout(load, Number(refresh.dataset.refresh));
}

function wire() {
  const form = document.getElementById("request-form");
  if (form) wireRequest(form);
  for (const point of main.querySelectorAll(".pt")) wirePoint(point);
}

// --- the request form: the plan before submitting, then POST /models ---------------------------------------------

function requestBody(form) {
  const f = form.elements;
  const body = {chain: form.dataset.chain, size: Number(f.size.value), mix: f.mix.value, dtype: f.dtype.value,
                init: f.init.value};
  body.alpha = f.alpha_mode.value === "number" ? Number(f.alpha_value.value) : f.alpha_mode.value;
  const steps = Number(f.heal_steps.value);
  if (steps > 0) body.heal = {steps};
  return body;
}

function humanParams(count) {
  for (const [unit, scale] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (Math.abs(count) >= scale) return `${Number((count / scale).toPrecision(3))}${unit}`;
  }
  return String(count);
}

function duration(seconds) {
  if (seconds < 1) return "under a second";
  seconds = Math.round(seconds);
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${seconds % 60} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function wireRequest(form) {
  const range = document.getElementById("size-range");
  const size = form.elements.size;
  const error = document.getElementById("request-error");
  const plan = document.getElementById("plan");
  let timer = null;
  let asked = 0;

  async function showPlan() {
    const mine = ++asked;
    document.getElementById("size-human").textContent = "≈ " + humanParams(Number(size.value));
    let response;
    try {
      response = await api("POST", "/models/plan", requestBody(form));
    } catch (e) {
      return;
    }
    if (mine !== asked) return;  // a later change is being planned
    if (!response.ok) {
      plan.hidden = true;
      error.textContent = await problem(response);
      return;
    }
    const p = await response.json();
    const s = p.shape;
    error.textContent = "";
    plan.querySelector('[data-plan="shape"]').textContent =
      `${s.num_layers} layers, hidden ${s.hidden_size}, ${s.num_heads} heads (${s.num_kv_heads} key-value), FFN ${s.intermediate_size}`;
    plan.querySelector('[data-plan="params"]').textContent = p.params.toLocaleString("en-US");
    plan.querySelector('[data-plan="estimate"]').textContent = `about ${duration(p.estimated_seconds)} (${p.queue} queue)`;
    const existing = plan.querySelector('[data-plan="existing"]');
    existing.replaceChildren();
    if (p.existing) {
      const link = document.createElement("a");
      link.href = `/ui/models/${p.existing.id}`;
      link.textContent = p.existing.id;
      existing.append("yes: ", link, ` (${p.existing.status}); submitting opens it`);
    } else {
      existing.textContent = "no: submitting makes it";
    }
    plan.hidden = false;
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(showPlan, 250);
  }

  range.addEventListener("input", () => { size.value = range.value; schedule(); });
  size.addEventListener("input", () => { range.value = size.value; schedule(); });
  form.elements.alpha_mode.addEventListener("change", () => {
    form.elements.alpha_value.disabled = form.elements.alpha_mode.value !== "number";
  });
  form.addEventListener("change", schedule);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const response = await api("POST", "/models", requestBody(form));
      if (!response.ok) {
        error.textContent = await problem(response);
        return;
      }
      const model = await response.json();
      location.assign(response.status === 200 || !model.job ? `/ui/models/${model.id}` : `/ui/jobs/${model.job.id}`);
    } catch (e) {
      return;
    } finally {
      button.disabled = false;
    }
  });
  showPlan();
}

// --- charts: the numbers of a point on hover or focus -------------------------------------------------------------

const tooltip = document.getElementById("tooltip");

function wirePoint(point) {
  const show = () => {
    const box = point.getBoundingClientRect();
    tooltip.textContent = point.getAttribute("aria-label");
    tooltip.hidden = false;
    tooltip.style.left = `${window.scrollX + box.left + box.width / 2}px`;
    tooltip.style.top = `${window.scrollY + box.top - 8}px`;
  };
  const hide = () => { tooltip.hidden = true; };
  point.addEventListener("mouseenter", show);
  point.addEventListener("focus", show);
  point.addEventListener("mouseleave", hide);
  point.addEventListener("blur", hide);
}

// --- buttons and links inside fragments ----------------------------------------------------------------------------

main.addEventListener("click", async (event) => {
  const cancel = event.target.closest("[data-cancel]");
  if (cancel) {
    cancel.disabled = true;
    try {
      const response = await api("POST", `/jobs/${cancel.dataset.cancel}/cancel`);
      if (!response.ok) {
        document.getElementById("action-error").textContent = await problem(response);
        return;
      }
    } catch (e) {
      return;
    }
    return load();
  }
  const copy = event.target.closest("[data-copy]");
  if (copy) {
    await navigator.clipboard.writeText(document.getElementById(copy.dataset.copy).textContent);
    copy.textContent = "Copied";
    return;
  }
  const download = event.target.closest("a[data-expires]");
  if (download && Date.now() / 1000 > Number(download.dataset.expires) - 10) {
    // the page's signed links have expired: ask for fresh ones, then follow this file's
    event.preventDefault();
    const response = await api("POST", `/models/${download.dataset.model}/signed-links`);
    if (!response.ok) return;
    const links = await response.json();
    const expires = String(Math.floor(Date.parse(links.expires_at) / 1000));
    for (const file of links.files) {
      const link = main.querySelector(`a[data-download="${CSS.escape(file.name)}"]`);
      if (link) { link.href = file.url; link.dataset.expires = expires; }
    }
    download.click();
  }
});

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  load();
});

document.getElementById("forget-token").addEventListener("click", () => askForToken(null));

load();
