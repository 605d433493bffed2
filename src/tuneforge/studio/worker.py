"""The queue's two workers: one checks each new job's files (as `tuneforge data check` does) and queues it,
the others run queued jobs in the order they were created as `tuneforge train` processes: one at a time, or
one per GPU given (`--gpus 0,1`: each of those threads runs its jobs with CUDA_VISIBLE_DEVICES set to its GPU).

A training process dies with the server (PR_SET_PDEATHSIG), so a kill -9 of the server leaves nothing
running; on the next start a job still marked running goes back to the front of the queue and continues
from its newest checkpoint with `--resume`. Cancel stops the process with SIGINT (the train command's
Ctrl-C), which keeps every checkpoint already written; pause sends SIGUSR1 (train/stop_signal.py), so the
run saves a checkpoint at the end of the step in progress and resume loses no step.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from tuneforge.config import config_from_dict
from tuneforge.data.check import check_data
from tuneforge.data.dataset import good_records
from tuneforge.errors import TuneforgeError
from tuneforge.methods.facts import method_facts
from tuneforge.models.load import load_tokenizer
from tuneforge.models.resolve import resolve_base_model
from tuneforge.studio.jobs import base_name, fine_tuned_name
from tuneforge.studio.store import Store
from tuneforge.train.checkpoints import list_checkpoints, written_steps
from tuneforge.train.stop_signal import SAVE_AND_STOP

STOP_WAIT_S = 60  # after SIGINT, how long a training process may take to exit before it is killed
STEP_WAIT_S = 900  # after SAVE_AND_STOP, how long it may take to end its step and save before it is interrupted
SHOWN_LINES = 5  # bad lines named in a failed job's error message


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the thread that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: the restart check below finds a leftover process's run unfinished
        pass


def file_errors(job: dict) -> dict | None:
    """The job's files checked before any training: None, or OpenAI's error {code, message, param}
    naming each file's first bad lines."""
    cfg = config_from_dict(job["config"], "the job's settings")
    request = job["request"]
    # The paths the job reads (a file's own, or its snapshot: Store.job_data_path), named by the request's ids.
    names = {cfg.datasets[0].path: ("training_file", request["training_file"])}
    if request.get("validation_file"):
        names[cfg.validation.path] = ("validation_file", request["validation_file"])
    facts = method_facts(cfg)
    wanted = facts.records
    # A task that reads its own kind of records (labelled text) checks them in check_data below.
    for spec in [] if facts.checks else [*cfg.datasets, *([cfg.validation] if cfg.validation else [])]:
        param, file_id = names[spec.path]
        first = next(good_records(spec), None)
        if first is not None and first.kind not in wanted:
            return {"code": f"invalid_{param}", "param": param,
                    "message": f"{param} {file_id}: holds {first.kind} records, but method "
                               f"{request['method']['type']} trains on {' or '.join(wanted)} records "
                               "(chat messages for supervised; input/preferred_output/non_preferred_output for dpo)"}
    folder, _ = resolve_base_model(cfg.base_model)
    report = check_data(cfg, load_tokenizer(folder, cfg.chat_template, cfg.trust_remote_code), model_folder=folder)
    errors = report.errors
    if not errors:
        return None
    param, file_id = names.get(errors[0].source, ("training_file", request["training_file"]))
    lines = [f"line {f.line}: {f.message}" for f in errors if f.source == errors[0].source][:SHOWN_LINES]
    more = len([f for f in errors if f.source == errors[0].source]) - len(lines)
    return {"code": f"invalid_{param}", "param": param,
            "message": f"{param} {file_id} has {len(lines) + more} bad line(s): " + "; ".join(lines)
                       + (f"; and {more} more" if more > 0 else "") + ". Fix them and upload the file again."}


class Follower:
    """Reads a run's metrics.jsonl as it grows into events, and each checkpoint the run notes in
    checkpoints/written.jsonl into the database (its folder may be pruned by keep_last before a poll)."""

    def __init__(self, store: Store, job_id: str, run_dir: Path):
        self.store, self.job_id, self.run_dir = store, job_id, run_dir
        self.offset, self.steps, self.recorded = 0, {}, set()
        self.total_steps: int | None = None
        self.step_s: list[float] = []  # the newest steps' seconds, for the estimated finish
        self.trained, self.newest = False, 0  # a step was logged since this follower began; the last one

    def poll(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            if path.stat().st_size < self.offset:  # a resumed run cut the log back to its checkpoint
                self.offset = 0
            with open(path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            done = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
            self.offset += done
            self._lines(chunk[:done])
        for step in written_steps(self.run_dir):  # its metrics line was written before it
            if step in self.steps and step not in self.recorded:
                self.store.add_checkpoint(self.job_id, step, self.steps[step])
                self.recorded.add(step)

    def _lines(self, chunk: bytes) -> None:
        last = newest = self.store.last_logged_step(self.job_id)
        total = self._total_steps()
        for raw in chunk.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict) or "step" not in record or "loss" not in record:
                continue
            metrics = {"step": record["step"], "train_loss": record["loss"]}
            if "val_loss" in record:
                metrics["valid_loss"] = record["val_loss"]
            self.steps[record["step"]] = metrics
            if record["step"] > last:
                of = f"/{total}" if total else ""
                self.store.add_event(self.job_id, f"Step {record['step']}{of}: training loss={record['loss']:.4f}",
                                     kind="metrics", data={**metrics, "total_steps": total}, step=record["step"])
                newest = record["step"]
                if isinstance(record.get("step_s"), (int, float)):
                    self.step_s = [*self.step_s[-9:], record["step_s"]]
        if newest > last:
            self.trained, self.newest = True, newest
            left = (total - newest) * statistics.median(self.step_s) if total and self.step_s else None
            self.store.progress(self.job_id, newest, total, None if left is None else int(time.time() + left))

    def at_end(self) -> bool:
        """The run has logged its last step (it is writing its final weights)."""
        total = self._total_steps()
        return total is not None and self.newest >= total

    def _total_steps(self) -> int | None:
        """The run's planned steps, from the run_started.json it writes before its first step."""
        if self.total_steps is None:
            try:
                started = json.loads((self.run_dir / "run_started.json").read_text())
                self.total_steps = int(started["plan"]["total_steps"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return self.total_steps

    def trained_tokens(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        total = 0
        for raw in path.read_bytes().splitlines() if path.is_file() else []:
            try:
                total += int(json.loads(raw).get("trained_tokens", 0))
            except (ValueError, AttributeError, TypeError):
                continue
        return total


class Worker:
    """The worker threads (one validates, one trains per GPU); start() after the store is open, stop() before
    it closes. `gpus` None: one training thread, the process's own devices."""

    def __init__(self, store: Store, python: str = sys.executable, poll_s: float = 0.5,
                 gpus: list[str] | None = None):
        self.store, self.python, self.poll_s = store, python, poll_s
        self.gpus: list[str | None] = list(gpus) if gpus else [None]
        self.stopping, self.wake = threading.Event(), threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Jobs a killed server left running go back to the queue (they resume from their checkpoint)."""
        for job in self.store.query("SELECT * FROM jobs WHERE status = 'running'"):
            after = {"cancel": "cancelled", "pause": "paused"}.get(job["requested"], "queued")
            self.store.move(job["id"], after, ("running",), requested=None,
                            finished_at=int(time.time()) if after == "cancelled" else None)
            self.store.add_event(job["id"], "The server restarted during training; the job continues from its "
                                 "newest checkpoint" if after == "queued" else f"The job is {after}")
        loops = [(self._validate_loop, (), "validate"),
                 *((self._train_loop, (gpu,), f"train-{gpu or 'all'}") for gpu in self.gpus)]
        for target, args, name in loops:
            thread = threading.Thread(target=target, args=args, name=f"studio-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        """Stop both threads; a job being trained is stopped with SIGINT and queued again for the next start."""
        self.stopping.set()
        self.wake.set()
        for thread in self.threads:
            thread.join()

    def _sleep(self) -> None:
        self.wake.wait(self.poll_s)
        self.wake.clear()

    def _validate_loop(self) -> None:
        while not self.stopping.is_set():
            job = self.store.next_job("validating_files")
            if job is None:
                self._sleep()
                continue
            try:
                error = file_errors(job)
            except (TuneforgeError, OSError) as err:
                error = {"code": "invalid_training_file", "param": "training_file", "message": str(err)}
            if error is None:
                if self.store.move(job["id"], "queued", ("validating_files",)):
                    self.store.add_event(job["id"], "Files validated; the job is queued")
                    self.wake.set()
            elif self.store.move(job["id"], "failed", ("validating_files",), error=error,
                                 finished_at=int(time.time())):
                self.store.add_event(job["id"], error["message"], level="error")

    def _train_loop(self, gpu: str | None) -> None:
        while not self.stopping.is_set():
            job = self.store.next_job("queued")
            if job is None:
                self._sleep()
                continue
            if not self.store.move(job["id"], "running", ("queued",)):
                continue
            try:
                self._run(self.store.job(job["id"]), gpu)
            except Exception as err:  # the job fails, the queue goes on
                error = {"code": "training_failed", "param": None,
                         "message": f"the studio could not run the job: {type(err).__name__}: {err}"}
                if self.store.move(job["id"], "failed", ("running",), error=error, finished_at=int(time.time())):
                    self.store.add_event(job["id"], error["message"], level="error")

    def _run(self, job: dict, gpu: str | None) -> None:
        job_id, store = job["id"], self.store
        run_dir = store.run_dir(job_id)
        config = run_dir.parent / "config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({**job["config"], "output_dir": str(run_dir)}, indent=1))  # JSON is YAML
        resume = bool(list_checkpoints(run_dir))
        store.add_event(job_id, "Training resumed from the newest checkpoint" if resume else "Training started")
        follower = Follower(store, job_id, run_dir)
        with open(run_dir.parent / "train.log", "ab") as log:
            proc = subprocess.Popen([self.python, "-m", "tuneforge", "train", str(config), *(["--resume"] * resume)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=run_dir.parent, preexec_fn=_die_with_parent, start_new_session=True,
                                    env=None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
            asked, sent = None, None
            while proc.poll() is None:
                follower.poll()
                asked = store.job(job_id)["requested"] or ("shutdown" if self.stopping.is_set() else None)
                how = _stop_signal(asked, follower)
                if how == signal.SIGINT or (sent is not None and time.monotonic() - sent > STEP_WAIT_S):
                    _interrupt(proc)
                    break
                if how is not None and sent is None:
                    proc.send_signal(how)
                    sent = time.monotonic()
                self._sleep()
        follower.poll()
        self._finish(job, proc.returncode, asked, follower)

    def _finish(self, job: dict, code: int, asked: str | None, follower: Follower) -> None:
        job_id, store, now = job["id"], self.store, int(time.time())
        run_dir = store.run_dir(job_id)
        if asked == "shutdown":
            store.move(job_id, "queued", ("running",))
            store.add_event(job_id, "The server is stopping; the job continues from its newest checkpoint on restart")
        elif code == 0 and (run_dir / "run.json").is_file() and asked != "cancel":  # a late pause lets it end
            name = fine_tuned_name(base_name(job["model"]), job["request"].get("suffix"), job_id)
            store.move(job_id, "succeeded", ("running",), fine_tuned_model=name, finished_at=now, requested=None,
                       trained_tokens=follower.trained_tokens())
            store.add_event(job_id, f"The job has successfully completed; the model is {name}")
        elif asked in ("cancel", "pause"):
            status = "cancelled" if asked == "cancel" else "paused"
            store.move(job_id, status, ("running",), requested=None, finished_at=now if asked == "cancel" else None)
            kept = [c.name for c in list_checkpoints(run_dir)]
            store.add_event(job_id, f"The job is {status}" + (f"; its checkpoints are kept ({', '.join(kept)})"
                                                                if kept else ""))
        else:
            error = {"code": "training_failed", "param": None,
                     "message": f"tuneforge train exited with status {code}: {_last_error(run_dir.parent)}"}
            store.move(job_id, "failed", ("running",), error=error, finished_at=now)
            store.add_event(job_id, error["message"], level="error")


def _stop_signal(asked: str | None, follower: Follower) -> int | None:
    """How to stop the process for what was asked: cancel (and a server stopping) interrupt it at once;
    pause lets the step in progress end and has it saved (SAVE_AND_STOP), once the training loop, which
    listens for that signal, has logged a step; before that nothing was trained, and it is interrupted.
    A pause after the last step lets the job finish."""
    if asked is None or (asked == "pause" and follower.at_end()):
        return None
    return SAVE_AND_STOP if asked == "pause" and follower.trained and SAVE_AND_STOP else signal.SIGINT


def _interrupt(proc: subprocess.Popen) -> None:
    """SIGINT (Ctrl-C: the run stops, its checkpoints kept), then SIGKILL if it does not end in time."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_error(job_dir: Path) -> str:
    """The train command's own error line (it prints `error: ...`), else the log's last line."""
    try:
        lines = [ln.strip() for ln in (job_dir / "train.log").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log was written"
    errors = [ln for ln in lines if ln.startswith("error")]
    return (errors or lines or ["no output"])[-1][:2000] + f" (the whole log: {job_dir / 'train.log'})"
