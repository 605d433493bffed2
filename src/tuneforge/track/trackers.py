"""Metric back-ends behind one small interface: jsonl (always on), TensorBoard, MLflow, W&B.

The loop calls `Trackers` only. Each back-end gets the run's config and facts at the start, every
step's numbers, every diagnosis and the final facts and artefact paths at the end. A back-end
that raises (server gone, disk full) is reported once and dropped: training never dies because
a tracker did.
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from tuneforge.errors import ConfigError
from tuneforge.track.metrics import MetricsLog, complete_lines

# The package each back-end imports, and the extra that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class Tracker(Protocol):
    name: str

    def start(self, config: dict, facts: dict) -> None: ...

    def log(self, step: int, record: dict) -> None: ...

    def finding(self, step: int, finding: dict) -> None: ...

    def rewind(self, step: int) -> None: ...

    def finish(self, facts: dict, status: str) -> None: ...


def require_packages(names: list[str]) -> None:
    """A clear config error before any model is loaded when a chosen back-end is not installed."""
    for name in names:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            module, extra = PACKAGES[name]
            raise ConfigError(f"track: {name} needs the `{module}` package, which is not installed; "
                              f"pip install 'tuneforge[{extra}]', or remove {name} from track.to")


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def loggable(record: dict) -> dict:
    """The record as it may be logged: a step with no trained token has no loss (never 0.0, R-DATA-3);
    NaN and inf become None, since JSON has no such numbers and a tracker would plot them as 0."""
    out = _finite_or_none(record)
    if out.get("trained_tokens") == 0 and "loss" in out:
        out["loss"] = None
    return out


def scalars(record: dict) -> dict[str, float]:
    """The numbers among a record's values, for back-ends that plot scalars only."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def summary_metrics(facts: dict) -> dict[str, float]:
    """A finished run's headline numbers for the trackers' summaries: final/<metric>, and each evaluation-suite
    row as eval/<metric>/before, /after and /difference (lm-eval's as eval/<task>/<metric>/before and /after)."""
    out = {f"final/{k}": v for k, v in scalars(facts.get("final_metrics") or {}).items()}
    comparison = facts.get("evaluation") or {}
    for name, row in (comparison.get("suite") or {}).items():
        out.update(scalars({f"eval/{name}/{k}": row.get(k) for k in ("before", "after", "difference")}))
    for when, tasks in (comparison.get("lm_eval") or {}).items():
        for task, metrics in (tasks or {}).items():
            out.update(scalars({f"eval/{task}/{m}/{when}": v for m, v in metrics.items()}))
    if comparison.get("forgetting"):
        f = comparison["forgetting"]
        out.update(scalars({f"eval/general_perplexity/{k}": f[k] for k in ("before", "after")}))
    judge = facts.get("judge") or {}
    out.update(scalars({f"eval/judge/{k}": v["rate"] for k, v in (judge.get("rates") or {}).items()}))
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}: hyper-parameters as flat keys, lists kept as JSON text."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


class JsonlTracker:
    """metrics.jsonl: every record, whole (example ids and hardest examples included)."""

    name = "jsonl"

    def __init__(self, run_dir: Path, resume_from_step: int | None, warn: Callable[[str], None] | None = None):
        self.run_dir, self.warn = run_dir, warn
        self.log_file = MetricsLog(run_dir / "metrics.jsonl", resume_from_step, warn)
        self.findings_path = run_dir / "diagnosis.jsonl"
        if resume_from_step is None:
            self.findings_path.write_text("")
        elif self.findings_path.is_file():  # appended to again: first drop a torn last line
            kept = complete_lines(self.findings_path, warn)
            self.findings_path.write_text("".join(ln + "\n" for ln, _ in kept))

    def start(self, config: dict, facts: dict) -> None:
        """run_started.json: the config and facts of a run that may never reach its run.json."""
        tmp = self.run_dir / "run_started.json.tmp"
        tmp.write_text(json.dumps({**facts, "config": config}, indent=1, default=str) + "\n")
        os.replace(tmp, self.run_dir / "run_started.json")

    def log(self, step: int, record: dict) -> None:
        self.log_file.write(record)

    def finding(self, step: int, finding: dict) -> None:
        with open(self.findings_path, "a") as f:
            f.write(json.dumps({"step": step, **finding}, default=str) + "\n")

    def rewind(self, step: int) -> None:
        self.log_file.close()
        self.log_file = MetricsLog(self.run_dir / "metrics.jsonl", step, self.warn)

    def finish(self, facts: dict, status: str) -> None:
        self.log_file.close()


class TensorBoardTracker:
    """Event files in <output_dir>/tensorboard: scalars per step, config and diagnoses as text."""

    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def start(self, config: dict, facts: dict) -> None:
        self.writer.add_text("config", _code_block(config), 0)
        self.writer.add_text("facts", _code_block(facts), 0)

    def log(self, step: int, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def finding(self, step: int, finding: dict) -> None:
        self.writer.add_text(f"diagnosis/{finding['code']}", finding["message"], step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        pass  # TensorBoard shows the newest value of a repeated step

    def finish(self, facts: dict, status: str) -> None:
        params = {k: v for k, v in flatten(facts.get("config", {})).items() if isinstance(v, (int, float, str, bool))}
        finals = summary_metrics(facts)
        if params and finals:
            self.writer.add_hparams(params, finals, run_name=".")
        self.writer.add_text("facts", _code_block({**facts, "status": status}), facts.get("steps", 0))
        self.writer.close()


class MlflowTracker:
    """An MLflow run through MLflow's own client: params (the flat config), metrics, facts as tags.

    Metrics are written asynchronously (a SQLite write costs ~13 ms, most of a small model's step
    budget); every DRAIN_EVERY steps and at the end the loop waits for them, so a failing store is
    still reported within that many steps.
    """

    name = "mlflow"
    DRAIN_EVERY = 50

    def __init__(self, run_dir: Path, uri: str | None, experiment: str, run_name: str, run_id: str | None = None):
        # MLflow sends usage telemetry unless told not to: nothing leaves the machine but what the user points at.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_mlflow_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.pending: list = []
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"output_dir": str(run_dir)}).info.run_id

    def start(self, config: dict, facts: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self._tags(facts, "facts.")

    def log(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars(record).items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        if len(self.pending) >= self.DRAIN_EVERY:
            self._drain()

    def _drain(self) -> None:
        """Wait for the metrics written in the background; raises what the store raised."""
        pending, self.pending = self.pending, []
        for op in pending:
            op.wait()

    def finding(self, step: int, finding: dict) -> None:
        self.client.set_tag(self.run_id, f"diagnosis.{step}.{finding['code']}", finding["message"][:5000])

    def rewind(self, step: int) -> None:
        pass  # MLflow keeps every value of a step; the later one is the newest

    def finish(self, facts: dict, status: str) -> None:
        from mlflow.entities import Metric

        self._drain()
        now, step = int(time.time() * 1000), facts.get("steps") or 0
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in summary_metrics(facts).items()]
        for i in range(0, len(metrics), 100):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 100])
        self._tags({k: v for k, v in facts.items() if k != "config"}, "facts.")
        self.client.set_terminated(self.run_id, status=status)

    def _tags(self, facts: dict, prefix: str) -> None:
        for key, value in flatten(facts).items():
            self.client.set_tag(self.run_id, _mlflow_key(prefix + key), str(value)[:5000])


class WandbTracker:
    """A W&B run: offline in <output_dir>/wandb unless the user is logged in (or asks for online)."""

    name = "wandb"

    def __init__(self, run_dir: Path, mode: str, project: str, run_name: str, run_id: str | None = None):
        import wandb

        self.mode = wandb_mode(mode)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=self.mode, id=run_id,
                              resume="allow" if run_id else None, settings=wandb.Settings(silent=True, console="off"))
        self.run_id = self.run.id
        self.findings: list[str] = []

    def start(self, config: dict, facts: dict) -> None:
        self.run.config.update(config, allow_val_change=True)
        self.run.summary.update({"facts": facts})

    def log(self, step: int, record: dict) -> None:
        self.run.log(scalars(record), step=step)

    def finding(self, step: int, finding: dict) -> None:
        self.findings.append(f"step {step}: {finding['message']}")
        self.run.summary["diagnoses"] = self.findings

    def rewind(self, step: int) -> None:
        pass  # W&B refuses steps below the newest; the steps after a roll-back are logged under new numbers

    def finish(self, facts: dict, status: str) -> None:
        self.run.summary.update({"facts": {k: v for k, v in facts.items() if k != "config"}, "status": status,
                                 **summary_metrics(facts)})
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def wandb_mode(mode: str) -> str:
    """online only when asked or when a key is at hand (WANDB_MODE, WANDB_API_KEY, ~/.netrc); else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def artefacts(run_dir: Path) -> dict[str, str]:
    """Paths of what a finished run leaves, for the trackers' final facts."""
    names = ("final", "checkpoints", "metrics.jsonl", "diagnosis.jsonl", "run.json", "eval_before.json",
             "eval_after.json", "rejected.jsonl", "tensorboard")
    return {name: str(run_dir / name) for name in names if (run_dir / name).exists()}


def default_mlflow_uri(run_dir: Path) -> str:
    """One SQLite store beside the run folders, so `mlflow ui` shows every run of a project together."""
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


def _mlflow_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _code_block(data: dict) -> str:
    """Markdown code block: TensorBoard renders text as Markdown."""
    return "```\n" + json.dumps(data, indent=1, default=str) + "\n```"


@dataclass
class Trackers:
    """The fan-out the loop talks to. `warn` reports a failing back-end once; it is then dropped."""

    backends: list
    warn: Callable[[str], None]
    seconds: float = 0.0  # time spent in the back-ends: the tracking overhead
    failed: list[str] = field(default_factory=list)

    def start(self, config: dict, facts: dict) -> None:
        self._each("start", config, facts)

    def log(self, record: dict) -> None:
        record = loggable(record)
        self._each("log", record["step"], record)

    def finding(self, step: int, finding: dict) -> None:
        self._each("finding", step, finding)

    def rewind(self, step: int) -> None:
        self._each("rewind", step)

    def finish(self, facts: dict, status: str) -> None:
        self._each("finish", facts, status)

    def _each(self, method: str, *args) -> None:
        t0 = time.perf_counter()
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as err:  # a tracker must never end the run
                self.backends.remove(backend)
                self.failed.append(backend.name)
                self.warn(f"tracker {backend.name} failed ({type(err).__name__}: {err}); "
                          "the run goes on without it")
        self.seconds += time.perf_counter() - t0


def open_backend(name: str, cfg, run_dir: Path, resume_id: str | None):
    """One back-end; `resume_id` continues the MLflow or W&B run of an interrupted run (--resume)."""
    track = cfg.track
    run_name = track.run_name or run_dir.name
    if name == "tensorboard":
        return TensorBoardTracker(run_dir)
    if name == "mlflow":
        return MlflowTracker(run_dir, track.mlflow_uri, track.project, run_name, resume_id)
    return WandbTracker(run_dir, track.wandb_mode, track.project, run_name, resume_id)


def build_trackers(cfg, run_dir: Path, resume_from_step: int | None, warn: Callable[[str], None]) -> Trackers:
    """jsonl first and always; then each configured back-end. One that cannot even open is reported
    like one that fails later, and the run goes on."""
    trackers = Trackers([JsonlTracker(run_dir, resume_from_step, warn)], warn)
    ids_path = run_dir / "trackers.json"
    ids = json.loads(ids_path.read_text()) if resume_from_step is not None and ids_path.is_file() else {}
    for name in dict.fromkeys(cfg.track.to):
        if name == "jsonl":
            continue
        try:
            backend = open_backend(name, cfg, run_dir, ids.get(name))
        except Exception as err:
            trackers.failed.append(name)
            warn(f"tracker {name} could not start ({type(err).__name__}: {err}); the run goes on without it")
            continue
        trackers.backends.append(backend)
        if getattr(backend, "run_id", None):
            ids[name] = backend.run_id
    ids_path.write_text(json.dumps(ids) + "\n")
    return trackers
