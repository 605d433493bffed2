// Export: a run as a Hugging Face folder, its adapter, a GGUF (with quantisation) or an Ollama model;
// the size is shown before anything is written; the server writes it in the background while the page shows
// its status, then a download link. The run's earlier exports are listed, each with Delete.

import { api, get, post, apiKey, authHeaders, showError } from "./api.js";
import { h, put, size, table, when } from "./dom.js";
import { poll } from "./runs.js";

const QUANTS = ["q8_0", "f16", "q4_k_m"];
const ACTIVE = ["queued", "running"];
const FORMATS = [["hf", "Hugging Face folder (merged)"], ["adapter", "adapter only"], ["gguf", "GGUF file"], ["ollama", "Ollama Modelfile + GGUF"]];

export async function exportPage(root, [jobId]) {
  const jobs = (await get("/v1/fine_tuning/jobs?limit=100")).data.filter((job) => job.status === "succeeded");
  if (!jobId) {
    put(root, h("h1", {}, "Export"), jobs.length
      ? h("ul", {}, jobs.map((job) => h("li", {}, h("a", { href: `#/export/${job.id}` }, job.fine_tuned_model))))
      : h("p", { class: "muted" }, "No finished run yet: a run that succeeded can be exported here."));
    return;
  }
  const to = h("select", { id: "export-to", onchange: () => estimate() }, FORMATS.map(([v, t]) => h("option", { value: v }, t)));
  const quant = h("select", { id: "export-quant", onchange: () => estimate() }, QUANTS.map((q) => h("option", { value: q }, q)));
  const quantLabel = h("label", {}, "quantisation ", quant);
  const estimateText = h("span", { id: "export-size" });
  const result = h("div", { id: "export-result" });
  const list = h("div", { id: "export-list" });
  let exports = [], shown = null; // the job's exports, newest first; the one whose status the result line shows
  const go = h("button", { id: "export-go", class: "primary", onclick: async () => {
    try {
      shown = (await post(`/v1/tuneforge/jobs/${jobId}/exports`, body())).id;
      restart();
    } catch { /* the banner says why */ }
  } }, "Export");

  const body = () => (["gguf", "ollama"].includes(to.value) ? { to: to.value, quant: quant.value } : { to: to.value });
  async function estimate() {
    quantLabel.hidden = !["gguf", "ollama"].includes(to.value);
    estimateText.textContent = "estimating…";
    const params = new URLSearchParams(body());
    const answer = await get(`/v1/tuneforge/jobs/${jobId}/export/estimate?${params}`, { source: "estimate" });
    estimateText.textContent = `about ${size(answer.bytes)}`;
  }

  // The server writes an export in the background: the page polls its status until it has finished.
  const moving = () => exports.some((e) => ACTIVE.includes(e.status));
  async function refresh() {
    exports = (await get(`/v1/tuneforge/jobs/${jobId}/exports`, { source: "exports" })).data;
    const mine = exports.find((e) => e.id === shown);
    put(result, mine ? status(mine) : null);
    put(list, exports.length ? table(["created", "format", "status", "size", ""], exports.map((e) => [
      when(e.created_at), e.quant ? `${e.to} ${e.quant}` : e.to, e.status, e.bytes === null ? `about ${size(e.estimated_bytes)}` : size(e.bytes),
      h("span", { class: "row" }, e.download ? download(e, `download-${e.id}`) : null,
        h("button", { class: "delete", "data-export": e.id, disabled: e.status === "running",
          onclick: () => remove(e.id) }, "Delete"))]), { id: "exports" }) : h("p", { class: "muted" }, "No exports of this run yet."));
  }
  async function remove(id) {
    try { await api("DELETE", `/v1/tuneforge/exports/${id}`); } catch { return; }
    if (id === shown) shown = null;
    restart();
  }
  let stop = poll(refresh, moving);
  function restart() { stop(); stop = poll(refresh, moving); }

  put(root, h("h1", {}, "Export ", h("code", {}, jobId)),
    h("section", { class: "card row" }, h("label", {}, "as ", to), quantLabel, h("span", {}, "size: ", estimateText), go),
    result, h("h2", {}, "Exports of this run"), list);
  estimate().catch(() => { estimateText.textContent = "unknown"; });
  return () => stop();
}

/** One export's line: queued, running (with how far), failed (with why), or written (with the link). */
function status(e) {
  if (e.status === "succeeded") return h("p", { id: "export-status", "data-status": e.status }, `Written: ${size(e.bytes)}. `, download(e, "export-download"));
  if (e.status === "failed") return h("p", { id: "export-status", class: "error", "data-status": e.status }, `The export failed: ${e.error}`);
  const how = e.status === "running" && e.progress !== null ? ` (${Math.round(100 * e.progress)}%)` : "";
  return h("p", { id: "export-status", "data-status": e.status }, e.status === "queued" ? "Queued: another export is being written…" : `Writing…${how}`);
}

/** The link; with a key, the file is fetched with it (a plain link cannot send a header) and saved from memory. */
function download(done, id) {
  const link = h("a", { id, class: "button", href: done.download, download: "" }, "Download");
  if (apiKey()) {
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      const response = await fetch(done.download, { headers: authHeaders() });
      if (!response.ok) return showError(`download: ${response.status} ${response.statusText}`);
      const url = URL.createObjectURL(await response.blob());
      const name = (response.headers.get("Content-Disposition") || "").match(/filename="?([^";]+)/);
      const save = h("a", { href: url, download: name ? name[1] : "export" });
      save.click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    });
  }
  return link;
}
