"""The LLM judge against a local stub endpoint: position-swap logic, grading, failures reported, bounded requests."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneforge.config import JudgeSpec
from tuneforge.eval.judge import JudgeError, judge_pairwise, judge_single


def serve(reply):
    """A stub OpenAI-compatible endpoint on 127.0.0.1 whose reply is reply(prompt) (an int is an HTTP error)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            seen.append((self.path, self.headers.get("Authorization"), prompt))
            out = reply(prompt)
            if isinstance(out, int):
                self.send_response(out)
                self.end_headers()
                return
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": out}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, seen


@pytest.fixture
def judge():
    servers = []

    def start(reply, **kw):
        server, seen = serve(reply)
        servers.append(server)
        spec = JudgeSpec(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="stub", timeout_s=5, **kw)
        return spec, seen
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def samples(answers: list[str]) -> list[dict]:
    return [{"prompt": f"q{i}", "question": f"question {i}", "reference": f"right {i}", "answer": a, "where": f"v:{i}"}
            for i, a in enumerate(answers)]


# Base is wrong on every prompt; tuned is right on the first 6 and as wrong as base on the last 2.
BASE = samples([f"wrong {i}" for i in range(8)])
TUNED = samples([f"right {i}" if i < 6 else f"wrong {i}" for i in range(8)])


def fair(prompt: str) -> str:
    """Prefers the answer equal to the reference; a tie when both or neither are."""
    ref = re.search(r"\[Reference answer\]\n(.*)\n", prompt).group(1)
    a = re.search(r"\[Answer A\]\n(.*)\n", prompt).group(1) == ref
    b = re.search(r"\[Answer B\]\n(.*)\n", prompt).group(1) == ref
    return "Reasoning... [[A]]" if a and not b else "[[B]]" if b and not a else "Equal. [[C]]"


def test_a_judge_that_always_says_a_scores_only_ties(judge):
    spec, seen = judge(lambda p: "I prefer the first. [[A]]")
    out = judge_pairwise(spec, BASE, TUNED)
    assert out["rates"]["tie"]["count"] == 8 and out["rates"]["win"]["count"] == 0 == out["rates"]["loss"]["count"]
    assert len(seen) == 16 and {path for path, _, _ in seen} == {"/v1/chat/completions"}  # both orders of each pair


def test_a_fair_judge_gives_the_expected_wins_with_an_interval(judge):
    spec, _ = judge(fair, concurrency=3)
    out = judge_pairwise(spec, BASE, TUNED)
    assert {k: v["count"] for k, v in out["rates"].items()} == {"win": 6, "tie": 2, "loss": 0}
    win = out["rates"]["win"]
    assert win["rate"] == 0.75 and win["ci95"][0] < 0.75 < win["ci95"][1] and out["n"] == 8 and out["failed"] == 0
    assert out["replies"][0]["base_first"] == "[[B]]" and out["replies"][0]["tuned_first"] == "Reasoning... [[A]]"
    swapped = judge_pairwise(spec, TUNED, BASE)  # the same pairs seen from the other side are losses
    assert swapped["rates"]["loss"]["count"] == 6


def test_single_grading_and_a_custom_prompt(judge, tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Q: {question}\nRef: {reference}\nA: {answer}\nGrade [[N]].")
    spec, seen = judge(lambda p: "[[9]]" if "A: right" in p else "meh [[2]]", mode="single", prompt=str(rubric),
                       max_examples=4)
    out = judge_single(spec, BASE, TUNED)
    assert out["rates"]["base"]["rate"] == 2 and out["rates"]["tuned"]["rate"] == 9 and out["n"] == 4
    assert out["difference"]["difference"] == 7 and out["difference"]["significant"]
    assert "Q: question 0\nRef: right 0\nA: wrong 0\nGrade [[N]]." in [p for _, _, p in seen]


def test_a_failing_judge_is_reported_not_scored(judge, monkeypatch):
    spec, seen = judge(lambda p: 500, retries=1)
    monkeypatch.setattr("tuneforge.eval.judge.time.sleep", lambda s: None)
    with pytest.raises(JudgeError, match="no pair could be judged.*HTTP 500"):
        judge_pairwise(spec, BASE[:2], TUNED[:2])
    assert len(seen) == 8  # two attempts for each of the four requests
    # Replies without a verdict for one pair: that pair is left out and counted as failed, with the reason.
    spec, _ = judge(lambda p: "no idea" if "question 0" in p else fair(p))
    out = judge_pairwise(spec, BASE[:3], TUNED[:3])
    assert out["failed"] == 1 and out["n"] == 2 and "v:0" in out["error"] and "verdict" in out["error"]


def test_the_key_comes_from_the_named_environment_variable(judge, monkeypatch):
    from tuneforge.errors import ConfigError

    spec, seen = judge(fair, api_key_env="JUDGE_KEY_FOR_TEST")
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST", raising=False)
    with pytest.raises(ConfigError, match="JUDGE_KEY_FOR_TEST is not set"):
        judge_pairwise(spec, BASE[:1], TUNED[:1])
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-test")
    judge_pairwise(spec, BASE[:1], TUNED[:1])
    assert seen[0][1] == "Bearer sk-test"
