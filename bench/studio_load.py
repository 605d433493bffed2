"""tuneforge studio under a paced load while a job trains, against the same job on an idle studio.

    python bench/studio_load.py [--model smollm2-135m-instruct] [--steps 16] [--clients 200] [--poll-every 5]
                                [--uploads 20] [--repeats 1] [--home /tmp/studio-bench]

The studio runs in this process; the load comes from a second process (this file with --load), so the load
generator's Python never holds the server's GIL. From the job's third step to its end, `--clients` clients poll
the job's status together every `--poll-every` seconds (each round is that many concurrent requests), and
`--uploads` uploads of the quickstart file are spread evenly over the job's remaining steps (the polls read
its progress), each deleted once it is made (the per-key file limit is not what is measured). Step time is metrics.jsonl's step_s, median
over the steps after the first two. Idle and loaded runs alternate `--repeats` times, each a fresh studio and
home; prints one Markdown table row per run and the loaded/idle ratio of the medians.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_train.jsonl"
ENDED = ("succeeded", "failed", "cancelled")


# --- the load generator (its own process) -------------------------------------------------------------

def _call(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def poll(url: str, job_id: str) -> tuple[float, dict]:
    start = time.perf_counter()
    job = _call("GET", f"{url}/fine_tuning/jobs/{job_id}")
    assert job["id"] == job_id, job
    return time.perf_counter() - start, job


def upload_and_delete(url: str, content: bytes) -> float:
    """One upload, then its DELETE; returns the upload's seconds."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="load.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    start = time.perf_counter()
    made = _call("POST", f"{url}/files", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    seconds = time.perf_counter() - start
    assert _call("DELETE", f"{url}/files/{made['id']}")["deleted"] is True
    return seconds


def generate(url: str, job_id: str, clients: int, every: float, uploads: int) -> dict:
    """Rounds of `clients` concurrent polls every `every` s, and `uploads` uploads spread evenly over the
    job's remaining steps (the polls read its progress), until a poll sees the job ended; what was answered,
    what failed and how long it took."""
    content = DATA.read_bytes()
    polls, sent_up, failures, ended = [], [], [], threading.Event()
    lock = threading.Lock()
    progress = {"step": 0, "total_steps": 0}

    def one_poll() -> None:
        try:
            seconds, job = poll(url, job_id)
            with lock:
                polls.append(seconds)
                if job["tuneforge"]["progress"]:
                    progress.update(job["tuneforge"]["progress"])
            if job["status"] in ENDED:
                ended.set()
        except Exception as err:  # counted, never raised: every request's fate is reported
            with lock:
                failures.append(f"poll: {type(err).__name__}: {err}"[:200])

    def one_upload() -> None:
        try:
            seconds = upload_and_delete(url, content)
            with lock:
                sent_up.append(seconds)
        except Exception as err:
            with lock:
                failures.append(f"upload: {type(err).__name__}: {err}"[:200])

    start, parent = time.monotonic(), os.getppid()
    next_round, made_uploads, rounds, first = start, 0, 0, None
    with ThreadPoolExecutor(clients + uploads) as pool:
        while not ended.is_set() and os.getppid() == parent:  # the benchmark (and its studio) still there
            now = time.monotonic()
            if now >= next_round:
                for _ in range(clients):
                    pool.submit(one_poll)
                rounds, next_round = rounds + 1, next_round + every
            with lock:
                step, total = progress["step"], progress["total_steps"]
            first = first or step or None  # the step the load began at
            # upload i is due at step first + i * (total - first - 1) / uploads: the last one before the last step
            if first and made_uploads < uploads and step >= first + made_uploads * (total - first - 1) / uploads:
                pool.submit(one_upload)
                made_uploads += 1
            ended.wait(0.02)
    polls.sort()
    return {"rounds": rounds, "polls": len(polls), "uploads": len(sent_up), "failed": len(failures),
            "failures": failures[:5], "seconds": round(time.monotonic() - start, 1),
            "poll_p50": polls[len(polls) // 2] if polls else None,
            "poll_p99": polls[int(len(polls) * 0.99)] if polls else None,
            "upload_p50": statistics.median(sent_up) if sent_up else None}


# --- one job on a fresh studio --------------------------------------------------------------------------

def run(home: Path, model: str, steps: int, load: list[str] | None) -> dict:
    """Train one job; with `load` (the generator's options) the load runs from its third step to its end."""
    import openai

    from tuneforge.studio import make_studio

    shutil.rmtree(home, ignore_errors=True)
    server = make_studio(home, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    generator, out = None, {}
    load_avg = os.getloadavg()[0]
    try:
        file = client.files.create(file=("train.jsonl", io.BytesIO(DATA.read_bytes())), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=model, training_file=file.id, extra_body={"tuneforge": {
            "max_steps": steps, "save_every": steps, "max_seq_len": 256, "micro_batch_size": 8}})
        metrics = home / "jobs" / job.id / "run" / "metrics.jsonl"
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ENDED:
            logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if load is not None and generator is None and logged >= 2:
                generator = subprocess.Popen([sys.executable, __file__, "--load", server.url, job.id, *load],
                                             stdout=subprocess.PIPE, text=True)
            time.sleep(1)
        assert job.status == "succeeded", job.error
        if generator is not None:
            out = json.loads(generator.communicate(timeout=300)[0])
        step_s = [json.loads(line)["step_s"] for line in metrics.read_text().splitlines()][2:]
    finally:
        if generator is not None and generator.poll() is None:
            generator.kill()
        server.shutdown()
        server.server_close()
    return {**out, "step_s": statistics.median(step_s), "load_avg": f"{load_avg:.1f} / {os.getloadavg()[0]:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--clients", type=int, default=200, help="concurrent status polls in each round")
    parser.add_argument("--poll-every", type=float, default=5.0, help="seconds between rounds of polls")
    parser.add_argument("--uploads", type=int, default=20, help="uploads (each then deleted) over the run")
    parser.add_argument("--repeats", type=int, default=1, help="idle and loaded runs, alternating")
    parser.add_argument("--home", default="/tmp/studio-bench")
    parser.add_argument("--load", nargs=2, metavar=("URL", "JOB"), help=argparse.SUPPRESS)  # the generator
    args = parser.parse_args()
    if args.load:
        print(json.dumps(generate(*args.load, args.clients, args.poll_every, args.uploads)))
        return
    print("| server | median step (s) | polls answered (rounds) | uploads + deletes | failed | poll p50 / p99 (s) "
          "| upload p50 (s) | load average start / end |")
    print("|---|---|---|---|---|---|---|---|")
    idle, busy = [], []
    for _ in range(args.repeats):
        quiet = run(Path(args.home), args.model, args.steps, None)
        idle.append(quiet["step_s"])
        print(f"| idle | {quiet['step_s']:.3f} | - | - | - | - | - | {quiet['load_avg']} |", flush=True)
        options = ["--clients", str(args.clients), "--poll-every", str(args.poll_every), "--uploads",
                   str(args.uploads)]
        loaded = run(Path(args.home), args.model, args.steps, options)
        busy.append(loaded["step_s"])
        print(f"| {args.clients} polls every {args.poll_every:g} s + {args.uploads} uploads | {loaded['step_s']:.3f} "
              f"| {loaded['polls']} ({loaded['rounds']}) | {loaded['uploads']} | {loaded['failed']} "
              f"| {loaded['poll_p50']:.3f} / {loaded['poll_p99']:.3f} | {loaded['upload_p50'] or 0:.3f} "
              f"| {loaded['load_avg']} |", flush=True)
        for failure in loaded["failures"]:
            print(f"  failure: {failure}", flush=True)
    print(f"step time ratio loaded/idle (medians of {args.repeats} runs each): "
          f"{statistics.median(busy) / statistics.median(idle):.3f}")


if __name__ == "__main__":
    main()
