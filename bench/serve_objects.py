"""Does `tuneforge serve` keep anything per request? The server in this process, rounds of requests and
hang-ups against it, and after each round the live tensors, Python objects and threads (after gc) and RSS.

    python bench/serve_objects.py                  # a tiny random Llama, 5 rounds of 30 requests and 5 hang-ups
    python bench/serve_objects.py --model FOLDER

Flat tensor, object and thread counts with a slowly rising RSS mean the allocator, not a leak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from serve_load import rss_mb, tiny_model

from tuneforge.serve import Limits, make_server


def ask(url: str, i: int) -> int:
    """One completion of mixed length, retried while the server answers 503."""
    body = json.dumps({"prompt": "word " * (3 + i % 50), "max_tokens": (4, 32, 64)[i % 3],
                       "stream": i % 4 == 3}).encode()
    for _ in range(300):
        req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as err:
            if err.code != 503:
                return err.code
            time.sleep(0.2)
    return 503


def hang_up(port: int) -> None:
    body = json.dumps({"prompt": "word", "max_tokens": 512}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--hangups", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp) / "tiny-llama")
        srv = make_server(model, port=0, quiet=True, limits=Limits(max_concurrent=8, max_tokens_cap=512))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        print("| round | answers | live tensors | Python objects | threads | RSS MB |\n|---|---|---|---|---|---|")
        for n in range(1, args.rounds + 1):
            with ThreadPoolExecutor(args.requests + args.hangups) as pool:
                for _ in range(args.hangups):
                    pool.submit(hang_up, srv.port)
                codes = list(pool.map(lambda i: ask(srv.url, i), range(args.requests)))
            time.sleep(1)  # the hung-up requests notice at their next token
            gc.collect()
            objects = gc.get_objects()
            tensors, count = sum(isinstance(o, torch.Tensor) for o in objects), len(objects)
            del objects  # else the next snapshot holds this one, and every object in it, alive
            answers = ", ".join(f"{codes.count(c)} x {c}" for c in sorted(set(codes)))
            print(f"| {n} | {answers} | {tensors} | {count} | {threading.active_count()} | "
                  f"{rss_mb(os.getpid()):.0f} |", flush=True)
        srv.shutdown()
        srv.server_close()


if __name__ == "__main__":
    main()
