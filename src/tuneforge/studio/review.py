"""The web UI's blind A/B review: a held-out prompt answered by the base model and by a job's tuned model, shown
as A and B in a random order that only the server knows; the reviewer's choice becomes one preference pair
(prompt, chosen, rejected: the format `method: dpo` trains on) appended to the key's reviews file, a studio file
that can be the training_file of the next DPO job. Human evaluation that feeds preference tuning.

Each review is a small JSON file under <home>/reviews/, so an open review survives a restart of the server.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

from tuneforge.data.formats import Record, read_records
from tuneforge.errors import TuneforgeError
from tuneforge.models.decode import Sampling
from tuneforge.serve.engine import Engine, Result
from tuneforge.serve.protocol import ApiError
from tuneforge.studio import jobs as j
from tuneforge.studio.context import Studio
from tuneforge.studio.data_api import room_for_a_file
from tuneforge.studio.runs_api import job_row
from tuneforge.studio.store import new_id

REVIEWS_FILE = "reviews.jsonl"
CANDIDATES = 20  # the held-out prompt is drawn from this many last records of the file
MAX_TOKENS = 256  # each answer's length at most (an answer usually ends at the model's end of turn first)
LOCK = threading.Lock()  # one writer of the reviews files and tallies at a time


def _folder(studio: Studio) -> Path:
    folder = studio.store.home / "reviews"
    folder.mkdir(exist_ok=True)
    return folder


def _write(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False))
    os.replace(tmp, path)


def _prompt(record: Record) -> list[dict] | None:
    """The conversation before a record's last answer, as chat messages (None for records without one)."""
    if record.kind == "chat":
        last = max((i for i, m in enumerate(record.messages) if m["role"] == "assistant"), default=0)
        return record.messages[:last] or None
    if record.kind == "preference":
        return record.prompt if isinstance(record.prompt, list) else [{"role": "user", "content": record.prompt}]
    if record.kind == "completion" and isinstance(record.prompt, str):
        return [{"role": "user", "content": record.prompt}]
    return None


def held_out_prompt(studio: Studio, job: dict) -> list[dict]:
    """A prompt the model did not train on: from the job's validation file, else its training file's last
    records (a job without held-out data trained on those too: the review then says how well it learnt them)."""
    file_id = job["request"].get("validation_file") or job["request"]["training_file"]
    path = studio.store.file_path(file_id)
    if not path.is_file():
        raise ApiError(400, f"the job's file {file_id} was deleted; no prompt to review", code="file_not_found")
    try:
        prompts = [p for r in read_records(path) if isinstance(r, Record) and (p := _prompt(r))]
    except TuneforgeError as err:
        raise ApiError(400, str(err).replace(str(path), file_id), code="invalid_file") from None
    if not prompts:
        raise ApiError(400, f"{file_id}: holds no chat prompt to review", param="training_file")
    return random.choice(prompts[-CANDIDATES:])


def answer(engine: Engine, model_id: str, messages: list[dict]) -> str:
    """A greedy answer, through the same engine calls as POST /v1/chat/completions."""
    prompt = engine.chat_prompt(messages)
    sampling = Sampling(temperature=0.0)
    longest = min(MAX_TOKENS, engine.check_length(prompt, sampling))  # the server's default, cut to the context
    with engine.admit():
        return "".join(engine.stream(model_id, prompt, longest, sampling, Result(prompt_tokens=len(prompt))))


def start_review(studio: Studio, owner: str, job_id: str, body=None, query=None) -> dict:
    """POST /v1/tuneforge/jobs/{id}/review: a held-out prompt, and the base's and the tuned model's answers as A
    and B in a hidden random order."""
    job = job_row(studio, owner, job_id)
    if job["status"] != "succeeded":
        raise ApiError(400, f"job {job_id} is {job['status']}; a review compares a succeeded job's model with its "
                       "base", code="invalid_job_status")
    engine = studio.models.engine_for(owner, job["fine_tuned_model"])
    if engine.base_id is None or engine.base_id == job["fine_tuned_model"]:
        raise ApiError(400, f"job {job_id} trained every weight (adapter: full), so its base is not served beside "
                       "it; a review compares a LoRA job with its base", code="no_base_model")
    messages = held_out_prompt(studio, job)
    answers = {"tuned": answer(engine, job["fine_tuned_model"], messages), "base": answer(engine, engine.base_id,
                                                                                          messages)}
    order = random.sample(["tuned", "base"], 2)  # order[0] is shown as A
    review_id = new_id("review")
    _write(_folder(studio) / f"{review_id}.json", {"owner": owner, "job": job_id, "prompt": messages,
                                                   "models": {"A": order[0], "B": order[1]},
                                                   "answers": {"A": answers[order[0]], "B": answers[order[1]]},
                                                   "choice": None})
    return {"review_id": review_id, "prompt": messages, "answers": {"A": answers[order[0]], "B": answers[order[1]]}}


def _reviews_file(studio: Studio, owner: str, tally: dict) -> dict:
    """The owner's reviews file (made at the first pair, made again if it was deleted)."""
    row = studio.store.file(owner, tally.get("file_id") or "")
    if row is None:
        room_for_a_file(studio, owner)
        row = studio.store.add_file(owner, REVIEWS_FILE, "fine-tune", b"", grows=True)
        tally.update(file_id=row["id"], pairs=0)
    return row


def decide(studio: Studio, owner: str, review_id: str, body: dict, query=None) -> dict:
    """POST /v1/tuneforge/reviews/{id} {"choice": "A" | "B" | "tie"}: a preference pair appended to the key's
    reviews file (a tie saves nothing but is counted)."""
    choice = body.get("choice")
    if choice not in ("A", "B", "tie"):
        raise ApiError(400, f"choice: must be \"A\", \"B\" or \"tie\", got {choice!r}", param="choice")
    path = _folder(studio) / f"{review_id}.json"
    with LOCK:
        review = json.loads(path.read_text()) if path.is_file() else None
        if review is None or review["owner"] != owner:
            raise ApiError(404, f"No such review: {review_id}", param="review_id", code="review_not_found")
        if review["choice"] is not None:
            raise ApiError(400, f"review {review_id} was already decided ({review['choice']})",
                           code="review_decided")
        tally_path = _folder(studio) / f"tally-{owner}.json"
        tally = json.loads(tally_path.read_text()) if tally_path.is_file() else {"pairs": 0, "ties": 0}
        row = _reviews_file(studio, owner, tally)
        if choice == "tie":
            tally["ties"] += 1
        else:
            other = "B" if choice == "A" else "A"
            pair = {"prompt": review["prompt"],
                    "chosen": [{"role": "assistant", "content": review["answers"][choice]}],
                    "rejected": [{"role": "assistant", "content": review["answers"][other]}]}
            studio.store.append_file(row["id"], (json.dumps(pair, ensure_ascii=False) + "\n").encode())
            tally["pairs"] += 1
        review["choice"] = choice
        _write(path, review)
        _write(tally_path, tally)
    return {"saved": choice != "tie", "file": j.file_object(studio.store.file(owner, row["id"])),
            "pairs": tally["pairs"], "ties": tally["ties"], "chosen_model": None if choice == "tie" else
            review["models"][choice]}
