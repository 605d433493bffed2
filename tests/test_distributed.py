"""Training on 2 CPU processes (gloo) through torchrun: DDP and FSDP give the single-process run's
losses and weights (SFT, the preference methods, GRPO), checkpoints reshard, final/ is whole, and
evaluation.select_best chooses as one process does (R-DIST-1..4, R-FEAT-1, R-RES-3 on 2 ranks).

Starting processes costs most of the time, so one torchrun launch runs every scenario
(tests/dist_scenarios.py) and the tests below check what it left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import chat, memorise_records, write_jsonl
from test_pretrain import stories
from safetensors.torch import load_file

from tuneforge.config import config_from_dict, config_to_dict
from tuneforge.data.batching import shard_step
from tuneforge.errors import ConfigError
from tuneforge.models.load import attach_adapter, load_model
from tuneforge.train.checkpoints.gather import SaveError, check_saved_tensors
from tuneforge.track.console import Reporter
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import load_checkpoint, trainable_parameters
from tuneforge.train.loop import train
from tuneforge.train.steps import micro_batches_per_step
from tuneforge.train.optim import build_optimizer

QUIET = Reporter(quiet=True)
TOL = 1e-5
PLAIN_ARITHMETIC = {"chunked_loss": False, "fused_lora": False}  # what FSDP runs (see raw_config)
ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {  # name: (strategy, adapter, steps)
    "ddp_lora": ("ddp", "lora", 4), "fsdp_lora": ("fsdp", "lora", 4),
    "ddp_full": ("ddp", "full", 3), "fsdp_full": ("fsdp", "full", 3),
    "fsdp_qlora": ("fsdp", "qlora", 2),  # 4-bit weights stored as fp32 and sharded (R-DIST-3)
}
REFERENCES = {"lora": 4, "full": 3, "qlora": 2}  # single-process runs: adapter -> steps
# LoRA with activation checkpointing, against the plain one-process LoRA run: name -> (strategy, performance,
# the level run.json records). Offload is full on a CPU; selective every 2nd layer checkpoints layer 0 of 2.
CHECKPOINTED = {
    "ddp_offload": ("ddp", {"activation_checkpointing": "offload"}, "full"),
    "fsdp_selective": ("fsdp", {"activation_checkpointing": "selective", "checkpoint_every": 2}, "selective"),
}
# Preference objectives with LoRA (the reference is the adapter-disabled model, reached through the DDP
# wrapper or the FSDP root): name -> (strategy, method, extra config). Each is compared with a one-process
# run of the same config. The *_stop runs evaluate every 2 steps and stop early at step 4 (no improvement
# of 100 or more), so final/ holds step 2's weights, saved and reloaded by every process.
STOP = {"validation": {"path": "VAL"}, "eval_every": 2, "early_stopping": {"patience": 1, "min_delta": 100.0}}
PREFERENCE = {
    "ddp_dpo_pre": ("ddp", "dpo", {"dpo": {"precompute_reference": True}}),  # rank 0 writes, rank 1 reads
    "fsdp_dpo_stop": ("fsdp", "dpo", {**STOP, "evaluation": {"before_after": True}}),
    "ddp_kto_stop": ("ddp", "kto", STOP),
    "fsdp_kto": ("fsdp", "kto", {}),
    "ddp_reward": ("ddp", "reward", {}),
    "fsdp_reward": ("fsdp", "reward", {}),
    "ddp_orpo": ("ddp", "orpo", {}),
    "fsdp_simpo": ("fsdp", "simpo", {}),
}
# GRPO with LoRA; the KL term's reference is the adapter-disabled model (through the DDP wrapper or the FSDP
# root). The base model often ends its answers (model_that_stops), so completions differ in length within
# and between processes. Under FSDP an environment answers some completions (prompts whose number is a
# multiple of 3), so a process may take a second turn while the other steps along with a placeholder, and
# the validation prompts are answered greedily at step 2, by both processes. name -> (strategy, grpo keys, others)
GRPO_RUNS = {
    "ddp_grpo": ("ddp", {}, {}),
    "fsdp_grpo": ("fsdp", {"max_turns": 2}, {"validation": {"path": "VAL"}, "eval_every": 2}),
}
GRPO_STATS = ("reward", "reward_std", "frac_zero_std", "completion_length", "kl", "rewards/")
PRETRAIN = {"ddp_pretrain": "ddp", "fsdp_pretrain": "fsdp"}  # method: pretrain from random init, full weights
# evaluation.select_best under FSDP with LoRA: every kept checkpoint is loaded (collectively) and scored by both
# processes, greedy answers included; the highest val_loss wins, so that the winner is not simply the last step.
SELECT = {"save_every": 1, "keep_last": 3, "validation": {"path": "VAL"},
          "evaluation": {"before_after": True, "select_best": {"metric": "val_loss", "mode": "max"},
                         "max_examples": 2, "max_new_tokens": 3}}
MAX_COMPLETION = 6


def raw_config(root: Path, model: Path, out: str, strategy: str = "none", adapter: str = "lora", steps: int = 4,
               **extra) -> dict:
    """22 examples in micro-batches of 2 and a global batch of 8: steps of 4, 4 and 3 micro-batches, so the
    last step of each epoch leaves one process a filler micro-batch."""
    return {
        "base_model": str(model), "datasets": [{"path": str(root / "train.jsonl")}], "max_seq_len": 128,
        "micro_batch_size": 2, "global_batch_size": 8, "max_steps": steps, "adapter": adapter,
        "learning_rate": 5e-3 if adapter == "lora" else 1e-3, "warmup_steps": 1, "output_dir": str(root / out),
        "device": "cpu", "precision": "fp32", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "evaluation": {"before_after": False}, "distributed": {"strategy": strategy},
        # The chunked loss and the fused LoRA layers are off under FSDP (fast.resolve); the one-process
        # references run the same arithmetic as the FSDP runs, since Adam turns last-bit gradient differences
        # into whole steps.
        "performance": PLAIN_ARITHMETIC, **extra,
    }


def select_config(root: Path, model: Path, strategy: str = "none") -> dict:
    extra = {**SELECT, "validation": {"path": str(root / "val.jsonl")}}
    return raw_config(root, model, "fsdp_select" if strategy != "none" else "ref_select", strategy, steps=3, **extra)


def pretrain_config(root: Path, out: str, strategy: str = "none", **extra) -> dict:
    """The pretrain row from random init (its tokenizer trained on the corpus, cached for every process): blocks
    of 33 tokens in micro-batches of 2, a global batch of 8 (2 x 2 on each of 2 processes, 2 x 4 on one)."""
    return {
        "base_model": "llama", "init": "random", "adapter": "full", "method": "pretrain",
        "architecture": {"depth": 1}, "tokenizer": {"train": {"vocab_size": 320}},
        "datasets": [{"path": str(root / "corpus.txt")}], "max_seq_len": 32, "micro_batch_size": 2,
        "global_batch_size": 8, "max_steps": 4, "learning_rate": 3e-3, "warmup_steps": 1,
        "output_dir": str(root / out), "device": "cpu", "precision": "fp32", "evaluation": {"before_after": False},
        "distributed": {"strategy": strategy}, "performance": PLAIN_ARITHMETIC, **extra,
    }


def pissa_config(root: Path, model: Path, out: str, strategy: str = "none") -> dict:
    """PiSSA under DDP: DDP broadcasts rank 0's initialisation (adapter and base), which rank 0 alone wrote."""
    return raw_config(root, model, out, strategy, steps=2, lora={"r": 8, "alpha": 16, "dropout": 0.0, "init": "pissa"})


def preference_config(root: Path, model: Path, name: str, strategy: str = "none") -> dict:
    _, method, extra = PREFERENCE[name]
    data = "kto" if method == "kto" else "pairs"
    # A smaller step than SFT's: Adam moves a weight whose gradient is near zero (keys of a 2-layer model) by
    # about the learning rate whatever the gradient's last bits, which the order of the sum over processes sets.
    extra = {**extra, "method": method, "datasets": [{"path": str(root / f"{data}.jsonl")}], "learning_rate": 1e-3}
    if "validation" in extra:
        extra["validation"] = {"path": str(root / f"{data}_val.jsonl")}
    return raw_config(root, model, name if strategy != "none" else f"ref_{name}", strategy, **extra)


def write_preference_data(root: Path) -> None:
    # Answers that share no tokens: near-identical ones (blue/red) give gradients that nearly cancel, whose
    # last bits Adam's first steps blow up (a single process split into other micro-batches differs by 1e-4).
    pairs = [{"prompt": f"Which colour is item {i}?", "chosen": "Blue.", "rejected": f"Item {i} might be red or green."}
             for i in range(26)]
    kto = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else p["rejected"], "label": bool(i % 3)}
           for i, p in enumerate(pairs)]
    for name, records in (("pairs", pairs), ("kto", kto)):
        write_jsonl(root / f"{name}.jsonl", records[:22])
        write_jsonl(root / f"{name}_val.jsonl", records[22:])


def grpo_config(root: Path, name: str, strategy: str = "none") -> dict:
    """2 micro-batches of 2 prompts per step (one per process), 3 completions each, 2 steps."""
    _, keys, extra = GRPO_RUNS[name]
    grpo = {"generations": 3, "max_completion_tokens": MAX_COMPLETION, "beta": 0.05, "top_p": 0.9,
            "rewards": [{"function": "length_penalty", "args": {"max_chars": 12}}], **keys}
    if "max_turns" in keys:
        grpo["environment"] = f"{root / 'grpo_env.py'}:reply"
    if "validation" in extra:
        extra = {**extra, "validation": {"path": str(root / "prompts_val.jsonl")}}
    return raw_config(root, root / "stops", name if strategy != "none" else f"ref_{name}", strategy, steps=2,
                      method="grpo", datasets=[{"path": str(root / "prompts.jsonl")}], global_batch_size=4,
                      learning_rate=1e-3, grpo=grpo, **extra)


def write_grpo_data(root: Path, tiny_model: Path) -> None:
    records = [{"prompt": f"Say yes {'please ' * (i % 3)}{i}", "answer": "yes"} for i in range(14)]
    write_jsonl(root / "prompts.jsonl", records[:12])
    write_jsonl(root / "prompts_val.jsonl", records[12:])
    (root / "grpo_env.py").write_text(
        "def reply(messages):\n    return 'Once more?' if int(messages[0]['content'].split()[-1]) % 3 == 0 else None\n")
    model_that_stops(tiny_model, root / "stops")


def model_that_stops(src: Path, dst: Path) -> Path:
    """The tiny model with the end-of-turn row of its output layer turned towards its hidden states, so sampled
    answers end after 1 to 6 tokens (a random model would almost never draw that one token of 49k)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    text = tok.apply_chat_template([{"role": "user", "content": "Say yes"}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
        direction = hidden.mean(0)
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] = 3.0 * direction / direction.norm()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """Every 2-process scenario in one launch, and the single-process runs they must equal."""
    root = tmp_path_factory.mktemp("dist")
    write_jsonl(root / "train.jsonl", memorise_records(22))
    write_jsonl(root / "val.jsonl", memorise_records(27)[22:])
    write_preference_data(root)
    model = tiny_models["llama"]
    write_grpo_data(root, model)
    (root / "corpus.txt").write_text("\n\n".join(stories(120)) + "\n")
    cut = raw_config(root, model, "cut", "fsdp", save_every=2, keep_last=3)
    pretrain_cut = pretrain_config(root, "pretrain_cut", "fsdp", save_every=2)
    spec = {
        "runs": [{"config": raw_config(root, model, name, *s)} for name, s in SCENARIOS.items()] + [
            {"config": cut, "stop_after": 3},
            # Saved by FSDP on 2 processes, resumed by DDP on 2.
            {"config": {**cut, "output_dir": str(root / "cut_ddp"), "distributed": {"strategy": "ddp"}},
             "resume": True, "copy_from": str(root / "cut")},
            {"config": raw_config(root, model, "ddp_fast", "ddp", performance="auto")},  # chunked loss on
            {"config": pissa_config(root, model, "ddp_pissa", "ddp")},
        ] + [
            {"config": raw_config(root, model, name, strategy, performance={**PLAIN_ARITHMETIC, **perf})}
            for name, (strategy, perf, _) in CHECKPOINTED.items()
        ] + [{"config": preference_config(root, model, name, strategy)} for name, (strategy, _, _) in PREFERENCE.items()]
          + [{"config": grpo_config(root, name, strategy)} for name, (strategy, _, _) in GRPO_RUNS.items()]
          + [{"config": pretrain_config(root, name, strategy)} for name, strategy in PRETRAIN.items()]
          + [{"config": pretrain_cut, "stop_after": 2}, {"config": select_config(root, model, "fsdp")}],
        "gather": {"config": raw_config(root, model, "gather", "fsdp"), "out": str(root)},
        "reload": {"config": raw_config(root, model, "reload", "fsdp"),
                   "checkpoint": str(root / "cut" / "checkpoints" / "step-2"), "out": str(root / "reload.safetensors")},
        # Rank 0 decodes 2 tokens of one prompt, rank 1 7 tokens of two: rank 0 must keep stepping.
        "decode": {"config": raw_config(root, model, "decode", "fsdp"), "out": str(root), "lengths": [2, 7],
                   "prompts": [[[5, 6, 7]], [[8, 9], [10, 11, 12, 13]]], "seeds": [[1], [2, 3]]},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    # A cache of this launch's own, so rank 0 computes the precomputed reference log-probs (not an earlier run).
    saved_cache = os.environ.get("TUNEFORGE_CACHE")
    os.environ["TUNEFORGE_CACHE"] = str(root / "cache")
    t0 = time.perf_counter()
    proc = torchrun([str(ROOT / "tests" / "dist_scenarios.py"), str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    launch_s = time.perf_counter() - t0
    for adapter, steps in REFERENCES.items():
        train(config_from_dict(raw_config(root, model, f"ref_{adapter}", adapter=adapter, steps=steps)), reporter=QUIET)
    train(config_from_dict(raw_config(root, model, "ref_fast", performance="auto")), reporter=QUIET)
    for name in PREFERENCE:
        train(config_from_dict(preference_config(root, model, name)), reporter=QUIET)
    for name in GRPO_RUNS:
        train(config_from_dict(grpo_config(root, name)), reporter=QUIET)
    train(config_from_dict(pissa_config(root, model, "ref_pissa")), reporter=QUIET)
    train(config_from_dict(select_config(root, model)), reporter=QUIET)
    train(config_from_dict(pretrain_config(root, "ref_pretrain")), reporter=QUIET)
    shutil.copytree(root / "pretrain_cut", root / "pretrain_cut_one")  # FSDP on 2 processes, resumed on 1
    train(config_from_dict({**pretrain_cut, "output_dir": str(root / "pretrain_cut_one")}), resume=True, reporter=QUIET)
    shutil.copytree(root / "cut", root / "cut_one")  # before resuming it, keep the 2-process checkpoint as saved
    train(config_from_dict({**cut, "output_dir": str(root / "cut_one")}), resume=True, reporter=QUIET)
    yield {"root": root, "model": model, "launch_s": launch_s}
    if saved_cache is None:
        os.environ.pop("TUNEFORGE_CACHE")
    else:
        os.environ["TUNEFORGE_CACHE"] = saved_cache


def final_weights(run_dir: Path, adapter: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if adapter == "full" else "adapter_model.safetensors"
    return load_file(run_dir / "final" / name)


def assert_same_run(run_dir: Path, ref_dir: Path, adapter: str) -> None:
    got, want = read_metrics(run_dir / "metrics.jsonl"), read_metrics(ref_dir / "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["examples"] == b["examples"] and a["trained_tokens"] == b["trained_tokens"]
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
        # Adam hides a gradient off by a constant factor from the weights; the logged norm shows it.
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * max(1.0, b["grad_norm"]), (a["step"], a["grad_norm"])
    w, r = final_weights(run_dir, adapter), final_weights(ref_dir, adapter)
    assert set(w) == set(r) and r
    for name in r:
        torch.testing.assert_close(w[name], r[name], atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_with_the_same_global_batch(runs, name):
    """R-FEAT-1, R-GA-1 across ranks: per-step losses and final weights of DDP and FSDP, LoRA, QLoRA and
    full; the QLoRA reference keeps bitsandbytes' uint8 storage, so the storage dtype changes nothing."""
    _, adapter, _ = SCENARIOS[name]
    assert_same_run(runs["root"] / name, runs["root"] / f"ref_{adapter}", adapter)
    manifest = json.loads((runs["root"] / name / "run.json").read_text())
    assert manifest["distributed"] == {"processes": 2, "strategy": SCENARIOS[name][0], "global_batch": 8}


STATISTICS = ("rewards/", "logps/", "kl", "nll_loss", "log_odds", "val_")


@pytest.mark.parametrize("name", [*PRETRAIN, "pretrain_cut_one"])
def test_pretraining_on_two_processes_equals_one(runs, name):
    """method: pretrain from random init under DDP and FSDP (and FSDP stopped at step 2, resumed on one process):
    the same blocks each step (the data position), per-step losses within 1e-5 and final weights within 1e-5
    (fp32; the processes' gradients are summed in another order) of the one-process run with the same global batch."""
    assert_same_run(runs["root"] / name, runs["root"] / "ref_pretrain", "full")
    blocks = [i for m in read_metrics(runs["root"] / name / "metrics.jsonl") for i in m["examples"]]
    assert len(blocks) == len(set(blocks)) == 4 * 8  # 4 steps of 8 blocks, none repeated or skipped


@pytest.mark.parametrize("name", list(PREFERENCE))
def test_preference_objectives_on_two_processes_equal_one(runs, name):
    """DPO, KTO, ORPO and reward models on 2 processes: per-step losses, gradient norms, final weights and the
    logged statistics (summed over processes: accuracies, margins, KL) equal the single-process run's."""
    root = runs["root"]
    assert_same_run(root / name, root / f"ref_{name}", "lora")
    got, want = read_metrics(root / name / "metrics.jsonl"), read_metrics(root / f"ref_{name}" / "metrics.jsonl")
    for a, b in zip(got, want):
        keys = {k for k in b if k.startswith(STATISTICS)}
        assert keys and keys == {k for k in a if k.startswith(STATISTICS)}
        for k in keys:
            assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])
    manifest, ref = (json.loads((root / run / "run.json").read_text()) for run in (name, f"ref_{name}"))
    if name == "ddp_dpo_pre":  # computed once, by rank 0; rank 1 and the one-process run read it
        [table] = (root / "cache" / "reference_logps").iterdir()
        assert table.suffix == ".npz"
    assert manifest["distributed"]["strategy"] == PREFERENCE[name][0]
    if "early_stopping" in PREFERENCE[name][2]:  # one decision on every process; final/ is step 2's weights
        assert manifest["early_stopped"]["step"] == ref["early_stopped"]["step"] == 2
        assert [m["step"] for m in got][-1] == 4
    for key in ("eval_before", "eval_after"):
        if ref[key] is not None:
            assert set(manifest[key]) == set(ref[key])
            for k, v in ref[key].items():
                assert manifest[key][k] == pytest.approx(v, abs=TOL), (key, k)


@pytest.mark.parametrize("name", list(GRPO_RUNS))
def test_grpo_on_two_processes_equals_one(runs, name):
    """Each process samples the groups of its own prompts, each completion from a generator seeded by (seed,
    step, place in the global batch): per-step loss, gradient norm, reward statistics (summed over the
    processes) and final weights equal one process's with the same global batch. Were a completion's draws
    to depend on the process (one random stream each), rank 1 would sample other answers than the single
    process does for the same prompts, and rewards and losses would differ."""
    root = runs["root"]
    assert_same_run(root / name, root / f"ref_{name}", "lora")
    got, want = read_metrics(root / name / "metrics.jsonl"), read_metrics(root / f"ref_{name}" / "metrics.jsonl")
    for a, b in zip(got, want):
        keys = {k for k in b if k.startswith(GRPO_STATS)}
        assert {"reward", "reward_std", "frac_zero_std", "completion_length", "kl"} <= keys
        assert keys == {k for k in a if k.startswith(GRPO_STATS)}
        for k in keys:
            assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])
    # The answers end early and unevenly (so generations differ in length), and they are scored differently.
    assert min(m["completion_length"] for m in want) < MAX_COMPLETION
    assert any(m["reward_std"] > 0 for m in want) and any(m["grad_norm"] > 0 for m in want)
    assert json.loads((root / name / "run.json").read_text())["distributed"]["strategy"] == GRPO_RUNS[name][0]


def test_fsdp_sampling_of_uneven_lengths_ends_and_equals_one_process(runs):
    """Under FSDP each forward needs every process: rank 0, done after 2 tokens, keeps stepping (one all-reduced
    'all done' flag per token) while rank 1 decodes 7, so neither hangs; and each rank's completions are those one
    process samples from the same prompts and seeds."""
    from dist_scenarios import lora_model

    from tuneforge.methods.sampling import seeded_generators
    from tuneforge.models.decode import decode

    spec = json.loads((runs["root"] / "spec.json").read_text())["decode"]
    model = lora_model(config_from_dict(spec["config"]), torch.device("cpu"))
    for rank, (prompts, length, seeds) in enumerate(zip(spec["prompts"], spec["lengths"], spec["seeds"])):
        got = json.loads((runs["root"] / f"decode-{rank}.json").read_text())
        sampling = {"temperature": 1.0, "top_p": 0.9, "generators": seeded_generators(seeds, "cpu")}
        want = decode(model, prompts, [], 0, length, torch.device("cpu"), sampling)
        assert got == [ids for ids, _ in want] and {len(ids) for ids in got} == {length}


def test_pissa_on_two_ddp_processes_equals_one(runs):
    """lora.init: pissa under DDP: rank 0 writes the initial adapter, DDP broadcasts its initialisation, and final/
    (converted back to plain LoRA of rank 2r) equals the single-process run's."""
    root = runs["root"]
    assert_same_run(root / "ddp_pissa", root / "ref_pissa", "lora")
    assert json.loads((root / "ddp_pissa" / "final" / "adapter_config.json").read_text())["r"] == 16
    assert (root / "ddp_pissa" / "adapter_init" / "adapter_model.safetensors").is_file()


def test_select_best_on_two_fsdp_processes_chooses_as_one_and_final_is_the_winner(runs):
    """evaluation.select_best under FSDP: every checkpoint's value, the winner and the after-evaluation equal the
    one-process run's within 1e-5, and final/ holds exactly the winning checkpoint's (sharded) weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = runs["root"]
    run, ref = (json.loads((root / name / "run.json").read_text()) for name in ("fsdp_select", "ref_select"))
    chosen, want = run["select_best"], ref["select_best"]
    assert chosen["step"] == want["step"] != 3 and chosen["values"].keys() == want["values"].keys() == {"1", "2", "3"}
    for step, value in want["values"].items():
        assert chosen["values"][step] == pytest.approx(value, abs=TOL), step
    after, ref_after = (json.loads((root / name / "eval_after.json").read_text())
                        for name in ("fsdp_select", "ref_select"))
    numbers = {k for k, v in ref_after.items() if isinstance(v, float)}
    assert {"val_loss", "exact_match"} <= numbers
    for k in numbers:  # relative for perplexity (about 1e5 for this barely trained model)
        assert after[k] == pytest.approx(ref_after[k], rel=TOL, abs=TOL), k
    assert run["eval_after"] == pytest.approx(ref["eval_after"], rel=TOL, abs=TOL)
    final = final_weights(root / "fsdp_select", "lora")
    for step in chosen["values"]:
        dcp_to_torch_save(root / "fsdp_select" / "checkpoints" / f"step-{step}" / "dcp", root / f"select-{step}.pt")
        kept = {k.replace(".default", ""): v
                for k, v in torch.load(root / f"select-{step}.pt", weights_only=True)["model"].items()}
        same = kept.keys() == final.keys() and all(kept[k].equal(final[k]) for k in final)
        assert same == (int(step) == chosen["step"]), step


def test_ddp_runs_the_chunked_loss_and_equals_one_process(runs):
    """The fast path composes with DDP: the chunked loss goes through the wrapper's own forward, and the fused
    LoRA layers' gradients reach DDP's reducer."""
    root = runs["root"]
    assert_same_run(root / "ddp_fast", root / "ref_fast", "lora")
    for run in ("ddp_fast", "ref_fast"):
        performance = json.loads((root / run / "run.json").read_text())["performance"]
        assert performance["chunked_loss"] and performance["fused_lora"]


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_activation_checkpointing_under_ddp_and_fsdp_equals_one_process(runs, name):
    """Checkpointed layers inside DDP's and FSDP's hooks: the plain one-process run's losses and weights."""
    assert_same_run(runs["root"] / name, runs["root"] / "ref_lora", "lora")
    performance = json.loads((runs["root"] / name / "run.json").read_text())["performance"]
    assert performance["activation_checkpointing"] == CHECKPOINTED[name][2]


def test_saved_on_two_processes_resumes_on_one_and_on_two(runs):
    """Sharded checkpoints reshard: FSDP at 2 -> 1 process, and FSDP at 2 -> DDP at 2, both end as the
    uninterrupted run; the data position is global (the replayed steps read the same examples)."""
    root = runs["root"]
    for resumed in ("cut_one", "cut_ddp"):
        assert_same_run(root / resumed, root / "ref_lora", "lora")
    state = json.loads((root / "cut" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["world_size"] == 2 and state["micro_per_step"] == 4


def test_sharded_checkpoint_loads_bit_for_bit_on_one_and_two_processes(runs):
    """R-RES-3: the adapter loaded from a sharded checkpoint (into 1 process, and into 2 FSDP processes
    then gathered) is bit-equal to what the checkpoint holds, read by DCP's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = runs["root"]
    ckpt = root / "cut_one" / "checkpoints" / "step-2"
    dcp_to_torch_save(ckpt / "dcp", root / "saved.pt")
    saved = torch.load(root / "saved.pt", weights_only=True)["model"]
    cfg = config_from_dict(raw_config(root, runs["model"], "x"))
    model, _ = attach_adapter(load_model(runs["model"], torch.device("cpu")), cfg)
    state = load_checkpoint(ckpt, model, build_optimizer(model, cfg))
    assert state["step"] == 2
    on_one = dict(trainable_parameters(model))
    on_two = load_file(root / "reload.safetensors")
    assert set(saved) == set(on_one) == set(on_two)
    for name, tensor in saved.items():
        assert torch.equal(on_one[name].detach(), tensor) and torch.equal(on_two[name], tensor), name


def test_gathered_adapter_loads_in_peft_and_equals_the_shards(runs):
    """R-DIST-2: final/ written from an FSDP-sharded adapter holds exactly the concatenated in-memory shards."""
    from peft import PeftModel

    root = runs["root"]
    shards = [load_file(root / f"shards-{r}.safetensors") for r in (0, 1)]
    base = load_model(runs["model"], torch.device("cpu"))
    loaded = dict(PeftModel.from_pretrained(base, str(root / "final")).named_parameters())
    lora = [n for n in shards[0] if "lora_" in n]
    assert lora
    for name in lora:
        whole = torch.cat([shards[0][name], shards[1][name]])
        assert torch.equal(loaded[name].detach(), whole), name
        assert whole.abs().sum() > 0  # lora_B was made non-zero: a lost shard would show


def test_save_refuses_empty_or_partial_adapter_tensors(tiny_models):
    """R-DIST-1: a tensor that is empty or one process's shard is named before anything is written."""
    cfg = config_from_dict(raw_config(Path("/tmp"), tiny_models["llama"], "x"))
    model, _ = attach_adapter(load_model(tiny_models["llama"], torch.device("cpu")), cfg)
    tensors = {n: p.detach() for n, p in trainable_parameters(model)}
    check_saved_tensors(model, tensors)
    name = next(n for n in tensors if "lora_A" in n)
    for bad in (torch.empty(0), tensors[name][:4]):
        with pytest.raises(SaveError, match=name.replace(".", r"\.")):
            check_saved_tensors(model, {**tensors, name: bad})


def test_each_process_reads_a_disjoint_share_of_every_step():
    step = [[0, 1], [2, 3], [4, 5]]
    (a, real_a), (b, real_b) = shard_step(step, 0, 2), shard_step(step, 1, 2)
    assert (a, real_a) == ([[0, 1], [4, 5]], 2)
    assert b[:real_b] == [[2, 3]] and len(b) == 2  # a filler keeps both processes in step
    assert shard_step(step, 0, 1) == (step, 3)


def test_other_ranks_wait_for_the_data_cache_without_a_collective(tmp_path, tiny_models):
    """R-DIST-4: rank 1 polls for the content-hashed cache folder that rank 0 writes (no barrier, so a long
    preparation outlasts no collective timeout), then reads it; a world without a process group shows
    that no collective was called."""
    import threading

    from tuneforge.data.dataset import prepare_data, prepared_marker
    from tuneforge.models.load import load_tokenizer
    from tuneforge.parallel.world import World

    write_jsonl(tmp_path / "train.jsonl", memorise_records(8) + [chat(f"Which test is this? {time.time()}", "This one.")])
    cfg = config_from_dict(raw_config(tmp_path, tiny_models["llama"], "x"))
    tok = load_tokenizer(tiny_models["llama"])
    ready = prepared_marker(cfg, tok)
    assert not ready()
    rank0 = threading.Timer(1.0, prepare_data, (cfg, tok))  # rank 0, preparing a second later
    rank0.start()
    t0 = time.monotonic()
    with World(rank=1, size=2).main_first(ready=ready):
        data = prepare_data(cfg, tok)
    rank0.join()
    assert time.monotonic() - t0 >= 1.0 and data.from_cache and ready()


def test_batch_settings_that_do_not_divide_are_config_errors(tmp_path, tiny_models):
    raw = raw_config(tmp_path, tiny_models["llama"], "x")
    cfg = config_from_dict({**raw, "global_batch_size": 6})
    assert micro_batches_per_step(cfg, 1) == 3
    with pytest.raises(ConfigError, match="global_batch_size: 6 is 3 micro-batches of 2, which 2 processes"):
        micro_batches_per_step(cfg, 2)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        config_from_dict({**raw, "global_batch_size": 7})
    with pytest.raises(ConfigError, match="global_batch_size or grad_accum, not both"):
        config_from_dict({**raw, "grad_accum": 2})
    # A finished run's config (run.json, read by eval, export and serve) loads again.
    assert config_from_dict(config_to_dict(cfg)).global_batch_size == 6
    assert micro_batches_per_step(config_from_dict({k: v for k, v in raw.items() if k != "global_batch_size"}), 2) == 2


def test_distributed_config_rules(tmp_path, tiny_models):
    raw = raw_config(tmp_path, tiny_models["llama"], "x", "fsdp")
    ddp = {**raw, "distributed": {"strategy": "ddp"}}
    for method in ("dpo", "orpo", "simpo", "kto", "reward"):  # LoRA: the reference is the adapter-disabled model
        assert config_from_dict({**raw, "method": method}).method == method
    assert config_from_dict({**raw, "early_stopping": {"patience": 2}, "validation": {"split": 0.1}, "eval_every": 2})
    grpo = {"method": "grpo", "grpo": {"rewards": [{"function": "exact_match"}], "beta": 0.05}}
    for run in (raw, ddp):
        assert config_from_dict({**run, **grpo}).method == "grpo"
    assert config_from_dict({**ddp, "lora": {"init": "pissa"}}).lora.init == "pissa"
    # What is left, each refusal naming its key and the fix.
    with pytest.raises(ConfigError, match="lora.init: pissa is not supported with distributed.strategy: fsdp .* use "
                                          "distributed.strategy: ddp"):
        config_from_dict({**raw, "lora": {"init": "pissa"}})
    with pytest.raises(ConfigError, match="method: grpo with adapter: full .* set grpo.beta: 0"):
        config_from_dict({**raw, **grpo, "adapter": "full"})
    assert config_from_dict({**raw, "method": "grpo", "adapter": "full", "grpo": {**grpo["grpo"], "beta": 0.0}})
    # A full fine-tune's frozen reference copy is not sharded by FSDP: precompute it, or use DDP.
    with pytest.raises(ConfigError, match="method: dpo with adapter: full .* set dpo.precompute_reference: true"):
        config_from_dict({**raw, "method": "dpo", "adapter": "full"})
    with pytest.raises(ConfigError, match="method: kto with adapter: full .* distributed.strategy: ddp"):
        config_from_dict({**raw, "method": "kto", "adapter": "full"})
    assert config_from_dict({**raw, "method": "dpo", "adapter": "full", "dpo": {"precompute_reference": True}})
    assert config_from_dict({**ddp, "method": "kto", "adapter": "full"})
    # R-DIST-3: QLoRA under FSDP stores the 4-bit weights in the compute dtype, set by validation.
    cfg = config_from_dict({**raw, "adapter": "qlora"})
    assert cfg.quantization.storage == "compute"
    assert config_from_dict({**raw, "adapter": "qlora", "distributed": {"strategy": "ddp"}}).quantization.storage == "auto"
    with pytest.raises(ConfigError, match="quantization.storage: uint8 cannot be sharded"):
        config_from_dict({**raw, "adapter": "qlora", "quantization": {"storage": "uint8"}})
    from tuneforge.models.quantize import bnb_config

    assert bnb_config(cfg.quantization, torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16


def test_a_failing_rank_fails_the_launch_with_its_error(tmp_path, tiny_models):
    """`--nproc 2` starts torchrun; a rank's error is printed with its rank and the launcher exits non-zero."""
    write_jsonl(tmp_path / "train.jsonl", memorise_records(22))
    config = tmp_path / "run.json"  # YAML is a superset of JSON
    config.write_text(json.dumps(raw_config(tmp_path, tiny_models["llama"], "bad", "ddp", global_batch_size=6)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode != 0
    assert "of 2): global_batch_size: 6 is 3 micro-batches" in proc.stderr, proc.stderr[-3000:]
    assert "the failing rank's error is shown above" in proc.stderr


def test_watchdog_prints_the_stack_and_exits_when_nothing_progresses():
    """R-DIST-4: a stuck process is reported with its rank and Python stack, and exits non-zero."""
    code = "from tuneforge.parallel.watchdog import Watchdog\nimport time\nw = Watchdog(1, rank=1)\ntime.sleep(60)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and time.perf_counter() - t0 < 20
    assert "rank 1: nothing finished" in proc.stderr
    assert 'File "<string>", line 4 in <module>' in proc.stderr  # the main thread's stack: where it waits
