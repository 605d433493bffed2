"""The web UI's Runs page: a job's every logged step, validation and diagnoses from its run folder, its
before/after evaluation, and several jobs compared. Read from the job database and the run folder at each
request, so a closed tab or a restarted server never shows a stale run."""

from __future__ import annotations

from tuneforge.config import config_from_dict, config_to_dict
from tuneforge.errors import TuneforgeError
from tuneforge.serve.protocol import ApiError
from tuneforge.studio.context import Studio
from tuneforge.track.runs import EVAL_KEYS, NOISE_KEYS, RunFiles, differing, is_run, read_run
from tuneforge.track.trackers import flatten

DROPPED = ("examples",)  # per-step fields too large to send at every poll (the indices of the batch's records)
LOWER_IS_BETTER = ("loss", "perplexity")  # an evaluation number whose name holds one of these: lower is better
SKIPPED = ("n", "samples", "val_tokens")  # counts and lists in eval_*.json, not scores


def job_row(studio: Studio, owner: str, job_id: str) -> dict:
    row = studio.store.job(job_id, owner)
    if row is None:
        raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
    return row


def run_files(studio: Studio, job_id: str) -> RunFiles:
    """What the job's run folder holds so far (nothing before its first step)."""
    folder = studio.store.run_dir(job_id)
    try:
        return read_run(folder) if folder.is_dir() and is_run(folder) else RunFiles(folder)
    except TuneforgeError as err:  # a log damaged before its last line
        raise ApiError(409, f"job {job_id}: {err}", code="damaged_run") from None


def total_steps(studio: Studio, job: dict, run: RunFiles) -> int | None:
    """The run's length: max_steps where the config sets it, what the worker reported, or the last step once
    the run has finished."""
    if job["config"].get("max_steps"):
        return job["config"]["max_steps"]
    rows = studio.store.query("SELECT data FROM events WHERE job_id = ? AND data LIKE '%\"total_steps\"%' "
                              "ORDER BY seq DESC LIMIT 1", (job["id"],))
    if rows:
        return rows[0]["data"]["total_steps"]
    return run.steps[-1]["step"] if run.finished and run.steps else None


def metrics(studio: Studio, owner: str, job_id: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/jobs/{id}/metrics: every logged step (nothing sampled away), validation, diagnoses."""
    job = job_row(studio, owner, job_id)
    run = run_files(studio, job_id)
    steps = [{k: v for k, v in m.items() if k not in DROPPED} for m in run.steps]
    return {"status": job["status"], "total_steps": total_steps(studio, job, run),
            "steps": [{"grad_norm": None, "tokens_per_s": None, **m} for m in steps if "loss" in m],
            "validation": [{"step": m["step"], **{k: v for k, v in m.items() if k.startswith("val_")}}
                           for m in steps if "val_loss" in m],
            "diagnoses": [{"step": f.get("step"), "level": f.get("severity", "warning"), "code": f.get("code"),
                           "message": f.get("message", ""), "action": f.get("action")} for f in run.findings],
            "config": job["config"]}


def _better(name: str) -> str:
    return "lower" if any(word in name for word in LOWER_IS_BETTER) else "higher"


def evaluation(studio: Studio, owner: str, job_id: str, body=None, query=None) -> dict:
    """GET /v1/tuneforge/jobs/{id}/evaluation: eval_before.json and eval_after.json, their numbers side by side."""
    job_row(studio, owner, job_id)
    run = run_files(studio, job_id)
    before, after = run.before or {}, run.after or {}
    names = [k for k in dict.fromkeys([*EVAL_KEYS, *before, *after]) if k not in SKIPPED and any(
        isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in (before, after))]
    return {"before": run.before, "after": run.after,
            "rows": [{"name": k, "before": before.get(k), "after": after.get(k), "better": _better(k)} for k in names]}


def _shown_config(job: dict) -> dict:
    """The job's whole config, defaults included, with its files named by id."""
    full = config_to_dict(config_from_dict(job["config"], f"job {job['id']}"))
    for key in ("datasets", "validation", "output_dir"):
        full.pop(key, None)
    request = job["request"]
    return {**full, "training_file": request["training_file"], "validation_file": request.get("validation_file")}


def compare(studio: Studio, owner: str, body=None, query: dict | None = None) -> dict:
    """GET /v1/tuneforge/compare?jobs=ID1,ID2: the config keys that differ, and the loss curves to overlay."""
    ids = [i for i in (query or {}).get("jobs", "").split(",") if i]
    if len(ids) < 2 or len(ids) > 10:
        raise ApiError(400, "jobs: give 2 to 10 job ids separated by commas, e.g. ?jobs=ftjob-a,ftjob-b",
                       param="jobs")
    jobs = [job_row(studio, owner, i) for i in ids]
    flat = [flatten(_shown_config(job)) for job in jobs]
    return {"jobs": [{"id": job["id"], "fine_tuned_model": job["fine_tuned_model"], "status": job["status"]}
                     for job in jobs],
            "config_diff": [{"key": key, "values": [f.get(key) for f in flat]}
                            for key, _ in differing(flat, skip=NOISE_KEYS)],
            "curves": {job["id"]: [{"step": m["step"], "loss": m["loss"]} for m in run_files(studio, job["id"]).steps
                                   if "loss" in m] for job in jobs}}
