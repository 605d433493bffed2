"""The web UI's JSON endpoints on `tuneforge studio` (docs/studio.md "The web UI's endpoints"), driven over HTTP
as the page drives them: Host, Origin and CSRF checks, static assets, and the data, config, run, review and
export endpoints on tiny models and files."""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import chat, memorise_records, wait_for

from tuneforge.data.dataset import sha256_file
from tuneforge.data.formats import read_records
from tuneforge.errors import TuneforgeError
from tuneforge.studio import exports as exports_module
from tuneforge.studio import make_studio
from tuneforge.studio import review as review_module
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
    for origin in ("http://evil.example", "null", "http://[bad", f"http://127.0.0.1:{studio.port}.evil.example"):
        status, _, err = call(studio, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {},
                              {"Origin": origin, "X-CSRF-Token": token})
        assert status == 403 and err["error"]["code"] == "origin_not_allowed", origin
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
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "[bad"):
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


# --- data ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_file(studio, tmp_path_factory):
    """The memorise chats with line 3 planted bad (no answer) and a `<script>` in line 1, uploaded."""
    lines = [json.dumps(r) for r in memorise_records(24)]
    lines[0] = json.dumps({"messages": [{"role": "user", "content": "<script>alert(1)</script>"},
                                        {"role": "assistant", "content": "ok"}]})
    lines[2] = '{"messages": [{"role": "user", "content": "no answer here"}]}'
    return upload(studio, "train.jsonl", ("\n".join(lines) + "\n").encode())


def model_query(tiny_models) -> str:
    return f"model={tiny_models['llama']}"


def test_check_names_the_planted_bad_line_with_what_to_do(studio, data_file, tiny_models):
    status, _, report = call(studio, "GET", f"/v1/tuneforge/files/{data_file['id']}/check?{model_query(tiny_models)}")
    assert status == 200, report
    assert report["file"] == {"id": data_file["id"], "filename": "train.jsonl", "bytes": data_file["bytes"]}
    assert report["format"] == "messages" and report["records"] == 24 and report["ok"] is False
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [f["line"] for f in errors] == [3] and "no assistant turn" in errors[0]["message"]
    assert errors[0]["fix"] and errors[0]["code"] == "bad-record"
    assert all(str(studio.store.files_dir) not in f["message"] for f in report["findings"])
    builtin = call(studio, "GET", f"/v1/tuneforge/files/{data_file['id']}/check?model=&method=")[2]  # the built-in
    assert builtin["settings"]["base_model"] == "smollm2-135m-instruct"
    assert [f["line"] for f in builtin["findings"] if f["severity"] == "error"] == [3]
    status, _, err = call(studio, "GET", f"/v1/tuneforge/files/{data_file['id']}/check?method=grpo")
    assert status == 400 and err["error"]["param"] == "method"
    assert call(studio, "GET", "/v1/tuneforge/files/file-nope/check")[0] == 404


def test_preview_marks_trained_tokens_and_stats_count_them(studio, data_file, tiny_models):
    status, _, preview = call(studio, "GET", f"/v1/tuneforge/files/{data_file['id']}/preview?"
                                             f"{model_query(tiny_models)}&n=2")
    assert status == 200, preview
    first, second = preview["examples"]
    assert (first["line"], second["line"]) == (1, 2)  # line 3 is bad: left out, as training leaves it out
    assert "".join(s["text"] for s in first["segments"]).count("<script>alert(1)</script>") == 1
    trained = "".join(s["text"] for s in second["segments"] if s["trained"])
    assert trained.startswith("ALPHA BRAVO") and "Repeat" not in trained
    assert 0 < second["trained_tokens"] < second["tokens"]
    stats_url = f"/v1/tuneforge/files/{data_file['id']}/stats?{model_query(tiny_models)}"
    status, _, stats = call(studio, "GET", stats_url)
    assert status == 200, stats
    assert stats["records"] == 24 and stats["left_out"] == 1 and stats["max_seq_len"] == 1024
    counts, edges = stats["histogram"]["counts"], stats["histogram"]["edges"]
    assert sum(counts) == 23 and len(edges) == len(counts) + 1 and stats["over_max_seq_len"] == 0
    # the bins span the data's lengths, not 0..max_seq_len (short data would sit in one bar)
    assert (edges[0], edges[-1]) == (stats["tokens"]["min"], stats["tokens"]["max"] + 1)
    assert stats["tokens"]["min"] <= stats["tokens"]["p50"] <= stats["tokens"]["max"] and stats["tokens_per_epoch"] > 0
    cut = call(studio, "GET", f"{stats_url}&max_seq_len=40")[2]
    assert cut["max_seq_len"] == 40 and cut["over_max_seq_len"] == 23 - sum(cut["histogram"]["counts"]) > 0


def test_convert_writes_a_new_messages_file(studio):
    alpaca = upload(studio, "alpaca.jsonl", b'{"instruction": "Say hi", "output": "Hi!"}\n{"oops": 1}\n')
    status, _, new = call(studio, "POST", f"/v1/tuneforge/files/{alpaca['id']}/convert", {"to": "messages"})
    assert status == 200, new
    assert new["object"] == "file" and new["filename"] == "alpaca.messages.jsonl" and new["id"] != alpaca["id"]
    assert new["converted"] == {"read": 2, "written": 1, "rejected": 1}
    content = call(studio, "GET", f"/v1/files/{new['id']}/content")[2]
    assert json.loads(content) == {"messages": [{"role": "user", "content": "Say hi"},
                                                {"role": "assistant", "content": "Hi!"}]}
    assert new["id"] in [f["id"] for f in call(studio, "GET", "/v1/files")[2]["data"]]


# --- config, presets, plan -------------------------------------------------------------------------------

def test_schema_describes_every_key_and_what_the_studio_owns(studio):
    status, _, schema = call(studio, "GET", "/v1/tuneforge/schema")
    assert status == 200
    assert "learning_rate" in schema["properties"] and schema["properties"]["learning_rate"]["description"]
    assert "LoraConfig" in schema["$defs"] and schema["$defs"]["LoraConfig"]["properties"]["r"]["description"]
    assert {"base_model", "datasets", "output_dir", "trust_remote_code"} <= set(schema["x-studio"]["owned"])
    assert "grpo" not in schema["x-studio"]["method_types"] and "kto" in schema["x-studio"]["method_types"]


def test_presets_check_and_those_a_job_cannot_run_say_so(studio, data_file):
    status, _, presets = call(studio, "GET", "/v1/tuneforge/presets")
    by_name = {p["name"]: p for p in presets["data"]}
    assert status == 200 and list(by_name)[:4] == ["chat-sft", "dpo", "classification", "embedding"]
    for preset in presets["data"]:
        assert "datasets" not in preset["config"] and preset["title"] and preset["description"]
        status, _, checked = call(studio, "POST", "/v1/tuneforge/config",
                                  {"yaml": preset["yaml"], "training_file": data_file["id"]})
        assert status == 200 and (checked["ok"] or not preset["startable"]), (preset["name"], checked["errors"])
    assert all(by_name[name]["startable"] for name in ("chat-sft", "dpo", "classification", "embedding"))
    assert not by_name["pretrain"]["startable"] and "tuneforge train" in by_name["pretrain"]["note"]


def test_config_errors_name_their_keys(studio):
    bad = "base_model: smollm2-135m-instruct\nlora:\n  r: 0\nlearning_rat: 0.001\n"
    status, _, answer = call(studio, "POST", "/v1/tuneforge/config", {"yaml": bad})
    assert status == 200 and answer["ok"] is False
    by_key = {e["key"]: e["message"] for e in answer["errors"]}
    assert "lora.r" in by_key and "did you mean learning_rate" in by_key["learning_rat"]
    answer = call(studio, "POST", "/v1/tuneforge/config", {"config": {"trust_remote_code": True}})[2]
    assert [e["key"] for e in answer["errors"]] == ["trust_remote_code"]
    answer = call(studio, "POST", "/v1/tuneforge/config", {"config": {"method": "grpo"}})[2]
    assert [e["key"] for e in answer["errors"]] == ["method"]
    status, _, err = call(studio, "POST", "/v1/tuneforge/config", {"yaml": "a: [1,\n"})
    assert status == 400 and err["error"]["code"] == "invalid_yaml" and "yaml:" in err["error"]["message"]


def test_the_job_request_runs_exactly_the_config_shown(studio, data_file, tiny_models):
    yaml_text = (f"base_model: {tiny_models['llama']}\nmethod: dpo\nlora: {{r: 4}}\nepochs: 2\nlearning_rate: 1.0e-4\n"
                 "datasets: [{path: elsewhere.jsonl}]\nmax_seq_len: 128\n")
    status, _, answer = call(studio, "POST", "/v1/tuneforge/config", {"yaml": yaml_text, "training_file": data_file["id"],
                                                                     "suffix": "ui"})
    assert status == 200 and answer["ok"], answer["errors"]
    assert answer["warnings"] and answer["warnings"][0].startswith("datasets:")
    config = answer["config"]
    assert (config["lora"]["r"], config["epochs"], config["method"], config["max_seq_len"]) == (4, 2, "dpo", 128)
    assert config["save_every"] == 10 and config["micro_batch_size"] == 4  # the studio's defaults, as the job gets
    request = answer["job_request"]
    assert request["model"] == str(tiny_models["llama"]) and request["training_file"] == data_file["id"]
    assert request["method"]["dpo"]["hyperparameters"]["n_epochs"] == 2
    status, _, job = call(studio, "POST", "/v1/fine_tuning/jobs", request)
    assert status == 200, job
    call(studio, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})
    stored = studio.store.job(job["id"])["config"]
    assert {k: v for k, v in stored.items() if k not in ("datasets", "output_dir")} == yaml.safe_load(answer["yaml"])
    assert job["hyperparameters"]["n_epochs"] == 2 and job["user_provided_suffix"] == "ui"


def test_plan_answers_fit_memory_and_cost_without_data(studio, tiny_models):
    started = time.monotonic()
    status, _, plan = call(studio, "POST", "/v1/tuneforge/plan", {"config": {"base_model": "smollm2-135m-instruct"}})
    assert status == 200, plan
    assert time.monotonic() - started < 10
    assert plan["fits"] is True and plan["device"] and plan["peak_memory_gb"] > 0
    assert {"weights", "adapter", "optimizer", "gradients", "activations"} <= set(plan["memory_by_part"])
    h200 = next(r for r in plan["rows"] if r["gpu"] == "H200")
    assert h200["fits"] and h200["hours"] > 0 and h200["cost_usd"] > 0
    assert "1,000 examples" in plan["data"]["how"]
    status, _, err = call(studio, "POST", "/v1/tuneforge/plan", {"config": {"lora": {"r": -1}}})
    assert status == 400 and err["error"]["param"] == "lora.r"


# --- runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(studio, tiny_models):
    """One tiny LoRA job trained to the end, with validation and the before/after evaluation, started the way
    the page starts it: POST /v1/tuneforge/config, then its job_request to the jobs API."""
    train = upload(studio, "memo.jsonl", "".join(json.dumps(r) + "\n" for r in memorise_records(16)).encode())
    held = upload(studio, "held.jsonl", "".join(json.dumps(chat(f"Say {w} twice", f"{w} {w}".upper())) + "\n"
                                                for w in ("golf", "kilo", "lima")).encode())
    config = {"base_model": str(tiny_models["llama"]), "max_steps": 6, "save_every": 3, "eval_every": 3,
              "device": "cpu", "precision": "fp32", "max_seq_len": 64, "learning_rate": 5e-3,
              "lora": {"r": 8, "alpha": 16}, "diagnose": {"enabled": False},
              "evaluation": {"before_after": True, "max_new_tokens": 4}}
    answer = call(studio, "POST", "/v1/tuneforge/config", {"config": config, "training_file": train["id"],
                                                          "validation_file": held["id"], "suffix": "ui"})[2]
    assert answer["ok"], answer["errors"]
    job = call(studio, "POST", "/v1/fine_tuning/jobs", answer["job_request"])[2]
    job = wait_for(lambda: (j := call(studio, "GET", f"/v1/fine_tuning/jobs/{job['id']}")[2])["status"] in
                   ("succeeded", "failed", "cancelled") and j)
    log = studio.store.jobs_dir / job["id"] / "train.log"
    assert job["status"] == "succeeded", (job["error"], log.is_file() and log.read_text()[-3000:])
    return job


def test_metrics_hold_every_logged_step_and_the_validation(studio, trained):
    status, _, m = call(studio, "GET", f"/v1/tuneforge/jobs/{trained['id']}/metrics")
    assert status == 200
    assert m["status"] == "succeeded" and m["total_steps"] == 6
    assert [s["step"] for s in m["steps"]] == [1, 2, 3, 4, 5, 6]
    assert all(s["loss"] > 0 and s["lr"] > 0 and "grad_norm" in s and "examples" not in s for s in m["steps"])
    assert [v["step"] for v in m["validation"]] == [3, 6] and all(v["val_loss"] > 0 for v in m["validation"])
    assert m["config"]["max_steps"] == 6 and m["diagnoses"] == []
    events = call(studio, "GET", f"/v1/fine_tuning/jobs/{trained['id']}/events?limit=100")[2]["data"]
    logged = {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}
    assert logged == {s["step"]: s["loss"] for s in m["steps"]}  # the same numbers as the jobs API's events


def test_evaluation_before_and_after_side_by_side(studio, trained):
    status, _, ev = call(studio, "GET", f"/v1/tuneforge/jobs/{trained['id']}/evaluation")
    assert status == 200 and ev["before"] and ev["after"]
    rows = {r["name"]: r for r in ev["rows"]}
    assert rows["val_loss"]["better"] == "lower" and rows["val_loss"]["after"] == ev["after"]["val_loss"]
    assert rows["exact_match"]["better"] == "higher" and "samples" not in rows


def test_compare_lists_the_config_keys_that_differ_and_the_curves(studio, trained, tiny_models):
    other = dict(trained["method"])
    request = {"model": trained["model"], "training_file": trained["training_file"], "method": other,
               "tuneforge": {"lora": {"r": 4}, "max_steps": 6, "device": "cpu"}}
    second = call(studio, "POST", "/v1/fine_tuning/jobs", request)[2]
    call(studio, "POST", f"/v1/fine_tuning/jobs/{second['id']}/cancel", {})
    status, _, c = call(studio, "GET", f"/v1/tuneforge/compare?jobs={trained['id']},{second['id']}")
    assert status == 200
    assert [j["id"] for j in c["jobs"]] == [trained["id"], second["id"]]
    diff = {d["key"]: d["values"] for d in c["config_diff"]}
    assert diff["lora.r"] == [8, 4] and "output_dir" not in diff
    assert [p["step"] for p in c["curves"][trained["id"]]] == [1, 2, 3, 4, 5, 6] and c["curves"][second["id"]] == []
    assert call(studio, "GET", f"/v1/tuneforge/compare?jobs={trained['id']}")[0] == 400


# --- review and export -----------------------------------------------------------------------------------

def test_a_blind_review_writes_one_preference_pair_to_the_reviews_file(studio, trained, monkeypatch):
    monkeypatch.setattr(review_module, "MAX_TOKENS", 6)  # a random tiny model never ends its answer
    status, _, review = call(studio, "POST", f"/v1/tuneforge/jobs/{trained['id']}/review", {})
    assert status == 200, review
    assert review["prompt"][-1]["role"] == "user" and review["prompt"][-1]["content"].startswith("Say ")
    tuned = call(studio, "POST", "/v1/chat/completions", {"model": trained["fine_tuned_model"], "temperature": 0,
                                                          "max_tokens": 6, "messages": review["prompt"]})[2]
    assert tuned["choices"][0]["message"]["content"] in review["answers"].values()
    assert "tuned" not in json.dumps(review) and "base" not in json.dumps(review)  # the order stays hidden
    status, _, saved = call(studio, "POST", f"/v1/tuneforge/reviews/{review['review_id']}", {"choice": "B"})
    assert status == 200 and saved["saved"] and saved["pairs"] == 1
    assert saved["file"]["filename"] == "reviews.jsonl" and saved["file"]["purpose"] == "fine-tune"
    assert call(studio, "POST", f"/v1/tuneforge/reviews/{review['review_id']}", {"choice": "A"})[0] == 400
    [pair] = [json.loads(line) for line in call(studio, "GET", f"/v1/files/{saved['file']['id']}/content")[2]
              .decode().splitlines()]
    assert pair == {"prompt": review["prompt"], "chosen": [{"role": "assistant", "content": review["answers"]["B"]}],
                    "rejected": [{"role": "assistant", "content": review["answers"]["A"]}]}
    [record] = read_records(studio.store.file_path(saved["file"]["id"]))
    assert record.kind == "preference"  # what method: dpo trains on
    tie = call(studio, "POST", f"/v1/tuneforge/jobs/{trained['id']}/review", {})[2]
    after = call(studio, "POST", f"/v1/tuneforge/reviews/{tie['review_id']}", {"choice": "tie"})[2]
    assert after["saved"] is False and after["pairs"] == 1 and after["ties"] == 1
    assert after["file"]["bytes"] == saved["file"]["bytes"]


def test_a_job_on_the_reviews_file_trains_on_a_snapshot_that_later_choices_leave_alone(studio, trained, monkeypatch):
    """A choice appended while a DPO job waits for (or trains on) the reviews file changes neither the data the
    job reads nor its hash (a resume checks it); the reviews file itself keeps growing."""
    monkeypatch.setattr(review_module, "MAX_TOKENS", 6)

    def choose(choice: str) -> dict:
        review = call(studio, "POST", f"/v1/tuneforge/jobs/{trained['id']}/review", {})[2]
        return call(studio, "POST", f"/v1/tuneforge/reviews/{review['review_id']}", {"choice": choice})[2]["file"]
    reviews = choose("A")
    job = call(studio, "POST", "/v1/fine_tuning/jobs", {"model": trained["model"], "training_file": reviews["id"],
                                                        "method": {"type": "dpo"}, "tuneforge": {"device": "cpu"}})[2]
    call(studio, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})  # its config is what matters here
    data = Path(studio.store.job(job["id"])["config"]["datasets"][0]["path"])
    before, records = sha256_file(data), list(read_records(data))
    grown = choose("B")
    assert grown["id"] == reviews["id"] and grown["bytes"] > reviews["bytes"]  # the file keeps growing
    assert sha256_file(data) == before and list(read_records(data)) == records
    assert len(list(read_records(studio.store.file_path(reviews["id"])))) == len(records) + 1


def finished_export(server, made: dict, headers: dict | None = None) -> dict:
    """Poll an export, as the page does, until it has finished."""
    path = f"/v1/tuneforge/exports/{made['id']}"
    return wait_for(lambda: (e := call(server, "GET", path, headers=headers)[2])["status"] in ("succeeded", "failed")
                    and e)


def test_export_estimates_writes_and_downloads_a_gguf_and_a_zipped_adapter(studio, trained):
    base = f"/v1/tuneforge/jobs/{trained['id']}"
    status, _, guess = call(studio, "GET", f"{base}/export/estimate?to=gguf&quant=q8_0")
    assert status == 200, guess
    status, _, made = call(studio, "POST", f"{base}/exports", {"to": "gguf", "quant": "q8_0"})
    assert status == 200, made
    made = finished_export(studio, made)
    assert made["status"] == "succeeded", made
    assert abs(made["bytes"] - guess["bytes"]) < 0.2 * made["bytes"], (made["bytes"], guess["bytes"])
    status, response, data = call(studio, "GET", made["download"])
    assert status == 200 and len(data) == made["bytes"] and data[:4] == b"GGUF"
    assert response.getheader("Content-Disposition").startswith("attachment; filename=")
    guess = call(studio, "GET", f"{base}/export/estimate?to=adapter")[2]
    made = finished_export(studio, call(studio, "POST", f"{base}/exports", {"to": "adapter"})[2])
    assert abs(made["bytes"] - guess["bytes"]) < 0.1 * made["bytes"]
    status, response, data = call(studio, "GET", made["download"])
    assert status == 200 and response.getheader("Content-Type") == "application/zip"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert "adapter_model.safetensors" in z.namelist() and "README.md" in z.namelist()
    assert call(studio, "GET", f"{base}/export/estimate?to=tflite")[0] == 400
    assert call(studio, "GET", "/v1/tuneforge/exports/export-nope/download")[0] == 404


def test_a_format_the_run_cannot_be_written_in_is_refused_when_asked(studio, trained, monkeypatch):
    """GGUF of a reward model (a score head, which llama.cpp does not run) is a 400 at once, naming the job and
    what to use instead, not a queued export that fails later."""
    real = exports_module._run

    def as_reward(*args):
        run = real(*args)
        return dataclasses.replace(run, config=run.config.model_copy(update={"method": "reward"}))
    monkeypatch.setattr(exports_module, "_run", as_reward)
    listed = call(studio, "GET", f"/v1/tuneforge/jobs/{trained['id']}/exports")[2]["data"]
    status, _, body = call(studio, "POST", f"/v1/tuneforge/jobs/{trained['id']}/exports", {"to": "gguf"})
    message = body["error"]["message"]
    assert status == 400 and "method: reward run (a score head)" in message and "use --to hf" in message, body
    assert f"job {trained['id']}'s run" in message and str(studio.store.home) not in message
    assert call(studio, "GET", f"/v1/tuneforge/jobs/{trained['id']}/exports")[2]["data"] == listed


def test_an_export_is_written_in_the_background_once_and_deleted_only_when_finished(studio, trained, monkeypatch):
    """POST answers at once (queued); the same export asked again while it runs is the same export; DELETE is
    refused while it runs (409) and then removes its record and files; a failure says why."""
    started, release = threading.Event(), threading.Event()
    real = exports_module.export_run

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(60)
        return real(*args, **kwargs)
    monkeypatch.setattr(exports_module, "export_run", slow)
    base = f"/v1/tuneforge/jobs/{trained['id']}"
    status, _, made = call(studio, "POST", f"{base}/exports", {"to": "gguf", "quant": "f16"})
    assert status == 200 and made["status"] == "queued" and made["download"] is None, made
    assert started.wait(60)
    again = call(studio, "POST", f"{base}/exports", {"to": "gguf", "quant": "f16"})[2]
    assert again["id"] == made["id"] and again["status"] == "running"
    other = call(studio, "POST", f"{base}/exports", {"to": "gguf", "quant": "q8_0"})[2]
    assert other["id"] != made["id"] and other["status"] == "queued"  # waits for the running one
    status, _, refused = call(studio, "DELETE", f"/v1/tuneforge/exports/{made['id']}")
    assert status == 409 and "running" in refused["error"]["message"], refused
    assert call(studio, "GET", f"/v1/tuneforge/exports/{made['id']}/download")[0] == 409
    assert call(studio, "DELETE", f"/v1/tuneforge/exports/{other['id']}")[0] == 200  # a queued one may go
    release.set()
    done = finished_export(studio, made)
    assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["error"] is None, done["error"]
    listed = [e["id"] for e in call(studio, "GET", f"{base}/exports")[2]["data"]]
    assert made["id"] in listed and other["id"] not in listed
    assert made["id"] in [e["id"] for e in call(studio, "GET", "/v1/tuneforge/exports")[2]["data"]]
    folder = studio.store.home / "exports" / made["id"]
    assert folder.is_dir() and not (studio.store.home / "exports" / other["id"]).exists()
    status, _, gone = call(studio, "DELETE", f"/v1/tuneforge/exports/{made['id']}")
    assert status == 200 and gone["deleted"] is True and not folder.exists()
    assert call(studio, "GET", f"/v1/tuneforge/exports/{made['id']}")[0] == 404

    def broken(run, to, out, quant):
        raise TuneforgeError(f"{out}: the disk is full")
    monkeypatch.setattr(exports_module, "export_run", broken)
    failed = finished_export(studio, call(studio, "POST", f"{base}/exports", {"to": "hf"})[2])
    assert failed["status"] == "failed" and failed["error"] == "the export: the disk is full", failed


def test_exports_are_scoped_to_their_key_and_a_restart_fails_the_one_it_cut_off(tmp_path):
    home = tmp_path / "home"
    keys = {name: new_key(home / "keys", name) for name in ("alice", "bob")}
    server = start(home, api_keys=home / "keys")
    running = server.store.add_export("alice", "ftjob-x", "gguf", "q8_0", 1000)
    server.store.move_export(running["id"], "running", ("queued",))
    queued = server.store.add_export("alice", "ftjob-gone", "hf", None, 1000)  # its run has been deleted since
    as_ = {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}
    path = f"/v1/tuneforge/exports/{running['id']}"
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/download")):
        assert call(server, method, path + suffix, headers=as_["bob"])[0] == 404
    assert call(server, "GET", "/v1/tuneforge/exports", headers=as_["bob"])[2]["data"] == []
    token = call(server, "GET", "/v1/tuneforge/session", headers=as_["alice"])[2]["csrf_token"]
    assert call(server, "DELETE", path, headers={**as_["alice"], **browser(server)})[0] == 403  # no CSRF token
    assert call(server, "DELETE", path, headers={**as_["alice"], **browser(server, token)})[0] == 409
    stop(server)
    server = start(home, api_keys=home / "keys")
    try:
        after = call(server, "GET", path, headers=as_["alice"])[2]
        assert after["status"] == "failed" and "interrupted by a restart" in after["error"], after
        retried = finished_export(server, {"id": queued["id"]}, as_["alice"])  # queued again, and written (or not)
        assert retried["status"] == "failed" and "job ftjob-gone's run" in retried["error"], retried
        assert str(home) not in retried["error"]  # no server path in what a key is told
    finally:
        stop(server)


def test_a_classification_preset_job_passes_validation_as_its_row_reads_the_file(studio):
    labelled = upload(studio, "labels.jsonl", b"".join(json.dumps({"text": f"{w} {i}", "label": w}).encode() + b"\n"
                                                        for i in range(6) for w in ("yes", "no")))
    preset = next(p for p in call(studio, "GET", "/v1/tuneforge/presets")[2]["data"] if p["name"] == "classification")
    request = call(studio, "POST", "/v1/tuneforge/config", {"config": preset["config"],
                                                           "training_file": labelled["id"]})[2]["job_request"]
    job = call(studio, "POST", "/v1/fine_tuning/jobs", request)[2]
    assert studio.store.job(job["id"])["config"]["task"] == "classification"
    checked = wait_for(lambda: (j := studio.store.job(job["id"]))["status"] != "validating_files" and j)
    call(studio, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})  # validated, not trained to the end
    assert checked["status"] in ("queued", "running"), checked["error"]
