"""Stage chains: sft then dpo in one config, each stage starting from the previous one's model."""

from __future__ import annotations

import json

import pytest

from conftest import memorise_records, write_jsonl
from test_preference import preference_records
from test_train import QUIET
from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError
from tuneforge.train.stages import stage_configs, train_chain


def chain_config(tmp_path, model_dir, **over):
    write_jsonl(tmp_path / "sft.jsonl", memorise_records(16))
    write_jsonl(tmp_path / "pref.jsonl", preference_records(16))
    raw = {
        "base_model": str(model_dir), "output_dir": "chain", "device": "cpu", "precision": "fp32",
        "max_seq_len": 128, "micro_batch_size": 4, "learning_rate": 5e-3, "max_steps": 3,
        "lora": {"r": 4, "alpha": 8}, "datasets": [{"path": "sft.jsonl"}], "validation": {"split": 0.25},
        "evaluation": {"max_new_tokens": 4, "max_examples": 2},
        "stages": [{"method": "sft"}, {"method": "dpo", "datasets": [{"path": "pref.jsonl"}], "dpo": {"beta": 0.2}}],
        **over,
    }
    return config_from_dict(raw, base=tmp_path)


def test_stage_configs_lay_each_stage_over_the_top_level(tmp_path, tiny_models):
    cfg = chain_config(tmp_path, tiny_models["llama"])
    sft, dpo = stage_configs(cfg, tmp_path)
    assert (sft.method, dpo.method) == ("sft", "dpo")
    assert dpo.datasets[0].path == str(tmp_path / "pref.jsonl") and sft.datasets[0].path == str(tmp_path / "sft.jsonl")
    assert dpo.dpo.beta == 0.2 and dpo.lora.r == 4 and dpo.stages is None
    assert dpo.output_dir == str(tmp_path / "chain" / "2-dpo")


def test_a_bad_stage_is_refused_before_anything_runs(tmp_path, tiny_models):
    cfg = chain_config(tmp_path, tiny_models["llama"], stages=[{"method": "sft"}, {"method": "dpo", "dpo": {"bta": 1}}])
    with pytest.raises(ConfigError, match=r"(?s)stages\[1\].*dpo.bta: unknown key; did you mean dpo.beta"):
        stage_configs(cfg, tmp_path)
    cfg = chain_config(tmp_path, tiny_models["llama"], stages=[{"method": "sft"}, {"method": "dpo", "base_model": "x"}])
    with pytest.raises(ConfigError, match="previous stage's result"):
        stage_configs(cfg, tmp_path)


def test_sft_then_dpo_starts_from_the_sft_model_and_keeps_every_stage(tmp_path, tiny_models):
    cfg = chain_config(tmp_path, tiny_models["llama"])
    chain = train_chain(cfg, tmp_path, reporter=QUIET)
    root = tmp_path / "chain"
    assert [s["method"] for s in chain["stages"]] == ["sft", "dpo"]
    assert (root / "1-sft" / "final" / "adapter_config.json").is_file()
    assert (root / "2-dpo" / "final" / "adapter_config.json").is_file()
    dpo_run = json.loads((root / "2-dpo" / "run.json").read_text())
    assert dpo_run["base_model"]["name"] == str(root / "1-sft" / "merged")  # the DPO reference is the SFT model
    assert json.loads((root / "run.json").read_text())["final"] == str(root / "2-dpo" / "final")
    # Running the chain again finds both stages done and trains nothing.
    again = train_chain(cfg, tmp_path, reporter=QUIET)
    assert [s["final"] for s in again["stages"]] == [s["final"] for s in chain["stages"]]
