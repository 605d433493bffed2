"""`tuneforge studio`: OpenAI's files and fine-tuning jobs API, and the fine-tuned models it made, on one server.

Built on serve/'s server (its body limits, error shape and generation); the routes are a table, so the web
UI's JSON endpoints and its static pages (under `/`, from studio/static/) are rows added beside them.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Imported once, here: the first import of transformers from two request threads at once (models/load.py imports
# it where it is used) can see a half-initialised module and fail with "cannot import name AutoTokenizer".
import transformers  # noqa: F401

from tuneforge import __version__
from tuneforge.errors import ConfigError, ModelError
from tuneforge.models.resolve import locate_base_model
from tuneforge.serve import protocol as p
from tuneforge.serve.engine import Limits
from tuneforge.serve.server import MAX_BODY_BYTES, Handler, Server, serve_until_stopped
from tuneforge.studio import config_api, data_api, exports, guard, review, runs_api
from tuneforge.studio import jobs as j
from tuneforge.studio.background import Background
from tuneforge.studio.keys import load_keys, owner_of
from tuneforge.studio.models import Models
from tuneforge.studio.store import Store, default_home
from tuneforge.studio.worker import Worker

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATIC = Path(__file__).parent / "static"
ID = r"([A-Za-z0-9_-]{1,64})"
ROUTES = [  # (pattern, {method: handler method's name, or a function of (studio, owner, *ids, body, query)})
    (r"/v1/files", {"GET": "list_files", "POST": "upload"}),
    (rf"/v1/files/{ID}", {"GET": "get_file", "DELETE": "delete_file"}),
    (rf"/v1/files/{ID}/content", {"GET": "file_content"}),
    (r"/v1/fine_tuning/jobs", {"GET": "list_jobs", "POST": "create_job"}),
    (rf"/v1/fine_tuning/jobs/{ID}", {"GET": "get_job"}),
    (rf"/v1/fine_tuning/jobs/{ID}/(cancel|pause|resume)", {"POST": "control_job"}),
    (rf"/v1/fine_tuning/jobs/{ID}/events", {"GET": "job_events"}),
    (rf"/v1/fine_tuning/jobs/{ID}/checkpoints", {"GET": "job_checkpoints"}),
    (r"/v1/models", {"GET": "list_models"}),
    (r"/v1/models/(.+)", {"GET": "get_model"}),
    (r"/v1/chat/completions", {"POST": "chat"}),
    (r"/v1/completions", {"POST": "complete"}),
    (r"/health", {"GET": "health"}),
    (r"|/|/index\.html", {"GET": "index"}),
    (r"/static/(.*)", {"GET": "static"}),
    # The web UI's endpoints (docs/studio.md "The web UI's endpoints"): functions answering JSON.
    (r"/v1/tuneforge/session", {"GET": "session"}),
    (rf"/v1/tuneforge/files/{ID}/check", {"GET": data_api.check}),
    (rf"/v1/tuneforge/files/{ID}/preview", {"GET": data_api.preview}),
    (rf"/v1/tuneforge/files/{ID}/stats", {"GET": data_api.stats}),
    (rf"/v1/tuneforge/files/{ID}/convert", {"POST": data_api.convert}),
    (r"/v1/tuneforge/schema", {"GET": config_api.schema}),
    (r"/v1/tuneforge/presets", {"GET": config_api.presets}),
    (r"/v1/tuneforge/config", {"POST": config_api.check_config}),
    (r"/v1/tuneforge/plan", {"POST": config_api.plan}),
    (rf"/v1/tuneforge/jobs/{ID}/metrics", {"GET": runs_api.metrics}),
    (rf"/v1/tuneforge/jobs/{ID}/evaluation", {"GET": runs_api.evaluation}),
    (r"/v1/tuneforge/compare", {"GET": runs_api.compare}),
    (rf"/v1/tuneforge/jobs/{ID}/review", {"POST": review.start_review}),
    (rf"/v1/tuneforge/reviews/{ID}", {"POST": review.decide}),
    (rf"/v1/tuneforge/jobs/{ID}/export/estimate", {"GET": exports.estimate}),
    (rf"/v1/tuneforge/jobs/{ID}/exports", {"GET": exports.list_job, "POST": exports.create}),
    (r"/v1/tuneforge/exports", {"GET": exports.list_all}),
    (rf"/v1/tuneforge/exports/{ID}", {"GET": exports.get, "DELETE": exports.delete}),
    (rf"/v1/tuneforge/exports/{ID}/download", {"GET": exports.download}),
]
PUBLIC = ("health", "index", "static")  # answered without a key: the page must load to show its login box


@dataclass(frozen=True)
class StudioLimits:
    """What one key may upload: --max-upload-mb and --max-files."""

    max_upload_bytes: int = 512 * 1024 * 1024
    max_files: int = 1000


class StudioServer(Server):
    def __init__(self, store: Store, worker: Worker, models: Models, host: str, port: int,
                 keys: dict[str, str] | None, limits: StudioLimits = StudioLimits(), quiet: bool = False):
        self.store, self.worker, self.models, self.keys, self.limits = store, worker, models, keys, limits
        self.secret, self.bound_host = guard.load_secret(store.home), host
        super().__init__(None, host, port, None, MAX_BODY_BYTES, quiet)
        self.RequestHandlerClass = StudioHandler
        self.background = Background()  # after the bind: a port in use leaves no thread behind

    def server_close(self) -> None:
        """Stop exports, generation and the worker (a job in training is queued again), then the connections."""
        self.background.stop()
        self.models.close()
        self.worker.stop()
        super().server_close()
        self.store.close()


class StudioHandler(Handler):
    server: StudioServer

    def _handle(self, method: str) -> None:
        """Host, Origin and CSRF checks first (studio/guard.py), before any body is read."""
        try:
            guard.check_request(method, self.headers, self.server.bound_host, self.server.secret, self._owner)
        except p.ApiError as err:
            self.close_connection = True
            self._send_json(err.status, err.body(), err.headers)
            return
        super()._handle(method)

    def _route(self, method: str, path: str, body: dict | None) -> None:
        for pattern, methods in ROUTES:
            match = re.fullmatch(pattern, path)
            if match is None:
                continue
            if method not in methods:
                allowed = ", ".join(methods)
                raise p.ApiError(405, f"{method} {path}: use {allowed}", code="method_not_allowed",
                                 headers={"Allow": allowed})
            name = methods[method]
            if name in PUBLIC:
                return getattr(self, name)(*match.groups())
            if callable(name):
                return self._reply(name(self.server, self._owner(), *match.groups(), body=body, query=self._query()))
            return getattr(self, name)(self._owner(), *match.groups(), body=body)
        raise p.ApiError(404, f"{path}: no such route; this server has /v1/files, /v1/fine_tuning/jobs, "
                         "/v1/models, /v1/chat/completions and /v1/completions", code="not_found")

    def _owner(self) -> str:
        keys = self.server.keys
        if keys is None:
            return "local"
        owner = owner_of(keys, self.headers.get("Authorization", ""))
        if owner is None:
            raise p.ApiError(401, "missing or unknown API key; send `Authorization: Bearer KEY` with a key from "
                             "this studio's --api-keys file", code="invalid_api_key")
        return owner

    def _read_json(self) -> dict:
        """Uploads are multipart and bounded by --max-upload-mb; control posts may have no body at all."""
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/files":
            try:
                self._owner()  # a stranger is refused before a large body is read
            except p.ApiError:
                self.close_connection = True
                raise
            raw = self._read_bytes(self.server.limits.max_upload_bytes)
            return read_multipart(self.headers.get("Content-Type", ""), raw)
        if self.headers.get("Content-Length") == "0":
            return {}
        return super()._read_json()

    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _limit(self) -> int:
        value = self._query().get("limit", "20")
        if not value.isdigit() or not 1 <= int(value) <= 100:
            raise p.ApiError(400, f"limit: must be a whole number from 1 to 100, got {value!r}", param="limit")
        return int(value)

    # --- files ---------------------------------------------------------------------------------------

    def upload(self, owner: str, body: dict) -> None:
        store = self.server.store
        if body.get("purpose") != "fine-tune":
            raise p.ApiError(400, f"purpose: must be \"fine-tune\", got {body.get('purpose')!r}", param="purpose")
        if "file" not in body:
            raise p.ApiError(400, "file: is required: the JSONL file as a multipart part named `file`", param="file")
        filename, content = body["file"]
        data_api.room_for_a_file(self.server, owner, "file")
        self._send_json(200, j.file_object(store.add_file(owner, filename, "fine-tune", content)))

    def _file(self, owner: str, file_id: str) -> dict:
        return data_api.file_row(self.server, owner, file_id)

    def list_files(self, owner: str, body=None) -> None:
        rows = self.server.store.files(owner)
        self._send_json(200, {"object": "list", "data": [j.file_object(r) for r in rows], "has_more": False})

    def get_file(self, owner: str, file_id: str, body=None) -> None:
        self._send_json(200, j.file_object(self._file(owner, file_id)))

    def delete_file(self, owner: str, file_id: str, body=None) -> None:
        self._file(owner, file_id)
        self.server.store.delete_file(owner, file_id)
        self._send_json(200, {"object": "file", "id": file_id, "deleted": True})

    def file_content(self, owner: str, file_id: str, body=None) -> None:
        self._file(owner, file_id)
        self._send_bytes(self.server.store.file_path(file_id).read_bytes(), "application/octet-stream")

    # --- jobs ----------------------------------------------------------------------------------------

    def _job(self, owner: str, job_id: str) -> dict:
        return runs_api.job_row(self.server, owner, job_id)

    def create_job(self, owner: str, body: dict) -> None:
        paths = {}
        for param in ("training_file", "validation_file"):
            file_id = body.get(param)
            if file_id is None and param == "validation_file":
                continue
            if not isinstance(file_id, str) or self.server.store.file(owner, file_id) is None:
                raise p.ApiError(400, f"{param}: {file_id!r} is not one of your files; upload it with POST /v1/files "
                                 "(purpose fine-tune)", param=param, code="invalid_file")
            paths[param] = str(self.server.store.job_data_path(file_id))  # frozen if the file still grows
        if body.get("integrations"):
            raise p.ApiError(400, "integrations: not supported by tuneforge studio; leave it out (metrics are in "
                             "the job's events and checkpoints)", param="integrations")
        suffix = j.parse_suffix(body)
        config, method = j.job_config(body, paths["training_file"], paths.get("validation_file"),
                                      self.server.store.home, self.server.keys is not None)
        try:
            locate_base_model(config["base_model"])
        except ModelError as err:
            raise p.ApiError(400, f"model: {err}", param="model", code="model_not_found") from None
        request = {"training_file": body["training_file"], "validation_file": body.get("validation_file"),
                   "suffix": suffix, "method": method, "metadata": body.get("metadata")}
        row = self.server.store.add_job(owner, body["model"], request, config)
        self.server.store.add_event(row["id"], f"Created fine-tuning job: {row['id']}")
        self.server.worker.wake.set()
        self._send_json(200, j.job_object(row))

    def list_jobs(self, owner: str, body=None) -> None:
        limit = self._limit()
        rows = self.server.store.jobs(owner, self._query().get("after"), limit + 1)
        self._send_json(200, j.page([j.job_object(r) for r in rows], limit))

    def get_job(self, owner: str, job_id: str, body=None) -> None:
        self._send_json(200, j.job_object(self._job(owner, job_id)))

    def control_job(self, owner: str, job_id: str, action: str, body=None) -> None:
        """cancel: any unfinished job; pause: a queued or running one; resume: a paused one (queued again)."""
        store, job = self.server.store, self._job(owner, job_id)
        # A job being validated may be cancelled, not paused: resume queues a job, so it must have passed validation.
        waiting = ("validating_files", "queued", "paused") if action == "cancel" else ("queued",)
        if action == "resume":
            if not store.move(job_id, "queued", ("paused",)):
                raise p.ApiError(400, f"job {job_id} is {job['status']}; only a paused job can be resumed",
                                 code="invalid_job_status")
            store.add_event(job_id, "The job is resumed; it continues from its newest checkpoint")
            self.server.worker.wake.set()
        elif store.move(job_id, "cancelled" if action == "cancel" else "paused", waiting,
                        **({"finished_at": int(time.time())} if action == "cancel" else {})):
            store.add_event(job_id, f"The job is {'cancelled' if action == 'cancel' else 'paused'}")
        elif store.job(job_id)["status"] == "running":
            store.request(job_id, action)  # the worker stops the process and sets the status
            self.server.worker.wake.set()
        else:
            done = {"cancel": "cancelled", "pause": "paused"}[action]
            raise p.ApiError(400, f"job {job_id} is {store.job(job_id)['status']}, so it cannot be {done}",
                             code="invalid_job_status")
        self._send_json(200, j.job_object(store.job(job_id)))

    def job_events(self, owner: str, job_id: str, body=None) -> None:
        self._job(owner, job_id)
        limit = self._limit()
        rows = self.server.store.events(job_id, self._query().get("after"), limit + 1)
        self._send_json(200, j.page([j.event_object(r) for r in rows], limit))

    def job_checkpoints(self, owner: str, job_id: str, body=None) -> None:
        job = self._job(owner, job_id)
        limit = self._limit()
        rows = self.server.store.checkpoints(job_id, self._query().get("after"), limit + 1)
        name = job["fine_tuned_model"] or j.fine_tuned_name(j.base_name(job["model"]), job["request"].get("suffix"), job_id)
        self._send_json(200, j.page([j.checkpoint_object(r, name) for r in rows], limit))

    # --- models --------------------------------------------------------------------------------------

    def list_models(self, owner: str, body=None) -> None:
        self._send_json(200, p.models_list(self.server.models.ids(owner)))

    def get_model(self, owner: str, model_id: str, body=None) -> None:
        model_id = unquote(model_id)
        if model_id not in self.server.models.ids(owner):
            raise p.ApiError(404, f"model: {model_id!r} is not one of your fine-tuned models", param="model",
                             code="model_not_found")
        self._send_json(200, p.model_card(model_id))

    def chat(self, owner: str, body: dict) -> None:
        self._answer(True, body, self.server.models.engine_for(owner, body.get("model")))

    def complete(self, owner: str, body: dict) -> None:
        self._answer(False, body, self.server.models.engine_for(owner, body.get("model")))

    # --- the web UI's place ---------------------------------------------------------------------------

    def health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def index(self) -> None:
        self._send_bytes((STATIC / "index.html").read_bytes(), guard.CONTENT_TYPES["html"], guard.PAGE_HEADERS)

    def static(self, name: str) -> None:
        path, content_type = guard.static_file(STATIC, name)
        self._send_bytes(path.read_bytes(), content_type, guard.PAGE_HEADERS)

    def session(self, owner: str, body=None) -> None:
        """What the page needs first: its CSRF token, and whether it must ask for a key (401 here without one)."""
        self._send_json(200, {"csrf_token": guard.csrf_token(self.server.secret, owner),
                              "auth_required": self.server.keys is not None,
                              "owner": owner if self.server.keys is not None else None, "version": __version__})

    def _reply(self, answer: dict | exports.Download) -> None:
        if not isinstance(answer, exports.Download):
            return self._send_json(200, answer)
        size = answer.path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Disposition", f'attachment; filename="{answer.filename}"')
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.headers_sent = True
        with open(answer.path, "rb") as f:
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _send_bytes(self, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.headers_sent = True
        self.wfile.write(data)


def read_multipart(content_type: str, raw: bytes) -> dict:
    """A multipart/form-data body as {field: text, "file": (name, bytes)}; the name is kept only for display."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise p.ApiError(400, "send the file as multipart/form-data with fields `purpose` and `file`",
                         code="invalid_upload")
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    if not message.is_multipart():
        raise p.ApiError(400, "the multipart body could not be read; send fields `purpose` and `file`",
                         code="invalid_upload")
    out: dict = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            shown = Path(str(part.get_filename() or "upload.jsonl").replace("\\", "/")).name
            out["file"] = ("".join(c for c in shown if c.isprintable())[:255] or "upload.jsonl", payload)
        elif isinstance(name, str):
            out[name] = payload.decode("utf-8", "replace")
    return out


def make_studio(home: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
                api_keys: str | Path | None = None, limits: StudioLimits = StudioLimits(),
                serve_limits: Limits = Limits(), device: str = "auto", python: str = sys.executable,
                quiet: bool = False, gpus: list[str] | None = None) -> StudioServer:
    """Open the store, start the worker (resuming what a killed server left running) and bind the socket;
    call .serve_forever() and later .shutdown() and .server_close(). port=0 picks a free port."""
    keys = load_keys(api_keys) if api_keys else None
    if keys is None and host not in LOOPBACK:
        raise ConfigError(f"--host {host}: anyone who can reach this address could upload data and train; give "
                          "--api-keys FILE (make keys with `tuneforge studio --api-keys FILE --new-key NAME`) or "
                          "keep --host 127.0.0.1")
    store = Store(home or default_home())
    worker = Worker(store, python, gpus=gpus)
    server = StudioServer(store, worker, Models(store, serve_limits, device), host, port, keys, limits, quiet)
    worker.start()
    exports.resume(server)
    return server


def studio(home: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
           api_keys: str | Path | None = None, limits: StudioLimits = StudioLimits(), quiet: bool = False,
           gpus: list[str] | None = None) -> None:
    """`tuneforge studio`: answer until Ctrl-C; a job in training then continues at the next start."""
    server = make_studio(home, host, port, api_keys, limits, quiet=quiet, gpus=gpus)
    print(f"tuneforge studio at {server.url} (home {server.store.home}; Ctrl-C to stop)", file=sys.stderr, flush=True)
    serve_until_stopped(server)

