"""Before against after: every suite metric's difference with its sample size and 95% interval, and the
forgetting check; what the console, run.json and the report show."""

from __future__ import annotations

from tuneforge.errors import ConfigError
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


# Held-out numbers without per-example scores: shown side by side as values, with no interval.
PLAIN_KEYS = ("val_loss", "perplexity", "general_perplexity")


def side_by_side(results: dict[str, dict]) -> dict:
    """{models, rows: {metric: {model: {value, n, ci95[, difference, diff_ci95, significant]}}}}: every model's
    numbers in one table; a suite metric also gets its paired difference from the first model (the base) with a
    95% interval, when both answered the same held-out records."""
    names = [n for n, r in results.items() if r]
    if not names:
        return {}
    first = results[names[0]]
    rows: dict[str, dict] = {}
    for key in PLAIN_KEYS:
        if any(key in results[n] for n in names):
            rows[key] = {n: {"value": results[n].get(key)} for n in names}
    for metric in dict.fromkeys(m for n in names for m in results[n].get("suite") or {}):
        rows[metric] = {}
        for n in names:
            s = (results[n].get("suite") or {}).get(metric)
            if s is None:
                continue
            cell = {"value": s["value"], "n": s["n"], "ci95": s["ci95"], "rate": s["rate"]}
            base = (first.get("suite") or {}).get(metric)
            if n != names[0] and base is not None and same_records(first, results[n]):
                d = paired_difference(base["scores"], s["scores"])
                cell.update(difference=d["difference"], diff_ci95=d["ci95"], significant=d["significant"])
            rows[metric][n] = cell
    return {"models": names, "rows": rows}


def same_records(a: dict, b: dict) -> bool:
    """Both answered the same held-out records in the same order (another tokenizer may drop a long one)."""
    return [s.get("where") for s in a.get("samples", [])] == [s.get("where") for s in b.get("samples", [])]


def metric_value(result: dict, metric: str) -> float:
    """A named number of one evaluation: a suite entry's mean, or a held-out number such as val_loss."""
    suite = result.get("suite") or {}
    value = suite[metric]["value"] if metric in suite else result.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        have = [*suite, *(k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool))]
        raise ConfigError(f"evaluation.select_best.metric: this run's evaluation has no {metric!r}; it has "
                          f"{', '.join(have)}")
    return float(value)
