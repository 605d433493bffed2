"""Predictions against measurements: the rows of bench/PLAN_CALIBRATION.md.

bench/plan_calibrate.py measures a row (a model, a method and a batch shape on one device) and
writes it with plan's prediction; tests/test_plan.py reads the table back and checks plan's
*current* prediction against every measured row, so a change to the model that breaks
calibration fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneforge.errors import TuneforgeError
from tuneforge.plan.hardware import GPUS, Device, cpu_device
from tuneforge.plan.memory import Settings, compute_dtype, memory
from tuneforge.plan.shapes import ModelShape
from tuneforge.plan.throughput import speed

MIB = 1024**2
MEMORY_TOLERANCE = 0.15
SPEED_TOLERANCE = 0.25
_CPU = re.compile(r"CPU (\d+)x(\d+)@([\d.]+)GHz")


@dataclass(frozen=True)
class Row:
    """One calibration shape, and what was measured (None: not yet)."""

    model: str  # a built-in name or a name in plan's table
    method: str  # lora | qlora | full
    micro_batch: int
    seq_len: int
    checkpointing: bool
    padding: float  # share of padded positions in each micro-batch
    device: str  # a GPU table name, or "CPU {cores}x{flops per cycle}@{GHz}GHz"
    peak_mib: float | None = None
    tokens_per_s: float | None = None
    chunked_loss: bool = False  # the loss column: "chunked" or "full" (logits)


def cpu_label(cores: int, per_cycle: int, ghz: float) -> str:
    return f"CPU {cores}x{per_cycle}@{ghz:.2f}GHz"


def device_for(label: str) -> Device:
    """The Device a row was measured on, as plan models it."""
    m = _CPU.fullmatch(label)
    if m:
        return cpu_device(int(m.group(1)), 64.0, int(m.group(2)), float(m.group(3)))
    for d in GPUS:
        if d.name == label:
            return d
    raise TuneforgeError(f"calibration device {label!r}: neither a GPU of plan's table nor 'CPU NxF@G.GGHz'")


def shape_for(model: str) -> ModelShape:
    from tuneforge.plan.model import model_info

    return model_info(model).shape


def settings_for(row: Row) -> Settings:
    """A calibration run trains every linear layer with r=16 LoRA (QLoRA: NF4, double quantised)."""
    return Settings(adapter=row.method, micro_batch=row.micro_batch, seq_len=row.seq_len,
                    checkpointing=row.checkpointing, padded=row.padding > 0, chunked_loss=row.chunked_loss)


def predict(row: Row, shape: ModelShape | None = None) -> tuple[float, float]:
    """(peak MiB, tokens/s) plan predicts for a row."""
    shape = shape or shape_for(row.model)
    device = device_for(row.device)
    s = settings_for(row)
    compute = compute_dtype(s.precision, device.is_cpu)
    peak = memory(shape, s, compute).peak
    return peak / MIB, speed(shape, s, device, compute, row.seq_len, row.padding).tokens_per_second


HEADER = ("model", "method", "micro_batch", "seq_len", "checkpointing", "padding", "loss", "device",
          "measured peak MiB", "predicted peak MiB", "measured tokens/s", "predicted tokens/s")


def to_markdown(rows: list[Row], predictions: list[tuple[float, float]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row, (peak, tps) in zip(rows, predictions):
        measured_peak = "not yet measured" if row.peak_mib is None else f"{row.peak_mib:.0f}"
        measured_tps = "not yet measured" if row.tokens_per_s is None else f"{row.tokens_per_s:.1f}"
        lines.append(f"| {row.model} | {row.method} | {row.micro_batch} | {row.seq_len} | "
                     f"{'on' if row.checkpointing else 'off'} | {row.padding:.3f} | "
                     f"{'chunked' if row.chunked_loss else 'full'} | {row.device} | "
                     f"{measured_peak} | {peak:.0f} | {measured_tps} | {tps:.1f} |")
    return "\n".join(lines)


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return None


def parse_markdown(text: str) -> list[Row]:
    """Every row of every table in the text with the calibration header; measured cells that are
    not numbers (e.g. "not yet measured") are None."""
    rows, in_table = [], False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if tuple(cells) == HEADER:
            in_table = True
            continue
        if not in_table or not line.strip().startswith("|"):
            in_table = False
            continue
        if set(line.replace("|", "").strip()) <= {"-", ":"}:
            continue
        model, method, mb, seq, ckpt, padding, loss, device, peak, _, tps, _ = cells
        rows.append(Row(model, method, int(mb), int(seq), ckpt == "on", float(padding), device,
                        _number(peak), _number(tps), loss == "chunked"))
    return rows
