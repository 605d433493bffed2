"""The training loop on tiny random models of real architectures: learning, accumulation, resume, outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import memorise_records, write_jsonl
from safetensors.torch import load_file

from tuneforge.config import config_from_dict
from tuneforge.data.batching import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.models.load import attach_adapter, load_model, load_tokenizer
from tuneforge.track.console import Reporter
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints, load_checkpoint
from tuneforge.methods.sft import SFT
from tuneforge.train.loop import accumulate_gradients, train
from tuneforge.train.optim import build_optimizer

QUIET = Reporter(quiet=True)
CPU = torch.device("cpu")


def make_cfg(tmp_path, model_dir, out="run", **over):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, memorise_records(24))
    raw = {
        "base_model": str(model_dir), "datasets": [{"path": str(data)}], "validation": {"split": 0.25},
        "max_seq_len": 128, "micro_batch_size": 4, "grad_accum": 1, "epochs": 2, "learning_rate": 5e-3,
        "warmup_steps": 2, "output_dir": str(tmp_path / out), "device": "cpu", "precision": "fp32",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "evaluation": {"max_new_tokens": 8, "max_examples": 4},
    }
    for key, value in over.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(raw, base=tmp_path)


def trained_weights(run_dir):
    [*_, last] = list_checkpoints(run_dir)
    return load_file(last / "trainable.safetensors")


@pytest.mark.parametrize("arch,adapter", [("llama", "lora"), ("qwen2", "full")])
def test_loss_falls_on_a_memorisable_batch(tmp_path, tiny_models, arch, adapter):
    lr = 2e-2 if adapter == "lora" else 3e-3
    cfg = make_cfg(tmp_path, tiny_models[arch], adapter=adapter, epochs=6, learning_rate=lr, **{"lora.dropout": 0.0})
    manifest = train(cfg, reporter=QUIET)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert manifest["eval_after"]["val_loss"] < manifest["eval_before"]["val_loss"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_equals_one_big_batch(tmp_path, tiny_models):
    """R-GA-1: (8 x 1), (2 x 4) and (1 x 8) give the same loss and gradients on variable-length data."""
    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter="full")
    tok = load_tokenizer(tiny_models["llama"])
    examples = prepare_data(cfg, tok).train[:8]
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 2, "the test needs examples of different lengths"
    model = load_model(tiny_models["llama"], CPU)
    results = []
    for size in (8, 2, 1):
        batches = [collate(examples[i : i + size], tok.pad_token_id) for i in range(0, 8, size)]
        model.zero_grad(set_to_none=True)
        loss, totals, _ = accumulate_gradients(SFT(None, tok.pad_token_id), model, batches, CPU, torch.float32)
        results.append((loss, totals["tokens"], _grads(model)))
    (loss8, n8, g8) = results[0]
    for loss, n, grads in results[1:]:
        assert n == n8
        assert abs(loss - loss8) <= 1e-6
        for name in g8:
            torch.testing.assert_close(grads[name], g8[name], atol=1e-6, rtol=0)


def test_accumulation_logged_loss_matches_through_the_loop(tmp_path, tiny_models):
    runs = {}
    for mbs, ga in ((8, 1), (2, 4)):
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=f"r{mbs}", micro_batch_size=mbs, grad_accum=ga,
                       max_steps=2, **{"lora.dropout": 0.0, "evaluation.before_after": False})
        train(cfg, reporter=QUIET)
        runs[mbs] = read_metrics(tmp_path / f"r{mbs}" / "metrics.jsonl")
    for a, b in zip(runs[8], runs[2]):
        assert a["examples"] == b["examples"]
        assert a["trained_tokens"] == b["trained_tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6


def test_resume_mid_epoch_ends_identical(tmp_path, tiny_models):
    """R-RES-1/R-RES-3: stop at step 9 (epoch 2, mid-epoch) with the last checkpoint at step 8; resume
    gives the same sample order, losses, learning rates and final weights as an uninterrupted run."""
    over = {"save_every": 4, "keep_last": 5, "evaluation.before_after": False}
    full_cfg = make_cfg(tmp_path, tiny_models["llama"], out="full", **over)
    train(full_cfg, reporter=QUIET)

    cfg = make_cfg(tmp_path, tiny_models["llama"], out="cut", **over)
    assert train(cfg, reporter=QUIET, stop_after=9) == {"stopped_at": 9}
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-4", "step-8"]
    train(cfg, resume=True, reporter=QUIET)

    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert len(full) == 10  # 18 training examples, 5 micro-batches of 4 per epoch, 2 epochs
    assert [m["step"] for m in cut] == list(range(1, 11))
    assert [m["examples"] for m in cut] == [m["examples"] for m in full]
    assert [m["loss"] for m in cut] == [m["loss"] for m in full]
    assert [m["lr"] for m in cut] == [m["lr"] for m in full]
    assert 1 < full[8]["epoch"] < 2  # the first replayed step lies mid-way through the second epoch
    a, b = trained_weights(tmp_path / "full"), trained_weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_restores_saved_tensors_bit_for_bit(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=3, **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    [ckpt] = list_checkpoints(tmp_path / "run")[-1:]
    model, _ = attach_adapter(load_model(tiny_models["llama"], CPU), cfg)
    optimizer = build_optimizer(model, cfg)
    state = load_checkpoint(ckpt, model, optimizer)
    saved = load_file(ckpt / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert saved and all(torch.equal(params[n], t) for n, t in saved.items())
    assert state["step"] == 3 and optimizer.state  # optimizer moments came back too


def test_half_written_checkpoint_is_never_picked(tmp_path, tiny_models):
    """R-RES-2: a crash inside save leaves the previous checkpoint as the newest complete one."""
    cfg = make_cfg(tmp_path, tiny_models["llama"], save_every=2, keep_last=5, **{"evaluation.before_after": False})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    script = textwrap.dedent(f"""
        import json, os
        import tuneforge.train.checkpoints.folders as ck
        from tuneforge.config import config_from_dict
        from tuneforge.track.console import Reporter
        from tuneforge.train.loop import train
        real = ck._fsync_tree
        def crash(folder):
            if folder.name == ".tmp-step-4":
                os._exit(9)  # killed while the step-4 checkpoint is being written
            real(folder)
        ck._fsync_tree = crash
        train(config_from_dict(json.loads(open({str(cfg_file)!r}).read())), reporter=Reporter(quiet=True))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-2"]
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step-4").exists()
    # A folder with the right name but no completion marker is ignored too.
    (tmp_path / "run" / "checkpoints" / "step-3").mkdir()
    train(cfg, resume=True, reporter=QUIET)
    steps = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 11))


def test_two_runs_are_bit_identical(tmp_path, tiny_models):
    """R-REP-1: one seed drives data order, LoRA init and dropout."""
    curves = []
    for out in ("a", "b"):
        cfg = make_cfg(tmp_path, tiny_models["qwen2"], out=out, max_steps=4, **{"evaluation.before_after": False})
        train(cfg, reporter=QUIET)
        curves.append([m["loss"] for m in read_metrics(tmp_path / out / "metrics.jsonl")])
    assert curves[0] == curves[1]
    other = make_cfg(tmp_path, tiny_models["qwen2"], out="c", max_steps=4, seed=7, **{"evaluation.before_after": False})
    train(other, reporter=QUIET)
    assert [m["loss"] for m in read_metrics(tmp_path / "c" / "metrics.jsonl")] != curves[0]


def test_run_json_records_what_is_needed_to_rerun(tmp_path, tiny_models):
    """R-REP-2 / R-TPL-2: config, versions, data hashes, seed, device, times, template and stop tokens."""
    cfg = make_cfg(tmp_path, tiny_models["qwen2"], max_steps=2)
    train(cfg, reporter=QUIET)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["config"]["seed"] == cfg.seed and manifest["seed"] == cfg.seed
    assert set(manifest["versions"]) >= {"python", "torch", "transformers", "peft", "tuneforge"}
    import hashlib

    data = tmp_path / "train.jsonl"
    assert manifest["data_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert manifest["device"] == "cpu" and manifest["started"] <= manifest["finished"]
    tok = load_tokenizer(tiny_models["qwen2"])
    assert manifest["chat_template"] == tok.chat_template
    final_tok = load_tokenizer(tmp_path / "run" / "final")
    assert final_tok.chat_template == tok.chat_template
    assert manifest["end_of_turn"] == "<|im_end|>"
    assert "val_loss" in manifest["eval_before"] and "val_loss" in manifest["eval_after"]


def test_existing_output_dir_is_not_overwritten(tmp_path, tiny_models):
    from tuneforge.errors import TuneforgeError

    cfg = make_cfg(tmp_path, tiny_models["llama"], max_steps=1, **{"evaluation.before_after": False})
    with pytest.raises(TuneforgeError, match="no complete checkpoint"):
        train(cfg, resume=True, reporter=QUIET)
    train(cfg, reporter=QUIET)
    with pytest.raises(TuneforgeError, match="already holds a run"):
        train(cfg, reporter=QUIET)


def test_bf16_lora_keeps_a_bf16_base_and_fp32_adapter(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"], precision="bf16", epochs=4, learning_rate=2e-2,
                   **{"lora.dropout": 0.0})
    manifest = train(cfg, reporter=QUIET)
    assert manifest["precision"] == "bfloat16"
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    adapter = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    model, _ = attach_adapter(load_model(tiny_models["llama"], CPU, dtype=torch.bfloat16), cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}


def test_resume_refuses_changed_data(tmp_path, tiny_models):
    from tuneforge.errors import TuneforgeError

    cfg = make_cfg(tmp_path, tiny_models["llama"], save_every=2, **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET, stop_after=3)
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps(memorise_records(1)[0]) + "\n")
    with pytest.raises(TuneforgeError, match="data files changed"):
        train(cfg, resume=True, reporter=QUIET)


def test_a_zero_gradient_moves_no_weight():
    """Adam's momentum would move the weights on a step whose gradient is all zeros; that step is skipped."""
    from tuneforge.train.loop import optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, -1.0, 0.5])
    optimizer_step(opt, 0.1, 1.0)
    after_signal = w.detach().clone()
    w.grad = torch.zeros(3)
    assert optimizer_step(opt, 0.1, 1.0) == 0.0
    assert torch.equal(w.detach(), after_signal)


class SignalAtStep(Reporter):
    """A quiet reporter that sends this process SIGUSR1 when the loop reports step `at` (as `kill -USR1` would)."""

    def __init__(self, at: int):
        super().__init__(quiet=True)
        self.at = at

    def step(self, m: dict) -> None:
        if m["step"] == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_sigusr1_saves_the_step_it_lands_in_and_stops_then_resume_continues_there(tmp_path, tiny_models):
    """The studio's pause: step 3 is saved although save_every is 4, and nothing else listens afterwards."""
    cfg = make_cfg(tmp_path, tiny_models["llama"], save_every=4, max_steps=6, **{"evaluation.before_after": False})
    assert train(cfg, reporter=SignalAtStep(3)) == {"stopped_at": 3}
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-3"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    train(cfg, resume=True, reporter=QUIET)
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))
