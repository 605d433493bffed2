"""The OpenAI-compatible server, on a tiny random Llama: the official client, raw HTTP errors, adapters."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from test_train import QUIET, make_cfg

from tuneforge.data.template import generation_prompt
from tuneforge.errors import ModelError, TuneforgeError
from tuneforge.eval.evaluate import greedy_generate
from tuneforge.eval.generate import answer
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.models.run import load_tuned, open_run
from tuneforge.serve import make_server
from tuneforge.models.decode import pick_token
from tuneforge.serve.protocol import Sampling
from tuneforge.serve.text import IncrementalDecoder, cut_at_stops, held_back
from tuneforge.train.loop import train

KEY = "sk-test-key"
CPU = torch.device("cpu")
HELLO = [{"role": "user", "content": "Say hello"}]


def make_adapter(base_dir, out, seed: int):
    """A LoRA adapter with random (non-zero) B, so it visibly changes the base model's answers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(base_dir, CPU)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out, safe_serialization=True)
    return out


def start(target, **kwargs):
    server = make_server(target, port=0, quiet=True, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=2, **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    return tmp / "run"


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_models["llama"], tmp / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def server(run_dir, adapters):
    srv = start(run_dir, adapters=[f"alpha={adapters['alpha']}", f"beta.v2={adapters['beta']}"], api_key=KEY)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0) as c:
        yield c


def chat(client, model="run", messages=HELLO, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **kw)


def post(server, path, data: bytes, key: str | None = KEY, method="POST"):
    """(status, JSON body) of a raw request, for the error cases the official client would not send."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server.url.removesuffix("/v1") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def error_of(status_body) -> dict:
    status, body = status_body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# --- the official client ---------------------------------------------------------------------------


def test_models_lists_base_run_and_each_adapter(client):
    assert [m.id for m in client.models.list()] == ["llama", "run", "alpha", "beta.v2"]
    assert client.models.retrieve("beta.v2").id == "beta.v2"


def test_greedy_chat_equals_tuneforge_generate(client, run_dir):
    """The server's answer is the one `tuneforge generate` gives for the same run and messages."""
    run = open_run(run_dir)
    model, tok = load_tuned(run, CPU)
    expected, _ = answer(model, tok, HELLO, run.stop_ids, max_new_tokens=12)
    r = chat(client, max_tokens=12)
    assert r.choices[0].message.content.strip() == expected and expected
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(generation_prompt(tok, HELLO))
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_stream_joins_to_the_non_streaming_answer(client):
    whole = chat(client, max_tokens=16)
    chunks = list(chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token
    last_choice = [c for c in chunks if c.choices][-1]
    assert last_choice.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_plain_and_streamed(client, run_dir):
    tok = load_tokenizer(run_dir / "final")
    r = client.completions.create(model="run", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens == len(tok("Once upon a time").input_ids)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 10)
    parts = list(client.completions.create(model="run", prompt="Once upon a time", max_tokens=10, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_answer_before_it(client):
    full = chat(client, max_tokens=20).choices[0].message.content
    stop = full[6:9]
    cut = full[: full.index(stop)]
    r = chat(client, max_tokens=20, stop=[stop, "never-there"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = list(chat(client, max_tokens=20, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client):
    r = chat(client, max_completion_tokens=1)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 1)


def test_seeded_sampling_repeats_and_seeds_differ(client):
    a, b, c = (chat(client, max_tokens=12, temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != c


def test_each_adapter_answers_differently_and_switching_is_exact(client, tiny_models):
    """Base, alpha and beta.v2 on one loaded base; answers repeat exactly when requests interleave in threads."""
    ids = ["alpha", "llama", "beta.v2", "run"]
    first = {m: chat(client, model=m, max_tokens=12).choices[0].message.content for m in ids}
    assert len({first["llama"], first["alpha"], first["beta.v2"]}) == 3, first
    tok = load_tokenizer(tiny_models["llama"])
    expected, _ = answer(load_model(tiny_models["llama"], CPU), tok, HELLO, [tok.eos_token_id], max_new_tokens=12)
    assert first["llama"].strip() == expected  # the base id really runs without any adapter
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda m: (m, chat(client, model=m, max_tokens=12).choices[0].message.content),
                              ids * 2))
    assert all(text == first[m] for m, text in again)


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError):
        chat(client, model="nope")
    err = error_of(post(server, "/v1/chat/completions", json.dumps({"model": "nope", "messages": HELLO}).encode()))
    assert err["code"] == "model_not_found" and "alpha" in err["message"]


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    for key in (None, "wrong"):
        status, body = post(server, "/v1/models", None, key=key, method="GET")
        assert status == 401 and error_of((status, body))["code"] == "invalid_api_key"


# --- raw HTTP: what a broken client sends ---------------------------------------------------------


def _body(**fields) -> bytes:
    return json.dumps({"model": "run", "messages": HELLO, **fields}).encode()


@pytest.mark.parametrize("data,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
    (json.dumps({"model": "run"}).encode(), "messages"),
    (_body(messages="hi"), "messages"),
    (_body(messages=[]), "messages"),
    (_body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (_body(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (_body(n=2), "n"),
    (_body(max_tokens=0), "max_tokens"),
    (_body(max_tokens="5"), "max_tokens"),
    (_body(max_tokens=True), "max_tokens"),
    (_body(temperature="hot"), "temperature"),
    (_body()[:-1] + b', "temperature": NaN}', "temperature"),
    (_body(top_p=0), "top_p"),
    (_body(stop=[1]), "stop"),
    (_body(stream="yes"), "stream"),
    (_body(model=3), "model"),
    (_body(tools=[{"type": "function"}]), "tools"),
    (_body(max_tokens=10_000), "max_tokens"),
])
def test_malformed_chat_requests_are_400(server, data, param):
    status, body = post(server, "/v1/chat/completions", data)
    assert status == 400, body
    assert error_of((status, body))["param"] == param


def test_malformed_completion_requests_are_400(server):
    for fields in ({}, {"prompt": 5}, {"prompt": ["a", "b"]}, {"prompt": "hi", "n": 3}):
        status, body = post(server, "/v1/completions", json.dumps({"model": "run", **fields}).encode())
        assert status == 400 and error_of((status, body))["type"] == "invalid_request_error"


def test_too_large_body_unknown_route_and_wrong_method(server):
    err = error_of(post(server, "/v1/chat/completions", b" " * (server.max_body_bytes + 1)))
    assert err["code"] == "request_too_large"
    assert error_of(post(server, "/v1/embeddings", b"{}"))["code"] == "not_found"
    assert error_of(post(server, "/v1/chat/completions", None, method="GET"))["code"] == "method_not_allowed"


def test_generation_error_is_500_and_the_server_lives_on(server, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")
        yield

    monkeypatch.setattr("tuneforge.serve.engine.generate_ids", broken)
    status, body = post(server, "/v1/chat/completions", _body(max_tokens=4))
    assert status == 500 and "boom" in error_of((status, body))["message"]
    status, body = post(server, "/v1/chat/completions", _body(max_tokens=4, stream=True))
    events = [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]
    assert status == 200 and "boom" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    monkeypatch.undo()
    assert chat(client, max_tokens=2).usage.completion_tokens == 2


# --- a plain model folder, whose generation_config.json names the stop tokens -------------------------


def test_model_folder_stops_on_generation_config_eos(tmp_path, tiny_models, adapters):
    """An exported folder is served as it is; an adapter on it leaves the folder's own id adapter-free."""
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "exported")
    tok = load_tokenizer(folder)
    prompt = generation_prompt(tok, HELLO)
    [(ids, _)] = greedy_generate(load_model(folder, CPU), [prompt], [tok.eos_token_id], tok.pad_token_id, 12, CPU)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, ids[k]]}))
    srv = start(folder, adapters={"alpha": adapters["alpha"]})
    try:
        with openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["exported", "alpha"]
            r = chat(client, model="exported", max_tokens=12)
            assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", k + 1)
            assert r.choices[0].message.content == tok.decode(ids[:k], skip_special_tokens=True)
            assert chat(client, model="alpha", max_tokens=12).choices[0].message.content != r.choices[0].message.content
    finally:
        srv.shutdown()
        srv.server_close()


def test_startup_errors_name_the_fix(tmp_path, run_dir, adapters, server):
    cases = [
        (tmp_path, {}, "neither a run folder"),
        (run_dir, ["alpha"], "NAME=PATH"),
        (run_dir, ["alpha=" + str(tmp_path)], "no adapter_config.json"),
        (run_dir, {"run": adapters["alpha"]}, "already the id"),
    ]
    for target, extra, message in cases:
        with pytest.raises(ModelError, match=message):
            make_server(target, port=0, adapters=extra)
    with pytest.raises(TuneforgeError, match="choose another port"):
        make_server(run_dir, port=server.port)


# --- pure pieces -------------------------------------------------------------------------------------


def test_incremental_decode_never_splits_a_character(tokenizers):
    tok = tokenizers["smol"]
    text = "héllo wörld 😀 日本語 ok"
    ids = tok(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should have a character split across tokens"
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_strings_are_cut_even_across_pieces():
    assert list(cut_at_stops(["ab", "c<", "|e", "nd|>tail"], ["<|end|>"])) == [
        ("ab", False), ("c", False), ("", False), ("", True)]
    assert "".join(t for t, _ in cut_at_stops(["ab", "c<", "|x"], ["<|end|>"])) == "abc<|x"
    assert held_back("abc<|e", ["<|end|>", "zz"]) == 3 and held_back("abc", ["<|end|>"]) == 0


def test_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    gen = torch.Generator().manual_seed(0)
    draws = {pick_token(logits, Sampling(temperature=1.0, top_p=0.01), gen) for _ in range(20)}
    assert draws == {1} and pick_token(logits, Sampling(temperature=0), None) == 1
