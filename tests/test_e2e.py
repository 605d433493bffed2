"""End to end on the real built-in model: it learns the quickstart format and knows when to stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.config import config_from_dict
from tuneforge.export.merge import merge_run
from tuneforge.models.run import open_run
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A short LoRA run of the built-in model on part of the quickstart data, shared by the tests here."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = config_from_dict(
        {
            "base_model": "smollm2-135m-instruct",
            "datasets": [{"path": str(EXAMPLES / "data" / "quickstart_train.jsonl"), "weight": 0.12}],
            "validation": {"path": str(EXAMPLES / "data" / "quickstart_test.jsonl")},
            "max_seq_len": 256, "micro_batch_size": 8, "max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 1,
            "output_dir": str(tmp / "run"), "device": "cpu",
            "evaluation": {"max_examples": 12, "batch_size": 12},
        },
        base=tmp,
    )
    return cfg, train(cfg, reporter=Reporter(quiet=True)), tmp / "run"


def test_builtin_model_learns_and_stops_and_the_merged_export_stops_too(tuned, tmp_path):
    _, manifest, run_dir = tuned
    before, after = manifest["eval_before"], manifest["eval_after"]
    assert after["val_loss"] < before["val_loss"]
    assert after["exact_match"] >= before["exact_match"] + 0.5
    assert after["stopped"] == 1.0  # every tuned answer ends with <|im_end|>
    assert manifest["diagnoses"] == []  # a healthy run raises no diagnosis

    # R-EOS-2 / R-MRG-4: the merged folder, read by plain transformers, answers and stops by itself.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_run(open_run(run_dir), tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    record = json.loads((EXAMPLES / "data" / "quickstart_test.jsonl").read_text().splitlines()[0])
    reference = record["messages"][-1]["content"]
    ids = tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    limit = 2 * len(tok(reference).input_ids)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=limit, do_sample=False)[0, ids["input_ids"].shape[1]:]
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert gen[-1].item() in stops, tok.decode(gen)
    assert tok.decode(gen, skip_special_tokens=True).strip() == reference


def test_q8_0_gguf_of_the_tuned_model_answers_the_held_out_prompts_identically(tuned, tmp_path):
    """The quantised export, read by transformers' GGUF reader, gives the same greedy answers."""
    cfg, manifest, run_dir = tuned
    from transformers import AutoModelForCausalLM

    from tuneforge.data.dataset import prepare_data
    from tuneforge.eval.evaluate import exact_match
    from tuneforge.export.run_export import export_run
    from tuneforge.models.load import load_tokenizer

    path = export_run(open_run(run_dir), "gguf", tmp_path / "gguf", quant="q8_0")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(run_dir / "final")
    data = prepare_data(cfg, tokenizer)
    result = exact_match(model, tokenizer, data.validation, data.end_of_turn, torch.device("cpu"), max_examples=12)
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert [s["answer"] for s in result["samples"]] == [s["answer"] for s in after["samples"]]
    assert result["stopped"] == 1.0 and manifest["eval_after"]["exact_match"] == result["exact_match"]


def test_llama_cpp_gives_the_tuned_greedy_answers(tuned, tmp_path):
    """The F16 GGUF in llama.cpp itself answers held-out prompts as the tuned model did (binding optional)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from tuneforge.data.template import generation_prompt
    from tuneforge.export.run_export import export_run
    from tuneforge.models.load import load_tokenizer

    _, _, run_dir = tuned
    run = open_run(run_dir)
    path = export_run(run, "gguf", tmp_path / "gguf", quant="f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    tokenizer = load_tokenizer(run.final)
    after = json.loads((run_dir / "eval_after.json").read_text())
    records = [json.loads(x) for x in (EXAMPLES / "data" / "quickstart_test.jsonl").read_text().splitlines()[:6]]
    for record, sample in zip(records, after["samples"]):
        prompt = generation_prompt(tokenizer, record["messages"][:-1])
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if token in run.stop_ids or len(out) == 64:
                break
            out.append(token)
        assert tokenizer.decode(out, skip_special_tokens=True).strip() == sample["answer"]
