"""Preference methods: closed-form losses on toy numbers, data handling and runs through the loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from test_train import QUIET, make_cfg
from tuneforge.config import config_from_dict
from tuneforge.data.dataset import prepare_data
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.errors import ConfigError, DataError
from tuneforge.methods.dpo import dpo_losses
from tuneforge.methods.kto import balance_warning, kto_losses, mismatched
from tuneforge.methods.orpo import odds_ratio_terms
from tuneforge.methods.reward import bradley_terry_losses
from tuneforge.methods.simpo import simpo_losses
from tuneforge.models.load import load_tokenizer
from tuneforge.track.metrics import read_metrics
from tuneforge.train.loop import train

C, R = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.5])  # chosen / rejected log-ratios


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_losses_in_closed_form():
    beta = 0.5
    d = [0.8, -1.0]  # chosen - rejected
    expect = {
        "sigmoid": [-math.log(sig(beta * x)) for x in d],
        "hinge": [max(0.0, 1 - beta * x) for x in d],
        "robust": [(-(0.9) * math.log(sig(beta * x)) + 0.1 * math.log(sig(-beta * x))) / 0.8 for x in d],
    }
    for loss, want in expect.items():
        got = dpo_losses(C, R, beta, loss, label_smoothing=0.1)
        assert got.tolist() == pytest.approx(want, abs=1e-6), loss
    tokens_c, tokens_r = torch.tensor([2.0, 5.0]), torch.tensor([4.0, 1.0])
    ipo = dpo_losses(C, R, beta, "ipo", chosen_tokens=tokens_c, rejected_tokens=tokens_r)
    want = [(1.0 / 2 - 0.2 / 4 - 1.0) ** 2, (-0.5 / 5 - 0.5 / 1 - 1.0) ** 2]
    assert ipo.tolist() == pytest.approx(want, abs=1e-6)


def test_orpo_simpo_kto_and_bradley_terry_in_closed_form():
    c_avg, r_avg = torch.tensor([-0.4]), torch.tensor([-1.2])
    ratio, log_odds = odds_ratio_terms(c_avg, r_avg)
    odds = lambda p: p / (1 - p)  # noqa: E731
    want_log_odds = math.log(odds(math.exp(-0.4)) / odds(math.exp(-1.2)))
    assert log_odds.item() == pytest.approx(want_log_odds, abs=1e-6)
    assert ratio.item() == pytest.approx(math.log(sig(want_log_odds)), abs=1e-6)

    simpo = simpo_losses(c_avg, r_avg, beta=2.0, gamma=0.5)
    assert simpo.item() == pytest.approx(-math.log(sig(2.0 * 0.8 - 0.5)), abs=1e-6)

    kl = torch.tensor(0.3)
    got = kto_losses(torch.tensor([1.0]), torch.tensor([-0.2]), kl, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    assert got.tolist() == pytest.approx([2.0 * (1 - sig(0.5 * 0.7)), 1 - sig(0.5 * 0.5)], abs=1e-6)

    bt = bradley_terry_losses(torch.tensor([1.5]), torch.tensor([0.5]), center_coefficient=0.01)
    assert bt.item() == pytest.approx(-math.log(sig(1.0)) + 0.01 * 4.0, abs=1e-6)


def test_kto_mismatched_pairs_rotate_answers_within_the_micro_batch():
    from tuneforge.data.tokenized import Example

    a = Example([1, 2, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, 10, 11], None)
    b = Example([3, 20], [IGNORE_INDEX, 20], None)
    c = Example([4, 5, 6, 30, 31, 32], [IGNORE_INDEX] * 3 + [30, 31, 32], None)
    out = mismatched([a, b, c])
    assert [e.input_ids for e in out] == [[1, 2, 30, 31, 32], [3, 10, 11], [4, 5, 6, 20]]
    assert out[1].labels == [IGNORE_INDEX, 10, 11]


def test_kto_balance_warning():
    assert balance_warning(100, 100, 1.0, 1.0) is None
    msg = balance_warning(20, 100, 1.0, 1.0)
    assert "20:100" in msg and "desirable_weight in [5.00, 6.67]" in msg
    assert "needs both" in balance_warning(0, 10, 1.0, 1.0)


def test_kto_warns_on_an_unbalanced_dataset(tmp_path, tiny_models):
    from tuneforge.methods.kto import KTO

    records = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i < 2} for i in range(12)]
    data_file = write_jsonl(tmp_path / "kto.jsonl", records)
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="kto", datasets=[{"path": str(data_file)}], validation=None)
    data = prepare_data(cfg, load_tokenizer(tiny_models["llama"]))
    [note] = KTO(cfg.kto, data, 0, None).notes
    assert "desirable:undesirable = 2:10" in note


def test_kto_config_refuses_a_micro_batch_of_one(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size: 2 or more"):
        config_from_dict({"datasets": [{"path": "x.jsonl"}], "method": "kto", "micro_batch_size": 1}, base=tmp_path)


def preference_records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Which colour is item {i}?", "chosen": f"Item {i} is blue.", "rejected": f"Item {i} is red."}
            for i in range(n)]


def test_pairs_share_the_prompt_and_train_only_the_answers(tmp_path, tiny_models):
    data_file = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier answer"},
                    {"role": "user", "content": "and now?"}],
         "chosen": "good reply", "rejected": "bad reply"},
    ])
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", datasets=[{"path": str(data_file)}], validation=None)
    tok = load_tokenizer(tiny_models["llama"])
    data = prepare_data(cfg, tok)
    chosen, rejected = data.train[0], data.train_rejected[0]
    cut = next(i for i, x in enumerate(chosen.labels) if x != IGNORE_INDEX)
    assert chosen.input_ids[:cut] == rejected.input_ids[:cut]  # one prompt, tokenized once
    trained = tok.decode([t for t, x in zip(chosen.input_ids, chosen.labels) if x != IGNORE_INDEX])
    assert trained == "good reply<|im_end|>"  # the earlier assistant turn is context, not trained
    assert tok.decode([t for t, x in zip(rejected.input_ids, rejected.labels) if x != IGNORE_INDEX]) == "bad reply<|im_end|>"


def test_a_bad_preference_record_gets_a_line_numbered_error(tmp_path, tiny_models):
    records = preference_records(4)
    records[2] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    data_file = write_jsonl(tmp_path / "pref.jsonl", records)
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", datasets=[{"path": str(data_file)}], validation=None)
    with pytest.raises(DataError, match=r"pref.jsonl:3: chosen and rejected are identical"):
        prepare_data(cfg, load_tokenizer(tiny_models["llama"]))


def test_sft_data_given_to_dpo_is_a_clear_error(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", validation=None)  # make_cfg writes chat data
    with pytest.raises(DataError, match=r"train.jsonl:1: a chat record, but method dpo trains on preference records"):
        prepare_data(cfg, load_tokenizer(tiny_models["llama"]))


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto", "reward"])
def test_each_method_learns_the_held_out_preference(tmp_path, tiny_models, method):
    records = preference_records()
    if method == "kto":
        records = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
                   for i, r in enumerate(records)]
    data_file = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = make_cfg(tmp_path, tiny_models["llama"], method=method, datasets=[{"path": str(data_file)}], epochs=3)
    run = train(cfg, reporter=QUIET)
    before, after = run["eval_before"], run["eval_after"]
    assert after["val_loss"] < before["val_loss"]
    if method == "kto":
        assert after["val_rewards/chosen"] > after["val_rewards/rejected"]
    else:
        assert after["preference_accuracy"] == 1.0
    if method == "dpo":
        assert before["preference_accuracy"] == 0.5  # policy == reference: every pair a tie, i.e. chance
    assert run["objective"]["method"] == method
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    keys = {"kto": "kl", "reward": "rewards/margins"}.get(method, "rewards/accuracies")
    assert all(math.isfinite(r[keys]) for r in logged)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_eval_command_gives_the_runs_own_before_and_after(tmp_path, tiny_models, adapter):
    from tuneforge.eval.run_eval import evaluate_target

    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(12))
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", adapter=adapter, datasets=[{"path": str(data_file)}],
                   max_steps=3, **{"lora.dropout": 0.0})
    run = train(cfg, reporter=QUIET)
    before, after = evaluate_target(tmp_path / "run")
    for key in ("preference_accuracy", "val_loss", "val_rewards/margins"):
        assert before[key] == pytest.approx(run["eval_before"][key], abs=1e-4), key
        assert after[key] == pytest.approx(run["eval_after"][key], abs=1e-4), key


def test_lora_dpo_reference_is_the_adapter_disabled_model(tmp_path, tiny_models, monkeypatch):
    """R-PREF-1: no second copy of the weights is loaded for LoRA DPO."""
    import tuneforge.models.load as load
    import tuneforge.train.loop as loop

    loads = []
    real = load.load_model
    counting = lambda *a, **k: loads.append(a) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(loop, "load_model", counting)
    monkeypatch.setattr(load, "load_model", counting)
    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(8))
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", datasets=[{"path": str(data_file)}], max_steps=2,
                   **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    assert len(loads) == 1
    full = make_cfg(tmp_path, tiny_models["llama"], out="full", method="dpo", adapter="full",
                    datasets=[{"path": str(data_file)}], max_steps=2, **{"evaluation.before_after": False})
    train(full, reporter=QUIET)
    assert len(loads) == 3  # full fine-tuning: the policy and one frozen reference


def test_precomputed_reference_matches_and_is_cached(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(12))
    runs = {}
    for name, pre in (("live", False), ("pre", True), ("again", True)):
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=name, method="dpo", datasets=[{"path": str(data_file)}],
                       max_steps=3, **{"dpo.precompute_reference": pre, "lora.dropout": 0.0})
        runs[name] = [r["loss"] for r in (train(cfg, reporter=QUIET) and read_metrics(tmp_path / name / "metrics.jsonl"))]
    assert runs["pre"] == pytest.approx(runs["live"], abs=1e-5)
    assert runs["again"] == runs["pre"]
    assert len(list((tmp_path / "cache" / "reference_logps").glob("*.npz"))) == 1


def test_reward_model_adapter_loads_with_peft(tmp_path, tiny_models):
    from peft import AutoPeftModelForSequenceClassification

    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(8))
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="reward", datasets=[{"path": str(data_file)}], max_steps=2,
                   **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(final), num_labels=1)
    out = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_half_precision_dpo_stays_finite(tmp_path, tiny_models):
    """R-PREF-2: log-probs and losses in fp32 keep half-precision DPO finite (bf16: CPU has no fp16 autocast here)."""
    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(8))
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", datasets=[{"path": str(data_file)}], max_steps=20,
                   micro_batch_size=2, precision="bf16", **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(logged) == 20 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in logged)


def test_reference_free_dpo_rewards_are_the_policy_logps(tmp_path, tiny_models):
    data_file = write_jsonl(tmp_path / "pref.jsonl", preference_records(8))
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="dpo", datasets=[{"path": str(data_file)}], max_steps=2,
                   **{"dpo.reference_free": True, "dpo.beta": 0.5, "evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        assert r["rewards/chosen"] == pytest.approx(0.5 * r["logps/chosen"], rel=1e-5)
