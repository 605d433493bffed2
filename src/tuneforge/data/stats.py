"""Statistics of tokenized data, from example lengths alone: what max_seq_len cuts, what padding
and packing waste, which examples look wrong. Pure functions of a list or array of lengths."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from tuneforge.errors import TuneforgeError

PERCENTILES = (50, 90, 95, 99)
TRUNCATION = ("drop", "truncate_right", "truncate_left", "error")


def _array(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    x = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if x.size and x.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(x.min())}")
    return x


def length_summary(lengths: Sequence[int] | np.ndarray) -> dict:
    """count, total_tokens, mean, min, p50, p90, p95, p99, max. Percentiles are actual lengths
    (nearest rank): at least p% of the examples are that long or shorter, which is the statement
    needed to choose max_seq_len. All zeros for no examples."""
    x = _array(lengths)
    if not x.size:
        return {"count": 0, "total_tokens": 0, "mean": 0.0, "min": 0,
                **{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    ranks = np.percentile(x, PERCENTILES, method="inverted_cdf")
    return {
        "count": int(x.size),
        "total_tokens": int(x.sum()),
        "mean": float(x.mean()),
        "min": int(x.min()),
        **{f"p{p}": int(v) for p, v in zip(PERCENTILES, ranks)},
        "max": int(x.max()),
    }


def histogram(
    lengths: Sequence[int] | np.ndarray, bins: int = 20, max_len: int | None = None
) -> list[tuple[int, int, int]]:
    """(lo, hi, count) with lo <= length < hi, in at most `bins` bins of one integer width (the
    last may be narrower) from the shortest length to `max_len` (default: the longest). Lengths
    above `max_len` get one extra bin, so nothing is hidden."""
    x = _array(lengths)
    if not x.size:
        return []
    lo = int(x.min())
    top = int(x.max()) if max_len is None else max(int(max_len), lo)
    width = max(1, math.ceil((top - lo + 1) / bins))
    inside = x[x <= top]
    counts = np.bincount((inside - lo) // width, minlength=math.ceil((top - lo + 1) / width))
    out = [(lo + i * width, min(lo + (i + 1) * width, top + 1), int(c)) for i, c in enumerate(counts)]
    over = int((x > top).sum())
    if over:
        out.append((top + 1, int(x.max()) + 1, over))
    return out


def share_over(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> tuple[int, float, int]:
    """(examples longer than max_seq_len, their share, tokens beyond max_seq_len summed)."""
    x = _array(lengths)
    over = x > max_seq_len
    n = int(over.sum())
    return n, (n / x.size if x.size else 0.0), int((x[over] - max_seq_len).sum())


def padding_waste(lengths: Sequence[int] | np.ndarray, micro_batch_size: int, seed: int | None = 0) -> float:
    """Share of positions that are padding when examples are shuffled with `seed` and each
    micro-batch is padded to its longest example. seed=None keeps the given order (for example,
    the order of a length-grouping sampler)."""
    x = _array(lengths)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if seed is not None:
        x = x[np.random.default_rng(seed).permutation(x.size)]
    micro_batch_size = min(micro_batch_size, max(x.size, 1))  # one batch of everything: no room for more rows
    n_batches = -(-x.size // micro_batch_size)
    padded = np.zeros(n_batches * micro_batch_size, dtype=np.int64)
    padded[: x.size] = x
    longest = padded.reshape(n_batches, micro_batch_size).max(axis=1)
    sizes = np.full(n_batches, micro_batch_size)
    if n_batches:
        sizes[-1] = x.size - (n_batches - 1) * micro_batch_size
    positions = int((longest * sizes).sum())
    return 1.0 - int(x.sum()) / positions if positions else 0.0


def pack_first_fit_decreasing(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> int:
    """Number of bins of max_seq_len tokens that first-fit decreasing needs, each length capped
    at max_seq_len. A max-tree over bins finds the first bin with room in O(log n), and bins not
    yet opened count as empty, so the whole packing is O(n log n)."""
    x = np.minimum(_array(lengths), max_seq_len)
    x = np.sort(x[x > 0])[::-1]
    full = int(np.searchsorted(-x, -max_seq_len, side="right"))  # each fills a bin on its own
    rest = x[full:].tolist()
    if not rest:
        return full
    size = 1 << (len(rest) - 1).bit_length()
    room = [max_seq_len] * (2 * size)  # room[node] = the most free space in any bin below node
    used = 0
    for item in rest:
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= item else 2 * node + 1
        room[node] -= item
        used = max(used, node - size + 1)
        node >>= 1
        while node and room[node] != max(room[2 * node], room[2 * node + 1]):
            room[node] = max(room[2 * node], room[2 * node + 1])
            node >>= 1
    return full + used


def packing_waste(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> float:
    """Share of empty positions when examples (each capped at max_seq_len) are packed first-fit
    decreasing into sequences of max_seq_len tokens."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    tokens = int(np.minimum(_array(lengths), max_seq_len).sum())
    bins = pack_first_fit_decreasing(lengths, max_seq_len)
    return 1.0 - tokens / (bins * max_seq_len) if bins else 0.0


def length_outliers(lengths: Sequence[int] | np.ndarray, k: float = 3.0) -> list[int]:
    """Indices whose log-length lies outside median +- k robust sigmas (1.4826 x the median
    absolute deviation; 1.2533 x the mean absolute deviation when more than half are equal).

    Log, because lengths spread by factors: 10x longer and 10x shorter are equally odd. Robust,
    because a mean and standard deviation are pulled by the very outliers sought (one huge example
    inflates the deviation enough to hide itself), while the median ignores up to half the data.
    Nothing is flagged for fewer than 20 lengths: too few to say what is normal."""
    x = _array(lengths)
    if x.size < 20:
        return []
    logs = np.log1p(x.astype(np.float64))
    dev = np.abs(logs - np.median(logs))
    sigma = 1.4826 * np.median(dev)
    if sigma == 0:
        sigma = 1.2533 * np.mean(dev)
    if sigma == 0:
        return []
    return np.flatnonzero(dev > k * sigma).tolist()


def tokens_per_epoch(lengths: Sequence[int] | np.ndarray, max_seq_len: int, truncation: str) -> int:
    """Tokens one epoch trains on under the config's `truncation` policy: `drop` skips longer
    examples, `truncate_*` keeps their first or last max_seq_len tokens, and `error` refuses them."""
    x = _array(lengths)
    if truncation == "drop":
        return int(x[x <= max_seq_len].sum())
    if truncation in ("truncate_right", "truncate_left"):
        return int(np.minimum(x, max_seq_len).sum())
    if truncation == "error":
        n, _, _ = share_over(x, max_seq_len)
        if n:
            raise TuneforgeError(f"{n} examples are longer than max_seq_len {max_seq_len} and "
                                 "truncation is `error`; raise max_seq_len or choose drop | "
                                 "truncate_right | truncate_left.")
        return int(x.sum())
    raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")


def save_histogram_png(
    lengths: Sequence[int] | np.ndarray, path: str | Path, max_seq_len: int | None = None, title: str = ""
) -> Path:
    """Bar chart of the length histogram, with max_seq_len drawn as a line when given. The axis
    ends at the larger of p99 and max_seq_len so a long tail does not squash the chart; longer
    examples share one labelled bar at the end. Drawn on a bare Figure (Agg) rather than pyplot,
    so the caller's plotting backend is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise TuneforgeError("plotting lengths needs matplotlib: pip install matplotlib "
                             "(or pip install 'tuneforge[plots]')") from e
    path = Path(path)
    upper = max(length_summary(lengths)["p99"], max_seq_len or 0)
    bars = histogram(lengths, bins=40, max_len=upper)
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    if bars:
        width = bars[0][1] - bars[0][0]
        if bars[-1][0] > upper:  # the tail bar: drawn one bin wide, labelled with its range
            lo, hi, count = bars.pop()
            ax.bar(lo, count, width=width, align="edge", color="tab:gray")
            ax.annotate(f"> {upper}: {count}", (lo + width / 2, count), ha="center", va="bottom")
        ax.bar([lo for lo, _, _ in bars], [c for _, _, c in bars], width=width, align="edge",
               edgecolor="white")
    if max_seq_len is not None:
        ax.axvline(max_seq_len, color="tab:red", linestyle="--", label=f"max_seq_len {max_seq_len}")
        ax.legend()
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
