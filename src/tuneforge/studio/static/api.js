// The one way the page talks to the server: every call is one jobs-API or documented /v1/tuneforge request.
// It adds the key (kept in sessionStorage after the login box) and the CSRF token on writes, and every error
// the server sends (OpenAI's {"error": {message, ...}} shape) is shown in the banner, never swallowed.

import { h, put } from "./dom.js";

const KEY = "tuneforge-api-key";
export const session = { csrf_token: "", auth_required: false, owner: null, version: "" };

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function authHeaders() {
  return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
}

const shown = new Map(); // banner messages by source, so a poll that recovers can take its own back

function renderBanner() {
  const banner = document.getElementById("banner");
  const items = [...shown.entries()];
  banner.hidden = items.length === 0;
  put(banner, items.map(([source, message]) => h("div", { class: "error" },
    h("span", { class: "message" }, message),
    h("button", { class: "close", title: "Dismiss", onclick: () => clearError(source) }, "×"))));
}

export function showError(message, source = message) {
  shown.set(source, message);
  renderBanner();
}

export function clearError(source) {
  if (shown.delete(source)) renderBanner();
}

export function clearErrors() {
  shown.clear();
  renderBanner();
}

/** One request; resolves to the parsed JSON (or text), rejects with ApiError after showing its message.
 *  opts.source names the banner line (a poll uses one source and clears it when it succeeds again). */
export async function api(method, path, body, opts = {}) {
  const headers = { ...authHeaders() };
  if (method !== "GET") headers["X-CSRF-Token"] = session.csrf_token;
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const source = opts.source || `${method} ${path}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload });
  } catch (err) {
    const message = `${method} ${path}: the studio did not answer (${err.message}); is it still running?`;
    if (!opts.quiet) showError(message, source);
    throw new ApiError(0, message, "unreachable");
  }
  const text = await response.text();
  let data = text;
  if ((response.headers.get("Content-Type") || "").includes("json")) {
    try { data = JSON.parse(text); } catch { data = { error: { message: text } }; }
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const message = error.message || `${method} ${path}: ${response.status} ${response.statusText}`;
    if (response.status === 401) askForKey(message);
    if (!opts.quiet) showError(message, source);
    throw new ApiError(response.status, message, error.code);
  }
  if (opts.source) clearError(opts.source);
  return data;
}

export const get = (path, opts) => api("GET", path, undefined, opts);
export const post = (path, body = {}, opts) => api("POST", path, body, opts);

/** Read the session (CSRF token, whether a key is needed, who we are) and show it in the header. */
export async function loadSession() {
  try {
    Object.assign(session, await get("/v1/tuneforge/session", { quiet: true }));
  } catch (err) {
    if (err.status === 401) {
      askForKey(apiKey() ? "That key was not accepted." : "");
      return false;
    }
    showError(err.message);
  }
  renderWho();
  return true;
}

function renderWho() {
  const who = document.getElementById("who");
  if (!session.auth_required) {
    put(who, h("span", { class: "muted" }, "local studio: no key needed"));
  } else {
    put(who, h("span", {}, "signed in as ", h("b", {}, session.owner || "?")), " ",
      h("button", { class: "link", onclick: signOut }, "Sign out"));
  }
}

function signOut() {
  sessionStorage.removeItem(KEY);
  location.reload();
}

/** The login box: the key is kept for this tab only (sessionStorage) and sent as a Bearer token. */
export function askForKey(why) {
  const who = document.getElementById("who");
  const shownForm = who.querySelector("#login");
  if (shownForm) {
    shownForm.querySelector(".why").textContent = why || "This studio needs an API key.";
    return;
  }
  const input = h("input", { id: "login-key", type: "password", placeholder: "API key (sk-...)", autocomplete: "off" });
  const form = h("form", { id: "login", onsubmit: async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    clearErrors();
    if (await loadSession()) window.dispatchEvent(new HashChangeEvent("hashchange"));
  } }, h("span", { class: "why" }, why || "This studio needs an API key."), " ", input, " ", h("button", { type: "submit" }, "Sign in"));
  put(who, form);
}
