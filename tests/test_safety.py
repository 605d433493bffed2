"""Issue 25: no command deletes or overwrites a folder it did not write, a run folder never switches on
code execution, and pickle adapters are never loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from test_train import QUIET, make_cfg

from tuneforge.cli import main
from tuneforge.errors import ModelError, TuneforgeError
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.serve import make_server
from tuneforge.train.loop import train
from tuneforge.train.outputs import save_final

MARKER = ".tuneforge-output"  # the documented name of the file that marks what tuneforge wrote


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """A finished LoRA run and the YAML it was trained from; tests copy the run before they touch it."""
    tmp = tmp_path_factory.mktemp("safety")
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=2, learning_rate=2e-2, **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return tmp / "run", config


@pytest.fixture()
def run(trained, tmp_path):
    return shutil.copytree(trained[0], tmp_path / "run")


def contents(folder):
    """Every file under folder with its bytes: what must be left exactly as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "run.json").write_text("{}")
    return path


def merge_yaml(tmp_path, model_dir):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(model_dir)}, {"model": str(model_dir)}]}))
    return str(path)


# Every command that writes an output folder, as (argv without --out) for a run, its config and a base model.
COMMANDS = {
    "merge": lambda run, config, tmp, model: ["merge", str(run)],
    "export": lambda run, config, tmp, model: ["export", str(run), "--to", "adapter", "--no-verify"],
    "merge-models": lambda run, config, tmp, model: ["merge-models", merge_yaml(tmp, model)],
    "data prepare": lambda run, config, tmp, model: ["data", "prepare", str(config)],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_tuneforge_did_not_write_is_never_replaced(command, run, trained, tmp_path, tiny_models, capsys):
    argv = COMMANDS[command](run, trained[1], tmp_path, tiny_models["llama"])
    out = foreign_folder(tmp_path / "mine")
    before = contents(out)
    assert main([*argv, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite"]) == 2
    assert f"no {MARKER}" in capsys.readouterr().err
    assert contents(out) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(command, run, trained, tmp_path, tiny_models,
                                                                       capsys):
    argv = COMMANDS[command](run, trained[1], tmp_path, tiny_models["llama"])
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("from before")
    assert main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    other = "export" if command != "export" else "merge"  # a folder another command wrote is not this one's
    (out / MARKER).write_text(f"{other}\n")
    before = contents(out)
    assert main([*argv, "--out", str(out), "--overwrite"]) == 2
    assert contents(out) == before


@pytest.mark.parametrize("command", ["merge", "export"])
@pytest.mark.parametrize("where", [".", "final", "checkpoints", ".."])
def test_out_overlapping_the_run_being_read_is_refused(command, where, run, trained, tmp_path, tiny_models, capsys):
    """`merge runs/x --out runs/x` used to exit 0 having deleted the run's checkpoints, metrics and final/."""
    argv = COMMANDS[command](run, trained[1], tmp_path, tiny_models["llama"])
    before = contents(run)
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", str(run / where), *extra]) == 2
        assert "which this command reads" in capsys.readouterr().err
    assert contents(run) == before


def test_report_replaces_only_its_own_page_and_pictures(run, tmp_path, capsys):
    """`report --out` is a file, and its PNGs go in a folder beside it: neither may be someone else's."""
    assert main(["report", str(run), "--out", str(run / "run.json")]) == 2
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    assert "not a tuneforge report" in capsys.readouterr().err and mine.read_text() == "<p>my notes</p>"
    pictures = foreign_folder(tmp_path / "page")
    before = contents(pictures)
    assert main(["report", str(run), "--out", str(tmp_path / "page.html")]) == 2
    assert contents(pictures) == before
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0  # its own page, again
    assert json.loads((run / "run.json").read_text())["steps"] == 2


def test_a_failed_merge_leaves_no_folder_and_the_earlier_output_intact(run, tmp_path, monkeypatch):
    import tuneforge.export.merge as merge

    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    before = contents(out)

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge, "write_json", disk_full)
    with pytest.raises(OSError):
        main(["merge", str(run), "--out", str(out), "--overwrite"])
    with pytest.raises(OSError):
        main(["merge", str(run), "--out", str(tmp_path / "new")])
    assert contents(out) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


def test_data_prepare_keeps_an_existing_default_folder(trained, tmp_path, capsys):
    """`data prepare CONFIG` used to delete <output_dir>/data with whatever it held."""
    config = yaml.safe_load(trained[1].read_text())
    config["output_dir"] = str(tmp_path / "exp")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    data = foreign_folder(tmp_path / "exp" / "data")
    assert main(["data", "prepare", str(path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (data / "notes.txt").read_text() == "mine"


def test_a_new_run_never_replaces_files_it_did_not_write(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **{"evaluation.before_after": False})
    out = foreign_folder(tmp_path / "run")
    (out / "metrics.jsonl").write_text("my own numbers\n")
    before = contents(out)
    with pytest.raises(TuneforgeError, match="holds run.json, metrics.jsonl, which no tuneforge run wrote there"):
        train(cfg, reporter=QUIET)
    assert contents(out) == before


def test_a_run_that_stopped_before_its_first_checkpoint_can_start_again(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **{"evaluation.before_after": False})
    (tmp_path / "run").mkdir()  # an empty folder is fine
    train(cfg, reporter=QUIET, stop_after=0)
    assert (tmp_path / "run" / MARKER).read_text().startswith("run")
    assert train(cfg, reporter=QUIET)["steps"] == 1


def test_save_final_replaces_only_a_final_folder_it_wrote(tmp_path, tiny_models):
    model = load_model(tiny_models["llama"], torch.device("cpu"))
    tokenizer = load_tokenizer(tiny_models["llama"])
    mine = foreign_folder(tmp_path / "mine")
    before = contents(mine)
    with pytest.raises(TuneforgeError, match="not a tuneforge final output"):
        save_final(model, tokenizer, mine, [tokenizer.eos_token_id])
    assert contents(mine) == before
    final = save_final(model, tokenizer, tmp_path / "final", [tokenizer.eos_token_id])
    (final / "stale.txt").write_text("x")
    save_final(model, tokenizer, final, [tokenizer.eos_token_id])
    assert not (final / "stale.txt").exists() and (final / "config.json").is_file()


# --- code execution -------------------------------------------------------------------------------------------------

CUSTOM_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from transformers import LlamaConfig, LlamaForCausalLM


class MarkedConfig(LlamaConfig):
    pass


class MarkedForCausalLM(LlamaForCausalLM):
    config_class = MarkedConfig
'''


@pytest.fixture()
def remote_code_run(run, tiny_models, tmp_path):
    """The run, pointed at a base model folder whose config names custom code that writes a marker file at import,
    with run.json saying trust_remote_code: true (as a run folder someone sent could)."""
    base = shutil.copytree(tiny_models["llama"], tmp_path / "custom-base")
    marker = tmp_path / "code-ran"
    (base / "marked.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "marked.MarkedConfig", "AutoModelForCausalLM": "marked.MarkedForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    manifest = json.loads((run / "run.json").read_text())
    manifest["config"].update(trust_remote_code=True, base_model=str(base))
    manifest["base_model"]["folder"] = str(base)
    (run / "run.json").write_text(json.dumps(manifest))
    return run, marker


def no_serving(monkeypatch):
    """chat and serve return once the model is loaded, instead of waiting for input or requests."""
    monkeypatch.setattr("builtins.input", lambda *_: "")
    monkeypatch.setattr("tuneforge.serve.server.Server.serve_forever", lambda self, *_: None)


@pytest.mark.parametrize("argv", [
    ["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "2"],
    ["chat", "{run}"],
    ["eval", "{run}"],
    ["merge", "{run}"],
    ["export", "{run}", "--to", "hf", "--no-verify"],
    ["serve", "{run}", "--port", "0"],
], ids=lambda a: a[0])
def test_run_json_alone_never_runs_model_code(argv, remote_code_run, capsys, monkeypatch):
    run, marker = remote_code_run
    no_serving(monkeypatch)
    code = main([a.format(run=run) for a in argv])
    assert not marker.exists(), "the model folder's code ran"
    assert code == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "run.json" in err


def test_the_flag_runs_model_code(remote_code_run, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # no writes into ~/.cache
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    run, marker = remote_code_run
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert marker.read_text() == "imported"


# --- pickle adapters ------------------------------------------------------------------------------------------------

def pickle_adapter(folder):
    """The adapter re-saved as adapter_model.bin only, as older PEFT wrote it."""
    from safetensors.torch import load_file

    safe = folder / "adapter_model.safetensors"
    torch.save(load_file(safe), folder / "adapter_model.bin")
    safe.unlink()
    return folder


def test_serve_refuses_a_pickle_adapter(run, trained, tmp_path):
    adapter = pickle_adapter(shutil.copytree(trained[0] / "final", tmp_path / "pk"))
    with pytest.raises(ModelError, match=r"--adapter pk=.*adapter_model\.bin is a pickle file.*safetensors"):
        make_server(run, port=0, adapters=[f"pk={adapter}"], quiet=True)


@pytest.mark.parametrize("argv", [
    ["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "2"],
    ["merge", "{run}"],
    ["eval", "{run}"],
    ["export", "{run}", "--to", "adapter", "--no-verify"],
    ["serve", "{run}", "--port", "0"],
], ids=lambda a: a[0])
def test_a_run_with_a_pickle_adapter_is_refused(argv, run, capsys, monkeypatch):
    no_serving(monkeypatch)
    pickle_adapter(run / "final")
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.bin is a pickle file" in err and "save_file" in err
