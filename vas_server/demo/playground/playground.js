// The vas-server playground: plain and steered answers side by side, and the per-token view of the
// steered one (the answer's `vas_explain`). It talks to the server like any OpenAI client:
// GET /v1/models, POST /v1/chat/completions (streamed). The API key lives in `state` only.
"use strict";

const $ = (id) => document.getElementById(id);
const EXPLAIN_CANDIDATES = 5;  // vas_explain: candidates shown per token
const state = { apiKey: "", base: null, heads: [], presets: {}, pinned: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  return h;
}

// An error answer as one line: its status and the server's own message (OpenAI's error shape);
// `param`, when given, is the field the server named.
async function errorMessage(response, param) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = (body.error && (body.error.message || body.error)) || JSON.stringify(body);
    if (param && body.error) param.name = body.error.param;
  } catch (e) { /* not JSON */ }
  const hint = { 401: " (enter the server's API key above)", 429: " (the server is busy: try again)",
                 503: " (the server is busy or starting: try again)" }[response.status] || "";
  return `${response.status}: ${message}${hint}`;
}

function showError(message) { const e = $("error"); e.textContent = message; e.hidden = false; }
function clearError() { const e = $("error"); e.textContent = ""; e.hidden = true; }

async function loadModels() {
  clearError();
  state.apiKey = $("api-key").value;
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) { return showError("could not reach the server: " + e); }
  if (!response.ok) return showError(await errorMessage(response));
  const cards = (await response.json()).data;
  state.base = cards.find((c) => !c.vas_preset).id;
  state.heads = cards.filter((c) => c.vas_head).map((c) => ({ name: c.id, description: c.vas_head.description }));
  state.presets = Object.fromEntries(cards.filter((c) => c.vas_preset).map((c) => [c.id, c.vas_preset]));
  const select = $("model");
  select.replaceChildren(new Option(state.base + " (base)", state.base),
    ...Object.keys(state.presets).map((id) => new Option("preset: " + id, id)));
  const box = $("heads");
  box.replaceChildren(box.querySelector("legend"));
  for (const head of state.heads) {
    const div = document.createElement("div");
    div.className = "head";
    div.innerHTML = `<label><span><b></b> <span class="value">0</span></span>
      <input type="range" min="-10" max="10" step="0.5" value="0" list="zero-mark"></label><div class="desc"></div>`;
    div.querySelector("b").textContent = head.name;
    div.querySelector(".desc").textContent = head.description || "";
    const slider = div.querySelector("input");
    slider.dataset.head = head.name;
    slider.id = "weight-" + head.name;
    slider.addEventListener("input", () => { div.querySelector(".value").textContent = slider.value; updateReproduce(); });
    box.append(div);
  }
  updateReproduce();
}

// Choosing a preset loads its settings into the controls (the request then names it as its model).
function choosePreset() {
  const preset = state.presets[$("model").value];
  for (const slider of document.querySelectorAll("#heads input")) {
    slider.value = preset ? (preset.weights[slider.dataset.head] || 0) : 0;
    slider.dispatchEvent(new Event("input"));
  }
  $("top-k").value = preset && preset.top_k ? preset.top_k : "";
  updateReproduce();
}

function weights() {
  const out = {};
  for (const slider of document.querySelectorAll("#heads input")) {
    if (Number(slider.value) !== 0) out[slider.dataset.head] = Number(slider.value);
  }
  return out;
}

function number(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }

// The steering of the controls: {model, vas_weights, vas_top_k}.
function steering() {
  const s = { model: $("model").value || state.base, vas_weights: weights() };
  if (number("top-k") !== undefined) s.vas_top_k = number("top-k");
  return s;
}

// A chat request body at the controls' prompt and sampling settings, with `steer` on top.
function requestBody(steer) {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("prompt").value });
  const body = { model: state.base, messages, max_tokens: number("max-tokens"), temperature: number("temperature"),
                 seed: number("seed"), ...steer };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

// Stream one answer into `out`; resolves to {text, explain}, throws the server's message.
async function stream(body, out) {
  out.textContent = "";
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
    body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) {
    const param = {};
    const error = new Error(await errorMessage(response, param));
    error.param = param.name;
    throw error;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", explain = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const data = JSON.parse(event.slice(6));
      if (data.error) throw new Error(`${data.error.code || "error"}: ${data.error.message}`);
      for (const choice of data.choices || []) text += (choice.delta && choice.delta.content) || "";
      if (data.vas_explain) explain = data.vas_explain;
      out.textContent = text;
    }
  }
  return { text, explain };
}

async function compare() {
  clearError();
  const button = $("compare");
  button.disabled = true;
  $("token-detail").replaceChildren();
  updateReproduce();  // the lines shown are those of the request sent
  const steer = steering();
  const steered = Object.keys(steer.vas_weights).length > 0;
  $("steered-label").textContent = describe(steer);
  // One after the other, not at once: each at the same seed, each alone in the engine's batch.
  const jobs = [["plain-out", requestBody({ vas_weights: {} })],
                ["steered-out", requestBody(steered ? { ...steer, vas_explain: EXPLAIN_CANDIDATES } : steer)]];
  if (state.pinned) jobs.push(["pinned-out", requestBody(state.pinned)]);
  const errors = [];
  for (const [id, body] of jobs) {
    try {
      let answer;
      try {
        answer = await stream(body, $(id));
      } catch (e) {  // a server that cannot explain (over a remote base): the answer without the view
        if (e.param !== "vas_explain" || body.vas_explain === undefined) throw e;
        delete body.vas_explain;
        answer = await stream(body, $(id));
      }
      if (id === "steered-out" && answer.explain) renderTokens($(id), answer.explain);
    } catch (e) {
      $(id).textContent = "";
      errors.push(e.message);
    }
  }
  if (errors.length) showError([...new Set(errors)].join("\n"));
  button.disabled = false;
}

function describe(steer) {
  const w = Object.entries(steer.vas_weights).map(([h, v]) => `${h} ${v}`).join(", ") || "no weights";
  return `(${steer.model === state.base ? "" : steer.model + ": "}${w}${steer.vas_top_k ? ", K " + steer.vas_top_k : ""})`;
}

// How steering moved the sampled token: lifted, lowered or unchanged (within 10%).
function movement(token) {
  if (token.base_p === null || token.steered_p === null) return "unchanged";
  const ratio = token.steered_p / token.base_p;
  return ratio > 1.1 ? "lifted" : ratio < 1 / 1.1 ? "lowered" : "unchanged";
}

function renderTokens(out, explain) {
  out.replaceChildren();
  explain.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.className = "tok " + movement(token);
    span.textContent = token.token === null ? "?" : token.token;
    span.dataset.index = i;
    span.addEventListener("click", () => showToken(explain, i, span));
    out.append(span);
  });
  if (explain.truncated) out.append(document.createTextNode(" … (later tokens not explained)"));
}

function fmt(p) { return p === null ? "-" : p.toFixed(4); }

function showToken(explain, i, span) {
  for (const s of document.querySelectorAll(".tok.selected")) s.classList.remove("selected");
  span.classList.add("selected");
  const token = explain.tokens[i];
  const table = document.createElement("table");
  table.id = "candidates";
  const head = table.insertRow();
  for (const name of ["candidate", "base p", "steered p", ...explain.heads.map((h) => h + " contribution")]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.append(th);
  }
  const rows = [...token.candidates];
  if (!rows.some((c) => c.token_id === token.token_id)) rows.push({ ...token, outside: true });
  for (const c of rows) {
    const tr = table.insertRow();
    tr.dataset.tokenId = c.token_id;
    if (c.token_id === token.token_id) tr.className = "chosen";
    const cells = [[JSON.stringify(c.token) + (c.outside ? " (sampled, not a candidate)" : ""), null, "token"],
                   [fmt(c.base_p), c.base_p, "base-p"], [fmt(c.steered_p), c.steered_p, "steered-p"],
                   ...explain.heads.map((h) => [c.contributions ? c.contributions[h].toFixed(3) : "-",
                                                c.contributions ? c.contributions[h] : null, "contribution"])];
    for (const [text, value, cls] of cells) {
      const td = tr.insertCell();
      td.textContent = text;
      td.className = cls;
      if (value !== null) td.dataset.value = value;
    }
  }
  const title = document.createElement("p");
  title.textContent = `token ${i + 1}: ${JSON.stringify(token.token)} (${movement(token)}), base p ${fmt(token.base_p)}, steered p ${fmt(token.steered_p)}`;
  $("token-detail").replaceChildren(title, table);
}

function pin() {
  state.pinned = steering();
  $("pinned-desc").textContent = describe(state.pinned);
  $("pinned-label").textContent = "Pinned: " + describe(state.pinned) + ". Compare now also runs it.";
  $("pinned-label").hidden = $("pinned-col").hidden = $("unpin").hidden = false;
}

function unpin() {
  state.pinned = null;
  $("pinned-label").hidden = $("pinned-col").hidden = $("unpin").hidden = true;
}

function shellQuote(s) { return "'" + s.replace(/'/g, "'\\''") + "'"; }

function updateReproduce() {
  if (!state.base) return;
  const body = requestBody(steering());
  const url = location.origin + "/v1/chat/completions";
  const auth = state.apiKey ? ' -H "Authorization: Bearer $VAS_SERVER_API_KEY"' : "";
  $("curl").textContent = `curl ${url} -H 'Content-Type: application/json'${auth} -d ${shellQuote(JSON.stringify(body))}`;
  const extra = {};
  const args = [];
  for (const [k, v] of Object.entries(body)) {
    if (k.startsWith("vas_")) extra[k] = v;
    else args.push(`    ${k}=${JSON.stringify(v)},`);
  }
  $("python").textContent = [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(location.origin + "/v1")}, api_key=os.environ.get("VAS_SERVER_API_KEY", "none"))`,
    "answer = client.chat.completions.create(",
    ...args.map((a) => a.replace(/: true/g, ": True").replace(/: false/g, ": False")),
    `    extra_body=${JSON.stringify(extra)},`,
    ")",
    "print(answer.choices[0].message.content)",
  ].join("\n");
}

$("load-models").addEventListener("click", loadModels);
$("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") loadModels(); });
$("model").addEventListener("change", choosePreset);
$("compare").addEventListener("click", compare);
$("pin").addEventListener("click", pin);
$("unpin").addEventListener("click", unpin);
for (const id of ["system", "prompt", "top-k", "temperature", "seed", "max-tokens"]) {
  $(id).addEventListener("input", updateReproduce);
  $(id).addEventListener("change", updateReproduce);
}
loadModels();
