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
    """A 2-step LoRA run whose suite has a rate (exact match) and a mean (chrF), logged to TensorBoard."""
    tmp = tmp_path_factory.mktemp("suite_run")
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=2, track={"to": ["tensorboard"]},
                   **{"evaluation.suite": ["exact_match", "chrf"]})
    manifest = train(cfg, reporter=QUIET)
    return tmp / "run", manifest


def test_eval_with_sets_other_runs_and_folders_beside_base_and_tuned(suite_run, tiny_models, tmp_path, capsys):
    """The same model given with --with scores exactly as it did in its own column; each gets eval_<name>.json,
    a column in the console and the report, a paired difference from the base, and the judge's verdicts of the
    tuned model against it."""
    from test_judge import serve
    from tuneforge.cli import main
    from tuneforge.errors import TuneforgeError
    from tuneforge.eval.record import run_suite

    run, _ = suite_run
    copy = shutil.copytree(run, tmp_path / "copy")  # another run, with the tuned model's weights
    server, seen = serve(lambda prompt: "[[A]]")
    suite = tmp_path / "suite.yaml"
    suite.write_text("suite: [exact_match, chrf]\nmax_new_tokens: 8\nmax_examples: 4\n"
                     f"judge: {{base_url: 'http://127.0.0.1:{server.server_port}/v1', model: stub}}\n")
    try:
        code = main(["eval", str(run), "--suite", str(suite), "--with", str(copy), "--with", str(tiny_models["llama"])])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0
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
    saved, after = (json.loads((run / f"eval_{name}.json").read_text()) for name in ("copy", "after"))
    assert saved["suite"]["chrf"]["scores"] == after["suite"]["chrf"]["scores"]
    assert (run / "eval_llama.json").is_file()
    assert "Side by side" in out and "copy" in out and "eval_copy.json" in out
    page = (run / "report.html").read_text()
    assert "<th>copy</th><th>copy - base</th><th>llama</th>" in page
    # The judge: tuned against the base, then against each other model; 2 requests per prompt each.
    assert len(seen) == 3 * 8 and manifest["judge"]["rates"]["tie"]["count"] == 4
    assert {k: v["rates"]["tie"]["count"] for k, v in manifest["judge_with"].items()} == {"copy": 4, "llama": 4}
    assert len((run / "judge_replies_llama.jsonl").read_text().splitlines()) == 4
    assert "tuned vs copy" in " ".join(out.split()) and "tuned vs llama" in page
    with pytest.raises(TuneforgeError, match=r"--with .*run\.json: .*run\.json is neither a model folder nor a \.gguf"):
        run_suite(run, others=[str(copy / "run.json")])  # checked before any model loads


def test_suite_rows_reach_the_model_cards_and_the_trackers(suite_run, tmp_path):
    """final/README.md and an export's card show each suite row before/after with intervals; the trackers'
    summaries hold eval/<metric>/before, /after and /difference."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tuneforge.export.run_export import export_run
    from tuneforge.models.run import open_run
    from tuneforge.track.trackers import summary_metrics

    run, manifest = suite_run
    row = manifest["evaluation"]["suite"]["chrf"]
    line = f"| chrf | {row['n']} | {row['before']:.4g} [{row['before_ci95'][0]:.4g}, {row['before_ci95'][1]:.4g}] |"
    exported = export_run(open_run(run), "adapter", tmp_path / "adapter")
    for card in ((run / "final" / "README.md").read_text(), (exported / "README.md").read_text()):
        assert "## Evaluation suite" in card and line in card and "| exact_match | 4 | 0 [0, 0.4899] |" in card
        assert card.startswith("---\nlibrary_name: peft")

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert any(b"eval/chrf/after" in v for v in acc.PluginTagToContent("hparams").values())
    # What every back-end (TensorBoard's hparams, MLflow's metrics, W&B's summary) is given at the end:
    summary = summary_metrics(manifest)
    for key in ("before", "after", "difference"):
        assert summary[f"eval/chrf/{key}"] == pytest.approx(row[key])
    assert summary["final/train_loss"] == manifest["final_metrics"]["train_loss"]


def test_select_best_makes_the_best_checkpoint_final(tmp_path, tiny_models):
    """Every kept checkpoint is scored on the validation split; final/ holds the winner's weights (here the
    highest val_loss, so that the winner is not simply the last step), recorded in run.json, card and report."""
    from safetensors.torch import load_file

    from tuneforge.track.report import write_report

    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=3, save_every=1, keep_last=3,
                   **{"evaluation.select_best": {"metric": "val_loss", "mode": "max"}, "evaluation.max_examples": 1,
                      "evaluation.max_new_tokens": 2})
    manifest = train(cfg, reporter=QUIET)
    chosen = manifest["select_best"]
    values = {int(s): v for s, v in chosen["values"].items()}
    assert sorted(values) == [1, 2, 3] and chosen["step"] == max(values, key=values.get) != 3
    run = tmp_path / "run"
    final = load_file(run / "final" / "adapter_model.safetensors")
    for step in values:
        kept = {k.replace(".default", ""): v for k, v in load_file(run / "checkpoints" / f"step-{step}" /
                                                                  "trainable.safetensors").items()}
        same = kept.keys() == final.keys() and all(kept[k].equal(final[k]) for k in final)
        assert same == (step == chosen["step"]), step
    assert json.loads((run / "run.json").read_text())["select_best"]["step"] == chosen["step"]
    assert f"final/ is step {chosen['step']}" in (run / "final" / "README.md").read_text()
    page = write_report(run).read_text()
    assert "Checkpoint chosen by val_loss (max) on the validation split" in page
    assert f"step {chosen['step']} (final/)" in page


def test_select_best_scores_the_winner_once_and_its_numbers_are_the_after_numbers(tmp_path, tiny_models, monkeypatch):
    """A full fine-tune: the after-evaluation would repeat the winner's held-out evaluation exactly, so it is reused
    (one held-out evaluation fewer); eval_after equals `tuneforge eval`'s fresh evaluation of final/."""
    from tuneforge.eval.run_eval import evaluate_target
    from tuneforge.methods.sft import SFT

    finals = []
    held_out = SFT.held_out

    def counted(self, model, data, final=False, reference=None):
        finals.append(final)
        return held_out(self, model, data, final, reference)

    monkeypatch.setattr(SFT, "held_out", counted)
    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter="full", max_steps=3, save_every=1, keep_last=3,
                   learning_rate=1e-3, **{"evaluation.select_best": {"metric": "val_loss", "mode": "max"},
                                          "evaluation.max_examples": 2, "evaluation.max_new_tokens": 4})
    manifest = train(cfg, reporter=QUIET)
    assert manifest["select_best"]["step"] != 3  # the winner was loaded back after the last step's evaluation
    assert finals.count(True) == 1 + 3  # before training, then each kept checkpoint; the after-evaluation reused
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert after["val_loss"] == manifest["select_best"]["values"][str(manifest["select_best"]["step"])]
    monkeypatch.setattr(SFT, "held_out", held_out)
    _, fresh = evaluate_target(tmp_path / "run")
    assert after == json.loads(json.dumps(fresh))


def test_select_best_names_a_metric_the_evaluation_has(tmp_path):
    from tuneforge.config import config_from_dict
    from tuneforge.errors import ConfigError
    from tuneforge.eval.compare import metric_value

    raw = {"base_model": "x", "datasets": [{"path": "a.jsonl"}], "validation": {"split": 0.1}}
    with pytest.raises(ConfigError, match="select_best.metric: 'rouge' is neither a suite entry"):
        config_from_dict({**raw, "evaluation": {"suite": ["rouge_l"], "select_best": {"metric": "rouge"}}})
    with pytest.raises(ConfigError, match="early_stopping and evaluation.select_best"):
        config_from_dict({**raw, "early_stopping": {}, "evaluation": {"select_best": {}}})
    spec = config_from_dict({**raw, "evaluation": {"suite": ["rouge_l"], "select_best": {"metric": "rouge_l"}}})
    assert not spec.evaluation.select_best.lower_is_better
    assert config_from_dict({**raw, "evaluation": {"select_best": {}}}).evaluation.select_best.lower_is_better
    assert metric_value({"suite": {"rouge_l": {"value": 0.5}}, "val_loss": 2.0}, "rouge_l") == 0.5
    with pytest.raises(ConfigError, match="has no 'exact_match'; it has rouge_l, val_loss"):
        metric_value({"suite": {"rouge_l": {"value": 0.5}}, "val_loss": 2.0}, "exact_match")


def test_train_runs_the_judge_and_lm_eval_after_training_and_says_their_cost_first(tmp_path, tiny_models):
    """The judge and lm-eval are suite entries of `tuneforge train` too: their cost is said before the first
    step, and their results reach run.json, judge_replies.jsonl, the card and the trackers' summary."""
    import io

    from rich.console import Console

    from conftest import write_jsonl
    from test_judge import serve
    from test_lm_eval import write_task
    from tuneforge.serve.harness import harness_before_after
    from tuneforge.track.console import Reporter
    from tuneforge.track.trackers import summary_metrics

    pytest.importorskip("tenacity", reason="lm-eval's local-completions needs tenacity: pip install 'tuneforge[eval]'")
    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Repeat alpha", "choices": [" ALPHA", " BRAVO"],
                                                 "answer": 0}])
    harness = {"tasks": ["tiny_mc"], "include_path": write_task(tmp_path, data)}
    server, seen = serve(lambda prompt: "[[A]]")  # always the first position: every pair a tie
    judge = {"base_url": f"http://127.0.0.1:{server.server_port}/v1", "model": "stub", "concurrency": 2}
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **{
        "evaluation.judge": judge, "evaluation.lm_eval": harness})
    printed = io.StringIO()
    try:
        manifest = train(cfg, reporter=Reporter(Console(file=printed, width=200)), benchmark=harness_before_after)
    finally:
        server.shutdown()
        server.server_close()
    out = printed.getvalue()
    cost = "the judge stub at http://127.0.0.1:{}/v1 is asked 8 times (4 held-out prompts x 2, both orders)"
    assert cost.format(server.server_port) in out and "lm-eval runs tiny_mc" in out
    assert out.index("lm-eval runs tiny_mc") < out.index("Evaluating the base model")
    assert manifest["judge"]["rates"]["tie"]["count"] == 4 and len(seen) == 8 and "LLM judge" in out
    assert set(manifest["evaluation"]["lm_eval"]) == {"before", "after"} and "lm-evaluation-harness" in out
    run = tmp_path / "run"
    assert len((run / "judge_replies.jsonl").read_text().splitlines()) == 4
    assert json.loads((run / "run.json").read_text())["judge"]["n"] == 4
    card = (run / "final" / "README.md").read_text()
    assert "## LLM judge" in card and "| tiny_mc | acc |" in card
    summary = summary_metrics(manifest)
    assert summary["eval/judge/tie"] == 1.0 and "eval/tiny_mc/acc/after" in summary
