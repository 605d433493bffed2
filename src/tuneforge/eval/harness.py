"""lm-evaluation-harness tasks scored through an OpenAI-compatible URL (lm-eval's local-completions model);
serve/harness.py puts base and tuned behind `tuneforge serve` for them.

Nothing is downloaded: the task YAMLs under `include_path` must read local files (`dataset_path: json` with
`data_files`), checked before lm-eval starts; any other task whose data is not on disk fails with its name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import yaml

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.eval.needs import need

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _files(data_files) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _files(v)]
    return [f for v in data_files or [] for f in _files(v)]


def local_tasks(include_path: str | None) -> dict[str, tuple[Path, dict]]:
    """Task name -> (YAML file, its contents) for the task YAMLs under `include_path`."""
    found = {}
    for path in sorted(Path(include_path).rglob("*.yaml")) if include_path else []:
        with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # lm-eval's !function tags
            if isinstance(doc, dict) and isinstance(doc.get("task"), str):
                found[doc["task"]] = (path, doc)
    return found


def check_task_data(include_path: str | None, tasks: list[str]) -> None:
    """Every asked task defined under `include_path` reads files that exist; a clear error naming them if not."""
    for name, (path, doc) in local_tasks(include_path).items():
        if name not in tasks:
            continue
        source = doc.get("dataset_path", "")
        files = _files((doc.get("dataset_kwargs") or {}).get("data_files"))
        if source not in LOCAL_BUILDERS and not Path(source).is_dir():
            raise ConfigError(f"{path}: task {name} reads dataset_path {source!r}, which is not on disk; "
                              "nothing is downloaded at run time: use dataset_path: json with "
                              "dataset_kwargs.data_files naming local files")
        missing = [f for f in files if not Path(f).exists()]
        if missing or (source in LOCAL_BUILDERS and not files):
            raise ConfigError(f"{path}: task {name} needs the data files {missing or '(none named)'}, "
                              "which are not on disk; give dataset_kwargs.data_files as paths that exist "
                              "(relative to the folder tuneforge eval runs in)")


def run_tasks(spec, url: str, model_id: str, tokenizer: str | Path) -> dict:
    """{task: {metric: value}} for one served model id. Scoring tasks (log-likelihoods) go through lm-eval's
    local-completions model at `url`/completions; generation tasks (output_type: generate_until in a task YAML
    under include_path) through local-chat-completions at `url`/chat/completions, in the model's chat template,
    as a tuned chat model is used."""
    lm_eval = need("lm_eval", "lm_eval")
    need("tenacity", "lm_eval")  # lm-eval's API models need it (lm-eval[api])
    local = local_tasks(spec.include_path)
    # lm-eval's own task list (thousands of YAMLs, slow to index) only when a task is not the user's.
    tasks = need("lm_eval.tasks", "lm_eval").TaskManager(include_path=spec.include_path,
                                                         include_defaults=bool(set(spec.tasks) - set(local)))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chat = [t for t in spec.tasks if t in local and local[t][1].get("output_type") == "generate_until"]
    scored = [t for t in spec.tasks if t not in chat]
    runs = [(scored, "local-completions", {"base_url": url + "/completions", "tokenizer_backend": "huggingface",
                                           "tokenizer": str(tokenizer)}, {}),
            (chat, "local-chat-completions", {"base_url": url + "/chat/completions"}, {"apply_chat_template": True})]
    results: dict = {}
    for names, model, args, extra in runs:
        if not names:
            continue
        try:
            out = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=tasks, limit=spec.limit, batch_size=1,
                                          model_args={**args, "model": model_id, "max_retries": 1}, **extra)
        except Exception as err:  # lm-eval raises many kinds; the user needs the task and the cause
            raise TuneforgeError(f"evaluation.lm_eval: lm-eval failed on tasks {', '.join(names)}: "
                                 f"{type(err).__name__}: {err}; a task whose data is not on disk needs a local copy "
                                 "(dataset_path: json)") from None
        results.update((out or {}).get("results", {}))
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "sample_len"}
            for task, metrics in results.items()}
