"""Which GPU a launched run asks for, and what plan says it costs: plan's price table is the one
source of the price shown before launching."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config import Config
from tuneforge.errors import ConfigError
from tuneforge.plan.report import DeviceResult, plan_config

# plan's device names -> SkyPilot's accelerator names (`sky show-gpus`).
SKY_NAMES = {"H100-80GB": "H100", "H200": "H200", "A100-80GB": "A100-80GB", "A100-40GB": "A100", "L40S": "L40S",
             "A10G": "A10G", "RTX-4090": "RTX4090", "RTX-3090": "RTX3090", "T4": "T4"}


@dataclass(frozen=True)
class Target:
    accelerator: str  # SkyPilot's name, e.g. H100
    per_node: int  # GPUs on each node
    nodes: int
    planned: DeviceResult | None  # plan's row for one such GPU (None: plan does not know the device)

    @property
    def sky(self) -> str:
        return f"{self.accelerator}:{self.per_node}"

    @property
    def processes(self) -> int:
        return self.per_node * self.nodes

    def describe(self) -> str:
        """The resources and plan's estimate, as printed before launching."""
        head = f"{self.nodes} node(s) x {self.sky}"
        p = self.planned
        if p is None:
            return f"{head}; plan's price table has no row for {self.accelerator}: no estimate"
        cost = "not priced" if p.cost is None else f"{p.cost:.3g} at {p.device.price:.2f}/h"
        note = "" if self.processes == 1 else (f"; on {self.processes} GPUs about {_hours(p.run_hours / self.processes)} "
                                                "if it scales perfectly, for about the same total cost")
        return (f"{head}; plan (prices.yaml): {_hours(p.run_hours)} on one {p.device.name}, {cost}{note}"
                + ("" if p.fits else f" (needs: {', '.join(p.changes) or 'more memory'})"))


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{60 * h:.1f} min"


def choose_target(cfg: Config, gpu: str | None, nodes: int = 1, prices: str | None = None) -> Target:
    """`--gpu NAME[:COUNT]` as given, or plan's cheapest GPU that fits (with plan's estimate either way)."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: give 1 or more")
    if gpu is None:
        report = plan_config(cfg, None, prices)
        row = report.recommendation
        if row is None:
            raise ConfigError("launch: plan finds no GPU in its table that fits this run (see `tuneforge plan`); "
                              "give one with --gpu NAME:COUNT")
        return Target(SKY_NAMES.get(row.device.name, row.device.name), 1, nodes, row)
    name, _, count = gpu.partition(":")
    if not name or (count and not (count.isdigit() and int(count) > 0)):
        raise ConfigError(f"--gpu {gpu}: expected NAME or NAME:COUNT, e.g. H100:1 or A100-80GB:8")
    plan_name = next((p for p, s in SKY_NAMES.items() if name.lower() in (p.lower(), s.lower())), None)
    planned = None
    if plan_name is not None:
        report = plan_config(cfg, [plan_name], prices)
        planned = next((r for r in report.rows if r.device.name == plan_name), None)
        if planned is not None and not planned.fits:
            planned = report.fitted.get(plan_name) or planned
    return Target(name, int(count or 1), nodes, planned)
