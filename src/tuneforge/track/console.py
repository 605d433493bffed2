"""What a run shows in the terminal: data counts, a live progress bar, the before/after table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tuneforge.data.preview import preview_plain, preview_rich
from tuneforge.data.tokenized import TokenizedSet


class Reporter:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self._last_printed = 0

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def warn(self, text: str) -> None:
        """A problem the user should see even mid-progress-bar: a diagnosis, a failing tracker."""
        if not self.quiet:
            self.console.print(text, style="yellow", markup=False, highlight=False)

    def data_summary(self, data, cfg, run_dir: Path, tokenizer) -> None:
        if self.quiet:
            return
        table = Table(title="Data", title_justify="left")
        for col in ("file", "records", "kept", "bad", "too long", "truncated", "dropped", "no trained tokens"):
            table.add_column(col, justify="left" if col == "file" else "right", overflow="fold")
        for src, c in data.summary.per_file.items():
            table.add_row(
                Path(src).name, str(c["records"]), str(c["kept"]), str(c["bad_record"]), str(c["over_max_seq_len"]),
                str(c["truncated"]), str(c["dropped_too_long"]), str(c["no_trained_tokens"]),
            )
        self.console.print(table)
        if data.labels is None or isinstance(data.train, TokenizedSet):
            self._token_summary(data, cfg, tokenizer)
        else:  # images: how many show each class (a multi-label image counts in each of its classes)
            for split in ("train", "validation"):
                examples = getattr(data, split)
                counts = Counter(data.labels[c] for e in examples for c in e.targets)
                self.console.print(f"{len(examples)} {split} examples: "
                                   + ", ".join(f"{name} {counts[name]}" for name in data.labels), markup=False)
        if data.rejected:
            self.console.print(f"[yellow]{len(data.rejected)} records left out; each is listed with its reason in "
                               f"{run_dir / 'rejected.jsonl'}[/yellow]")

    def _token_summary(self, data, cfg, tokenizer) -> None:
        n_train, n_val = len(data.train), len(data.validation)
        trained = data.train.trained_tokens()
        total = int(data.train.lengths.sum())
        self.console.print(
            f"{n_train} training and {n_val} validation examples; {total} tokens, {trained} of them trained "
            f"({100 * trained / max(total, 1):.0f}%)."
        )
        hist = data.summary.histogram(cfg.max_seq_len)
        peak = max((n for *_, n in hist), default=0) or 1
        lines = [f"  {lo:>6}-{hi:<6} {'#' * round(30 * n / peak):<30} {n}" for lo, hi, n in hist if n]
        self.console.print("Token lengths:\n" + "\n".join(lines))
        first = data.train[0]
        self.console.print(f"First training example ({first.record.where}, {len(first.input_ids)} tokens, "
                           f"{first.n_trained} trained; trained text {'in green' if self.console.is_terminal else 'inside [[ ]]'}):")
        if self.console.is_terminal:
            self.console.print(preview_rich(tokenizer, first.input_ids, first.labels))
        else:
            self.console.print(preview_plain(tokenizer, first.input_ids, first.labels), markup=False, highlight=False)

    def start(self, total_steps: int, done: int) -> None:
        if self.quiet:
            return
        self._total = total_steps
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=done, info="")

    def step(self, m: dict) -> None:
        if self.quiet:
            return
        info = f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s"
        for key, label in (("mfu", "mfu"), ("rewards/accuracies", "acc"), ("reward", "reward"), ("kl", "kl")):
            if key in m:
                info += f" {label} {m[key]:.3f}"
        if "val_loss" in m:
            info += f" val {m['val_loss']:.4f}"
        if m.get("val_bpb") is not None:
            info += f" bpb {m['val_bpb']:.3f}"
        for sample in m.get("val_samples", []):  # method: pretrain's continuations of fixed prompts
            self.console.print(f"step {m['step']} sample: {sample['text']!r}")
        if self._progress is not None:
            self._progress.update(self._task, completed=m["step"], info=info)
        elif m["step"] - self._last_printed >= max(1, self._total // 10) or m["step"] == self._total:
            self._last_printed = m["step"]
            self.console.print(f"step {m['step']}/{self._total} {info}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def before_after(self, before: dict | None, after: dict | None, examples: int = 3,
                     comparison: dict | None = None, judge: dict | None = None) -> None:
        if self.quiet or after is None:
            return
        self.console.print(before_after_table(before, after))
        print_comparison(self.console, comparison or {})
        if judge:
            print_judge(self.console, judge)
        for i, tuned in enumerate(after.get("samples", [])[:examples]):
            base = before["samples"][i]["answer"] if before and "samples" in before else "-"
            self.console.print(f"\n[bold]Example {i + 1}[/bold] reference: {tuned['reference']!r}")
            self.console.print(f"  before: {base!r}")
            end = "(ended with end-of-turn)" if tuned["stopped"] else "(did NOT stop)"
            self.console.print(f"  after:  {tuned['answer']!r} {end}")


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}"


def before_after_table(before: dict | None, after: dict) -> Table:
    table = Table(title="Held-out evaluation", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    b = before or {}
    rows = [("validation loss", "val_loss", False), ("perplexity", "perplexity", False),
            ("bits per byte", "val_bpb", False), ("unigram baseline (bits per byte)", "unigram_bpb", False),
            ("bytes per token", "bytes_per_token", False), ("exact match", "exact_match", True), ("answers that stop", "stopped", True),
            ("preference accuracy", "preference_accuracy", True), ("chosen likelier", "likelihood_accuracy", True), ("reward margin", "val_rewards/margins", False),
            ("KL to reference", "val_kl", False), ("mean reward", "mean_reward", False),
            ("accuracy", "accuracy", True), ("macro F1", "macro_f1", True), ("weighted F1", "weighted_f1", True)]
    rows += [(f"mean reward: {k.split('/', 1)[1]}", k, False) for k in after if k.startswith("mean_reward/")]
    rows += [(key, key, True) for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")]  # embeddings
    for label, key, pct in rows:
        if key in after:
            table.add_row(label, _fmt(b.get(key), pct), _fmt(after.get(key), pct))
    if "n" in after:
        table.add_row("examples generated", str(b.get("n", "-")), str(after["n"]))
    return table


def _interval(ci: list[float], pct: bool) -> str:
    return f"[{_fmt(ci[0], pct)},{_fmt(ci[1], pct)}]"


def suite_table(comparison: dict) -> Table:
    """Each suite metric before and after, and the paired difference with its 95% interval (the intervals of
    before and after themselves are in run.json and the report: an 80-column terminal has no room for them)."""
    table = Table(title="Evaluation suite (95% intervals)", title_justify="left")
    table.add_column("metric", no_wrap=True)
    for name in ("n", "before", "after", "change", "change 95%"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("beyond noise")
    for name, c in comparison.get("suite", {}).items():
        pct = c["rate"]
        table.add_row(name, str(c["n"]), _fmt(c["before"], pct), _fmt(c["after"], pct), _fmt(c["difference"], pct),
                      _interval(c["ci95"], pct), "yes" if c["significant"] else "no")
    return table


def _side_by_side_cells(cell: dict | None, pct: bool) -> list[str]:
    """[value and 95% interval, difference from the first model with its interval] of one model's metric."""
    if not cell:
        return ["-", ""]
    value = _fmt(cell["value"], pct) + (f" {_interval(cell['ci95'], pct)}" if "ci95" in cell else "")
    diff = (f"{_fmt(cell['difference'], pct)} {_interval(cell['diff_ci95'], pct)}"
            + ("" if cell["significant"] else " noise")) if "difference" in cell else ""
    return [value, diff]


def side_by_side_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of `tuneforge eval --with`: a column per model with its value [95% interval], and after
    the base each model's paired difference from it."""
    names = table["models"]
    header = ["metric", "n", names[0], *[h for name in names[1:] for h in (name, f"{name} - {names[0]}")]]
    rows = []
    for metric, cells in table["rows"].items():
        pct = any(c.get("rate") for c in cells.values())
        row = [metric, next((str(c["n"]) for c in cells.values() if "n" in c), "")]
        for i, name in enumerate(names):
            value, diff = _side_by_side_cells(cells.get(name), pct)
            row += [value, diff] if i else [value]
        rows.append(row)
    return header, rows


def _compact(value, pct: bool = False, sign: str = "") -> str:
    return f"{100 * value:{sign}.0f}%" if pct else f"{value:{sign}.3g}"


def side_by_side_table(table: dict) -> Table:
    """A column per model; each cell its value, 95% interval and (after the base) difference from the base,
    one to a line, so that four models fit in 80 columns (run.json and the report have the full numbers)."""
    out = Table(title="Side by side (95% intervals; differences from the base, paired)", title_justify="left")
    out.add_column("metric", no_wrap=True)
    out.add_column("n", justify="right")
    for name in table["models"]:
        out.add_column(name, justify="right")
    for metric, cells in table["rows"].items():
        pct = any(c.get("rate") for c in cells.values())
        row = [metric, next((str(c["n"]) for c in cells.values() if "n" in c), "")]
        for name in table["models"]:
            c = cells.get(name) or {}
            lines = ["-" if c.get("value") is None else _compact(c["value"], pct)]
            if "ci95" in c:
                lines.append(f"[{_compact(c['ci95'][0], pct)}, {_compact(c['ci95'][1], pct)}]")
            if "difference" in c:
                lines.append(f"{_compact(c['difference'], pct, '+')} {'beyond noise' if c['significant'] else 'noise'}")
            row.append("\n".join(lines))
        out.add_row(*row)
    return out


def harness_rows(harness: dict) -> list[list]:
    """[task, metric, before, after] for each lm-eval score (stderr beside the value, as lm-eval reports it)."""
    before, after = harness.get("before") or {}, harness.get("after") or {}
    rows = []
    for task in sorted({*before, *after}):
        b, a = before.get(task, {}), after.get(task, {})
        rows += [[task, m, b.get(m), a.get(m), b.get(f"{m}_stderr"), a.get(f"{m}_stderr")]
                 for m in sorted({*b, *a}) if not m.endswith("_stderr")]
    return rows


def harness_table(harness: dict) -> Table:
    table = Table(title="lm-evaluation-harness", title_justify="left")
    for name in ("task", "metric", "before", "after", "stderr before", "stderr after"):
        table.add_column(name, justify="left" if name in ("task", "metric") else "right")
    for row in harness_rows(harness):
        table.add_row(*row[:2], *(_fmt(v) for v in row[2:]))
    return table


def print_comparison(console: Console, comparison: dict) -> None:
    """The suite's table, the forgetting check and the comparison's warnings."""
    if comparison.get("suite"):
        console.print(suite_table(comparison))
    if comparison.get("lm_eval"):
        console.print(harness_table(comparison["lm_eval"]))
    f = comparison.get("forgetting")
    if f:
        line = f"general-text perplexity {f['before']:.3f} -> {f['after']:.3f} ({100 * f['rise']:+.1f}%, {f['tokens']} tokens)"
        console.print(f"[yellow]warning:[/yellow] {f['warning']}" if "warning" in f else f"Forgetting check: {line}")


def print_judge(console: Console, judge: dict) -> None:
    """The judge's rates with their 95% intervals, and its failures (never hidden)."""
    title = f"LLM judge ({judge['mode']}, {judge['model']}, n={judge['n']}, tuned vs {judge.get('against', 'base')})"
    table = Table(title=title, title_justify="left")
    for name in ("", "rate" if judge["mode"] == "pairwise" else "mean grade", "95% interval", "count"):
        table.add_column(name, justify="left" if not name else "right")
    pct = judge["mode"] == "pairwise"
    for k, v in judge["rates"].items():
        table.add_row(k, _fmt(v["rate"], pct), _interval(v["ci95"], pct), str(v["count"]))
    console.print(table)
    if judge.get("error"):
        console.print(f"[red]judge:[/red] {judge['error']}")


def _short(path: str) -> str:
    """A path relative to the working folder when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def print_check_report(report, console: Console, show: int = 5) -> None:
    """Findings grouped by kind, errors first, with the first `show` locations of each."""
    table = Table(title="Data check", title_justify="left")
    table.add_column("severity")
    table.add_column("finding")
    table.add_column("count", justify="right")
    table.add_column("where (first ones) and why", overflow="fold")
    for code, items in report.by_code().items():
        sev = items[0].severity
        style = "red" if sev == "error" else "yellow"
        lines = [f"{_short(f.source)}{f':{f.line}' if f.line else ''}: {f.message}" for f in items[:show]]
        if len(items) > show:
            lines.append(f"... and {len(items) - show} more (--json lists all)")
        table.add_row(f"[{style}]{sev}[/{style}]", code, str(len(items)), "\n".join(lines))
    for path, n in report.records.items():
        console.print(f"{_short(path)}: {n} records")
    if report.findings:
        console.print(table)
    errors, warnings = len(report.errors), len(report.findings) - len(report.errors)
    verdict = "[red]errors found[/red]" if errors else "[green]no errors[/green]"
    console.print(f"{verdict}: {errors} errors, {warnings} warnings")


def print_stats(s: dict, console: Console) -> None:
    L = s["lengths"]
    console.print(f"{s['records']} records: {s['train_examples']} training and {s['validation_examples']} validation "
                  f"examples, {s['left_out']} left out; {s['trained_tokens']} trained tokens")
    table = Table(title="Token lengths (training examples)", title_justify="left")
    for key in ("mean", "min", "p50", "p90", "p95", "p99", "max"):
        table.add_column(key, justify="right")
    table.add_row(*(f"{L[k]:.0f}" for k in ("mean", "min", "p50", "p90", "p95", "p99", "max")))
    console.print(table)
    peak = max((c for *_, c in s["histogram"]), default=0) or 1
    console.print("\n".join(f"  {lo:>6}-{hi:<6} {'#' * round(40 * c / peak):<40} {c}" for lo, hi, c in s["histogram"] if c))
    o = s["over_max_seq_len"]
    console.print(f"Over max_seq_len {s['max_seq_len']}: {o['count']} ({100 * o['share']:.1f}%), policy {o['policy']}, "
                  f"{o['tokens_cut']} tokens cut")
    if s["turns_per_conversation"]:
        console.print("Assistant turns per conversation: " + ", ".join(f"{k}: {v}" for k, v in s["turns_per_conversation"].items()))
    console.print(f"Padding waste at micro_batch_size {s['micro_batch_size']}: {100 * s['padding_waste']:.1f}%; "
                  f"with packing into {s['max_seq_len']}-token rows: {100 * s['packing_waste']:.1f}%")
    console.print(f"Estimated tokens per epoch: {s['tokens_per_epoch']}")
    if "png" in s:
        console.print(f"Histogram saved to {s['png']}")


RUNS_HEADERS = {"train_loss": "loss", "val_loss": "val", "diagnoses": "diag"}
# Dropped first, in this order, when the terminal is too narrow for every column.
RUNS_DROP_ORDER = ("batch", "data", "lr", "adapter", "steps", "diagnoses", "train_loss", "method", "status")


def runs_table(rows: list[dict], width: int = 200) -> Table:
    """`tuneforge runs`: one row per run, the columns of tuneforge.track.runs.summary_row.

    Cells never wrap: columns that do not fit `width` are left out, least telling first, and named
    in the caption, so a narrow terminal shows fewer columns rather than unreadable ones.
    """
    from rich import box

    table = Table(title="Runs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    if not rows:
        return table
    cells = [{k: _cell(v) for k, v in row.items()} for row in rows]
    natural = {k: max(len(RUNS_HEADERS.get(k, k)), *(len(c[k]) for c in cells)) for k in cells[0]}
    natural["model"] = min(natural["model"], 24)  # long names end in an ellipsis
    shown = [k for k in natural if k == "run" or any(c[k] != "-" for c in cells)]  # no column of dashes
    hidden = []
    for key in (k for k in RUNS_DROP_ORDER if k in shown):
        if sum(natural[k] for k in shown) + 3 * len(shown) <= width:  # each cell's padding and edge
            break
        shown.remove(key)
        hidden.append(RUNS_HEADERS.get(key, key))
    numeric = ("lr", "steps", "train_loss", "val_loss", "diagnoses")
    for key in shown:
        table.add_column(RUNS_HEADERS.get(key, key), justify="right" if key in numeric else "left",
                         min_width=natural[key], max_width=natural[key], no_wrap=True, overflow="ellipsis")
    for c in cells:
        table.add_row(*(c[k] for k in shown))
    if hidden:
        table.caption = f"Hidden in a terminal this narrow: {', '.join(hidden)}."
        table.caption_justify = "left"
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


def comparison_tables(comparison) -> list[Table]:
    """`tuneforge runs compare`: what differs in config and data, then the numbers side by side."""
    names = [r.name for r in comparison.runs]
    tables = []
    for title, rows, empty in (("Config: keys that differ", comparison.config, "the configs are the same"),
                               ("Data: what differs", comparison.data, "the same data files"),
                               ("Metrics", comparison.metrics, "")):
        table = Table(title=title if rows or not empty else f"{title.split(':')[0]}: {empty}", title_justify="left")
        table.add_column("")
        for name in names:
            table.add_column(name, overflow="fold")
        for key, values in rows:
            table.add_row(key, *values)
        tables.append(table)
    return tables
