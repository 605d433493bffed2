"""Optional evaluation packages (rouge-score, sacrebleu, bert-score, lm-eval): imported when a suite entry asks."""

from __future__ import annotations

import importlib
from types import ModuleType

from tuneforge.errors import ConfigError

INSTALL = "pip install 'tuneforge[eval]'"


def need(module: str, entry: str) -> ModuleType:
    """The module, or a one-line error naming the suite entry that wants it and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"evaluation.suite: {entry} needs the {module.split('.')[0]} package; {INSTALL}") from None
