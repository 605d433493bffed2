"""The model card (README.md) of final/ and of every export: what the model is, how it was made and how it
scored, the evaluation suite before and after with sample sizes and 95% intervals, from run.json alone."""

from __future__ import annotations

from pathlib import Path

import yaml

from tuneforge.track.console import harness_rows


def _n(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ci(ci) -> str:
    return f"[{_n(ci[0])}, {_n(ci[1])}]"


def suite_markdown(comparison: dict | None, judge: dict | None = None, chosen: dict | None = None) -> str:
    """The suite's rows (before, after, paired difference, each with its interval), lm-eval's scores, the
    forgetting check, the judge's rates and the chosen checkpoint, as Markdown ('' when there are none)."""
    comparison, parts = comparison or {}, []
    if comparison.get("suite"):
        rows = [f"| {name} | {c['n']} | {_n(c['before'])} {_ci(c['before_ci95'])} | {_n(c['after'])} "
                f"{_ci(c['after_ci95'])} | {_n(c['difference'])} {_ci(c['ci95'])} | "
                f"{'yes' if c['significant'] else 'no'} |" for name, c in comparison["suite"].items()]
        parts.append("## Evaluation suite\n\n95% intervals; after - before is a paired bootstrap over the same "
                     "n held-out examples.\n\n| metric | n | before | after | after - before | beyond noise |\n"
                     "|---|---|---|---|---|---|\n" + "\n".join(rows))
    if comparison.get("lm_eval"):
        rows = [f"| {' | '.join(_n(v) for v in row[:4])} |" for row in harness_rows(comparison["lm_eval"])]
        parts.append("## lm-evaluation-harness\n\n| task | metric | before | after |\n|---|---|---|---|\n"
                     + "\n".join(rows))
    f = comparison.get("forgetting")
    if f:
        parts.append(f"## Forgetting check\n\nPerplexity on general text {_n(f['before'])} -> {_n(f['after'])} "
                     f"({100 * f['rise']:+.1f}%, threshold {100 * f['threshold']:.0f}%, {f['tokens']} tokens)."
                     + (f"\n\n**Warning**: {f['warning']}" if "warning" in f else ""))
    if judge:
        rows = [f"| {k} | {_n(v['rate'])} | {_ci(v['ci95'])} | {v['count']} |" for k, v in judge["rates"].items()]
        parts.append(f"## LLM judge\n\n{judge['mode']}, judge `{judge['model']}`, n={judge['n']}.\n\n"
                     "| | rate | 95% interval | count |\n|---|---|---|---|\n" + "\n".join(rows))
    if chosen:
        values = ", ".join(f"step {s}: {_n(v)}" for s, v in chosen["values"].items())
        parts.append(f"## Checkpoint\n\nfinal/ is step {chosen['step']}, the {chosen['mode']} {chosen['metric']} "
                     f"among the kept checkpoints on the validation split ({values}).")
    return "\n\n".join(parts)


def model_card(manifest: dict, name: str, adapter: bool) -> str:
    """README.md: what this model is, how it was made, how it scored, how to load it."""
    m = manifest
    before, after = m.get("eval_before") or {}, m.get("eval_after") or {}
    rows = [(k, before.get(k), after.get(k)) for k in ("val_loss", "perplexity", "exact_match", "stopped") if k in after]
    table = "\n".join(f"| {k} | {b if b is None else round(b, 4)} | {round(a, 4)} |" for k, b, a in rows)
    data = "\n".join(f"- `{Path(p).name}`: sha256 `{h}`" for p, h in (m.get("data_sha256") or {}).items())
    suite = suite_markdown(m.get("evaluation"), m.get("judge"), m.get("select_best"))
    return f"""---
library_name: {"peft" if adapter else "transformers"}
base_model: {m.get("base_model", {}).get("name", "")}
tags: [tuneforge]
---
# {name}

Fine-tuned with tuneforge {m.get("versions", {}).get("tuneforge", "")} from `{m.get("base_model", {}).get("name", "")}`
({m.get("config", {}).get("adapter", "")}, {m.get("steps", "?")} steps, seed {m.get("seed")}, {m.get("device")}).
Stop tokens: ids {m.get("stop_token_ids")} (end of turn `{m.get("end_of_turn")}`).

## Held-out evaluation

| metric | before | after |
|---|---|---|
{table}
{f"{chr(10)}{suite}{chr(10)}" if suite else ""}
## Data

{data}

## Config

```yaml
{yaml.safe_dump(m.get("config", {}), sort_keys=False)}```
"""


def write_final_card(run_dir: Path, manifest: dict) -> None:
    """final/README.md, rewritten whenever the run's evaluation is (by train, and by `tuneforge eval`)."""
    final = Path(run_dir) / "final"
    if final.is_dir():
        adapter = (manifest.get("config") or {}).get("adapter", "lora") != "full"
        (final / "README.md").write_text(model_card(manifest, Path(run_dir).name, adapter), encoding="utf-8")
