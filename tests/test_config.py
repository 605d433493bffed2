"""The run config: paths, rejected keys with suggestions, defaults, --set overrides, `tuneforge validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main
from tuneforge.config import config_from_dict, load_config
from tuneforge.errors import ConfigError


def write_config(path: Path, raw: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def config_error(tmp_path: Path, extra: dict) -> str:
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "train.jsonl"}], **extra})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


# --- paths -----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_folder_not_cwd(tmp_path, monkeypatch):
    project = tmp_path / "project"
    cfg_path = write_config(project / "configs" / "run.yaml", {
        "datasets": [{"path": "data/train.jsonl"}, {"path": "../shared/extra.jsonl"}],
        "validation": {"path": "data/val.jsonl"},
        "output_dir": "runs/first",
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_config(cfg_path)

    folder = (project / "configs").resolve()
    assert cfg.datasets[0].path == str(folder / "data" / "train.jsonl")
    assert cfg.datasets[1].path == str((project / "shared" / "extra.jsonl").resolve())
    assert cfg.validation.path == str(folder / "data" / "val.jsonl")
    assert cfg.output_dir == str(folder / "runs" / "first")


def test_relative_config_path_from_another_cwd(tmp_path, monkeypatch):
    write_config(tmp_path / "project" / "run.yaml", {"datasets": [{"path": "train.jsonl"}]})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    cfg = load_config("../project/run.yaml")

    folder = (tmp_path / "project").resolve()
    assert cfg.datasets[0].path == str(folder / "train.jsonl")
    assert cfg.output_dir == str(folder / "runs" / "run")  # the default output_dir is relative too


def test_absolute_paths_are_kept(tmp_path, monkeypatch):
    data = tmp_path / "abs" / "train.jsonl"
    cfg_path = write_config(tmp_path / "cfg" / "run.yaml", {"datasets": [{"path": str(data)}],
                                                            "output_dir": str(tmp_path / "out")})
    monkeypatch.chdir(tmp_path / "cfg")
    cfg = load_config(cfg_path)
    assert cfg.datasets[0].path == str(data)
    assert cfg.output_dir == str(tmp_path / "out")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


# --- unknown keys and bad values -------------------------------------------------------------


@pytest.mark.parametrize("extra, key, hint", [
    ({"lora_rank": 8}, "lora_rank", "lora.r"),
    ({"learning_rat": 1e-4}, "learning_rat", "learning_rate"),
    ({"lora": {"rank": 8}}, "lora.rank", "lora.r"),
    ({"lora": {"dropot": 0.1}}, "lora.dropot", "lora.dropout"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "grad_accum"),
    ({"num_train_epochs": 3}, "num_train_epochs", "epochs"),
])
def test_unknown_key_is_rejected_with_suggestion(tmp_path, extra, key, hint):
    msg = config_error(tmp_path, extra)
    assert str(tmp_path / "run.yaml") in msg
    assert f"{key}: unknown key" in msg
    assert "unknown key" in msg
    assert f"did you mean {hint}?" in msg


def test_nested_typo_names_the_nested_key(tmp_path):
    msg = config_error(tmp_path, {"lora": {"rank": 8}})
    assert "lora.rank: unknown key; did you mean lora.r?" in msg


def test_unknown_key_without_close_match_says_so(tmp_path):
    msg = config_error(tmp_path, {"zzzqqq": 1})
    assert "zzzqqq" in msg
    assert "did you mean" not in msg
    assert "not a tuneforge key" in msg


@pytest.mark.parametrize("extra, key, value", [
    ({"micro_batch_size": 0}, "micro_batch_size", "0"),
    ({"scheduler": "cosin"}, "scheduler", "'cosin'"),
    ({"adapter": "dora"}, "adapter", "'dora'"),
    ({"learning_rate": -1e-4}, "learning_rate", "-0.0001"),
    ({"lora": {"r": "abc"}}, "lora.r", "'abc'"),
    ({"truncation": "cut"}, "truncation", "'cut'"),
])
def test_bad_value_names_key_and_value(tmp_path, extra, key, value):
    msg = config_error(tmp_path, extra)
    line = next(ln for ln in msg.splitlines() if ln.strip().startswith(f"{key}:"))
    assert f"(got {value})" in line


def test_bad_value_lists_allowed_choices(tmp_path):
    msg = config_error(tmp_path, {"scheduler": "cosin"})
    assert "cosine" in msg and "linear" in msg and "constant" in msg


def test_every_error_is_reported_at_once(tmp_path):
    msg = config_error(tmp_path, {"lora_rank": 8, "micro_batch_size": 0})
    assert "lora_rank" in msg and "micro_batch_size" in msg


def test_missing_datasets_is_reported(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"seed": 1})
    with pytest.raises(ConfigError, match=r"datasets: required key is missing"):
        load_config(path)


def test_invalid_yaml_gives_file_and_line(tmp_path):
    path = write_config(tmp_path / "run.yaml", "datasets:\n  - path: a.jsonl\nseed: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "not valid YAML" in msg
    assert f"{path}:" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert 3 <= line <= 4  # the unclosed list starts on line 3; YAML notices at its end


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_config(tmp_path / "run.yaml", "- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


# --- validation and defaults -----------------------------------------------------------------


@pytest.mark.parametrize("validation", [{}, {"split": 0.1, "path": "val.jsonl"}, {"format": "messages"}])
def test_validation_needs_exactly_one_of_split_or_path(tmp_path, validation):
    msg = config_error(tmp_path, {"validation": validation})
    assert "validation" in msg
    assert "exactly one of validation.split" in msg


@pytest.mark.parametrize("split", [0, 1, 1.5])
def test_validation_split_must_be_a_share(tmp_path, split):
    msg = config_error(tmp_path, {"validation": {"split": split}})
    assert "validation.split" in msg


def test_validation_with_split_or_path_is_accepted(tmp_path):
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}], "validation": {"split": 0.2}}, base=tmp_path)
    assert cfg.validation.split == 0.2 and cfg.validation.path is None
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}], "validation": {"path": "v.jsonl"}}, base=tmp_path)
    assert cfg.validation.path == str((tmp_path / "v.jsonl").resolve())


def test_epochs_default_to_one_when_no_length_given(tmp_path):
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}]}, base=tmp_path)
    assert cfg.epochs == 1
    assert cfg.max_steps is None


def test_max_steps_alone_leaves_epochs_unset(tmp_path):
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}], "max_steps": 50}, base=tmp_path)
    assert cfg.max_steps == 50
    assert cfg.epochs is None


def test_explicit_epochs_are_kept(tmp_path):
    cfg = config_from_dict({"datasets": [{"path": "t.jsonl"}], "epochs": 3}, base=tmp_path)
    assert cfg.epochs == 3


def test_empty_datasets_list_is_rejected(tmp_path):
    msg = config_error(tmp_path, {"datasets": []})
    assert "datasets" in msg


# --- --set overrides -------------------------------------------------------------------------


def test_overrides_take_effect_with_types(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}], "lora": {"alpha": 8}})
    cfg = load_config(path, ["lora.r=32", "learning_rate=1e-4", "train_on_inputs=true"])
    assert cfg.lora.r == 32 and isinstance(cfg.lora.r, int)
    assert cfg.lora.alpha == 8  # the rest of the section is kept
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.train_on_inputs is True


def test_override_replaces_value_from_file(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}], "seed": 1, "scheduler": "linear"})
    cfg = load_config(path, ["seed=7", "scheduler=constant", "validation.split=0.25"])
    assert cfg.seed == 7
    assert cfg.scheduler == "constant"
    assert cfg.validation.split == 0.25


def test_override_values_are_validated(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}]})
    with pytest.raises(ConfigError, match=r"lora\.r.*'abc'"):
        load_config(path, ["lora.r=abc"])
    with pytest.raises(ConfigError, match="did you mean lora.r"):
        load_config(path, ["lora_rank=8"])


@pytest.mark.parametrize("bad, match", [
    ("lora.r", "expected KEY=VALUE"),
    ("learning_rate", "expected KEY=VALUE"),
    ("datasets.path=x.jsonl", "datasets is not a section"),
])
def test_bad_override_form_errors(tmp_path, bad, match):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}]})
    with pytest.raises(ConfigError, match=match):
        load_config(path, [bad])


# --- tuneforge validate ----------------------------------------------------------------------


def test_cli_validate_accepts_good_config(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}]})
    (tmp_path / "t.jsonl").write_text("")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out


def test_cli_validate_names_missing_data_files(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}], "validation": {"path": "v.jsonl"}})
    (tmp_path / "t.jsonl").write_text("")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "validation.path" in err and "v.jsonl not found" in err and "datasets[0]" not in err


def test_cli_validate_rejects_bad_config(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}], "lora_rank": 8})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lora_rank" in err
    assert "did you mean lora.r?" in err


def test_cli_validate_applies_set(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}]})
    (tmp_path / "t.jsonl").write_text("")
    assert main(["validate", str(path), "--set", "micro_batch_size=0"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "micro_batch_size=8"]) == 0


def test_override_values_are_read_as_yaml(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"datasets": [{"path": "t.jsonl"}], "eval_every": 10})
    cfg = load_config(path, ["lora.target_modules=[q_proj, v_proj]", "max_grad_norm=null", "eval_every="])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.max_grad_norm is None
    assert cfg.eval_every is None
