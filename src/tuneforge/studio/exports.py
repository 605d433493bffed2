"""The web UI's Export page: a job's run written by `tuneforge export`'s functions under <home>/exports/, its
size estimated before writing, and the result downloaded (a GGUF file as it is, a folder as a zip).

An export is a folder <home>/exports/<export id>/ holding export.json (whose it is, what it is) and out/; its
zip is written beside them once, at the first download, and streamed from disk.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from tuneforge.errors import TuneforgeError
from tuneforge.export.gguf import QUANTS
from tuneforge.export.run_export import DTYPES, TARGETS, export_run
from tuneforge.models.run import Run, base_folder, open_run
from tuneforge.serve.protocol import ApiError
from tuneforge.studio.context import Studio
from tuneforge.studio.runs_api import job_row
from tuneforge.studio.store import new_id

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPE = "bfloat16"  # what an hf export of a LoRA run is merged to (the export command's default)


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


def create(studio: Studio, owner: str, job_id: str, body: dict, query=None) -> dict:
    """POST /v1/tuneforge/jobs/{id}/exports {"to", "quant"}: written now, by `tuneforge export`'s function."""
    to, quant = _options(body)
    run = _run(studio, owner, job_id)
    export_id = new_id("export")
    folder = _folder(studio, export_id)
    folder.mkdir(parents=True)
    try:
        path = export_run(run, to, folder / "out", quant)
    except TuneforgeError as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise ApiError(400, str(err).replace(str(folder / "out"), "the export"), param="to") from None
    size = path.stat().st_size if path.is_file() else _files_bytes(path)
    info = {"id": export_id, "owner": owner, "job": job_id, "to": to, "quant": quant, "bytes": size,
            "path": str(path.relative_to(folder))}
    (folder / "export.json").write_text(json.dumps(info))
    return {"id": export_id, "to": to, "quant": quant, "bytes": size,
            "download": f"/v1/tuneforge/exports/{export_id}/download"}


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
    info_path = _folder(studio, export_id) / "export.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if info is None or info["owner"] != owner:
        raise ApiError(404, f"No such export: {export_id}", param="export_id", code="export_not_found")
    path = _folder(studio, export_id) / info["path"]
    if path.is_file():
        return Download(path, f"{info['job']}-{path.name}", "application/octet-stream")
    name = f"{info['job']}-{info['to']}.zip"
    return Download(_zip(path, _folder(studio, export_id) / name), name, "application/zip")
