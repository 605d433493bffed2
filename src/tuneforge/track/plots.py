"""PNG plots of runs with matplotlib's object API (no pyplot state, safe without a display)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import TuneforgeError

# One picture per panel of the report: (file stem, title, [(metric, label)], log scale).
PANELS = [
    ("loss", "Loss", [("loss", "train"), ("val_loss", "validation")], False),
    ("lr", "Learning rate", [("lr", "lr")], False),
    ("grad_norm", "Gradient norm (before clipping)", [("grad_norm", "total")], True),
    ("throughput", "Throughput (real tokens/s)", [("tokens_per_s", "tokens/s")], False),
    ("memory", "Memory (MB)", [("rss_mb", "process RSS"), ("gpu_mem_allocated_mb", "GPU allocated"),
                               ("gpu_mem_reserved_mb", "GPU reserved"), ("gpu_mem_peak_mb", "GPU peak")], False),
    ("loader", "Shares: data-loader wait of the step time, padding of the batch", [("data_share", "loader wait"),
                                                          ("padding_share", "padding share")], False),
]


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise TuneforgeError("plots need matplotlib: pip install 'tuneforge[plots]'") from e
    return Figure(figsize=(7, 3.2), dpi=100)


def series(steps: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping steps that did not log it (or logged None)."""
    pts = [(m["step"], m[key]) for m in steps if isinstance(m.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def panel_png(steps: list[dict], title: str, keys: list[tuple[str, str]], log: bool, path: Path) -> Path | None:
    """One panel; None when the run logged none of its metrics (e.g. GPU memory on CPU)."""
    lines = [(label, *series(steps, key)) for key, label in keys]
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    fig = _figure()
    ax = fig.subplots()
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 or label == "validation" else None, markersize=3, label=label)
    if log and all(v > 0 for _, _, ys in lines for v in ys):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_pngs(steps: list[dict], folder: Path) -> dict[str, Path]:
    """Every panel the run has data for, as folder/<stem>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, title, keys, log in PANELS:
        path = panel_png(steps, title, keys, log, folder / f"{stem}.png")
        if path is not None:
            out[stem] = path
    return out


def overlay_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """Training and validation loss of several runs in one picture, one colour per run."""
    fig = _figure()
    fig.set_size_inches(10, 3.6)
    train_ax, val_ax = fig.subplots(1, 2)
    for i, (name, steps) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        train_ax.plot(*series(steps, "loss"), color=colour, label=name)
        xs, ys = series(steps, "val_loss")
        if xs:
            val_ax.plot(xs, ys, color=colour, marker="o", markersize=3, label=name)
    for ax, title in ((train_ax, "Training loss"), (val_ax, "Validation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    train_ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def confusion_png(matrix: list[list[int]], labels: list[str], path: Path, title: str = "Confusion matrix") -> Path:
    """A classifier's confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    fig = _figure()
    side = min(12, 2.5 + 0.45 * len(labels))
    fig.set_size_inches(side, side * 0.85)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    peak = max((max(row) for row in matrix), default=0) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > peak / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
