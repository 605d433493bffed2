"""tuneforge studio under load while a job trains: bursts of 200 concurrent status polls and 20 uploads,
and the job's median step time against the same job on an idle studio.

    python bench/studio_load.py [--model smollm2-135m-instruct] [--steps 30] [--home /tmp/studio-bench]

Each run is a fresh studio (in this process) and a fresh home; the step time is metrics.jsonl's step_s,
median over the steps after the first two. Prints one Markdown table row per run.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from tuneforge.studio import make_studio

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_train.jsonl"


def poll(url: str, job_id: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"{url}/fine_tuning/jobs/{job_id}", timeout=120) as resp:
        assert resp.status == 200 and json.loads(resp.read())["id"] == job_id
    return time.perf_counter() - start


def upload(client: openai.OpenAI, content: bytes) -> float:
    start = time.perf_counter()
    client.files.create(file=("load.jsonl", io.BytesIO(content)), purpose="fine-tune")
    return time.perf_counter() - start


def run(home: Path, model: str, steps: int, load: bool) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    server = make_studio(home, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    content = DATA.read_bytes()
    latencies, uploads, failures = [], [], 0
    try:
        file = client.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=model, training_file=file.id, extra_body={"tuneforge": {
            "max_steps": steps, "save_every": steps, "max_seq_len": 256, "micro_batch_size": 8}})
        metrics = home / "jobs" / job.id / "run" / "metrics.jsonl"
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if load and 2 <= logged < steps - 1:
                with ThreadPoolExecutor(220) as pool:
                    polls = [pool.submit(poll, server.url, job.id) for _ in range(200)]
                    ups = [pool.submit(upload, client, content) for _ in range(20)]
                    for future, into in [(f, latencies) for f in polls] + [(f, uploads) for f in ups]:
                        try:
                            into.append(future.result())
                        except Exception:
                            failures += 1
            else:
                time.sleep(0.5)
        assert job.status == "succeeded", job.error
        step_s = [json.loads(line)["step_s"] for line in metrics.read_text().splitlines()][2:]
    finally:
        server.shutdown()
        server.server_close()
    out = {"step_s": statistics.median(step_s), "requests": len(latencies) + len(uploads), "failed": failures}
    if latencies:
        latencies.sort()
        out.update(poll_p50=latencies[len(latencies) // 2], poll_p99=latencies[int(len(latencies) * 0.99)],
                   upload_p50=statistics.median(uploads))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--home", default="/tmp/studio-bench")
    args = parser.parse_args()
    idle = run(Path(args.home), args.model, args.steps, load=False)
    busy = run(Path(args.home), args.model, args.steps, load=True)
    print("| server | median step (s) | requests answered | failed | poll p50 / p99 (s) | upload p50 (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| idle | {idle['step_s']:.3f} | - | - | - | - |")
    print(f"| 200 polls + 20 uploads per burst | {busy['step_s']:.3f} | {busy['requests']} | {busy['failed']} | "
          f"{busy.get('poll_p50', 0):.3f} / {busy.get('poll_p99', 0):.3f} | {busy.get('upload_p50', 0):.3f} |")
    print(f"step time ratio busy/idle: {busy['step_s'] / idle['step_s']:.3f}")


if __name__ == "__main__":
    main()
