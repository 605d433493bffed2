"""Methods as data: one row of facts and one Objective per method, and nothing else reads the method's name."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tuneforge.config import Method, Task, config_from_dict
from tuneforge.errors import ConfigError
from tuneforge.methods.facts import METHODS, method_facts
from tuneforge.methods.objective import Objective

SRC = Path(__file__).resolve().parent.parent / "src" / "tuneforge"


def _config(tmp_path, **keys):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    return config_from_dict({"datasets": [{"path": str(data)}], **keys}, base=tmp_path)


def test_every_method_is_one_row_and_one_objective():
    tasks = set(typing.get_args(Task)) - {"causal_lm"}  # a task other than causal_lm is a row of its own
    assert set(METHODS) == set(typing.get_args(Method)) | tasks
    members = set(typing.get_type_hints(Objective)) | {n for n in vars(Objective) if not n.startswith("_")}
    for facts in METHODS.values():
        module, name = facts.objective.split(":")
        kind = getattr(importlib.import_module(module), name)
        assert not [m for m in members if not hasattr(kind, m)], facts.name
        assert callable(kind.build), facts.name  # how methods/build.py makes it from a config


def test_only_the_schema_and_the_facts_read_the_method_name():
    """The loop, data, plan, fast, eval and diagnosis read a method's facts, so a new method needs no branch there."""
    reads = re.compile(r"(?<![\w.])(cfg|config|self\.cfg|run\.config)\.method\b")
    allowed = {SRC / "config.py", SRC / "methods" / "facts.py"}
    found = [f"{f.relative_to(SRC)}:{i}" for f in sorted(SRC.rglob("*.py")) if f not in allowed
             for i, line in enumerate(f.read_text().splitlines(), 1) if reads.search(line)]
    assert found == []


def test_the_facts_and_the_objective_interface_import_no_torch():
    """plan/ and data/ read the facts; `tuneforge plan` must not pay for importing torch."""
    code = ("import sys, tuneforge.methods.facts, tuneforge.methods.objective; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("keys, rows, reference", [
    ({"method": "sft"}, 1, ""),
    ({"method": "dpo"}, 2, "model"),
    ({"method": "dpo", "dpo": {"reference_free": True}}, 2, "uniform"),
    ({"method": "dpo", "dpo": {"precompute_reference": True}}, 2, "precomputed"),
    ({"method": "kto"}, 1, "model"),
    ({"method": "grpo", "grpo": {"generations": 6, "rewards": [{"function": "exact_match"}]}}, 6, ""),
    ({"method": "grpo", "grpo": {"generations": 3, "beta": 0.05, "rewards": [{"function": "exact_match"}]}}, 3, "model"),
])
def test_a_methods_config_section_sets_its_rows_and_reference(tmp_path, keys, rows, reference):
    """Rows per example size plan's estimate; the reference decides whether a second model is run or loaded."""
    facts = method_facts(_config(tmp_path, **keys))
    assert (facts.rows, facts.reference) == (rows, reference)


def test_a_task_other_than_causal_lm_refuses_a_method(tmp_path):
    """`method` picks the objective of a causal LM; a classifier given method: dpo would silently ignore it."""
    with pytest.raises(ConfigError, match="method: dpo trains a causal language model, but task is embedding"):
        _config(tmp_path, task="embedding", method="dpo")


def test_the_reward_model_trains_a_score_head(tmp_path):
    facts = method_facts(_config(tmp_path, method="reward"))
    assert (facts.model_head, facts.peft_task, facts.records) == ("score", "SEQ_CLS", ("preference",))


EXACT = {"rewards": [{"function": "exact_match"}]}


@pytest.mark.parametrize("keys, refused", [
    ({"method": "dpo"}, True),
    ({"method": "dpo", "dpo": {"precompute_reference": True}}, False),
    ({"method": "dpo", "dpo": {"reference_free": True}}, False),
    ({"method": "kto"}, True),
    ({"method": "grpo", "grpo": {"beta": 0.05, **EXACT}}, True),
    ({"method": "grpo", "grpo": EXACT}, False),
    ({"method": "sft"}, False),
])
def test_fsdp_refuses_full_fine_tuning_against_a_frozen_reference(tmp_path, keys, refused):
    """A frozen copy of the base is not sharded: the config says so before any model is loaded."""
    full = {"adapter": "full", "micro_batch_size": 2, "distributed": {"strategy": "fsdp"}}
    if refused:
        with pytest.raises(ConfigError, match="frozen copy of the base model"):
            _config(tmp_path, **full, **keys)
    else:
        _config(tmp_path, **full, **keys)
