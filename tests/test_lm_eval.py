"""`tuneforge serve` answers lm-eval's local-completions log-likelihood requests with the model's own numbers,
and lm-eval run against it scores a local multiple-choice task as lm-eval's own `hf` model does."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import write_jsonl


@pytest.fixture(scope="module")
def served(tiny_models):
    from tuneforge.serve.server import make_server

    server = make_server(tiny_models["llama"], port=0, device="cpu", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def post(server, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url + "/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logp[-1]


def test_echo_logprobs_equal_the_models_own(served):
    engine = served.engine
    ids = engine.text_prompt("Repeat alpha bravo please")
    status, out = post(served, {"prompt": [ids, ids[:3]], "echo": True, "logprobs": 1, "max_tokens": 1,
                                "temperature": 0, "seed": 1234})
    assert status == 200, out
    want, last = own_logprobs(engine.model, ids)
    first, second = out["choices"]
    lp = first["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][1:-1] == pytest.approx(want.tolist(), abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(float(last.max()), abs=1e-4)  # the greedy next token
    assert all(max(top.values()) >= got - 1e-6 for top, got in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    assert len(second["logprobs"]["tokens"]) == 4 and second["index"] == 1
    # A string prompt is tokenized as completions are; max_tokens 0 echoes the prompt alone.
    status, out = post(served, {"prompt": "Repeat alpha bravo please", "echo": True, "logprobs": 0, "max_tokens": 0})
    assert out["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want.tolist(), abs=1e-4)
    assert out["choices"][0]["text"] == engine.tokenizer.decode(ids)


def test_scoring_requests_it_cannot_honour_are_refused(served):
    assert post(served, {"prompt": "a b", "echo": True, "logprobs": 1, "max_tokens": 5})[0] == 400
    assert post(served, {"prompt": "a b", "logprobs": 9})[0] == 400
    assert post(served, {"prompt": [[1, -2]], "echo": True})[0] == 400
    status, out = post(served, {"prompt": [[1, 10**7]], "echo": True})
    assert status == 400 and "outside this model's vocabulary" in out["error"]["message"]
    status, out = post(served, {"prompt": "a b", "echo": True, "stream": True})
    assert status == 400 and "stream" in out["error"]["message"]


TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_against_serve_equals_lm_eval_on_the_model(served, tiny_models, tmp_path):
    """lm-eval's local-completions through tuneforge serve gives the log-likelihoods its hf model computes."""
    import lm_eval

    # lm-eval's API models need its [api] extra (tuneforge[eval] brings it); the shared venv may predate it.
    pytest.importorskip("tenacity", reason="lm-eval's local-completions needs tenacity: pip install 'tuneforge[eval]'")
    from lm_eval.tasks import TaskManager

    data = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Repeat alpha", "choices": [" ALPHA", " BRAVO", " golf"], "answer": 0},
        {"question": "Repeat bravo", "choices": [" ALPHA", " BRAVO"], "answer": 1},
        {"question": "Say hotel", "choices": [" hotel", " delta echo"], "answer": 0},
    ])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    folder = str(tiny_models["llama"])

    def run(model: str, args: dict) -> list[float]:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_mc"], task_manager=tasks,
                                      log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
        return [ll for s in out["samples"]["tiny_mc"] for (ll, _), in s["resps"]]

    served_ll = run("local-completions", {"base_url": served.url + "/completions", "model": served.engine.default_id,
                                          "tokenizer_backend": "huggingface", "tokenizer": folder, "max_retries": 1})
    own_ll = run("hf", {"pretrained": folder, "device": "cpu", "dtype": "float32"})
    assert len(served_ll) == 7
    assert served_ll == pytest.approx(own_ll, abs=1e-4)


def write_task(tmp_path, data) -> str:
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return str(folder)


def test_a_task_whose_data_is_not_on_disk_is_a_clear_error(tmp_path):
    from tuneforge.errors import ConfigError
    from tuneforge.eval.harness import check_task_data

    folder = write_task(tmp_path, tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"task tiny_mc needs the data files .*missing\.jsonl.*not on disk"):
        check_task_data(folder, ["tiny_mc"])
    check_task_data(folder, ["another_task"])  # only the asked tasks are checked
    (tmp_path / "tasks" / "hub.yaml").write_text("task: hub_task\ndataset_path: cais/mmlu\noutput_type: multiple_choice\n")
    with pytest.raises(ConfigError, match="task hub_task reads dataset_path 'cais/mmlu', which is not on disk"):
        check_task_data(folder, ["hub_task"])


def test_harness_entry_scores_base_and_tuned_of_a_lora_run(tmp_path, tiny_models):
    """The lm_eval suite entry: one server for a LoRA run, base (adapter off) and tuned scored on the task."""
    pytest.importorskip("tenacity", reason="lm-eval's local-completions needs tenacity: pip install 'tuneforge[eval]'")
    from test_train import QUIET, make_cfg
    from tuneforge.config import LmEvalSpec
    from tuneforge.serve.harness import harness_before_after
    from tuneforge.models.run import open_run
    from tuneforge.track.console import harness_rows
    from tuneforge.train.loop import train

    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Repeat alpha", "choices": [" ALPHA", " BRAVO"], "answer": 0}])
    spec = LmEvalSpec(tasks=["tiny_mc"], include_path=write_task(tmp_path, data))
    train(make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **{"evaluation.before_after": False}), reporter=QUIET)
    out = harness_before_after(spec, open_run(tmp_path / "run"), tiny_models["llama"], "cpu")
    assert set(out) == {"before", "after"} and out["before"]["tiny_mc"]["acc"] in (0.0, 1.0)
    assert [r[:2] for r in harness_rows(out)] == [["tiny_mc", "acc"]]


GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def test_a_local_generation_task_runs_through_local_chat_completions(served, tiny_models, tmp_path, monkeypatch):
    """A generate_until task over a local file is answered by /v1/chat/completions in the chat template: the
    replies lm-eval scores are the model's own greedy ones; the suite entry sends it there, a scoring task not."""
    import lm_eval

    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity: pip install 'tuneforge[eval]'")
    from lm_eval.tasks import TaskManager

    from tuneforge.config import LmEvalSpec
    from tuneforge.eval.generate import answer
    from tuneforge.eval.harness import run_tasks

    questions = ["Say alpha", "Repeat bravo charlie"]
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Repeat alpha", "choices": [" ALPHA", " BRAVO"], "answer": 0}])
    folder = write_task(tmp_path, mc)
    data = write_jsonl(tmp_path / "gen.jsonl", [{"question": q, "answer": "ALPHA"} for q in questions])
    (tmp_path / "tasks" / "tiny_gen.yaml").write_text(GEN_TASK.format(data=data))
    engine = served.engine
    out = lm_eval.simple_evaluate(model="local-chat-completions", tasks=["tiny_gen"], apply_chat_template=True,
                                  model_args={"base_url": served.url + "/chat/completions", "model": engine.default_id,
                                              "max_retries": 1}, log_samples=True, batch_size=1,
                                  task_manager=TaskManager(include_path=folder, include_defaults=False))
    got = [s["resps"][0][0] for s in sorted(out["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    own = [answer(engine.model, engine.tokenizer, [{"role": "user", "content": q}], engine.stop_ids, 6)[0]
           for q in questions]
    assert [g.split("\n\n")[0].strip() for g in got] == [o.split("\n\n")[0].strip() for o in own] and any(own)
    calls, evaluate = [], lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda **kw: calls.append((kw["model"], kw["tasks"])) or evaluate(**kw))
    scores = run_tasks(LmEvalSpec(tasks=["tiny_mc", "tiny_gen"], include_path=folder), served.url,
                       engine.default_id, tiny_models["llama"])
    assert calls == [("local-completions", ["tiny_mc"]), ("local-chat-completions", ["tiny_gen"])]
    assert scores["tiny_gen"]["exact_match"] == 0.0 and scores["tiny_mc"]["acc"] in (0.0, 1.0)
