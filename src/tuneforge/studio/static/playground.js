// Playground: a finished run's model and its base answer the same prompt side by side; and a blind A/B
// review whose choices become preference pairs (DPO format) in the key's reviews file.

import { get, post } from "./api.js";
import { h, put } from "./dom.js";

async function chat(model, prompt, maxTokens, temperature) {
  const answer = await post("/v1/chat/completions", { model, max_tokens: maxTokens, temperature,
    messages: [{ role: "user", content: prompt }] });
  return answer.choices[0].message.content;
}

export async function playgroundPage(root, _params, query) {
  const jobs = (await get("/v1/fine_tuning/jobs?limit=100")).data.filter((job) => job.status === "succeeded");
  if (!jobs.length) {
    put(root, h("h1", {}, "Playground"), h("p", { class: "muted" }, "No finished run yet: a run that succeeded can be chatted with here."));
    return;
  }
  const chosen = jobs.find((job) => job.id === query.get("job")) || jobs[0];
  const jobSelect = h("select", { id: "play-job", onchange: () => { location.hash = `#/playground?job=${jobSelect.value}`; } },
    jobs.map((job) => h("option", { value: job.id, selected: job.id === chosen.id }, `${job.fine_tuned_model}`)));
  const prompt = h("textarea", { id: "prompt", rows: 4, placeholder: "Ask both models the same thing" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 64 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const tuned = h("div", { class: "answer", id: "answer-tuned" });
  const base = h("div", { class: "answer", id: "answer-base" });
  const baseId = chosen.fine_tuned_model.split(":")[1]; // ft:<base>:<suffix>:<job>: the id the base is served under
  const send = h("button", { id: "send", class: "primary", onclick: async () => {
    if (!prompt.value.trim()) return;
    send.disabled = true;
    tuned.textContent = base.textContent = "…";
    const settle = (el) => [(text) => { el.textContent = text; }, () => { el.textContent = "(no answer: see the message above)"; }];
    try {
      await Promise.allSettled([
        chat(chosen.fine_tuned_model, prompt.value, Number(maxTokens.value), Number(temperature.value)).then(...settle(tuned)),
        chat(baseId, prompt.value, Number(maxTokens.value), Number(temperature.value)).then(...settle(base))]);
    } finally { send.disabled = false; }
  } }, "Send to both");

  const review = h("div", { id: "review" });
  const startReview = h("button", { id: "review-start", onclick: () => nextReview(chosen, review) }, "Blind review a held-out prompt");

  put(root, h("h1", {}, "Playground"),
    h("section", { class: "card row" }, h("label", {}, "Run ", jobSelect),
      h("label", {}, "max tokens ", maxTokens), h("label", {}, "temperature ", temperature)),
    h("section", { class: "card" }, prompt, h("div", { class: "row" }, send),
      h("div", { class: "side-by-side" },
        h("div", {}, h("h3", {}, "Tuned: ", h("code", {}, chosen.fine_tuned_model)), tuned),
        h("div", {}, h("h3", {}, "Base: ", h("code", {}, baseId)), base))),
    h("section", { class: "card" }, h("h2", {}, "Blind A/B review"),
      h("p", { class: "muted" }, "The base and the tuned model answer a held-out prompt in a hidden order. Each choice "
        + "(not a tie) is saved as a preference pair in the DPO format, ready to train the next stage on."),
      startReview, review));
}

async function nextReview(job, box) {
  const item = await post(`/v1/tuneforge/jobs/${job.id}/review`, {});
  const choose = (choice) => async () => {
    box.querySelectorAll("button.choice").forEach((b) => { b.disabled = true; });
    const saved = await post(`/v1/tuneforge/reviews/${item.review_id}`, { choice });
    box.append(h("p", { id: "review-saved", class: "ok" },
      saved.saved ? "Saved one preference pair. " : "A tie: nothing saved. ",
      `The reviews file `, h("code", { id: "reviews-file" }, saved.file.id), ` holds `,
      h("b", { id: "review-pairs" }, String(saved.pairs)), saved.pairs === 1 ? " pair. " : " pairs. ",
      h("a", { href: `#/new?file=${saved.file.id}&preset=dpo` }, "Train DPO on it"), " · ",
      h("button", { class: "link", onclick: () => nextReview(job, box) }, "Next prompt")));
  };
  put(box,
    h("div", { class: "prompt", id: "review-prompt" }, item.prompt.map((m) => h("p", {}, h("b", {}, `${m.role}: `), m.content))),
    h("div", { class: "side-by-side" }, ["A", "B"].map((side) => h("div", {}, h("h3", {}, `Answer ${side}`),
      h("div", { class: "answer", id: `review-${side}` }, item.answers[side])))),
    h("div", { class: "row" },
      h("button", { class: "choice", id: "choose-A", onclick: choose("A") }, "A is better"),
      h("button", { class: "choice", id: "choose-B", onclick: choose("B") }, "B is better"),
      h("button", { class: "choice", id: "choose-tie", onclick: choose("tie") }, "Tie")));
}
