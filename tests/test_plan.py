"""tuneforge plan: exact parameter and byte counts on tiny shapes, the orderings a user relies on,
model shapes from config.json / GGUF / the table, the data estimate, the recommendation, the
warnings, the CLI, and plan's current predictions against every measured calibration row."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import chat, tiny_config, write_jsonl
from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError, ModelError
from tuneforge.plan import plan_config
from tuneforge.plan.advice import candidates, settings_warnings
from tuneforge.plan.architectures import ARCHITECTURES, table_key
from tuneforge.plan.calibration import MEMORY_TOLERANCE, SPEED_TOLERANCE, parse_markdown, predict
from tuneforge.plan.data import examples_per_epoch, from_sample
from tuneforge.plan.gguf_header import read_gguf_header
from tuneforge.plan.hardware import GIB, devices, load_prices
from tuneforge.plan.memory import Settings, memory, weight_bytes
from tuneforge.plan.model import model_info, shape_from_gguf, shape_from_hf_config
from tuneforge.plan.report import cheapest, settings_from_config
from tuneforge.plan.shapes import ModelShape
from tuneforge.plan.throughput import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
# hidden 64, 2 layers, 4 heads of 16, 2 kv heads, MLP 128: every count below is done by hand from these.
TINY = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000, tied=False)
LLAMA_8B = ARCHITECTURES["llama-3.1-8b"]


# --- shapes and parameter counts -------------------------------------------------------------

def test_tiny_parameter_counts_by_hand():
    # per block: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up 64x128 each + down 128x64 = 36,864
    assert TINY.layer_linear_params() == 2 * 36_864
    assert TINY.embedding_params() == 2 * 1000 * 64  # untied: embedding and head
    assert TINY.small_params() == 2 * 2 * 64 + 64  # two norms a block and the final norm
    assert TINY.params() == 73_728 + 128_000 + 320
    # per block, r x (in + out): q 128 + k 96 + v 96 + o 128 + gate 192 + up 192 + down 192 = 1,024 r
    assert TINY.lora_params(8, "all-linear") == 2 * 8 * 1024
    assert TINY.lora_params(8, ("q_proj", "v_proj")) == 2 * 8 * (128 + 96)


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}), ("qwen2", {}), ("mistral", {}), ("gemma", {}),
    ("qwen3", {"head_dim": 32}), ("gemma2", {"head_dim": 16}), ("gemma3_text", {"head_dim": 16}),
])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_equals_the_transformers_model(arch, extra, tie):
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch in ("llama", "qwen2", "mistral", "gemma"):
        config = tiny_config(arch, 1000, tie)
    else:
        config = AutoConfig.for_model(arch, vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=tie, **extra)
    shape, note = shape_from_hf_config(json.loads(config.to_json_string()))
    model = AutoModelForCausalLM.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert note == ""


def test_lora_parameters_equal_what_peft_trains():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", 1000)
    shape, _ = shape_from_hf_config(json.loads(config.to_json_string()))
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=targets))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert shape.lora_params(4, targets) == trained


def test_mixture_of_experts_and_incomplete_configs_are_refused_by_name():
    with pytest.raises(ModelError, match="mixture-of-experts"):
        shape_from_hf_config({"num_experts": 8, "hidden_size": 8})
    with pytest.raises(ModelError, match="intermediate_size"):
        shape_from_hf_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 9})


def test_gguf_header_of_the_builtin_model_gives_its_config_json_shape(builtin_folder):
    from tuneforge.models.resolve import builtin_gguf

    gguf_file = builtin_gguf("smollm2-135m-instruct")
    from_gguf = shape_from_gguf(read_gguf_header(gguf_file))
    from_config, _ = shape_from_hf_config(json.loads((builtin_folder / "config.json").read_text()))
    assert from_gguf == from_config
    assert from_gguf == replace(ARCHITECTURES["smollm2-135m"], name="")
    assert model_info("smollm2-135m-instruct").shape.hidden == 576


def test_gguf_header_reader_agrees_with_ggufreader():
    import gguf

    from tuneforge.models.resolve import builtin_gguf

    path = builtin_gguf("smollm2-135m-instruct")
    ours, reference = read_gguf_header(path), gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours.array_lengths[key] == len(field.data), key
        else:
            assert ours.fields[key] == pytest.approx(field.contents()), key
    assert ours.tensors == [t.name for t in reference.tensors]


def test_gguf_reader_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf_header(bad)


def test_hub_ids_match_the_table_and_unknown_ones_are_a_clear_error():
    assert table_key("meta-llama/Llama-3.1-8B-Instruct") == "llama-3.1-8b"
    assert table_key("meta-llama/Meta-Llama-3-70B") == "llama-3.1-70b"
    assert table_key("Qwen/Qwen3-8B-Base") == "qwen3-8b"
    assert table_key("google/gemma-3-4b-it") == "gemma-3-4b"
    assert table_key("mistralai/Mistral-7B-Instruct-v0.3") == "mistral-7b-v0.3"
    assert model_info("Qwen/Qwen2.5-7B-Instruct").shape == ARCHITECTURES["qwen2.5-7b"]
    with pytest.raises(ModelError) as err:
        model_info("someorg/secret-model-13b")
    message = str(err.value)
    assert "base_model: 'someorg/secret-model-13b'" in message and "llama-3.1-8b" in message and "qwen3-8b" in message


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        model_info(str(tmp_path))


# --- memory ----------------------------------------------------------------------------------

def test_weight_bytes_are_parameters_times_bytes_per_parameter():
    lora, full = Settings(adapter="lora"), Settings(adapter="full")
    assert memory(TINY, lora, "bf16").weights == TINY.params() * 2
    assert memory(TINY, lora, "fp32").weights == TINY.params() * 4
    assert memory(TINY, full, "bf16").weights == TINY.params() * 4  # trained weights stay fp32 under autocast


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("compute", ["bf16", "fp16", "fp32"])
def test_weight_bytes_follow_models_load_weights_dtype(method, compute):
    from tuneforge.models.load import weights_dtype

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute]
    assert weight_bytes(method, compute) == torch.empty(0, dtype=weights_dtype(method, dtype)).element_size()


def test_adapter_optimizer_and_gradients_of_lora_are_exact():
    s = Settings(adapter="lora", lora_r=8)
    m = memory(TINY, s, "bf16")
    adapter = 2 * 8 * 1024
    assert (m.adapter, m.gradients, m.optimizer) == (adapter * 4, adapter * 4, adapter * 8)
    assert memory(TINY, replace(s, optimizer="adamw_8bit"), "bf16").optimizer == pytest.approx(adapter * 2.03125)


def test_nf4_weights_by_hand():
    s = Settings(adapter="qlora", bits=4, double_quant=False)
    linear = TINY.layer_linear_params()
    rest = (TINY.embedding_params() + TINY.small_params()) * 2
    assert memory(TINY, s, "bf16").weights == pytest.approx(linear * (0.5 + 4 / 64) + rest)
    dq = memory(TINY, replace(s, double_quant=True), "bf16").weights
    assert dq == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + rest)


def test_qlora_below_lora_below_full():
    base = Settings(micro_batch=4, seq_len=2048)
    peaks = [memory(LLAMA_8B, replace(base, adapter=m), "bf16").peak for m in ("qlora", "lora", "full")]
    assert peaks[0] < peaks[1] < peaks[2]
    assert memory(LLAMA_8B, replace(base, adapter="qlora", bits=8), "bf16").peak < peaks[1]


def test_gradient_checkpointing_lowers_activations_and_costs_a_forward():
    s = Settings(micro_batch=4, seq_len=2048)
    plain, ckpt = memory(LLAMA_8B, s, "bf16"), memory(LLAMA_8B, replace(s, checkpointing=True), "bf16")
    assert ckpt.activations < plain.activations / 5
    assert ckpt.peak < plain.peak
    extra = flops_per_token(LLAMA_8B, replace(s, checkpointing=True), 2048) - flops_per_token(LLAMA_8B, s, 2048)
    assert extra == pytest.approx(flops_per_token(LLAMA_8B, s, 2048) / 2, rel=0.01)  # LoRA: 2 forwards -> 3


def test_activations_and_logits_grow_linearly_with_the_micro_batch():
    one, four = (memory(LLAMA_8B, Settings(micro_batch=n, seq_len=1024, padded=False), "bf16") for n in (1, 4))
    assert four.logits == 4 * one.logits == 4 * 1024 * 128256 * 12
    assert four.activations == pytest.approx(4 * one.activations, rel=0.01)


def test_full_fine_tuning_flops_are_six_n_and_lora_four_n_without_attention():
    n = LLAMA_8B.matmul_params()
    full = flops_per_token(LLAMA_8B, Settings(adapter="full"), 0)
    lora = flops_per_token(LLAMA_8B, Settings(adapter="lora", lora_r=1, lora_targets=()), 0)
    assert full == 6 * n and lora == 4 * n


# --- data ------------------------------------------------------------------------------------

def test_examples_per_epoch_counts_like_epoch_order():
    from tuneforge.data.batching import epoch_order

    sizes, weights = [40, 25, 7], [1.0, 0.5, 2.3]
    assert examples_per_epoch(sizes, weights) == len(epoch_order(sizes, weights, seed=3, epoch=0))


def _chat_config(tmp_path, n: int, cache: bool = False):
    records = [chat(f"Question {i}: " + "word " * (i % 17), "answer " * (1 + i % 5)) for i in range(n)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    return config_from_dict({"datasets": [{"path": str(path)}], "max_seq_len": 512, "prepare": {"cache": cache}})


def test_a_sample_extrapolates_to_the_whole_file_and_reading_it_all_is_exact(tmp_path, smol_tokenizer):
    from tuneforge.data.dataset import prepare_data

    cfg = _chat_config(tmp_path, 600)
    exact = prepare_data(cfg, smol_tokenizer)
    whole = from_sample(cfg, smol_tokenizer, limit=1000)
    assert whole.exact and whole.train_examples == len(exact.train)
    assert np.array_equal(whole.lengths, exact.train.lengths)
    assert whole.tokens_per_epoch == pytest.approx(exact.train.lengths.sum())
    sampled = from_sample(cfg, smol_tokenizer, limit=100)
    assert not sampled.exact and "first 100 of about" in sampled.how
    assert sampled.train_examples == pytest.approx(600, rel=0.1)
    assert sampled.tokens_per_epoch == pytest.approx(exact.train.lengths.sum(), rel=0.15)


def test_a_sample_states_an_error_that_covers_the_whole_files_count(tmp_path, smol_tokenizer):
    rng = np.random.default_rng(1)
    records = [chat("word " * int(rng.integers(0, 40)), "answer " * int(rng.integers(1, 60))) for _ in range(3000)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = config_from_dict({"datasets": [{"path": str(path)}], "max_seq_len": 512})
    whole = from_sample(cfg, smol_tokenizer, limit=5000)
    assert whole.exact and whole.relative_error == 0.0
    stated = []
    for k in (50, 200, 1000):
        sampled = from_sample(cfg, smol_tokenizer, limit=k)
        assert abs(sampled.tokens_per_epoch / whole.tokens_per_epoch - 1) <= sampled.relative_error
        assert f"tokens +-{sampled.relative_error:.1%} (95%" in sampled.how
        stated.append(sampled.relative_error)
    assert stated == sorted(stated, reverse=True)  # a larger sample, a smaller error


def test_the_prepared_data_cache_is_found_and_read_exactly(tmp_path, monkeypatch, smol_tokenizer):
    from tuneforge.data.dataset import prepare_data
    from tuneforge.plan.data import data_estimate

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    cfg = _chat_config(tmp_path, 300, cache=True)
    assert "tokenized now" in data_estimate(cfg, smol_tokenizer).how
    prepared = prepare_data(cfg, smol_tokenizer)
    cached = data_estimate(cfg, smol_tokenizer)
    assert cached.exact and "prepared-data cache" in cached.how
    assert np.array_equal(cached.lengths, prepared.train.lengths)
    assert cached.trained_tokens_per_epoch == prepared.train.trained_tokens()


@pytest.mark.parametrize("style", ["smol", "qwen"])
def test_the_quick_tokenizer_is_the_one_autotokenizer_picks(tiny_models, builtin_folder, style, tmp_path, monkeypatch):
    import tuneforge.models.load as load
    from tuneforge.data.dataset import _tokenizer_fingerprint
    from tuneforge.plan.data import load_tokenizer_quickly

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    folder = builtin_folder if style == "smol" else tiny_models["qwen2"]
    ordinary = load.load_tokenizer(folder)
    first = load_tokenizer_quickly(folder)  # the ordinary way, remembering the class
    monkeypatch.setattr(load, "load_tokenizer", None)  # the second load must not need it
    second = load_tokenizer_quickly(folder)
    assert type(first) is type(second) is type(ordinary)
    assert _tokenizer_fingerprint(first) == _tokenizer_fingerprint(second) == _tokenizer_fingerprint(ordinary)


def test_plan_on_a_local_folder_reads_its_config_and_tokenizer(tiny_models, tmp_path):
    cfg = _quickstart(base_model=str(tiny_models["llama"]))
    report = plan_config(cfg, gpus=["h100"])
    assert report.model.source.startswith("config.json of")
    assert report.model.shape.hidden == 64 and report.data.exact
    assert not any("stand-in" in n for n in report.notes)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    report = plan_config(_quickstart(base_model=str(bare)), gpus=["h100"])
    assert report.model.shape.hidden == 64 and any("stand-in" in n for n in report.notes)


# --- devices, prices, recommendation ---------------------------------------------------------

def test_gpu_names_and_price_files(tmp_path):
    assert [d.name for d in devices(["a100"])] == ["A100-80GB", "A100-40GB"]
    with pytest.raises(ConfigError, match="no such device"):
        devices(["b200"])
    prices = tmp_path / "prices.yaml"
    prices.write_text("prices:\n  h100 80gb: 1.5\n  T4: null\n")
    loaded = load_prices(prices)
    assert loaded["H100-80GB"] == 1.5 and loaded["T4"] is None and loaded["A10G"] == load_prices()["A10G"]
    prices.write_text("B200: 5\n")
    with pytest.raises(ConfigError, match="unknown device 'B200'"):
        load_prices(prices)


def _quickstart(**changes):
    raw = {"base_model": "smollm2-135m-instruct", "datasets": [{"path": str(ROOT / "examples/data/quickstart_train.jsonl")}],
           "validation": {"path": str(ROOT / "examples/data/quickstart_test.jsonl")}, "max_seq_len": 256,
           "micro_batch_size": 8, "learning_rate": 1e-3, **changes}
    return config_from_dict(raw)


def _prices(tmp_path, **prices) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in prices.items()) + "\n")
    return path


def test_the_recommendation_is_the_cheapest_gpu_that_fits(tmp_path):
    # Llama-3.1-8B LoRA does not fit a T4 (16 GB of bf16 weights); make the T4 by far the cheapest.
    cfg = _quickstart(base_model="meta-llama/Llama-3.1-8B-Instruct")
    report = plan_config(cfg, prices=_prices(tmp_path, **{"T4": 0.0001, "H100-80GB": 0.01}))
    rows = {r.device.name: r for r in report.rows}
    assert not rows["T4"].fits and rows["H100-80GB"].fits
    rec = report.recommendation
    assert rec.device.name == "H100-80GB" and rec.fits and rec.changes == []
    assert rec.cost == min(r.cost for r in report.rows if r.fits and r.cost is not None)


def test_when_nothing_fits_as_given_the_search_finds_settings_that_do():
    cfg = _quickstart(base_model="llama-3.1-70b", max_seq_len=2048)
    report = plan_config(cfg, gpus=["h100", "a100-80", "l40s"])
    assert not any(r.fits for r in report.rows)
    rec = report.recommendation
    assert rec is not None and rec.fits and "adapter: qlora (4-bit NF4 base)" in rec.changes
    assert rec.memory.peak <= rec.device.usable_bytes()
    assert rec.cost == min(r.cost for r in report.fitted.values() if r is not None)


def test_cheapest_without_prices_is_the_fastest_gpu():
    cfg = _quickstart()
    report = plan_config(cfg, gpus=["h100", "t4"])
    unpriced = [replace(r, cost=None) for r in report.rows]
    assert cheapest(unpriced).device.name == "H100-80GB"


def test_candidates_keep_the_effective_batch_and_go_from_small_to_big_changes():
    s = Settings(adapter="lora", micro_batch=8, grad_accum=2)
    options = candidates(s)
    assert options[0] == (s, [])
    assert all(o.micro_batch * o.grad_accum >= 16 for o, _ in options)
    kinds = [("qlora" if o.adapter == "qlora" else "ckpt" if o.checkpointing else "batch") for o, _ in options]
    assert kinds == sorted(kinds, key=["batch", "ckpt", "qlora"].index)


# --- settings and warnings -------------------------------------------------------------------

def test_settings_read_new_config_keys_when_they_exist():
    cfg = _quickstart()
    s, notes = settings_from_config(cfg, 100, True)
    assert (s.adapter, s.optimizer, s.bits) == ("lora", "adamw", 4) and notes == []
    newer = SimpleNamespace(**{**{k: getattr(cfg, k) for k in type(cfg).model_fields},
                               "quantization": SimpleNamespace(bits=8, double_quant=False),
                               "optimizer": "paged_adamw_8bit"})
    newer.adapter = "qlora"
    s, _ = settings_from_config(newer, 100, True)
    assert (s.adapter, s.bits, s.double_quant, s.optimizer) == ("qlora", 8, False, "paged_adamw_8bit")


def test_warnings_trigger_on_settings_known_to_fail_and_not_on_sane_ones():
    lora, full = Settings(adapter="lora", lora_r=4), Settings(adapter="full")
    args = dict(over_share=0.0, max_seq_len=2048, truncation="drop")
    assert settings_warnings(Settings(lora_r=16), 2e-4, 5000, 5e6, **args) == []
    few = settings_warnings(Settings(), 2e-4, 120, 1e5, **args)
    assert len(few) == 1 and "120 training examples" in few[0]
    rank = settings_warnings(lora, 2e-4, 50_000, 100e6, **args)
    assert len(rank) == 1 and "lora.r=4 is low" in rank[0] and "lora.r=32" in rank[0]
    assert "far above" in settings_warnings(full, 2e-4, 5000, 5e6, **args)[0]
    assert "far above" in settings_warnings(Settings(), 1e-2, 5000, 5e6, **args)[0]
    assert "far below" in settings_warnings(Settings(), 1e-6, 5000, 5e6, **args)[0]
    cut = settings_warnings(Settings(), 2e-4, 5000, 5e6, over_share=0.2, max_seq_len=512, truncation="drop")
    assert "20% of the examples are longer than max_seq_len 512 and are dropped" in cut[0]


def test_learning_rate_advice_follows_the_kind_of_training():
    args = dict(over_share=0.0, max_seq_len=2048, truncation="drop")
    scratch, continued = Settings(adapter="full", init="random", family="pretrain"), Settings(adapter="full", family="pretrain")
    assert settings_warnings(scratch, 3e-3, 5000, 5e6, **args) == []  # a tiny model from random weights: usual
    [high] = settings_warnings(continued, 3e-3, 5000, 5e6, **args)
    assert "far above the usual range for continued pre-training" in high and "1e-05 to 0.0003" in high
    [low] = settings_warnings(scratch, 1e-5, 5000, 5e6, **args)
    assert "far below the usual range for training from random weights (0.0001 to 0.003)" in low
    assert "far above" in settings_warnings(Settings(family="preference"), 1e-3, 5000, 5e6, **args)[0]


def test_plan_warns_of_every_learning_rate_the_runs_diagnosis_flags():
    """One table: plan (before the run) warns nearer the usual range than the diagnosis (during it), never farther."""
    from tuneforge.methods.learning_rates import USUAL_LR
    from tuneforge.track.diagnose import check_learning_rate

    method = {"sft": "sft", "preference": "dpo", "grpo": "grpo", "classifier": "classification", "pretrain": "pretrain"}
    args = dict(over_share=0.0, max_seq_len=2048, truncation="drop")
    for family, kind in USUAL_LR:
        adapter, init = ("lora", "pretrained") if kind == "lora" else ("full", "random" if kind == "scratch" else "pretrained")
        s = Settings(adapter=adapter, init=init, family=family)
        for lr in (10.0 ** (e / 4) for e in range(-40, 1)):
            if check_learning_rate(lr, method[family], adapter, init) is not None:
                assert any("learning_rate" in w for w in settings_warnings(s, lr, 5000, 5e6, **args)), (family, kind, lr)


def test_plan_of_a_model_from_random_weights_names_it_and_counts_it_in_thousands(tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.plan.render import parameters

    raw = {"base_model": "llama", "init": "random", "adapter": "full", "method": "pretrain",
           "architecture": {"depth": 2}, "tokenizer": {"train": {"vocab_size": 611}}, "max_seq_len": 128,
           "micro_batch_size": 16, "max_steps": 150, "learning_rate": 3e-3, "precision": "fp32"}
    config = tmp_path / "pretrain.yaml"
    config.write_text(json.dumps(raw))
    flags = ["plan", str(config), "--tokens", "100000", "--gpu", "h100", "cpu"]
    assert main([*flags, "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["model"]["params"]
    assert main(flags) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert 1e5 < params < 1e6 and f"{params / 1e3:,.0f}K parameters, {params / 1e3:,.0f}K trained" in out
    assert "Settings training from random weights, adamw" in out
    assert "full fine-tuning" not in out and "learning_rate" not in out
    assert [parameters(n) for n in (603_136, 4_881_408, 999)] == ["603K", "4.88M", "999"]
    assert [parameters(n) for n in (3_412_000, 22_713_216, 134_515_008, 8_030_261_248)] == \
        ["3.41M", "22.7M", "135M", "8.03B"]  # three significant figures throughout


# --- the command -----------------------------------------------------------------------------

def test_plan_command_end_to_end_on_the_quickstart(capsys):
    from tuneforge.cli import main

    config = str(ROOT / "examples/quickstart.yaml")
    assert main(["plan", config]) == 0
    out = capsys.readouterr().out
    for text in ("smollm2-135m-instruct", "H100-80GB", "RTX-3090", "CPU", "Recommended:", "only 400 training examples"):
        assert text in out
    assert main(["plan", config, "--json", "--gpu", "h100", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in report["devices"]] == ["H100-80GB", "CPU"]
    assert report["data"]["train_examples"] == 400
    h100 = report["devices"][0]
    assert h100["fits"] and h100["memory_bytes"]["peak"] < 4 * GIB
    assert report["recommendation"]["device"] == "H100-80GB"


def test_plan_command_reports_a_bad_gpu_name(capsys):
    from tuneforge.cli import main

    assert main(["plan", str(ROOT / "examples/quickstart.yaml"), "--gpu", "b200"]) == 2
    assert "--gpu b200: no such device" in capsys.readouterr().err


# --- calibration -----------------------------------------------------------------------------

def test_predictions_agree_with_every_measured_calibration_row():
    rows = parse_markdown((ROOT / "bench/PLAN_CALIBRATION.md").read_text())
    measured = [r for r in rows if r.peak_mib is not None]
    assert measured, "bench/PLAN_CALIBRATION.md has no measured row"
    failures = []
    for row in measured:
        peak, tokens_per_s = predict(row)
        if abs(peak / row.peak_mib - 1) > MEMORY_TOLERANCE:
            failures.append(f"{row}: predicted peak {peak:.0f} MiB")
        if row.tokens_per_s is not None and abs(tokens_per_s / row.tokens_per_s - 1) > SPEED_TOLERANCE:
            failures.append(f"{row}: predicted {tokens_per_s:.1f} tokens/s")
    assert not failures, "\n".join(failures)


def test_preference_methods_plan_two_sequences_per_example(tmp_path):
    """A DPO micro-batch of 4 pairs runs 8 sequences: activations and logits double, steps per epoch do not."""
    from tuneforge.plan.report import settings_from_config

    base = {"datasets": [{"path": "p.jsonl"}], "micro_batch_size": 4, "performance": "off"}
    sft, _ = settings_from_config(config_from_dict(base, base=tmp_path), 256, True)
    dpo, notes = settings_from_config(config_from_dict({**base, "method": "dpo"}, base=tmp_path), 256, True)
    assert (sft.rows, dpo.rows, dpo.micro_batch) == (1, 2, 4)
    shape, _ = shape_from_hf_config(json.loads(tiny_config("llama", 1000).to_json_string()))
    m_sft, m_dpo = memory(shape, sft, "fp32"), memory(shape, dpo, "fp32")
    assert m_dpo.logits == pytest.approx(2 * m_sft.logits)
    assert m_dpo.activations > m_sft.activations
    assert any("reference model" in n for n in notes)


def test_plan_counts_the_chunked_loss_that_the_run_will_use(tmp_path):
    """SFT runs the chunked loss by default: one chunk of logits instead of all of them."""
    from tuneforge.fast import default_chunk
    from tuneforge.plan.report import settings_from_config

    base = {"datasets": [{"path": "p.jsonl"}], "micro_batch_size": 4}
    fast, _ = settings_from_config(config_from_dict(base, base=tmp_path), 2048, False)
    plain, _ = settings_from_config(config_from_dict({**base, "performance": "off"}, base=tmp_path), 2048, False)
    assert fast.chunked_loss and not plain.chunked_loss
    shape = model_info("llama-3.1-8b").shape
    chunk = default_chunk(shape.vocab)
    assert memory(shape, fast, "bf16").logits == pytest.approx(chunk * shape.vocab * 8 + 4 * 2048 * shape.hidden * 4)
    assert memory(shape, plain, "bf16").logits == pytest.approx(4 * 2048 * shape.vocab * 12)


def test_a_gguf_models_tokenizer_is_read_once_then_from_a_folder(tmp_path, monkeypatch):
    """Reading a GGUF vocabulary takes seconds; plan keeps it as a tokenizer folder, keyed by the file."""
    from transformers import AutoTokenizer

    from tuneforge.models.resolve import builtin_gguf
    from tuneforge.plan.data import gguf_tokenizer_folder

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    gguf = builtin_gguf("smollm2-135m-instruct")
    folder = gguf_tokenizer_folder(gguf)
    made = (folder / "tokenizer.json").stat().st_mtime_ns
    assert gguf_tokenizer_folder(gguf) == folder and (folder / "tokenizer.json").stat().st_mtime_ns == made
    text = "Mei Haddad, 18, lives in Lisbon. <|im_end|> ünïcode"
    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert AutoTokenizer.from_pretrained(str(folder))(text).input_ids == original(text).input_ids


def test_a_fresh_machines_first_plan_loads_the_gguf_tokenizer_without_autotokenizer(tmp_path, monkeypatch):
    """AutoTokenizer on a GGUF reads every tensor header and the model config (9 s of a 2-core machine's
    first plan); the folder is written from the tokenizer metadata, and the first load names its class."""
    import transformers

    import tuneforge.models.load
    from tuneforge.models.resolve import builtin_gguf
    from tuneforge.plan.data import gguf_tokenizer_folder, load_tokenizer_quickly

    gguf = builtin_gguf("smollm2-135m-instruct")
    original = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer was used")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(tuneforge.models.load, "load_tokenizer", refuse)
    tokenizer = load_tokenizer_quickly(gguf_tokenizer_folder(gguf))
    text = "Mei Haddad, 18, lives in Lisbon. <|im_end|> ünïcode"
    assert tokenizer(text).input_ids == original(text).input_ids
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template) == (
        original.eos_token, original.eos_token, original.chat_template)


def test_plan_never_imports_torch():
    """torch's import alone is a second on a small machine: plan answers from shapes and token counts."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = ("import sys; from tuneforge.cli import main; main(['plan', 'examples/quickstart.yaml']); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    # The first run for a model may need transformers' tokenizer-class lookup (which imports torch);
    # plan remembers its answer, and from the second run on, torch stays out.
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "no torch"


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b"])
def test_a_table_shape_round_trips_through_its_config(name):
    """Benchmarks build their random models from hf_config_for: plan must read back the very shape."""
    from tuneforge.plan.architectures import table_shape
    from tuneforge.plan.model import hf_config_for

    shape = table_shape(name)
    back, note = shape_from_hf_config(hf_config_for(shape), name=shape.name)
    assert back == shape and note == ""


@pytest.mark.parametrize("method,measured", [("lora", 117_096 - 92_520), ("full", 129_160 - 96_392)])
def test_plan_counts_what_the_fused_kernels_save(method, measured):
    """The bytes a decoder layer of llama-3.2-1b keeps per token with the fused kernels, less than without, as
    measured by bench/kernels_memory.py (docs/performance.md); and plan's default has them on a GPU only."""
    from tuneforge.plan.architectures import table_shape
    from tuneforge.plan.recompute import for_device
    from tuneforge.plan.memory import layer_token_bytes

    shape = table_shape("llama-3.2-1b")
    plain = Settings(adapter=method, padded=False)
    saved = layer_token_bytes(shape, plain, "bf16") - layer_token_bytes(shape, replace(plain, kernels=True), "bf16")
    assert abs(saved - measured) <= 16, (saved, measured)
    default = replace(plain, kernels=None)
    assert for_device(shape, default, 80 * GIB, False, "bf16").kernels is True
    assert for_device(shape, default, 80 * GIB, True, "fp32").kernels is False
    cfg = config_from_dict({"datasets": [{"path": "d.jsonl"}]})
    assert plan_settings(cfg).kernels is None
    assert plan_settings(config_from_dict({"datasets": [{"path": "d.jsonl"}], "performance": "off"})).kernels is False


def plan_settings(cfg):
    from tuneforge.plan.report import settings_from_config

    return settings_from_config(cfg, 512, True)[0]


# --- planning before the data exists ----------------------------------------------------------

def _no_data_config(tmp_path) -> str:
    path = tmp_path / "no_data.yaml"
    path.write_text("base_model: meta-llama/Llama-3.1-8B-Instruct\nmax_seq_len: 2048\nmicro_batch_size: 4\n")
    return str(path)


def test_plan_without_datasets_is_sized_by_the_flags(tmp_path, capsys):
    from tuneforge.cli import main

    config = _no_data_config(tmp_path)
    assert main(["plan", config, "--seq-len", "1024", "--examples", "100000", "--json", "--gpu", "4090", "h100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["train_examples"] == 100_000 and report["data"]["tokens_per_epoch"] == 1024 * 100_000
    assert report["model"]["shape"]["name"] == "llama-3.1-8b"
    rows = {d["device"]: d for d in report["devices"]}
    assert rows["RTX-4090"]["fits"] and rows["RTX-4090"]["settings"]["seq_len"] == 1024
    h100 = rows["H100-80GB"]  # the whole run costs about a hundred million tokens' worth
    assert h100["cost"] == pytest.approx(h100["cost_per_million_tokens"] * 102.4, rel=0.01)
    # --tokens alone: packed, max_seq_len-long examples; the same tokens as 50,000 x 2048.
    assert main(["plan", config, "--tokens", "102400000", "--json", "--gpu", "h100"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert packed["data"]["train_examples"] == 50_000 and packed["settings"]["seq_len"] == 2048


def test_plan_without_datasets_or_flags_says_which_flags_to_pass(tmp_path, capsys):
    from tuneforge.cli import main

    config = _no_data_config(tmp_path)
    assert main(["plan", config]) == 2
    err = capsys.readouterr().err
    assert "datasets: required key is missing" in err and "--seq-len L --examples N (or --tokens N)" in err
    assert main(["plan", config, "--examples", "500"]) == 2
    assert "--examples 500 needs --seq-len" in capsys.readouterr().err
    assert main(["validate", config]) == 2  # only plan may go without data

