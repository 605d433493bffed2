"""`tuneforge plan`: config in, per-device memory, speed, time and cost out, with a recommendation.

Reads the model's shape and the data's lengths, never the weights; runs without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tuneforge.config import Config
from tuneforge.data.stats import padding_waste
from tuneforge.fast import chunked_loss_requested, kernels_requested
from tuneforge.methods.facts import method_facts
from tuneforge.plan.advice import candidates, settings_warnings
from tuneforge.plan.assumed import planned_model
from tuneforge.plan.recompute import for_device, from_request, requested, with_level
from tuneforge.plan.data import DataEstimate, counting_tokenizer, data_estimate, gguf_tokenizer_folder, image_estimate
from tuneforge.plan.hardware import GIB, Device, devices, load_prices
from tuneforge.plan.memory import (OPTIMIZER_BYTES, Memory, Settings, compute_dtype, memory, offloaded_bytes,
                                   trainable_params)
from tuneforge.plan.model import ModelInfo, image_positions, model_info
from tuneforge.plan.shapes import ModelShape
from tuneforge.plan.throughput import Speed, speed

QUICK_CPU_HOURS = 1.0  # a run this short on this machine's CPU is worth mentioning next to renting a GPU
TOKENS_PER_PARAMETER = 20  # a compute-optimal token budget (Hoffmann et al. 2022, "Chinchilla")


@dataclass(frozen=True)
class Workload:
    """How much training the config asks for, from the data estimate."""

    examples_per_epoch: float
    epochs: float | None
    max_steps: int | None
    lengths: np.ndarray
    seed: int

    def steps(self, s: Settings) -> tuple[float, int]:
        """(optimizer steps per epoch, steps of the whole run), as train.steps.count_steps counts them."""
        micro = math.ceil(self.examples_per_epoch / s.micro_batch)
        per_epoch = max(1, math.ceil(micro / s.grad_accum))
        total = self.max_steps if self.max_steps is not None else max(1, math.ceil(self.epochs * per_epoch))
        return per_epoch, total

    def batch_shape(self, s: Settings) -> tuple[float, float]:
        """(mean width of a padded micro-batch, share of padding in it)."""
        if not self.lengths.size:
            return float(s.seq_len), 0.0
        waste = padding_waste(self.lengths, s.micro_batch, self.seed)
        return float(self.lengths.mean()) / (1 - waste), waste


@dataclass
class DeviceResult:
    """One device running one set of settings."""

    device: Device
    settings: Settings
    compute: str
    memory: Memory
    fits: bool
    speed: Speed
    epoch_hours: float
    run_hours: float
    cost: float | None
    changes: list[str] = field(default_factory=list)

    @property
    def cost_per_million_tokens(self) -> float | None:
        """What a million trained tokens cost on this device: comparable whatever the data's size."""
        if self.device.price is None or not self.speed.tokens_per_second:
            return None
        return self.device.price / 3600 / self.speed.tokens_per_second * 1e6

    def as_json(self) -> dict:
        return {
            "device": self.device.name, "memory_gib": self.device.memory_gib, "price_per_hour": self.device.price,
            "compute_dtype": self.compute, "fits": self.fits,
            "memory_bytes": {k: round(v) for k, v in self.memory.as_dict().items()},
            "flops_per_token": self.speed.flops_per_token, "tokens_per_second": self.speed.tokens_per_second,
            "step_seconds": self.speed.step_seconds, "epoch_hours": self.epoch_hours, "run_hours": self.run_hours,
            "cost": self.cost, "cost_per_million_tokens": self.cost_per_million_tokens, "changes": self.changes, "settings": asdict(self.settings),
        }


def evaluate(shape: ModelShape, s: Settings, device: Device, work: Workload, changes: list[str] | None = None) -> DeviceResult:
    """Memory, fit, speed, time and cost of these settings on this device, with the activation
    checkpointing the run would choose there."""
    compute = compute_dtype(s.precision, device.is_cpu)
    s = for_device(shape, s, device.memory_gib * GIB, device.is_cpu, compute)
    mem = memory(shape, s, compute)
    width, padding = work.batch_shape(s)
    sp = speed(shape, s, device, compute, width, padding)
    per_epoch, total = work.steps(s)
    run_hours = total * sp.step_seconds / 3600
    cost = None if device.price is None else run_hours * device.price
    return DeviceResult(device, s, compute, mem, mem.peak <= device.usable_bytes(), sp,
                        per_epoch * sp.step_seconds / 3600, run_hours, cost, changes or [])


def fit_search(shape: ModelShape, s: Settings, device: Device, work: Workload) -> DeviceResult | None:
    """The first of advice.candidates that fits this device, or None."""
    for option, changes in candidates(s):
        result = evaluate(shape, option, device, work, changes)
        if result.fits:
            return result
    return None


def cheapest(results: list[DeviceResult]) -> DeviceResult | None:
    """The lowest whole-run cost among priced GPUs; without prices, the fastest."""
    priced = [r for r in results if r.cost is not None]
    if priced:
        return min(priced, key=lambda r: (r.cost, r.run_hours))
    gpus = [r for r in results if not r.device.is_cpu] or results
    return min(gpus, key=lambda r: r.run_hours) if gpus else None


def settings_from_config(cfg: Config, seq_len: int, padded: bool) -> tuple[Settings, list[str]]:
    """The run's settings, reading keys another version of the config may not have with their defaults."""
    notes = []
    adapter = getattr(cfg, "adapter", "lora")
    if adapter not in ("lora", "qlora", "full"):
        notes.append(f"adapter: {adapter} is planned as LoRA")
        adapter = "lora"
    quant = getattr(cfg, "quantization", None)
    optimizer = getattr(cfg, "optimizer", "adamw") or "adamw"
    if optimizer not in OPTIMIZER_BYTES:
        notes.append(f"optimizer: {optimizer} is planned as adamw")
        optimizer = "adamw"
    targets = cfg.lora.target_modules
    # Sequences the model runs per example: a preference pair is two; a GRPO prompt, one per sampled answer.
    facts = method_facts(cfg)
    if facts.online:
        notes.append(f"{facts.name}: sampling time is not in the estimate (training on the sampled answers is)")
    if facts.reference:
        notes.append(f"{facts.name}: the reference model's forward pass is not in the time estimate")
    s = Settings(
        adapter=adapter, bits=getattr(quant, "bits", None) or 4, double_quant=bool(getattr(quant, "double_quant", True)),
        optimizer=optimizer, lora_r=cfg.lora.r, lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=cfg.lora.dropout, micro_batch=cfg.micro_batch_size, rows=facts.rows, grad_accum=_accumulation(cfg), seq_len=seq_len,
        precision=cfg.precision, padded=padded, kernels=kernels_requested(cfg.performance),
        chunked_loss=chunked_loss_requested(cfg),  # as the run will (plan assumes one process, so no FSDP)
        init=getattr(cfg, "init", "pretrained"), family=facts.lr_family,
    )
    return from_request(s, *requested(cfg)), notes


def _accumulation(cfg: Config) -> int:
    """Micro-batches per step on one device: global_batch_size, when given, sets it."""
    global_batch = getattr(cfg, "global_batch_size", None)
    return global_batch // cfg.micro_batch_size if global_batch else cfg.grad_accum


def _tokenizer(info: ModelInfo, cfg: Config):
    """(tokenizer, note): the model's own where it is on this machine, else the built-in model's as a stand-in."""
    if info.tokenizer_folder is not None:
        return counting_tokenizer(info.tokenizer_folder, cfg), ""
    if info.gguf is not None:
        folder = gguf_tokenizer_folder(info.gguf)
        return counting_tokenizer(folder, cfg), ""
    from tuneforge.models.resolve import BUILTIN_MODELS

    builtin = next(iter(BUILTIN_MODELS))
    tokenizer, _ = _tokenizer(model_info(builtin), cfg)
    return tokenizer, (f"the model's own tokenizer is not on this machine: token counts use the built-in "
                       f"{builtin} tokenizer as a stand-in (expect them to differ by 10-20%)")


def _longest(cfg: Config, data: DataEstimate) -> int:
    """Width of the widest micro-batch: the longest example seen, or max_seq_len when a sample
    reached it (a longer example may sit in the part not read)."""
    if not data.lengths.size:
        return cfg.max_seq_len
    longest = int(data.lengths.max())
    if not data.exact and (data.over_max_seq_len > 0 or longest >= cfg.max_seq_len):
        return cfg.max_seq_len
    return longest


def _notes(info: ModelInfo, tokenizer_note: str, s: Settings, rows: list[DeviceResult], read_data: bool) -> list[str]:
    """What is approximate in this plan, in words."""
    notes = [n for n in (info.note, tokenizer_note) if n]
    if not read_data:
        notes.append("no training example was read, so time and cost assume max_seq_len-long examples")
    if s.adapter != "full" and not info.shape.lora_modules(s.lora_targets):
        targets = [s.lora_targets] if isinstance(s.lora_targets, str) else list(s.lora_targets)
        notes.append(f"lora.target_modules {targets} names none of {', '.join(info.shape.projections())}: "
                     "the adapter is counted as empty")
    notes += [f"{r.device.name}: {r.device.note}" for r in rows if r.device.note and not r.device.is_cpu]
    unmeasured = sorted({r.device.name for r in rows if not r.device.mfu_measured})
    if unmeasured:
        notes.append(f"MFU of {', '.join(unmeasured)} is a prior, not yet measured (bench/PLAN_CALIBRATION.md): "
                     "treat their tokens/s as +-50%")
    return notes


@dataclass
class PlanReport:
    config: str
    model: ModelInfo
    settings: Settings
    data: DataEstimate
    rows: list[DeviceResult]
    fitted: dict[str, DeviceResult | None]  # per device: least change that fits, where the config as given does not
    recommendation: DeviceResult | None
    cpu_alternative: DeviceResult | None
    warnings: list[str]
    notes: list[str]
    budget: dict | None = None  # raw-text pre-training: token_budget's numbers

    @property
    def params(self) -> int:
        return self.model.shape.params()

    @property
    def trainable(self) -> int:
        return trainable_params(self.model.shape, self.settings)

    def as_json(self) -> dict:
        d = self.data
        return {
            "config": self.config,
            "model": {"source": self.model.source, "shape": asdict(self.model.shape), "params": self.params,
                      "trainable_params": self.trainable},
            "settings": asdict(self.settings),
            "data": {"train_examples": d.train_examples, "examples_per_epoch": d.examples_per_epoch,
                     "tokens_per_epoch": d.tokens_per_epoch, "trained_tokens_per_epoch": d.trained_tokens_per_epoch,
                     "longest": self.settings.seq_len, "over_max_seq_len_share": d.over_max_seq_len,
                     "how": d.how, "exact": d.exact, "relative_error": d.relative_error},
            "devices": [r.as_json() for r in self.rows],
            "fits_with_changes": {k: (v.as_json() if v else None) for k, v in self.fitted.items()},
            "recommendation": self.recommendation.as_json() if self.recommendation else None,
            "cpu_alternative": self.cpu_alternative.as_json() if self.cpu_alternative else None,
            "warnings": self.warnings,
            "notes": self.notes,
            "token_budget": self.budget,
        }


def token_budget(params: int, run_tokens: float, results: list[DeviceResult]) -> dict:
    """What pre-training from scratch asks first: the compute-optimal budget (~20 tokens per parameter),
    the share of it this run trains, and that whole budget's time and cost on each device."""
    optimal = TOKENS_PER_PARAMETER * params
    hours = [(r.device, optimal / r.speed.tokens_per_second / 3600) for r in results if r.speed.tokens_per_second]
    devices = [{"device": d.name, "hours": h, "cost": None if d.price is None else h * d.price} for d, h in hours]
    return {"parameters": params, "tokens_per_parameter": TOKENS_PER_PARAMETER, "compute_optimal_tokens": optimal,
            "run_tokens": run_tokens, "share_of_optimal": run_tokens / optimal, "devices": devices}


def plan_config(cfg: Config, gpus: list[str] | None = None, prices: str | Path | None = None,
                config_path: str = "", data: DataEstimate | None = None) -> PlanReport:
    """Everything `tuneforge plan` prints, for a loaded config; `data` given (plan.assumed) reads no data
    and loads no tokenizer."""
    table = devices(gpus, load_prices(prices))
    read_data = data is None
    info = planned_model(cfg, read_data)
    tokenizer_note = ""
    if data is None and method_facts(cfg).model_head == "image_classifier":  # no tokenizer: patches per image
        data = image_estimate(cfg, image_positions(info.folder or Path(cfg.base_model)))
    if data is None:
        tokenizer, tokenizer_note = _tokenizer(info, cfg)
        data = data_estimate(cfg, tokenizer)
    if data.classes:  # the head the data builds: one output per class
        info = planned_model(cfg, read_data, data.classes)
    lengths = np.asarray(data.lengths)
    s, notes = settings_from_config(cfg, _longest(cfg, data), bool(lengths.size and lengths.min() != lengths.max()))
    work = Workload(data.examples_per_epoch, cfg.epochs, cfg.max_steps, lengths, cfg.seed)
    shape = info.shape
    rows = [evaluate(shape, s, d, work) for d in table]
    fitted = {r.device.name: fit_search(shape, s, r.device, work) for r in rows if not r.fits}
    gpu_rows = [r for r in rows if not r.device.is_cpu]
    fitting = [r for r in gpu_rows if r.fits] or [r for r in fitted.values() if r and not r.device.is_cpu]
    recommendation = cheapest(fitting)
    cpu = next((r for r in rows if r.device.is_cpu), None)
    cpu_alternative = cpu if cpu and cpu.fits and cpu.run_hours <= QUICK_CPU_HOURS else None
    notes += _notes(info, tokenizer_note, s, rows, bool(lengths.size))
    if recommendation is not None and recommendation.settings.offload:
        host = offloaded_bytes(shape, recommendation.settings, recommendation.compute)
        notes.append(f"activation checkpointing offload keeps {host / GIB:.1f} GiB of layer inputs in pinned CPU "
                     "memory, and copies them to and from the GPU every step (not in the time estimate)")
    warnings = settings_warnings(s, cfg.learning_rate, data.train_examples, data.trained_tokens_per_epoch,
                                 data.over_max_seq_len, cfg.max_seq_len, cfg.truncation)
    if recommendation is None and gpu_rows:
        least = min(memory(shape, with_level(o, "offload"), compute_dtype(s.precision, False)).peak
                    for o, _ in candidates(s))
        warnings.append(f"no GPU in the table fits this run, even with checkpointing, micro-batch 1 and a "
                        f"quantised base ({least / GIB:.0f} GiB at the least); use several GPUs (FSDP) or a smaller model")
    budget = None
    if "raw" in method_facts(cfg).records:
        steps = work.steps(s)[1]
        tokens_per_example = data.trained_tokens_per_epoch / max(data.examples_per_epoch, 1)
        shown = [r for r in (recommendation, cpu) if r is not None]
        budget = token_budget(shape.params(), steps * s.micro_batch * s.grad_accum * tokens_per_example, shown)
    return PlanReport(config_path, info, s, data, rows, fitted, recommendation, cpu_alternative, warnings, notes,
                      budget)

