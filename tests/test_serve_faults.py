"""The server keeps serving everyone (issue 25): bounded answers, turns between requests, hung-up clients
stop generating, and a 4xx in OpenAI's shape for every malformed input, on a tiny random Llama folder."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tuneforge.serve import Limits, make_server

HELLO = [{"role": "user", "content": "Say hello"}]
ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serving(folder, **limits):
    srv = make_server(folder, port=0, quiet=True, limits=Limits(**limits))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def slow(monkeypatch) -> list[list[int]]:
    """Generation at about 5 ms a token, counted: made[i][0] is how many tokens the i-th generation drew."""
    from tuneforge.serve import engine

    real, made = engine.generate_ids, []

    def counted(*args, **kwargs):
        count = [0]
        made.append(count)
        for tok in real(*args, **kwargs):
            time.sleep(0.005)
            count[0] += 1
            yield tok

    monkeypatch.setattr(engine, "generate_ids", counted)
    return made


def request(srv, path: str, body: bytes | None, method: str = "POST") -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw request."""
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def completion(srv, **fields) -> tuple[int, dict, dict]:
    return request(srv, "/v1/completions", json.dumps({"prompt": "Once upon a time", **fields}).encode())


def open_stream(srv, max_tokens: int):
    """A streamed completion, read up to its first token: it is decoding now."""
    req = urllib.request.Request(srv.url + "/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens,
                                                  "stream": True}).encode())
    resp = urllib.request.urlopen(req, timeout=60)
    for line in resp:
        if line.startswith(b"data: ") and b'"text": ""' not in line:
            return resp
    raise AssertionError("the stream ended before its first token")


def raw(srv, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def settled(count: list[int]) -> int:
    """The count once it stops moving (generation ended), waiting at most 20 s."""
    last, deadline = -1, time.monotonic() + 20
    while count[0] != last and time.monotonic() < deadline:
        last = count[0]
        time.sleep(0.3)
    return count[0]


def test_a_request_without_max_tokens_gets_the_default_and_one_above_the_cap_a_400(tiny_models):
    with serving(tiny_models["llama"], max_tokens_default=3, max_tokens_cap=5) as srv:
        status, _, body = completion(srv)
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
        status, _, body = completion(srv, max_tokens=6)
        assert status == 400 and body["error"]["param"] == "max_tokens" and "--max-tokens-cap" in body["error"]["message"]
        assert completion(srv, max_tokens=5)[0] == 200


def test_a_short_request_is_answered_while_a_long_one_decodes(tiny_models, slow):
    with serving(tiny_models["llama"], max_tokens_cap=400) as srv:
        with contextlib.closing(open_stream(srv, 400)):
            status, _, body = completion(srv, max_tokens=2)
            assert status == 200 and body["usage"]["completion_tokens"] <= 2
            assert slow[0][0] < 300, "the short request waited for most of the long one"


def test_past_max_concurrent_a_request_gets_503_with_retry_after(tiny_models, slow):
    with serving(tiny_models["llama"], max_tokens_cap=400, max_concurrent=1) as srv:
        with contextlib.closing(open_stream(srv, 400)):
            status, headers, body = completion(srv, max_tokens=2)
        assert status == 503 and body["error"]["code"] == "server_busy" and int(headers["Retry-After"]) >= 1
        settled(slow[0])  # the closed stream gives its place back
        assert completion(srv, max_tokens=2)[0] == 200


def test_a_client_that_hangs_up_stops_its_generation_and_frees_its_place(tiny_models, slow):
    with serving(tiny_models["llama"], max_tokens_cap=400, max_concurrent=1) as srv:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: slow and slow[0][0] >= 5)
        assert settled(slow[0]) < 50
        assert completion(srv, max_tokens=2)[0] == 200


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    (json.dumps({"messages": [{"role": "user", "content": "hi \ud800"}]}).encode(), "messages[0].content"),
    (json.dumps({"prompt": "\udc00"}).encode(), "prompt"),
])
def test_deep_json_and_lone_surrogates_are_400(tiny_models, body, param):
    with serving(tiny_models["llama"]) as srv:
        for path in ("/v1/chat/completions", "/v1/completions"):
            status, _, answer = request(srv, path, body)
            assert status == 400 and answer["error"]["param"] == param, answer
            assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert completion(srv, max_tokens=1)[0] == 200


def test_delete_is_405_and_a_garbled_request_line_gets_a_status_line(tiny_models):
    with serving(tiny_models["llama"]) as srv:
        status, headers, body = request(srv, "/v1/chat/completions", None, method="DELETE")
        assert (status, headers["Allow"], body["error"]["code"]) == (405, "POST", "method_not_allowed")
        for line, status in ((b"GARBAGE\r\n\r\n", 400), (b"GET /v1/models\r\n\r\n", 400),
                             (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505)):
            head, _, body = raw(srv, line).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), head
            assert json.loads(body)["error"]["message"]


def test_load_of_8_clients_and_3_hang_ups_is_answered_or_refused(tiny_models):
    """bench/serve_load.py, small: every client gets a 200 or a 503, and the hung-up requests give their places back."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--model", str(tiny_models["llama"]), "--clients", "8",
         "--hangups", "3", "--rounds", "1", "--max-concurrent", "4", "--max-tokens-cap", "400", "--retries", "2",
         "--round-limit", "240", "--json"],
        capture_output=True, text=True, timeout=400, check=True)
    [round_] = json.loads(done.stdout.strip().splitlines()[-1])["rounds"]
    statuses = [r["status"] for r in round_["results"]]
    assert statuses.count("hung up") == 3 and all(s in (200, 503) for s in statuses if s != "hung up"), statuses
    assert statuses.count(200) >= 4 and round_["free"] == round_["places"] == 4


def test_the_limits_are_cli_flags_checked_with_their_names():
    from tuneforge.cli import build_parser
    from tuneforge.errors import TuneforgeError

    args = build_parser().parse_args(["serve", "runs/x", "--max-tokens-default", "7", "--max-tokens-cap", "9",
                                      "--max-concurrent", "2"])
    assert (args.max_tokens_default, args.max_tokens_cap, args.max_concurrent) == (7, 9, 2)
    with pytest.raises(TuneforgeError, match="--max-concurrent 0: must be at least 1"):
        Limits(max_concurrent=0)
