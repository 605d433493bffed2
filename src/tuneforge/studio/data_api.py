"""The web UI's Data page: `tuneforge data check`, `preview`, `stats` and `convert` on an uploaded studio file.

Each endpoint builds the config a job of this file would train with (the studio's defaults, the base model and
method or task from the query) and calls the same functions as the commands; paths in what they report are
replaced by the file's id, and line numbers are the uploaded file's own.
"""

from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path

from tuneforge.config import Config, config_from_dict
from tuneforge.data.check import check_data
from tuneforge.data.convert import convert_file
from tuneforge.data.describe import describe
from tuneforge.data.formats import detect_format
from tuneforge.data.preview import first_examples, token_runs
from tuneforge.data.readers import iter_rows
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.errors import TuneforgeError
from tuneforge.methods.facts import function_at, method_facts
from tuneforge.models.resolve import resolve_base_model
from tuneforge.serve.protocol import ApiError
from tuneforge.studio import jobs as j
from tuneforge.studio.context import Studio
from tuneforge.studio.store import new_id

DEFAULT_MODEL = "smollm2-135m-instruct"
# What to do about each kind of finding of `tuneforge data check` (its message says what was found).
FIXES = {
    "bad-record": "Fix or remove this line: each line must be one JSON object in a supported format.",
    "template": "The base model's chat template cannot render this record; fix its roles or choose another model.",
    "round-trip": "The text changes when tokenized and decoded; remove unusual characters from it.",
    "too-long": "Shorten this example or raise max_seq_len; as it is, it is cut or dropped.",
    "assistant-span": "Check the assistant turns: the trained tokens do not match the answers.",
    "end-of-turn": "The answer does not end with the end-of-turn token; check the chat template.",
    "leakage": "This validation example is also in the training data; remove it from one of the files.",
    "duplicate": "Remove the repeated example, or set prepare.dedupe: exact.",
    "near-duplicate": "Remove the near copy, or set prepare.dedupe: near.",
    "length-outlier": "Check that this example is what you meant; it is far longer or shorter than the rest.",
    "special-token-in-text": "Remove the special token's text from the record; the tokenizer reads it as a control token.",
    "control-characters": "Remove the invisible control characters (often broken text extraction).",
    "untrained-template-token": "Train with adapter: full, or choose a model whose template tokens are trained.",
    "one-class": "Add examples of at least one other label.",
    "missing-class": "Add examples of this label, or drop it from the label list.",
    "rare-class": "Add more examples of this label.",
    "unknown-label": "Use one of the configured labels, or add this one to the label list.",
}
DEFAULT_FIX = "Fix this record and upload the file again."


def _choice(query: dict, key: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = query.get(key) or default  # `?method=` left empty: the default
    if value is not None and value not in allowed:
        raise ApiError(400, f"{key}: must be one of {', '.join(allowed)}, got {value!r}", param=key)
    return value


def file_row(studio: Studio, owner: str, file_id: str) -> dict:
    row = studio.store.file(owner, file_id)
    if row is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
    return row


def room_for_a_file(studio: Studio, owner: str, param: str | None = None) -> None:
    """Refuse a key's next file past --max-files: an upload, or one the studio writes (a conversion, reviews)."""
    if len(studio.store.files(owner)) >= studio.limits.max_files:
        raise ApiError(400, f"{param + ': ' if param else ''}you have {studio.limits.max_files} files, the most "
                       "this studio keeps per key (--max-files); delete some with DELETE /v1/files/{id}",
                       param=param, code="too_many_files")


def file_config(studio: Studio, owner: str, file_id: str, query: dict, **settings) -> Config:
    """The config a studio job of this file would train with, as far as data goes: model, method or task,
    max_seq_len (the studio's default 1024); `settings` are laid over it."""
    file_row(studio, owner, file_id)
    raw = {**j.DEFAULTS, **settings, "base_model": query.get("model") or DEFAULT_MODEL,
           "datasets": [{"path": str(studio.store.file_path(file_id))}]}
    task = _choice(query, "task", j.CHOSEN["task"], None)
    if task and task != "causal_lm":
        raw["task"] = task
        raw.pop("adapter")  # an encoder or classifier's own default
    else:
        raw["method"] = _choice(query, "method", j.CHOSEN["method"], "sft")
    if query.get("max_seq_len"):
        raw["max_seq_len"] = query["max_seq_len"]
    try:
        return config_from_dict(raw, "the query")
    except TuneforgeError as err:
        raise ApiError(400, str(err), code="invalid_query") from None


@functools.lru_cache(maxsize=4)
def _processor(base_model: str, chat_template: str | None, load: str) -> tuple:
    """(model folder, tokenizer, its lock), loaded once per model: a fast tokenizer is not safe to use from two
    threads at once, so each use holds its lock."""
    folder, _ = resolve_base_model(base_model)
    return folder, function_at(load)(folder, chat_template, False), threading.Lock()


def processor(cfg: Config) -> tuple:
    return _processor(cfg.base_model, cfg.chat_template, method_facts(cfg).processor)


def _shown(text: str, studio: Studio, file_id: str) -> str:
    return text.replace(str(studio.store.file_path(file_id)), file_id)


def _run(studio: Studio, file_id: str, what):
    """Call a data function; a user's error (bad file, unknown model) is a 400 naming the file by its id."""
    try:
        return what()
    except TuneforgeError as err:
        raise ApiError(400, _shown(str(err), studio, file_id), param="id", code="invalid_file") from None


def detected_format(path: Path) -> str:
    """The format the first readable record declares (as `format: auto` detects it), or "unknown"."""
    for _, obj in iter_rows(path):
        if not isinstance(obj, Exception):
            return detect_format(obj) or "unknown"
    return "unknown"


def check(studio: Studio, owner: str, file_id: str, body=None, query: dict | None = None) -> dict:
    """GET /v1/tuneforge/files/{id}/check: every finding with the uploaded file's line and what to do."""
    cfg = file_config(studio, owner, file_id, query or {})
    row = file_row(studio, owner, file_id)

    def run():
        folder, tokenizer, lock = processor(cfg)
        with lock:
            return check_data(cfg, tokenizer, model_folder=folder), detected_format(studio.store.file_path(file_id))
    report, fmt = _run(studio, file_id, run)
    findings = [{"line": f.line or None, "severity": f.severity, "code": f.code,
                 "message": _shown(f.message, studio, file_id), "fix": FIXES.get(f.code, DEFAULT_FIX)}
                for f in sorted(report.findings, key=lambda f: (f.line, f.severity != "error"))]
    return {"file": {"id": row["id"], "filename": row["filename"], "bytes": row["bytes"]}, "format": fmt,
            "records": sum(report.records.values()), "findings": findings, "ok": not report.errors,
            "settings": report.settings}


def preview(studio: Studio, owner: str, file_id: str, body=None, query: dict | None = None) -> dict:
    """GET /v1/tuneforge/files/{id}/preview: the first examples as the model receives them, trained tokens marked."""
    query = query or {}
    cfg = file_config(studio, owner, file_id, query)
    n = query.get("n") or "5"
    if not n.isdigit() or not 1 <= int(n) <= 50:
        raise ApiError(400, f"n: must be a whole number from 1 to 50, got {n!r}", param="n")

    def run():
        _, tokenizer, lock = processor(cfg)
        with lock:
            return [{"line": ex["record"].line,
                     "segments": [{"text": t, "trained": trained}
                                  for t, trained in token_runs(tokenizer, ex["ids"], ex["labels"])],
                     "tokens": len(ex["ids"]),
                     "trained_tokens": sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX)}
                    for ex in first_examples(cfg, tokenizer, int(n))]
    return {"examples": _run(studio, file_id, run), "max_seq_len": cfg.max_seq_len}


def stats(studio: Studio, owner: str, file_id: str, body=None, query: dict | None = None) -> dict:
    """GET /v1/tuneforge/files/{id}/stats: token lengths, their histogram, what max_seq_len cuts, tokens per epoch,
    of the records training can use (bad ones are left out and counted: the check lists them)."""
    cfg = file_config(studio, owner, file_id, query or {}, on_bad_record="skip", max_bad_fraction=1.0)

    def run():
        _, tokenizer, lock = processor(cfg)
        with lock:
            return describe(cfg, tokenizer)
    s = _run(studio, file_id, run)
    lengths, bins = s["lengths"], s["histogram"]
    return {"records": s["records"], "tokens": {k: lengths[k] for k in ("min", "p50", "p95", "max", "mean")},
            "histogram": {"edges": [lo for lo, _, _ in bins] + [bins[-1][1]] if bins else [],
                          "counts": [n for _, _, n in bins]},
            "over_max_seq_len": s["over_max_seq_len"]["count"], "max_seq_len": s["max_seq_len"],
            "tokens_per_epoch": s["tokens_per_epoch"], "trained_tokens": s["trained_tokens"],
            "left_out": s["left_out"]}


def convert(studio: Studio, owner: str, file_id: str, body: dict, query=None) -> dict:
    """POST /v1/tuneforge/files/{id}/convert {"to": "messages"}: `tuneforge data convert` into a new studio file."""
    row = file_row(studio, owner, file_id)
    if body.get("to", "messages") != "messages":
        raise ApiError(400, f"to: only \"messages\" is written (preference records stay preference pairs in "
                       f"messages), got {body.get('to')!r}", param="to")
    room_for_a_file(studio, owner)
    work = studio.store.home / "tmp" / new_id("convert")
    work.mkdir(parents=True)
    try:
        counts = _run(studio, file_id, lambda: convert_file(studio.store.file_path(file_id), work / "out.jsonl"))
        if not counts["written"]:
            raise ApiError(400, f"{file_id}: none of its {counts['read']} records could be converted; "
                           "GET .../check lists what is wrong with them", param="id", code="invalid_file")
        name = f"{Path(row['filename']).stem}.messages.jsonl"
        new = studio.store.add_file(owner, name, "fine-tune", (work / "out.jsonl").read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**j.file_object(new), "converted": counts}
