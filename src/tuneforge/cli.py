"""`tuneforge COMMAND ...`: parse arguments, call one library function, print its result."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console

from tuneforge import __version__
from tuneforge.errors import ConfigError, TuneforgeError

console = Console()


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML file")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lora.r=32 (repeatable)")


def cmd_validate(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.validate import path_problems

    cfg = load_config(args.config, args.overrides)
    if cfg.adapter == "qlora" or cfg.optimizer != "adamw":
        from tuneforge.models.quantize import require_bitsandbytes

        require_bitsandbytes("adapter: qlora" if cfg.adapter == "qlora" else f"optimizer: {cfg.optimizer}")
    problems = path_problems(cfg)
    if problems:
        raise TuneforgeError(f"{args.config}: paths that cannot be used\n" + "\n".join(f"  {p}" for p in problems))
    console.print(f"[green]{args.config}: valid[/green] ({cfg.adapter}, {len(cfg.datasets)} dataset(s), output_dir {cfg.output_dir})")
    return 0


def _launch_train(args) -> int:
    """--nproc N: the same command in N processes under torchrun, which this process only waits for."""
    from tuneforge.config import load_config
    from tuneforge.parallel.launch import launch_local

    load_config(args.config, args.overrides)  # a bad config fails here once, not in N processes
    argv = ["train", args.config, *(f"--set={o}" for o in args.overrides or []), *(["--resume"] if args.resume else [])]
    console.print(f"Starting {args.nproc} processes with torchrun...")
    code = launch_local(args.nproc, argv)
    if code:
        print(f"error: the run failed (torchrun exit status {code}); the failing rank's error is shown above",
              file=sys.stderr)
    return code


def cmd_train(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.parallel.world import env_world, shutdown_world
    from tuneforge.serve.harness import harness_before_after
    from tuneforge.track.console import Reporter
    from tuneforge.train.loop import train

    if args.nproc is not None:
        if env_world().distributed:
            raise TuneforgeError("--nproc starts torchrun itself; under torchrun or srun leave it out "
                                 "(the processes already join the job from RANK and WORLD_SIZE)")
        if args.nproc > 1:
            return _launch_train(args)
    cfg = load_config(args.config, args.overrides)
    if cfg.stages:
        from tuneforge.train.stages import train_chain

        manifest = train_chain(cfg, Path(args.config).resolve().parent, resume=args.resume, reporter=Reporter(console))
        console.print(f"\nStages written to {cfg.output_dir}/<n>-<method>/; the chain is described in {cfg.output_dir}/run.json")
        return 0 if manifest and "stopped_at" not in manifest else 1
    try:
        manifest = train(cfg, resume=args.resume, reporter=Reporter(console), benchmark=harness_before_after)
    finally:
        shutdown_world()
    if env_world().main and "stopped_at" in manifest:  # SIGUSR1 (train/stop_signal.py)
        console.print(f"\nStopped after step {manifest['stopped_at']}, saved as a checkpoint in {cfg.output_dir}; "
                      f"`tuneforge train {args.config} --resume` continues it")
    elif env_world().main:
        console.print(f"\nRun written to {cfg.output_dir} (adapter/weights in final/, facts in run.json)")
    return 0 if manifest else 1


def cmd_eval(args) -> int:
    from tuneforge.eval.record import run_suite
    from tuneforge.serve.harness import harness_before_after
    from tuneforge.track.console import before_after_table, print_comparison, print_judge, side_by_side_table

    out = run_suite(args.target, args.overrides, args.trust_remote_code, args.suite, harness_before_after,
                    args.others)
    before, after = out["before"], out["after"]
    if after is None:
        console.print("The run has not finished; the base model only:")
    console.print(before_after_table(None if after is None else before, after or before))
    print_comparison(console, out["comparison"])
    if out["side_by_side"]:
        console.print(side_by_side_table(out["side_by_side"]))
    judges = [j for j in (out["judge"], *out["judge_with"].values()) if j]
    for judge in judges:
        print_judge(console, judge)
    if out["run_dir"] is not None:
        extra = "".join(f" eval_{name}.json," for name in out["others"])
        console.print(f"Written to {out['run_dir']}: eval_before.json, eval_after.json,{extra} run.json, report.html")
    return 1 if any(j.get("error") for j in judges) else 0


def _load_for_chat(run_path: str, trust_remote_code: bool):
    from tuneforge.models.load import pick_device
    from tuneforge.models.run import inference_dtype, load_tuned, open_run

    run = open_run(run_path, trust_remote_code)
    device = pick_device(run.config.device)
    model, tokenizer = load_tuned(run, device, inference_dtype(device))
    return run, model, tokenizer, device


def cmd_generate(args) -> int:
    from tuneforge.eval.generate import answer

    run, model, tokenizer, device = _load_for_chat(args.run, args.trust_remote_code)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    text, stopped = answer(model, tokenizer, messages, run.stop_ids, args.max_new_tokens, device)
    print(text)
    if not stopped:
        console.print(f"[yellow](stopped at max_new_tokens={args.max_new_tokens}, not by an end-of-turn token)[/yellow]", highlight=False)
    return 0


def cmd_chat(args) -> int:
    from tuneforge.eval.generate import answer

    run, model, tokenizer, device = _load_for_chat(args.run, args.trust_remote_code)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    console.print("Chat with the tuned model. Empty line or Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        text, _ = answer(model, tokenizer, messages, run.stop_ids, args.max_new_tokens, device)
        messages.append({"role": "assistant", "content": text})
        print(f"model> {text}")
    return 0


def _out_folder(args, run, default: str) -> Path:
    """An explicit --out must lie outside the run it reads; the default is a new folder inside it."""
    from tuneforge.output_folders import check_apart

    if not args.out:
        return run.dir / default
    check_apart(Path(args.out), run.dir)
    return Path(args.out)


def cmd_merge(args) -> int:
    from tuneforge.export.merge import check_target, merge_run
    from tuneforge.methods.facts import method_facts
    from tuneforge.models.load import LOADED_BY
    from tuneforge.models.run import open_run

    run = open_run(args.run, args.trust_remote_code)
    if args.report:
        from tuneforge.export.merge_report import describe_report, merge_report

        q = run.config.quantization
        base = f"{q.bits}-bit base" if q is not None else "base"
        console.print(describe_report(merge_report(run), base), highlight=False)
        return 0
    out = _out_folder(args, run, "merged")
    target = check_target(run, args.merge_target)
    merge_run(run, out, target=target, overwrite=args.overwrite)
    loader = LOADED_BY[method_facts(run.config).model_head]
    console.print(f"Merged onto the {target} base weights; written to {out} (load it with {loader})")
    return 0


def cmd_export(args) -> int:
    from tuneforge.export.run_export import export_run, verify_run_export
    from tuneforge.models.run import open_run

    run = open_run(args.run, args.trust_remote_code)
    out = _out_folder(args, run, f"export-{args.to}")
    path = export_run(run, args.to, out, args.quant, args.dtype, args.system, args.merge_target, args.overwrite)
    console.print(f"Exported {run.dir.name} as {args.to} to {path}")
    if args.verify and "perplexity" in (run.manifest.get("eval_after") or {}):  # a language model's, to compare
        check = verify_run_export(run, args.to, path, args.quant, args.dtype)
        console.print(f"Checked in a fresh process: {check['summary']}")
    if args.to == "ollama":
        console.print(f"Use it: cd {out} && ollama create {run.dir.name} -f Modelfile && ollama run {run.dir.name}")
    return 0


def cmd_merge_models(args) -> int:
    from tuneforge.merge.run import merge_models

    out = merge_models(args.config, Path(args.out) if args.out else None, overwrite=args.overwrite)
    console.print(f"Merged model written to {out} (config and inputs in merge.json)")
    return 0


def cmd_serve(args) -> int:
    from tuneforge.serve import Limits, serve

    limits = Limits(args.max_tokens_default, args.max_tokens_cap, args.max_concurrent)
    serve(args.target, args.host, args.port, args.adapter, args.api_key, limits=limits,
          trust_remote_code=args.trust_remote_code)
    return 0


def cmd_studio(args) -> int:
    from tuneforge.studio import StudioLimits, studio
    from tuneforge.studio.keys import new_key

    if args.new_key:
        if not args.api_keys:
            raise TuneforgeError("--new-key NAME: give the keys file too, e.g. --api-keys ~/.tuneforge/keys")
        key = new_key(args.api_keys, args.new_key)
        print(f"API key for {args.new_key} (shown once; {args.api_keys} keeps only its hash):\n{key}")
        return 0
    limits = StudioLimits(args.max_upload_mb * 1024 * 1024, args.max_files)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    studio(args.home, args.host, args.port, args.api_keys, limits, gpus=gpus)
    return 0


def cmd_plan(args) -> int:
    import json

    from tuneforge.plan import plan_config
    from tuneforge.plan.assumed import DataSize, assumed_data, load_plan_config
    from tuneforge.plan.render import print_plan

    size = DataSize(args.tokens, args.seq_len, args.examples)
    cfg = load_plan_config(args.config, args.overrides, size)
    data = assumed_data(size, cfg.max_seq_len) if size.given() else None
    report = plan_config(cfg, args.gpu, args.prices, args.config, data)
    if args.json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        print_plan(report, console)
    return 0


def cmd_report(args) -> int:
    from tuneforge.track.report import write_report

    page = write_report(args.run, args.out)
    console.print(f"Report written to {page} (PNGs in {page.with_suffix('')}/)")
    return 0


def cmd_runs(args) -> int:
    from tuneforge.track.console import comparison_tables, runs_table
    from tuneforge.track.runs import compare_runs, find_runs, summary_row

    if args.paths[:1] == ["compare"]:
        comparison = compare_runs(args.paths[1:], Path(args.png))
        for table in comparison_tables(comparison):
            console.print(table)
        console.print(f"Loss curves overlaid in {comparison.png}")
        return 0
    if len(args.paths) > 1:
        raise TuneforgeError("runs: give one folder to list (or `runs compare A B ...`)")
    runs = find_runs(args.paths[0] if args.paths else "runs")
    console.print(runs_table([summary_row(r) for r in runs], console.width) if runs else "No runs found.")
    return 0


def cmd_sweep(args) -> int:
    from tuneforge.sweep.results import sweep_table
    from tuneforge.sweep.run import run_sweep
    from tuneforge.track.console import comparison_tables

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    try:
        result = run_sweep(args.sweep, console.print, gpus, args.worker)
    except KeyboardInterrupt:
        print(f"interrupted; `tuneforge sweep {args.sweep}` continues the sweep (the trial in progress from its "
              "last checkpoint)", file=sys.stderr)
        return 130
    if result is None:  # a worker: the parent process reports
        return 0
    console.print(sweep_table(result))
    if result.comparison is not None:
        console.print(f"The top {len(result.comparison.runs)} trials compared (`tuneforge runs compare`):")
        for table in comparison_tables(result.comparison):
            console.print(table)
    for what, path in result.files.items():
        console.print(f"{what}: {path}")
    console.print(f"{result.seconds:.0f} s; run the same command again to continue a stopped sweep")
    return 0 if result.best else 1


def cmd_launch(args) -> int:
    from tuneforge.launch.run import launch

    result = launch(args.config, args.on, args.gpu, args.spot, args.nodes, args.out, args.bucket, args.partition,
                    args.prices, args.overrides, start=not args.dry_run)
    console.print(f"Resources: {result.target.describe()}", highlight=False)
    for path in result.files:
        console.print(f"Written: {path}")
    if result.started:
        return 0
    if not args.dry_run:
        console.print(f"[yellow]{result.command[0]} is not installed here[/yellow] (SkyPilot: pipx install "
                      "'skypilot[aws]' or another cloud, then `sky check`; see docs/launch.md)")
    print(result.files[0].read_text())
    print("Start it with: " + " ".join(result.command))
    return 0


def _data_config(target: str, overrides: list[str] | None):
    """(config, model folder, tokenizer) of the token-level data commands (preview, stats, prepare)."""
    from tuneforge.data.check import load_check_target
    from tuneforge.methods.facts import method_facts
    from tuneforge.models.init import model_folder
    from tuneforge.models.load import load_tokenizer

    cfg = load_check_target(target, overrides)
    if method_facts(cfg).model_head == "image_classifier":
        raise ConfigError(f"{target}: task: image_classification trains on pixels, not tokens, so there are none to "
                          f"preview or count; `tuneforge data check {target}` opens every image and counts the images "
                          "of each class and split")
    folder, _ = model_folder(cfg)
    return cfg, folder, load_tokenizer(folder, cfg.chat_template, cfg.trust_remote_code)


def cmd_data_check(args) -> int:
    import json

    from tuneforge.data.check import check_data, load_check_target
    from tuneforge.data.images import check_images
    from tuneforge.methods.facts import method_facts
    from tuneforge.track.console import print_check_report

    cfg = load_check_target(args.target, args.overrides)
    if method_facts(cfg).model_head == "image_classifier":
        report = check_images(cfg)  # images: no tokenizer to load
    else:
        cfg, folder, tokenizer = _data_config(args.target, args.overrides)
        report = check_data(cfg, tokenizer, args.near_threshold, folder)
    if args.json:
        print(json.dumps(report.as_json(), indent=1, ensure_ascii=False))
    else:
        print_check_report(report, console, args.show)
    return 1 if report.errors else 0


def cmd_data_preview(args) -> int:
    from tuneforge.data.preview import first_examples, render_preview

    cfg, _, tokenizer = _data_config(args.target, args.overrides)
    color = console.is_terminal
    legend = "trained tokens in green, masked ones dimmed" if color else "trained tokens inside [[ ]], the rest masked"
    console.print(f"First {args.n} examples as the model receives them ({legend}):\n")
    for ex in first_examples(cfg, tokenizer, args.n):
        out = render_preview(tokenizer, ex, color, cfg.max_seq_len, cfg.truncation)
        # Piped or redirected: lines as they are, so a long path's file:line is never split by wrapping.
        console.print(out, markup=False, highlight=False, soft_wrap=True) if not color else console.print(out)
        console.print()
    return 0


def cmd_data_stats(args) -> int:
    import json

    from tuneforge.data.describe import describe
    from tuneforge.track.console import print_stats

    cfg, _, tokenizer = _data_config(args.target, args.overrides)
    stats = describe(cfg, tokenizer, png=Path(args.png) if args.png else None)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print_stats(stats, console)
    return 0


def cmd_data_convert(args) -> int:
    from tuneforge.data.convert import convert_file

    counts = convert_file(args.input, args.output, args.format)
    console.print(f"{counts['written']} of {counts['read']} records written to {args.output} as messages; "
                  f"{counts['rejected']} rejected" + (f" (see {Path(args.output).with_suffix('')}.rejected.jsonl)" if counts["rejected"] else ""))
    return 0 if counts["written"] else 1


def cmd_data_prepare(args) -> int:
    from tuneforge.data.describe import prepare_to_folder

    cfg, _, tokenizer = _data_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "data"
    report = prepare_to_folder(cfg, tokenizer, out, args.overwrite)
    console.print(f"Prepared data written to {report['folder']}: {report['train_examples']} training and "
                  f"{report['validation_examples']} validation examples, {report['rejected']} left out "
                  f"(each with its reason in rejected.jsonl){' (from the cache)' if report['from_cache'] else ''}")
    return 0


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="check, preview, describe, convert and prepare training data")
    dsub = p.add_subparsers(dest="data_command", required=True)

    c = dsub.add_parser("check", help="lint a config's data (or a bare file) with file:line for every finding")
    c.add_argument("target", help="a config file, or a data file (checked with the built-in model, max_seq_len 2048)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--near-threshold", type=float, default=0.85, help="MinHash similarity that counts as a near-duplicate")
    c.add_argument("--show", type=int, default=5, help="locations listed per kind of finding in the terminal")
    c.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_data_check)

    c = dsub.add_parser("preview", help="the first examples exactly as the model receives them")
    c.add_argument("target", help="a config file or a data file")
    c.add_argument("-n", type=int, default=5, help="how many examples")
    c.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_data_preview)

    c = dsub.add_parser("stats", help="counts, token lengths, truncation, padding waste, tokens per epoch")
    c.add_argument("target", help="a config file or a data file")
    c.add_argument("--png", help="save the token-length histogram to this PNG file")
    c.add_argument("--json", action="store_true")
    c.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_data_stats)

    c = dsub.add_parser("convert", help="write any supported format as messages (or preference-as-messages)")
    c.add_argument("input")
    c.add_argument("output", help="a .jsonl file")
    c.add_argument("--format", default="auto", help="the input's format (default: detected)")
    c.set_defaults(func=cmd_data_convert)

    c = dsub.add_parser("prepare", help="filter, dedupe, split, tokenize and cache as the config says; write the result")
    c.add_argument("config")
    c.add_argument("--out", help="folder for the result (default <output_dir>/data); must be new or empty")
    _overwrite_arg(c, "prepared data")
    c.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_data_prepare)


def _merge_target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge-target", choices=["dequantized", "original"], default=None,
                   help="base weights the adapter is added to: dequantized (a QLoRA run's quantized base, dequantized "
                        "with its training config; the default for QLoRA) or original (the 16-bit checkpoint)")


def _overwrite_arg(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out when it holds earlier {kind} that tuneforge wrote (never any other folder)")


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped in the model's folder (a run's run.json never turns this on); "
                        "only for code you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune open language models from one YAML file.")
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as the config says, evaluating before and after")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes on this machine (one per GPU, or N CPU processes), started with "
                   "torchrun; see distributed: in the config and docs/distributed.md")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config without loading a model")
    _config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="memory, speed, time and cost per GPU before renting one; loads no weights")
    _config_args(p)
    p.add_argument("--gpu", nargs="+", action="extend", metavar="NAME",
                   help="only these devices (any part of the name: h100, a100, 4090, cpu)")
    p.add_argument("--prices", metavar="FILE", help="a YAML of hourly prices laid over the shipped table")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--seq-len", type=int, metavar="L",
                   help="size the data instead of reading it (datasets: may then be missing): tokens per example")
    p.add_argument("--examples", type=int, metavar="N", help="with --seq-len: training examples")
    p.add_argument("--tokens", type=int, metavar="N",
                   help="or: training tokens per epoch (alone: packed into max_seq_len-long examples)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="held-out loss, perplexity and exact match, base vs tuned")
    p.add_argument("target", help="a config file or a run folder")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    p.add_argument("--suite", metavar="FILE", help="a YAML file with an `evaluation:` section (metrics, judge, "
                   "forgetting, lm_eval) to run instead of the config's")
    p.add_argument("--with", dest="others", action="append", metavar="OTHER", default=[],
                   help="also evaluate another run folder, model folder or built-in model, side by side (repeatable)")
    _trust_arg(p)
    p.set_defaults(func=cmd_eval)

    for name, fn, text in (("generate", cmd_generate, "answer one prompt"), ("chat", cmd_chat, "chat in the terminal")):
        p = sub.add_parser(name, help=f"{text} with a tuned run")
        p.add_argument("run", help="the run folder (output_dir)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.add_argument("--system", help="a system prompt")
        p.add_argument("--max-new-tokens", type=int, default=256)
        _trust_arg(p)
        p.set_defaults(func=fn)

    _data_parser(sub)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run or a model folder")
    p.add_argument("target", metavar="RUN_OR_MODEL", help="a run folder or a Hugging Face model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve another LoRA adapter (a PEFT folder or a run) on the same base, as model NAME")
    p.add_argument("--api-key", default=os.environ.get("TUNEFORGE_API_KEY"),
                   help="require this Bearer key (default: $TUNEFORGE_API_KEY; none means no key)")
    p.add_argument("--max-tokens-default", type=int, default=1024, metavar="N",
                   help="new tokens for a request that sets no max_tokens (default 1024; less if the context is full)")
    p.add_argument("--max-tokens-cap", type=int, default=4096, metavar="N",
                   help="a request asking for more new tokens gets a 400 (default 4096)")
    p.add_argument("--max-concurrent", type=int, default=8, metavar="N",
                   help="requests answered at once, taking turns token by token; more get 503 with Retry-After (default 8)")
    _trust_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("studio", help="a fine-tuning service with OpenAI's files and fine-tuning jobs API",
                       description="Upload JSONL files, create fine-tuning jobs and chat with the results, with the "
                                   "openai client pointed at this server (docs/studio.md).")
    p.add_argument("--home", default=None, help="where files, the job database and runs are kept "
                   "(default: $TUNEFORGE_HOME, else ~/.tuneforge)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only, no key needed); any other needs --api-keys")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", metavar="FILE", help="a file of `NAME sha256:HASH` lines; each key sees only its own "
                   "files, jobs and models")
    p.add_argument("--new-key", metavar="NAME", help="add a key for NAME to --api-keys, print it once, and exit")
    p.add_argument("--max-upload-mb", type=int, default=512, metavar="MB", help="largest file accepted (default 512)")
    p.add_argument("--max-files", type=int, default=1000, metavar="N", help="files kept per key (default 1000)")
    p.add_argument("--gpus", metavar="0,1,...", help="train one job at a time on each of these GPUs (default: one "
                   "job at a time on the devices this process sees)")
    p.set_defaults(func=cmd_studio)

    p = sub.add_parser("merge-models", help="merge fine-tuned models: linear, slerp, task arithmetic, TIES, DARE, Model Stock")
    p.add_argument("config", help="the merge YAML (mergekit-style: merge_method, base_model, models, parameters, dtype)")
    p.add_argument("--out", help="output folder (default: output_dir in the YAML, else <yaml stem>-merged beside it); "
                   "must be new or empty")
    _overwrite_arg(p, "merge output")
    p.set_defaults(func=cmd_merge_models)

    p = sub.add_parser("export", help="write a run as a Hugging Face folder, PEFT adapter, GGUF file or Ollama model")
    p.add_argument("run", help="the run folder (output_dir)")
    p.add_argument("--to", required=True, choices=["hf", "adapter", "gguf", "ollama"])
    p.add_argument("--out", help="target folder (default RUN/export-TO); must be new or empty, and outside RUN")
    _overwrite_arg(p, "export output")
    _trust_arg(p)
    p.add_argument("--quant", default="q8_0", help="GGUF tensor type: f32, f16, bf16, q8_0, q4_k_m (default q8_0)")
    p.add_argument("--dtype", default="bfloat16", help="weights of a merged hf export: float32, float16, bfloat16")
    p.add_argument("--system", help="an Ollama SYSTEM prompt to write into the Modelfile")
    _merge_target_arg(p)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the export in a fresh process to compare its held-out perplexity")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="one HTML page for a run: curves, evaluation, hardest examples, diagnoses, facts")
    p.add_argument("run", help="the run folder (output_dir), finished or not")
    p.add_argument("--out", help="the HTML file (default RUN/report.html; PNGs go in a folder beside it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="list runs in a table, or `runs compare A B ...`",
                       description="tuneforge runs [DIR] lists the runs under DIR (default runs/); "
                                   "tuneforge runs compare A B ... shows what differs and overlays their curves.")
    p.add_argument("paths", nargs="*", metavar="DIR | compare RUN RUN ...")
    p.add_argument("--png", default="runs-compare.png", help="compare: where the overlaid curves go (default runs-compare.png)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("sweep", help="many runs of one config: grid, random or TPE search (Optuna), ranked, best.yaml",
                       description="Runs or continues the sweep a YAML file describes (docs/sweep.md).")
    p.add_argument("sweep", help="the sweep YAML (base, output_dir, objective, search, trials, parameters)")
    p.add_argument("--gpus", metavar="0,1,...",
                   help="one trial at a time on each of these GPUs (a worker process per GPU); default: one trial at a "
                        "time in this process")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # worker N, started by --gpus
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("launch", help="run a config on rented GPUs (SkyPilot) or a Slurm cluster, resuming after preemption",
                       description="Writes a SkyPilot task or an sbatch script for the config and starts it "
                                   "(docs/launch.md).")
    _config_args(p)
    p.add_argument("--on", required=True, choices=["sky", "slurm"], help="SkyPilot (any cloud) or Slurm")
    p.add_argument("--gpu", metavar="NAME[:COUNT]",
                   help="e.g. H100:1, A100-80GB:8 (default: plan's cheapest GPU that fits, one of it)")
    p.add_argument("--nodes", type=int, default=1, help="machines, one torchrun on each (default 1)")
    p.add_argument("--spot", action="store_true", help="sky: spot machines, as a managed job restarted on preemption")
    p.add_argument("--out", help="the task YAML or sbatch script to write (default beside the config)")
    p.add_argument("--bucket", help="sky: the bucket mounted for output_dir (default tuneforge-<config>-outputs)")
    p.add_argument("--partition", help="slurm: the partition to submit to")
    p.add_argument("--prices", metavar="FILE", help="a YAML of hourly prices laid over plan's table")
    p.add_argument("--dry-run", action="store_true", help="write and print the files; start nothing")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("merge", help="fold a LoRA adapter into the base weights")
    p.add_argument("run", help="the run folder (output_dir)")
    p.add_argument("--out", help="target folder (default RUN/merged); must be new or empty, and outside RUN")
    _overwrite_arg(p, "merge output")
    _trust_arg(p)
    _merge_target_arg(p)
    p.add_argument("--report", action="store_true",
                   help="write nothing; print, for each merge target, the mean KL of the next-token distribution and "
                        "the share of identical greedy outputs against the adapter on the base it was trained on")
    p.set_defaults(func=cmd_merge)
    return parser


def _quiet_libraries() -> None:
    """Our own progress and messages replace the libraries' per-tensor bars and deprecation notes. Said
    through the variables transformers and huggingface_hub read at import, so that a command that never
    imports them (plan) does not pay a second for the import; set directly when already imported."""
    import warnings

    # bitsandbytes warns at import that an optional CPU kernel package is missing; its fallback is used.
    # Set before transformers is imported, since importing it can import bitsandbytes.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def _which_process() -> str:
    """Under torchrun every process prints its own errors: say which one this is. Read only when an
    error is printed: the import brings in torch, which `plan` and `data check` never need."""
    from tuneforge.parallel.world import env_world

    world = env_world()
    return f" (rank {world.rank} of {world.size})" if world.distributed else ""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except TuneforgeError as err:
        print(f"error{_which_process()}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if _which_process():  # the traceback follows; torchrun's summary names this rank too
            print(f"error{_which_process()}: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("interrupted; `tuneforge train CONFIG --resume` continues from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
