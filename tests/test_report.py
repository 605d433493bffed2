"""`tuneforge report`, `tuneforge runs` and `tuneforge runs compare` on real tiny runs."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from rich.console import Console
from test_train import QUIET, make_cfg

from tuneforge.cli import main
from tuneforge.track.console import comparison_tables, runs_table
from tuneforge.track.report import write_report
from tuneforge.track.runs import compare_runs, find_runs, read_run, summary_row
from tuneforge.train.loop import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_models):
    """runs/a (evaluated before and after), runs/b (another learning rate), runs/cut (stopped at step 2)."""
    tmp = tmp_path_factory.mktemp("reports")
    common = dict(max_steps=4, eval_every=2)
    train(make_cfg(tmp, tiny_models["llama"], out="runs/a", **common), reporter=QUIET)
    train(make_cfg(tmp, tiny_models["llama"], out="runs/b", learning_rate=1e-3, **common,
                   **{"evaluation.before_after": False}), reporter=QUIET)
    train(make_cfg(tmp, tiny_models["llama"], out="runs/cut", **common, **{"evaluation.before_after": False}),
          reporter=QUIET, stop_after=2)
    return tmp / "runs"


def text_of(*renderables) -> str:
    console = Console(record=True, width=250, file=io.StringIO())
    for r in renderables:
        console.print(r)
    return console.export_text()


def test_report_is_one_self_contained_page_with_pngs_beside(runs_root):
    page = write_report(runs_root / "a")
    assert page == runs_root / "a" / "report.html"
    text = page.read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) >= 5  # loss, lr, gradient norm, throughput, memory, loader
    assert all(base64.b64decode(img).startswith(PNG) for img in images)
    beside = {p.name for p in (runs_root / "a" / "report").iterdir()}
    assert {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "memory.png"} <= beside
    assert "src=" not in re.sub(r"src='data:image/png;base64,[^']+'", "", text)  # nothing loaded from elsewhere


def test_report_shows_evaluation_hardest_examples_diagnoses_and_facts(runs_root):
    run = read_run(runs_root / "a")
    text = write_report(runs_root / "a").read_text()
    before, after = run.before, run.after
    assert f"{before['val_loss']:.4g}" in text and f"{after['val_loss']:.4g}" in text
    last_eval = [m for m in run.steps if "val_hardest" in m][-1]
    for h in last_eval["val_hardest"]:
        assert h["where"] in text
    assert "Diagnosis" in text and "Facts" in text
    assert run.manifest["versions"]["torch"] in text
    assert json.dumps(run.config["learning_rate"]) in text


def test_an_unfinished_run_is_reported_and_listed_as_stopped(runs_root):
    page = write_report(runs_root / "cut")
    assert "stopped at step 2" in page.read_text()
    assert read_run(runs_root / "cut").config["learning_rate"] == 5e-3  # from run_started.json


def test_runs_lists_every_run_with_its_numbers(runs_root):
    runs = find_runs(runs_root)
    assert [r.name for r in runs] == ["a", "b", "cut"]
    rows = {r["run"]: r for r in map(summary_row, runs)}
    assert rows["a"]["status"] == "finished" and rows["cut"]["status"] == "stopped at step 2"
    assert rows["a"]["method"] == "sft" and rows["a"]["lr"] == 5e-3 and rows["b"]["lr"] == 1e-3
    assert rows["a"]["data"] == rows["b"]["data"] != "-"
    assert rows["a"]["steps"] == 4 and rows["a"]["val_loss"] == runs[0].last("val_loss")
    assert rows["a"]["after"] == f"EM {100 * runs[0].after['exact_match']:.1f}%" and rows["b"]["after"] == "-"
    shown = text_of(runs_table(list(rows.values())))
    assert "stopped at step 2" in shown and " 0.005 " in shown and "lora r8" in shown


def test_a_narrow_terminal_gets_fewer_columns_never_wrapped_cells(runs_root):
    rows = [summary_row(r) for r in find_runs(runs_root)]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(runs_table(rows, width=80))
    lines = console.export_text().splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    for row in rows:  # each run on one line, its status whole
        assert sum(ln.lstrip().startswith(row["run"] + " ") for ln in lines) == 1
        assert any(row["status"] in ln for ln in lines)
    assert "Hidden in a terminal this narrow: batch" in " ".join(lines)
    assert "Hidden" not in text_of(runs_table(rows, width=200))


def test_compare_shows_config_differences_metrics_and_overlaid_curves(runs_root, tmp_path):
    comparison = compare_runs([runs_root / "a", runs_root / "b"], tmp_path / "cmp.png")
    config = dict(comparison.config)
    assert config["learning_rate"] == ["0.005", "0.001"]
    assert config["evaluation.before_after"] == ["True", "False"]
    assert "output_dir" not in config and "lora.r" not in config  # same in both, or noise
    assert comparison.data == []  # the same data file
    metrics = dict(comparison.metrics)
    a, b = read_run(runs_root / "a"), read_run(runs_root / "b")
    assert metrics["train_loss (last)"] == [f"{a.last('loss'):.6g}", f"{b.last('loss'):.6g}"]
    assert comparison.png.read_bytes().startswith(PNG)
    shown = text_of(*comparison_tables(comparison))
    assert "learning_rate" in shown and "0.005" in shown


def test_compare_names_a_data_difference(runs_root, tmp_path, tiny_models):
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.jsonl").write_text((runs_root.parent / "train.jsonl").read_text().replace("alpha", "ALPHA"))
    train(make_cfg(other, tiny_models["llama"], out="c", max_steps=1, **{"evaluation.before_after": False}), reporter=QUIET)
    comparison = compare_runs([runs_root / "b", other / "c"], None)
    [(key, values)] = [row for row in comparison.data if row[0].startswith("sha256")]
    assert key == "sha256 train.jsonl" and values[0] != values[1]


def test_cli_report_runs_and_compare(runs_root, tmp_path, capsys):
    assert main(["report", str(runs_root / "b"), "--out", str(tmp_path / "b.html")]) == 0
    assert (tmp_path / "b.html").is_file() and (tmp_path / "b" / "loss.png").is_file()
    assert main(["runs", str(runs_root)]) == 0
    out = capsys.readouterr().out
    assert "cut" in out and "finished" in out
    png = tmp_path / "c.png"
    assert main(["runs", "compare", str(runs_root / "a"), str(runs_root / "b"), "--png", str(png)]) == 0
    assert png.is_file() and "learning_rate" in capsys.readouterr().out
    assert main(["runs", "compare", str(runs_root / "a")]) == 2
    assert "two or more" in capsys.readouterr().err
