// The shell: hash routes, so a reload (or a restarted server) shows the same page from the server's state.
//   #/data[/<file id>]   #/new[?file=&preset=]   #/runs   #/runs/<job id>   #/compare?jobs=a,b
//   #/playground[?job=]  #/export[/<job id>]

import { ApiError, loadSession, clearErrors, showError } from "./api.js";
import { h, put } from "./dom.js";
import { dataPage } from "./data.js";
import { newRunPage } from "./newrun.js";
import { runsPage, runPage, comparePage } from "./runs.js";
import { playgroundPage } from "./playground.js";
import { exportPage } from "./export.js";

const ROUTES = {
  data: ["data", dataPage], new: ["new", newRunPage], runs: ["runs", runsPage], compare: ["runs", comparePage],
  playground: ["playground", playgroundPage], export: ["export", exportPage],
};

let leave = null; // stops the current page's polling
let shownRoute = 0;

async function route() {
  const [path, search] = (location.hash.replace(/^#\/?/, "") || "data").split("?");
  const [name, ...params] = path.split("/").filter(Boolean).map(decodeURIComponent);
  const [tab, render] = ROUTES[name] || ROUTES.data;
  const page = name === "runs" && params.length ? runPage : render;
  if (typeof leave === "function") leave();
  leave = null;
  clearErrors();
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  // Each route draws into a fresh element: a page still loading when the user moved on draws into a detached one.
  const frame = document.getElementById("page");
  const root = h("div", { class: "view" }, h("p", { class: "muted" }, "Loading…"));
  const mine = ++shownRoute;
  put(frame, root);
  delete frame.dataset.ready;
  try {
    const stop = await page(root, params, new URLSearchParams(search || ""));
    if (mine === shownRoute) leave = stop; else if (typeof stop === "function") stop();
  } catch (err) {
    if (mine !== shownRoute) return;
    if (!(err instanceof ApiError)) showError(`This page failed to draw: ${err.message}`);
    put(root, h("p", { class: "muted", id: "page-failed" }, "This page could not be shown; the message above says why."));
  }
  if (mine === shownRoute) frame.dataset.ready = location.hash; // drawn: what the browser tests wait for
}

window.addEventListener("hashchange", route);
// A failed request inside a button's handler was already shown in the banner; anything else is shown there too.
window.addEventListener("unhandledrejection", (event) => {
  if (!(event.reason instanceof ApiError)) showError(`Something went wrong on this page: ${event.reason}`);
  event.preventDefault();
});
window.addEventListener("DOMContentLoaded", async () => {
  await loadSession();
  route();
});
