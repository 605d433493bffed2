"""The web UI's Export page: a job's run written by `tuneforge export`'s functions under <home>/exports/, its
size estimated before writing, and the result downloaded (a GGUF file as it is, a folder as a zip).

An export is a row of the studio database (whose it is, what it is, its status) and a folder
<home>/exports/<export id>/ holding out/; its zip is written beside it once, at the first download, and
streamed from disk. Exports are written one at a time on the studio's background thread (a GGUF of the
built-in model takes about a minute on a CPU), so the request that asks for one answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from tuneforge.errors import TuneforgeError
from tuneforge.export.gguf import QUANTS
from tuneforge.export.run_export import DTYPES, TARGETS, check_format, export_run
from tuneforge.models.run import Run, base_folder, open_run
from tuneforge.serve.protocol import ApiError
from tuneforge.studio.context import Studio
from tuneforge.studio.runs_api import job_row

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPE = "bfloat16"  # what an hf export of a LoRA run is merged to (the export command's default)
QUANTISED = ("gguf", "ollama")  # the targets `quant` applies to
ACTIVE = ("queued", "running")  # an export in one of these is answered again rather than started twice
LOCK = threading.Lock()  # one look-then-add of an export at a time


@dataclass(frozen=True)
class Download:
    """An answer that is a file, streamed by the server with Content-Disposition: attachment."""

    path: Path
    filename: str
    content_type: str


def _options(source: dict) -> tuple[str, str]:
    to, quant = source.get("to", "gguf"), str(source.get("quant", "q8_0")).lower()
    if to not in TARGETS:
        raise ApiError(400, f"to: must be one of {', '.join(TARGETS)}, got {to!r}", param="to")
    if quant not in QUANTS:
        raise ApiError(400, f"quant: must be one of {', '.join(QUANTS)}, got {quant!r}", param="quant")
    return to, quant


def _run(studio: Studio, owner: str, job_id: str) -> Run:
    job = job_row(studio, owner, job_id)
    if job["status"] != "succeeded":
        raise ApiError(400, f"job {job_id} is {job['status']}; only a succeeded job's model can be exported",
                       code="invalid_job_status")
    try:
        return open_run(studio.store.run_dir(job_id))
    except TuneforgeError as err:
        raise ApiError(400, str(err), code="invalid_run") from None


def _shapes(folder: Path) -> list[tuple[int, ...]]:
    """The shape of every tensor in a folder's safetensors files, read from their headers (no weights)."""
    shapes = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            shapes += [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
    return shapes


def _gguf_bytes(shape: tuple[int, ...], quant: str) -> float:
    """Bytes per tensor as export/gguf.py stores it: 1-D tensors F32; Q8_0 in blocks of 32 (34 bytes), else F16."""
    n = _numel(shape)
    if len(shape) < 2 or quant == "f32":
        return 4 * n
    if quant in ("f16", "bf16"):
        return 2 * n
    if quant == "q4_k_m" and shape[-1] % 256 == 0:
        return n * 4.85 / 8  # Q4_K with some tensors in Q6_K, llama.cpp's mix
    return n * 34 / 32 if shape[-1] % 32 == 0 else 2 * n


def _files_bytes(folder: Path, names: tuple[str, ...] | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (names is None or p.name in names))


def estimate_bytes(run: Run, to: str, quant: str) -> int:
    """The size of `export_run(run, to, ..., quant)`'s output, from tensor shapes alone (nothing written)."""
    if to == "adapter" or (to == "hf" and not run.is_adapter):
        return _files_bytes(run.final)  # copied as they are
    weights = base_folder(run) if run.is_adapter else run.final
    tokenizer = _files_bytes(run.final, TOKENIZER_FILES)
    if to == "hf":
        item = DTYPES[DTYPE].itemsize
        return int(sum(item * _numel(s) for s in _shapes(weights)) + tokenizer)
    return int(sum(_gguf_bytes(s, quant) for s in _shapes(weights)) + _gguf_vocab_bytes(run.final / "tokenizer.json"))


def _gguf_vocab_bytes(path: Path) -> int:
    """What GGUF's tokenizer fields take: each token as a length-prefixed string with a score and a type, each
    merge as a string (plus the chat template and a few numbers)."""
    if not path.is_file():
        return 0
    model = json.loads(path.read_text()).get("model", {})
    vocab, merges = model.get("vocab") or {}, model.get("merges") or []
    tokens = vocab if isinstance(vocab, dict) else [t[0] for t in vocab]
    merged = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return sum(16 + len(t.encode()) for t in tokens) + sum(8 + len(m.encode()) for m in merged) + 64 * 1024


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate(studio: Studio, owner: str, job_id: str, body=None, query: dict | None = None) -> dict:
    """GET /v1/tuneforge/jobs/{id}/export/estimate?to=&quant=: the export's size before it is written."""
    to, quant = _options(query or {})
    return {"bytes": estimate_bytes(_run(studio, owner, job_id), to, quant), "to": to, "quant": quant}


def _folder(studio: Studio, export_id: str) -> Path:
    return studio.store.home / "exports" / export_id


def _progress(studio: Studio, row: dict) -> float | None:
    """How far a running export is: the bytes written so far under its folder, of the estimate."""
    if row["status"] != "running":
        return {"queued": 0.0, "succeeded": 1.0}.get(row["status"])
    written = 0
    for parent, _, names in os.walk(_folder(studio, row["id"])):  # the export renames its folder as we count
        for name in names:
            with contextlib.suppress(OSError):
                written += os.stat(os.path.join(parent, name)).st_size
    return round(min(0.99, written / row["estimated_bytes"]), 3) if row["estimated_bytes"] else None


def export_object(studio: Studio, row: dict) -> dict:
    done = row["status"] == "succeeded"
    return {"object": "export", "id": row["id"], "job": row["job_id"], "to": row["target"], "quant": row["quant"],
            "status": row["status"], "created_at": row["created_at"], "finished_at": row["finished_at"],
            "estimated_bytes": row["estimated_bytes"], "bytes": row["bytes"], "progress": _progress(studio, row),
            "error": row["error"], "download": f"/v1/tuneforge/exports/{row['id']}/download" if done else None}


def export_row(studio: Studio, owner: str, export_id: str) -> dict:
    row = studio.store.export(export_id, owner)
    if row is None:
        raise ApiError(404, f"No such export: {export_id}", param="export_id", code="export_not_found")
    return row


def create(studio: Studio, owner: str, job_id: str, body: dict, query=None) -> dict:
    """POST /v1/tuneforge/jobs/{id}/exports {"to", "quant"}: queued at once and written in the background by
    `tuneforge export`'s function; the same export still queued or running is answered instead of a second."""
    to, quant = _options(body)
    quant = quant if to in QUANTISED else None
    run = _run(studio, owner, job_id)
    try:
        check_format(run, to)
    except TuneforgeError as err:
        raise ApiError(400, str(err).replace(str(run.dir), f"job {job_id}'s run"), param="to") from None
    with LOCK:
        same = [r for r in studio.store.exports(owner, job_id)
                if r["status"] in ACTIVE and r["target"] == to and r["quant"] == quant]
        if same:
            return export_object(studio, same[0])
        row = studio.store.add_export(owner, job_id, to, quant, estimate_bytes(run, to, quant or "q8_0"))
    studio.background.submit(functools.partial(_write, studio, row["id"]))
    return export_object(studio, row)


def _write(studio: Studio, export_id: str) -> None:
    """The export itself, on the background thread: running, then succeeded or failed with what went wrong."""
    store = studio.store
    if not store.move_export(export_id, "running", ("queued",)):
        return  # deleted while it waited
    row, folder = store.export(export_id), _folder(studio, export_id)
    try:
        run = open_run(store.run_dir(row["job_id"]))
        path = export_run(run, row["target"], folder / "out", row["quant"] or "q8_0")
    except Exception as err:  # noqa: BLE001 - whatever failed, the export's record says so
        shutil.rmtree(folder, ignore_errors=True)
        shown = str(err).replace(str(folder / "out"), "the export").replace(str(store.run_dir(row["job_id"])),
                                                                          f"job {row['job_id']}'s run")
        message = shown if isinstance(err, TuneforgeError) else f"{type(err).__name__}: {shown} (please report it)"
        store.move_export(export_id, "failed", ("running",), error=message, finished_at=int(time.time()))
        return
    size = path.stat().st_size if path.is_file() else _files_bytes(path)
    store.move_export(export_id, "succeeded", ("running",), bytes=size, path=str(path.relative_to(folder)),
                      finished_at=int(time.time()))


def resume(studio: Studio) -> None:
    """At start: an export left running was cut off by the restart (marked failed); queued ones are queued again."""
    for row in studio.store.query("SELECT * FROM exports WHERE status IN ('queued', 'running') ORDER BY seq"):
        if row["status"] == "running":
            shutil.rmtree(_folder(studio, row["id"]), ignore_errors=True)
            studio.store.move_export(row["id"], "failed", ("running",), finished_at=int(time.time()),
                                     error="interrupted by a restart of the studio; export it again")
        else:
            studio.background.submit(functools.partial(_write, studio, row["id"]))


def get(studio: Studio, owner: str, export_id: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/exports/{id}: its status, progress, error and download link."""
    return export_object(studio, export_row(studio, owner, export_id))


def list_all(studio: Studio, owner: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/exports: the key's exports, newest first."""
    return {"object": "list", "data": [export_object(studio, r) for r in studio.store.exports(owner)]}


def list_job(studio: Studio, owner: str, job_id: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/jobs/{id}/exports: one job's exports, newest first."""
    job_row(studio, owner, job_id)
    return {"object": "list", "data": [export_object(studio, r) for r in studio.store.exports(owner, job_id)]}


def delete(studio: Studio, owner: str, export_id: str, body=None, query=None) -> dict:
    """DELETE /v1/tuneforge/exports/{id}: its record and files; refused while it is being written."""
    export_row(studio, owner, export_id)
    if not studio.store.delete_export(export_id, unless=("running",)):
        raise ApiError(409, f"export {export_id} is running; delete it once it has finished (poll GET "
                       f"/v1/tuneforge/exports/{export_id} until its status is succeeded or failed)",
                       code="export_running")
    shutil.rmtree(_folder(studio, export_id), ignore_errors=True)
    return {"object": "export", "id": export_id, "deleted": True}


def _zip(folder: Path, out: Path) -> Path:
    """The folder as one zip (stored, not compressed: weights do not shrink), written once, atomically."""
    if not out.is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                z.write(path, path.relative_to(folder).as_posix())
        os.replace(tmp, out)
    return out


def download(studio: Studio, owner: str, export_id: str, body=None, query=None) -> Download:
    """GET /v1/tuneforge/exports/{id}/download: a GGUF file as it is, any other export as a zip of its folder."""
    row = export_row(studio, owner, export_id)
    if row["status"] != "succeeded":
        raise ApiError(409, f"export {export_id} is {row['status']}; it can be downloaded once its status is "
                       "succeeded", code="export_not_ready")
    path = _folder(studio, export_id) / row["path"]
    if path.is_file():
        return Download(path, f"{row['job_id']}-{path.name}", "application/octet-stream")
    name = f"{row['job_id']}-{row['target']}.zip"
    return Download(_zip(path, _folder(studio, export_id) / name), name, "application/zip")
