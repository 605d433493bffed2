"""The evaluation suite: each metric equals its library's own result, intervals behave, and a trained run's
suite, forgetting check and comparison reach eval_*.json, run.json, the console and the report."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from tuneforge.config import EvaluationSpec, MetricEntry
from tuneforge.errors import ConfigError
from tuneforge.eval import intervals, metrics
from tuneforge.eval.compare import compare
from tuneforge.eval.suite import score_suite

ANSWERS = ["The cat sat on the mat.", "a quick brown fox", '{"name": "Ada", "age": 36}', "nothing alike"]
REFS = ["the cat sat on the mat", "The quick brown fox jumps", '{"name": "Ada", "age": 37}', "completely different words"]
PROMPTS = ["p"] * 4


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(ANSWERS, REFS)]
    assert metrics.rouge_l(PROMPTS, ANSWERS, reference=REFS) == pytest.approx(want, abs=1e-12)
    assert 0 < want[1] < 1


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    assert metrics.bleu(PROMPTS, ANSWERS, reference=REFS) == pytest.approx(
        [sacrebleu.sentence_bleu(a, [r]).score for a, r in zip(ANSWERS, REFS)], abs=1e-9)
    assert metrics.chrf(PROMPTS, ANSWERS, reference=REFS) == pytest.approx(
        [sacrebleu.sentence_chrf(a, [r]).score for a, r in zip(ANSWERS, REFS)], abs=1e-9)


def test_matches_and_json_metrics():
    assert metrics.exact_match(PROMPTS, ANSWERS, reference=REFS) == [0, 0, 0, 0]
    assert metrics.normalized_match(PROMPTS, ANSWERS, reference=REFS) == [1, 0, 0, 0]
    assert metrics.json_valid(PROMPTS, ANSWERS) == [0, 0, 1, 0]
    # The JSON answer has name right and age wrong; the others are not objects.
    assert metrics.json_fields(PROMPTS, ANSWERS[2:3], reference=REFS[2:3]) == [0.5]
    assert metrics.json_fields(PROMPTS, ANSWERS[2:3], reference=REFS[2:3], fields=["name"]) == [1.0]
    assert metrics.json_fields(PROMPTS, ["not json"], reference=REFS[2:3]) == [0.0]


def test_bertscore_with_the_local_encoder_equals_bert_score():
    """BERTScore runs offline on the built-in MiniLM folder and gives bert-score's own F1."""
    import bert_score

    folder = metrics._local_model("minilm-l6")
    _, _, f1 = bert_score.score(ANSWERS[:2], REFS[:2], model_type=str(folder), num_layers=3, device="cpu")
    got = metrics.bertscore(PROMPTS, ANSWERS[:2], reference=REFS[:2], num_layers=3)
    assert got == pytest.approx(f1.tolist(), abs=1e-6)
    assert got[0] > 0.9


def test_user_metric_and_unknown_names(tmp_path):
    (tmp_path / "mymetric.py").write_text(
        "def length_ratio(prompts, completions, reference, scale=1.0, **_):\n"
        "    return [scale * len(c) / len(r) for c, r in zip(completions, reference)]\n")
    entry = MetricEntry(metric=f"{tmp_path}/mymetric.py:length_ratio", args={"scale": 2.0})
    out = score_suite([entry], [{"prompt": "p", "answer": "ab", "reference": "abcd"}])
    assert out["length_ratio"]["value"] == 1.0 and out["length_ratio"]["n"] == 1
    with pytest.raises(ConfigError, match="unknown metric 'rouge'.*rouge_l"):
        metrics.load_metric("rouge", {})
    with pytest.raises(ConfigError, match="evaluation.suite: cannot load"):
        metrics.load_metric("no_such_module_xyz:fn", {})


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sacrebleu", None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        metrics.bleu(PROMPTS, ANSWERS, reference=REFS)
    assert "\n" not in str(err.value) and "pip install 'tuneforge[eval]'" in str(err.value)


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = intervals.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = intervals.wilson(31, 50)  # 0.62 on 50 examples: [0.482, 0.741]
    assert (lo, hi) == pytest.approx((0.4815, 0.7415), abs=1e-3)


def test_paired_difference_is_reproducible_and_honest():
    before = [0.0] * 30 + [1.0] * 30
    noisy = [1.0] * 3 + [0.0] * 27 + [1.0] * 30  # three more hits on 60: within noise
    d = intervals.paired_difference(before, noisy)
    assert d == intervals.paired_difference(before, noisy)  # fixed seed
    assert d["difference"] == pytest.approx(0.05) and d["n"] == 60 and not d["significant"]
    clear = intervals.paired_difference(before, [1.0] * 60)
    assert clear["significant"] and clear["ci95"][0] > 0.3


def test_compare_pairs_the_suite_and_warns_on_forgetting():
    spec = EvaluationSpec(suite=["exact_match"], forgetting={"path": "x.txt", "threshold": 0.05})
    b = {"suite": {"exact_match": {"rate": True, "value": 0.0, "ci95": [0, 0.5], "scores": [0.0] * 8}}, "general_perplexity": 10.0}
    a = {"suite": {"exact_match": {"rate": True, "value": 1.0, "ci95": [0.6, 1], "scores": [1.0] * 8}}, "general_perplexity": 11.0}
    c = compare(b, a, spec)
    assert c["suite"]["exact_match"]["difference"] == 1.0 and c["suite"]["exact_match"]["significant"]
    assert "rose 10.0%" in c["forgetting"]["warning"] and "ratio" in c["forgetting"]["warning"]
    a["general_perplexity"] = 10.4
    assert "warning" not in compare(b, a, spec)["forgetting"]


def test_evaluation_auto_and_bare_metric_names():
    from tuneforge.config import config_from_dict

    raw = {"base_model": "x", "datasets": [{"path": "a.jsonl"}]}
    assert config_from_dict({**raw, "evaluation": "auto"}).evaluation == EvaluationSpec()
    cfg = config_from_dict({**raw, "evaluation": {"suite": ["rouge_l", {"metric": "json_fields", "args": {"fields": ["a"]}}]}})
    assert [e.metric for e in cfg.evaluation.suite] == ["rouge_l", "json_fields"]


def test_suite_on_a_trained_run_reaches_files_console_and_report(tmp_path, tiny_models, capsys):
    """train with a suite and a forgetting check, then `tuneforge eval RUN --suite FILE`."""
    from test_train import QUIET, make_cfg
    from tuneforge.cli import main
    from tuneforge.train.loop import train

    general = tmp_path / "general.txt"
    general.write_text("The weather was mild and the river ran slowly past the town. " * 8)
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=2, **{
        "evaluation.suite": ["exact_match", "rouge_l", "chrf"],
        "evaluation.forgetting": {"path": str(general), "max_tokens": 64, "threshold": 1e-9}})
    manifest = train(cfg, reporter=QUIET)
    run = tmp_path / "run"
    after = json.loads((run / "eval_after.json").read_text())
    assert after["suite"]["rouge_l"]["n"] == after["n"] and len(after["suite"]["rouge_l"]["scores"]) == after["n"]
    assert set(manifest["evaluation"]["suite"]) == {"exact_match", "rouge_l", "chrf"}
    assert "scores" not in manifest["eval_after"]["suite"]["chrf"]
    assert "forgetting" in manifest["evaluation"] and manifest["evaluation"]["forgetting"]["tokens"] == 63

    from test_judge import serve

    server, seen = serve(lambda prompt: "[[A]]")
    suite = tmp_path / "suite.yaml"
    suite.write_text("suite: [normalized_match, bleu]\nmax_new_tokens: 4\nmax_examples: 3\n"
                     f"judge: {{base_url: 'http://127.0.0.1:{server.server_port}/v1', model: stub}}\n")
    try:
        assert main(["eval", str(run), "--suite", str(suite)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert "Evaluation suite (95% intervals)" in out and "normalized_match" in out
    manifest = json.loads((run / "run.json").read_text())
    assert set(manifest["evaluation"]["suite"]) == {"normalized_match", "bleu"}
    assert manifest["evaluation"]["suite"]["bleu"]["n"] == 3
    assert manifest["judge"]["rates"]["tie"]["count"] == 3 and len(seen) == 6 and "LLM judge" in out
    assert len((run / "judge_replies.jsonl").read_text().splitlines()) == 3
    page = (run / "report.html").read_text()
    assert "Suite (95% intervals" in page and "normalized_match" in page and "LLM judge (pairwise" in page
