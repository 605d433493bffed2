"""Load on `tuneforge serve` over loopback: many clients at once, some that hang up, bounded in count and time.

    python bench/serve_load.py                        # a tiny random Llama (built-in tokenizer): 50 clients, 10 hang-ups
    python bench/serve_load.py --model runs/my-run    # a run or model folder
    python bench/serve_load.py --clients 8 --hangups 3 --rounds 1 --json   # the test suite's small version

The server runs in its own process (`python -m tuneforge serve`), so its memory is its own. Each round
starts the hang-up clients first (each asks for --max-tokens-cap new tokens, then closes its connection
after --hangup-after seconds without reading), then --clients clients at once with mixed prompt and
answer lengths, a quarter of them streamed. A client refused with 503 waits the Retry-After seconds and
tries again, up to --retries times. After each round, --max-concurrent requests are sent at once: all
are answered only if no hung-up request still holds a place. The table gives, per round and kind of
client: answered (200), refused (503 after every retry), anything else, retries, latency, tokens; then
the server's resident memory after the warm-up and after each round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LENGTHS = {"short": 4, "medium": 32, "long": 128, "default": None}  # max_tokens; None: the server's default
PROMPT_WORDS = (3, 40, 200)


def tiny_model(folder: Path) -> Path:
    """A random-initialised two-layer Llama with the built-in tokenizer: nothing is downloaded."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneforge.models.resolve import resolve_base_model

    builtin, _ = resolve_base_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(builtin))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def start_server(model: Path, args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "tuneforge", "serve", str(model), "--port", "0",
           "--max-concurrent", str(args.max_concurrent), "--max-tokens-default", str(args.max_tokens_default),
           "--max-tokens-cap", str(args.max_tokens_cap)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain its log
            return proc, int(found.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(port: int, body: dict, timeout: float) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def tokens_of(data: bytes, stream: bool) -> int:
    if not stream:
        return json.loads(data)["usage"]["completion_tokens"]
    events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e.startswith("data: {")]
    return json.loads(events[-1]).get("usage", {}).get("completion_tokens", 0)


def client(port: int, kind: str, i: int, args, out: list) -> None:
    """One user: a completion, retried after Retry-After while the server says 503."""
    body = {"prompt": "word " * PROMPT_WORDS[i % len(PROMPT_WORDS)], "temperature": 0}
    if LENGTHS[kind] is not None:
        body["max_tokens"] = LENGTHS[kind]
    stream = i % 4 == 3
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    start, retries, status, tokens = time.monotonic(), 0, None, 0
    try:
        while True:
            status, headers, data = post(port, body, args.timeout)
            if status != 503 or retries >= args.retries:
                break
            retries += 1
            time.sleep(float(headers.get("Retry-After", 1)))
        if status == 200:
            tokens = tokens_of(data, stream)
    except (OSError, http.client.HTTPException) as err:
        status = type(err).__name__
    out.append({"kind": kind, "status": status, "retries": retries, "seconds": time.monotonic() - start,
                "tokens": tokens})


def hang_up(port: int, args, out: list) -> None:
    """A client that asks for the longest answer allowed, then goes away without reading it."""
    body = json.dumps({"prompt": "word " * 40, "max_tokens": args.max_tokens_cap}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=args.timeout) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(args.hangup_after)
    out.append({"kind": "hang-up", "status": "hung up", "retries": 0, "seconds": args.hangup_after, "tokens": 0})


def round_of(port: int, args) -> tuple[list[dict], float]:
    out: list[dict] = []
    threads = [threading.Thread(target=hang_up, args=(port, args, out)) for _ in range(args.hangups)]
    kinds = list(LENGTHS)
    threads += [threading.Thread(target=client, args=(port, kinds[i % len(kinds)], i, args, out))
                for i in range(args.clients)]
    start = time.monotonic()
    for n, t in enumerate(threads):
        t.start()
        if n == args.hangups - 1:
            time.sleep(0.1)  # the hang-ups take their places first
    for t in threads:
        t.join(max(0.0, start + args.round_limit - time.monotonic()))
    unanswered = args.clients + args.hangups - len(out)
    out += [{"kind": "unanswered", "status": "none", "retries": 0, "seconds": args.round_limit, "tokens": 0}] * unanswered
    return out, time.monotonic() - start


def free_places(port: int, args) -> int:
    """How many of --max-concurrent simultaneous requests are answered without a 503."""
    codes: list = []
    threads = [threading.Thread(target=lambda: codes.append(post(port, {"prompt": "hi", "max_tokens": 1},
                                                                     args.timeout)[0]))
               for _ in range(args.max_concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes.count(200)


def table(rounds: list[dict], memory: list[tuple[str, float]]) -> str:
    lines = ["| round | clients | n | 200 | 503 | other | retries | p50 s | max s | tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        for kind in [*LENGTHS, "hang-up", "unanswered"]:
            rows = [x for x in r["results"] if x["kind"] == kind]
            if not rows:
                continue
            secs = [x["seconds"] for x in rows]
            other = sum(x["status"] not in (200, 503, "hung up") for x in rows)
            label = f"{kind} ({LENGTHS[kind]})" if kind in LENGTHS and LENGTHS[kind] else kind
            lines.append(f"| {r['round']} | {label} | {len(rows)} | {sum(x['status'] == 200 for x in rows)} | "
                         f"{sum(x['status'] == 503 for x in rows)} | {other} | {sum(x['retries'] for x in rows)} | "
                         f"{statistics.median(secs):.2f} | {max(secs):.2f} | {sum(x['tokens'] for x in rows)} |")
        lines.append(f"| {r['round']} | wall {r['wall']:.1f} s; places free after it: {r['free']}/{r['places']} "
                     "| | | | | | | | |")
    errors = sorted({str(x["status"]) for r in rounds for x in r["results"] if x["status"] not in (200, 503, "hung up")})
    if errors:
        lines.append(f"\nother: {', '.join(errors)}")
    lines += ["", "| server memory | MB |", "|---|---|", *(f"| {k} | {v:.0f} |" for k, v in memory)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a run or model folder (default: a tiny random Llama)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--hangups", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=8)
    p.add_argument("--max-tokens-default", type=int, default=64)
    p.add_argument("--max-tokens-cap", type=int, default=512)
    p.add_argument("--hangup-after", type=float, default=0.5, help="seconds a hang-up client stays connected")
    p.add_argument("--retries", type=int, default=30, help="503s a client accepts before giving up")
    p.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    p.add_argument("--round-limit", type=float, default=600, help="seconds a round may take")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp) / "tiny-llama")
        proc, port = start_server(model, args)
        try:
            start = time.monotonic()
            status, _, data = post(port, {"prompt": "word " * 40, "max_tokens": 64, "temperature": 0}, args.timeout)
            speed = tokens_of(data, False) / (time.monotonic() - start)
            memory = [("after a warm-up request", rss_mb(proc.pid))]
            rounds = []
            for n in range(1, args.rounds + 1):
                results, wall = round_of(port, args)
                rounds.append({"round": n, "results": results, "wall": wall, "free": free_places(port, args),
                               "places": args.max_concurrent})
                memory.append((f"after round {n}", rss_mb(proc.pid)))
            memory.append(("peak (VmHWM)", rss_mb(proc.pid, "VmHWM")))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"model: {args.model or 'tiny random Llama (2 layers, hidden 64)'}; one request alone: {speed:.0f} tokens/s; "
          f"the hang-ups asked for {args.hangups} x {args.max_tokens_cap} tokens per round "
          f"(~{args.hangups * args.max_tokens_cap / speed:.0f} s of generation if nobody stopped it); "
          f"--max-concurrent {args.max_concurrent} --max-tokens-default {args.max_tokens_default} "
          f"--max-tokens-cap {args.max_tokens_cap}; {os.cpu_count()} CPUs")
    print(table(rounds, memory))
    if args.json:
        print(json.dumps({"rounds": rounds, "memory_mb": dict(memory),
                          "tokens_per_s": speed}))


if __name__ == "__main__":
    main()
