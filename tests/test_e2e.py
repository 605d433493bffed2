"""End to end on the real built-in model: it learns the quickstart format and knows when to stop."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.config import config_from_dict
from tuneforge.export.merge import merge_run
from tuneforge.models.run import open_run
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_builtin_model_learns_and_stops_and_the_merged_export_stops_too(tmp_path):
    cfg = config_from_dict(
        {
            "base_model": "smollm2-135m-instruct",
            "datasets": [{"path": str(EXAMPLES / "data" / "quickstart_train.jsonl"), "weight": 0.12}],
            "validation": {"path": str(EXAMPLES / "data" / "quickstart_test.jsonl")},
            "max_seq_len": 256, "micro_batch_size": 8, "max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 1,
            "output_dir": str(tmp_path / "run"), "device": "cpu",
            "evaluation": {"max_examples": 12, "batch_size": 12},
        },
        base=tmp_path,
    )
    manifest = train(cfg, reporter=Reporter(quiet=True))
    before, after = manifest["eval_before"], manifest["eval_after"]
    assert after["val_loss"] < before["val_loss"]
    assert after["exact_match"] >= before["exact_match"] + 0.5
    assert after["stopped"] == 1.0  # every tuned answer ends with <|im_end|>

    # R-EOS-2 / R-MRG-4: the merged folder, read by plain transformers, answers and stops by itself.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_run(open_run(tmp_path / "run"), tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    import json

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
