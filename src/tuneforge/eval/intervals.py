"""95% intervals, so that "EM 0.62 -> 0.65 on 60 examples" is not read as a win.

Rates (every score 0 or 1) get Wilson's interval; means and every before/after difference get a paired
bootstrap over the examples with a fixed seed, so the same files give the same interval.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000
SEED = 0


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (sensible at 0/n and n/n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half)


def bootstrap_mean(scores: list[float], seed: int = SEED, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return (float(lo), float(hi))


def summarise(scores: list[float], rate: bool | None = None) -> dict:
    """{value, n, ci95, rate}: the mean with Wilson's interval for a rate (every score 0 or 1; `rate` None: judged
    from the scores), the bootstrap's for other means."""
    n = len(scores)
    value = sum(scores) / n if n else math.nan
    if rate is None:
        rate = n > 0 and all(s in (0.0, 1.0) for s in scores)
    lo, hi = wilson(sum(scores), n) if rate else bootstrap_mean(scores)
    return {"value": value, "n": n, "ci95": [lo, hi], "rate": rate}


def paired_difference(before: list[float], after: list[float], seed: int = SEED,
                      samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """after - before on the same examples, with a paired bootstrap 95% interval; `significant` when it excludes 0."""
    if len(before) != len(after):
        raise ValueError(f"paired scores differ in length ({len(before)} before, {len(after)} after)")
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if d.size == 0:
        return {"difference": math.nan, "n": 0, "ci95": [math.nan, math.nan], "significant": False}
    lo, hi = bootstrap_mean(d.tolist(), seed, samples)
    return {"difference": float(d.mean()), "n": int(d.size), "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}
