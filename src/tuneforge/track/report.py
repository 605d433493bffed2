"""`tuneforge report RUN`: one self-contained HTML page (PNGs embedded, and written beside it).

It shows the curves, the before/after evaluation, the hardest validation examples, the diagnosis
log and the run's config and facts, from the run folder's files alone: a finished, stopped or
crashed run can be reported, and the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.output_folders import is_empty, mark, marked_kind
from tuneforge.track.console import harness_rows, side_by_side_rows
from tuneforge.track.plots import confusion_png, run_pngs
from tuneforge.track.runs import EVAL_KEYS, RunFiles, metric_facts, read_run

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warning { color: #8a5a00; } .error { color: #b00020; } .info { color: #555; }
.plots img { width: 49%; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e("-" if value is None else value)


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_num(c)}</td>" if i >= numeric_from else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{_e(path.stem)}'>"


def eval_rows(before: dict | None, after: dict | None) -> list[list]:
    b, a = before or {}, after or {}
    return [[k, b.get(k), a.get(k)] for k in EVAL_KEYS if k in b or k in a]


def _ci(ci) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def suite_html(comparison: dict | None, judge: dict | None) -> str:
    """The evaluation suite (each metric with n and 95% intervals), the forgetting check and the judge's verdicts."""
    comparison, parts = comparison or {}, []
    if comparison.get("suite"):
        rows = [[name, c["n"], f"{_num(c['before'])} {_ci(c['before_ci95'])}", f"{_num(c['after'])} {_ci(c['after_ci95'])}",
                 c["difference"], _ci(c["ci95"]), "significant" if c["significant"] else "within noise"]
                for name, c in comparison["suite"].items()]
        parts.append("<h3>Suite (95% intervals; the difference's from a paired bootstrap)</h3>"
                     + _table(["metric", "n", "before", "after", "after - before", "interval", ""], rows))
    if comparison.get("lm_eval"):
        parts.append("<h3>lm-evaluation-harness</h3>" + _table(
            ["task", "metric", "before", "after", "stderr before", "stderr after"], harness_rows(comparison["lm_eval"]),
            numeric_from=2))
    f = comparison.get("forgetting")
    if f:
        line = (f"General-text perplexity {_num(f['before'])} &rarr; {_num(f['after'])} ({100 * f['rise']:+.1f}%, "
                f"threshold {100 * f['threshold']:.0f}%, {_e(f['tokens'])} tokens).")
        parts.append(f"<h3>Forgetting check</h3><p>{line}</p>"
                     + (f"<p class='warning'>{_e(f['warning'])}</p>" if "warning" in f else ""))
    if judge:
        parts.append(judge_html(judge))
    return "".join(parts)


def judge_html(judge: dict) -> str:
    """The judge's rates with their intervals: tuned against the base, or against a `--with` model."""
    rows = [[k, v["rate"], _ci(v["ci95"]), v["count"]] for k, v in judge.get("rates", {}).items()]
    against = f", tuned vs {_e(judge['against'])}" if "against" in judge else ""
    return (f"<h3>LLM judge ({_e(judge.get('mode'))}, {_e(judge.get('model'))}, n={_e(judge.get('n'))}{against})</h3>"
            + _table(["", "rate", "95% interval", "count"], rows)
            + (f"<p class='error'>{_e(judge['error'])}</p>" if judge.get("error") else ""))


def side_by_side_html(table: dict | None) -> str:
    """`tuneforge eval --with`: a column per model (value and 95% interval) and each one's difference from the base."""
    if not table:
        return ""
    header, rows = side_by_side_rows(table)
    return ("<h3>Side by side (95% intervals; each difference from the base is paired over the same examples)</h3>"
            + _table(header, rows))


def chosen_html(chosen: dict | None) -> str:
    """evaluation.select_best: which checkpoint became final/, and every kept checkpoint's value."""
    if not chosen:
        return ""
    rows = [[f"step {s}" + (" (final/)" if int(s) == chosen["step"] else ""), v] for s, v in chosen["values"].items()]
    return (f"<h3>Checkpoint chosen by {_e(chosen['metric'])} ({_e(chosen['mode'])}) on the validation split</h3>"
            + _table(["checkpoint", chosen["metric"]], rows))


def hardest_examples(run: RunFiles) -> tuple[int | None, list[dict]]:
    """The hardest validation examples of the newest evaluation that listed them."""
    for m in reversed(run.steps):
        if m.get("val_hardest"):
            return m["step"], m["val_hardest"]
    return None, []


def findings_html(findings: list[dict]) -> str:
    if not findings:
        return "<p>No diagnosis: none of the live checks found a problem.</p>"
    rows = "".join(
        f"<tr><td>{_e(f.get('step', '-'))}</td><td class='{_e(f.get('severity', 'warning'))}'>{_e(f.get('severity', ''))}</td>"
        f"<td>{_e(f.get('code', ''))}</td><td><pre style='white-space:pre-wrap;margin:0'>{_e(f.get('message', ''))}</pre></td></tr>"
        for f in findings)
    return f"<table><tr><th>step</th><th>severity</th><th>check</th><th>what was seen and what to do</th></tr>{rows}</table>"


def facts_rows(run: RunFiles) -> list[list]:
    m = run.manifest
    rows = [["status", run.status], ["method", run.config.get("method", "-")], ["base model", run.config.get("base_model", "-")],
            ["adapter", run.config.get("adapter", "-")], ["seed", m.get("seed", "-")], ["device", m.get("device", "-")],
            ["precision", m.get("precision", "-")], ["started", m.get("started", "-")], ["finished", m.get("finished", "-")],
            ["git", m.get("git_sha", "-")], ["command", m.get("command", "-")]]
    rows += [[f"version {k}", v] for k, v in (m.get("versions") or {}).items()]
    rows += [[f"data {p}", h] for p, h in (m.get("data_sha256") or {}).items()]
    return rows


def render_html(run: RunFiles, pngs: dict[str, Path]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tuneforge run {_e(run.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Run {_e(run.name)}</h1><p class='info'>{_e(run.dir.resolve())} &middot; {_e(run.status)}</p>"]
    parts.append("<h2>Diagnosis</h2>" + findings_html(run.findings))
    curves = [p for stem, p in pngs.items() if stem != "confusion"]
    parts.append("<h2>Curves</h2><div class='plots'>" + "".join(_img(p) for p in curves) + "</div>"
                 if curves else "<h2>Curves</h2><p>No step was logged.</p>")
    rows = eval_rows(run.before, run.after)
    if rows:
        parts.append("<h2>Held-out evaluation, before and after</h2>" + _table(["metric", "before", "after"], rows)
                     + suite_html(run.manifest.get("evaluation"), run.manifest.get("judge"))
                     + side_by_side_html(run.manifest.get("side_by_side"))
                     + "".join(judge_html(j) for j in (run.manifest.get("judge_with") or {}).values())
                     + chosen_html(run.manifest.get("select_best")))
    if "confusion" in (run.after or {}):
        labels = run.after["labels"]
        image = _img(pngs["confusion"]) if "confusion" in pngs else ""
        parts.append("<h2>Confusion matrix after training (rows: true, columns: predicted)</h2>" + image
                     + _table(["true \\ predicted", *labels], [[n, *row] for n, row in zip(labels, run.after["confusion"])]))
    parts.append("<h2>Final numbers</h2>" + _table(["", "value"], [[k, v] for k, v in metric_facts(run).items()]))
    step, hardest = hardest_examples(run)
    if hardest:
        parts.append(f"<h2>Hardest validation examples (step {step})</h2>"
                     + _table(["example (file:line)", "mean loss", "trained tokens"],
                              [[h["where"], h["loss"], h.get("tokens")] for h in hardest]))
    parts.append("<h2>Facts</h2>" + _table(["", ""], facts_rows(run), numeric_from=2))
    parts.append("<h2>Config</h2><pre>" + _e(json.dumps(run.config, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _is_report(page: Path) -> bool:
    return page.is_file() and "<title>tuneforge run " in page.read_text(errors="replace")[:500]


def check_page(page: Path) -> None:
    """A report replaces only an earlier report and its PNGs: never another file, nor a folder it did not write."""
    if page.is_dir() or page.suffix.lower() not in (".html", ".htm"):
        raise TuneforgeError(f"--out {page}: give the path of an .html file (its PNGs go in a folder of the same "
                             "name beside it)")
    if page.exists() and not _is_report(page):
        raise TuneforgeError(f"--out {page}: the file exists and is not a tuneforge report; choose another path")
    pngs = page.with_suffix("")
    if not (is_empty(pngs) or marked_kind(pngs) == "report" or _is_report(page)):
        raise TuneforgeError(f"--out {page}: {pngs}, where its PNGs go, holds files tuneforge did not write; "
                             "choose another path")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report.html (or `out`) with its PNGs in a folder beside it; returns the page's path."""
    run = read_run(run_dir)
    page = Path(out) if out else run.dir / "report.html"
    check_page(page)
    pngs = run_pngs(run.steps, page.with_suffix(""))
    if "confusion" in (run.after or {}):  # a classifier's
        pngs["confusion"] = confusion_png(run.after["confusion"], run.after["labels"], page.with_suffix("") / "confusion.png")
    mark(page.with_suffix(""), "report")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(run, pngs), encoding="utf-8")
    return page
