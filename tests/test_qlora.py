"""QLoRA on CPU with bitsandbytes: a tiny Llama trains on a 4-bit (and 8-bit) base, resumes exactly,
and merges onto the dequantized base so the merged model answers as the adapter did (R-MRG-1/2/3);
a reward model trains its score head whole on a 4-bit base."""

from __future__ import annotations

import json
import sys

import pytest
import bitsandbytes as bnb  # in the test extra: CI runs these tests, never skips them
import torch
from conftest import make_tiny_model, memorise_records, write_jsonl
from safetensors.torch import load_file
from test_preference import preference_records
from test_train import QUIET, make_cfg
from transformers import AutoModelForSequenceClassification

from tuneforge.cli import main
from tuneforge.data.dataset import prepare_data
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.export.merge import merge_run
from tuneforge.export.merge_report import KL_EPSILON, MIN_IDENTICAL, merge_report
from tuneforge.export.run_export import export_run, verify_run_export
from tuneforge.methods.build import build_objective
from tuneforge.methods.run import split_metrics
from tuneforge.models.load import attach_adapter, load_model
from tuneforge.models.quantize import dequantized_model
from tuneforge.models.run import load_tuned, open_run
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints, load_checkpoint
from tuneforge.train.loop import seed_everything, train
from tuneforge.train.optim import build_optimizer

CPU = torch.device("cpu")
QUIET_EVAL = {"evaluation.before_after": False, "lora.dropout": 0.0}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tokenizers):
    """A 4-bit QLoRA run with 32 held-out prompts (the R-MRG-1 prompt count)."""
    tmp = tmp_path_factory.mktemp("qlora_run")
    write_jsonl(tmp / "train.jsonl", memorise_records(64))
    model_dir = make_tiny_model(tmp / "llama", "llama", tokenizers["smol"])
    cfg = make_cfg(tmp, model_dir, adapter="qlora", max_steps=10, learning_rate=2e-2, validation={"split": 0.5},
                   **{"lora.dropout": 0.0, "evaluation.max_examples": 2})
    manifest = train(cfg, reporter=QUIET)
    return cfg, tmp / "run", model_dir, manifest


def test_a_tiny_llama_trains_on_a_4bit_nf4_base_on_cpu(qlora_run):
    cfg, run_dir, model_dir, manifest = qlora_run
    losses = [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert manifest["eval_after"]["val_loss"] < manifest["eval_before"]["val_loss"]
    assert manifest["config"]["quantization"] == {"bits": 4, "double_quant": True, "quant_type": "nf4",
                                                  "storage": "auto"}
    base = load_model(model_dir, CPU, quantization=cfg.quantization)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}


def test_run_json_lists_adapted_and_skipped_weights(qlora_run):
    """R-FEAT-4: which weights got an adapter, grouped, with counts; the output head is named but not counted."""
    report = qlora_run[3]["adapted_modules"]
    assert report["adapted"] == {f"model.layers.*.{m}": 2 for m in (
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")}
    assert report["skipped"] == {} and report["not_counted"] == {"lm_head": 1}
    assert report["skipped_share"] == 0.0 and report["warning"] is None
    # 2 layers x (q 64x64 + k,v 32x64 + o 64x64 + gate,up,down 128x64): counted as trained, not as packed 4-bit bytes
    assert report["adapted_weights"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)


def test_evaluating_between_steps_leaves_4bit_gradients_intact(tiny_models):
    """bitsandbytes repacks 4-bit CPU weights for a bf16 kernel in eval mode (AVX512-BF16 CPUs), after
    which backward is wrong; the loop evaluates before and during training, so this must not happen."""
    from tuneforge.config import config_from_dict

    cfg = config_from_dict({"datasets": [{"path": "unused.jsonl"}], "adapter": "qlora", "lora": {"r": 4}})
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads(evaluate_first: bool):
        model = load_model(tiny_models["llama"], CPU, quantization=cfg.quantization)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        torch.manual_seed(0)
        model, _ = attach_adapter(model, cfg)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    # B starts at zero, so its gradient is the one that flows back through the quantized layers
    assert all(g.abs().sum() > 0 for n, g in plain.items() if "layers.0" in n and "lora_B" in n)
    for name, g in plain.items():
        torch.testing.assert_close(after_eval[name], g, rtol=0, atol=0)


def test_an_8bit_base_trains(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter="qlora", quantization={"bits": 8}, max_steps=8,
                   learning_rate=2e-2, **QUIET_EVAL)
    train(cfg, reporter=QUIET)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.7 * losses[0], losses
    base = load_model(tiny_models["llama"], CPU, quantization=cfg.quantization)
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


def test_qlora_with_dora_and_fp4_trains_and_reloads_in_peft(tmp_path, tiny_models):
    from peft import PeftModel

    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter="qlora", quantization={"quant_type": "fp4", "double_quant": False},
                   max_steps=4, learning_rate=2e-2, **{**QUIET_EVAL, "lora.use_dora": True})
    train(cfg, reporter=QUIET)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    ours = in_memory(cfg, tmp_path / "run", tiny_models["llama"])
    reloaded = PeftModel.from_pretrained(load_model(tiny_models["llama"], CPU, quantization=cfg.quantization),
                                         str(tmp_path / "run" / "final")).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def in_memory(cfg, run_dir, model_dir):
    """The tuned model as the loop held it: quantized base + adapter + the last checkpoint."""
    model, _ = attach_adapter(load_model(model_dir, CPU, quantization=cfg.quantization), cfg)
    load_checkpoint(list_checkpoints(run_dir)[-1], model, build_optimizer(model, cfg))
    return model.eval()


def test_qlora_resume_restores_the_adapter_bit_for_bit(tmp_path, tiny_models):
    """R-RES-3 for QLoRA: stopped after step 4 (last checkpoint at 3), resumed: same losses and same adapter."""
    over = {"adapter": "qlora", "max_steps": 6, "save_every": 3, "keep_last": 3, "lora.dropout": 0.1,
            "evaluation.before_after": False}
    full = make_cfg(tmp_path, tiny_models["llama"], out="full", **over)
    train(full, reporter=QUIET)
    cut = make_cfg(tmp_path, tiny_models["llama"], out="cut", **over)
    assert train(cut, reporter=QUIET, stop_after=4) == {"stopped_at": 4}
    ckpt = list_checkpoints(tmp_path / "cut")[-1]
    model = in_memory(cut, tmp_path / "cut", tiny_models["llama"])
    saved = load_file(ckpt / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert saved and all(torch.equal(params[n], t) for n, t in saved.items())
    train(cut, resume=True, reporter=QUIET)
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "cut"))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    fa, fb = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in ("full", "cut"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def qlora_report(qlora_run):
    """The merge report of the QLoRA run, computed once: it generates for 32 prompts on three models."""
    return merge_report(open_run(qlora_run[1]))


def test_merge_report_dequantized_target_reproduces_the_trained_model(qlora_report):
    """R-MRG-1/R-MRG-2: on 32 held-out prompts the dequantized merge has mean KL <= epsilon and >= 95%
    identical greedy outputs against the adapter on the 4-bit base; the original-weights merge is reported too."""
    report = qlora_report
    assert report["prompts"] == 32 and report["source"] == "validation set" and report["default"] == "dequantized"
    deq, orig = report["targets"]["dequantized"], report["targets"]["original"]
    assert deq["mean_kl"] <= KL_EPSILON and deq["mean_kl"] <= 1e-6
    assert deq["greedy_identical"] >= MIN_IDENTICAL and deq["matches"]
    # The 16-bit weights are not what the adapter learned against: measurably further away.
    assert orig["mean_kl"] > 100 * max(deq["mean_kl"], 1e-9)


def test_merge_cli_report_prints_both_targets(qlora_run, qlora_report, capsys, monkeypatch):
    """`tuneforge merge RUN --report` prints the report of that run (computed by the fixture above)."""
    import tuneforge.export.merge_report as module

    asked = []
    monkeypatch.setattr(module, "merge_report", lambda run, *a, **k: asked.append(run.dir) or qlora_report)
    assert main(["merge", str(qlora_run[1]), "--report"]) == 0
    assert asked == [qlora_run[1]]
    out = capsys.readouterr().out
    assert "dequantized (default)" in out and "original" in out and "mean KL" in out and "identical" in out


def test_dequantized_merge_adds_scale_b_a_to_the_dequantized_base(qlora_run, tmp_path):
    """R-MRG-1/R-MRG-3: W_merged - dequant(quant(W)) == (alpha/r) B A for every adapted module, not zero,
    and the target is recorded in the output's run.json."""
    cfg, run_dir, model_dir, _ = qlora_run
    out = merge_run(open_run(run_dir), tmp_path / "merged")
    merged = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    base = dequantized_model(model_dir, cfg.quantization).state_dict()
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
    scale = cfg.lora.alpha / cfg.lora.r
    checked = 0
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            delta = merged[name] - base[name]
            assert delta.abs().max() > 0, name
            torch.testing.assert_close(delta, scale * b @ a, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == 14
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["merge"] == {"target": "dequantized", "dtype": "float32",
                                 "base_quantization": {"bits": 4, "double_quant": True, "quant_type": "nf4",
                                                       "storage": "auto"}}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain 16/32-bit model: no bitsandbytes needed to load it


def test_original_target_is_an_explicit_choice_recorded_in_the_export(qlora_run, tmp_path):
    run = open_run(qlora_run[1])
    assert main(["merge", str(run.dir), "--merge-target", "original", "--out", str(tmp_path / "orig")]) == 0
    assert json.loads((tmp_path / "orig" / "run.json").read_text())["merge"]["target"] == "original"
    path = export_run(run, "hf", tmp_path / "hf", dtype="float32")
    assert json.loads((path / "run.json").read_text())["merge"]["target"] == "dequantized"
    check = verify_run_export(run, "hf", path, dtype="float32")  # fresh process, plain transformers, no bitsandbytes
    assert check["perplexity"] <= check["allowed"]


def test_dequantized_target_needs_a_quantized_run(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **QUIET_EVAL)
    train(cfg, reporter=QUIET)
    with pytest.raises(TuneforgeError, match="only target is original"):
        merge_run(open_run(tmp_path / "run"), tmp_path / "m", target="dequantized")


@pytest.mark.parametrize("key, raw", [
    ("adapter: qlora", {"adapter": "qlora"}),
    ("optimizer: adamw_8bit", {"optimizer": "adamw_8bit"}),
])
def test_missing_bitsandbytes_names_the_key_and_the_extra(tmp_path, tiny_models, monkeypatch, key, raw):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **raw, **QUIET_EVAL)
    with pytest.raises(ConfigError) as err:
        train(cfg, reporter=QUIET)
    assert key in str(err.value) and "tuneforge[qlora]" in str(err.value)


def by_hand_scores(model, rows: list[list[int]]) -> torch.Tensor:
    """Each row alone, unpadded: the score head on the decoder's last hidden state."""
    seqcls = model.get_base_model()
    with torch.no_grad():
        return torch.stack([seqcls.score(seqcls.model(input_ids=torch.tensor([r])).last_hidden_state)[0, -1, 0]
                            for r in rows])


def bradley_terry_by_hand(model, data, indices: list[int]) -> tuple[float, torch.Tensor]:
    """(mean -log sigmoid(chosen - rejected), chosen scores) of these training pairs."""
    chosen = by_hand_scores(model, [data.train[i].input_ids for i in indices])
    rejected = by_hand_scores(model, [data.train_rejected[i].input_ids for i in indices])
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean().item(), chosen


def test_a_reward_model_trains_on_a_4bit_base_and_reloads_its_head(tmp_path, tiny_models, tokenizers):
    """method: reward with QLoRA: a 4-bit base and a full-precision score head that trains whole beside the
    adapter. The first step's loss is Bradley-Terry on scores computed by hand; final/ reloaded on the 4-bit base
    (as serve loads it) scores the held-out pairs as the trained model did, and so does the merged export."""
    llama, tok = tiny_models["llama"], tokenizers["smol"]
    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(16))
    cfg = make_cfg(tmp_path, llama, method="reward", adapter="qlora", datasets=[{"path": str(data_file)}],
                   max_steps=3, learning_rate=1e-3, **{"lora.dropout": 0.0})
    seed_everything(cfg.seed)  # the model the loop starts from: same seeds, so the same new head
    model = load_model(llama, CPU, quantization=cfg.quantization, head="score", pad_token_id=tok.pad_token_id)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.score) is torch.nn.Linear and model.score.out_features == 1
    seed_everything(cfg.seed)
    model, _ = attach_adapter(model, cfg, save_initial=False)
    manifest = train(cfg, reporter=QUIET)

    data = prepare_data(cfg, tok)
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    step_one, chosen = bradley_terry_by_hand(model, data, first["examples"])
    assert first["loss"] == pytest.approx(step_one, rel=1e-4)
    assert first["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert manifest["eval_after"]["val_loss"] < manifest["eval_before"]["val_loss"]
    saved = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert [k for k in saved if "score" in k] == ["base_model.model.score.weight"]  # PEFT's name for the head
    assert saved["base_model.model.score.weight"].dtype == torch.float32

    tuned, _ = load_tuned(open_run(tmp_path / "run"), CPU)
    assert isinstance(tuned.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    objective = build_objective(cfg, data, tok.pad_token_id)
    trained = json.loads((tmp_path / "run" / "eval_after.json").read_text())  # the in-memory model's
    reloaded = split_metrics(objective, tuned, data, 4, CPU, torch.float32, final=True)
    assert bradley_terry_by_hand(tuned, data, first["examples"])[0] < step_one  # the same batch, after 3 steps
    out = export_run(open_run(tmp_path / "run"), "hf", tmp_path / "hf", dtype="float32")  # onto the dequantized base
    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    exported = split_metrics(objective, merged, data, 4, CPU, torch.float32, final=True)
    for key in ("val_loss", "val_rewards/chosen", "val_rewards/rejected"):
        assert reloaded[key] == pytest.approx(trained[key], abs=1e-5), key
        assert exported[key] == pytest.approx(trained[key], abs=1e-4), key


def test_a_new_head_trains_in_fp32_on_a_bf16_base(tmp_path, tiny_models, tokenizers):
    """PEFT copies the score head it trains whole in the base's dtype; under bf16 it is held in fp32 like the
    adapter, so AdamW's small updates are not rounded away."""
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="reward", adapter="qlora", precision="bf16")
    model = load_model(tiny_models["llama"], CPU, dtype=torch.bfloat16, quantization=cfg.quantization, head="score",
                       pad_token_id=tokenizers["smol"].pad_token_id)
    assert model.score.weight.dtype == torch.bfloat16
    model, _ = attach_adapter(model, cfg, save_initial=False)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.score.modules_to_save.default.weight" in trained
    assert set(trained.values()) == {torch.float32}
