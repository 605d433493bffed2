"""Reward functions for GRPO: built-ins and user functions named `module:function` in the config.

Named `module:function` (importable from the working folder) or `file.py:function` (a file
relative to the config). Signature (the same for all): `fn(prompts, completions, **fields) -> list[float]`, where
`prompts` and `completions` are lists of strings (the completion without its end-of-turn
token) and `fields` holds every other column of the data file as a list aligned with them
(e.g. `answer`). Arguments given under `args:` in the config are bound by keyword.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

from tuneforge.errors import ConfigError, TuneforgeError


class RewardError(TuneforgeError):
    pass


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def exact_match(prompts: list[str], completions: list[str], field: str = "answer", **fields) -> list[float]:
    """1.0 when the completion equals the record's reference (case and spacing aside), else 0.0."""
    if field not in fields:
        raise KeyError(f"the data has no {field!r} column to compare with (columns: {', '.join(fields) or 'none'})")
    return [float(_norm(c) == _norm(ref)) for c, ref in zip(completions, fields[field])]


def regex(prompts: list[str], completions: list[str], pattern: str = "", full: bool = True, **_) -> list[float]:
    """1.0 when the completion matches `pattern` (the whole of it when `full`), else 0.0."""
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [float(match(c.strip()) is not None) for c in completions]


def json_valid(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when the completion parses as JSON, else 0.0."""
    out = []
    for c in completions:
        try:
            json.loads(c)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def length_penalty(prompts: list[str], completions: list[str], max_chars: int = 200, **_) -> list[float]:
    """0 up to `max_chars`, then minus the excess as a share of `max_chars`."""
    return [-max(0, len(c) - max_chars) / max_chars for c in completions]


BUILTIN: dict[str, Callable] = {"exact_match": exact_match, "regex": regex, "json_valid": json_valid,
                                "length_penalty": length_penalty}


def load_reward(name: str, args: dict, base: Path | None = None) -> Callable:
    """A built-in by name or `module:function`, with `args` bound; modules are looked up beside the config too."""
    if name in BUILTIN:
        fn = BUILTIN[name]
    elif ":" in name:
        module, _, attr = name.rpartition(":")
        try:
            fn = getattr(_import(module, base), attr)
        except (ImportError, AttributeError, OSError) as err:
            raise ConfigError(f"grpo: cannot load {name!r}: {err}; give module:function importable from the "
                              "working folder or the Python path, or file.py:function") from None
    else:
        raise ConfigError(f"grpo.rewards: unknown function {name!r}; built-ins are {', '.join(BUILTIN)}, "
                          "or give module:function")
    bound = functools.partial(fn, **args) if args else fn
    bound.__name__ = name.split(":")[-1]
    return bound


def _import(module: str, base: Path | None):
    """A module by dotted name (looked up in `base` too), or a .py file by path."""
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        if spec is None or not Path(module).is_file():
            raise ImportError(f"no file {module}")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))
    return importlib.import_module(module)


def score(fn: Callable, prompts: list[str], completions: list[str], fields: dict[str, list]) -> list[float]:
    """Call one reward function and check what it gave back (R-GRPO-1): one finite number per completion."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        values = fn(prompts, completions, **fields)
    except Exception as err:
        raise RewardError(f"reward function {name} raised {type(err).__name__}: {err}\n"
                          f"  on the completion {completions[0]!r} to prompt {prompts[0]!r}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward function {name} returned {got} for {len(completions)} completions; "
                          "it must return one number per completion (a list)")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardError(f"reward function {name} returned {v!r} for completion {i + 1} "
                              f"({completions[i]!r} to prompt {prompts[i]!r}); rewards must be finite numbers")
    return [float(v) for v in values]
