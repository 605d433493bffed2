"""Faults a user can put in a config or a data file: each is one line naming the file, line or key, never a
traceback, and never a run that starts on nonsense (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import chat, write_jsonl

from tuneforge.cli import main
from tuneforge.config import config_from_dict, load_config, read_yaml
from tuneforge.data.batching import epoch_order
from tuneforge.data.check import check_data
from tuneforge.data.stats import padding_waste
from tuneforge.errors import ConfigError, DataError

LONE_SURROGATE = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}'


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def cli_error(argv: list[str], capsys) -> str:
    """The CLI's message for argv: exit status 2 and an error on stderr, no traceback (main would raise one)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", [chat("What is 2+2?", "4"), chat("Capital of France?", "Paris")])
    return tmp_path


# --- the YAML file ---------------------------------------------------------------------------


def test_a_binary_config_file_is_one_line_naming_the_file(project, capsys):
    path = write(project / "run.yaml", b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\xff\xfe\x03\x00")
    err = cli_error(["validate", str(path)], capsys)
    assert err.count("\n") == 1 and f"{path}:1: not valid UTF-8" in err


def test_a_config_in_another_encoding_names_the_line(project, capsys):
    path = write(project / "run.yaml", "datasets:\n  - path: train.jsonl\n# r\xe9sum\xe9\n".encode("latin-1"))
    err = cli_error(["validate", str(path)], capsys)
    assert f"{path}:3: not valid UTF-8" in err and "save" in err


def test_a_file_of_nul_bytes_is_not_a_text_file(project, capsys):
    path = write(project / "run.yaml", b"datasets: []\n\x00\x00\x00")
    assert f"{path}:2: not a text file" in cli_error(["validate", str(path)], capsys)


def test_a_key_set_twice_is_refused_naming_both_lines(project, capsys):
    path = write(project / "run.yaml", "datasets:\n  - path: train.jsonl\nlearning_rate: 1e-3\nseed: 1\n"
                                       "learning_rate: 1.0e-4\n")
    err = cli_error(["validate", str(path)], capsys)
    assert f"{path}:5:" in err and "'learning_rate' is set twice (lines 3 and 5)" in err


def test_a_nested_key_set_twice_is_refused_but_yaml_merge_keys_still_override(project):
    path = write(project / "run.yaml", "datasets:\n  - path: train.jsonl\nlora:\n  r: 8\n  alpha: 16\n  r: 32\n")
    with pytest.raises(ConfigError, match=r"run.yaml:6: .*'r' is set twice \(lines 4 and 6\)"):
        load_config(path)
    merged = write(project / "merged.yaml", "defaults: &d {path: train.jsonl, weight: 2.0}\n"
                                            "datasets:\n  - <<: *d\n    weight: 3.0\n")
    assert read_yaml(merged)["datasets"] == [{"path": "train.jsonl", "weight": 3.0}]  # as YAML says, not a repeat


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("learning_rate", float("inf")), ("learning_rate", float("nan")), ("weight_decay", float("inf")),
    ("lora.alpha", float("inf")), ("adam_betas", [0.9, float("nan")]), ("max_grad_norm", float("inf")),
])
def test_every_non_finite_float_is_rejected(project, key, value):
    raw: dict = {"datasets": [{"path": "train.jsonl"}]}
    section, _, leaf = key.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[leaf] = value
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}.*finite"):
        config_from_dict(raw, base=project)


@pytest.mark.parametrize("key, value", [
    ("seed", 10**23), ("seed", -1), ("micro_batch_size", 10**12), ("max_seq_len", 10**12), ("grad_accum", 10**9),
    ("global_batch_size", 10**12), ("lora.r", 10**6), ("evaluation.max_new_tokens", 10**9),
    ("evaluation.batch_size", 10**9), ("performance.loss_chunk_tokens", 10**12),
])
def test_integers_that_size_memory_have_upper_bounds(project, key, value):
    raw: dict = {"datasets": [{"path": "train.jsonl"}]}
    section, _, leaf = key.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[leaf] = value
    with pytest.raises(ConfigError, match=rf"\n  {key.replace('.', '[.]')}: Input should be"):
        config_from_dict(raw, base=project)


def test_grpo_sizes_have_upper_bounds(project):
    grpo = {"rewards": [{"function": "exact_match"}], "generations": 10**6, "max_completion_tokens": 10**9}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"datasets": [{"path": "train.jsonl"}], "method": "grpo", "grpo": grpo}, base=project)
    assert "grpo.generations: Input should be" in str(err.value)
    assert "grpo.max_completion_tokens: Input should be" in str(err.value)


def test_the_largest_seed_torch_and_the_data_order_take_is_accepted(project):
    cfg = config_from_dict({"datasets": [{"path": "train.jsonl"}], "seed": 2**32 - 1}, base=project)
    assert sorted(epoch_order([5], [1.0], cfg.seed, 3)) == list(range(5))


def test_set_overrides_go_through_the_same_checks(project, capsys):
    path = write(project / "run.yaml", "datasets:\n  - path: train.jsonl\n")
    err = cli_error(["validate", str(path), "--set", "seed=100000000000000000000000", "--set", "learning_rate=.inf"],
                    capsys)
    assert "seed: Input should be less than or equal to 4294967295" in err and "learning_rate: Input should be a finite" in err
    err = cli_error(["plan", str(path), "--set", "micro_batch_size=1000000000000"], capsys)
    assert "micro_batch_size: Input should be less than or equal to" in err


def test_padding_waste_of_a_micro_batch_larger_than_the_data_allocates_nothing_for_it():
    """plan measured padding with an array of micro_batch_size entries: 7.28 TiB at 1e12."""
    assert padding_waste([3, 5, 8], 10**12) == padding_waste([3, 5, 8], 3) == pytest.approx(1 - 16 / 24)


# --- validate checks every path --------------------------------------------------------------


def validate_error(project: Path, capsys, **raw) -> str:
    path = write(project / "run.yaml", yaml.safe_dump({"datasets": [{"path": "train.jsonl"}], **raw}))
    return cli_error(["validate", str(path)], capsys)


def test_validate_names_a_missing_base_model_folder(project, capsys):
    err = validate_error(project, capsys, base_model="./models/missing")
    assert "base_model" in err and "models/missing" in err and "not found" in err


def test_validate_names_a_hub_id_that_is_not_on_this_machine(project, capsys):
    err = validate_error(project, capsys, base_model="someorg/some-model")
    assert "base_model: someorg/some-model is not on this machine" in err


def test_validate_names_a_model_folder_without_weights(project, capsys):
    (project / "model").mkdir()
    (project / "model" / "config.json").write_text("{}")
    assert "has no .safetensors weights" in validate_error(project, capsys, base_model="./model")


def test_validate_names_a_missing_chat_template_file(project, capsys):
    err = validate_error(project, capsys, chat_template="templates/chat.jinja")
    assert "chat_template: file" in err and "templates/chat.jinja not found" in err


def test_validate_names_a_dataset_folder_that_is_not_a_saved_dataset(project, capsys):
    (project / "data").mkdir()
    (project / "data" / "notes.txt").write_text("hello")
    err = validate_error(project, capsys, datasets=[{"path": "data"}])
    assert "datasets[0].path:" in err and "save_to_disk" in err


def test_validate_names_a_missing_dataset_folder_and_reward_file(project, capsys):
    grpo = {"rewards": [{"function": "exact_match"}, {"function": "my_rewards.py:score"}]}
    err = validate_error(project, capsys, datasets=[{"path": "prompts"}], method="grpo", grpo=grpo)
    assert "datasets[0].path:" in err and "prompts not found" in err
    assert "grpo.rewards[1].function:" in err and "my_rewards.py not found" in err


def test_validate_still_accepts_a_good_config(project, capsys):
    path = write(project / "run.yaml", "datasets:\n  - path: train.jsonl\nchat_template: chatml\n")
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


# --- data records and files ------------------------------------------------------------------


def test_a_lone_surrogate_is_a_bad_record_in_data_check(project, smol_tokenizer):
    data = write(project / "train.jsonl", "\n".join([json.dumps(chat("a", "b")), LONE_SURROGATE,
                                                     json.dumps(chat("c", "d"))]) + "\n")
    report = check_data(config_from_dict({"datasets": [{"path": str(data)}]}, base=project), smol_tokenizer)
    [bad] = report.errors
    assert (bad.code, bad.line) == ("bad-record", 2)
    assert "messages[0].content holds a lone UTF-16 surrogate" in bad.message
    assert report.records[str(data)] == 3


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_lone_surrogate_is_skipped_and_counted_by_prepare(project, smol_tokenizer, monkeypatch, fmt):
    from tuneforge.data.dataset import prepare_data

    monkeypatch.setenv("TUNEFORGE_CACHE", str(project / "cache"))
    good = [chat(f"question {i}", f"answer {i}") for i in range(12)]
    bad = json.loads(LONE_SURROGATE)
    records = good[:5] + [bad] + good[5:]
    if fmt == "jsonl":
        write(project / "d.jsonl", "\n".join(LONE_SURROGATE if r is bad else json.dumps(r) for r in records) + "\n")
    elif fmt == "json":
        write(project / "d.json", json.dumps(records))
    else:
        write(project / "d.csv", "messages\n" + "".join('"' + json.dumps(r["messages"]).replace('"', '""') + '"\n'
                                                        for r in records))
    cfg = config_from_dict({"datasets": [{"path": f"d.{fmt}"}], "on_bad_record": "skip"}, base=project)
    data = prepare_data(cfg, smol_tokenizer)
    [rejected] = data.rejected
    assert rejected.line == (7 if fmt == "csv" else 6) and "lone UTF-16 surrogate" in rejected.reason
    assert len(data.train) == 12 and data.summary.per_file[str(project / f"d.{fmt}")]["bad_record"] == 1


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_data_file_is_an_error_in_data_check(project, capsys, text):
    data = write(project / "train.jsonl", text)
    err = cli_error(["data", "check", str(data)], capsys)
    assert f"{data}: no records" in err


def test_an_empty_data_file_stops_prepare_before_any_model(project, smol_tokenizer, monkeypatch):
    from tuneforge.data.dataset import prepare_data

    monkeypatch.setenv("TUNEFORGE_CACHE", str(project / "cache"))
    write(project / "extra.jsonl", "\n")
    cfg = config_from_dict({"datasets": [{"path": "train.jsonl"}, {"path": "extra.jsonl"}]}, base=project)
    with pytest.raises(DataError, match=r"extra\.jsonl: no records"):
        prepare_data(cfg, smol_tokenizer)


# --- a micro-batch that cannot fit -----------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # on a GPU, after checkpointing has chosen what fits
def test_a_micro_batch_larger_than_the_device_is_refused_naming_the_key(project, tiny_models, smol_tokenizer,
                                                                       monkeypatch, device):
    """micro_batch_size: 1e12 put every example in one micro-batch and grew until the kernel killed train."""
    import torch

    from tuneforge.data.dataset import prepare_data
    from tuneforge.train.fits import check_micro_batch_fits

    monkeypatch.setenv("TUNEFORGE_CACHE", str(project / "cache"))
    write_jsonl(project / "many.jsonl", [chat(f"Repeat the number {i} twice", f"{i} {i}") for i in range(64)])
    cfg = config_from_dict({"datasets": [{"path": "many.jsonl"}], "micro_batch_size": 4096}, base=project)
    data = prepare_data(cfg, smol_tokenizer)
    dev, budget = torch.device(device), 64 * 2**20
    with pytest.raises(ConfigError) as err:
        check_micro_batch_fits(cfg, tiny_models["llama"], data, dev, total=budget)
    message = str(err.value)
    assert "\n" not in message and message.startswith("micro_batch_size: 4096 puts 64 examples of up to ")
    suggested = int(message.split("set micro_batch_size: ")[1].split()[0])
    assert 1 <= suggested < 64
    check_micro_batch_fits(cfg.model_copy(update={"micro_batch_size": suggested}), tiny_models["llama"], data, dev,
                           total=budget)
    check_micro_batch_fits(cfg, tiny_models["llama"], data, dev, total=64 * 2**30)


def test_set_overrides_of_a_bare_data_file_are_checked_too(project, capsys):
    """`data check FILE --set ...` ignored every override, so a typo or a bad value passed unseen."""
    data = project / "train.jsonl"
    err = cli_error(["data", "check", str(data), "--set", "max_seq_lenn=512", "--set", "max_grad_norm=.inf"], capsys)
    assert f"--set for {data}: invalid config" in err
    assert "max_seq_lenn: unknown key; did you mean max_seq_len?" in err and "max_grad_norm: Input should be a finite" in err
    assert main(["data", "check", str(data), "--set", "max_seq_len=512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["max_seq_len"] == 512


def test_a_set_value_that_is_not_yaml_is_one_line_and_a_repeated_key_inside_it_is_refused(project, capsys):
    path = write(project / "run.yaml", "datasets:\n  - path: train.jsonl\n")
    err = cli_error(["validate", str(path), "--set", "lora.target_modules=[q_proj"], capsys)
    assert err.count("\n") == 1 and "--set 'lora.target_modules=[q_proj': the value is not valid YAML" in err
    err = cli_error(["validate", str(path), "--set", "lora={r: 8, r: 16}"], capsys)
    assert "--set 'lora={r: 8, r: 16}'" in err and "'r' is set twice" in err


def test_train_refuses_an_empty_data_file_before_it_reads_any_model(project):
    """The model named here does not exist: an empty data file must be found first, not after a model load."""
    from tuneforge.train.loop import train

    write(project / "empty.jsonl", "\n\n")
    cfg = config_from_dict({"datasets": [{"path": "empty.jsonl"}], "base_model": "./no-such-model",
                            "output_dir": "out"}, base=project)
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        train(cfg)
