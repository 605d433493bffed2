"""The PEFT family through config: rsLoRA, DoRA, PiSSA/OLoRA/orthogonal init, LoRA+, layer choice,
freezing under full fine-tuning, 8-bit AdamW; saved adapters load in plain PEFT with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import QUIET, make_cfg

from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError
from tuneforge.export.merge import merge_run
from tuneforge.models.adapters import SKIPPED_WARNING_SHARE, adapted_modules, adapter_merged
from tuneforge.models.load import attach_adapter, load_model
from tuneforge.models.run import open_run
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints, load_checkpoint
from tuneforge.train.loop import optimizer_step, seed_everything, train
from tuneforge.train.optim import build_optimizer

CPU = torch.device("cpu")
BASE = {"max_steps": 4, "learning_rate": 2e-2, "lora.dropout": 0.0, "evaluation.before_after": False}


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(3))


def in_memory(cfg, run_dir, model_dir):
    """The model as the loop held it: base + adapter initialised with the run's seed + the last checkpoint."""
    seed_everything(cfg.seed)
    model, _ = attach_adapter(load_model(model_dir, CPU), cfg)
    load_checkpoint(list_checkpoints(run_dir)[-1], model, build_optimizer(model, cfg))
    return model.eval()


VARIANTS = {
    "rslora": {"lora.use_rslora": True},
    "dora": {"lora.use_dora": True},
    "gaussian": {"lora.init": "gaussian"},
    "orthogonal": {"lora.init": "orthogonal"},
    "pissa": {"lora.init": "pissa"},
    "pissa_niter": {"lora.init": "pissa_niter_2"},
    "olora": {"lora.init": "olora"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_and_reloads_in_plain_peft_with_equal_logits(tmp_path, tiny_models, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    cfg = make_cfg(tmp_path, model_dir, **BASE, **VARIANTS[variant])
    train(cfg, reporter=QUIET)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < losses[0], losses
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["use_rslora"] == cfg.lora.use_rslora and saved["use_dora"] == cfg.lora.use_dora
    if cfg.lora.changes_base:
        # Saved as plain LoRA against the original weights: rank doubled, no init to re-run on load.
        assert saved["r"] == 2 * cfg.lora.r and saved["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(final)).eval()
    ours = in_memory(cfg, tmp_path / "run", model_dir)
    ids = probe_ids()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, reloaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-3, "the adapter must have learned something for this test to mean anything"
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["pissa", "olora", "dora"])
def test_merge_of_base_changing_and_dora_adapters_gives_the_adapter_logits(tmp_path, tiny_models, variant):
    """PiSSA/OLoRA rewrite the base at init and DoRA rescales it; the merged folder must still equal
    the adapter on the original base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    cfg = make_cfg(tmp_path, model_dir, **BASE, **VARIANTS[variant])
    train(cfg, reporter=QUIET)
    out = merge_run(open_run(tmp_path / "run"), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "run" / "final"))
    ids = probe_ids()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapter.eval()(input_ids=ids).logits).abs().max() <= 1e-4
    if variant != "dora":  # R-MRG-3 against the original base, with the converted (rank 2r) adapter
        saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
        weights = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
        base = {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}
        merged_sd = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        key = next(k for k in weights if "layers.1.mlp.down_proj.lora_A" in k)
        name = "model.layers.1.mlp.down_proj.weight"
        delta = weights[key.replace("lora_A", "lora_B")] @ weights[key] * saved["lora_alpha"] / saved["r"]
        torch.testing.assert_close(merged_sd[name] - base[name], delta, atol=1e-5, rtol=1e-4)


def test_loraplus_puts_b_at_ratio_times_the_learning_rate(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], **{"lora.plus_ratio": 16.0})
    model, _ = attach_adapter(load_model(tiny_models["llama"], CPU), cfg)
    optimizer = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}
    b_names = [n for n in group_of if "lora_B" in n]
    a_names = [n for n in group_of if "lora_A" in n]
    assert len(b_names) == len(a_names) == 14
    assert all(group_of[n]["lr"] == 16 * cfg.learning_rate for n in b_names)
    assert all(group_of[n]["lr"] == cfg.learning_rate for n in a_names)
    # The schedule moves both, keeping the ratio.
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer_step(optimizer, 1e-3, 1.0)
    assert group_of[b_names[0]]["lr"] == pytest.approx(16e-3) and group_of[a_names[0]]["lr"] == pytest.approx(1e-3)


def uninterrupted_and_resumed(tmp_path, model_dir, stop_after: int, **over) -> tuple[list, list]:
    """Metrics of a run straight through and of the same run stopped after `stop_after` steps and resumed."""
    full = make_cfg(tmp_path, model_dir, out="full", **over)
    train(full, reporter=QUIET)
    cut = make_cfg(tmp_path, model_dir, out="cut", **over)
    train(cut, reporter=QUIET, stop_after=stop_after)
    train(cut, resume=True, reporter=QUIET)
    return tuple(read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "cut"))


def test_loraplus_trains_through_the_loop_and_resumes(tmp_path, tiny_models):
    over = {**BASE, "max_steps": 6, "save_every": 3, "lora.plus_ratio": 4.0, "lora.dropout": 0.1}
    a, b = uninterrupted_and_resumed(tmp_path, tiny_models["llama"], 4, **over)
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and a[-1]["loss"] < a[0]["loss"]


def test_lora_layers_adapts_only_those_layers_and_reports_the_rest(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], **BASE, **{"lora.layers": "1"})
    manifest = train(cfg, reporter=QUIET)
    keys = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert keys and all(".layers.1." in k for k in keys)
    assert len([k for k in keys if "lora_A" in k]) == 7
    report = manifest["adapted_modules"]
    assert sum(report["adapted"].values()) == 7 and sum(report["skipped"].values()) == 7
    assert report["skipped_share"] == 0.5 and "lora.layers" in report["warning"]


def test_a_missing_layer_is_a_config_error(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], **{"lora.layers": [0, 5]})
    with pytest.raises(ConfigError, match=r"lora.layers: the model has decoder layers 0-1, so \[5\]"):
        attach_adapter(load_model(tiny_models["llama"], CPU), cfg)


def test_skipped_fused_experts_are_reported_and_warned(tmp_path, tokenizers):
    """R-FEAT-4 on a Mixtral-style MoE: all-linear reaches the fused 3-D experts through PEFT; a list of
    attention projections leaves them out, and the report says so with a warning."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    moe.save_pretrained(tmp_path / "moe")
    every = make_cfg(tmp_path, tmp_path / "moe", **{"lora.dropout": 0.0})  # PEFT wraps experts only without dropout
    _, report = attach_adapter(load_model(tmp_path / "moe", CPU), every)
    assert report["adapted"]["model.layers.*.mlp.experts.gate_up_proj"] == 2 and report["warning"] is None
    attention = make_cfg(tmp_path, tmp_path / "moe", **{"lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    _, report = attach_adapter(load_model(tmp_path / "moe", CPU), attention)
    assert report["skipped"] == {"model.layers.*.mlp.experts.down_proj": 2, "model.layers.*.mlp.experts.gate_up_proj": 2}
    assert report["skipped_share"] > SKIPPED_WARNING_SHARE and "experts.gate_up_proj" in report["warning"]


def test_freeze_keeps_named_weights_exactly_and_trains_the_rest(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    freeze = ["embed_tokens", "layers.0", "*.self_attn.*"]
    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter="full", freeze=freeze,
                   **{**BASE, "learning_rate": 3e-3})
    manifest = train(cfg, reporter=QUIET)
    before = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    frozen = [n for n in before if "embed_tokens" in n or ".layers.0." in n or ".self_attn." in n]
    trained = [n for n in before if n not in frozen]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert trained and all(not torch.equal(before[n], after[n]) for n in trained), trained
    report = manifest["adapted_modules"]
    assert report["adapted"] == {"lm_head": 1, "model.layers.*.mlp.down_proj": 1,
                                 "model.layers.*.mlp.gate_proj": 1, "model.layers.*.mlp.up_proj": 1}
    assert sum(report["skipped"].values()) == 4 + 7  # layer 1 attention + all of layer 0


def test_a_freeze_entry_that_matches_nothing_is_named(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter="full", freeze=["lm_head", "vision_tower"])
    with pytest.raises(ConfigError, match=r"freeze\[1\]: 'vision_tower' matches no weight"):
        attach_adapter(load_model(tiny_models["llama"], CPU), cfg)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_full_fine_tuning_with_8bit_adamw_trains_and_resumes_exactly(tmp_path, tiny_models, optimizer):
    over = {**BASE, "adapter": "full", "optimizer": optimizer, "learning_rate": 3e-3, "max_steps": 4, "save_every": 2}
    a, b = uninterrupted_and_resumed(tmp_path, tiny_models["llama"], 3, **over)
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and a[-1]["loss"] < a[0]["loss"]
    wa, wb = (load_file(list_checkpoints(tmp_path / d)[-1] / "trainable.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = load_file(list_checkpoints(tmp_path / "full")[-1] / "optimizer.safetensors")
    assert any(t.dtype == torch.uint8 for t in state.values())  # the moments really are 8-bit


@pytest.mark.parametrize("raw, message", [
    ({"quantization": {"bits": 4}}, "quantization: only used with adapter: qlora"),
    ({"adapter": "qlora", "lora": {"init": "pissa"}}, "lora.init: pissa rewrites the base weights"),
    ({"freeze": ["lm_head"]}, "freeze: only used with adapter: full"),
    ({"adapter": "full", "lora": {"plus_ratio": 16}}, "lora.plus_ratio: LoRA+ sets the learning rate of LoRA's B"),
    ({"lora": {"init": "eva"}}, "lora.init: unknown LoRA init; expected one of default, gaussian, pissa"),
    ({"lora": {"init": "orthogonal", "r": 5}}, "lora.init: orthogonal init needs an even lora.r"),
    ({"lora": {"layers": "4-2"}}, "lora.layers: expected a layer index or a range such as 0-7"),
    ({"lora": {"plus_ratio": 0.5}}, "lora.plus_ratio: Input should be greater than or equal to 1"),
    ({"adapter": "qlora", "quantization": {"bits": 3}}, "quantization.bits: Input should be 4 or 8"),
    ({"optimizer": "adam8bit"}, "optimizer: Input should be 'adamw', 'adamw_8bit' or 'paged_adamw_8bit'"),
    ({"use_dora": True}, "use_dora: unknown key; did you mean lora.use_dora?"),
])
def test_config_errors_name_the_key_and_say_what_to_do(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"datasets": [{"path": "t.jsonl"}], **raw})
    assert message in str(err.value)


def test_config_contract_defaults():
    """The keys `tuneforge plan` reads, with their defaults."""
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}], "adapter": "qlora", "lora": {"layers": "0-3"}})
    assert cfg.quantization.model_dump() == {"bits": 4, "double_quant": True, "quant_type": "nf4", "storage": "auto"}
    assert cfg.optimizer == "adamw" and cfg.freeze == []
    assert cfg.lora.layers == [0, 1, 2, 3] and cfg.lora.init == "default" and cfg.lora.plus_ratio is None
    assert not cfg.lora.use_rslora and not cfg.lora.use_dora and cfg.lora.target_modules == "all-linear"
    assert config_from_dict({"datasets": [{"path": "t.jsonl"}]}).quantization is None


def test_adapted_report_of_a_plain_lora_names_every_linear(tiny_models):
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}], "lora": {"target_modules": ["q_proj", "v_proj"]}})
    model, report = attach_adapter(load_model(tiny_models["qwen2"], CPU), cfg)
    assert report == adapted_modules(model)
    assert report["adapted"] == {"model.layers.*.self_attn.q_proj": 2, "model.layers.*.self_attn.v_proj": 2}
    assert set(report["skipped"]) == {f"model.layers.*.{m}" for m in (
        "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert report["warning"] and report["skipped_share"] > SKIPPED_WARNING_SHARE



def test_evaluation_through_merged_lora_gives_the_adapters_outputs_and_restores_it(tiny_models):
    """The after-evaluation generates through merged weights (its speed); the outputs are the adapter's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    merged_flags = lambda: {m.merged for m in model.modules() if hasattr(m, "merged")}  # noqa: E731
    with torch.no_grad():
        expected = model(input_ids=probe_ids()).logits
        with adapter_merged(model):
            assert merged_flags() == {True}
            merged = model(input_ids=probe_ids()).logits
        assert merged_flags() == {False}
        after = model(input_ids=probe_ids()).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)  # the same sums in another order
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)
