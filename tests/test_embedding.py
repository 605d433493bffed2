"""task: embedding: the loss equals sentence-transformers' own, batches hold no repeated positive, retrieval
metrics match hand values, vectors match the library before training, final/ loads in SentenceTransformer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tuneforge.config import config_from_dict
from tuneforge.data.pairs_text import prepare_pairs, spread_duplicates
from tuneforge.errors import DataError, ModelError
from tuneforge.eval.retrieval import retrieval_metrics, top_k
from tuneforge.methods.embedding import check_parity, contrastive_losses, cosine_losses, distinct
from tuneforge.models.encoder import Pooling, embed, encode_texts, read_pooling, tokenize, write_sentence_transformers
from tuneforge.models.load import load_tokenizer
from tuneforge.track.console import Reporter

QUIET = Reporter(quiet=True)
CPU = torch.device("cpu")


def make_tiny_encoder(folder: Path, pooling: Pooling, seed: int = 0) -> Path:
    """A random 2-layer BERT with the built-in encoder's tokenizer, saved as a sentence-transformers folder."""
    from transformers import BertConfig, BertModel

    from tuneforge.models.resolve import resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model("minilm-l6")[0])
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers(folder, pooling, config.hidden_size)
    return folder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, one_thread):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc"), Pooling("mean", normalize=True, max_seq_length=64))


def loaded(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).eval(), load_tokenizer(folder)


def test_contrastive_loss_equals_sentence_transformers_mnrl(tiny_encoder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    queries = ["red apple", "blue car", "green tree", "old book"]
    positives = ["a fruit that is red", "a vehicle painted blue", "a plant with leaves", "pages from long ago"]
    negatives = ["a yellow banana", "a red bicycle", "a grey stone", "a new phone"]
    st = SentenceTransformer(str(tiny_encoder), device="cpu")
    features = [st.tokenize(texts) for texts in (queries, positives, negatives)]
    expected = MultipleNegativesRankingLoss(st, scale=20.0)(features, None).item()

    model, tokenizer = loaded(tiny_encoder)
    pooling = read_pooling(tiny_encoder)
    with torch.no_grad():
        q = embed(model, tokenize(tokenizer, queries, pooling), pooling)
        d = embed(model, tokenize(tokenizer, positives + negatives, pooling), pooling)
    ours = contrastive_losses(q, d, 20.0).mean().item()
    assert abs(ours - expected) < 1e-5
    assert expected > 0.01  # a random model does not already rank perfectly: the comparison means something


def test_cosine_loss_equals_sentence_transformers_and_scored_pairs_are_read(tmp_path, tiny_encoder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    write_jsonl(tmp_path / "train.jsonl", [{"sentence1": f"a cat number {i}", "sentence2": f"a dog {i}",
                                            "score": i / 8} for i in range(8)])
    data = prepare_pairs(embedding_cfg(tmp_path, tiny_encoder), load_tokenizer(tiny_encoder))
    assert data.scored and len(data.train) == 6
    recs = data.train.records
    st = SentenceTransformer(str(tiny_encoder), device="cpu")
    features = [st.tokenize([r.query for r in recs]), st.tokenize([r.positive for r in recs])]
    scores = torch.tensor([r.fields["score"] for r in recs])
    expected = CosineSimilarityLoss(st)(features, scores).item()
    model, tokenizer = loaded(tiny_encoder)
    pooling = read_pooling(tiny_encoder)
    with torch.no_grad():
        a = embed(model, tokenize(tokenizer, [r.query for r in recs], pooling), pooling)
        b = embed(model, tokenize(tokenizer, [r.positive for r in recs], pooling), pooling)
    assert abs(cosine_losses(a, b, scores).mean().item() - expected) < 1e-5


def test_no_batch_holds_a_positive_twice():
    from types import SimpleNamespace as R

    recs = [R(positive="p1", negative=[]), R(positive="p2", negative=["p1"]), R(positive="p1", negative=[]),
            R(positive="p3", negative=["n"]), R(positive="n", negative=[])]
    kept, dropped = distinct(recs, [0, 1, 2, 3, 4])  # collate's last line of defence
    assert kept == [0, 3] and dropped == 3
    # The epoch order is rearranged first, so repeats wait for a later batch instead of being dropped.
    six = [R(positive=f"p{k}", negative=["p0"] if k == 1 else []) for k in range(6)] * 2  # each positive twice
    texts = lambda i: [six[i].positive, *six[i].negative]  # noqa: E731
    order = [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]  # as given, every batch of 3 would repeat a text
    arranged = spread_duplicates(order, texts, 3)
    assert sorted(arranged) == sorted(order) and arranged == spread_duplicates(order, texts, 3)
    batches = [arranged[i:i + 3] for i in range(0, 12, 3)]
    assert all(distinct(six, batch)[1] == 0 for batch in batches), batches
    assert any(distinct(six, order[i:i + 3])[1] for i in range(0, 12, 3))


def test_retrieval_metrics_against_hand_values():
    ranked = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [3, 4, 5]]
    relevant = [{0}, {1}, {0}, {9}]
    m = retrieval_metrics(ranked, relevant, recall_at=(1, 2), cutoff=3)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@2"] == pytest.approx(2 / 4)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4) + 0) / 4)
    # Two relevant documents: recall counts the share found, NDCG compares with the ideal order.
    two = retrieval_metrics([[5, 0, 7]], [{0, 7}], recall_at=(1, 3), cutoff=3)
    assert two["recall@1"] == 0 and two["recall@3"] == 1
    assert two["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / 2) / (1 + 1 / math.log2(3)))
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert top_k(torch.tensor([[1.0, 0.1]]), vecs, 2) == [[0, 2]]


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_vectors_equal_sentence_transformers_and_a_wrong_pooling_stops(tmp_path, mode, one_thread):
    folder = make_tiny_encoder(tmp_path, Pooling(mode, normalize=mode == "mean", max_seq_length=16))
    model, tokenizer = loaded(folder)
    assert check_parity(model, tokenizer, folder, read_pooling(folder), CPU) >= 0.999
    wrong = Pooling("cls" if mode == "mean" else "mean", max_seq_length=16)
    with pytest.raises(ModelError, match="differ from sentence-transformers"):
        check_parity(model, tokenizer, folder, wrong, CPU)


def test_builtin_minilm_matches_sentence_transformers(one_thread):
    from transformers import AutoModel

    from tuneforge.models.resolve import resolve_base_model

    folder, _ = resolve_base_model("minilm-l6")
    pooling = read_pooling(folder)
    assert pooling == Pooling("mean", normalize=True, max_seq_length=256)
    model = AutoModel.from_pretrained(str(folder)).eval()
    assert check_parity(model, load_tokenizer(folder), folder, pooling, CPU) >= 0.9999


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n: int) -> list[dict]:
    return [{"query": f"what is code zq{i}x", "positive": f"zq{i}x is item number {i} of the catalogue",
             "negative": f"item {i + 1} of another list"} for i in range(n)]


def embedding_cfg(tmp_path, model_dir, **over):
    raw = {"task": "embedding", "base_model": str(model_dir), "datasets": [{"path": str(tmp_path / "train.jsonl")}],
           "validation": {"split": 0.25}, "max_seq_len": 32, "micro_batch_size": 4, "max_steps": 4,
           "learning_rate": 1e-3, "output_dir": str(tmp_path / "run"), "device": "cpu", "precision": "fp32",
           "adapter": "full", **over}
    return config_from_dict(raw, base=tmp_path)


def test_bad_records_are_named_by_file_and_line(tmp_path, tiny_encoder):
    rows = pairs(6)
    rows[2] = {"query": "no positive here"}
    write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = load_tokenizer(tiny_encoder)
    with pytest.raises(DataError, match=r"train.jsonl:3: missing field 'positive'"):
        prepare_pairs(embedding_cfg(tmp_path, tiny_encoder), tokenizer)
    data = prepare_pairs(embedding_cfg(tmp_path, tiny_encoder, on_bad_record="skip", max_bad_fraction=0.5), tokenizer)
    assert [(r.line, r.reason) for r in data.rejected] == [(3, "missing field 'positive' (or 'sentence2')")]
    assert len(data.train) + len(data.validation) == 5


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_encoder):
    from tuneforge.train.loop import train

    tmp_path = tmp_path_factory.mktemp("full")
    write_jsonl(tmp_path / "train.jsonl", pairs(16))
    manifest = train(embedding_cfg(tmp_path, tiny_encoder, eval_every=2), reporter=QUIET)
    return tmp_path / "run", manifest


TEXTS = ["what is code zq3x", "an unrelated sentence"]


def test_full_run_writes_a_sentence_transformers_folder_with_identical_vectors(full_run, tiny_encoder):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    run, manifest = full_run
    before, after = (json.loads((run / f"eval_{w}.json").read_text()) for w in ("before", "after"))
    for key in ("val_loss", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        assert key in before and key in after
    assert after["queries"] == 4 and after["corpus_size"] == 4
    assert manifest["final_metrics"]["val_loss"] is not None
    final = run / "final"
    theirs = SentenceTransformer(str(final), device="cpu").encode(TEXTS, convert_to_tensor=True)
    model = AutoModel.from_pretrained(str(final))
    ours = encode_texts(model, load_tokenizer(final), TEXTS, read_pooling(final), CPU)
    assert torch.allclose(ours, theirs.cpu(), atol=1e-5)
    base = encode_texts(AutoModel.from_pretrained(str(tiny_encoder)), load_tokenizer(tiny_encoder), TEXTS,
                        read_pooling(tiny_encoder), CPU)
    assert not torch.allclose(ours, base, atol=1e-3)  # training changed the vectors


def test_serve_answers_openai_embeddings_with_the_tuned_vectors(full_run):
    import threading

    import openai
    from sentence_transformers import SentenceTransformer

    from tuneforge.serve import make_server

    run, _ = full_run
    expected = SentenceTransformer(str(run / "final"), device="cpu").encode(TEXTS, convert_to_tensor=True).cpu()
    server = make_server(run, port=0, quiet=True, device="cpu")
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as client:
            for fmt in ("float", openai.NOT_GIVEN):  # the client asks for base64 when not told otherwise
                got = client.embeddings.create(model="run", input=TEXTS, encoding_format=fmt)
                assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 0
                assert torch.allclose(torch.tensor([d.embedding for d in got.data]), expected, atol=1e-5)
            one = client.embeddings.create(model="run", input=TEXTS[0], encoding_format="float")
            assert torch.allclose(torch.tensor(one.data[0].embedding), expected[0], atol=1e-5)
            with pytest.raises(openai.BadRequestError, match="input"):
                client.embeddings.create(model="run", input=[])
            with pytest.raises(openai.BadRequestError, match="embedding model.*POST /v1/embeddings"):
                client.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_lora_run_adapter_and_merged_export_give_the_tuned_vectors(tmp_path, tiny_encoder):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from tuneforge.errors import TuneforgeError
    from tuneforge.export.run_export import export_run, verify_run_export
    from tuneforge.models.run import open_run
    from tuneforge.train.loop import train

    write_jsonl(tmp_path / "train.jsonl", pairs(12))
    train(embedding_cfg(tmp_path, tiny_encoder, adapter="lora", learning_rate=1e-2,
                        evaluation={"before_after": False}), reporter=QUIET)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "modules.json").is_file()
    texts = ["what is code zq3x", "an unrelated sentence"]
    tuned = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_encoder)), str(final))
    ours = encode_texts(tuned, load_tokenizer(final), texts, read_pooling(final), CPU)
    run = open_run(tmp_path / "run")
    out = export_run(run, "hf", tmp_path / "export", dtype="float32")
    merged = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True).cpu()
    assert torch.allclose(ours, merged, atol=1e-5)
    assert verify_run_export(run, "hf", out, dtype="float32")["cosine"] > 0.9999  # what `tuneforge export` checks
    with pytest.raises(TuneforgeError, match="--to gguf"):
        export_run(run, "gguf", tmp_path / "gguf")
    base = encode_texts(AutoModel.from_pretrained(str(tiny_encoder)), load_tokenizer(tiny_encoder), texts,
                        read_pooling(tiny_encoder), CPU)
    assert not torch.allclose(ours, base, atol=1e-4)


def test_resume_is_bit_exact_with_repeated_positives(tmp_path, tiny_encoder):
    from safetensors.torch import load_file

    from tuneforge.train.loop import train

    rows = [{"query": f"question {i} about zq{i % 6}x", "positive": f"zq{i % 6}x is item {i % 6}"} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    over = {"max_steps": 6, "save_every": 2, "keep_last": 5, "validation": None, "evaluation": {"before_after": False}}
    train(embedding_cfg(tmp_path, tiny_encoder, output_dir=str(tmp_path / "full"), **over), reporter=QUIET)
    cut = embedding_cfg(tmp_path, tiny_encoder, output_dir=str(tmp_path / "cut"), **over)
    assert train(cut, reporter=QUIET, stop_after=3) == {"stopped_at": 3}
    train(cut, resume=True, reporter=QUIET)
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("full", "cut")]
    steps = [[m for m in log if "loss" in m] for log in logs]
    assert [m["examples"] for m in steps[1]] == [m["examples"] for m in steps[0]]
    assert [m["loss"] for m in steps[1]] == [m["loss"] for m in steps[0]]
    assert all(m["duplicates_dropped"] == 0 for m in steps[0])  # repeats waited for a later batch
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plan_sizes_an_embedding_run_from_its_own_data(tmp_path, tiny_encoder):
    from tuneforge.plan import plan_config

    write_jsonl(tmp_path / "train.jsonl", pairs(20))
    report = plan_config(embedding_cfg(tmp_path, tiny_encoder))
    assert report.data.train_examples == 15  # 20 records, validation.split 0.25
    assert report.params > 0 and report.rows and report.rows[0].fits


def test_several_processes_are_refused_with_the_reason(tmp_path):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="task: embedding trains in one process"):
        embedding_cfg(tmp_path, tmp_path, distributed={"strategy": "ddp"})


def test_data_check_names_pair_problems_by_file_and_line(tmp_path, tiny_encoder):
    from tuneforge.cli import main
    from tuneforge.data.check import check_data

    rows = pairs(6)
    rows[1] = {"positive": "an answer without its question"}  # line 2: no query
    rows[2] = {"query": "what is zq2x", "positive": "  "}  # line 3: an empty positive
    rows[3] = {"query": "Same  Text", "positive": "same text"}  # line 4: nothing to learn
    rows.append(dict(pairs(6)[0]))  # line 7: line 1 again
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", [{"query": "what is code zq5x", "positive": "another answer"},  # leaked
                                         {"query": "fresh question", "positive": "fresh answer"},
                                         {"sentence1": "a", "sentence2": "b", "score": 4.0}])  # scored among pairs
    cfg = embedding_cfg(tmp_path, tiny_encoder, validation={"path": str(tmp_path / "val.jsonl")})
    report = check_data(cfg, load_tokenizer(tiny_encoder))
    train, val = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    found = {(f.severity, f.code, f.source, f.line) for f in report.findings}
    assert found == {("error", "bad-record", train, 2), ("error", "bad-record", train, 3),
                     ("warning", "query-is-positive", train, 4), ("warning", "duplicate", train, 7),
                     ("error", "leakage", val, 1), ("error", "mixed-kinds", val, 3),
                     ("warning", "score-range", val, 3)}, report.findings
    messages = {(f.code, f.line): f.message for f in report.findings}
    assert "missing field 'query'" in messages["bad-record", 2] and "is empty" in messages["bad-record", 3]
    assert messages["duplicate", 7].endswith(f"{train}:1") and messages["leakage", 1].endswith(f"{train}:6")
    assert report.records[train] == 7
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"task": "embedding", "base_model": str(tiny_encoder),
                                  "datasets": [{"path": train}], "output_dir": str(tmp_path / "run")}))
    assert main(["data", "check", str(config)]) != 0  # errors fail the command
