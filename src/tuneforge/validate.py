"""`tuneforge validate`: every file, folder and model a config names, checked without loading a model.

Each problem is the error `train` would raise a little later, so a config called valid does not fail
on a path once the run starts.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.config import Config
from tuneforge.data.images import is_image_folder
from tuneforge.data.readers import iter_rows
from tuneforge.data.template import resolve_chat_template
from tuneforge.errors import TuneforgeError
from tuneforge.models.init import locate_model


def data_files(cfg: Config) -> list[tuple[str, str]]:
    """(key, path) of every training and validation file a config names."""
    paths = [(f"datasets[{i}].path", ds.path) for i, ds in enumerate(cfg.datasets)]
    if cfg.validation and cfg.validation.path:
        paths.append(("validation.path", cfg.validation.path))
    return paths


def check_data_files(cfg: Config) -> None:
    """The first missing, unreadable or empty data file as a DataError, from at most its first record:
    train asks before it reads (or converts) a model."""
    for _, path in data_files(cfg):
        if not is_image_folder(path):
            next(iter_rows(path), None)


def code_files(cfg: Config) -> list[tuple[str, str]]:
    """(key, path) of every file.py a GRPO reward or environment names (module:function names none)."""
    if cfg.grpo is None:
        return []
    functions = [(f"grpo.rewards[{i}].function", r.function) for i, r in enumerate(cfg.grpo.rewards)]
    functions += [("grpo.environment", cfg.grpo.environment)] if cfg.grpo.environment else []
    return [(key, name.rpartition(":")[0]) for key, name in functions if ".py:" in name]


def _open_data(path: str) -> None:
    """What can be known without reading the data: its kind, and a folder's layout (its first batch is read)."""
    if is_image_folder(path):
        return
    rows = iter_rows(path)
    if Path(path).is_dir():
        next(rows, None)


def path_problems(cfg: Config) -> list[str]:
    """One line per key whose file, folder or model cannot be used; empty when all can."""
    problems = []

    def attempt(prefix: str, check, *args) -> None:
        try:
            check(*args)
        except TuneforgeError as err:
            problems.append(f"{prefix}{err}")

    attempt("", locate_model, cfg)
    if cfg.chat_template != "auto":  # the model's own template is checked with its tokenizer, by train
        attempt("", resolve_chat_template, None, cfg.chat_template)
    for key, path in data_files(cfg):
        if Path(path).exists():
            attempt(f"{key}: ", _open_data, path)
        else:
            problems.append(f"{key}: {path} not found")
    problems += [f"{key}: {path} not found" for key, path in code_files(cfg) if not Path(path).is_file()]
    return problems
