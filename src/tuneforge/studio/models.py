"""The models a studio serves: every succeeded LoRA job of one language model shares one engine (the base loaded
once, each job's adapter beside the others, the base itself chattable with every adapter off), loaded at the
first request that names one of them; a job of that base that succeeds later has its adapter added to the live
engine. A full fine-tune, and a job that trained a new head with its adapter (a classifier), gets an engine of
its own: its head is not the base's."""

from __future__ import annotations

import threading

from tuneforge.methods.facts import METHODS
from tuneforge.models.resolve import resolve_base_model
from tuneforge.serve.engine import Engine, Limits, load_engine
from tuneforge.serve.protocol import ApiError
from tuneforge.studio.jobs import base_name
from tuneforge.studio.store import Store


class Models:
    def __init__(self, store: Store, limits: Limits = Limits(), device: str = "auto"):
        self.store, self.limits, self.device = store, limits, device
        self.engines: dict[str, Engine] = {}  # group -> its engine
        self.lock = threading.Lock()

    def ids(self, owner: str) -> list[str]:
        """The owner's fine-tuned models, then the base of each of their LoRA ones."""
        return list(self._groups(owner))

    def _groups(self, owner: str) -> dict[str, str]:
        """Each model id this owner may call -> the group of the engine that serves it."""
        mine = self.store.succeeded(owner)
        groups = {job["fine_tuned_model"]: _group(job) for job in mine}
        groups.update({base_name(job["model"]): _group(job) for job in mine if _shares_base(job)})
        return groups

    def engine_for(self, owner: str, model_id: object) -> Engine:
        """The engine serving `model_id`, which must be one of this owner's models (else 404); a job of its
        group that succeeded since the engine was loaded has its adapter added first."""
        groups = self._groups(owner)
        if model_id not in groups:
            listed = ", ".join(groups) or "none yet"
            raise ApiError(404, f"model: {model_id!r} is not one of your models ({listed}); "
                           "GET /v1/models lists them", param="model", code="model_not_found")
        group = groups[model_id]
        members = [job for job in self.store.succeeded() if _group(job) == group]
        with self.lock:
            engine = self.engines.get(group)
            if engine is None:
                engine = self.engines[group] = self._load(members)
            for job in members:
                if job["fine_tuned_model"] not in engine.model_ids():
                    engine.add_adapter(job["fine_tuned_model"], self.store.run_dir(job["id"]))
            return engine

    def _load(self, members: list[dict]) -> Engine:
        runs = {job["fine_tuned_model"]: self.store.run_dir(job["id"]) for job in members}
        if not _shares_base(members[0]):
            [(name, run)] = runs.items()
            engine = load_engine(run, device=self.device, limits=self.limits)
            engine.default_id = name
            return engine
        folder, _ = resolve_base_model(members[0]["config"]["base_model"])
        engine = load_engine(folder, adapters=runs, device=self.device, limits=self.limits)
        engine.default_id = engine.base_id = base_name(members[0]["model"])  # as the jobs named it
        return engine

    def close(self) -> None:
        """Stop every generation at its next token (the server is closing)."""
        with self.lock:
            for engine in self.engines.values():
                engine.closing.set()


def _shares_base(job: dict) -> bool:
    """A LoRA adapter on a language model, which an engine of its base can serve beside others."""
    config = job["config"]
    task = config.get("task", "causal_lm")
    row = config.get("method", "sft") if task == "causal_lm" else task
    return config.get("adapter", "lora") != "full" and METHODS[row].model_head == "causal_lm"


def _group(job: dict) -> str:
    return f"base:{job['config']['base_model']}" if _shares_base(job) else f"job:{job['id']}"
