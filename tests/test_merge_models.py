"""merge_models end to end on tiny random Llama folders: every method, checks, adapters, output layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge import __version__
from tuneforge.errors import ConfigError, ModelError, TuneforgeError
from tuneforge.merge import methods
from tuneforge.merge.config import load_merge_config
from tuneforge.merge.run import merge_models, tensor_seed


def llama_config(vocab=64, layers=2, intermediate=64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2)


def save_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")), unk_token="[UNK]")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)


def make_model(folder: Path, seed: int, like: Path | None = None, **cfg) -> Path:
    """A random tiny Llama; with `like`, that model plus a shared and a private perturbation (a "fine-tune")."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(**cfg))
    if like is not None:
        base = load_file(like / "model.safetensors")
        shared = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for name, p in model.named_parameters():
                common = torch.randn(p.shape, generator=shared)
                p.copy_(base[name] + 0.01 * common + 0.01 * torch.randn(p.shape))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = make_model(root / "base", 0)
    save_tokenizer(base)
    a = make_model(root / "a", 1, like=base)
    save_tokenizer(a, chat_template="{{ messages[0]['content'] }}")
    (a / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    b = make_model(root / "b", 2, like=base)
    return {"root": root, "base": base, "a": a, "b": b}


def write_config(folder: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def load_merged(folder: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model.state_dict()


def expected(method: str, name: str, base, a, b) -> torch.Tensor:
    if method == "linear":
        return methods.linear([a, b], [0.3, 0.7])
    if method == "slerp":
        return methods.slerp(a, b, 0.3)
    if method == "task_arithmetic":
        return methods.task_arithmetic(base, [a, b], [0.6, 0.4], lambda_=0.8)
    if method == "ties":
        return methods.ties(base, [a, b], [0.6, 0.4], [0.6, 0.4], lambda_=1.2)
    if method == "dare_linear":
        return methods.dare_linear(base, [a, b], [0.6, 0.4], 0.5, tensor_seed(3, name))
    if method == "dare_ties":
        return methods.dare_ties(base, [a, b], [0.6, 0.4], 0.5, tensor_seed(3, name), lambda_=1.2)
    return methods.model_stock(base, [a, b])


CONFIGS = {
    "linear": dict(models=[{"model": "a", "parameters": {"weight": 0.3}}, {"model": "b", "parameters": {"weight": 0.7}}]),
    "slerp": dict(models=[{"model": "a"}, {"model": "b"}], parameters={"t": 0.3}),
    "task_arithmetic": dict(base_model="base", parameters={"lambda": 0.8},
                            models=[{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]),
    "ties": dict(base_model="base", parameters={"lambda": 1.2}, models=[
        {"model": "a", "parameters": {"weight": 0.6, "density": 0.6}},
        {"model": "b", "parameters": {"weight": 0.4, "density": 0.4}}]),
    "dare_linear": dict(base_model="base", seed=3, parameters={"density": 0.5},
                        models=[{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]),
    "dare_ties": dict(base_model="base", seed=3, parameters={"density": 0.5, "lambda": 1.2},
                      models=[{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]),
    "model_stock": dict(base_model="base", models=[{"model": "a"}, {"model": "b"}]),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_writes_the_method_applied_to_each_tensor(zoo, method):
    path = write_config(zoo["root"], {"merge_method": method, "dtype": "float32", **CONFIGS[method]}, f"{method}.yaml")
    out = merge_models(path)
    assert out == zoo["root"] / f"{method}-merged"
    merged = load_merged(out)
    base, a, b = weights(zoo["base"]), weights(zoo["a"]), weights(zoo["b"])
    assert set(a) <= set(merged)
    for name in a:
        torch.testing.assert_close(merged[name], expected(method, name, base[name], a[name], b[name]), atol=1e-6, rtol=0)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def test_output_dtype_config_and_tokenizer_files(zoo, tmp_path):
    from transformers import AutoTokenizer

    cfg = {"merge_method": "ties", "base_model": str(zoo["base"]), "dtype": "bfloat16", "parameters": {"density": 0.5},
           "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]}
    out = merge_models(write_config(tmp_path, cfg), tmp_path / "out")
    merged = load_merged(out, dtype=None)
    name = "model.layers.1.mlp.down_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    base, a, b = weights(zoo["base"]), weights(zoo["a"]), weights(zoo["b"])
    assert torch.equal(merged[name], methods.ties(base[name], [a[name], b[name]], [1, 1], 0.5).to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # tokenizer_source: base (the default) copies the base's tokenizer; a's generation config is not taken
    assert (out / "tokenizer.json").read_bytes() == (zoo["base"] / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(str(out)).chat_template is None
    assert (out / "generation_config.json").read_bytes() == (zoo["base"] / "generation_config.json").read_bytes()

    out = merge_models(write_config(tmp_path, {**cfg, "tokenizer_source": "first", "dtype": None}), tmp_path / "out2")
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == "{{ messages[0]['content'] }}"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    assert load_merged(out, dtype=None)[name].dtype == torch.float32  # default: the base's own dtype


def test_merge_json_records_config_inputs_and_version(zoo, tmp_path):
    cfg = {"merge_method": "model_stock", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]}
    out = merge_models(write_config(tmp_path, cfg), tmp_path / "out")
    record = json.loads((out / "merge.json").read_text())
    assert record["tuneforge_version"] == __version__
    assert record["config"]["merge_method"] == "model_stock"
    assert [i["key"] for i in record["inputs"]] == ["base_model", "models[0].model", "models[1].model"]
    for inp, folder in zip(record["inputs"], ("base", "a", "b")):
        assert inp["path"] == str(zoo[folder])
        assert inp["config_json_sha256"] == hashlib.sha256((zoo[folder] / "config.json").read_bytes()).hexdigest()


def test_sharded_inputs_and_outputs(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "a-sharded"
    AutoModelForCausalLM.from_pretrained(str(zoo["a"])).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    cfg = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "dtype": "float32",
           "models": [{"model": str(sharded)}, {"model": str(zoo["b"])}]}
    one = merge_models(write_config(tmp_path, cfg), tmp_path / "one")
    many = merge_models(write_config(tmp_path, cfg), tmp_path / "many", shard_bytes=30_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (many / "model.safetensors").exists()
    reference, merged = weights(one), load_merged(many)
    assert all(torch.equal(merged[n], t) for n, t in reference.items())


def test_rerun_replaces_an_earlier_merge_but_never_a_foreign_folder(zoo, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]}
    path = write_config(tmp_path, cfg)
    out = merge_models(path, tmp_path / "out")
    (out / "stale.txt").write_text("x")
    merge_models(path, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TuneforgeError, match="not a tuneforge merge output"):
        merge_models(path, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("other, message", [
    (dict(vocab=70), r"models\[1\]\.model .*vocab size 70 vs 64 .*model\.embed_tokens\.weight \[70, 32\] vs \[64, 32\].*keeps the base vocab"),
    (dict(layers=3), r"models\[1\]\.model .*tensor names differ .*has extra model\.layers\.2\."),
    (dict(intermediate=48), r"models\[1\]\.model .*tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \[32, 48\]"),
])
def test_mismatched_inputs_fail_up_front_naming_model_and_tensor(zoo, tmp_path, other, message):
    odd = make_model(tmp_path / "odd", 5, **other)
    cfg = {"merge_method": "ties", "base_model": str(zoo["base"]), "parameters": {"density": 0.5},
           "models": [{"model": str(zoo["a"])}, {"model": str(odd)}]}
    with pytest.raises(ModelError, match=message):
        merge_models(write_config(tmp_path, cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_architecture_is_refused(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    qwen = tmp_path / "qwen"
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(qwen)
    cfg = {"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(qwen)}]}
    with pytest.raises(ModelError, match=r"models\[1\]\.model .*architecture qwen2 but models\[0\]\.model .* is llama"):
        merge_models(write_config(tmp_path, cfg), tmp_path / "out")


def make_adapter(base: Path, folder: Path, train: bool = True) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if train:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape))
    model.save_pretrained(folder)
    return folder


def test_lora_adapter_input_equals_merging_the_merged_model(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(zoo["base"], tmp_path / "adapter")
    folded = tmp_path / "folded"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(zoo["base"])), str(adapter)).merge_and_unload().save_pretrained(folded)

    def run(first: str, out: str) -> dict:
        cfg = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "dtype": "float32",
               "models": [{"model": first, "parameters": {"weight": 0.5}}, {"model": str(zoo["b"]), "parameters": {"weight": 0.5}}]}
        return load_merged(merge_models(write_config(tmp_path, cfg, f"{out}.yaml"), tmp_path / out))

    from_adapter, from_folded = run("adapter", "x"), run("folded", "y")  # "adapter" is relative to the YAML
    for name, tensor in from_folded.items():
        torch.testing.assert_close(from_adapter[name], tensor, atol=1e-6, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights(folded)[q], weights(zoo["base"])[q])  # the adapter does change q_proj
    assert "adapter_config_json_sha256" in json.loads((tmp_path / "x" / "merge.json").read_text())["inputs"][1]

    # An adapter trained on a hub id names no local base: the error says how to give one, BASE+ADAPTER.
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/not-here"}))
    with pytest.raises(ModelError, match=r"models\[0\]\.model .*org/not-here .*LOCAL_BASE_FOLDER\+"):
        run("adapter", "w")
    from_plus = run(f"{zoo['base']}+adapter", "v")
    assert all(torch.equal(from_plus[n], t) for n, t in from_adapter.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the scratch merge is gone


def test_untrained_adapter_is_refused(zoo, tmp_path):
    adapter = make_adapter(zoo["base"], tmp_path / "adapter", train=False)
    cfg = {"merge_method": "linear", "models": [{"model": str(adapter)}, {"model": str(zoo["b"])}]}
    with pytest.raises(ModelError, match=r"models\[0\]\.model .*lora_B weight is zero"):
        merge_models(write_config(tmp_path, cfg), tmp_path / "out")


def test_missing_folder_and_pickle_only_folder(zoo, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": "nowhere"}, {"model": str(zoo["b"])}]}
    with pytest.raises(ModelError, match=r"models\[0\]\.model .*nowhere.*not found"):
        merge_models(write_config(tmp_path, cfg), tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((zoo["b"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"")
    cfg["models"][0]["model"] = "pickled"
    with pytest.raises(ModelError, match=r"pytorch_model\.bin: pickle files, which tuneforge never loads"):
        merge_models(write_config(tmp_path, cfg), tmp_path / "out")


@pytest.mark.parametrize("cfg, message", [
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"density": 0.5}},
                                                            {"model": "y", "parameters": {"density": 1.5}}]},
     r"models\[1\]\.parameters\.density: must be in \(0, 1\]"),
    ({"merge_method": "slerp", "models": [{"model": "x"}, {"model": "y"}, {"model": "z"}]},
     r"models: slerp interpolates exactly two models, got 3"),
    ({"merge_method": "task_arithmetic", "models": [{"model": "x"}]}, r"base_model: task_arithmetic .* needs base_model"),
    ({"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "x"}]}, r"models\[0\]\.parameters\.density: dare_ties needs a density"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "parameters": {"t": 0.5}}, r"parameters\.t: linear does not use t"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"wieght": 1}}]},
     r"models\[0\]\.parameters\.wieght: unknown key; did you mean weight\?"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "slices": []}, r"slices: unknown key; .*whole models"),
    ({"merge_method": "model_stock", "base_model": "x", "models": [{"model": "x"}, {"model": "y"}]},
     r"models\[0\]\.model: this is the base_model"),
    ({"merge_method": "soup", "models": [{"model": "x"}]}, r"merge_method: Input should be 'linear'"),
])
def test_config_errors_name_the_key(tmp_path, cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_merge_config(write_config(tmp_path, cfg))


def test_config_resolves_paths_against_the_yaml_folder(tmp_path):
    cfg = load_merge_config(write_config(tmp_path / "cfgs", {
        "merge_method": "slerp", "base_model": "../m/b", "parameters": {"t": 0.2},
        "models": [{"model": "../m/a"}, {"model": "../m/b"}]}))
    assert cfg.models[0].model == str(tmp_path / "m" / "a")
    assert cfg.slerp_ends() == (1, 0)  # base_model is slerp's t=0 end, as in mergekit


def test_config_key_given_twice_names_its_line(tmp_path):
    # yaml.safe_load keeps the last of two equal keys; a merge file must not drop a setting silently.
    path = tmp_path / "merge.yaml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\nmerge_method: slerp\n")
    with pytest.raises(ConfigError, match=r"merge\.yaml:4: .*merge_method"):
        load_merge_config(path)
