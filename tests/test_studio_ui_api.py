"""The web UI's JSON endpoints on `tuneforge studio` (docs/studio.md "The web UI's endpoints"), driven over HTTP
as the page drives them: Host, Origin and CSRF checks, static assets, and the data, config, run, review and
export endpoints on tiny models and files."""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlsplit

import pytest
from conftest import memorise_records, write_jsonl

from tuneforge.studio import make_studio
from tuneforge.studio.keys import new_key


def call(server, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None):
    """(status, response headers, parsed JSON or raw bytes) of one request to the studio."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **(headers or {})}
    if data is not None:
        sent["Content-Length"] = str(len(data))
    conn.request(method, path, data, sent)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, response, json.loads(raw) if kind.startswith("application/json") else raw


def start(home, **kw):
    server = make_studio(home, port=0, quiet=True, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


def upload(server, name: str, content: bytes, headers: dict | None = None) -> dict:
    boundary = "tfboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    status, _, answer = call(server, "POST", "/v1/files", body,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A studio on 127.0.0.1 without keys (the owner `local`), as `tuneforge studio` starts by default."""
    server = start(tmp_path_factory.mktemp("home"))
    yield server
    stop(server)


def browser(server, token: str | None = None, **extra) -> dict:
    """The headers a page of this studio sends from Chromium."""
    own = f"http://127.0.0.1:{server.port}"
    return {"Origin": own, "Sec-Fetch-Site": "same-origin", **({"X-CSRF-Token": token} if token else {}), **extra}


# --- session and safety ----------------------------------------------------------------------------------

def test_browser_posts_need_the_csrf_token_and_our_origin_while_api_clients_need_neither(studio):
    status, _, session = call(studio, "GET", "/v1/tuneforge/session")
    assert status == 200 and session["auth_required"] is False and len(session["csrf_token"]) == 64
    token = session["csrf_token"]
    status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}, browser(studio))
    assert status == 403 and err["error"]["code"] == "csrf"
    status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}, browser(studio, "0" * 64))
    assert status == 403 and err["error"]["code"] == "csrf"
    evil = {"Origin": "http://evil.example", "X-CSRF-Token": token}
    status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}, evil)
    assert status == 403 and err["error"]["code"] == "origin_not_allowed"
    status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {},
                          {"Sec-Fetch-Site": "cross-site", "X-CSRF-Token": token})
    assert status == 403 and err["error"]["code"] == "csrf"
    # With the token from our own page the request reaches the jobs API (which knows no such job).
    status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}, browser(studio, token))
    assert status == 404 and err["error"]["code"] == "job_not_found"
    # The openai client and curl send no Origin: unaffected, no token needed.
    status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {})
    assert status == 404
    # Reads from our own page need no token.
    assert call(studio, "GET", "/v1/files", headers=browser(studio))[0] == 200


def test_a_rebinding_host_is_refused_on_loopback(studio):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io"):
        status, _, err = call(studio, "GET", "/v1/tuneforge/session", headers={"Host": host})
        assert status == 403 and err["error"]["code"] == "host_not_allowed", host
    for host in (f"localhost:{studio.port}", f"127.0.0.1:{studio.port}", "[::1]"):
        assert call(studio, "GET", "/v1/tuneforge/session", headers={"Host": host})[0] == 200, host


def test_page_and_assets_carry_the_csp_and_odd_names_are_refused(studio):
    status, response, page = call(studio, "GET", "/")
    assert status == 200 and b"<html" in page.lower()
    csp = response.getheader("Content-Security-Policy")
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    for path in ("/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/x.js", "/static/Index.JS",
                 "/static/a/b.js", "/static/x.py", "/static/.hidden.js", "/static/missing.js", "/static/"):
        status, _, err = call(studio, "GET", path)
        assert status == 404, path


def test_keys_apply_to_the_session_and_the_token_survives_a_restart(tmp_path):
    home = tmp_path / "home"
    key = new_key(home / "keys", "alice")
    server = start(home, api_keys=home / "keys")
    try:
        status, _, err = call(server, "GET", "/v1/tuneforge/session")
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert call(server, "GET", "/")[0] == 200  # the page loads, to show its login box
        auth = {"Authorization": f"Bearer {key}"}
        status, _, session = call(server, "GET", "/v1/tuneforge/session", headers=auth)
        assert status == 200 and session["auth_required"] and session["owner"] == "alice"
    finally:
        stop(server)
    server = start(home, api_keys=home / "keys")
    try:
        again = call(server, "GET", "/v1/tuneforge/session", headers=auth)[2]
        assert again["csrf_token"] == session["csrf_token"]
        headers = {**auth, **browser(server, session["csrf_token"])}
        assert call(server, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}, headers)[0] == 404
    finally:
        stop(server)
