"""The fine-tuned models a studio serves: every succeeded LoRA job of one base shares one engine (the base
loaded once, each job's adapter beside the others), loaded at the first request that names one of them and
loaded again when a new job of that base has succeeded since. A full fine-tune gets an engine of its own."""

from __future__ import annotations

import threading

from tuneforge.models.resolve import resolve_base_model
from tuneforge.serve.engine import Engine, Limits, load_engine
from tuneforge.serve.protocol import ApiError
from tuneforge.studio.store import Store


class Models:
    def __init__(self, store: Store, limits: Limits = Limits(), device: str = "auto"):
        self.store, self.limits, self.device = store, limits, device
        self.engines: dict[str, tuple[tuple[str, ...], Engine]] = {}  # group -> (its job ids, engine)
        self.lock = threading.Lock()

    def ids(self, owner: str) -> list[str]:
        return [job["fine_tuned_model"] for job in self.store.succeeded(owner)]

    def engine_for(self, owner: str, model_id: object) -> Engine:
        """The engine serving `model_id`, which must be one of this owner's fine-tuned models (else 404)."""
        mine = {job["fine_tuned_model"]: job for job in self.store.succeeded(owner)}
        if model_id not in mine:
            listed = ", ".join(mine) or "none yet"
            raise ApiError(404, f"model: {model_id!r} is not one of your fine-tuned models ({listed}); "
                           "GET /v1/models lists them", param="model", code="model_not_found")
        group = _group(mine[model_id])
        members = [job for job in self.store.succeeded() if _group(job) == group]
        ids = tuple(job["id"] for job in members)
        with self.lock:
            held = self.engines.get(group)
            if held is None or held[0] != ids:
                self.engines[group] = (ids, self._load(members))
            return self.engines[group][1]

    def _load(self, members: list[dict]) -> Engine:
        runs = {job["fine_tuned_model"]: self.store.run_dir(job["id"]) for job in members}
        if members[0]["config"].get("adapter", "lora") == "full":
            [(name, run)] = runs.items()
            engine = load_engine(run, device=self.device, limits=self.limits)
            engine.default_id = name
            return engine
        folder, _ = resolve_base_model(members[0]["config"]["base_model"])
        return load_engine(folder, adapters=runs, device=self.device, limits=self.limits)

    def close(self) -> None:
        """Stop every generation at its next token (the server is closing)."""
        with self.lock:
            for _, engine in self.engines.values():
                engine.closing.set()


def _group(job: dict) -> str:
    config = job["config"]
    return f"job:{job['id']}" if config.get("adapter", "lora") == "full" else f"base:{config['base_model']}"
