"""Resume after faults: damaged checkpoints, torn logs, a changed config, a full disk, and kills at
random points of a run, each resumed to the run an uninterrupted one gives (R-RES-1, R-RES-2)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import memorise_records, write_jsonl
from safetensors import SafetensorError

import tuneforge.train.checkpoints.folders as folders
import tuneforge.train.checkpoints.single as single
import tuneforge.train.loop as loop
from tuneforge.config import config_from_dict
from tuneforge.errors import TuneforgeError
from tuneforge.track.console import Reporter
from tuneforge.track.metrics import MetricsLog, read_metrics
from tuneforge.train.checkpoints import damage, list_checkpoints, save_checkpoint
from tuneforge.train.loop import train

QUIET = Reporter(quiet=True)


class Notes(Reporter):
    """A quiet reporter that keeps its notes and warnings, to check what a resume says."""

    def __init__(self):
        super().__init__(quiet=True)
        self.said: list[str] = []

    def note(self, text: str) -> None:
        self.said.append(text)

    def warn(self, text: str) -> None:
        self.said.append(text)


def make_cfg(tmp_path, model_dir, out="run", **over):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, memorise_records(12))
    raw = {
        "base_model": str(model_dir), "datasets": [{"path": str(data)}], "max_seq_len": 64,
        "micro_batch_size": 2, "max_steps": 12, "save_every": 2, "keep_last": 3, "learning_rate": 5e-3,
        "warmup_steps": 1, "output_dir": str(tmp_path / out), "device": "cpu", "precision": "fp32",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "evaluation": {"before_after": False},
    }
    raw.update(over)
    return config_from_dict(raw, base=tmp_path)


def logged(run_dir) -> list[tuple]:
    """What a resumed run must reproduce exactly: per step its examples, loss, grad norm and learning rate."""
    return [(m["step"], m["examples"], m["loss"], m["grad_norm"], m["lr"]) for m in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_run(run_dir, ref_dir) -> None:
    assert logged(run_dir) == logged(ref_dir)
    for name in ("final/adapter_model.safetensors", f"checkpoints/{list_checkpoints(ref_dir)[-1].name}/trainable.safetensors"):
        assert (run_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """The uninterrupted run the others must end identical to."""
    root = tmp_path_factory.mktemp("ref")
    train(make_cfg(root, tiny_models["llama"]), reporter=QUIET)
    return root / "run"


def _cut_after(tmp_path, model_dir, steps: int, **over):
    cfg = make_cfg(tmp_path, model_dir, **over)
    assert train(cfg, reporter=QUIET, stop_after=steps) == {"stopped_at": steps}
    return cfg, tmp_path / "run"


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, tiny_models, reference):
    """A marked-complete checkpoint with a bad safetensors header is set aside, saying which and why, and
    the run resumes from the older one, ending identical to the uninterrupted run."""
    cfg, run = _cut_after(tmp_path, tiny_models["llama"], 5)
    assert [c.name for c in list_checkpoints(run)] == ["step-2", "step-4"]
    weights = run / "checkpoints" / "step-4" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"  # the JSON header starts at byte 8
    weights.write_bytes(bytes(data))
    notes = Notes()
    train(cfg, resume=True, reporter=notes)
    said = "\n".join(notes.said)
    assert "step-4 is damaged (trainable.safetensors differs from what was written" in said, said
    assert "resuming from the older step-2" in said and "Resuming from" in said and "step-2 (step 2" in said
    assert (run / "checkpoints" / "damaged-step-4").is_dir()  # kept for inspection, out of the listing
    assert_same_run(run, reference)


@pytest.mark.parametrize("name", ["trainable.safetensors", "state.json"])
def test_truncated_only_checkpoint_is_refused_with_its_file_named(tmp_path, tiny_models, name):
    cfg, run = _cut_after(tmp_path, tiny_models["llama"], 3)
    [ckpt] = list_checkpoints(run)
    path = ckpt / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert damage(ckpt).startswith(f"{name} has ")
    notes = Notes()
    with pytest.raises(TuneforgeError, match="every checkpoint in it is damaged.*start without --resume"):
        train(cfg, resume=True, reporter=notes)
    assert any(f"step-2 is damaged ({name} has " in s for s in notes.said), notes.said


def test_torn_last_line_of_metrics_is_dropped_on_resume(tmp_path, tiny_models, reference):
    cfg, run = _cut_after(tmp_path, tiny_models["llama"], 4)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "epoch": 0.83, "loss": 2.71')  # power loss mid-append
    with open(run / "diagnosis.jsonl", "ab") as f:
        f.write(b'{"step": 5, "code": "loss_')
    notes = Notes()
    train(cfg, resume=True, reporter=notes)
    assert any("metrics.jsonl: dropped a torn last line" in s for s in notes.said), notes.said
    assert_same_run(run, reference)
    assert all(json.loads(ln) for ln in (run / "diagnosis.jsonl").read_text().splitlines())


def test_damage_before_the_last_line_of_a_log_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(TuneforgeError, match="metrics.jsonl:2: not a JSON record"):
        MetricsLog(path, resume_from_step=3)


@pytest.mark.parametrize("key,value", [("lora", {"r": 4, "alpha": 16, "dropout": 0.1}),
                                       ("lora", {"r": 8, "alpha": 32, "dropout": 0.1}),
                                       ("lora", {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj"]})])
def test_changed_adapter_is_refused_naming_the_key(tmp_path, tiny_models, key, value):
    cfg, run = _cut_after(tmp_path, tiny_models["llama"], 3)
    changed = make_cfg(tmp_path, tiny_models["llama"], **{key: value})
    with pytest.raises(TuneforgeError, match=r"was written with lora\.(r: 8|alpha: 16\.0|target_modules: \"all-linear\"), "
                                             r"this run has .*set lora\.\w+ back to"):
        train(changed, resume=True, reporter=QUIET)


def test_changed_grad_accum_is_refused_naming_the_value_to_set_back(tmp_path, tiny_models):
    cfg, run = _cut_after(tmp_path, tiny_models["llama"], 3)
    with pytest.raises(TuneforgeError, match="set grad_accum back to 1$"):
        train(make_cfg(tmp_path, tiny_models["llama"], grad_accum=2), resume=True, reporter=QUIET)


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_models, monkeypatch):
    """The error safetensors' writer raises on a full disk (as measured on a 1 MB tmpfs), mid-file."""
    real = single.save_file

    def fill_disk(tensors, path, *args, **kwargs):
        if "step-4" in str(path) and path.name == "optimizer.safetensors":
            path.write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(single, "save_file", fill_disk)
    cfg = make_cfg(tmp_path, tiny_models["llama"])
    with pytest.raises(TuneforgeError) as err:
        train(cfg, reporter=QUIET)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoints'}: no space left to write checkpoint step-4")
    assert "bytes" in message and "--resume" in message
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step-2"]
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-4").exists()
    assert damage(tmp_path / "run" / "checkpoints" / "step-2") is None


def test_checkpoints_marked_before_manifests_are_only_parsed(tmp_path):
    """A checkpoint whose COMPLETE says "ok" (written before manifests) still resumes; a bad file in it is found."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    ckpt = save_checkpoint(tmp_path, 1, model, optimizer, {"cursor": {}}, keep_last=1)
    (ckpt / "COMPLETE").write_text("ok\n")
    assert damage(ckpt) is None
    (ckpt / "rng.safetensors").write_bytes(b"\xff" * 16)
    assert damage(ckpt).startswith("rng.safetensors does not parse")


class Killed(BaseException):
    """A simulated kill -9: raised at the chosen point, past every `except Exception`."""


KILL_POINTS = ("step", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
               "COMPLETE", "rename", "metrics")


def arm(monkeypatch, point: str, nth: int) -> None:
    """Kill the run at the nth occurrence of `point`: mid-step (after backward), halfway through writing
    a checkpoint file, or halfway through appending a metrics line."""
    count = {"n": 0}

    def due(hit: bool) -> bool:
        count["n"] += hit
        return hit and count["n"] == nth

    def half(path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    real_step, real_save, real_publish = loop.optimizer_step, single.save_file, single.publish
    real_manifest, real_fsync, real_write = folders.write_manifest, folders._fsync_tree, MetricsLog.write

    def step(*args, **kwargs):
        if due(point == "step"):
            raise Killed
        return real_step(*args, **kwargs)

    def save_file(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        if due(point == path.name):
            half(path)
            raise Killed

    def publish(tmp, *args):
        if due(point == "state.json"):
            half(tmp / "state.json")
            raise Killed
        real_publish(tmp, *args)

    def write_manifest(tmp):
        real_manifest(tmp)
        if due(point == "COMPLETE"):
            half(tmp / "COMPLETE")
            raise Killed

    def fsync_tree(tmp):
        real_fsync(tmp)
        if due(point == "rename"):
            raise Killed

    def write(self, record):
        if due(point == "metrics"):
            line = json.dumps(record) + "\n"
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            raise Killed
        real_write(self, record)

    monkeypatch.setattr(loop, "optimizer_step", step)
    monkeypatch.setattr(single, "save_file", save_file)
    monkeypatch.setattr(single, "publish", publish)
    monkeypatch.setattr(folders, "write_manifest", write_manifest)
    monkeypatch.setattr(folders, "_fsync_tree", fsync_tree)
    monkeypatch.setattr(MetricsLog, "write", write)


def test_twenty_kills_at_random_points_resume_to_the_uninterrupted_run(tmp_path, tiny_models, reference):
    """R-RES-1/R-RES-2: killed 20 times (seeded points: mid-step, mid-file of each checkpoint file, mid
    metrics append) and resumed each time, the run logs the same losses and grad norms and ends with
    the same weights, byte for byte, as the uninterrupted one."""
    cfg = make_cfg(tmp_path, tiny_models["llama"], save_every=1, keep_last=2)
    run = tmp_path / "run"
    choose = random.Random(17)
    points = choose.sample(KILL_POINTS, len(KILL_POINTS)) + choose.choices(KILL_POINTS, k=20 - len(KILL_POINTS))
    for point in points:  # every kind of point at least once, then 12 more at random
        with pytest.MonkeyPatch.context() as mp:
            arm(mp, point, nth=choose.randint(1, 2))
            with pytest.raises(Killed):
                train(cfg, resume=bool(list_checkpoints(run)), reporter=QUIET)
    train(cfg, resume=True, reporter=QUIET)
    assert_same_run(run, reference)



def test_the_checkpoint_package_and_parallel_import_no_cycle():
    """Issue 17: one package holds both checkpoint kinds; it needs only parallel.world, and nothing in
    parallel/ imports train/ (imports inside functions included)."""
    import ast
    from pathlib import Path

    import tuneforge

    src = Path(tuneforge.__file__).parent

    def imported(folder: str) -> set[str]:
        names = set()
        for path in (src / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
                elif isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
        return {n for n in names if n.startswith("tuneforge.")}

    assert not {n for n in imported("parallel") if n.startswith("tuneforge.train")}
    outside = {n for n in imported("train/checkpoints") if not n.startswith("tuneforge.train.checkpoints.")}
    assert outside <= {"tuneforge.errors", "tuneforge.parallel.world"}, outside
