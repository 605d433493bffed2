// New run: a preset, a form generated from the config's JSON schema (so a new config key appears here
// without UI work), the YAML that will run, the plan (fits? memory, time and cost), and Start.

import { get, post } from "./api.js";
import { h, put, table, num, duration } from "./dom.js";
import { stackedBar } from "./charts.js";
import { DEFAULT_MODEL, fileOptions } from "./data.js";

const GENERAL = "general";

/** The property's own schema with $ref and `X | None` unwrapped; nullable tells whether null is allowed. */
function resolve(schema, prop) {
  let nullable = false, node = prop;
  if (node.anyOf) {
    const kinds = node.anyOf.filter((k) => k.type !== "null");
    nullable = kinds.length < node.anyOf.length;
    node = kinds.length === 1 ? { ...kinds[0], ...node, anyOf: undefined } : node;
  }
  if (node.allOf && node.allOf.length === 1) node = { ...node.allOf[0], ...node, allOf: undefined };
  if (node.$ref) node = { ...schema.$defs[node.$ref.split("/").pop()], ...node, $ref: undefined };
  return { node, nullable };
}

function getPath(obj, dotted) {
  return dotted.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
}

function setPath(obj, dotted, value) {
  const parts = dotted.split(".");
  const leaf = parts.pop();
  let node = obj;
  for (const part of parts) {
    if (!node[part] || typeof node[part] !== "object") node[part] = {};
    node = node[part];
  }
  if (value === undefined) delete node[leaf]; else node[leaf] = value;
}

function range(node) {
  const lo = node.minimum ?? node.exclusiveMinimum, hi = node.maximum ?? node.exclusiveMaximum;
  if (lo === undefined && hi === undefined) return "";
  const open = node.exclusiveMinimum !== undefined ? "(" : "[", close = node.exclusiveMaximum !== undefined ? ")" : "]";
  return `range ${open}${lo ?? "−∞"}, ${hi ?? "∞"}${close}`;
}

function shown(value) {
  return value === null || value === undefined ? "none" : typeof value === "object" ? JSON.stringify(value) : String(value);
}

/** One field: its input (by type), description, default and range. onChange(key, value | undefined).
 *  choices, when given, narrows an enum to what a studio job may use (x-studio's method_types, tasks). */
function field(schema, key, prop, value, onChange, choices) {
  const { node, nullable } = resolve(schema, prop);
  const type = node.type;
  let input;
  const attrs = { id: `f-${key}`, "data-key": key, name: key };
  if (node.enum) {
    input = h("select", { ...attrs, onchange: () => onChange(key, input.value === "" ? undefined : input.value) },
      h("option", { value: "" }, `default (${shown(node.default)})`),
      (choices || node.enum).map((option) => h("option", { value: option, selected: value === option }, String(option))));
  } else if (type === "boolean") {
    input = h("input", { ...attrs, type: "checkbox", checked: Boolean(value ?? node.default),
      onchange: () => onChange(key, input.checked) });
  } else if (type === "integer" || type === "number") {
    input = h("input", { ...attrs, type: "number", value: value ?? "", placeholder: shown(node.default),
      min: node.minimum ?? node.exclusiveMinimum, max: node.maximum ?? node.exclusiveMaximum,
      step: type === "integer" ? 1 : "any",
      onchange: () => onChange(key, input.value === "" ? undefined : Number(input.value)) });
  } else if (type === "string") {
    input = h("input", { ...attrs, type: "text", value: value ?? "", placeholder: shown(node.default),
      onchange: () => onChange(key, input.value === "" ? undefined : input.value) });
  } else {
    input = h("input", { ...attrs, type: "text", class: "json", value: value === undefined ? "" : JSON.stringify(value),
      placeholder: shown(node.default), title: "JSON",
      onchange: () => {
        if (input.value === "") return onChange(key, undefined);
        try { onChange(key, JSON.parse(input.value)); } catch { onChange(key, input.value); }
      } });
  }
  const notes = [`default ${shown(node.default)}`, range(node), nullable ? "may be empty" : ""].filter(Boolean).join("; ");
  return h("div", { class: "field", "data-field": key },
    h("label", { for: attrs.id }, key.split(".").pop()), input,
    h("div", { class: "help" }, prop.description || node.description || "", h("span", { class: "muted" }, ` (${notes})`)),
    h("div", { class: "field-error", "data-error-for": key }));
}

/** The form's sections: top-level scalars under "general", each object-valued key a section of its own. */
function sections(schema, owned) {
  const out = new Map([[GENERAL, []]]);
  for (const [key, prop] of Object.entries(schema.properties)) {
    if (owned.includes(key)) continue;
    const { node } = resolve(schema, prop);
    if (node.properties) out.set(key, Object.entries(node.properties).map(([sub, p]) => [`${key}.${sub}`, p]));
    else out.get(GENERAL).push([key, prop]);
  }
  return out;
}

export async function newRunPage(root, _params, query) {
  const [schema, presets, files] = await Promise.all([
    get("/v1/tuneforge/schema"), get("/v1/tuneforge/presets"), get("/v1/files")]);
  const studio = schema["x-studio"] || {};
  const choices = { method: studio.method_types, task: studio.tasks };
  let config = {};
  let jobRequest = null;
  let timer = null;

  const presetSelect = h("select", { id: "preset", onchange: () => choosePreset(presetSelect.value) },
    h("option", { value: "" }, "start from a preset"),
    presets.data.map((p) => h("option", { value: p.name }, `${p.title}`)));
  const presetNote = h("p", { class: "muted", id: "preset-note" });
  const fileSelect = h("select", { id: "training-file", onchange: () => { edited(); refresh(); } },
    h("option", { value: "" }, files.data.length ? "choose a training file" : "upload one on the Data tab first"),
    fileOptions(files.data, query.get("file")));
  const validationSelect = h("select", { id: "validation-file", onchange: () => { edited(); refresh(); } },
    h("option", { value: "" }, "none (no validation loss; reviews use the training file's last records)"),
    fileOptions(files.data));
  const modelInput = h("input", { id: "base-model", value: DEFAULT_MODEL, size: 30,
    onchange: () => { setPath(config, "base_model", modelInput.value); edited(); refresh(); } });
  const form = h("form", { id: "config-form", onsubmit: (event) => event.preventDefault() });
  const errorList = h("ul", { id: "config-errors", class: "errors" });
  const warningList = h("ul", { id: "config-warnings", class: "warnings" });
  const yamlBox = h("textarea", { id: "yaml", rows: 18, spellcheck: "false" });
  const planBox = h("section", { class: "card", id: "plan" }, h("h2", {}, "Plan"), h("p", { class: "muted" }, "…"));
  const start = h("button", { id: "start", class: "primary", disabled: true, onclick: async () => {
    start.disabled = true;
    try {
      if (!jobRequest) await refresh();
      if (!jobRequest) return; // the config has errors: they are listed above the form
      const job = await post("/v1/fine_tuning/jobs", jobRequest);
      location.hash = `#/runs/${job.id}`;
    } finally { start.disabled = false; }
  } }, "Start");

  // Each edit makes the last answer stale: Start then asks again first, so it never posts a job request from
  // before the latest edit (a field's change event fires as Start is clicked).
  let edits = 0;
  let unstartable = false; // a preset a studio job cannot run yet (its note says why)
  const edited = () => { edits += 1; jobRequest = null; };
  const onChange = (key, value) => {
    if (JSON.stringify(getPath(config, key)) === JSON.stringify(value)) return;
    setPath(config, key, value);
    edited();
    schedule();
  };

  function renderForm() {
    put(form, [...sections(schema, studio.owned || [])].map(([name, fields]) => h("details",
      { class: "section", open: name === GENERAL || name === "lora", "data-section": name },
      h("summary", {}, name), fields.map(([key, prop]) => field(schema, key, prop, getPath(config, key), onChange,
        choices[key])))));
    modelInput.value = config.base_model || DEFAULT_MODEL;
  }

  function choosePreset(name) {
    const preset = presets.data.find((p) => p.name === name);
    config = preset ? structuredClone(preset.config) : {};
    presetNote.textContent = preset ? [preset.description, preset.note].filter(Boolean).join(" ") : "";
    unstartable = Boolean(preset && preset.startable === false);
    edited();
    renderForm();
    refresh();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 400);
  }

  function body(extra) {
    const out = { ...extra };
    if (fileSelect.value) out.training_file = fileSelect.value;
    if (validationSelect.value) out.validation_file = validationSelect.value;
    return out;
  }

  function showErrors(errors) {
    form.querySelectorAll("[data-error-for]").forEach((el) => { el.textContent = ""; });
    put(errorList, errors.map((e) => h("li", {}, h("code", {}, e.key || "config"), ": ", e.message)));
    for (const e of errors) {
      const slot = form.querySelector(`[data-error-for="${CSS.escape(e.key || "")}"]`);
      if (slot) slot.textContent = e.message;
    }
  }

  /** Show the normalised config (defaults filled in, the studio's own included) in every field not being edited. */
  function syncForm(normalised) {
    for (const input of form.querySelectorAll("[data-key]")) {
      if (input === document.activeElement) continue;
      const value = getPath(normalised, input.dataset.key);
      if (input.type === "checkbox") input.checked = Boolean(value);
      else if (input.classList.contains("json")) input.value = value === undefined || value === null ? "" : JSON.stringify(value);
      else input.value = value === undefined || value === null ? "" : String(value);
    }
  }

  async function check(payload) {
    const asked = edits;
    const answer = await post("/v1/tuneforge/config", body(payload), { source: "config" });
    if (asked !== edits) return { ...answer, ok: false }; // a newer edit's answer follows
    yamlBox.value = answer.yaml;
    if (answer.config) syncForm(answer.config);
    showErrors(answer.errors || []);
    jobRequest = answer.ok ? answer.job_request : null;
    start.disabled = !(answer.ok && fileSelect.value) || unstartable;
    start.title = unstartable ? presetNote.textContent : fileSelect.value ? "" : "choose a training file first";
    put(warningList, (answer.warnings || []).map((w) => h("li", {}, w)));
    return answer;
  }

  async function refresh() {
    clearTimeout(timer);
    const answer = await check({ config });
    if (answer.ok) renderPlan(await post("/v1/tuneforge/plan", body({ config }), { source: "plan" }));
  }

  function renderPlan(plan) {
    put(planBox, h("h2", {}, "Plan"),
      h("p", { id: "plan-fits", class: plan.fits ? "ok" : "bad" },
        plan.fits ? `Fits on ${plan.device}` : `Does not fit on ${plan.device}`,
        `: peak memory ${num(plan.peak_memory_gb, 3)} GB`),
      stackedBar(plan.memory_by_part),
      table(["GPU", "fits", "peak GB", "time", "cost (USD)"], (plan.rows || []).map((r) => [
        r.gpu, r.fits ? "yes" : "no", num(r.peak_memory_gb, 3), duration(r.hours),
        r.cost_usd === null || r.cost_usd === undefined ? "–" : r.cost_usd.toFixed(2)]), { id: "plan-rows" }),
      plan.recommendation ? h("p", { id: "plan-recommendation" }, "Recommended: ", h("b", {}, String(plan.recommendation))) : null,
      plan.data && plan.data.how ? h("p", { class: "muted" }, `Data: ${plan.data.how}`) : null,
      (plan.warnings || []).length ? h("ul", { class: "warnings" }, plan.warnings.map((w) => h("li", {}, w))) : null,
      (plan.notes || []).length ? h("ul", { class: "muted" }, plan.notes.map((n) => h("li", {}, n))) : null);
  }

  const copy = h("button", { id: "copy-yaml", type: "button", onclick: async () => {
    try { await navigator.clipboard.writeText(yamlBox.value); copy.textContent = "Copied"; } catch {
      yamlBox.select(); document.execCommand("copy"); copy.textContent = "Copied";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  } }, "Copy");
  const apply = h("button", { id: "apply-yaml", type: "button", onclick: async () => {
    edited();
    const answer = await check({ yaml: yamlBox.value });
    if (answer.config) {
      // Adopt what the YAML says, less the keys the studio sets itself (it refuses them in a job's settings);
      // the base model has its own box above the form.
      config = Object.fromEntries(Object.entries(answer.config)
        .filter(([key]) => key === "base_model" || !(studio.owned || []).includes(key)));
      renderForm();
      if (answer.ok) renderPlan(await post("/v1/tuneforge/plan", body({ config }), { source: "plan" }));
    }
  } }, "Apply");

  put(root, h("h1", {}, "New run"),
    h("section", { class: "card row" }, h("label", {}, "Preset ", presetSelect),
      h("label", {}, "Training file ", fileSelect), h("label", {}, "Validation file ", validationSelect),
      h("label", {}, "Base model ", modelInput),
      start),
    presetNote,
    h("div", { class: "columns" },
      h("section", { class: "card" }, h("h2", {}, "Settings"), errorList, warningList, form),
      h("div", {}, planBox,
        h("section", { class: "card" }, h("h2", {}, "The YAML this runs"),
          h("p", { class: "muted" }, "Paste a config here and press Apply to fill the form."), yamlBox,
          h("div", { class: "row" }, copy, apply)))));
  const first = presets.data.find((p) => p.name === query.get("preset"));
  if (first) { presetSelect.value = first.name; choosePreset(first.name); } else { renderForm(); refresh(); }
}
