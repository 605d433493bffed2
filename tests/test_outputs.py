"""What a run leaves behind loads in plain transformers/PEFT and gives the tuned model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer
from test_train import QUIET, make_cfg

from tuneforge.cli import main
from tuneforge.export.merge import merge_run
from tuneforge.models.load import attach_adapter, build_lora_config, load_model
from tuneforge.models.run import open_run
from tuneforge.train.checkpoints import list_checkpoints, load_checkpoint
from tuneforge.train.loop import train
from tuneforge.train.optim import build_optimizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=6, learning_rate=2e-2, **{"lora.dropout": 0.0})
    train(cfg, reporter=QUIET)
    return cfg, tmp / "run"


def in_memory_model(cfg, run_dir, model_dir):
    """The tuned model as the loop held it: base + adapter + the last checkpoint's weights."""
    model, _ = attach_adapter(load_model(model_dir, CPU), cfg)
    load_checkpoint(list_checkpoints(run_dir)[-1], model, build_optimizer(model, cfg))
    return model.eval()


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def test_adapter_is_peft_format_and_reloads_to_the_same_logits(lora_run, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run_dir = lora_run
    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), str(final)).eval()
    ours = in_memory_model(cfg, run_dir, tiny_models["llama"])
    ids = probe_ids(ours.config.vocab_size)
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            c = reloaded(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-3, "the adapter must have learned something for this test to mean anything"
    assert (a - b).abs().max() <= 1e-5


def test_merged_model_loads_in_transformers_with_the_same_logits(lora_run, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run_dir = lora_run
    out = merge_run(open_run(run_dir), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), str(run_dir / "final")).eval()
    ids = probe_ids(merged.config.vocab_size)
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - adapter(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4


def test_merge_adds_exactly_scale_times_b_a(lora_run, tiny_models, tmp_path):
    """R-MRG-3: for every targeted module, W_merged - W_base == (alpha/r) B A, and it is not zero."""
    from safetensors.torch import load_file

    cfg, run_dir = lora_run
    out = merge_run(open_run(run_dir), tmp_path / "merged")
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    base = {}
    for f in tiny_models["llama"].glob("*.safetensors"):
        base.update(load_file(f))
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
    scale = cfg.lora.alpha / cfg.lora.r
    checked = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = merged[name] - base[name]
        torch.testing.assert_close(delta, scale * b @ a, atol=1e-6, rtol=1e-4)
        checked += 1
    assert checked >= 7 * 2  # all seven linear layers in both blocks
    assert any((adapter[k].abs().max() > 0) for k in adapter if ".lora_B." in k)


def test_untrained_adapter_merge_is_an_error(tmp_path, tiny_models):
    from tuneforge.errors import TuneforgeError

    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, learning_rate=1e-9, **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    # Put the adapter back to its zero-update start, as a failed run would leave it.
    from safetensors.torch import load_file, save_file

    path = tmp_path / "run" / "final" / "adapter_model.safetensors"
    tensors = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in load_file(path).items()}
    save_file(tensors, path)
    with pytest.raises(TuneforgeError, match="zero everywhere"):
        merge_run(open_run(tmp_path / "run"), tmp_path / "merged")


def test_exported_generation_config_lists_every_end_of_turn(tmp_path, builtin_folder):
    """R-EOS-2: with a Llama-3-style template the exported eos list has <|eot_id|> as well as the EOS."""
    from transformers import GenerationConfig

    tok = make_tokenizer(builtin_folder, "llama3")
    model_dir = make_tiny_model(tmp_path / "llama3", "llama", tok)
    cfg = make_cfg(tmp_path, model_dir, max_steps=2, adapter="full")
    train(cfg, reporter=QUIET)
    gen = GenerationConfig.from_pretrained(tmp_path / "run" / "final")
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|eot_id|>") in eos
    assert tok.convert_tokens_to_ids("<|end_of_text|>") in eos
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["end_of_turn"] == "<|eot_id|>"


def test_cli_train_generate_and_merge(tmp_path, tiny_models, capsys):
    import yaml

    cfg = make_cfg(tmp_path, tiny_models["qwen2"], max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(path), "--set", "lora.r=4"]) == 0
    adapter_cfg = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Repeat alpha please", "--max-new-tokens", "4"]) == 0
    assert main(["merge", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "merged" / "config.json").is_file()
    assert main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "before" in out and "after" in out
    assert main(["train", str(path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_lora_config_matches_the_yaml(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], **{"lora.r": 4, "lora.alpha": 8, "lora.target_modules": ["q_proj", "v_proj"]})
    lora = build_lora_config(cfg)
    assert lora.r == 4 and lora.lora_alpha == 8 and set(lora.target_modules) == {"q_proj", "v_proj"}


def test_chat_answers_until_an_empty_line(lora_run, monkeypatch, capsys):
    _, run_dir = lora_run
    lines = iter(["Repeat alpha please", "/reset", "Repeat bravo please", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(run_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2
