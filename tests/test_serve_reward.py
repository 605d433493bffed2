"""`tuneforge serve` of a reward run (`method: reward`) or its export: /v1/classify answers as transformers'
text-classification pipeline does on the exported folder, plus the raw reward, which for a prompt and answer equals
the reward training computed; the chat routes, which a score head cannot answer, are refused with a 400 that says
where to go."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model, write_jsonl
from test_preference import preference_records
from test_train import QUIET, make_cfg

from tuneforge.data.batching import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.formats import as_messages
from tuneforge.errors import ModelError
from tuneforge.export.run_export import export_run
from tuneforge.methods.reward import sequence_scores
from tuneforge.models.run import load_tuned, open_run
from tuneforge.serve import make_server
from tuneforge.serve.rewards import reward_batch
from tuneforge.train.loop import train

HISTORY = [{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Which colour is item 40?"}]
HELD_OUT = [  # text prompts, a prompt with history and a system prompt, an answer given as messages
    {"prompt": "Which colour is item 3?", "chosen": "Item 3 is blue.", "rejected": "Item 3 is red."},
    {"prompt": HISTORY, "chosen": "Blue.", "rejected": "Red, I think."},
    {"prompt": "Which colour is item 7?", "chosen": [{"role": "assistant", "content": "Item 7 is blue."}],
     "rejected": [{"role": "assistant", "content": "No idea."}]},
]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tokenizers):
    """A LoRA reward run on a tiny Llama (3 steps), its merged export, and `tuneforge serve` of the run."""
    tmp = tmp_path_factory.mktemp("reward_serve")
    llama = make_tiny_model(tmp / "llama", "llama", tokenizers["smol"])
    cfg = make_cfg(tmp, llama, method="reward", adapter="lora", max_steps=3, learning_rate=1e-3,
                   datasets=[{"path": str(write_jsonl(tmp / "pref.jsonl", preference_records(16)))}],
                   validation={"path": str(write_jsonl(tmp / "held_out.jsonl", HELD_OUT))}, **{"lora.dropout": 0.0})
    train(cfg, reporter=QUIET)
    exported = export_run(open_run(tmp / "run"), "hf", tmp / "hf", dtype="float32")
    with serving(tmp / "run") as server:
        yield SimpleNamespace(cfg=cfg, run=tmp / "run", exported=exported, server=server, tokenizer=tokenizers["smol"])


@contextlib.contextmanager
def serving(target):
    server = make_server(target, port=0, quiet=True, device="cpu")
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url.removesuffix("/v1") + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def same(got, expected) -> bool:
    """The pipeline's answer, in its shape, with the scores within 1e-5, and a reward beside each score."""
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(same, got, expected))
    return (set(got) == {"label", "score", "reward"} and got["label"] == expected["label"]
            and abs(got["score"] - expected["score"]) < 1e-5)


def rewards(server, inputs: list) -> list[float]:
    status, body = call(server, "/v1/classify", {"input": inputs})
    assert status == 200, body
    return [entry["reward"] for entry in body["data"]]


def test_classify_answers_as_the_pipeline_on_the_export_plus_the_raw_reward(reward_run):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(reward_run.exported), device=-1)
    texts = ["Item 3 is blue.", "hello there, how are you?"]
    for body, expected in (({"input": texts, "top_k": None}, classify(texts, top_k=None)),
                           ({"input": texts[0]}, classify(texts[0])), ({"input": texts}, classify(texts))):
        status, answer = call(reward_run.server, "/v1/classify", body)
        assert status == 200 and answer["model"] == "run", answer
        assert same(answer["data"], expected)
    raw = [e["score"] for e in classify(texts, function_to_apply="none")]  # the score head's own output
    assert rewards(reward_run.server, texts) == pytest.approx(raw, abs=1e-4)
    assert len({round(r, 3) for r in raw}) == 2 and not all(0 <= r <= 1 for r in raw)  # raw, not squashed


def test_a_prompt_and_answer_scores_as_training_scored_it(reward_run):
    """Served rewards of the held-out pairs average to eval_after.json's (the trained model's own scoring); each
    side is the prepared data's token ids, scored as training scores them; a conversation and a prompt + response
    agree, and so does the merged export served as a model folder."""
    chosen = [{"prompt": r["prompt"], "response": r["chosen"]} for r in HELD_OUT]
    rejected = [{"prompt": r["prompt"], "response": r["rejected"]} for r in HELD_OUT]
    c, r = torch.tensor(rewards(reward_run.server, chosen)), torch.tensor(rewards(reward_run.server, rejected))
    after = json.loads((reward_run.run / "eval_after.json").read_text())
    assert after["val_rewards/chosen"] == pytest.approx(c.mean().item(), abs=1e-5)
    assert after["val_rewards/rejected"] == pytest.approx(r.mean().item(), abs=1e-5)
    assert after["val_rewards/margins"] == pytest.approx((c - r).mean().item(), abs=1e-5)

    tok = reward_run.tokenizer
    data = prepare_data(reward_run.cfg, tok)
    sides = [*data.validation, *data.validation_rejected]
    prepared = [tuple(int(i) for i in row.input_ids) for row in sides]
    end_of_turn = json.loads((reward_run.run / "run.json").read_text())["end_of_turn"]
    pairs = [(x["prompt"], x["response"]) for x in chosen + rejected]
    batch = reward_batch(tok, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512)), pairs, end_of_turn)
    served = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert set(served) == set(prepared) and len(set(prepared)) == 6
    tuned, _ = load_tuned(open_run(reward_run.run), torch.device("cpu"))
    with torch.no_grad():  # each prepared side alone, through the training code's scoring
        trained = dict(zip(prepared, [sequence_scores(tuned, collate([side], tok.pad_token_id)).item()
                                      for side in sides]))
    assert torch.cat([c, r]).tolist() == pytest.approx([trained[ids] for ids in served], abs=1e-5)

    conversations = [{"messages": as_messages(x["prompt"], "user") + as_messages(x["response"], "assistant")}
                     for x in chosen]
    assert rewards(reward_run.server, conversations) == pytest.approx(c.tolist(), abs=1e-6)
    with serving(reward_run.exported) as folder:  # merged weights: within 1e-4
        assert rewards(folder, chosen) == pytest.approx(c.tolist(), abs=1e-4)


def test_chat_routes_are_refused_with_the_route_to_use_and_bad_inputs_named(reward_run):
    server = reward_run.server
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        status, answer = call(server, path, body)
        assert status == 400, answer
        assert "reward model" in answer["error"]["message"] and "POST /v1/classify" in answer["error"]["message"]
    # The base alone has no trained score head, so only the run is served, as its routes say.
    assert [m["id"] for m in call(server, "/v1/models")[1]["data"]] == ["run"]
    assert call(server, "/v1/models/llama")[0] == 404
    with pytest.raises(ModelError, match="reward model .* served alone"):
        make_server(reward_run.run, port=0, adapters={"other": reward_run.run}, device="cpu")
    status, answer = call(server, "/v1/classify", {"input": [{"messages": [{"role": "user", "content": "hi"}]}]})
    assert status == 400 and answer["error"]["message"].startswith("input[0].messages: end with the assistant turn")
    status, answer = call(server, "/v1/classify", {"input": ["fine", {"prompt": "hi", "answer": "x"}]})
    assert status == 400 and answer["error"]["message"].startswith("input[1]: give")


def test_a_merged_export_is_served_as_the_model_folder_it_is(tmp_path, tiny_models):
    """A merged export carries its run's run.json beside config.json (R-MRG-2); serve reads it as a model folder,
    not as a run without final/."""
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "merged")
    (folder / "run.json").write_text(json.dumps({"merged_from": "runs/x/final"}))
    with serving(folder) as server:
        status, answer = call(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2})
        assert status == 200 and answer["model"] == "merged", answer
