// Export: a run as a Hugging Face folder, its adapter, a GGUF (with quantisation) or an Ollama model;
// the size is shown before anything is written, then a download link.

import { get, post, apiKey, authHeaders, showError } from "./api.js";
import { h, put, size } from "./dom.js";

const QUANTS = ["q8_0", "f16", "q4_k_m"];
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
  const go = h("button", { id: "export-go", class: "primary", onclick: async () => {
    go.disabled = true;
    put(result, "Writing…");
    try {
      const done = await post(`/v1/tuneforge/jobs/${jobId}/exports`, body());
      put(result, h("p", {}, `Written: ${size(done.bytes)}. `, download(done)));
    } catch { put(result); } finally { go.disabled = false; }
  } }, "Export");

  const body = () => (["gguf", "ollama"].includes(to.value) ? { to: to.value, quant: quant.value } : { to: to.value });
  async function estimate() {
    quantLabel.hidden = !["gguf", "ollama"].includes(to.value);
    estimateText.textContent = "estimating…";
    const params = new URLSearchParams(body());
    const answer = await get(`/v1/tuneforge/jobs/${jobId}/export/estimate?${params}`, { source: "estimate" });
    estimateText.textContent = `about ${size(answer.bytes)}`;
  }

  put(root, h("h1", {}, "Export ", h("code", {}, jobId)),
    h("section", { class: "card row" }, h("label", {}, "as ", to), quantLabel, h("span", {}, "size: ", estimateText), go),
    result);
  estimate().catch(() => { estimateText.textContent = "unknown"; });
}

/** The link; with a key, the file is fetched with it (a plain link cannot send a header) and saved from memory. */
function download(done) {
  const link = h("a", { id: "export-download", class: "button", href: done.download, download: "" }, "Download");
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
