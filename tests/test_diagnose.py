"""Live diagnosis: each planted fault on a tiny model gets its diagnosis and action; a healthy run gets none."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import chat, make_tiny_model, memorise_records, write_jsonl
from safetensors.torch import load_file
from test_train import QUIET, make_cfg

from tuneforge.config import config_from_dict
from tuneforge.track.diagnose import Watch, check_learning_rate, divergence
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints
from tuneforge.train.loop import TrainingError, train

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
NO_EVAL = {"evaluation.before_after": False}
# Full fine-tuning at learning rate 10, unclipped: the loss explodes within a few steps.
DIVERGING = dict(adapter="full", learning_rate=10.0, max_grad_norm=None, warmup_steps=0, scheduler="constant", **NO_EVAL)
# At 0.9 the loss climbs slowly: a roll-back with half the learning rate recovers.
CLIMBING = {**DIVERGING, "learning_rate": 0.9}


def findings(run_dir) -> list[dict]:
    path = run_dir / "diagnosis.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def codes(run_dir) -> list[str]:
    return [f["code"] for f in findings(run_dir)]


def test_a_healthy_run_raises_no_diagnosis(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], epochs=5, eval_every=5, **NO_EVAL)
    manifest = train(cfg, reporter=QUIET)
    assert manifest["steps"] == 25  # long enough for the flat-loss, overfitting and throughput checks to look
    assert codes(tmp_path / "run") == [] and manifest["diagnoses"] == []


def test_prompts_not_masked_are_diagnosed_before_step_one(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], train_on_inputs=True, max_steps=1, **NO_EVAL)
    train(cfg, reporter=QUIET)
    [masking] = [f for f in findings(tmp_path / "run") if f["code"] == "masking"]
    assert masking["step"] == 0
    assert "prompt tokens" in masking["message"] and "train_on_inputs: false" in masking["message"]
    assert str(tmp_path / "train.jsonl") + ":" in masking["message"]


def test_end_of_turn_cut_from_the_labels_is_a_template_diagnosis(tmp_path, tiny_models):
    """Truncation that cuts every answer's end: the model would never learn to stop."""
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_seq_len=40, truncation="truncate_right", max_steps=1, **NO_EVAL)
    train(cfg, reporter=QUIET)
    [eot] = [f for f in findings(tmp_path / "run") if f["code"] == "end_of_turn"]
    assert "<|im_end|>" in eot["message"] and "never appears in the trained labels" in eot["message"]
    assert "truncation: truncate_right with max_seq_len 40" in eot["message"]


def test_flat_loss_prints_the_checklist_and_five_rendered_examples(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], learning_rate=2e-6, max_steps=10, **NO_EVAL)
    train(cfg, reporter=QUIET)
    [flat] = [f for f in findings(tmp_path / "run") if f["code"] == "flat_loss"]
    assert flat["step"] == 4  # 30% of 10 steps, and at least 4 to compare
    assert "Checklist" in flat["message"] and "train_on_inputs" in flat["message"]
    assert flat["message"].count("--- " + str(tmp_path / "train.jsonl")) == 5
    assert flat["message"].count("[[") >= 5  # the trained text of each example is marked


def test_exploding_loss_stops_cleanly_naming_step_examples_and_gradient_history(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], save_every=2, **DIVERGING)
    with pytest.raises(TrainingError) as err:
        train(cfg, reporter=QUIET)
    msg = str(err.value)
    [div] = [f for f in findings(tmp_path / "run") if f["code"] == "divergence"]
    assert div["action"] == "stop" and msg.startswith(f"step {div['step']}: ")
    assert "exploded" in msg and "Gradient norms of the steps before" in msg
    assert msg.count(str(tmp_path / "train.jsonl") + ":") == 4  # the step's four examples, by file:line
    assert "learning_rate" in codes(tmp_path / "run")  # 10 was flagged before step 1
    # The diverged step is logged, but no checkpoint of it (or after it) is written.
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == div["step"]
    assert all(int(p.name.split("-")[1]) < div["step"] for p in list_checkpoints(tmp_path / "run"))


def test_rollback_reloads_a_checkpoint_from_before_the_climb_with_half_the_learning_rate(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], save_every=2, on_divergence="rollback", **CLIMBING)
    manifest = train(cfg, reporter=QUIET)
    [div] = [f for f in findings(tmp_path / "run") if f["code"] == "divergence"]
    assert div["action"] == "rollback" and "halved" in div["message"]
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in logged] == list(range(1, 11))  # the rolled-back steps were rewritten
    resumed = [m for m in logged if m["step"] > 2]
    assert all(m["lr"] == pytest.approx(0.45) for m in resumed)  # from step-2, before the climb, at half
    assert manifest["steps"] == 10 and manifest["diagnoses"].count("divergence") == 1


def test_learning_rate_10_is_flagged_then_rolled_back_until_the_roll_backs_run_out(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], on_divergence="rollback", **DIVERGING)
    with pytest.raises(TrainingError) as err:
        train(cfg, reporter=QUIET)
    assert codes(tmp_path / "run")[0] == "learning_rate"
    actions = [f["action"] for f in findings(tmp_path / "run") if f["code"] == "divergence"]
    assert actions == ["rollback"] * 3 + ["stop"]
    assert "after 3 roll-backs" in str(err.value) and "did not help" in str(err.value)


def nan_model(tmp_path, tokenizer):
    """A tiny model whose embedding rows of the snowman character's tokens are NaN: any example with a
    snowman in it gives a NaN loss (with LoRA the embeddings are frozen, so it never heals)."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path / "nan-model", "llama", tokenizer)
    plain = set(tokenizer("Repeat please", add_special_tokens=False).input_ids)
    bad = [i for i in tokenizer("Repeat ☃ please", add_special_tokens=False).input_ids if i not in plain]
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("nan")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("on_divergence", ["stop", "rollback"])
def test_an_example_that_gives_nan_stops_the_run_with_its_file_and_line(tmp_path, tokenizers, on_divergence):
    """R-PREF-2: the NaN step is never logged as a loss (null, not 0.0), its examples are named by
    file:line, and no checkpoint holds a NaN. Rolling back cannot help an example that is NaN by
    itself: after max_rollbacks the run stops all the same."""
    folder = nan_model(tmp_path, tokenizers["smol"])
    records = memorise_records(24)
    records[13] = chat("Repeat ☃ please", "SNOWMAN")  # line 14
    write_jsonl(tmp_path / "train.jsonl", records)
    cfg = make_cfg(tmp_path, folder, validation=None, save_every=1, on_divergence=on_divergence,
                   diagnose={"max_rollbacks": 2}, **NO_EVAL)
    with pytest.raises(TrainingError, match="is not finite") as err:
        train(cfg, reporter=QUIET)
    assert f"{tmp_path / 'train.jsonl'}:14" in str(err.value)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    nan_step = logged[-1]
    assert nan_step["loss"] is None and nan_step["step"] == int(str(err.value).split(":")[0].split()[1])
    assert all(m["loss"] is not None and m["loss"] > 0 for m in logged[:-1])
    for ckpt in list_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
    actions = [f["action"] for f in findings(tmp_path / "run") if f["code"] == "divergence"]
    assert actions == (["stop"] if on_divergence == "stop" else ["rollback", "rollback", "stop"])
    if on_divergence == "rollback":
        assert "after 2 roll-backs" in str(err.value)


def overfit_cfg(tmp, model_dir, **over):
    """Training answers memorised while the held-out answers contradict them, so validation loss rises."""
    val = [chat(f"Repeat {' '.join(WORDS[: 1 + i % 8])} please", " ".join(reversed(WORDS[: 1 + i % 8])).lower())
           for i in range(8)]
    write_jsonl(tmp / "val.jsonl", val)
    return make_cfg(tmp, model_dir, validation={"path": str(tmp / "val.jsonl")}, learning_rate=2e-2,
                    epochs=6, eval_every=3, evaluation={"max_new_tokens": 4, "max_examples": 2},
                    **{"lora.dropout": 0.0}, **over)


@pytest.fixture(scope="module")
def overfitted(tmp_path_factory, tiny_models):
    """Early stopping with patience 3 lets the overfitting check see 3 rising evaluations first."""
    tmp = tmp_path_factory.mktemp("overfit")
    manifest = train(overfit_cfg(tmp, tiny_models["llama"], early_stopping={"patience": 3}), reporter=QUIET)
    return manifest, read_metrics(tmp / "run" / "metrics.jsonl"), findings(tmp / "run")


def test_memorised_data_is_diagnosed_as_overfitting(overfitted):
    _, logged, found = overfitted
    [over] = [f for f in found if f["code"] == "overfitting"]
    assert "validation loss rose for 3 evaluations" in over["message"] and "early_stopping" in over["message"]
    vals = [m["val_loss"] for m in logged if m["step"] <= over["step"] and "val_loss" in m]
    assert vals[-1] > vals[-2] > vals[-3] > vals[-4]
    trains = [m["loss"] for m in logged]
    assert sum(trains[-3:]) < sum(trains[:3])


def test_early_stopping_stops_and_final_holds_the_best_weights(overfitted):
    manifest, logged, found = overfitted
    evals = [(m["step"], m["val_loss"]) for m in logged if "val_loss" in m]
    best_step, best_val = min(evals, key=lambda e: e[1])
    assert logged[-1]["step"] == evals[-1][0] < 36  # stopped early, at an evaluation
    assert [s for s, _ in evals if s > best_step] == [s for s, _ in evals][-3:]  # patience 3
    [stop] = [f for f in found if f["code"] == "early_stop"]
    assert stop["action"] == "early_stop" and f"step {best_step}" in stop["message"]
    assert manifest["early_stopped"]["step"] == best_step
    assert manifest["eval_after"]["val_loss"] == pytest.approx(best_val, rel=1e-6)  # final/ is the best model


def test_early_stopping_survives_a_resume(overfitted, tmp_path, tiny_models):
    """Cut after the best evaluation and resumed: the same stop, and final/ is still the best model."""
    manifest, logged, _ = overfitted
    cfg = overfit_cfg(tmp_path, tiny_models["llama"], early_stopping={"patience": 3}, save_every=3)
    cut_at = manifest["early_stopped"]["step"] + 3
    assert train(cfg, reporter=QUIET, stop_after=cut_at) == {"stopped_at": cut_at}
    resumed = train(cfg, resume=True, reporter=QUIET)
    assert resumed["early_stopped"] == manifest["early_stopped"]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == logged[-1]["step"]
    assert resumed["eval_after"]["val_loss"] == pytest.approx(manifest["eval_after"]["val_loss"], rel=1e-6)


# ---- the checks alone, on step records --------------------------------------------------------


def watch(**over) -> tuple[Watch, list]:
    raw = {"datasets": [{"path": "x.jsonl"}], "max_steps": 100, **over}
    cfg = config_from_dict(raw)
    seen: list = []
    return Watch(cfg, 100, data=None, tokenizer=None, warn=lambda m: None, record=lambda s, f: seen.append(f)), seen


def steps(w: Watch, n: int, start: int = 1, **values) -> None:
    for i in range(start, start + n):
        loss = 3.0 - 0.01 * i
        assert w.after_step({"step": i, "loss": loss, "grad_norm": 1.0, "trained_tokens": 10, **values}, list) is None


def test_zero_spread_reward_groups_warn_after_n_steps_at_one():
    """R-GRPO-1: frac_zero_std is watched; N steps in a row at 1.0 give one warning."""
    w, seen = watch(diagnose={"zero_std_steps": 5})
    steps(w, 4, frac_zero_std=1.0)
    steps(w, 1, start=5, frac_zero_std=0.5)  # the run of 1.0 is broken
    assert seen == []
    steps(w, 5, start=6, frac_zero_std=1.0)
    assert [f["code"] for f in seen] == ["zero_std"] and "frac_zero_std 1.0" in seen[0]["message"]


def test_grpo_setting_sets_the_zero_spread_patience():
    grpo = {"rewards": [{"function": "exact_match"}], "zero_std_warn_steps": 3}
    w, seen = watch(method="grpo", grpo=grpo, datasets=[{"path": "x.jsonl", "format": "prompt"}])
    steps(w, 3, frac_zero_std=1.0)
    assert [f["code"] for f in seen] == ["zero_std"]


def test_frac_zero_std_reaches_the_trackers(tmp_path):
    from test_track import tensorboard_scalars

    from tuneforge.track.trackers import JsonlTracker, TensorBoardTracker, Trackers

    trackers = Trackers([JsonlTracker(tmp_path, None), TensorBoardTracker(tmp_path)], print)
    trackers.log({"step": 1, "loss": 0.1, "trained_tokens": 9, "frac_zero_std": 1.0})
    trackers.finish({}, "FINISHED")
    assert tensorboard_scalars(tmp_path / "tensorboard")["frac_zero_std"] == [(1, 1.0)]


def test_slow_data_loader_and_idle_gpu_are_diagnosed_with_a_cause():
    w, seen = watch()
    steps(w, 30, data_share=0.35, gpu_util=0.2)
    by_code = {f["code"]: f["message"] for f in seen}
    assert set(by_code) == {"loader_wait", "gpu_util"}
    assert "35%" in by_code["loader_wait"] and "Likely cause" in by_code["loader_wait"]
    assert "20%" in by_code["gpu_util"] and "micro_batch_size" in by_code["gpu_util"]


def test_fast_data_loader_and_busy_gpu_are_not():
    w, seen = watch()
    steps(w, 30, data_share=0.05, gpu_util=0.9)
    assert seen == []


def test_disabled_diagnosis_still_stops_on_nan():
    w, seen = watch(diagnose={"enabled": False})
    steps(w, 3)
    assert w.after_step({"step": 4, "loss": math.nan, "grad_norm": 1.0, "trained_tokens": 5}, lambda: ["f:1"]) == "stop"
    assert "f:1" in w.stop_message


def test_a_step_without_trained_tokens_is_diagnosed_not_counted():
    w, seen = watch()
    steps(w, 2)
    assert w.after_step({"step": 3, "loss": 0.0, "grad_norm": 0.0, "trained_tokens": 0}, lambda: ["f:7"]) is None
    assert seen[0]["code"] == "empty_step" and "f:7" in seen[0]["message"]
    assert w.steps == [1, 2]


@pytest.mark.parametrize("lr, method, adapter, flagged", [
    (2e-4, "sft", "lora", False), (1e-3, "sft", "lora", False), (0.5, "sft", "lora", True),
    (2e-5, "sft", "full", False), (1e-2, "sft", "full", True), (5e-7, "dpo", "full", False),
    (5e-4, "dpo", "full", True), (1e-9, "sft", "lora", True), (5e-6, "grpo", "lora", False),
])
def test_learning_rate_far_outside_the_usual_range(lr, method, adapter, flagged):
    assert (check_learning_rate(lr, method, adapter) is not None) == flagged


def test_learning_rate_range_follows_init_and_continued_pre_training():
    assert check_learning_rate(1e-2, "pretrain", "full", "random") is None  # a tiny model from scratch
    finding = check_learning_rate(1e-2, "pretrain", "full")  # continued pre-training of a trained model
    assert finding is not None and "continued pre-training of the full weights on raw text (1e-05 to 0.0003)" in finding.message
    below = check_learning_rate(1e-6, "pretrain", "full", "random")
    assert below is not None and "far below the usual range for training from random weights" in below.message


def test_divergence_rules():
    steady = [2.0, 1.9, 1.8, 1.7, 1.6]
    assert divergence({"loss": 1.5, "grad_norm": 1.0}, steady, 3.0, 2.0) is None
    assert "exploded" in divergence({"loss": 9.0, "grad_norm": 1.0}, steady, 3.0, 2.0)
    assert "not finite" in divergence({"loss": 1.0, "grad_norm": math.inf}, steady, 3.0, 2.0)
    climbing = [2.0, 2.2, 2.1, 3.5, 4.4]
    assert "climbed" in divergence({"loss": 5.0, "grad_norm": 1.0}, climbing, 3.0, 2.0)
    tiny = [0.02, 0.01, 0.01, 0.01, 0.03]  # a doubling of a tiny loss is noise, not divergence
    assert divergence({"loss": 0.05, "grad_norm": 1.0}, tiny, 3.0, 2.0) is None
    grpo = [0.0, -0.02, 0.01, 0.0, -0.01]  # losses around zero: only non-finite values count
    assert divergence({"loss": 1.5, "grad_norm": 0.0}, grpo, 3.0, 2.0) is None
