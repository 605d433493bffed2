"""Progress of long data work on record files: preparing and `data check` tell every byte of the run's files
once, as they are read, on stderr only; a log gets a line every tenth; small or cached work shows nothing."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager

import pytest

from conftest import chat, write_jsonl
from tuneforge.cli import main
from tuneforge.config import config_from_dict
from tuneforge.data import progress
from tuneforge.data.dataset import prepare_data
from tuneforge.data.readers import iter_rows


def chats(n: int, start: int = 0) -> list[dict]:
    return [chat(f"Question {i}: what comes after {i}?", f"The number {i + 1}.") for i in range(start, start + n)]


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """A JSONL training file and a CSV validation file, a config over both, and the data cache in tmp_path."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "train.jsonl", chats(60))
    val = tmp_path / "val.csv"
    with open(val, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["messages"])
        out.writerows([json.dumps(r["messages"])] for r in chats(20, 100))
    cfg = config_from_dict({"datasets": [{"path": str(train)}], "validation": {"path": str(val)},
                            "max_seq_len": 128}, base=tmp_path)
    return cfg, train.stat().st_size, val.stat().st_size


@pytest.fixture
def plain_stderr(monkeypatch):
    """stderr as a log sees it: rich would draw its live bar if these asked it to, whatever the file is."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def record_progress(monkeypatch) -> list[tuple[str, int, list[int]]]:
    """Every progress shown from now on, as (label, total, advances), however small the files."""
    shown = []

    @contextmanager
    def recorded(label, total, console=None):
        shown.append((label, total, []))
        yield shown[-1][2].append

    monkeypatch.setattr(progress, "byte_progress", recorded)
    monkeypatch.setattr(progress, "STEP", 256)  # so that a few-kB file is told about as it goes, not only at its end
    return shown


def test_preparing_tells_each_byte_of_the_files_once_as_they_are_read(run_files, smol_tokenizer, monkeypatch):
    cfg, train_size, val_size = run_files
    shown = record_progress(monkeypatch)
    data = prepare_data(cfg, smol_tokenizer)
    assert len(data.train) == 60 and len(data.validation) == 20
    [(label, total, advances)] = shown
    assert (label, total) == ("Preparing 2 file(s)", train_size + val_size)
    assert min(advances) >= 0 and sum(advances) == total
    # Told line by line (in steps of STEP), not once per file: within the JSONL, and within the CSV.
    within_train = [a for k, a in enumerate(advances) if sum(advances[: k + 1]) <= train_size]
    assert sum(within_train) == train_size and len(within_train) > 5 and len(advances) - len(within_train) > 3

    shown.clear()
    assert prepare_data(cfg, smol_tokenizer).from_cache and shown == []  # a cached prepare reads no file


def test_a_log_gets_a_line_every_tenth_and_nothing_below_the_threshold(run_files, smol_tokenizer, monkeypatch, capsys,
                                                                      plain_stderr):
    cfg = run_files[0]
    prepare_data(cfg.model_copy(update={"prepare": cfg.prepare.model_copy(update={"cache": False})}), smol_tokenizer)
    assert capsys.readouterr().err == ""  # a few kB: seconds of work, nothing shown

    monkeypatch.setattr(progress, "SHOWN_FROM", 1)
    prepare_data(cfg, smol_tokenizer)
    out = capsys.readouterr()
    lines = out.err.splitlines()  # stderr is not a terminal here, as in the studio's training log
    assert [line.split(": ")[1].split()[0] for line in lines] == [f"{10 * k}%" for k in range(1, 11)]
    assert all(line.startswith("Preparing 2 file(s): ") for line in lines) and out.out == ""


@pytest.mark.parametrize("kind", ["parquet", "hf-folder"])
def test_arrow_files_are_told_by_rows_and_end_at_their_size(tmp_path, monkeypatch, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from tuneforge.data import readers

    monkeypatch.setattr(readers, "BATCH_ROWS", 10)
    monkeypatch.setattr(progress, "STEP", 1)
    table = pa.Table.from_pylist(chats(95))
    if kind == "parquet":
        path = tmp_path / "train.parquet"
        pq.write_table(table, path, row_group_size=10)
        size = path.stat().st_size
    else:
        path = tmp_path / "saved"
        path.mkdir()
        for k, part in enumerate((table.slice(0, 50), table.slice(50))):
            with pa.OSFile(str(path / f"data-{k}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(part)
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-0.arrow"},
                                                                      {"filename": "data-1.arrow"}]}))
        size = sum(p.stat().st_size for p in path.iterdir())
    heard = []
    assert len(list(iter_rows(path, heard.append))) == 95
    assert min(heard) >= 0 and sum(heard) == size and len(heard) > 1


def test_data_check_json_stays_clean_on_stdout_with_progress_on_stderr(tmp_path, monkeypatch, capsys, plain_stderr):
    train = write_jsonl(tmp_path / "train.jsonl", chats(30))
    monkeypatch.setattr(progress, "SHOWN_FROM", 1)
    assert main(["data", "check", str(train), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["records"] == {str(train): 30}
    assert out.err.splitlines()[-1].startswith("Checking 1 file(s): 100% ")


def test_checking_raw_text_tells_each_byte_of_its_files_once(tmp_path, monkeypatch):
    from tuneforge.data.check import CheckReport
    from tuneforge.data.raw_check import check_raw

    (tmp_path / "a.txt").write_text("\n\n".join(f"Story {i}: caf\u00e9 and tea, " * 20 for i in range(40)) + "\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"A held-out \"story\" {i}.\n" * 10} for i in range(40)])
    cfg = config_from_dict({"method": "pretrain", "datasets": [{"path": "a.txt"}], "validation": {"path": "b.jsonl"}},
                           base=tmp_path)
    shown = record_progress(monkeypatch)
    monkeypatch.setattr("tuneforge.data.raw_check.CHUNK", 4)
    check_raw(cfg, report := CheckReport())
    assert report.records == {str(tmp_path / "a.txt"): 40, str(tmp_path / "b.jsonl"): 40}
    [(label, total, advances)] = shown
    assert label == "Checking 2 file(s)" and total == sum((tmp_path / n).stat().st_size for n in ("a.txt", "b.jsonl"))
    assert min(advances) >= 0 and sum(advances) == total and len(advances) > 10
