"""The evaluation suite across runs: `tuneforge eval RUN --with OTHER` side by side, suite rows in the model card
and the trackers, and evaluation.select_best choosing final/ among the kept checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest

from test_train import QUIET, make_cfg
from tuneforge.train.loop import train


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, tiny_models):
    """A 2-step LoRA run whose suite has a rate (exact match) and a mean (chrF)."""
    tmp = tmp_path_factory.mktemp("suite_run")
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=2, **{"evaluation.suite": ["exact_match", "chrf"]})
    manifest = train(cfg, reporter=QUIET)
    return tmp / "run", manifest


def test_eval_with_sets_other_runs_and_folders_beside_base_and_tuned(suite_run, tiny_models, tmp_path, capsys):
    """The same model given with --with scores exactly as it did in its own column; each gets eval_<name>.json,
    a column in the console and the report, and a paired difference from the base."""
    from tuneforge.cli import main

    run, _ = suite_run
    copy = shutil.copytree(run, tmp_path / "copy")  # another run, with the tuned model's weights
    assert main(["eval", str(run), "--with", str(copy), "--with", str(tiny_models["llama"])]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((run / "run.json").read_text())
    table = manifest["side_by_side"]
    assert table["models"] == ["base", "tuned", "copy", "llama"]
    chrf = table["rows"]["chrf"]
    assert chrf["copy"]["value"] == chrf["tuned"]["value"] and chrf["copy"]["ci95"] == chrf["tuned"]["ci95"]
    assert chrf["llama"]["value"] == chrf["base"]["value"] and chrf["llama"]["difference"] == 0.0
    assert chrf["copy"]["difference"] == pytest.approx(chrf["copy"]["value"] - chrf["base"]["value"])
    assert chrf["tuned"]["n"] == manifest["eval_after"]["n"] and "difference" not in chrf["base"]
    assert table["rows"]["val_loss"]["copy"]["value"] == pytest.approx(manifest["eval_after"]["val_loss"], abs=1e-6)
    saved = json.loads((run / "eval_copy.json").read_text())
    assert saved["suite"]["chrf"]["scores"] == json.loads((run / "eval_after.json").read_text())["suite"]["chrf"]["scores"]
    assert (run / "eval_llama.json").is_file()
    assert "Side by side" in out and "copy" in out and "eval_copy.json" in out
    page = (run / "report.html").read_text()
    assert "<th>copy</th><th>copy - base</th><th>llama</th>" in page
