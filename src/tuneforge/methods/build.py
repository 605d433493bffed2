"""A config's objective, built from its method's row of facts: no branch on the method."""

from __future__ import annotations


from tuneforge.fast import FastPath
from tuneforge.methods.facts import function_at, method_facts
from tuneforge.methods.objective import Objective, Runtime


def build_objective(cfg, data, pad_id: int, reference=None, fast: FastPath | None = None, **run) -> Objective:
    """The objective of the config's method, taking the resolved fast path `fast` (tuneforge.fast.resolve; every
    objective has the plain one by default); `run` fills the Runtime (methods/objective.py).

    The class is imported by the path its row names, so a new method is its module and one row."""
    facts = method_facts(cfg)
    kind = function_at(facts.objective)
    objective = kind.build(getattr(cfg, facts.name, None), data, pad_id, reference, Runtime(cfg=cfg, **run))
    if fast is not None:
        objective.fast = fast
    return objective
