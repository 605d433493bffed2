"""tuneforge studio with the official openai client: files, jobs that really train (tiny random Llama, as
`tuneforge train` subprocesses), validation before queueing, cancel, keys, and a kill -9 of the server
mid-job that resumes to the same weights as an uninterrupted job."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from conftest import memorise_records, wait_for, write_jsonl
from safetensors.torch import load_file

from tuneforge.config import config_from_dict
from tuneforge.data.formats import read_records
from tuneforge.errors import ConfigError
from tuneforge.serve.protocol import ApiError
from tuneforge.studio import StudioLimits, make_studio
from tuneforge.studio.jobs import job_config, job_object
from tuneforge.studio.keys import new_key
from tuneforge.studio.store import Store
from tuneforge.studio.worker import Follower, Worker
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train

# Enough steps that a kill lands between the first checkpoint and the end; lr as tests/test_train.py's.
SETTINGS = {"max_steps": 24, "save_every": 4, "device": "cpu", "precision": "fp32", "max_seq_len": 128,
            "lora": {"r": 8, "alpha": 16}, "diagnose": {"enabled": False}}
METHOD = {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 25}}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
NOWHERE = Path("/nonexistent-studio-home")  # a studio home with no models/ folder



def done(client, job_id: str, statuses=("succeeded", "failed", "cancelled")):
    return wait_for(lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and job)


def create(client, model, training_file, steps: int = SETTINGS["max_steps"], **kw):
    return client.fine_tuning.jobs.create(model=str(model), training_file=training_file, method=METHOD,
                                          suffix="memo", extra_body={"tuneforge": {**SETTINGS, "max_steps": steps}},
                                          **kw)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", memorise_records(24))


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_models):
    """A studio on 127.0.0.1 with two keys (alice, bob), its worker running training subprocesses. With keys, a
    job's model is a built-in or a folder under <home>/models named by its name: the tiny Llama is `llama`."""
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    (home / "models" / "llama").symlink_to(tiny_models["llama"])
    keys = {name: new_key(home / "keys", name) for name in ("alice", "bob")}
    server = make_studio(home, port=0, api_keys=home / "keys", quiet=True,
                         limits=StudioLimits(max_upload_bytes=32 * 1024, max_files=3))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clients = {name: openai.OpenAI(base_url=server.url, api_key=key, max_retries=0) for name, key in keys.items()}
    yield server, clients
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def finished(studio, tiny_models, train_file):
    """Alice's job, trained to the end without interruption."""
    server, clients = studio
    alice = clients["alice"]
    uploaded = alice.files.create(file=train_file.open("rb"), purpose="fine-tune")
    job = create(alice, "llama", uploaded.id, seed=7)
    assert job.status == "validating_files" and job.fine_tuned_model is None
    return uploaded, done(alice, job.id)


def test_upload_train_poll_events_checkpoints_and_chat(studio, finished, train_file):
    server, clients = studio
    alice = clients["alice"]
    uploaded, job = finished
    assert uploaded.filename == "train.jsonl" and uploaded.bytes == train_file.stat().st_size
    assert alice.files.content(uploaded.id).read() == train_file.read_bytes()
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:llama:memo:{job.id}" and job.trained_tokens > 0 and job.seed == 7
    assert job.hyperparameters.batch_size == 4
    events = alice.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 25)) and "successfully completed" in events[0].message
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [24, 20, 16, 12, 8, 4]
    assert checkpoints[0].metrics.train_loss == next(e.data["train_loss"] for e in events if e.data and
                                                     e.data["step"] == 24)
    assert [m.id for m in alice.models.list().data] == [job.fine_tuned_model, "llama"]  # and its base, adapter off
    reply = alice.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=8,
                                          messages=[{"role": "user", "content": "Repeat alpha bravo please"}])
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content
    text = alice.completions.create(model=job.fine_tuned_model, prompt="Repeat", max_tokens=4, temperature=0)
    assert text.choices[0].text is not None
    assert [j.id for j in alice.fine_tuning.jobs.list(limit=1).data] == [job.id]


@pytest.fixture(scope="module")
def resumed(studio, finished):
    """A second job of `finished`'s base, data and seed, paused once it has logged a step (its save_every beyond
    its end, so the pause alone writes a checkpoint before the last step) and resumed to the end; the engine that
    serves `finished`'s model is live before this job succeeds."""
    server, clients = studio
    alice = clients["alice"]
    uploaded, first = finished
    engine = server.models.engine_for("alice", first.fine_tuned_model)
    job = alice.fine_tuning.jobs.create(model=first.model, training_file=uploaded.id, method=METHOD, seed=7,
                                        suffix="paused", extra_body={"tuneforge": {**SETTINGS, "save_every": 1000}})
    wait_for(lambda: any(e.type == "metrics" for e in alice.fine_tuning.jobs.list_events(job.id).data), every=0.02)
    alice.fine_tuning.jobs.pause(job.id)
    paused = done(alice, job.id, ("paused", "succeeded", "failed"))
    alice.fine_tuning.jobs.resume(job.id)
    return {"paused": paused, "job": done(alice, job.id), "engine": engine}


def test_pause_saves_the_step_in_progress_and_resume_ends_with_the_uninterrupted_weights(studio, finished, resumed):
    server, clients = studio
    alice = clients["alice"]
    paused, job = resumed["paused"], resumed["job"]
    assert paused.status == "paused", paused.error
    progress = paused.tuneforge["progress"]
    assert 0 < progress["step"] < 24 and progress["total_steps"] == 24
    assert job.status == "succeeded", job.error
    assert [c.step_number for c in alice.fine_tuning.jobs.checkpoints.list(job.id).data] == [24, progress["step"]]
    run = server.store.run_dir(job.id)
    assert f"(step {progress['step']}, " in (run.parent / "train.log").read_text()  # resumed there: no step lost
    events = alice.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert sorted(e.data["step"] for e in events if e.type == "metrics") == list(range(1, 25))
    ours = load_file(run / "final" / "adapter_model.safetensors")
    theirs = load_file(server.store.run_dir(finished[1].id) / "final" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_a_new_job_joins_the_live_engine_of_its_base_and_the_base_is_chattable(studio, finished, resumed):
    server, clients = studio
    alice = clients["alice"]
    first, second = finished[1].fine_tuned_model, resumed["job"].fine_tuned_model
    assert [m.id for m in alice.models.list().data] == [first, second, "llama"]
    answers = {}
    for model in (first, second, "llama"):
        reply = alice.chat.completions.create(model=model, temperature=0, max_tokens=8,
                                              messages=[{"role": "user", "content": "Repeat alpha bravo please"}])
        assert reply.model == model
        answers[model] = reply.choices[0].message.content
    assert server.models.engine_for("alice", second) is resumed["engine"]  # not loaded again
    assert answers[first] == answers[second] != answers["llama"]  # the same weights; the base has no adapter on
    assert clients["bob"].models.list().data == []


def test_metrics_events_say_step_n_of_total_and_an_ended_job_shows_no_progress(studio, finished):
    server, clients = studio
    alice = clients["alice"]
    _, job = finished
    metrics = [e for e in alice.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert {e.data["total_steps"] for e in metrics} == {24}
    assert metrics[0].message.startswith("Step 24/24: training loss=")
    assert job.tuneforge == {"progress": None} and job.estimated_finish is None
    running = {**server.store.job(job.id), "status": "running"}  # the same row, as it was while training
    assert job_object(running)["tuneforge"]["progress"] == {"step": 24, "total_steps": 24}


def test_a_planted_bad_line_fails_in_validation_naming_it(studio, tiny_models, train_file, tmp_path):
    server, clients = studio
    alice = clients["alice"]
    lines = train_file.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "no answer here"}]}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    job = create(alice, "llama", alice.files.create(file=bad.open("rb"), purpose="fine-tune").id)
    job = done(alice, job.id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 3:" in job.error.message and "no assistant turn" in job.error.message
    assert not (server.store.jobs_dir / job.id / "train.log").exists()  # no training time was spent


def test_pause_resume_and_cancel_a_running_job_and_cancel_a_queued_one(studio, finished, tiny_models):
    server, clients = studio
    alice = clients["alice"]
    uploaded, _ = finished
    first = create(alice, "llama", uploaded.id, steps=100_000)  # stopped long before its end
    second = create(alice, "llama", uploaded.id)
    wait_for(lambda: alice.fine_tuning.jobs.retrieve(first.id).status == "running")
    assert alice.fine_tuning.jobs.cancel(second.id).status == "cancelled"  # never started
    alice.fine_tuning.jobs.pause(first.id)
    assert done(alice, first.id, ("paused",)).status == "paused"
    assert alice.fine_tuning.jobs.resume(first.id).status == "queued"
    wait_for(lambda: alice.fine_tuning.jobs.retrieve(first.id).status == "running")
    alice.fine_tuning.jobs.cancel(first.id)
    assert done(alice, first.id).status == "cancelled"
    messages = [e.message for e in alice.fine_tuning.jobs.list_events(first.id, limit=100).data]
    assert any(m.startswith("The job is paused") for m in messages)
    assert any(m.startswith("The job is cancelled") for m in messages)
    assert not (server.store.jobs_dir / second.id).exists()
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.cancel(first.id)
    assert err.value.body["code"] == "invalid_job_status"


def test_a_key_sees_only_its_own_files_jobs_and_models(studio, finished):
    server, clients = studio
    alice, bob = clients["alice"], clients["bob"]
    uploaded, job = finished
    assert bob.files.list().data == [] and bob.fine_tuning.jobs.list().data == [] and bob.models.list().data == []
    for call in (lambda: bob.files.retrieve(uploaded.id), lambda: bob.files.content(uploaded.id),
                 lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.fine_tuning.jobs.list_events(job.id),
                 lambda: bob.files.delete(uploaded.id),
                 lambda: bob.chat.completions.create(model=job.fine_tuned_model,
                                                     messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as err:
        bob.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=uploaded.id)
    assert err.value.body["param"] == "training_file"
    named = bob.files.create(file=("../../etc/passwd", b'{"text": "x"}\n'), purpose="fine-tune")
    assert named.filename == "passwd" and (server.store.files_dir / named.id).is_file()
    with pytest.raises(openai.APIStatusError) as err:
        bob.files.create(file=("big.jsonl", b"x" * (33 * 1024)), purpose="fine-tune")
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    bob.files.create(file=("2.jsonl", b"{}\n"), purpose="fine-tune")
    bob.files.create(file=("3.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        bob.files.create(file=("4.jsonl", b"{}\n"), purpose="fine-tune")
    assert err.value.body["code"] == "too_many_files"
    stranger = openai.OpenAI(base_url=server.url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.files.list()
    assert alice.files.retrieve(uploaded.id).id == uploaded.id


def test_non_loopback_without_keys_refuses_to_start(tmp_path):
    with pytest.raises(ConfigError, match="--api-keys"):
        make_studio(tmp_path / "home", host="0.0.0.0", port=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "studio", "--home", str(home), "--port", str(port)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=ENV)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def up():
        try:
            return client.models.list() is not None
        except openai.APIConnectionError:
            assert proc.poll() is None, log.read_text()
            return False
    wait_for(up, timeout=60)
    return proc


def test_kill_9_mid_job_then_restart_resumes_to_the_same_weights(studio, finished, tiny_models, train_file, tmp_path):
    _, reference = finished
    home, port, log = tmp_path / "home", _free_port(), tmp_path / "studio.log"
    server = _start(home, port, log)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        job = create(client, tiny_models["llama"], client.files.create(file=train_file.open("rb"),
                                                                        purpose="fine-tune").id, seed=7)
        run = home / "jobs" / job.id / "run"
        wait_for(lambda: (run / "checkpoints" / "step-4").is_dir(), every=0.01)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert not (run / "final").exists(), "the job finished before the kill; make it longer"
    finally:
        server.kill()
        server.wait()
    restarted = make_studio(home, port=port, quiet=True)  # in this process: torch is already imported here
    threading.Thread(target=restarted.serve_forever, daemon=True).start()
    try:
        job = done(client, job.id)
        assert job.status == "succeeded", (job.error, (run.parent / "train.log").read_text()[-3000:])
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any("restarted during training" in m for m in messages)
    finally:
        restarted.shutdown()
        restarted.server_close()
    ours = load_file(run / "final" / "adapter_model.safetensors")
    theirs = load_file(studio[0].store.run_dir(reference.id) / "final" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_openai_preference_records_are_read_as_prompt_chosen_rejected(tmp_path):
    record = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
              "preferred_output": [{"role": "assistant", "content": "Hello!"}],
              "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
    [rec] = read_records(write_jsonl(tmp_path / "pref.jsonl", [record]))
    assert rec.kind == "preference" and rec.prompt == [{"role": "user", "content": "Hi"}]
    assert rec.chosen == [{"role": "assistant", "content": "Hello!"}]
    assert rec.rejected == [{"role": "assistant", "content": "Go away."}]


def test_job_request_becomes_a_config():
    config, method = job_config({"model": "m", "method": {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.5, "n_epochs": 2, "learning_rate_multiplier": "auto"}}},
        "tuneforge": {"lora.r": 4, "lora": {"alpha": 8}}}, "/t.jsonl", "/v.jsonl", NOWHERE, False)
    assert (config["method"], config["dpo"]["beta"], config["epochs"], config["learning_rate"]) == ("dpo", 0.5, 2, 2e-5)
    assert config["lora"] == {"r": 4, "alpha": 8} and config["validation"] == {"path": "/v.jsonl"}
    assert method["dpo"]["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0,
                                                "beta": 0.5}
    legacy, _ = job_config({"model": "m", "hyperparameters": {"n_epochs": 1, "batch_size": 2}}, "/t.jsonl", None,
                           NOWHERE, False)
    assert (legacy["method"], legacy["epochs"], legacy["micro_batch_size"]) == ("sft", 1, 2)
    for body, param in (({"model": "m", "tuneforge": {"output_dir": "/etc"}}, "tuneforge.output_dir"),
                        ({"model": "m", "hyperparameters": {"beta": 1}}, "hyperparameters.beta"),
                        ({"model": "m", "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                        ({"model": "m", "tuneforge": {"lora": {"r": 0}}}, "tuneforge")):
        with pytest.raises(ApiError) as err:
            job_config(body, "/t.jsonl", None, NOWHERE, False)
        assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("extension", [
    {"evaluation": {"suite": [{"metric": "builtins:exec"}]}},          # code to import
    {"evaluation.judge": {"endpoint": "http://elsewhere.example/v1"}},  # data sent elsewhere
    {"evaluation": {"forgetting": {"path": "/etc/passwd"}}},            # a file on the server
    {"chat_template": "../../secret.jinja"},
    {"tokenizer": {"reuse": "~/models/x"}},
])
def test_a_job_request_names_no_file_url_or_code(extension):
    with pytest.raises(ApiError) as err:
        job_config({"model": "m", "tuneforge": extension}, "/t.jsonl", None, NOWHERE, False)
    assert err.value.status == 400 and err.value.param == f"tuneforge.{next(iter(extension))}"
    assert "names a file, a URL or code" in err.value.message


def test_with_keys_a_model_is_a_built_in_or_a_folder_under_home_models(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    config, _ = job_config({"model": "mine"}, "/t.jsonl", None, tmp_path, True)
    assert config["base_model"] == str(tmp_path / "models" / "mine")
    assert job_config({"model": "smollm2-135m-instruct"}, "/t.jsonl", None, tmp_path, True)[0]["base_model"] == \
        "smollm2-135m-instruct"
    with pytest.raises(ApiError) as err:
        job_config({"model": "/home/someone/model"}, "/t.jsonl", None, tmp_path, True)
    assert err.value.param == "model" and "not read" in err.value.message
    # on 127.0.0.1 without keys the caller is this machine's user: a local folder is theirs to name
    assert job_config({"model": "/opt/m"}, "/t.jsonl", None, tmp_path, False)[0]["base_model"] == "/opt/m"


def test_every_checkpoint_is_listed_even_when_keep_last_pruned_it_before_the_worker_looked(tiny_models, train_file,
                                                                                          tmp_path):
    """The worker polls while a run saves; with keep_last 1 every checkpoint but the newest is gone by then."""
    run = tmp_path / "run"
    cfg = config_from_dict({"base_model": str(tiny_models["llama"]), "datasets": [{"path": str(train_file)}],
                            "output_dir": str(run), "micro_batch_size": 4,
                            **SETTINGS, "max_steps": 5, "save_every": 1, "keep_last": 1})
    train(cfg, reporter=Reporter(quiet=True))
    store = Store(tmp_path / "home")
    try:
        Follower(store, "ftjob-x", run).poll()  # one look, after the run: only step-5 is still on disk
        listed = store.checkpoints("ftjob-x", None, 100)
    finally:
        store.close()
    assert [c["step"] for c in listed] == [5, 4, 3, 2, 1]
    assert all(c["metrics"]["step"] == c["step"] and c["metrics"]["train_loss"] > 0 for c in listed)


def test_a_home_made_by_an_earlier_studio_opens_and_its_jobs_gain_progress(tmp_path):
    db = sqlite3.connect(tmp_path / "studio.db")
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, "
               "created_at INTEGER NOT NULL, status TEXT NOT NULL, model TEXT NOT NULL, request TEXT NOT NULL, "
               "config TEXT NOT NULL, fine_tuned_model TEXT, error TEXT, finished_at INTEGER, trained_tokens INTEGER, "
               "requested TEXT)")
    db.execute("INSERT INTO jobs (id, owner, created_at, status, model, request, config) VALUES "
               "('ftjob-old', 'local', 0, 'running', 'm', '{}', '{}')")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        store.progress("ftjob-old", 3, 10, None)
        assert {k: store.job("ftjob-old")[k] for k in ("step", "total_steps")} == {"step": 3, "total_steps": 10}
    finally:
        store.close()


def test_with_gpus_each_runs_its_own_job_at_the_same_time(tmp_path):
    """--gpus 0,1: two queued jobs train at once, each process seeing only its own GPU."""
    fake = tmp_path / "python"  # stands in for `python -m tuneforge train`: says its GPU, trains for a while
    fake.write_text("#!/bin/sh\necho \"gpu=$CUDA_VISIBLE_DEVICES start=$(date +%s.%N)\"\nsleep 1.5\n"
                    "echo \"end=$(date +%s.%N)\"\nexit 3\n")
    fake.chmod(0o755)
    store = Store(tmp_path / "home")
    worker = Worker(store, str(fake), poll_s=0.05, gpus=["0", "1"])
    try:
        ids = [store.add_job("local", "m", {"suffix": None}, {})["id"] for _ in range(2)]
        for job_id in ids:
            store.move(job_id, "queued", ("validating_files",))
        worker.start()
        wait_for(lambda: all(store.job(i)["status"] == "failed" for i in ids), timeout=60)
    finally:
        worker.stop()
        store.close()
    logs = [dict(w.split("=") for w in (tmp_path / "home" / "jobs" / i / "train.log").read_text().split())
            for i in ids]
    assert sorted(log["gpu"] for log in logs) == ["0", "1"]
    first, second = sorted(logs, key=lambda log: float(log["start"]))
    assert float(second["start"]) < float(first["end"])  # they overlapped: neither waited for the other


def test_only_language_model_adapters_share_their_base_engine(monkeypatch):
    """A LoRA classifier trained a head of its own: its base (with a random head) is not offered as a model, and
    it is served by an engine of its own (its run), never as an adapter on the base's language-model engine."""
    from tuneforge.studio import models as models_module

    def job(n: int, **config) -> dict:
        return {"id": f"ftjob-{n}", "model": "minilm-l6", "fine_tuned_model": f"ft:minilm-l6:{n}",
                "config": {"base_model": "minilm-l6", "method": "sft", **config}}
    jobs = [job(1, adapter="lora"), job(2, adapter="lora", task="classification"), job(3, adapter="full")]

    class Store:
        def succeeded(self, owner=None):
            return jobs

        def run_dir(self, job_id):
            return Path("runs") / job_id
    loaded = []

    class Engine:
        base_id = default_id = None

        def model_ids(self):
            return [self.default_id]

    monkeypatch.setattr(models_module, "load_engine", lambda folder, **kw: loaded.append((folder, kw)) or Engine())
    models = models_module.Models(Store())
    assert models.ids("alice") == ["ft:minilm-l6:1", "ft:minilm-l6:2", "ft:minilm-l6:3", "minilm-l6"]
    models.engine_for("alice", "ft:minilm-l6:2")
    assert loaded == [(Path("runs/ftjob-2"), {"device": "auto", "limits": models.limits})]
