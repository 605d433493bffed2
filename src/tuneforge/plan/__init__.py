"""Memory, time and cost of a fine-tune before it runs: `tuneforge plan CONFIG`.

shapes/architectures/model: the model's sizes (config.json, GGUF header, built-in table);
memory: peak training memory; throughput: tokens/s from FLOPs and MFU; hardware: devices and
prices; data: the training data's token counts; advice: what to change and what to avoid;
report: all of it for one config; render: the terminal table.
"""

from tuneforge.plan.report import PlanReport, plan_config

__all__ = ["PlanReport", "plan_config"]
