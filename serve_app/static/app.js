// PhotoEnhance web page: choose and review photos, send them as one job, follow it live,
// judge each result at full size. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
// Where the application is mounted (the server writes it into <base>): "/" or "/prefix/".
const BASE = new URL(document.baseURI).pathname.replace(/\/?$/, "/");
const u = (path) => BASE + path.replace(/^\//, "");
const TERMINAL = new Set(["completed", "partial", "failed", "cancelled"]);
const ACTIVE = new Set(["queued", "running"]);
const PAGE = 200; // items shown per "Show more"
const KEY_STORE = "photoenhance.key";
const JOBS_STORE = "photoenhance.jobs";
const FORM_STORE = "photoenhance.options";
// Controls folded under "More options"; any option not listed here shows in the main list.
const ADVANCED = new Set(["only_center_face", "aligned", "tile"]);
const HIDDEN_OPTIONS = new Set(["preset"]);
const LABELS = {
  upscale: "Enlarge", face: "Restore faces", face_model: "Face model", bg_model: "Upscaler",
  weight: "Face fidelity", only_center_face: "Main face only", aligned: "Face crops",
  format: "Save as", quality: "Quality", tile: "Tile size", metadata: "Camera data", color: "Colour",
  denoise: "Denoise",
};
// What each control does, shown under it (the schema's description is the fallback).
const HELP = {
  upscale: "How much larger the result is: 2× doubles width and height.",
  face: "Finds faces and rebuilds their detail: eyes, skin, hair.",
  face_model: "Which model rebuilds the faces.",
  bg_model: "How the rest of the photo is enlarged.",
  weight: "The face model's fidelity weight (0 to 1), passed to GFPGAN as it is.",
  denoise: "Grain and noise removed; only with the general upscaler.",
  only_center_face: "Restore only the face nearest the centre.",
  aligned: "Each photo is already a 512×512 face crop, eyes level.",
  format: "File type of the results; Auto keeps the original's.",
  quality: "JPEG and WebP quality: higher is larger and cleaner.",
  tile: "Splits large photos to save memory; 0 lets the server choose.",
  metadata: "EXIF, XMP and IPTC in the results; “no GPS” drops the location.",
  color: "Keep the photo's colour profile, or convert to sRGB for the web.",
};
// Models by what they are for, the technical name beside; an added model by its name.
const MODEL_NAMES = {
  "GFPGANv1.4": "Faces: restore, sharper (GFPGAN v1.4)",
  "GFPGANv1.3": "Faces: restore, gentler (GFPGAN v1.3)",
  auto: "Automatic (Real-ESRGAN x2plus up to 2×, x4plus at 4×)",
  none: "None: plain resize (Lanczos)",
  RealESRGAN_x4plus: "Upscale: photo (Real-ESRGAN x4plus)",
  RealESRGAN_x2plus: "Upscale: photo, 2× model (Real-ESRGAN x2plus)",
  "realesr-general-x4v3": "Upscale: general, with denoise (realesr-general-x4v3)",
};
// What the person can do about a failed photo, by the server's error code.
const ERROR_HELP = {
  invalid_image: "The file is damaged or in a variant this server cannot read: open it in a photo editor, export it again as JPEG or PNG, then retry.",
  unsupported_media_type: "Not a kind of photo this server reads: convert it to JPEG or PNG, then retry.",
  too_many_pixels: "Too many pixels for this server: export it smaller, then retry.",
  too_many_output_pixels: "The result would be too large: retry with a smaller Enlarge (2× or 1×).",
  payload_too_large: "The file is larger than this server takes: export it smaller.",
  file_too_large: "The file is larger than this server takes: export it smaller.",
  image_too_complex: "The file is built unusually (too many parts): export it again from a photo editor.",
  decode_too_costly: "The file took too long to read: export it again, or smaller.",
  metadata_too_large: "Its embedded data (colour profile, EXIF) is too large: export it with metadata removed.",
  too_large_for_device: "Too large for the server's memory at these settings: retry with a smaller Enlarge or a Tile size.",
  engine_error: "The server failed on this photo: retry; if it fails again, tell the server's admin.",
  timeout: "It took too long: retry when the server is less busy.",
  fetch_timeout: "Reading the original took too long: retry.",
  overloaded: "The server was too busy: retry.",
  replica_unavailable: "The server was restarting: retry.",
  not_ready: "The server was starting: retry.",
  source_not_found: "The original is no longer where it was: check it, then retry.",
  source_forbidden: "The server may not read the original's location.",
  fetch_failed: "Reading the original failed: check its address, then retry.",
  encode_failed: "Saving the result failed: retry with another Save as.",
  unknown_model: "A chosen model is not on this server: choose another, then retry.",
  wrong_model_kind: "A chosen model does not do that job: choose another, then retry.",
  option_unavailable: "An option is not available on this server: change it, then retry.",
  weights_unavailable: "The server's model files are missing: tell its admin.",
  insufficient_storage: "The server is out of disk space: tell its admin.",
};

function errorHelp(error) {
  if (!error) return "";
  return ERROR_HELP[error.code] || error.message || error.code;
}
// When an option has an effect (otherwise its control is dimmed, still shown and sent).
const RELEVANT = {
  face_model: (v) => v.face, weight: (v) => v.face, only_center_face: (v) => v.face,
  aligned: (v) => v.face, quality: (v) => v.format !== "png",
  denoise: (v) => v.bg_model === "realesr-general-x4v3",
};

const server = { models: null, schema: null, defaults: {}, presets: [], limits: {}, formats: [], maxFiles: 100 };

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

function fmtDuration(s) {
  if (s == null || !isFinite(s)) return "";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

function fmtTime(epochS) {
  if (!epochS) return "";
  const d = new Date(epochS * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
}

function baseName(path) {
  return String(path || "").split(/[\\/]/).pop();
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

function readJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

async function errorText(r) {
  try {
    const body = await r.json();
    if (body.error) return body.error.message || body.error.code;
  } catch { /* not JSON */ }
  return `${r.status} ${r.statusText}`;
}

// ------------------------------------------------------------------ API and keys

const auth = {
  get key() { return localStorage.getItem(KEY_STORE) || ""; },
  headers() { return this.key ? { Authorization: `Bearer ${this.key}` } : {}; },
};

let keyPrompt = null;

// Ask once for a key; concurrent 401s share one dialog. Resolves true when a key was given.
function askKey(refused) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-msg").textContent = refused ? "That key was not accepted." : "";
    $("key-input").value = "";
    dialog.addEventListener("close", function done() {
      dialog.removeEventListener("close", done);
      const value = $("key-input").value.trim();
      const ok = dialog.returnValue === "ok" && value !== "";
      if (ok) localStorage.setItem(KEY_STORE, value);
      $("key-button").hidden = !auth.key;
      keyPrompt = null;
      resolve(ok);
    });
    dialog.showModal();
  });
  return keyPrompt;
}

// fetch() with the stored key; a 401 asks for a key and tries again, a 429 waits as told.
async function api(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { ...(init.headers || {}), ...auth.headers() };
    const r = await fetch(path, { ...init, headers });
    if (attempt > 3) return r;
    if (r.status === 429) {
      const wait = Math.min(Number(r.headers.get("Retry-After")) || 1, 30);
      await sleep(wait * 1000, init.signal);
      continue;
    }
    if (r.status !== 401) return r;
    if (!(await askKey(attempt > 0 || Boolean(auth.key)))) return r;
  }
}

async function apiJSON(path, init) {
  const r = await api(path, init);
  if (!r.ok) throw new Error(await errorText(r));
  return r.json();
}

// Images cannot carry a header: with a key, they are fetched and shown from blob: URLs.
const blobUrls = new Set();
async function setImage(img, url) {
  if (!auth.key) { img.src = url; return; }
  try {
    const r = await api(url);
    if (!r.ok) return;
    const u = URL.createObjectURL(await r.blob());
    blobUrls.add(u);
    img.src = u;
  } catch { /* left blank */ }
}

// Downloads: a plain link when no key is needed, else fetched with the key.
async function download(url, name) {
  if (!auth.key) {
    const a = el("a", { href: url, download: name });
    document.body.append(a); a.click(); a.remove();
    return;
  }
  const r = await api(url);
  if (!r.ok) { alert(await errorText(r)); return; }
  const u = URL.createObjectURL(await r.blob());
  const a = el("a", { href: u, download: name });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(u), 60000);
}

// ------------------------------------------------------------------ server description

async function loadServer() {
  const m = await apiJSON(u("v1/models"));
  server.models = m;
  server.schema = m.option_schema || { properties: {} };
  server.limits = m.limits || {};
  server.formats = (m.formats && m.formats.input) || ["jpeg", "png", "webp", "bmp", "tiff"];
  server.maxFiles = (m.upload && m.upload.max_files) || 100;
  if (m.synthetic) {
    const b = $("banner");
    b.textContent = "This server runs on SYNTHETIC random weights: results are noise, not real restorations. "
      + "Fetch the official weights (photoenhance weights fetch) for real results.";
    b.hidden = false;
  }
  buildControls();
  await loadPresets();
  restoreForm();
}

// ------------------------------------------------------------------ option controls

function resolveRef(schema) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return (server.schema.$defs || {})[name] || {};
  }
  return schema || {};
}

// One option's shape from its JSON schema: kind, choices (null allowed), bounds, default.
// A union (anyOf) contributes the choices of all its parts; model names also come from the
// server's model lists, so added models are offered too.
function describe(name, prop) {
  prop = resolveRef(prop);
  const parts = (prop.anyOf || [prop]).map(resolveRef);
  const typed = parts.filter((p) => p.type !== "null");
  const base = typed.find((p) => p.minimum !== undefined || p.maximum !== undefined) || typed[0] || {};
  const d = { name, label: LABELS[name] || prop.title || name, help: prop.description || "",
    default: prop.default, nullable: parts.some((p) => p.type === "null"), type: base.type,
    min: base.minimum, max: base.maximum };
  const enums = typed.flatMap((p) => p.enum || (p.const !== undefined ? [p.const] : []));
  const models = server.models.models || {};
  const listed = { face_model: models.face, bg_model: models.background }[name] || [];
  d.choices = enums.length || listed.length ? [...new Set([...enums, ...listed])] : null;
  return d;
}

const controls = new Map(); // name -> {d, get(), set(v), row}

function buildControls() {
  const props = server.schema.properties || {};
  $("controls").replaceChildren();
  $("controls-advanced").replaceChildren();
  controls.clear();
  server.defaults = {};
  for (const [name, prop] of Object.entries(props)) {
    if (HIDDEN_OPTIONS.has(name)) continue;
    const d = describe(name, prop);
    server.defaults[name] = d.default ?? null;
    const c = makeControl(d);
    controls.set(name, c);
    $(ADVANCED.has(name) ? "controls-advanced" : "controls").append(c.row);
  }
  $("advanced").hidden = $("controls-advanced").children.length === 0;
  $("opts").addEventListener("input", onControlsChanged);
  $("opts").addEventListener("change", onControlsChanged);
}

const VALUE_LABELS = { keep: "Keep", strip: "Strip", "keep-no-gps": "Keep, no GPS", srgb: "sRGB", auto: "Auto", none: "None" };

function choiceLabel(name, v) {
  if (v === null) return name === "format" ? "Auto" : "Server default";
  if (name === "face_model" || name === "bg_model") return modelLabel(v);
  if (typeof v === "string" && VALUE_LABELS[v]) return VALUE_LABELS[v];
  if (name === "upscale") return `${v}×`;
  if (name === "format") return v === "webp" ? "WebP" : String(v).toUpperCase();
  return String(v);
}

function modelLabel(v) {
  return MODEL_NAMES[v] || `Added model (${v})`;
}

function makeControl(d) {
  const id = `opt-${d.name}`;
  const row = el("div", { class: "ctl", "data-option": d.name });
  let get, set;
  if (d.type === "boolean") {
    const box = el("input", { type: "checkbox", id, name: d.name });
    row.append(el("label", { class: "lbl", for: id, text: d.label }), el("div", {}, box));
    get = () => box.checked;
    set = (v) => { box.checked = Boolean(v); };
  } else if (d.choices) {
    const values = d.nullable ? [null, ...d.choices] : d.choices;
    const short = values.length <= 4 && values.map((v) => choiceLabel(d.name, v)).join("").length <= 20;
    if (short) {
      // A segmented radio group: every value visible at once.
      const seg = el("div", { class: "seg", role: "radiogroup", "aria-label": d.label });
      values.forEach((v, i) => {
        const input = el("input", { type: "radio", name: d.name, value: JSON.stringify(v), id: `${id}-${i}` });
        seg.append(el("label", { for: `${id}-${i}` }, input, choiceLabel(d.name, v)));
      });
      row.append(el("span", { class: "lbl", text: d.label }), el("div", {}, seg));
      get = () => { const c = seg.querySelector("input:checked"); return c ? JSON.parse(c.value) : d.default; };
      set = (v) => { for (const r of seg.querySelectorAll("input")) r.checked = r.value === JSON.stringify(v ?? null); };
    } else {
      const sel = el("select", { id, name: d.name });
      for (const v of values) sel.append(el("option", { value: JSON.stringify(v), text: choiceLabel(d.name, v) }));
      row.append(el("label", { class: "lbl", for: id, text: d.label }), sel);
      get = () => JSON.parse(sel.value);
      set = (v) => {
        const want = JSON.stringify(v ?? null);
        if (![...sel.options].some((o) => o.value === want)) sel.append(el("option", { value: want, text: choiceLabel(d.name, v) }));
        sel.value = want;
      };
    }
  } else if ((d.type === "number" || d.type === "integer") && d.min != null && d.max != null && (d.type === "number" || d.max - d.min <= 100)) {
    const step = d.type === "integer" ? 1 : (d.max - d.min) / 20;
    const range = el("input", { type: "range", id, name: d.name, min: d.min, max: d.max, step });
    const out = el("output", { for: id });
    // A value that may be unset (null: the server's own behaviour) gets a switch beside it.
    const on = d.nullable ? el("input", { type: "checkbox", id: `${id}-on`, "aria-label": `Set ${d.label}` }) : null;
    const show = () => {
      range.disabled = on ? !on.checked : false;
      out.textContent = on && !on.checked ? "off" : d.type === "integer" ? range.value : Number(range.value).toFixed(2);
    };
    range.addEventListener("input", show);
    on?.addEventListener("change", show);
    row.append(el("label", { class: "lbl", for: id, text: d.label }), el("div", { class: "range" }, on, range, out));
    get = () => (on && !on.checked ? null : Number(range.value));
    set = (v) => {
      if (on) on.checked = v !== null && v !== undefined;
      range.value = v ?? d.default ?? (d.min + d.max) / 2;
      show();
    };
  } else if (d.type === "number" || d.type === "integer") {
    const num = el("input", { type: "number", id, name: d.name, min: d.min, max: d.max, step: d.type === "integer" ? 1 : "any" });
    row.append(el("label", { class: "lbl", for: id, text: d.label }), num);
    get = () => (num.value === "" ? null : Number(num.value));
    set = (v) => { num.value = v ?? ""; };
  } else {
    const text = el("input", { type: "text", id, name: d.name, autocomplete: "off" });
    row.append(el("label", { class: "lbl", for: id, text: d.label }), text);
    get = () => (text.value.trim() === "" ? null : text.value.trim());
    set = (v) => { text.value = v ?? ""; };
  }
  const help = HELP[d.name] || d.help;
  if (help) {
    const hid = `${id}-help`;
    row.append(el("div", { class: "help", id: hid, text: help }));
    for (const input of row.querySelectorAll("input, select")) input.setAttribute("aria-describedby", hid);
  }
  set(d.default);
  return { d, row, get, set };
}

function readControls() {
  const out = {};
  for (const [name, c] of controls) out[name] = c.get();
  return out;
}

function setControls(values) {
  for (const [name, c] of controls) c.set(name in values ? values[name] : server.defaults[name]);
  syncDependent();
}

function syncDependent() {
  const values = readControls();
  for (const [name, relevant] of Object.entries(RELEVANT)) {
    controls.get(name)?.row.classList.toggle("off", !relevant(values));
  }
}

function sameValues(a, b) {
  return Object.keys(server.defaults).every((k) => JSON.stringify(a[k] ?? null) === JSON.stringify(b[k] ?? null));
}

function presetValues(p) {
  return { ...server.defaults, ...p.options };
}

function onControlsChanged(e) {
  if (e.target.id === "preset" || e.target.id === "preset-name") return;
  syncDependent();
  const sel = $("preset");
  const p = server.presets.find((x) => x.name === sel.value);
  if (p && !sameValues(presetValues(p), readControls())) sel.value = "";
  updatePresetButtons();
  saveForm();
  if (chosen.length) renderReview(); // the output limit depends on Enlarge
}

function saveForm() {
  localStorage.setItem(FORM_STORE, JSON.stringify({ preset: $("preset").value, values: readControls() }));
}

function restoreForm() {
  const saved = readJSON(FORM_STORE, null);
  if (!saved) { applyPreset("default"); return; }
  setControls(saved.values || {});
  const p = server.presets.find((x) => x.name === saved.preset);
  $("preset").value = p && sameValues(presetValues(p), readControls()) ? p.name : "";
  updatePresetButtons();
}

// What is sent: every control's value as shown (nothing left to a preset on the server).
function optionFields() {
  const out = {};
  for (const [k, v] of Object.entries(readControls())) if (v !== null && v !== "") out[k] = String(v);
  return out;
}

// ------------------------------------------------------------------ presets

async function loadPresets(select) {
  const body = await apiJSON(u("v1/presets"));
  server.presets = body.presets || [];
  const sel = $("preset");
  const keep = select ?? sel.value;
  sel.replaceChildren(el("option", { value: "", text: "Custom" }));
  const builtin = el("optgroup", { label: "Built in" });
  const saved = el("optgroup", { label: "Saved" });
  for (const p of server.presets) (p.builtin ? builtin : saved).append(el("option", { value: p.name, text: p.name }));
  sel.append(builtin);
  if (saved.children.length) sel.append(saved);
  sel.value = server.presets.some((p) => p.name === keep) ? keep : "";
  updatePresetButtons();
}

function applyPreset(name) {
  const p = server.presets.find((x) => x.name === name);
  if (!p) return;
  setControls(presetValues(p));
  $("preset").value = name;
  updatePresetButtons();
  saveForm();
  if (chosen.length) renderReview();
}

function updatePresetButtons() {
  const p = server.presets.find((x) => x.name === $("preset").value);
  $("preset-delete").disabled = !p || p.builtin;
  resetPresetDelete(); // a press armed for another preset does not carry over
}

function presetMessage(text, ok) {
  const m = $("preset-msg");
  m.textContent = text;
  m.className = `msg ${ok ? "ok" : "error"}`;
}

async function savePreset() {
  const name = $("preset-name").value.trim();
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) {
    presetMessage("A preset name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.", false);
    return;
  }
  const values = {};
  for (const [k, v] of Object.entries(readControls())) if (v !== null) values[k] = v;
  const r = await api(u(`v1/presets/${encodeURIComponent(name)}`), {
    method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(values),
  });
  if (!r.ok) { presetMessage(await errorText(r), false); return; }
  await loadPresets(name);
  $("preset-name").value = "";
  presetMessage(`Saved preset “${name}”.`, true);
  saveForm();
}

async function deletePreset() {
  const name = $("preset").value;
  if (!armed("preset-delete", "Press again to delete", "Delete")) return;
  const r = await api(u(`v1/presets/${encodeURIComponent(name)}`), { method: "DELETE" });
  if (!r.ok) { presetMessage(await errorText(r), false); return; }
  await loadPresets("");
  presetMessage(`Deleted preset “${name}”.`, true);
  saveForm();
}

// ------------------------------------------------------------------ choosing and review

const chosen = []; // {file, path, key, status: "checking"|"ok"|"bad", reason, width, height, format, thumb}

// Magic bytes of each input format the server may accept (names as in /v1/models).
const SNIFF = {
  jpeg: (b) => b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff,
  png: (b) => b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47,
  webp: (b) => ascii(b, 0, 4) === "RIFF" && ascii(b, 8, 4) === "WEBP",
  bmp: (b) => b[0] === 0x42 && b[1] === 0x4d,
  tiff: (b) => (b[0] === 0x49 && b[1] === 0x49 && b[2] === 42 && b[3] === 0) || (b[0] === 0x4d && b[1] === 0x4d && b[2] === 0 && b[3] === 42),
  // HEIF and AVIF share the ISO-BMFF "ftyp" box; AVIF names itself in the major brand.
  heif: (b) => ascii(b, 4, 4) === "ftyp" && !/avif|avis/.test(ascii(b, 8, 4))
    && /heic|heix|hevc|heim|heis|mif1|msf1/.test(ascii(b, 8, 24)),
  avif: (b) => ascii(b, 4, 4) === "ftyp" && /avif|avis/.test(ascii(b, 8, 24)),
};

function ascii(b, at, n) {
  let s = "";
  for (let i = at; i < Math.min(at + n, b.length); i++) s += String.fromCharCode(b[i]);
  return s;
}

// Width and height from the header, or null where the header does not say within `b`.
function dimensions(format, b) {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  try {
    if (format === "png") return [v.getUint32(16), v.getUint32(20)];
    if (format === "bmp") return [Math.abs(v.getInt32(18, true)), Math.abs(v.getInt32(22, true))];
    if (format === "webp") {
      const kind = ascii(b, 12, 4);
      if (kind === "VP8 ") return [v.getUint16(26, true) & 0x3fff, v.getUint16(28, true) & 0x3fff];
      if (kind === "VP8L") { const x = v.getUint32(21, true); return [(x & 0x3fff) + 1, ((x >> 14) & 0x3fff) + 1]; }
      if (kind === "VP8X") return [(v.getUint32(24, true) & 0xffffff) + 1, (v.getUint32(27, true) & 0xffffff) + 1];
    }
    if (format === "jpeg") {
      let i = 2;
      while (i + 9 < b.length) {
        if (b[i] !== 0xff) { i++; continue; }
        const m = b[i + 1];
        if (m === 0xff) { i++; continue; }
        if (m === 0xd8 || m === 0x01 || (m >= 0xd0 && m <= 0xd7)) { i += 2; continue; }
        if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) return [v.getUint16(i + 7), v.getUint16(i + 5)];
        if (m === 0xd9 || m === 0xda) return null;
        i += 2 + v.getUint16(i + 2);
      }
    }
    if (format === "tiff") {
      const le = b[0] === 0x49;
      const ifd = v.getUint32(4, le);
      const n = v.getUint16(ifd, le);
      let w = null, h = null;
      for (let k = 0; k < n; k++) {
        const e = ifd + 2 + k * 12;
        const tag = v.getUint16(e, le), type = v.getUint16(e + 2, le);
        const val = type === 3 ? v.getUint16(e + 8, le) : v.getUint32(e + 8, le);
        if (tag === 256) w = val;
        if (tag === 257) h = val;
      }
      return w && h ? [w, h] : null;
    }
  } catch { /* header shorter than it claims */ }
  return null;
}

function formatNames() {
  return server.formats.map((f) => f.toUpperCase()).join(", ");
}

// What the server would refuse, found in the browser: type by magic bytes, size, pixels.
async function inspect(item) {
  const f = item.file;
  const lim = server.limits;
  if (f.size === 0) return bad(item, "empty file");
  if (lim.max_bytes && f.size > lim.max_bytes) return bad(item, `larger than the ${fmtBytes(lim.max_bytes)} limit`);
  const head = new Uint8Array(await f.slice(0, 512 * 1024).arrayBuffer());
  const format = server.formats.find((name) => SNIFF[name] && SNIFF[name](head));
  if (!format) return bad(item, `not a supported image (${formatNames()})`);
  item.format = format;
  const dims = dimensions(format, head);
  if (dims) {
    const [w, h] = dims;
    item.width = w; item.height = h;
    if (!w || !h) return bad(item, "the header says the image is empty");
    if (lim.max_side && Math.max(w, h) > lim.max_side) return bad(item, `${w}×${h}: a side is over the ${lim.max_side} px limit`);
    if (lim.max_pixels && w * h > lim.max_pixels) {
      return bad(item, `${w}×${h} is ${(w * h / 1e6).toFixed(1)} MP, over the ${(lim.max_pixels / 1e6).toFixed(1)} MP limit`);
    }
  }
  item.status = "ok";
  return item;
}

// Over the server's output limit at the Enlarge shown (changes with it): the reason, or "".
function outputProblem(c) {
  const max = server.limits.max_output_pixels;
  const up = controls.get("upscale")?.get() ?? 1;
  if (c.status !== "ok" || !c.width || !max || c.width * c.height * up * up <= max) return "";
  const fits = [4, 2, 1].find((f) => f < up && c.width * c.height * f * f <= max);
  const mp = (c.width * c.height * up * up / 1e6).toFixed(0);
  return `at ${up}× the result would be ${c.width * up}×${c.height * up} (${mp} MP), over the server's `
    + `${(max / 1e6).toFixed(0)} MP limit: ${fits ? `choose ${fits}× or less` : "export it smaller"}`;
}

// What Start sends: checked, and within the output limit at the Enlarge shown.
function usable(c) {
  return c.status === "ok" && !outputProblem(c);
}

function bad(item, reason) {
  item.status = "bad";
  item.reason = reason;
  return item;
}

async function walkEntry(entry, out) {
  if (entry.isFile) {
    const file = await new Promise((res, rej) => entry.file(res, rej));
    out.push({ file, path: entry.fullPath.replace(/^\//, "") });
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
      if (!batch.length) break;
      for (const e of batch) await walkEntry(e, out);
    }
  }
}

async function filesFromDrop(dt) {
  const out = [];
  const entries = [...(dt.items || [])].map((it) => (it.kind === "file" && it.webkitGetAsEntry ? it.webkitGetAsEntry() : null));
  if (entries.some(Boolean)) {
    for (const e of entries) if (e) await walkEntry(e, out);
  } else {
    for (const f of dt.files) out.push({ file: f, path: f.name });
  }
  return out;
}

async function addFiles(list) {
  $("start-msg").textContent = "";
  const known = new Set(chosen.map((c) => c.key));
  const fresh = [];
  for (const { file, path } of list) {
    if (baseName(path).startsWith(".")) continue; // .DS_Store and other hidden files
    const key = `${path}|${file.size}|${file.lastModified}`;
    if (known.has(key)) continue;
    known.add(key);
    const item = { file, path: path || file.name, key, status: "checking" };
    chosen.push(item);
    fresh.push(item);
  }
  renderReview();
  await Promise.all(fresh.map(inspect));
  const good = chosen.filter((c) => c.status === "ok");
  good.slice(server.maxFiles).forEach((c) => bad(c, `over the ${server.maxFiles} photos one job takes`));
  renderReview();
}

function renderReview() {
  const list = $("files");
  for (const c of chosen) {
    if (c.status === "ok" && !c.thumb) c.thumb = URL.createObjectURL(c.file);
  }
  list.replaceChildren(...chosen.map((c) => {
    const over = outputProblem(c);
    const status = over ? "bad" : c.status;
    const meta = c.status === "bad" ? c.reason
      : c.status === "checking" ? "checking…"
      : over || [fmtBytes(c.file.size), c.width ? `${c.width}×${c.height}` : "", c.format?.toUpperCase()].filter(Boolean).join(" · ");
    const pic = c.thumb ? el("img", { class: "thumb", src: c.thumb, alt: "", loading: "lazy" })
      : el("span", { class: "bad-icon", text: c.status === "bad" ? "!" : "…" });
    return el("li", { class: status, "data-name": baseName(c.path), title: c.path },
      pic,
      el("div", { class: "finfo" }, el("div", { class: "fname", text: c.path }), el("div", { class: "fmeta", text: meta })),
      el("button", { type: "button", class: "remove", "aria-label": `Remove ${c.path}`, text: "×", onclick: () => removeChosen(c) }));
  }));
  const good = chosen.filter(usable);
  const badCount = chosen.filter((c) => c.status === "bad" || outputProblem(c)).length;
  const size = good.reduce((n, c) => n + c.file.size, 0);
  $("summary").textContent = `${good.length} photo${good.length === 1 ? "" : "s"} · ${fmtBytes(size)}`
    + (badCount ? ` · ${badCount} left out` : "");
  $("review").hidden = chosen.length === 0 && uploading === null;
  placeJob();
  $("start").disabled = good.length === 0 || uploading !== null || chosen.some((c) => c.status === "checking");
  $("start").textContent = good.length ? `Start: enhance ${good.length} photo${good.length === 1 ? "" : "s"}` : "Start";
}

function removeChosen(c) {
  chosen.splice(chosen.indexOf(c), 1);
  if (c.thumb) URL.revokeObjectURL(c.thumb);
  renderReview();
}

function clearChosen(keepThumbs) {
  for (const c of chosen) if (c.thumb && !keepThumbs) URL.revokeObjectURL(c.thumb);
  chosen.length = 0;
  renderReview();
}

// ------------------------------------------------------------------ upload

let uploading = null; // the XMLHttpRequest in flight
const localFiles = new Map(); // job id -> [{name, url}] by item index (this browser's originals)

function startUpload() {
  const good = chosen.filter(usable);
  if (!good.length || uploading) return;
  const fields = optionFields();
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  // The relative path (a folder's structure) as the filename: the server keeps it in names.
  for (const c of good) form.append("files", c.file, c.path);
  const total = good.reduce((n, c) => n + c.file.size, 0);
  $("start-msg").textContent = "";
  sendUpload(form, total, good, true);
}

// `fromReview`: the upload is the review list's (cleared once the job exists), not a retry.
function sendUpload(form, total, good, fromReview) {
  const xhr = new XMLHttpRequest();
  uploading = xhr;
  renderReview();
  const bar = $("upload-bar");
  bar.value = 0; bar.max = 1;
  $("upload").dataset.progress = "0";
  $("upload").hidden = false;
  $("upload-text").textContent = `Sending ${fmtBytes(total)}…`;
  const t0 = performance.now();
  xhr.upload.addEventListener("progress", (e) => {
    if (!e.lengthComputable) return;
    bar.max = e.total; bar.value = e.loaded;
    $("upload").dataset.progress = (e.loaded / e.total).toFixed(3);
    const secs = (performance.now() - t0) / 1000;
    const rate = e.loaded / Math.max(secs, 0.001);
    const left = rate > 0 ? (e.total - e.loaded) / rate : null;
    $("upload-text").textContent = `${fmtBytes(e.loaded)} of ${fmtBytes(e.total)} · ${fmtBytes(rate)}/s`
      + (e.loaded < e.total && secs > 0.3 ? ` · ${fmtDuration(left)} left` : "");
  });
  xhr.upload.addEventListener("load", () => { $("upload-text").textContent = "Sent; the server is checking the photos…"; });
  const finish = () => { uploading = null; $("upload").hidden = true; bar.value = 0; renderReview(); };
  xhr.addEventListener("abort", () => { finish(); $("start-msg").textContent = "Upload cancelled; no job was started."; });
  xhr.addEventListener("error", () => { finish(); $("start-msg").textContent = "The upload failed (network error). Nothing was started; try again."; });
  xhr.addEventListener("load", async () => {
    finish();
    if (xhr.status === 401 && (await askKey(Boolean(auth.key)))) { sendUpload(form, total, good, fromReview); return; }
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status !== 202 || !body || !body.job_id) {
      const why = body && body.error ? body.error.message || body.error.code : `${xhr.status} ${xhr.statusText}`;
      $("start-msg").textContent = `The server refused the upload: ${why}`;
      return;
    }
    localFiles.set(body.job_id, good.map((c) => ({ name: c.path, url: c.thumb, file: c.file })));
    rememberJob(body.job_id);
    if (fromReview) clearChosen(true);
    openJob(body.job_id, true, body);
  });
  xhr.open("POST", u("v1/jobs"));
  for (const [k, v] of Object.entries(auth.headers())) xhr.setRequestHeader(k, v);
  xhr.send(form);
}

// ------------------------------------------------------------------ recent jobs

function rememberJob(id) {
  const ids = readJSON(JOBS_STORE, []).filter((x) => x !== id);
  ids.unshift(id);
  localStorage.setItem(JOBS_STORE, JSON.stringify(ids.slice(0, 50)));
}

function forgetJob(id) {
  localStorage.setItem(JOBS_STORE, JSON.stringify(readJSON(JOBS_STORE, []).filter((x) => x !== id)));
}

const knownJobs = new Map(); // id -> latest snapshot

async function loadJobList() {
  try {
    const r = await api(u("v1/jobs"));
    if (r.ok) for (const j of (await r.json()).jobs || []) knownJobs.set(j.job_id, j);
  } catch { /* the list is a convenience */ }
  // Jobs this browser made but the listing did not include (another server page, older).
  const missing = readJSON(JOBS_STORE, []).filter((id) => !knownJobs.has(id)).slice(0, 10);
  await Promise.all(missing.map(async (id) => {
    try {
      const r = await api(u(`v1/jobs/${encodeURIComponent(id)}`));
      if (r.ok) knownJobs.set(id, await r.json());
      else if (r.status === 404) forgetJob(id);
    } catch { /* offline: asked again on the next refresh */ }
  }));
  renderJobList();
}

function renderJobList() {
  const list = $("job-list");
  const jobs = [...knownJobs.values()].sort((a, b) => (b.created_at || 0) - (a.created_at || 0)).slice(0, 30);
  if (!jobs.length) { list.replaceChildren(el("li", { class: "muted", text: "No jobs yet" })); return; }
  list.replaceChildren(...jobs.map((j) => {
    const c = j.counts || {};
    const total = j.total ?? "?";
    const a = el("a", { href: u(`jobs/${j.job_id}`), "data-job": j.job_id, "aria-current": j.job_id === current?.id ? "page" : undefined },
      el("span", { text: `${total} photo${total === 1 ? "" : "s"} · ${fmtTime(j.created_at)}` }),
      el("span", { class: `badge ${j.state}`, text: j.state }),
      el("span", { class: "jl-sub", text: `${c.succeeded || 0} done${c.failed ? `, ${c.failed} failed` : ""}` }));
    a.addEventListener("click", (e) => {
      if (e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;
      e.preventDefault();
      openJob(j.job_id, true);
    });
    return el("li", {}, a);
  }));
}

// ------------------------------------------------------------------ one job

let current = null; // {id, abort, snap, items: Map(index -> row), shown, cards: Map}

function jobFromLocation() {
  const m = location.pathname.startsWith(BASE) && location.pathname.slice(BASE.length).match(/^jobs\/([^/]+)\/?$/);
  if (m) return decodeURIComponent(m[1]);
  const q = new URLSearchParams(location.search).get("job");
  if (q) return q;
  if (location.hash.length > 1) return decodeURIComponent(location.hash.slice(1));
  return null;
}

function openJob(id, push, first) {
  if (current && current.id === id) return;
  closeJob();
  const url = u(`jobs/${encodeURIComponent(id)}`);
  if (push) history.pushState({ job: id }, "", url);
  else if (location.pathname !== url) history.replaceState({ job: id }, "", url); // ?job= and #id become /jobs/id
  current = { id, abort: new AbortController(), snap: null, items: new Map(), shown: PAGE, cards: new Map(), refreshing: false, again: false };
  $("job-view").hidden = false;
  placeJob();
  $("grid").replaceChildren();
  $("retry-row").hidden = true;
  $("job-msg").textContent = "";
  $("job-title").textContent = "Loading job…";
  $("job-state").textContent = "";
  $("job-state").className = "badge";
  $("job-bar").value = 0;
  $("job-stats").textContent = "";
  $("job-options").textContent = "";
  if (first) onSnapshot(first);
  renderJobList();
  follow(current);
}

function closeJob() {
  if (!current) return;
  current.abort.abort();
  current = null;
  for (const u of blobUrls) URL.revokeObjectURL(u);
  blobUrls.clear();
}

function showNoJob() {
  closeJob();
  $("job-view").hidden = true;
  placeJob();
  renderJobList();
}

// The wide pane: the review list while photos are chosen or sent, the job, or the hint.
// On a phone (one column) an open job comes first unless photos are being chosen.
function placeJob() {
  const reviewing = chosen.length > 0 || uploading !== null;
  $("job-empty").hidden = reviewing || current !== null;
  document.querySelector(".layout").classList.toggle("job-first", current !== null && !reviewing);
}

// Progress from the event stream, read with fetch() so it can carry the key. The stream's
// normal end (the job ended, or the server closed an idle stream) is not an error; only a
// drop is, and it reconnects with backoff.
async function follow(job) {
  const signal = job.abort.signal;
  let delay = 1000;
  while (!signal.aborted) {
    let endedCleanly = false;
    try {
      const r = await api(u(`v1/jobs/${encodeURIComponent(job.id)}/events`), { signal, headers: { Accept: "text/event-stream" } });
      if (r.status === 404) { jobMissing(job); return; }
      if (!r.ok) throw new Error(await errorText(r));
      setNote(job, "");
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let at;
        while ((at = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, at);
          buf = buf.slice(at + 2);
          const ev = parseEvent(block);
          if (ev.event === "end") { endedCleanly = true; continue; }
          if (!ev.data) continue;
          const body = JSON.parse(ev.data);
          if (body.error) { $("job-msg").textContent = body.error.message || body.error.code; endedCleanly = true; continue; }
          delay = 1000;
          onSnapshot(body);
        }
      }
      if (job.snap && TERMINAL.has(job.snap.state)) endedCleanly = true;
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof SyntaxError) endedCleanly = false;
    }
    if (signal.aborted) return;
    if (job.snap && TERMINAL.has(job.snap.state)) { setNote(job, ""); return; }
    if (endedCleanly) { await sleep(1500, signal); continue; } // an idle stream closed: open a new one quietly
    setNote(job, `Connection lost; reconnecting in ${Math.round(delay / 1000)} s…`);
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 30000);
  }
}

function parseEvent(block) {
  const ev = { event: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") ev.event = value;
    else if (field === "data") ev.data += (ev.data ? "\n" : "") + value;
  }
  return ev;
}

function setNote(job, text) {
  if (job !== current) return;
  $("job-msg").textContent = text;
}

function jobMissing(job) {
  forgetJob(job.id);
  knownJobs.delete(job.id);
  if (job !== current) return;
  $("job-title").textContent = "Job not found";
  $("job-msg").textContent = `There is no job ${job.id} on this server (it may have been deleted, or belong to another key).`;
  for (const b of ["job-pause", "job-resume", "job-cancel"]) $(b).disabled = true;
  $("job-zip").setAttribute("aria-disabled", "true");
  renderJobList();
}

function onSnapshot(s) {
  const job = current;
  if (!job || s.job_id !== job.id) return;
  const before = job.snap;
  job.snap = s;
  knownJobs.set(s.job_id, s);
  const c = s.counts || {};
  const total = s.total ?? 0;
  const succeeded = c.succeeded || 0;
  const processed = succeeded + (c.failed || 0); // the bar: every photo the job is through with
  $("job-title").textContent = `${s.listing ? "Listing…" : `${total} photo${total === 1 ? "" : "s"}`} · ${fmtTime(s.created_at)}`;
  $("job-title").title = s.job_id;
  const badge = $("job-state");
  badge.textContent = s.state;
  badge.className = `badge ${s.state}`;
  const bar = $("job-bar");
  bar.max = Math.max(total, 1);
  bar.value = TERMINAL.has(s.state) && !total ? 1 : processed;
  const parts = [`<b>${succeeded}</b> of ${total} done`];
  if (c.failed) parts.push(`<b class="bad">${c.failed}</b> failed`);
  if (c.running && ACTIVE.has(s.state)) parts.push(`${c.running} in progress`);
  if (s.state === "paused" && total - processed > 0) parts.push(`${total - processed} waiting`);
  if (ACTIVE.has(s.state) && s.throughput) parts.push(`${s.throughput.toFixed(s.throughput < 1 ? 2 : 1)} photos/s`);
  if (ACTIVE.has(s.state) && s.eta_s != null) parts.push(`about ${fmtDuration(s.eta_s)} left`);
  if (TERMINAL.has(s.state) && s.started_at && s.finished_at) parts.push(`took ${fmtDuration(s.finished_at - s.started_at)}`);
  if (s.state === "cancelled" && total - processed > 0) parts.push(`${total - processed} not processed`);
  $("job-stats").innerHTML = parts.join(" · ");
  if (s.reason && s.state !== "completed") $("job-msg").textContent = s.reason;
  $("job-options").textContent = describeOptions(s.options || {});
  $("job-pause").disabled = !ACTIVE.has(s.state);
  $("job-resume").disabled = s.state !== "paused";
  $("job-cancel").disabled = TERMINAL.has(s.state);
  for (const b of ["job-pause", "job-resume", "job-cancel"]) $(b).hidden = TERMINAL.has(s.state);
  $("job-delete").hidden = !TERMINAL.has(s.state);
  if (TERMINAL.has(s.state) || !before) resetCancel(); // progress alone keeps a pending "Cancel?"
  const zip = $("job-zip");
  zip.href = u(`v1/jobs/${encodeURIComponent(s.job_id)}/results.zip`);
  zip.setAttribute("aria-disabled", c.succeeded ? "false" : "true");
  zip.textContent = c.succeeded && !TERMINAL.has(s.state) ? `Download ZIP (${c.succeeded} so far)` : "Download ZIP";
  const failed = c.failed || 0;
  $("retry-row").hidden = !(failed && TERMINAL.has(s.state));
  $("retry-text").textContent = `${failed} photo${failed === 1 ? "" : "s"} failed.`;
  renderJobList();
  const changed = !before || before.state !== s.state || before.done !== s.done || before.total !== s.total
    || JSON.stringify(before.counts) !== JSON.stringify(s.counts);
  if (changed) refreshItems(job);
}

function describeOptions(o) {
  const bits = [];
  if (o.upscale) bits.push(`enlarge ${o.upscale}×`);
  if ("face" in o) bits.push(o.face ? `${o.face_model ? modelLabel(o.face_model) : "faces"}${o.weight != null ? `, fidelity ${o.weight}` : ""}` : "no face restoration");
  if (o.bg_model) bits.push(`upscaler: ${modelLabel(o.bg_model)}`);
  bits.push(`format ${o.format || "as input"}`);
  for (const [k, v] of Object.entries(o)) {
    if (["upscale", "face", "face_model", "weight", "bg_model", "format", "preset", "tile"].includes(k)) continue;
    if (v === null || v === false || (k === "quality" && !["jpeg", "webp"].includes(o.format))) continue;
    bits.push(`${(LABELS[k] || k).toLowerCase()} ${v === true ? "on" : v}`);
  }
  return bits.join(" · ");
}

// Item rows for the shown range; one refresh at a time, another queued if asked meanwhile.
async function refreshItems(job) {
  if (job.refreshing) { job.again = true; return; }
  job.refreshing = true;
  try {
    do {
      job.again = false;
      const want = Math.min(job.shown, job.snap?.total ?? job.shown);
      for (let offset = 0; offset < want; offset += 1000) {
        const limit = Math.min(1000, want - offset);
        const r = await api(u(`v1/jobs/${encodeURIComponent(job.id)}/items?offset=${offset}&limit=${limit}`), { signal: job.abort.signal });
        if (!r.ok) break;
        for (const row of (await r.json()).items || []) job.items.set(row.index, row);
      }
      if (job === current) renderItems(job);
    } while (job.again && job === current);
  } catch { /* aborted or dropped: the next event refreshes */ } finally {
    job.refreshing = false;
  }
}

// An upload's name as sent (its folders too); another job's input by its last component.
function itemName(job, row) {
  const local = localFiles.get(job.id)?.[row.index];
  const source = job.snap?.kind === "upload" ? row.source : baseName(row.source);
  return local?.name || source || row.name || `#${row.index + 1}`;
}

function itemState(job, row) {
  if ((row.status === "pending" || row.status === "running") && job.snap && TERMINAL.has(job.snap.state)) return "not processed";
  if (row.status === "pending" && job.snap?.state === "paused") return "paused";
  return row.status;
}

const byName = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

// The grid's order (and the viewer's): by name (numbers in names in numeric order), failed first, or as sent.
function sortedRows(job) {
  const rows = [...job.items.values()];
  const how = $("sort").value;
  if (how === "index") return rows.sort((a, b) => a.index - b.index);
  const named = (a, b) => byName.compare(itemName(job, a), itemName(job, b)) || a.index - b.index;
  if (how === "failed") return rows.sort((a, b) => (b.status === "failed") - (a.status === "failed") || named(a, b));
  return rows.sort(named);
}

function renderItems(job) {
  const grid = $("grid");
  const rows = sortedRows(job);
  for (const row of rows) {
    const state = itemState(job, row);
    const sig = `${state}|${row.name}|${row.error?.code}`;
    let card = job.cards.get(row.index);
    if (card && card.dataset.sig === sig) continue;
    const fresh = makeCard(job, row, state);
    fresh.dataset.sig = sig;
    if (card) card.replaceWith(fresh); else grid.append(fresh);
    job.cards.set(row.index, fresh);
  }
  const order = rows.map((r) => job.cards.get(r.index));
  if (order.some((card, i) => grid.children[i] !== card)) grid.append(...order); // moves, not copies
  $("more").hidden = !(job.snap && job.snap.total > job.shown);
}

function makeCard(job, row, state) {
  const local = localFiles.get(job.id)?.[row.index];
  const pic = el("div", { class: "pic" });
  if (row.status === "succeeded") {
    const img = el("img", { alt: `Result: ${itemName(job, row)}`, loading: "lazy", decoding: "async" });
    setImage(img, resultUrl(job.id, row.index));
    pic.append(img);
  } else if (state === "failed") {
    if (local?.url) pic.append(el("img", { alt: "", src: local.url, class: "dim" }));
    pic.append(el("span", { class: "ph", text: "Failed" }));
  } else {
    if (local?.url) pic.append(el("img", { alt: "", src: local.url, class: "dim" }));
    if (state === "pending" || state === "running") pic.append(el("span", { class: "spin", "aria-hidden": "true" }));
    else pic.append(el("span", { class: "ph", text: state === "paused" ? "Paused" : "Not processed" }));
  }
  const line = el("div", { class: "line" },
    el("span", { class: `badge ${state === "not processed" ? "cancelled" : state}`, text: state }),
    el("span", { text: row.width ? `${row.width}×${row.height}` : "" }));
  const meta = el("div", { class: "meta" }, el("div", { class: "name", text: itemName(job, row), title: itemName(job, row) }), line);
  if (row.error) {
    // What to do about it first; the server's own words beside, for the curious and for support.
    meta.append(el("div", { class: "err", text: errorHelp(row.error), "data-code": row.error.code }),
      el("div", { class: "err-detail", text: row.error.message || row.error.code }));
  }
  const card = el("div", { class: "card", tabindex: 0, role: "button", "data-index": row.index, "data-state": state,
    "aria-label": `${itemName(job, row)}: ${state}` }, pic, meta);
  card.addEventListener("click", () => openViewer(row.index));
  card.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openViewer(row.index); } });
  return card;
}

// The job's failed photos as a new job, made by the server from what it kept (any device):
// with the job's own settings, or with the controls as shown.
async function retryFailed(changed) {
  const job = current;
  if (!job) return;
  const body = {};
  if (changed) {
    body.options = {};
    for (const [k, v] of Object.entries(readControls())) if (v !== null) body.options[k] = v;
  }
  const r = await api(u(`v1/jobs/${encodeURIComponent(job.id)}/retry`), {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (r.status !== 202) { $("job-msg").textContent = `Retry refused: ${await errorText(r)}`; return; }
  const snap = await r.json();
  // The new job's items are the failed ones in order: this browser's originals follow them.
  const mine = localFiles.get(job.id);
  if (mine) {
    const failed = [...job.items.values()].filter((row) => row.status === "failed").sort((a, b) => a.index - b.index);
    if (failed.length === snap.total) localFiles.set(snap.job_id, failed.map((row) => mine[row.index]));
  }
  rememberJob(snap.job_id);
  openJob(snap.job_id, true, snap);
}

function sourceUrl(id, index) {
  return u(`v1/jobs/${encodeURIComponent(id)}/items/${index}/source`);
}

function resultUrl(id, index) {
  return u(`v1/jobs/${encodeURIComponent(id)}/items/${index}/result`);
}

async function control(action) {
  const job = current;
  if (!job) return;
  const r = await api(u(`v1/jobs/${encodeURIComponent(job.id)}/${action}`), { method: "POST" });
  if (!r.ok) { $("job-msg").textContent = await errorText(r); return; }
  $("job-msg").textContent = "";
  onSnapshot(await r.json());
  if (action === "resume" && job === current && job.abort.signal.aborted === false) { /* the stream follows */ }
}

// Every destructive action (cancel a job, delete a job or a preset) follows one rule: the
// first press asks ("Press again to …"), a second within a few seconds does it.
const confirmTimers = {};
function disarm(id, label) {
  clearTimeout(confirmTimers[id]);
  $(id).textContent = label;
  delete $(id).dataset.armed;
}
function resetCancel() { disarm("job-cancel", "Cancel"); disarm("job-delete", "Delete"); }
function resetPresetDelete() { disarm("preset-delete", "Delete"); }
function armed(id, question, label) {
  const b = $(id);
  if (b.dataset.armed) { disarm(id, label); return true; }
  b.dataset.armed = "1";
  b.textContent = question;
  confirmTimers[id] = setTimeout(() => disarm(id, label), 4000);
  return false;
}

function onCancel() {
  if (armed("job-cancel", "Press again to cancel the job", "Cancel")) control("cancel");
}

async function onDelete() {
  const job = current;
  if (!job || !armed("job-delete", "Press again to delete the job", "Delete")) return;
  const r = await api(u(`v1/jobs/${encodeURIComponent(job.id)}`), { method: "DELETE" });
  if (!r.ok && r.status !== 404) { $("job-msg").textContent = await errorText(r); return; }
  forgetJob(job.id);
  knownJobs.delete(job.id);
  localFiles.delete(job.id);
  history.pushState({}, "", BASE);
  showNoJob();
}

// ------------------------------------------------------------------ the viewer

const view = { index: null, mode: "slider", scale: 1, cx: 0, cy: 0, iw: 0, ih: 0, split: 0.5, fitted: true, faces: true, opener: null };

function viewerRows() {
  return current ? sortedRows(current) : [];
}

function openViewer(index) {
  const job = current;
  const row = job?.items.get(index);
  if (!row) return;
  view.index = index;
  const rows = viewerRows();
  const name = itemName(job, row);
  $("v-name").textContent = name;
  $("v-pos").textContent = `${rows.findIndex((r) => r.index === index) + 1} / ${job.snap?.total ?? rows.length}`;
  const local = localFiles.get(job.id)?.[index];
  const after = $("v-after"), beforeImg = $("v-before");
  after.removeAttribute("src"); beforeImg.removeAttribute("src");
  const hasAfter = row.status === "succeeded";
  // An upload's original comes from the server when this browser did not upload it.
  const remoteBefore = !local?.url && job.snap?.kind === "upload";
  const hasBefore = Boolean(local?.url) || remoteBefore;
  const note = [];
  if (!hasAfter) note.push(row.error ? `Failed: ${errorHelp(row.error)}` : `Not done yet (${itemState(job, row)})`);
  if (hasAfter && !hasBefore) note.push("The original is not on this device: showing the result only");
  $("v-note").textContent = note.join(". ");
  $("v-stage").classList.toggle("single", !(hasAfter && hasBefore));
  $("v-pane-before").querySelector(".v-label").textContent = hasAfter ? "Before" : "Original";
  $("v-download").setAttribute("aria-disabled", hasAfter ? "false" : "true");
  $("v-download").href = hasAfter ? resultUrl(job.id, index) : "#";
  $("v-download").download = baseName(row.name || name);
  const boxes = hasAfter ? row.face_boxes || [] : [];
  const faces = hasAfter && row.faces ? ` · ${row.faces} face${row.faces === 1 ? "" : "s"}` : "";
  $("v-info").textContent = hasAfter ? `${row.width}×${row.height} ${String(row.format || "").toUpperCase()} · ${fmtBytes(row.bytes || 0)}${faces}` : "";
  outlineFaces(boxes, row.width, row.height);
  const main = hasAfter ? after : beforeImg;
  const ready = () => {
    view.iw = main.naturalWidth; view.ih = main.naturalHeight;
    fit();
  };
  main.onload = ready;
  if (hasAfter) setImage(after, resultUrl(job.id, index));
  if (local?.url) beforeImg.src = local.url;
  else if (remoteBefore) setImage(beforeImg, sourceUrl(job.id, index));
  if (!hasAfter && hasBefore) $("v-pane-before").hidden = false;
  $("v-pane-after").hidden = !hasAfter;
  $("v-pane-before").hidden = !hasBefore;
  if (!hasAfter && !hasBefore) { view.iw = 0; }
  const v = $("viewer");
  if (v.hidden) {
    view.opener = job.cards.get(index) || document.activeElement; // where Esc returns focus
    v.hidden = false;
    document.body.style.overflow = "hidden";
    $("v-stage").focus();
  }
  setMode(view.mode);
}

// Each face the server restored, outlined over before and after alike (the before image is
// the same picture at a smaller size, so the output's proportions place it there too).
function outlineFaces(boxes, width, height) {
  for (const layer of document.querySelectorAll(".v-faces")) {
    layer.replaceChildren(...boxes.map(([x, y, w, h]) => {
      const s = document.createElement("span");
      s.style.left = `${(100 * x) / width}%`; s.style.top = `${(100 * y) / height}%`;
      s.style.width = `${(100 * w) / width}%`; s.style.height = `${(100 * h) / height}%`;
      return s;
    }));
  }
  $("v-faces").hidden = boxes.length === 0;
  showFaces(view.faces);
}

function showFaces(on) {
  view.faces = on;
  $("v-faces").setAttribute("aria-pressed", String(on));
  $("v-stage").classList.toggle("no-faces", !on);
}

function closeViewer() {
  $("viewer").hidden = true;
  document.body.style.overflow = "";
  const back = view.opener?.isConnected ? view.opener : current?.cards.get(view.index);
  back?.focus();
  view.index = null;
  view.opener = null;
}

// The viewer is a modal dialog: Tab and Shift+Tab cycle through its visible controls only.
function viewerFocusables() {
  return [...$("viewer").querySelectorAll('button, a[href], input, select, [tabindex]:not([tabindex="-1"])')]
    .filter((el) => !el.disabled && el.getClientRects().length > 0);
}
function trapTab(e) {
  const all = viewerFocusables();
  if (!all.length) return;
  e.preventDefault();
  const at = all.indexOf(document.activeElement);
  const next = at < 0 ? (e.shiftKey ? all.length - 1 : 0) : (at + (e.shiftKey ? -1 : 1) + all.length) % all.length;
  all[next].focus();
}

function stepViewer(delta) {
  const rows = viewerRows();
  const at = rows.findIndex((r) => r.index === view.index);
  const next = rows[at + delta];
  if (next) openViewer(next.index);
}

function setMode(mode) {
  view.mode = mode;
  const stage = $("v-stage");
  stage.classList.toggle("slider", mode === "slider");
  stage.classList.toggle("split", mode === "split");
  for (const b of document.querySelectorAll("[data-mode]")) b.setAttribute("aria-pressed", String(b.dataset.mode === mode));
  if (view.fitted) fit(); else layout();
}

function paneSize() {
  const r = $("v-stage").getBoundingClientRect();
  const split = view.mode === "split" && !$("v-stage").classList.contains("single");
  return { w: split ? r.width / 2 : r.width, h: r.height, left: r.left, top: r.top };
}

function fit() {
  if (!view.iw) return;
  const p = paneSize();
  view.scale = Math.min(p.w / view.iw, p.h / view.ih);
  view.cx = view.iw / 2; view.cy = view.ih / 2;
  view.fitted = true;
  layout();
}

function zoomTo(scale, px, py) {
  if (!view.iw) return;
  const p = paneSize();
  const mx = px ?? p.w / 2, my = py ?? p.h / 2;
  const ix = view.cx + (mx - p.w / 2) / view.scale;
  const iy = view.cy + (my - p.h / 2) / view.scale;
  view.scale = Math.min(Math.max(scale, 0.02), 16);
  view.cx = ix - (mx - p.w / 2) / view.scale;
  view.cy = iy - (my - p.h / 2) / view.scale;
  view.fitted = false;
  layout();
}

function layout() {
  if (!view.iw) return;
  const p = paneSize();
  // Keep some of the image on screen.
  view.cx = Math.min(Math.max(view.cx, 0), view.iw);
  view.cy = Math.min(Math.max(view.cy, 0), view.ih);
  const w = view.iw * view.scale, h = view.ih * view.scale;
  const tx = p.w / 2 - view.cx * view.scale, ty = p.h / 2 - view.cy * view.scale;
  for (const layer of document.querySelectorAll(".v-layer")) {
    layer.style.width = `${w}px`;
    layer.style.height = `${h}px`;
    layer.style.transform = `translate(${tx}px, ${ty}px)`;
  }
  $("v-stage").style.setProperty("--split", `${view.split * 100}%`);
  $("v-zoom").textContent = `${Math.round(view.scale * 100)}%`;
  const pixelated = view.scale >= 2;
  $("v-after").style.imageRendering = pixelated ? "pixelated" : "";
}

function setupViewer() {
  const stage = $("v-stage");
  const pointers = new Map();
  let drag = null;
  stage.addEventListener("pointerdown", (e) => {
    stage.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    const p = paneSize();
    const onDivider = view.mode === "slider" && !stage.classList.contains("single")
      && Math.abs(e.clientX - p.left - view.split * p.w) < 22;
    drag = { divider: onDivider, x: e.clientX, y: e.clientY };
    stage.classList.add("dragging");
  });
  stage.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    const prev = pointers.get(e.pointerId);
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    const p = paneSize();
    if (pointers.size === 2) {
      // Pinch: scale by the change in finger distance, around their midpoint.
      const [a, b] = [...pointers.values()];
      const other = [...pointers.entries()].find(([id]) => id !== e.pointerId)[1];
      const before = Math.hypot(prev.x - other.x, prev.y - other.y);
      const now = Math.hypot(a.x - b.x, a.y - b.y);
      if (before > 0) zoomTo(view.scale * (now / before), (a.x + b.x) / 2 - p.left, (a.y + b.y) / 2 - p.top);
      return;
    }
    if (!drag) return;
    if (drag.divider) {
      view.split = Math.min(Math.max((e.clientX - p.left) / p.w, 0), 1);
      layout();
      return;
    }
    view.cx -= (e.clientX - prev.x) / view.scale;
    view.cy -= (e.clientY - prev.y) / view.scale;
    view.fitted = false;
    layout();
  });
  const up = (e) => {
    pointers.delete(e.pointerId);
    if (!pointers.size) { drag = null; stage.classList.remove("dragging"); }
  };
  stage.addEventListener("pointerup", up);
  stage.addEventListener("pointercancel", up);
  stage.addEventListener("wheel", (e) => {
    e.preventDefault();
    const p = paneSize();
    const x = (e.clientX - p.left) % p.w;
    zoomTo(view.scale * Math.exp(-e.deltaY * 0.0015), x, e.clientY - p.top);
  }, { passive: false });
  stage.addEventListener("dblclick", (e) => {
    const p = paneSize();
    if (view.fitted) zoomTo(1, (e.clientX - p.left) % p.w, e.clientY - p.top); else fit();
  });
  $("v-in").addEventListener("click", () => zoomTo(view.scale * 1.5));
  $("v-out").addEventListener("click", () => zoomTo(view.scale / 1.5));
  $("v-fit").addEventListener("click", fit);
  $("v-full").addEventListener("click", () => zoomTo(1));
  $("v-faces").addEventListener("click", () => showFaces(!view.faces));
  $("v-close").addEventListener("click", closeViewer);
  $("v-prev").addEventListener("click", () => stepViewer(-1));
  $("v-next").addEventListener("click", () => stepViewer(1));
  for (const b of document.querySelectorAll("[data-mode]")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("v-download").addEventListener("click", (e) => {
    if (!auth.key) return; // the plain link works
    e.preventDefault();
    download($("v-download").href, $("v-download").download);
  });
  document.addEventListener("keydown", (e) => {
    if ($("viewer").hidden || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.key === "Tab") { trapTab(e); return; }
    const keys = {
      Escape: closeViewer, ArrowLeft: () => stepViewer(-1), ArrowRight: () => stepViewer(1),
      "+": () => zoomTo(view.scale * 1.5), "=": () => zoomTo(view.scale * 1.5), "-": () => zoomTo(view.scale / 1.5),
      0: fit, 1: () => zoomTo(1), s: () => setMode(view.mode === "slider" ? "split" : "slider"),
      f: () => showFaces(!view.faces),
    };
    const f = keys[e.key];
    if (f) { e.preventDefault(); f(); }
  });
  // Focus that lands outside the open viewer anyway (a click on the page behind) comes back.
  document.addEventListener("focusin", (e) => {
    if (!$("viewer").hidden && !$("viewer").contains(e.target)) $("v-stage").focus();
  });
  window.addEventListener("resize", () => { if (!$("viewer").hidden) { if (view.fitted) fit(); else layout(); } });
}

// ------------------------------------------------------------------ wiring

function setupChoosing() {
  const drop = $("drop");
  const pick = (input) => { input.value = ""; input.click(); };
  $("pick-files").addEventListener("click", () => pick($("file-input")));
  $("pick-folder").addEventListener("click", () => pick($("folder-input")));
  // A click on the zone's empty space picks photos; its buttons pick for themselves. (The
  // inputs sit outside the zone: input.click() bubbles, and a second picker would win.)
  drop.addEventListener("click", (e) => { if (!e.target.closest("button")) pick($("file-input")); });
  for (const id of ["file-input", "folder-input"]) {
    $(id).addEventListener("change", (e) => {
      addFiles([...e.target.files].map((f) => ({ file: f, path: f.webkitRelativePath || f.name })));
    });
  }
  // Dropping anywhere on the page adds to the list; the drop zone lights up.
  let depth = 0;
  document.addEventListener("dragenter", (e) => { if (e.dataTransfer?.types.includes("Files")) { depth++; drop.classList.add("over"); } });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) drop.classList.remove("over"); });
  document.addEventListener("dragover", (e) => { if (e.dataTransfer?.types.includes("Files")) e.preventDefault(); });
  document.addEventListener("drop", async (e) => {
    if (!e.dataTransfer?.types.includes("Files")) return;
    e.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    addFiles(await filesFromDrop(e.dataTransfer));
  });
  $("clear").addEventListener("click", () => clearChosen(false));
  $("start").addEventListener("click", startUpload);
  $("upload-cancel").addEventListener("click", () => uploading?.abort());
  $("preset").addEventListener("change", (e) => { if (e.target.value) applyPreset(e.target.value); else updatePresetButtons(); saveForm(); });
  $("preset-save").addEventListener("click", savePreset);
  $("preset-name").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); savePreset(); } });
  $("preset-delete").addEventListener("click", deletePreset);
}

function setupJobView() {
  $("job-pause").addEventListener("click", () => control("pause"));
  $("job-resume").addEventListener("click", () => control("resume"));
  $("job-cancel").addEventListener("click", onCancel);
  $("job-delete").addEventListener("click", onDelete);
  $("job-zip").addEventListener("click", (e) => {
    e.preventDefault();
    if (!current || $("job-zip").getAttribute("aria-disabled") === "true") return;
    download($("job-zip").href, `${current.id}.zip`);
  });
  $("more").addEventListener("click", () => { if (current) { current.shown += PAGE; refreshItems(current); } });
  $("sort").addEventListener("change", () => { if (current) renderItems(current); });
  $("retry-same").addEventListener("click", () => retryFailed(false));
  $("retry-changed").addEventListener("click", () => retryFailed(true));
  $("key-button").addEventListener("click", async () => {
    localStorage.removeItem(KEY_STORE);
    await askKey(false);
    location.reload();
  });
  window.addEventListener("popstate", () => {
    const id = jobFromLocation();
    if (id) openJob(id, false); else showNoJob();
  });
}

async function main() {
  setupChoosing();
  setupJobView();
  setupViewer();
  $("key-button").hidden = !auth.key;
  const id = jobFromLocation();
  if (id) openJob(id, false);
  try {
    await loadServer();
  } catch (e) {
    $("start-msg").textContent = `Cannot reach the server: ${e.message}`;
  }
  await loadJobList();
  // The list also shows jobs started elsewhere; refresh it now and then while visible.
  setInterval(() => { if (!document.hidden) loadJobList(); }, 15000);
}

main();
