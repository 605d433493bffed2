"""The training run, top to bottom: data, model, before-eval, loop, checkpoints, after-eval, outputs.

The loop does not know which method it trains: it asks the objective (tuneforge.methods) for
each micro-batch's loss, normalised by what the whole accumulated batch holds (trained tokens,
pairs, examples): micro-batch 2 x accumulation 4 equals micro-batch 8.

Nor does it know how many processes train (tuneforge.parallel): each takes its share of every
global batch, the model it trains was made parallel by a function beforehand, and rank 0 alone
writes files. Two processes x accumulation 2 equal one process x accumulation 4.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from tuneforge.config import Config, check_distributable, config_to_dict
from tuneforge.data.batching import shard_step
from tuneforge.data.dataset import prepare_data, prepared_marker, write_rejected
from tuneforge.errors import ConfigError, RunStopped, TrainingError
from tuneforge.eval.compare import compare, headline
from tuneforge.eval.record import after_training, suite_costs
from tuneforge.fast import fused_lora_blocker
from tuneforge.fast.apply import apply_fast_path
from tuneforge.fast.switches import resolve as resolve_fast_path
from tuneforge.output_folders import mark
from tuneforge.methods.build import build_objective
from tuneforge.methods.facts import function_at, method_facts
from tuneforge.methods.run import run_objective
from tuneforge.methods.reference import Reference, make_reference
from tuneforge.models.adapters import adapter_merged, describe_adapted, initial_adapter_dir
from tuneforge.models.decode import stop_token_ids
from tuneforge.models.load import (
    attach_adapter,
    check_template_tokens,
    load_model,
    pick_device,
    pick_dtype,
    weights_dtype,
)
from tuneforge.models.init import model_folder
from tuneforge.models.run import Run, load_tuned
from tuneforge.parallel.apply import choose_strategy, parallelize
from tuneforge.parallel.watchdog import Watchdog
from tuneforge.parallel.world import SINGLE, World, init_world
from tuneforge.track.card import write_final_card
from tuneforge.track.diagnose import Watch
from tuneforge.track.mfu import mfu_meter
from tuneforge.track.system import system_stats, throughput
from tuneforge.track.trackers import Trackers, artefacts, build_trackers, require_packages
from tuneforge.train.checkpoints import load_checkpoint, read_state, save_checkpoint, trainable_parameters
from tuneforge.train.checkpoints.gather import check_saved_tensors, gather_for_save
from tuneforge.train.fits import check_micro_batch_fits
from tuneforge.train.optim import build_optimizer
from tuneforge.train.outputs import now, run_manifest, save_final, write_json
from tuneforge.train.recovery import load_best, read_best, roll_back, save_best
from tuneforge.train.resume import adapter_facts, check_resumable, check_same_data, resume_point
from tuneforge.track.console import Reporter
from tuneforge.train.schedule import lr_at, warmup_steps
from tuneforge.train.select_best import select_checkpoint
from tuneforge.train.steps import count_steps, next_step_batches
from tuneforge.train.stop_signal import StopRequest
from tuneforge.validate import check_data_files


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def accumulate_gradients(objective, model, batches: list[dict], device, dtype, world: World = SINGLE,
                         counted: int | None = None) -> tuple[float, dict, dict]:
    """Backward over this process's micro-batches of a step: (loss, units averaged over, statistics),
    each of the global batch."""
    return run_objective(objective, model, batches, device, dtype, backward=True, world=world, counted=counted)


def optimizer_step(optimizer, lr: float, max_grad_norm: float | None) -> float:
    """Clip, set the learning rate, step; returns the gradient norm before clipping.

    A gradient of exactly zero (e.g. GRPO groups whose answers all scored the same) carries no
    signal: the step is skipped, since Adam would otherwise keep moving the weights on stale momentum.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: the norm of sharded gradients, reduced over the processes
        norm = norm.full_tensor()
    grad_norm = norm.item()
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+ groups run at a multiple of the schedule
    if math.isfinite(grad_norm) and grad_norm > 0:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _check_distributable(cfg: Config, world: World, strategy: str) -> None:
    if world.distributed:
        try:
            check_distributable(cfg, f"{world.size} processes", strategy)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _quantization_for(cfg: Config, strategy: str):
    """R-DIST-3: FSDP chosen by `auto` stores 4-bit weights in the compute dtype, as an explicit fsdp does."""
    q = cfg.quantization
    if q is None or strategy != "fsdp" or q.storage == "compute":
        return q
    if q.storage == "uint8":
        raise ConfigError("quantization.storage: uint8 cannot be sharded by FSDP (distributed.strategy: auto chose "
                          "fsdp); remove it or set distributed.strategy: ddp")
    return q.model_copy(update={"storage": "compute"})


def train(cfg: Config, resume: bool = False, reporter: Reporter | None = None, stop_after: int | None = None,
          benchmark: Callable | None = None) -> dict:
    """Run a whole fine-tune; returns the run.json contents (on rank 0; the other ranks get a short summary).

    `stop_after` ends the loop after that step without a final save, as a crash would (tests of resume).
    `benchmark(spec, run, base_folder, device)` runs evaluation.lm_eval after training (serve/harness.py serves
    the models; training does not import the server); without it lm-eval is left to `tuneforge eval`.
    """
    world, device = init_world(cfg.distributed, pick_device(cfg.device))
    rep = reporter or Reporter()
    if not world.main:
        rep = Reporter(quiet=True)  # one voice: rank 0 prints, the others only raise
    _check_distributable(cfg, world, cfg.distributed.strategy)
    started = now()
    run_dir = Path(cfg.output_dir)
    ckpt = resume_point(run_dir, resume, world, rep.warn)
    require_packages(cfg.track.to)

    # Data first: every check runs before a model is loaded. Rank 0 resolves the model and prepares
    # the data into the cache; the others wait for its content-hashed folder, then read it (R-DIST-4).
    check_data_files(cfg)
    facts = method_facts(cfg)
    with world.main_first():
        folder, source = model_folder(cfg)
    tokenizer = function_at(facts.processor)(folder, cfg.chat_template, cfg.trust_remote_code)
    pad_id = getattr(tokenizer, "pad_token_id", None)  # an image processor has none
    with world.main_first(ready=prepared_marker(cfg, tokenizer)):
        data = prepare_data(cfg, tokenizer)
    check_same_data(world, data.file_hashes)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        mark(run_dir, "run")
        write_rejected(run_dir / "rejected.jsonl", data.rejected)
    rep.data_summary(data, cfg, run_dir, tokenizer)
    counts = count_steps(cfg, data, world.size)
    check_micro_batch_fits(cfg, folder, data, device)

    dtype = pick_dtype(cfg.precision, device)
    strategy = choose_strategy(cfg, world, device, folder)
    _check_distributable(cfg, world, strategy)  # what auto chose may refuse what it allows
    seed_everything(cfg.seed)
    model = load_model(folder, device, cfg.trust_remote_code, weights_dtype(cfg.adapter, dtype),
                       _quantization_for(cfg, strategy), facts.model_head, pad_id, data.head_config)
    if facts.model_head == "causal_lm":
        check_template_tokens(model, tokenizer, cfg)
    stops = stop_token_ids(tokenizer, data.end_of_turn)

    reference = make_reference(cfg, facts, model, folder, data, tokenizer, device, dtype, rep, world)
    online = {"tokenizer": tokenizer, "stop_ids": stops, "end_of_turn": data.end_of_turn, "device": device,
              "dtype": dtype, "base": Path.cwd(), "seed": cfg.seed}
    fast = resolve_fast_path(cfg, device.type, model, sharded=strategy == "fsdp", data=data)
    rep.note(fast.describe())
    objective = build_objective(cfg, data, pad_id, reference, fast, **online)
    loss_info = objective.describe()
    costs = suite_costs(cfg.evaluation, len(data.validation), benchmark is not None)
    for note in ["Objective: " + ", ".join(f"{k}={v}" for k, v in loss_info.items()), *objective.notes, *costs]:
        rep.note(note)

    before_path = run_dir / "eval_before.json"
    before = None
    if data.validation and cfg.evaluation.before_after:
        if ckpt is not None and before_path.exists():
            before = json.loads(before_path.read_text())
        else:
            rep.note("Evaluating the base model on the validation set...")
            # Before training the policy is its own reference (no adapter yet, no copy needed). Every
            # process evaluates its whole copy (no collectives yet); rank 0 writes.
            before = objective.held_out(model, data, final=True,
                                        reference=Reference(model, reference.free) if reference is not None else None)
            if world.main:
                write_json(before_path, before)

    seed_everything(cfg.seed)
    model, adapted = attach_adapter(model, cfg, save_initial=world.main)
    rep.note(describe_adapted(adapted, cfg.adapter == "full"))
    if cfg.performance.fused_lora and not fast.fused_lora:
        rep.warn(f"performance.fused_lora: not applied, since {fused_lora_blocker(cfg, strategy == 'fsdp')}")
    for note in apply_fast_path(model, fast, device).notes():
        rep.note(note)
    model.train()
    # `trained` is what the objective runs (a DDP wrapper, or `model` itself sharded in place by FSDP);
    # everything else (optimizer, checkpoints, evaluation) keeps using `model`.
    trained = parallelize(model, strategy, world, device, cfg.distributed.fsdp, dtype)
    if world.distributed:
        rep.note(f"Training on {world.size} processes ({strategy}): {counts.micro_per_step} micro-batches of "
                 f"{cfg.micro_batch_size} per step, {counts.micro_per_step // world.size} in each process "
                 f"(global batch {counts.micro_per_step * cfg.micro_batch_size})")
    optimizer = build_optimizer(model, cfg, fused=fast.fused_optimizer)
    warmup = warmup_steps(counts.total_steps, cfg.warmup_steps, cfg.warmup_ratio)

    step, cursor = 0, {"epoch": 0, "micro": 0}
    if ckpt is not None:
        state = read_state(ckpt)
        check_resumable(state, ckpt, cfg, counts.micro_per_step, world.size, data.file_hashes)
        load_checkpoint(ckpt, model, optimizer)
        step, cursor = state["step"], state["cursor"]
        rep.note(f"Resuming from {ckpt} (step {step}, epoch {cursor['epoch']}, micro-batch {cursor['micro']})")
    if world.main:
        tracking = build_trackers(cfg, run_dir, step if ckpt is not None else None, rep.warn)
    else:
        tracking = Trackers([], rep.warn)
    tracking.start(config_to_dict(cfg), run_manifest(config_to_dict(cfg), data_sha256=data.file_hashes, seed=cfg.seed,
                                                     base_model=cfg.base_model, started=started,
                                                     plan=counts.__dict__))  # total_steps, for a progress bar
    watch = Watch(cfg, counts.total_steps, data, tokenizer, rep.warn, tracking.finding, model)
    mfu = mfu_meter(model.config.to_dict(), cfg, device, dtype)
    batch_state = {"micro_batch_size": cfg.micro_batch_size, "micro_per_step": counts.micro_per_step,
                   "adapter_facts": adapter_facts(cfg)}
    if ckpt is None:
        watch.before_training()
        if cfg.on_divergence == "rollback":  # a state to roll back to before the first checkpoint
            save_checkpoint(run_dir, 0, model, optimizer, {"cursor": cursor, "data_sha256": data.file_hashes,
                                                           **batch_state}, cfg.keep_last, world)
    else:
        watch.restore(state, read_best(run_dir))
    orders: dict = {}
    last_val, last_loss = None, None
    if step == 0:
        objective.preflight(model)
    watchdog = Watchdog(cfg.distributed.watchdog_seconds if world.distributed else None, world.rank)
    stop = StopRequest(listen=not world.distributed)  # SIGUSR1: save at the end of this step, then stop
    rep.start(counts.total_steps, step)
    try:
        while step < counts.total_steps and (stop_after is None or step < stop_after):
            t0 = time.perf_counter()
            index_batches = next_step_batches(cfg, data, counts, cursor, orders)
            mine, counted = shard_step(index_batches, world.rank, world.size)
            batches = [objective.collate(idx, (step, world.rank + j * world.size)) for j, idx in enumerate(mine)]
            data_s = time.perf_counter() - t0
            loss, totals, stats = accumulate_gradients(objective, trained, batches, device, dtype, world, counted)
            lr = watch.lr_scale * lr_at(step, base_lr=cfg.learning_rate, total_steps=counts.total_steps, warmup=warmup,
                                        kind=cfg.scheduler)
            watch.measure_gradients()
            grad_norm = optimizer_step(optimizer, lr, cfg.max_grad_norm)
            elapsed = time.perf_counter() - t0
            watchdog.pet("step")
            speed = throughput(totals, data_s, elapsed)
            record = {
                "step": step + 1, "epoch": round(cursor["epoch"] + cursor["micro"] / counts.micro_per_epoch, 4),
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": totals.get("tokens"),
                **speed, **mfu(speed["tokens_per_s"]), **system_stats(device),
                **stats, "examples": [i for idx in index_batches for i in idx],
            }
            action = watch.after_step(record, lambda: [data.train[i].record.where for idx in index_batches for i in idx])
            if action == "rollback":  # the diverged state is dropped, never saved
                state = roll_back(run_dir, model, optimizer, watch.safe_checkpoint)
                step, cursor = state["step"], state["cursor"]
                watch.rewind(step)
                tracking.rewind(step)
                continue
            if action == "stop":
                tracking.log(record)
                raise TrainingError(watch.stop_message)
            step += 1
            last_loss = loss
            if cfg.eval_every and data.validation and step % cfg.eval_every == 0:
                # Every process evaluates (FSDP needs them all for each forward); rank 0's numbers are the
                # ones all of them act on, so early stopping takes one decision.
                last_val = world.broadcast(objective.held_out(model, data))
                record.update({k: v for k, v in last_val.items() if k.startswith("val_")})
                if watch.after_eval(record) == "best":
                    save_best(run_dir, model, step, cfg.early_stopping.metric, record[cfg.early_stopping.metric],
                              world, adapter=cfg.adapter != "full")
                watchdog.pet("evaluation")
            tracking.log(record)
            rep.step(record)
            if (step == counts.total_steps or (cfg.save_every and step % cfg.save_every == 0) or watch.early_stopped
                    or stop.asked):
                loop_state = {"cursor": cursor, "data_sha256": data.file_hashes, **batch_state, **watch.state()}
                save_checkpoint(run_dir, step, model, optimizer, loop_state, cfg.keep_last, world)
                watchdog.pet("checkpoint")
            if watch.early_stopped or stop.asked:
                break
    except BaseException as err:
        tracking.finish({"steps": step}, "KILLED" if isinstance(err, (RunStopped, KeyboardInterrupt)) else "FAILED")
        raise
    finally:
        stop.close()
        watchdog.stop()
        rep.stop()
    if step < counts.total_steps and not watch.early_stopped:
        tracking.finish({"steps": step}, "KILLED")
        return {"stopped_at": step}

    best = load_best(run_dir, model) if watch.early_stopped else None
    # Every process loads and scores each kept checkpoint (FSDP: loading and each forward need them all); rank 0's
    # numbers are broadcast, so all of them load the same winner before final/ is gathered from it.
    chosen, winner = select_checkpoint(cfg.evaluation.select_best, run_dir, model, optimizer,
                                       lambda: world.broadcast(objective.held_out(model, data, final=True)), rep.note)
    # final/ always holds whole tensors: gathered from the shards under FSDP (every process takes part),
    # then written by rank 0, which alone goes on to evaluate and write run.json.
    gathered = gather_for_save(model, adapter=cfg.adapter != "full")
    if not world.main:
        return {"rank": world.rank, "steps": step}
    check_saved_tensors(model, gathered if gathered is not None else dict(trainable_parameters(model)))
    final = save_final(model, tokenizer, run_dir / "final", stops, initial_adapter_dir(cfg), state_dict=gathered,
                       write=function_at(facts.final))
    after = None
    if data.validation and cfg.evaluation.before_after:
        # select_best has evaluated final/'s weights in this very model just so (None where it has not).
        after = winner if gathered is None else None
        if after is None:
            rep.note("Evaluating the tuned model on the validation set...")
            # A sharded model cannot run in one process: rank 0 evaluates final/ as export and serve will load it.
            tuned = model if gathered is None else load_tuned(Run(run_dir, cfg, {}), device, dtype)[0]
            with adapter_merged(tuned):  # final/ is saved: the weights may change in their last bits
                after = objective.held_out(tuned, data, final=True)
        write_json(run_dir / "eval_after.json", after)
    comparison = compare(before, after, cfg.evaluation)
    manifest = run_manifest(
        config_to_dict(cfg),
        base_model={"name": cfg.base_model, "source": source, "folder": str(folder)},
        chat_template=getattr(tokenizer, "chat_template", None),
        **({"head": data.head_config} if data.head_config else {}),  # a classifier's labels, to rebuild its head
        end_of_turn=data.end_of_turn,
        stop_token_ids=stops,
        data_sha256=data.file_hashes,
        data_summary=data.summary.as_json(),
        rejected=len(data.rejected),
        seed=cfg.seed,
        device=str(device),
        precision=str(dtype).removeprefix("torch."),
        distributed={"processes": world.size, "strategy": strategy,
                     "global_batch": counts.micro_per_step * cfg.micro_batch_size},
        started=started,
        finished=now(),
        steps=step,
        plan=counts.__dict__,
        adapted_modules=adapted,
        final=str(final),
        eval_before=headline(before),
        eval_after=headline(after),
        evaluation=comparison,
        objective=loss_info,
        performance=fast.__dict__,
        final_metrics={"train_loss": last_loss, **{k: v for k, v in (last_val or {}).items() if k.startswith("val_")}},
        early_stopped=best,
        select_best=chosen,
        diagnoses=watch.codes,
        overhead_s={"tracking": round(tracking.seconds, 4), "diagnosis": round(watch.seconds, 4)},
    )
    write_json(run_dir / "run.json", manifest)
    write_json(final / "run.json", manifest)  # the artefact carries its own provenance
    write_final_card(run_dir, manifest)
    manifest = after_training(run_dir, cfg, manifest, folder, before, after, benchmark, rep.warn)
    tracking.finish({**manifest, "artefacts": artefacts(run_dir)}, "FINISHED")
    rep.before_after(before, after, comparison=manifest["evaluation"], judge=manifest.get("judge"))
    return manifest
