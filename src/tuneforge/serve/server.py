"""The HTTP side: OpenAI routes on the standard library's threading server.

Every request gets an answer in OpenAI's error shape when it goes wrong; nothing a client sends
can stop the server. Requests being answered take turns on the engine token by token (at most
--max-concurrent of them; more get 503), and one whose client hangs up stops at its next token.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import select
import socket
import sys
import traceback
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from jinja2 import TemplateError

from tuneforge.errors import TuneforgeError
from tuneforge.serve import protocol as p
from tuneforge.serve.classify import INPUTS, parse_classify, pipeline_shape
from tuneforge.serve.embeddings import load_embedding_engine, serves_embeddings
from tuneforge.serve.engine import ClientGone, Engine, Limits, Result, ShuttingDown, load_engine
from tuneforge.serve.heads import wrong_route

MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # past this a too-large body is not read to the end; the connection is dropped
GONE = (BrokenPipeError, ConnectionResetError, TimeoutError, ShuttingDown, ClientGone)
ROUTES = {"/health": "GET", "/v1/models": "GET"}  # every server's; its engine adds the routes of its task


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins them
    block_on_close = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 resets a burst of clients)

    def __init__(self, engine: Engine, host: str, port: int, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, quiet: bool = False):
        self.engine, self.api_key, self.max_body_bytes, self.quiet = engine, api_key, max_body_bytes, quiet
        self.connections: set[socket.socket] = set()
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as err:
            raise TuneforgeError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); "
                                 "choose another port with --port") from None

    def process_request(self, request, client_address):
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """End open connections and any generation, then wait for every handler thread.

        A thread left running (a daemon thread inside torch) can abort the interpreter at exit.
        """
        if self.engine is not None:  # the studio's server holds no one engine; it stops its own
            self.engine.closing.set()
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        super().server_close()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked encoding
    server_version = "tuneforge"
    timeout = 120  # an idle or stalled client gives its thread back (and a stalled stream its place)
    server: Server

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):  # and the other methods a REST client may try: 405 on our routes, not 501
        self.close_connection = True  # its body, if any, is never read
        self._handle(self.command)

    do_PUT = do_PATCH = do_DELETE

    def parse_request(self) -> bool:
        """The base class's parsing, without HTTP/0.9: its answers have no status line, so a garbled
        request line would get a bare body that no client can read as an error."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, f"bad request line {self.requestline[:100]!r}; send HTTP/1.1")
            return False
        return True

    def _handle(self, method: str) -> None:
        self.headers_sent = False
        try:
            body = self._read_json() if method == "POST" else None
            return self._route(method, urlsplit(self.path).path.rstrip("/"), body)
        except p.ApiError as err:
            error = err
        except GONE:
            self.close_connection = True  # the client or the server went away; nobody to answer
            return
        except Exception as err:
            sys.stderr.write(f"tuneforge serve: {self.command} {self.path} failed:\n{traceback.format_exc()}")
            error = internal_error(err)
            self.close_connection = True
        if not self.headers_sent:
            with contextlib.suppress(OSError):
                self._send_json(error.status, error.body(), error.headers)

    def _route(self, method: str, path: str, body: dict | None) -> None:
        is_model = path.startswith("/v1/models/")
        engine = self.server.engine
        routes = {**ROUTES, **engine.routes}
        if path not in routes and not is_model:
            refused = wrong_route(engine.head, path)
            if refused is not None:
                raise refused
            listed = ", ".join(f"{m} {r}" for r, m in routes.items() if r != "/health")
            raise p.ApiError(404, f"{path}: no such route; this server has {listed}", code="not_found")
        allowed = routes.get(path, "GET")
        if method != allowed:
            raise p.ApiError(405, f"{method} {path}: use {allowed}", code="method_not_allowed",
                             headers={"Allow": allowed})
        if path == "/health":
            return self._send_json(200, {"status": "ok"})
        self._check_key()
        if path == "/v1/models":
            return self._send_json(200, p.models_list(engine.model_ids()))
        if is_model:
            return self._send_json(200, p.model_card(engine.resolve(unquote(path.removeprefix("/v1/models/")))))
        if path == "/v1/classify":
            return self._classify(body)
        if path == "/v1/embeddings":
            return self._embeddings(body)
        scoring = p.parse_scoring(body) if path == "/v1/completions" else None
        if scoring is not None:
            return self._score(scoring)
        return self._answer(path == "/v1/chat/completions", body)

    def _score(self, req: p.Scoring) -> None:
        """Log-probabilities of each prompt's tokens (echo) and of at most one greedy token after them."""
        engine = self.server.engine
        model_id = engine.resolve(req.model)
        choices, prompt_tokens = [], 0
        with engine.admit():
            for index, prompt in enumerate(req.prompts):
                ids = engine.text_prompt(prompt) if isinstance(prompt, str) else prompt
                scored = engine.score(model_id, ids, req.top, req.max_tokens == 1)
                shown = scored if req.echo else scored[len(ids):]
                texts = engine.token_texts([t for t, _, _ in shown])
                listed = sorted({j for _, _, top in shown for j in top})
                name = dict(zip(listed, engine.token_texts(listed)))
                tops = [None if lp is None else _top_by_text(top, name) for _, lp, top in shown]
                choices.append(p.scoring_choice(index, texts, [lp for _, lp, _ in shown], tops,
                                                len(ids) if req.echo else 0))
                prompt_tokens += len(ids)
        counts = p.usage(prompt_tokens, len(req.prompts) * req.max_tokens)
        self._send_json(200, p.completion_choices(p.new_id("cmpl"), model_id, choices, counts))

    def _embeddings(self, body: dict) -> None:
        engine = self.server.engine
        model, texts, fmt = p.parse_embeddings(body)
        model_id = engine.resolve(model)
        vectors, tokens = engine.embed(texts)
        return self._send_json(200, p.embeddings_response(model_id, vectors, tokens, fmt))

    def _classify(self, body: dict) -> None:
        engine = self.server.engine
        kind = INPUTS[engine.head]
        model, inputs, single, top_k = parse_classify(body, kind.read)
        model_id = engine.resolve(model)
        probs, fields = engine.classify(model_id, inputs)
        data = pipeline_shape(probs, engine.model.config.id2label, single, top_k, kind.one_per_input, fields)
        return self._send_json(200, {"object": "list", "model": model_id, "data": data})

    def _answer(self, chat: bool, body: dict, engine: Engine | None = None) -> None:
        """A chat or text completion: every check first, so a refused request never starts a stream.
        `engine`: the one serving the requested model, where a server holds several (the studio)."""
        engine = engine or self.server.engine
        req = p.parse_chat(body) if chat else p.parse_completion(body)
        model_id = engine.resolve(req.model)
        try:
            prompt = engine.chat_prompt(req.messages) if chat else engine.text_prompt(req.prompt)
        except (TuneforgeError, TemplateError) as err:
            raise p.ApiError(400, f"messages: the chat template cannot render them: {err}", param="messages") from None
        max_new = engine.check_length(prompt, req.sampling)
        with engine.admit():
            result = Result(prompt_tokens=len(prompt))
            pieces = engine.stream(model_id, prompt, max_new, req.sampling, result,
                                   gone=lambda: client_closed(self.connection))
            if req.stream:
                return self._stream(chat, model_id, req, pieces, result)
            with contextlib.closing(pieces):
                text = "".join(pieces)
        counts = p.usage(result.prompt_tokens, result.completion_tokens)
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        if chat:
            return self._send_json(200, p.chat_response(rid, model_id, text, result.finish_reason, counts))
        return self._send_json(200, p.completion_response(rid, model_id, text, result.finish_reason, counts))

    def _stream(self, chat: bool, model_id: str, req: p.Request, pieces, result: Result) -> None:
        """Server-sent events in OpenAI's chunk format, closed by `data: [DONE]`."""
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.headers_sent = True

        def text_chunk(text: str, finish: str | None = None) -> dict:
            if chat:
                return p.chat_chunk(rid, model_id, {"content": text} if text or finish is None else {}, finish)
            return p.completion_response(rid, model_id, text, finish)

        if chat:
            self._event(p.chat_chunk(rid, model_id, {"role": "assistant", "content": ""}))
        try:
            with contextlib.closing(pieces):
                for text in pieces:
                    self._event(text_chunk(text))
        except GONE:
            raise
        except Exception as err:  # headers are gone; the error travels as an event, as vLLM sends it
            sys.stderr.write(f"tuneforge serve: {self.command} {self.path} failed:\n{traceback.format_exc()}")
            self._event(internal_error(err).body())
        else:
            self._event(text_chunk("", result.finish_reason))
            if req.include_usage:
                counts = p.usage(result.prompt_tokens, result.completion_tokens)
                kind = "chat.completion.chunk" if chat else "text_completion"
                self._event(p.usage_chunk(rid, model_id, kind, counts))
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, obj: dict) -> None:
        self._chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise p.ApiError(401, "missing or wrong API key; send the header `Authorization: Bearer KEY` with the "
                             "key the server was started with (--api-key)", code="invalid_api_key")

    def _read_json(self) -> dict:
        """The request body as a JSON object; always read to its end so the connection stays usable."""
        raw = self._read_bytes(self.server.max_body_bytes)
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise p.ApiError(400, f"the body is not valid JSON ({err}); send a JSON object",
                             code="invalid_json") from None
        except RecursionError:
            raise p.ApiError(400, "the body is nested too deeply to read; send a flat JSON object",
                             code="invalid_json") from None
        if not isinstance(body, dict):
            raise p.ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        where = p.lone_surrogate(body)
        if where is not None:
            raise p.ApiError(400, f"{where}: holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                             "which is not text; send valid Unicode", param=where, code="invalid_json")
        return body

    def _read_bytes(self, limit: int) -> bytes:
        """The raw body, at most `limit` bytes (413 above it, after draining what was sent)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise p.ApiError(411, "send the body with a Content-Length header, not chunked", code="length_required")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise p.ApiError(411, "the Content-Length header is missing or not a number",
                             code="length_required") from None
        if length > limit:
            self._drain(length)
            raise p.ApiError(413, f"the body is {length} bytes; this server takes at most {limit}",
                             code="request_too_large")
        return self.rfile.read(length)

    def _drain(self, length: int) -> None:
        """Read and drop a refused body, so the client sees the 413 rather than a reset connection."""
        self.close_connection = True
        left = min(length, DRAIN_LIMIT)
        while left > 0:
            got = self.rfile.read(min(left, 1 << 16))
            if not got:
                break
            left -= len(got)

    def _send_json(self, status: int, obj: dict, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.headers_sent = True
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (bad request line, unknown method, huge headers), in OpenAI's shape."""
        self.close_connection = True
        self.headers_sent = False
        if self.request_version == "HTTP/0.9":  # the request line was not understood: answer in HTTP/1.1
            self.request_version = self.protocol_version
        text = message or explain or self.responses.get(code, ("error",))[0]
        with contextlib.suppress(OSError):
            self._send_json(code, p.ApiError(code, text).body())

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if not self.server.quiet:
            super().log_message(format, *args)


def _top_by_text(top: dict[int, float], name: dict[int, str]) -> dict[str, float]:
    """{token text: log-prob}; two ids that decode alike keep the higher, so the listed maximum stays the true one."""
    out: dict[str, float] = {}
    for j, lp in top.items():
        out[name[j]] = max(lp, out.get(name[j], -math.inf))
    return out


def client_closed(sock: socket.socket) -> bool:
    """Whether the client has closed or reset its connection: readable, with nothing left to read.

    Asked between tokens, so a request nobody waits for stops generating (a pipelined next request
    leaves bytes to read and does not count as closed)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed
        return True


def internal_error(err: Exception) -> p.ApiError:
    return p.ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error",
                      code="internal_error")


def make_server(target: str | Path, host: str = "127.0.0.1", port: int = 8000,
                adapters: Mapping[str, str | Path] | Sequence[str] | None = None, api_key: str | None = None,
                device: str = "auto", max_body_bytes: int = MAX_BODY_BYTES, quiet: bool = False,
                limits: Limits = Limits(), trust_remote_code: bool = False) -> Server:
    """Load the model and bind the socket; call .serve_forever() (e.g. in a thread) and later .shutdown().

    port=0 picks a free port; read it back from .port.
    """
    if serves_embeddings(Path(target)):
        engine = load_embedding_engine(target, device, trust_remote_code, adapters)
    else:
        engine = load_engine(target, adapters, device, limits, trust_remote_code)
    return Server(engine, host, port, api_key, max_body_bytes, quiet)


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000,
          adapters: Mapping[str, str | Path] | Sequence[str] | None = None, api_key: str | None = None,
          device: str = "auto", max_body_bytes: int = MAX_BODY_BYTES, quiet: bool = False,
          limits: Limits = Limits(), trust_remote_code: bool = False) -> None:
    """`tuneforge serve`: answer OpenAI requests until Ctrl-C."""
    server = make_server(target, host, port, adapters, api_key, device, max_body_bytes, quiet, limits,
                         trust_remote_code)
    print(f"Serving {', '.join(server.engine.model_ids())} at {server.url} on {server.engine.device} "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: no --api-key, so anyone who can reach {host}:{server.port} can use the model",
              file=sys.stderr, flush=True)
    serve_until_stopped(server)


def serve_until_stopped(server) -> None:
    """Answer until Ctrl-C, then close: requests being answered finish first (server_close joins them)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
