"""task: classification on a tiny random BERT: the loss transformers computes, labels read and checked with
file:line, resume bit for bit, and final/ judged by transformers' own pipeline."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from tuneforge.config import config_from_dict
from tuneforge.data.labels import prepare_labelled
from tuneforge.errors import DataError
from tuneforge.eval.run_eval import evaluate_target
from tuneforge.methods.classification import Classification, predicted_sets
from tuneforge.methods.objective import Runtime
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.serve import make_server
from tuneforge.track.console import Reporter
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints
from tuneforge.train.loop import train

QUIET = Reporter(quiet=True)
CPU = torch.device("cpu")
WORDS = {"pos": ["good", "great", "fine", "nice", "love"], "neg": ["bad", "awful", "poor", "hate", "sad"],
         "neu": ["table", "chair", "blue", "seven", "paper"]}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, one_thread):
    """A random 2-layer BERT (hidden 32) with the built-in encoder's tokenizer."""
    from transformers import BertConfig, BertModel

    from tuneforge.models.resolve import resolve_base_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(resolve_base_model("minilm-l6")[0])
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        out.append({"text": f"{rng.choice(WORDS[label])} {rng.choice(WORDS['neu'])} {i}", "label": label})
    return out


def make_cfg(tmp_path, model, records=None, out="run", **over):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, records if records is not None else sentiment(24))
    raw = {"task": "classification", "base_model": str(model), "datasets": [{"path": str(data)}],
           "validation": {"split": 0.25}, "max_seq_len": 32, "micro_batch_size": 4, "epochs": 2,
           "learning_rate": 1e-3, "output_dir": str(tmp_path / out), "device": "cpu", "precision": "fp32",
           "adapter": "full", "prepare": {"cache": False}}
    raw.update(over)
    return config_from_dict(raw, base=tmp_path)



def test_loss_equals_transformers_own(tmp_path, tiny_bert):
    """Single-label: BertForSequenceClassification's cross-entropy; multi-label: its BCE-with-logits; text pairs
    with their token type ids."""
    for multi, pair in ((False, False), (True, False), (False, True)):
        records = sentiment(12)
        if multi:
            records = [{**r, "label": [r["label"], "neu"] if r["label"] != "neu" else ["neu"]} for r in records]
        if pair:
            records = [{**r, "text_pair": f"about item {i}"} for i, r in enumerate(records)]
        folder = tmp_path / f"{multi}-{pair}"
        folder.mkdir()
        cfg = make_cfg(folder, tiny_bert, records, validation=None)
        tok = load_tokenizer(tiny_bert)
        data = prepare_labelled(cfg, tok)
        assert data.multi_label is multi
        model = load_model(tiny_bert, CPU, head="classifier", head_config=data.head_config).eval()
        objective = Classification(cfg.classification, data, tok.pad_token_id, Runtime(cfg=cfg))
        batch = objective.collate(list(range(6)))
        ours, _ = objective.loss(model, batch, {"examples": 6})
        labels = batch["targets"]
        assert bool("token_type_ids" in batch and batch["token_type_ids"].max() == 1) is pair
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        theirs = model(**inputs, labels=labels).loss
        assert model.config.problem_type == ("multi_label_classification" if multi else "single_label_classification")
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_multi_label_threshold_decides_the_predicted_classes():
    probs = torch.tensor([[0.9, 0.55, 0.1], [0.3, 0.2, 0.1]])
    assert predicted_sets(probs, True, 0.5) == [{0, 1}, set()]
    assert predicted_sets(probs, True, 0.6) == [{0}, set()]
    assert predicted_sets(probs, True, 0.25) == [{0, 1}, {0}]
    assert predicted_sets(probs, False, 0.5) == [{0}, {0}]


def test_bad_labels_rejected_with_file_and_line(tmp_path, tiny_bert):
    records = sentiment(12) + [{"text": "odd one", "label": 1.5}, {"text": "no label here"},
                               {"text": "empty", "label": []}, {"text": "flag", "label": True}]
    cfg = make_cfg(tmp_path, tiny_bert, records, validation=None)
    with pytest.raises(DataError) as err:
        prepare_labelled(cfg, load_tokenizer(tiny_bert))
    msg = str(err.value)
    for line, reason in ((13, "label must be a string or an integer"), (14, "missing field 'label'"),
                         (15, "label is an empty list"), (16, "label must be a string or an integer")):
        assert f"train.jsonl:{line}: {reason}" in msg, msg
    skip = make_cfg(tmp_path, tiny_bert, validation=None, on_bad_record="skip", max_bad_fraction=0.5)
    data = prepare_labelled(skip, load_tokenizer(tiny_bert))
    assert sorted(r.line for r in data.rejected) == [13, 14, 15, 16]
    assert len(data.train) == 12 and data.labels == ["neg", "neu", "pos"]


def test_unknown_validation_label_is_a_bad_record(tmp_path, tiny_bert):
    val = tmp_path / "val.jsonl"
    write_jsonl(val, [{"text": "good thing", "label": "pos"}, {"text": "what", "label": "surprise"}])
    cfg = make_cfg(tmp_path, tiny_bert, validation={"path": str(val)})
    with pytest.raises(DataError, match=r"val.jsonl:2: label surprise is not in the training data"):
        prepare_labelled(cfg, load_tokenizer(tiny_bert))


@pytest.mark.parametrize("records,match", [
    ([{"text": f"t {i}", "label": "pos"} for i in range(6)], "a classifier needs at least two classes"),
    ([{"text": f"t {i}", "sentiment": "pos"} for i in range(6)], r"train.jsonl:1: no 'label' column"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4,
     "a messages record, but task: classification"),
])
def test_unusable_datasets_are_refused(tmp_path, tiny_bert, records, match):
    cfg = make_cfg(tmp_path, tiny_bert, records, validation=None)
    with pytest.raises(DataError, match=match):
        prepare_labelled(cfg, load_tokenizer(tiny_bert))


def test_column_mapping_and_label_findings(tmp_path, tiny_bert):
    rows = [{"sentence": r["text"], "y": r["label"]} for r in sentiment(30)] + [{"sentence": "rare one", "y": "odd"}]
    rows.append({"sentence": rows[0]["sentence"], "y": "pos" if rows[0]["y"] != "pos" else "neg"})
    cfg = make_cfg(tmp_path, tiny_bert, rows, validation=None)
    cfg.datasets[0].columns = {"text": "sentence", "label": "y"}
    data = prepare_labelled(cfg, load_tokenizer(tiny_bert))
    assert data.labels == ["neg", "neu", "odd", "pos"]
    notes = " ".join(data.findings)
    assert "Rare classes" in notes and "odd (1)" in notes
    assert "Class imbalance" in notes
    assert "1 texts appear with different labels" in notes and "train.jsonl:1" in notes


def test_resume_is_bit_exact(tmp_path, tiny_bert):
    over = {"save_every": 2, "keep_last": 5, "evaluation": {"before_after": False}, "epochs": 2}
    train(make_cfg(tmp_path, tiny_bert, out="full", **over), reporter=QUIET)
    cut = make_cfg(tmp_path, tiny_bert, out="cut", **over)
    assert train(cut, reporter=QUIET, stop_after=3) == {"stopped_at": 3}
    train(cut, resume=True, reporter=QUIET)
    full_m, cut_m = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("full", "cut"))
    assert [m["loss"] for m in cut_m] == [m["loss"] for m in full_m] and len(full_m) == 10
    a, b = (load_file(list_checkpoints(tmp_path / name)[-1] / "trainable.safetensors") for name in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_loads_final_and_predicts_label_names(tmp_path, tiny_bert):
    from transformers import pipeline

    cfg = make_cfg(tmp_path, tiny_bert, sentiment(24), epochs=2, learning_rate=3e-3, eval_every=5)
    train(cfg, reporter=QUIET)
    run = tmp_path / "run"
    after = json.loads((run / "eval_after.json").read_text())
    assert after["labels"] == ["neg", "neu", "pos"] and "confusion" in after and "confidently_wrong" in after
    assert json.loads((run / "run.json").read_text())["head"]["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert "val_accuracy" in read_metrics(run / "metrics.jsonl")[4]
    # `tuneforge eval RUN` loads the run's head and reads its labelled data as training did
    before, again = evaluate_target(run)
    assert again["accuracy"] == after["accuracy"] and again["confusion"] == after["confusion"]
    assert before["labels"] == after["labels"]
    from tuneforge.track.report import write_report

    page = write_report(run)
    assert (page.with_suffix("") / "confusion.png").is_file() and "Confusion matrix" in page.read_text()
    classify = pipeline("text-classification", model=str(run / "final"), device=-1)
    texts = ["good table", "awful chair"]
    got = classify(texts, top_k=None)
    assert all({p["label"] for p in preds} == {"neg", "neu", "pos"} for preds in got)

    # tuneforge serve answers /v1/classify in the pipeline's shape, with the pipeline's scores, and no chat
    server = make_server(run, port=0, quiet=True, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert same(post(server, "/v1/classify", {"input": texts, "top_k": None})["data"], got)
        assert same(post(server, "/v1/classify", {"input": "good table"})["data"], classify("good table"))
        with pytest.raises(urllib.error.HTTPError) as err:
            post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert err.value.code == 400 and "POST /v1/classify" in json.loads(err.value.read())["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


def same(a, b) -> bool:
    """Pipeline-shaped predictions equal: the same labels in the same order, scores within 1e-5."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-5


def post(server, path: str, body: dict) -> dict:
    req = urllib.request.Request(server.url.removesuffix("/v1") + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def pipeline_and_server_agree(expected: torch.Tensor, got: list, run: Path, texts: list[str]) -> None:
    """The pipeline's scores (`got`, over an exported folder) equal the tuned model's own (`expected`), and
    `tuneforge serve` of the run (the adapter on its base) answers /v1/classify as the pipeline does."""
    for row, preds in zip(expected, got):
        by_name = {p["label"]: p["score"] for p in preds}
        assert [by_name[n] for n in ("neg", "neu", "pos")] == pytest.approx(row.tolist(), abs=1e-5)
    server = make_server(run, port=0, quiet=True, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert same(post(server, "/v1/classify", {"input": texts, "top_k": None})["data"], got)
    finally:
        server.shutdown()
        server.server_close()


def test_lora_adapter_loads_with_peft_and_export_merges_for_the_pipeline(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from tuneforge.export.run_export import export_run
    from tuneforge.models.run import open_run

    cfg = make_cfg(tmp_path, tiny_bert, adapter="lora", max_steps=3, learning_rate=5e-2, lora={"r": 4, "alpha": 8},
                   evaluation={"before_after": False})
    train(cfg, reporter=QUIET)
    run = open_run(tmp_path / "run")
    assert run.is_adapter
    labels = {"id2label": {0: "neg", 1: "neu", 2: "pos"}, "label2id": {"neg": 0, "neu": 1, "pos": 2}}
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3, **labels)
    tuned = PeftModel.from_pretrained(base, str(run.final)).eval()
    texts = ["good table", "awful chair", "blue paper"]
    tok = AutoTokenizer.from_pretrained(str(run.final))
    with torch.no_grad():
        expected = torch.softmax(tuned(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    fresh = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3, **labels)
    assert not torch.equal(fresh.classifier.weight, tuned.base_model.model.classifier.weight)  # the head was trained

    out = export_run(run, "hf", tmp_path / "hf", dtype="float32")
    got = pipeline("text-classification", model=str(out), device=-1)(texts, top_k=None)
    pipeline_and_server_agree(expected, got, tmp_path / "run", texts)


def test_data_check_reports_label_problems(tmp_path, tiny_bert):
    from tuneforge.data.check import check_data

    val = tmp_path / "val.jsonl"
    rows = sentiment(30) + [{"text": "rare one", "label": "odd"}, {"text": "bad", "label": {"x": 1}}]
    write_jsonl(val, [{"text": rows[0]["text"], "label": rows[0]["label"]}, {"text": "new", "label": "surprise"}])
    cfg = make_cfg(tmp_path, tiny_bert, rows, validation={"path": str(val)})
    report = check_data(cfg, load_tokenizer(tiny_bert))
    errors = {(f.code, f.line) for f in report.errors}
    assert errors == {("bad-label", 32), ("bad-label", 2)}, report.findings
    warnings = " ".join(f.message for f in report.findings if f.severity == "warning")
    assert "Rare classes" in warnings and "also in the training data" in warnings


def test_decoder_gets_a_score_head_per_class_and_needs_a_pad_token(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.data.labels import head_config
    from tuneforge.errors import ModelError

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    labels = head_config(["no", "yes"], False)
    with pytest.raises(ModelError, match="no pad token"):
        load_model(tmp_path, CPU, head="classifier", head_config=labels)
    model = load_model(tmp_path, CPU, head="classifier", pad_token_id=3, head_config=labels)
    assert model.score.out_features == 2 and model.config.pad_token_id == 3
    assert model.config.id2label == {0: "no", 1: "yes"}


def test_csv_columns_and_integer_labels_keep_numeric_order(tmp_path, tiny_bert):
    rows = [f"{w} thing {i},{label}" for i, (w, label) in enumerate([("good", 10), ("bad", 2), ("fine", 1)] * 3)]
    (tmp_path / "train.csv").write_text("sentence,stars\n" + "\n".join(rows) + "\n")
    cfg = make_cfg(tmp_path, tiny_bert, [], validation=None,
                   datasets=[{"path": str(tmp_path / "train.csv"), "columns": {"text": "sentence", "label": "stars"}}])
    data = prepare_labelled(cfg, load_tokenizer(tiny_bert))
    assert data.labels == ["1", "2", "10"] and len(data.train) == 9


def test_decoder_llm_classifier_trains_exports_for_the_pipeline_and_serves(tmp_path, smol_tokenizer):
    """A tiny Llama whose config has no pad id: LoRA and a score head per class; the adapter loads onto the base
    with PEFT, `export --to hf` makes a folder the text-classification pipeline loads, and /v1/classify agrees.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, pipeline

    from conftest import make_tiny_model
    from tuneforge.export.run_export import export_run
    from tuneforge.models.run import open_run

    llama = make_tiny_model(tmp_path / "llama", "llama", smol_tokenizer)
    # A random decoder's logits start wide: one batch's loss may be several times another's without diverging.
    cfg = make_cfg(tmp_path, llama, sentiment(24), adapter="lora", max_steps=4, learning_rate=2e-3,
                   lora={"r": 4, "alpha": 8}, diagnose={"explode_factor": 100})
    manifest = train(cfg, reporter=QUIET)
    assert set(manifest["eval_after"]["labels"]) == {"neg", "neu", "pos"}
    head = json.loads((tmp_path / "run" / "run.json").read_text())["head"]
    assert head["pad_token_id"] == smol_tokenizer.pad_token_id

    labels = {"id2label": {0: "neg", 1: "neu", 2: "pos"}, "label2id": {"neg": 0, "neu": 1, "pos": 2}}
    base = AutoModelForSequenceClassification.from_pretrained(str(llama), num_labels=3, **labels,
                                                              pad_token_id=smol_tokenizer.pad_token_id)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
    texts = ["good table", "an awful blue chair"]
    with torch.no_grad():
        expected = torch.softmax(tuned(**smol_tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)

    out = export_run(open_run(tmp_path / "run"), "hf", tmp_path / "hf", dtype="float32")
    got = pipeline("text-classification", model=str(out), device=-1)(texts, top_k=None)
    pipeline_and_server_agree(expected, got, tmp_path / "run", texts)


def test_qlora_classifier_keeps_its_head_unquantized_merges_and_serves(tmp_path, smol_tokenizer):
    """QLoRA on CPU (bitsandbytes): a 4-bit Llama base with a full-precision score head; export merges onto the
    dequantized base, and the pipeline on it agrees with /v1/classify, which serves the 4-bit base + adapter."""
    import bitsandbytes as bnb
    from transformers import pipeline

    from conftest import make_tiny_model
    from tuneforge.export.run_export import export_run
    from tuneforge.models.run import open_run

    llama = make_tiny_model(tmp_path / "llama", "llama", smol_tokenizer)
    cfg = make_cfg(tmp_path, llama, sentiment(24), adapter="qlora", max_steps=3, learning_rate=2e-3,
                   lora={"r": 4, "alpha": 8, "dropout": 0.0}, diagnose={"explode_factor": 100},
                   evaluation={"before_after": False})
    labels = prepare_labelled(cfg, smol_tokenizer).head_config
    model = load_model(llama, CPU, quantization=cfg.quantization, head="classifier", head_config=labels,
                       pad_token_id=smol_tokenizer.pad_token_id)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.score) is torch.nn.Linear and model.score.out_features == 3
    train(cfg, reporter=QUIET)
    out = export_run(open_run(tmp_path / "run"), "hf", tmp_path / "hf", dtype="float32")
    texts = ["good table", "an awful blue chair"]
    got = pipeline("text-classification", model=str(out), device=-1)(texts, top_k=None)
    server = make_server(tmp_path / "run", port=0, quiet=True, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served = post(server, "/v1/classify", {"input": texts, "top_k": None})["data"]
    finally:
        server.shutdown()
        server.server_close()
    for a, b in zip(served, got):  # 4-bit matmuls against the dequantized weights in fp32
        assert [p["label"] for p in a] == [p["label"] for p in b]
        assert [p["score"] for p in a] == pytest.approx([p["score"] for p in b], abs=1e-4)
