// Data: upload or pick a file; what `tuneforge data check` finds, the examples as the model sees them,
// their lengths, and conversion to the messages format.

import { get, post, api } from "./api.js";
import { h, put, table, size, num } from "./dom.js";
import { histogram } from "./charts.js";

export const DEFAULT_MODEL = "smollm2-135m-instruct";

/** <option>s for a list of uploaded files, one of them selected. */
export function fileOptions(files, selected) {
  return files.map((f) => h("option", { value: f.id, selected: f.id === selected }, `${f.filename} (${f.id}, ${size(f.bytes)})`));
}

export async function dataPage(root, [fileId], query) {
  const model = query.get("model") || DEFAULT_MODEL;
  const method = query.get("method") || "sft";
  const chooser = h("input", { id: "upload-file", type: "file", accept: ".jsonl,.json,application/json" });
  const uploadForm = h("form", { id: "upload", class: "row", onsubmit: async (event) => {
    event.preventDefault();
    if (!chooser.files.length) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", chooser.files[0]);
    const file = await api("POST", "/v1/files", form);
    location.hash = `#/data/${file.id}?model=${encodeURIComponent(model)}&method=${method}`;
  } }, h("label", {}, "Upload a JSONL file ", chooser), h("button", { type: "submit" }, "Upload"));

  const files = (await get("/v1/files")).data;
  const picker = h("select", { id: "file-pick", onchange: () => {
    location.hash = `#/data/${picker.value}?model=${encodeURIComponent(model)}&method=${method}`;
  } }, h("option", { value: "" }, files.length ? "choose an uploaded file" : "no files uploaded yet"),
  fileOptions(files, fileId));
  const modelInput = h("input", { id: "check-model", value: model, size: 28 });
  const methodSelect = h("select", { id: "check-method" },
    ["sft", "dpo"].map((m) => h("option", { value: m, selected: m === method }, m)));
  const settings = h("form", { class: "row", onsubmit: (event) => {
    event.preventDefault();
    location.hash = `#/data/${fileId || ""}?model=${encodeURIComponent(modelInput.value)}&method=${methodSelect.value}`;
  } }, h("label", {}, "Pick a file ", picker), h("label", {}, "Tokenizer of ", modelInput),
  h("label", {}, "Method ", methodSelect), h("button", { type: "submit" }, "Check again"));

  put(root, h("h1", {}, "Data"), h("section", { class: "card" }, uploadForm, settings));
  if (!fileId) {
    root.append(h("p", { class: "muted" }, "Upload a file or pick one to see its check, its examples as the model sees them, and its lengths."));
    return;
  }
  const q = `model=${encodeURIComponent(model)}&method=${method}`;
  const base = `/v1/tuneforge/files/${fileId}`;
  // One after the other: the first loads the tokenizer, the next two reuse it.
  const settle = (promise) => promise.then((value) => ({ status: "fulfilled", value }), () => ({ status: "rejected" }));
  const check = await settle(get(`${base}/check?${q}`));
  const stats = await settle(get(`${base}/stats?${q}`));
  const preview = await settle(get(`${base}/preview?${q}&n=5`));
  const actions = h("div", { class: "row" },
    h("a", { class: "button", id: "use-file", href: `#/new?file=${fileId}` }, "Train on this file"),
    h("button", { id: "convert", onclick: async () => {
      const file = await post(`${base}/convert`, { to: "messages" });
      location.hash = `#/data/${file.id}?${q}`;
    } }, "Convert to messages"));
  root.append(h("section", { class: "card" }, actions));
  if (check.status === "fulfilled") root.append(findings(check.value));
  if (stats.status === "fulfilled") root.append(statsCard(stats.value));
  if (preview.status === "fulfilled") root.append(previewCard(preview.value));
}

function findings(report) {
  const verdict = report.ok
    ? h("p", { class: "ok", id: "check-verdict" }, `No errors: ${report.records} records in the ${report.format} format.`)
    : h("p", { class: "bad", id: "check-verdict" }, `This file would fail validation: fix the errors below (${report.records} records, ${report.format} format).`);
  const rows = report.findings.map((f) => [
    f.line === null || f.line === undefined ? "–" : `${report.file.filename}:${f.line}`,
    h("span", { class: `severity ${f.severity}` }, f.severity), f.code, f.message, f.fix]);
  return h("section", { class: "card" }, h("h2", {}, "Check"), verdict,
    rows.length ? table(["line", "severity", "code", "what is wrong", "what to do"], rows, { id: "findings" })
      : h("p", { class: "muted" }, "No findings."));
}

function statsCard(stats) {
  const t = stats.tokens || {};
  return h("section", { class: "card", id: "stats" }, h("h2", {}, "Lengths"),
    h("dl", { class: "facts" },
      h("dt", {}, "records"), h("dd", {}, num(stats.records)),
      h("dt", {}, "tokens min / p50 / p95 / max"), h("dd", {}, [t.min, t.p50, t.p95, t.max].map((v) => num(v)).join(" / ")),
      h("dt", {}, "mean"), h("dd", {}, num(t.mean, 4)),
      h("dt", {}, `over max_seq_len (${stats.max_seq_len})`), h("dd", {}, num(stats.over_max_seq_len)),
      h("dt", {}, "tokens per epoch"), h("dd", {}, num(stats.tokens_per_epoch))),
    histogram(stats.histogram || {}));
}

function previewCard(preview) {
  const legend = h("p", { class: "legend" }, h("span", { class: "seg trained" }, "trained on"), " ",
    h("span", { class: "seg" }, "context only (no loss)"));
  return h("section", { class: "card", id: "preview" }, h("h2", {}, "As the model sees it"), legend,
    preview.examples.map((ex) => h("article", { class: "example" },
      h("header", {}, `line ${ex.line}: ${ex.tokens} tokens, ${ex.trained_tokens} trained`),
      h("pre", {}, ex.segments.map((seg) => h("span", { class: seg.trained ? "seg trained" : "seg" }, seg.text))))));
}
