// Runs: the job list, one run's live page, and several runs compared. Everything shown comes from the
// server at each poll (job database and run folder); nothing about a run is kept in the browser.

import { get, post } from "./api.js";
import { h, put, table, num, when } from "./dom.js";
import { lineChart } from "./charts.js";

export const TERMINAL = ["succeeded", "failed", "cancelled"];
const MOVING = ["validating_files", "queued", "running"];
const POLL_MS = 1500;

/** Call `tick` now and every POLL_MS while `more()` says so; returns the function that stops it. */
export function poll(tick, more) {
  let stopped = false, timer = null;
  const loop = async () => {
    try { await tick(); } catch { /* the banner shows it; the next poll tries again */ }
    if (!stopped && more()) timer = setTimeout(loop, POLL_MS);
  };
  loop();
  return () => { stopped = true; clearTimeout(timer); };
}

export async function runsPage(root) {
  const picked = new Set();
  const list = h("div", { id: "job-list" });
  const compare = h("button", { id: "compare", disabled: true, onclick: () => {
    location.hash = `#/compare?jobs=${[...picked].join(",")}`; // in the order they were picked
  } }, "Compare selected");
  put(root, h("h1", {}, "Runs"), h("div", { class: "row" }, h("a", { class: "button", href: "#/new" }, "New run"), compare), list);
  let jobs = [];
  return poll(async () => {
    jobs = (await get("/v1/fine_tuning/jobs?limit=100", { source: "runs" })).data;
    put(list, jobs.length ? table(["", "job", "model", "status", "fine-tuned model", "created"], jobs.map((job) => [
      h("input", { type: "checkbox", class: "pick", value: job.id, checked: picked.has(job.id), onchange: (event) => {
        if (event.target.checked) picked.add(job.id); else picked.delete(job.id);
        compare.disabled = picked.size < 2;
      } }),
      h("a", { href: `#/runs/${job.id}` }, job.id), job.model,
      h("span", { class: `status ${job.status}` }, job.status), job.fine_tuned_model || "–", when(job.created_at)]),
    { id: "jobs" }) : h("p", { class: "muted" }, "No runs yet: start one on the New run tab."));
  }, () => jobs.some((job) => MOVING.includes(job.status)));
}

function progress(job, metrics) {
  const steps = metrics.steps || [];
  const step = steps.length ? steps[steps.length - 1].step : 0;
  const total = metrics.total_steps;
  const bar = h("progress", { id: "progress", max: total || 1, value: total ? Math.min(step, total) : 0 });
  let text;
  if (job.status === "succeeded") text = `Finished: ${step} steps`;
  else if (job.status === "failed") text = `Failed at step ${step}${total ? ` of ${total}` : ""}`;
  else if (job.status === "cancelled") text = `Cancelled at step ${step}${total ? ` of ${total}` : ""}`;
  else if (job.status === "paused") text = `Paused at step ${step}${total ? ` of ${total}` : ""}; Resume continues from the newest checkpoint`;
  else if (job.status === "running") text = `Step ${step}${total ? ` of ${total}` : ""}`;
  else text = job.status === "queued" ? "Waiting for its turn" : "Checking the files";
  return h("div", { class: "progress" }, bar, h("span", { id: "progress-text" }, text));
}

function controls(job, refresh) {
  const act = (action) => async () => { await post(`/v1/fine_tuning/jobs/${job.id}/${action}`); refresh(); };
  const s = job.status;
  return h("div", { class: "row", id: "controls" },
    h("button", { id: "pause", disabled: !["queued", "running"].includes(s), onclick: act("pause") }, "Stop"),
    h("button", { id: "resume", disabled: s !== "paused", onclick: act("resume") }, "Resume"),
    h("button", { id: "cancel", disabled: TERMINAL.includes(s), onclick: act("cancel") }, "Cancel"),
    s === "succeeded" ? h("a", { class: "button", href: `#/playground?job=${job.id}` }, "Chat with it") : null,
    s === "succeeded" ? h("a", { class: "button", href: `#/export/${job.id}` }, "Export") : null);
}

function charts(metrics) {
  const steps = metrics.steps || [];
  const series = (key) => [{ points: steps.map((row) => [row.step, row[key]]) }];
  return h("div", { class: "charts" },
    lineChart({ id: "chart-loss", title: "Training loss", ylabel: "loss", series: series("loss") }),
    lineChart({ id: "chart-lr", title: "Learning rate", ylabel: "lr", series: series("lr") }),
    lineChart({ id: "chart-grad", title: "Gradient norm", ylabel: "grad norm", series: series("grad_norm") }),
    lineChart({ id: "chart-val", title: "Validation loss", ylabel: "val loss",
      series: [{ points: (metrics.validation || []).map((row) => [row.step, row.val_loss]) }] }),
    lineChart({ id: "chart-speed", title: "Throughput", ylabel: "tokens/s", series: series("tokens_per_s") }));
}

function evaluationTable(evaluation) {
  if (!evaluation || !(evaluation.rows || []).length) return null;
  return h("section", { class: "card" }, h("h2", {}, "Before and after"),
    table(["metric", "before", "after", "better"], evaluation.rows.map((r) => {
      const improved = r.before !== null && r.after !== null && (r.better === "higher" ? r.after > r.before : r.after < r.before);
      return [r.name, num(r.before), h("span", { class: improved ? "ok" : "" }, num(r.after)), r.better];
    }), { id: "evaluation" }));
}

export async function runPage(root, [jobId]) {
  let job = null;
  let shown = { status: null, controls: null }; // the buttons, rebuilt only when the status changes: a click
  const body = h("div", { id: "run" });         // that lands while a poll redraws the page is never lost
  put(root, h("h1", {}, "Run ", h("code", {}, jobId)), body);
  const refresh = async () => {
    const [fresh, metrics, events] = await Promise.all([
      get(`/v1/fine_tuning/jobs/${jobId}`, { source: "run" }),
      get(`/v1/tuneforge/jobs/${jobId}/metrics`, { source: "run-metrics" }),
      get(`/v1/fine_tuning/jobs/${jobId}/events?limit=100`, { source: "run-events" })]);
    job = fresh;
    // The table is extra: if it cannot be read (the banner says why) the rest of the page still shows.
    const evaluation = job.status === "succeeded"
      ? await get(`/v1/tuneforge/jobs/${jobId}/evaluation`, { source: "run-evaluation" }).catch(() => null) : null;
    const messages = events.data.filter((e) => e.type !== "metrics");
    if (job.status !== shown.status) shown = { status: job.status, controls: controls(job, restart) };
    const configOpen = body.querySelector("#run-config")?.open; // a section the user opened stays open
    put(body,
      h("section", { class: "card" },
        h("p", {}, h("span", { id: "status", class: `status ${job.status}` }, job.status), " ",
          job.model, job.fine_tuned_model ? [" → ", h("code", { id: "fine-tuned-model" }, job.fine_tuned_model)] : null),
        progress(job, metrics), shown.controls,
        job.error && job.error.message ? h("p", { class: "bad", id: "job-error" }, job.error.message) : null),
      charts(metrics),
      (metrics.diagnoses || []).length ? h("section", { class: "card" }, h("h2", {}, "Diagnoses"),
        table(["step", "level", "message"], metrics.diagnoses.map((d) => [d.step ?? "–", d.level, d.message]), { id: "diagnoses" })) : null,
      evaluationTable(evaluation),
      metrics.config ? h("details", { class: "card", id: "run-config", open: configOpen }, h("summary", {}, "Settings this run trains with"),
        h("pre", {}, JSON.stringify(metrics.config, null, 2))) : null,
      h("section", { class: "card" }, h("h2", {}, "Events"),
        table(["time", "level", "message"], messages.map((e) => [when(e.created_at), e.level, e.message]), { id: "events" })));
  };
  const more = () => job === null || MOVING.includes(job.status);
  let stop = poll(refresh, more);
  function restart() { stop(); stop = poll(refresh, more); } // after Stop, Resume or Cancel
  return () => stop();
}

export async function comparePage(root, _params, query) {
  const ids = (query.get("jobs") || "").split(",").filter(Boolean);
  const answer = await get(`/v1/tuneforge/compare?jobs=${ids.join(",")}`);
  const names = answer.jobs.map((job) => job.id);
  put(root, h("h1", {}, "Compare runs"),
    h("section", { class: "card" }, table(["job", "status", "model"], answer.jobs.map((job) => [
      h("a", { href: `#/runs/${job.id}` }, job.id), job.status, job.fine_tuned_model || "–"]))),
    lineChart({ id: "chart-compare", title: "Training loss", ylabel: "loss",
      series: names.map((id) => ({ name: id, points: (answer.curves[id] || []).map((p) => [p.step, p.loss]) })) }),
    h("section", { class: "card" }, h("h2", {}, "Settings that differ"),
      answer.config_diff.length ? table(["key", ...names], answer.config_diff.map((row) => [
        h("code", {}, row.key), ...row.values.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v)))]),
      { id: "config-diff" }) : h("p", { class: "muted" }, "The runs have the same settings.")));
}
