// The pathguard page: sends one image to /v1/detect of this server and shows the verdict and its evidence.
// No framework, no build step; everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null; // GET /v1/model, once it answered

function headers(extra) {
  const h = new Headers(extra || {});
  const key = $("api-key").value.trim();
  if (key) h.set("X-API-Key", key); // the header the service checks (or Authorization: Bearer)
  return h;
}

async function errorText(resp) {
  let message = resp.statusText || "error";
  try {
    const body = await resp.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch (_) { /* not JSON: keep the status text */ }
  return `${resp.status}: ${message}`;
}

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function fmt(v, digits = 3) {
  return typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "-";
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/model", { headers: headers() });
    if (!resp.ok) {
      $("bundle").textContent = `Service: /v1/model answered ${await errorText(resp)}`;
      return;
    }
    model = await resp.json();
    $("bundle").textContent =
      `Bundle ${model.name} v${model.version} (${model.dataset}, sha256 ${model.bundle_sha256.slice(0, 12)}), ` +
      `mode ${model.mode}, threshold ${fmt(model.threshold, 4)} at target FPR ${fmt(model.target_fpr, 2)}`;
    $("bundle").dataset.bundle = model.name;
    markSamples();
  } catch (err) {
    $("bundle").textContent = `Service unreachable: ${err.message}`;
  }
}

let samplesIndex = null;

async function loadSamples() {
  const list = $("samples");
  try {
    const resp = await fetch("/static/samples/index.json");
    if (!resp.ok) throw new Error(`${resp.status}`);
    samplesIndex = await resp.json();
  } catch (err) {
    $("samples-note").textContent = `No samples (${err.message}).`;
    return;
  }
  for (const s of samplesIndex.samples) {
    const li = document.createElement("li");
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = `sample sample-${s.kind}`;
    btn.dataset.kind = s.kind;
    btn.dataset.file = s.file;
    const caption = s.kind === "clean" ? `clean ${s.true_label}` : `${s.attack} (from ${s.true_label})`;
    btn.setAttribute("aria-label", `sample: ${caption}`);
    const img = document.createElement("img");
    img.src = `/static/samples/${s.file}`;
    img.alt = "";
    img.width = 56;
    img.height = 56;
    const span = document.createElement("span");
    span.textContent = caption;
    btn.append(img, span);
    btn.addEventListener("click", () => sendSample(s, caption));
    li.append(btn);
    list.append(li);
  }
  markSamples();
}

function markSamples() {
  if (!model || !samplesIndex) return;
  const made = samplesIndex.bundle;
  const note = $("samples-note");
  if (made.bundle_sha256 !== model.bundle_sha256) {
    note.textContent = `Samples were made for bundle ${made.name}; this server serves ${model.name}, ` +
      "so their verdicts may differ from the labels.";
  } else {
    note.textContent = `MNIST test digits for this bundle (${made.name}): clean ones it does not flag, and ` +
      "adversarial ones made with the named attack that it does flag.";
  }
}

async function sendSample(sample, caption) {
  clearError();
  const resp = await fetch(`/static/samples/${sample.file}`);
  if (!resp.ok) {
    showError(`sample ${sample.file}: ${resp.status}`);
    return;
  }
  const blob = await resp.blob();
  await detect(new File([blob], sample.file, { type: "image/png" }), `sample: ${caption}`);
}

async function detect(file, caption) {
  clearError();
  $("status").textContent = `Checking ${caption}\u2026`;
  const form = new FormData();
  form.append("image", file, file.name || "image");
  let resp;
  try {
    resp = await fetch("/v1/detect", { method: "POST", headers: headers(), body: form });
  } catch (err) {
    $("status").textContent = "No answer.";
    showError(`the request failed before an answer arrived (${err.message})`);
    return;
  }
  if (!resp.ok) {
    $("status").textContent = `The service refused ${caption}.`;
    showError(await errorText(resp));
    return;
  }
  const body = await resp.json();
  render(body, file, caption);
  $("status").textContent = `Checked ${caption}.`;
  if (!model) loadModel(); // e.g. the API key was typed in after the page loaded
}

function render(body, file, caption) {
  $("result").hidden = false;
  const old = $("preview").src;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $("preview").src = URL.createObjectURL(file);
  $("preview-caption").textContent = caption;
  const p = body.prediction;
  $("pred-label").textContent = p.label;
  $("pred-conf").textContent = fmt(p.confidence, 4);
  $("v-id").textContent = body.id;
  const v = body.verdict;
  const verdict = $("verdict");
  if (!v) { // shadow mode: the verdict is only recorded
    verdict.textContent = "no verdict (shadow mode)";
    verdict.dataset.verdict = "none";
    verdict.className = "verdict";
    for (const id of ["v-score", "v-p", "v-fpr"]) $(id).textContent = "-";
    for (const id of ["ep-table", "nic-value", "nic-prov"]) $(id).querySelector("tbody").replaceChildren();
    $("benign-note").textContent = "No per-layer evidence: in shadow mode the verdict is computed afterwards " +
      "and only recorded.";
    return;
  }
  verdict.textContent = v.adversarial ? "adversarial" : "benign";
  verdict.dataset.verdict = v.adversarial ? "adversarial" : "benign";
  verdict.className = `verdict ${v.adversarial ? "is-adv" : "is-benign"}`;
  $("v-score").textContent = `${fmt(v.score, 4)} ${v.score > v.threshold ? ">" : "\u2264"} ${fmt(v.threshold, 4)}`;
  $("v-p").textContent = fmt(v.p_value, 4);
  $("v-fpr").textContent = fmt(v.target_fpr, 3);
  // null when the server leaves the component out of its answers (PATHGUARD_REPORTED_COMPONENTS)
  if (body.effective_path) renderPaths(body.effective_path, body.prediction);
  else $("ep-table").querySelector("tbody").replaceChildren();
  renderViolations("nic-value", body.nic ? body.nic.value_violation : {});
  renderViolations("nic-prov", body.nic ? body.nic.provenance_violation : {});
}

function bar(value, cls, band) {
  const track = document.createElement("div");
  track.className = "track";
  if (band) {
    const b = document.createElement("div");
    b.className = "band";
    const lo = Math.min(band.median, band.bound), hi = Math.max(band.median, band.bound);
    b.style.left = `${lo * 100}%`;
    b.style.width = `${Math.max(hi - lo, 0.004) * 100}%`;
    const tick = document.createElement("div");
    tick.className = "median";
    tick.style.left = `${band.median * 100}%`;
    track.append(b, tick);
  }
  const fill = document.createElement("div");
  fill.className = `fill ${cls}`;
  fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
  track.append(fill);
  return track;
}

function renderPaths(ep, prediction) {
  const tbody = $("ep-table").querySelector("tbody");
  tbody.replaceChildren();
  const overall = model && model.benign_similarity;
  const perClass = overall && overall.per_class;
  const k = prediction.class_index;
  const own = perClass && perClass.rank1.median[k] ? perClass : null;
  const benign = own
    ? { rank1: { median: own.rank1.median[k], bound: own.rank1.bound[k] },
        rank2: { median: own.rank2.median[k], bound: own.rank2.bound[k] } }
    : overall;
  $("benign-note").textContent = own
    ? `Benign range of class ${prediction.label}: from the median to the ${Math.round(own.tail * 100)}% quantile ` +
      `on the suspicious side, over the ${own.images[k]} held-out benign training images predicted as ` +
      `${prediction.label}.`
    : overall
      ? `Benign range: from the benign median to the ${Math.round(overall.tail * 100)}% quantile on the ` +
        `suspicious side, over all classes together, from ${overall.images ?? "the bundle's"} held-out training ` +
        "images (this bundle keeps no per-class ranges, or too few images of this class)."
      : "No benign range: the service did not report one.";
  ep.layers.forEach((layer, i) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = layer;
    const td = document.createElement("td");
    for (const [rank, values, cls] of [[1, ep.rank1_similarity, "r1"], [2, ep.rank2_similarity, "r2"]]) {
      const stats = benign && benign[`rank${rank}`];
      const band = stats ? { median: stats.median[i], bound: stats.bound[i] } : null;
      const row = document.createElement("div");
      row.className = "bar-row";
      const label = document.createElement("span");
      label.className = "value";
      label.textContent = `rank-${rank} ${fmt(values[i])}` +
        (band ? ` (benign ${fmt(Math.min(band.median, band.bound), 2)}-${fmt(Math.max(band.median, band.bound), 2)})` : "");
      row.append(bar(values[i], cls, band), label);
      td.append(row);
    }
    tr.append(th, td);
    tbody.append(tr);
  });
}

function renderViolations(tableId, values) {
  const tbody = $(tableId).querySelector("tbody");
  tbody.replaceChildren();
  for (const [layer, value] of Object.entries(values)) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = layer.replace("->", " \u2192 "); // provenance pairs "a->b" may wrap at the arrow
    const td = document.createElement("td");
    const row = document.createElement("div");
    row.className = "bar-row";
    const label = document.createElement("span");
    label.className = "value";
    label.textContent = fmt(value);
    row.append(bar(value, value > 0.5 ? "hot" : "cool", null), label);
    td.append(row);
    tr.append(th, td);
    tbody.append(tr);
  }
}

function setUp() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) detect(file, `file: ${file.name}`);
  });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("file").click();
    }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) detect(file, `file: ${file.name}`);
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
  loadSamples();
}

document.addEventListener("DOMContentLoaded", setUp);
