"""Before against after: every suite metric's difference with its sample size and 95% interval, and the
forgetting check; what the console, run.json and the report show."""

from __future__ import annotations

from tuneforge.eval.forgetting import forgetting_check
from tuneforge.eval.intervals import paired_difference


def compare(before: dict | None, after: dict | None, spec) -> dict:
    """{suite: {name: {before, after, difference, n, ci95, significant}}, forgetting: {...}} ({} without both)."""
    if not before or not after:
        return {}
    out: dict = {"suite": {}}
    for name, a in (after.get("suite") or {}).items():
        b = (before.get("suite") or {}).get(name)
        if b is None or len(b["scores"]) != len(a["scores"]):
            continue
        out["suite"][name] = {"rate": a["rate"], "before": b["value"], "after": a["value"], "before_ci95": b["ci95"],
                              "after_ci95": a["ci95"], **paired_difference(b["scores"], a["scores"])}
    forgetting = forgetting_check(before, after, spec.forgetting.threshold) if spec.forgetting else None
    if forgetting:
        out["forgetting"] = forgetting
    return out


def headline(result: dict | None) -> dict | None:
    """An evaluation without its bulky parts (generated samples, per-example scores), for run.json."""
    if result is None:
        return None
    out = {k: v for k, v in result.items() if k != "samples"}
    if "suite" in out:
        out["suite"] = {k: {x: y for x, y in v.items() if x != "scores"} for k, v in out["suite"].items()}
    return out

