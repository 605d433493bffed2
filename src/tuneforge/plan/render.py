"""`tuneforge plan` in the terminal: a table a device per row, then the recommendation and warnings."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

from tuneforge.methods.learning_rates import kind_words, training_kind
from tuneforge.plan.hardware import GIB
from tuneforge.plan.recompute import describe as describe_level
from tuneforge.plan.memory import Settings
from tuneforge.plan.report import PlanReport
from tuneforge.plan.shapes import ModelShape

BREAKDOWN = ("weights", "adapter", "optimizer", "gradients", "activations", "logits")
SHORT = ("weights", "adapter", "optim", "grads", "activ", "logits")
# Narrow enough for an 80-column terminal.
TABLE_STYLE = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)


def duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


def money(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return "<$0.01"
    return f"${value:,.2f}" if value < 100 else f"${value:,.0f}"


def parameters(n: float) -> str:
    """A parameter count to three significant figures: 603K (not 1M), 3.41M (not 3M), 135M, 8.03B."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:,.{max(0, 2 - int(math.log10(n / size)))}f}{unit}"
    return f"{n:,.0f}"


def gib(n: float) -> str:
    x = n / GIB
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 0.05 else f"{x:.2f}"


def rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second:,.0f}" if tokens_per_second >= 10 else f"{tokens_per_second:.2g}"


def checkpointing_words(s: Settings, shape: ModelShape) -> str:
    """The activation checkpointing of settings: a level, or who chooses it."""
    if s.checkpoint_choice in ("budget", "lean"):
        return f"auto ({'least that fits' if s.checkpoint_choice == 'budget' else 'min_memory'}, chosen per device)"
    if s.checkpoint_choice == "selective":
        return "selective (layers chosen per device)"
    return describe_level(shape, s)


def settings_line(s: Settings, shape: ModelShape) -> str:
    full = kind_words(training_kind(s.adapter, s.init), s.family)
    method = {"full": full, "lora": f"LoRA r={s.lora_r}",
              "qlora": f"QLoRA r={s.lora_r} ({'NF4' if s.bits == 4 else 'int8'} base"
                       f"{', double quant' if s.bits == 4 and s.double_quant else ''})"}[s.adapter]
    return (f"{method}, {s.optimizer}, micro_batch_size {s.micro_batch} x grad_accum {s.grad_accum}, "
            f"activation checkpointing {checkpointing_words(s, shape)}")


def set_flags(changes: list[str]) -> str:
    """The changes as `--set` flags for `tuneforge train`."""
    flags = []
    for change in changes:
        key, _, value = change.partition(": ")
        flags.append(f"--set {key}={value.split(' ')[0]}")
    return " ".join(flags)


def memory_table(report: PlanReport) -> Table:
    table = Table(title="Peak memory, GiB (no*: fits with the changes below)", title_justify="left", **TABLE_STYLE)
    for name in ("device", "fits", "peak", *SHORT):
        table.add_column(name, justify="left" if name in ("device", "fits") else "right", no_wrap=True)
    for r in report.rows:
        fitted = report.fitted.get(r.device.name)
        fits = "[green]yes[/green]" if r.fits else ("[yellow]no*[/yellow]" if fitted else "[red]no[/red]")
        table.add_row(f"{r.device.name} ({r.device.memory_gib:.0f})", fits, gib(r.memory.peak),
                      *(gib(getattr(r.memory, k)) for k in BREAKDOWN))
    return table


def speed_table(report: PlanReport) -> Table:
    table = Table(title="Speed, time and cost", title_justify="left", **TABLE_STYLE)
    for name in ("device", "dtype", "checkpointing", "tokens/s", "epoch", "run", "$/hour", "cost"):
        table.add_column(name, justify="left" if name == "device" else "right", no_wrap=True)
    for r in report.rows:
        table.add_row(r.device.name, r.compute, describe_level(report.model.shape, r.settings),
                      rate(r.speed.tokens_per_second), duration(r.epoch_hours),
                      duration(r.run_hours), money(r.device.price), money(r.cost))
    return table


def print_plan(report: PlanReport, console: Console) -> None:
    """Model and data facts, the device table, what to rent, warnings and the assumptions behind it."""
    m, d, s = report.model, report.data, report.settings
    console.print(f"[bold]Model[/bold] {m.shape.name or '?'} from {m.source}: {parameters(report.params)} parameters, "
                  f"{parameters(report.trainable)} trained")
    console.print(f"[bold]Data[/bold] {d.train_examples:,.0f} training examples, {d.examples_per_epoch:,.0f} per "
                  f"epoch, {d.tokens_per_epoch:,.0f} tokens per epoch ({d.trained_tokens_per_epoch:,.0f} trained), "
                  f"longest micro-batch {s.seq_len} tokens; counted from {d.how}")
    console.print(f"[bold]Settings[/bold] {settings_line(report.settings, m.shape)}")
    console.print()
    console.print(memory_table(report))
    console.print()
    console.print(speed_table(report))
    changed = [r for r in report.fitted.values() if r is not None]
    for r in changed:
        console.print(f"  {r.device.name} fits with: {', '.join(r.changes)} (peak {gib(r.memory.peak)} GiB, "
                      f"checkpointing {describe_level(m.shape, r.settings)}, run {duration(r.run_hours)}, "
                      f"{money(r.cost)})")
    rec = report.recommendation
    if rec is not None:
        how = "as configured" if not rec.changes else f"with {', '.join(rec.changes)}"
        console.print(f"\n[bold green]Recommended:[/bold green] {rec.device.name} {how}: {settings_line(rec.settings, m.shape)}, {rec.compute}; "
                      f"peak {gib(rec.memory.peak)} of {rec.device.memory_gib:.0f} GiB, "
                      f"{rate(rec.speed.tokens_per_second)} tokens/s, {rec.speed.step_seconds:.2g} s a step, "
                      f"run {duration(rec.run_hours)}, {money(rec.cost)} ({money(rec.cost_per_million_tokens)} per "
                      "million tokens)")
        if rec.changes:
            console.print(f"  tuneforge train {report.config or 'CONFIG'} {set_flags(rec.changes)}", highlight=False)
    if report.cpu_alternative is not None:
        console.print(f"This machine's CPU also runs it: about {duration(report.cpu_alternative.run_hours)}.")
    b = report.budget
    if b is not None:
        where = "; ".join(f"{d['device']} {duration(d['hours'])}" + (f" {money(d['cost'])}" if d["cost"] else "")
                          for d in b["devices"])
        console.print(f"[bold]Token budget[/bold] this run trains {b['run_tokens']:,.0f} tokens, "
                      f"{b['share_of_optimal']:.0%} of the compute-optimal ~{b['tokens_per_parameter']} x "
                      f"{b['parameters']:,} parameters = {b['compute_optimal_tokens']:,} tokens"
                      + (f" (that budget: {where})" if where else ""))
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    for n in report.notes:
        console.print(f"[dim]note: {n}[/dim]")
    console.print("[dim]note: times cover training steps only (not loading, evaluation or checkpoints); "
                  "peak is what PyTorch allocates, and a device fits when it leaves ~1 GiB for the CUDA context.[/dim]")
