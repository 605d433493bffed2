"""init: random for task: image_classification: a tiny ViT built from `vit` or a config.json, no weights read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_image_classification import COLOURS, CPU, QUIET, draw, images  # noqa: F401 (images: a fixture)
from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError, DataError
from tuneforge.models.init import locate_model, model_folder
from tuneforge.models.load import load_model
from tuneforge.train.loop import train

TINY = {"n_layer": 2, "d_model": 32, "n_head": 2, "d_ff": 64, "image_size": 32, "patch_size": 8}
HEAD = {"num_labels": 2, "id2label": {0: "blue", 1: "red"}, "label2id": {"blue": 0, "red": 1},
        "problem_type": "single_label_classification"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))


def make_cfg(tmp_path, data, **over):
    raw = {"task": "image_classification", "base_model": "vit", "init": "random", "architecture": TINY,
           "datasets": [{"path": str(data)}], "validation": {"path": str(data)}, "adapter": "full",
           "learning_rate": 3e-3, "micro_batch_size": 4, "max_steps": 12, "warmup_steps": 0,
           "output_dir": str(tmp_path / "run"), "device": "cpu", "precision": "fp32", **over}
    return config_from_dict(raw, base=tmp_path)


def built(cfg):
    folder, _ = model_folder(cfg)
    return folder, load_model(folder, CPU, head="image_classifier", head_config=HEAD).state_dict()


def test_the_same_seed_builds_the_same_weights_and_no_weight_is_read(tmp_path, images):
    folder, a = built(make_cfg(tmp_path, images))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "preprocessor_config.json",
                                                        "tuneforge_init.json"]
    torch.manual_seed(123)  # whatever the process drew before, the recipe's seed decides
    _, b = built(make_cfg(tmp_path, images))
    _, other = built(make_cfg(tmp_path, images, seed=7))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], other["classifier.weight"])
    # transformers' ViT initialisation: the class token truncated normal(0, initializer_range), biases zero
    assert 0.015 < float(a["vit.embeddings.cls_token"].std()) < 0.025 and not a["classifier.bias"].any()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 32


def test_a_config_json_and_its_preprocessor_are_used(tmp_path, images):
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 48, "num_hidden_layers": 1,
                                                  "num_attention_heads": 3, "intermediate_size": 96,
                                                  "image_size": 32, "patch_size": 16}))
    (arch / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    cfg = make_cfg(tmp_path, images, base_model=str(arch / "config.json"), architecture={"n_layer": 2})
    folder, state = built(cfg)
    assert state["vit.embeddings.patch_embeddings.projection.weight"].shape == (48, 3, 16, 16)
    assert len({k.split(".")[2] for k in state if k.startswith("vit.layers.")}) == 2  # n_layer overrides the file
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json gives the model 32x32 images, but its "
                                          "image_size is 64"):
        locate_model(make_cfg(tmp_path, images, base_model=str(arch), architecture={"image_size": 64}))


def test_a_random_vit_learns_the_colours_and_the_pipeline_reads_final(tmp_path, images, one_thread):
    from transformers import pipeline

    manifest = train(make_cfg(tmp_path, images), reporter=QUIET)
    before, after = manifest["eval_before"], manifest["eval_after"]
    assert before["accuracy"] <= 0.75 and after["accuracy"] == 1.0 and after["val_loss"] < before["val_loss"]
    assert manifest["base_model"]["source"].startswith("random init vit layers=2 hidden=32")
    final = tmp_path / "run" / "final"
    assert json.loads((final / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    classify = pipeline("image-classification", model=str(final))
    for name in COLOURS:
        assert classify(str(images / name / "1.png"))[0]["label"] == name


def test_resume_from_random_init_is_bit_exact(tmp_path, images, one_thread):
    def cfg(out):
        return make_cfg(tmp_path, images, max_steps=4, save_every=2, output_dir=str(tmp_path / out),
                        evaluation={"before_after": False})

    train(cfg("a"), reporter=QUIET)
    assert train(cfg("b"), reporter=QUIET, stop_after=2) == {"stopped_at": 2}
    train(cfg("b"), resume=True, reporter=QUIET)
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_sizes_the_random_vit_and_data_check_needs_no_weights(tmp_path, images, capsys):
    from tuneforge.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"task": "image_classification", "base_model": "vit", "init": "random",
                                  "adapter": "full", "architecture": TINY, "datasets": [{"path": str(images)}],
                                  "output_dir": str(tmp_path / "run")}))
    assert main(["data", "check", str(config)]) == 0
    assert main(["validate", str(config)]) == 0
    assert main(["data", "stats", str(config)]) == 2
    assert "trains on pixels, not tokens" in capsys.readouterr().err
    assert main(["plan", str(config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    _, state = built(make_cfg(tmp_path, images))
    assert plan["model"]["params"] == sum(t.numel() for t in state.values())  # two classes, from the data
    assert plan["settings"]["seq_len"] == (32 // 8) ** 2 + 1  # patches and the class token


@pytest.mark.parametrize("over, message", [
    ({"base_model": "CONFIG"}, r"config\.json describes a llama model, not a ViT-family image model"),
    ({"architecture": {**TINY, "patch_size": 5}}, "image_size 32 is not a multiple of patch_size 5"),
    ({"architecture": None}, "architecture: base_model vit is a family; give its size"),
    ({"architecture": {**TINY, "n_head": 3}}, "d_model 32 must be a multiple of n_head 3"),
    ({"tokenizer": {"reuse": "smollm2-135m-instruct"}}, "tokenizer: an image classifier reads pixels"),
])
def test_what_cannot_be_built_is_refused_naming_the_key(tmp_path, images, over, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    if over.get("base_model") == "CONFIG":
        over = {"base_model": str(tmp_path / "config.json")}
    cfg = make_cfg(tmp_path, images, **over)
    with pytest.raises(ConfigError, match=message):
        locate_model(cfg)  # what `tuneforge validate` runs; the run builds its folder with the same checks
    with pytest.raises(ConfigError, match=message):
        model_folder(cfg)


def test_images_without_labels_and_other_tasks_are_refused(tmp_path, images):
    from tuneforge.data.images import prepare_images

    flat = tmp_path / "flat"  # images, but no subfolder per class
    for i in range(3):
        draw(flat / f"{i}.png", COLOURS["red"], i)
    with pytest.raises(DataError, match=r"only one class \(none\).*one subfolder per class"):
        prepare_images(make_cfg(tmp_path, flat, validation=None))
    lines = tmp_path / "train.jsonl"
    lines.write_text(json.dumps({"image": str(images / "red" / "0.png")}) + "\n")
    with pytest.raises(DataError, match=f"{lines}:1: expected .*label"):
        prepare_images(make_cfg(tmp_path, lines, validation=None))
    with pytest.raises(ConfigError, match="architecture.image_size and patch_size: only for task: image_classific"):
        make_cfg(tmp_path, flat, task="causal_lm", base_model="llama", method="pretrain")
    cfg = make_cfg(tmp_path, flat, task="classification", architecture={"depth": 1})
    with pytest.raises(ConfigError, match="task: classification needs a classifier model"):
        locate_model(cfg)
