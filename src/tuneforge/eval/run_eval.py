"""`tuneforge eval`: the base model and, when the run has finished, the tuned model, on held-out data."""

from __future__ import annotations

import warnings
from pathlib import Path

from tuneforge.config import Config, load_config
from tuneforge.data.dataset import prepare_data
from tuneforge.errors import TuneforgeError
from tuneforge.methods.build import build_objective
from tuneforge.methods.facts import function_at, method_facts
from tuneforge.methods.reference import Reference
from tuneforge.models.adapters import adapter_merged
from tuneforge.models.decode import stop_token_ids
from tuneforge.models.load import load_model, pick_device, pick_dtype
from tuneforge.models.resolve import locate_base_model, resolve_base_model
from tuneforge.models.run import Run, base_folder, load_tuned, open_run


def open_target(target: str | Path, overrides: list[str] | None = None,
                trust_remote_code: bool = False) -> tuple[Config, Run | None]:
    """(config, finished run or None) for a config file or a run folder.

    Model code runs with `trust_remote_code` (the command line's flag) or, for a config file, the config's own key;
    never because a run folder's run.json says so."""
    target = Path(target)
    if target.is_dir():
        run = open_run(target, trust_remote_code)
        return run.config, run
    cfg = load_config(target, overrides)
    if trust_remote_code:
        cfg.trust_remote_code = True
    if not (Path(cfg.output_dir) / "run.json").is_file():
        return cfg, None
    run = open_run(cfg.output_dir, cfg.trust_remote_code)
    if run.config.chat_template != cfg.chat_template:
        warnings.warn(
            f"chat_template: {target} says {cfg.chat_template!r} but the run was trained with "
            f"{run.config.chat_template!r}; evaluating with the template the run was trained with",
            stacklevel=2,
        )
    return cfg, run


def evaluate_target(target: str | Path, overrides: list[str] | None = None,
                    trust_remote_code: bool = False) -> tuple[dict | None, dict | None]:
    """(before, after) results for a config file or a run folder; after is None when nothing was trained yet."""
    return evaluate_run(*open_target(target, overrides, trust_remote_code))


def evaluate_run(cfg: Config, run: Run | None) -> tuple[dict | None, dict | None]:
    """(before, after) for the config's base model and, when given, the finished run."""
    if cfg.validation is None:
        raise TuneforgeError("validation: the config has no held-out data; add `validation: {split: 0.1}` or `{path: FILE}`")
    folder = base_folder(run) if run else resolve_base_model(cfg.base_model)[0]
    facts = method_facts(cfg)
    # The tuned run's tokenizer carries the template it was trained with (an image task reads a processor).
    tokenizer = function_at(facts.processor)(run.final if run else folder, "auto" if run else cfg.chat_template,
                                             cfg.trust_remote_code)
    data = prepare_data(cfg, tokenizer)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.precision, device)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    model = load_model(folder, device, cfg.trust_remote_code, quantization=cfg.quantization, head=facts.model_head,
                       pad_token_id=pad_id, head_config=data.head_config)
    measure = _measure(cfg, model, tokenizer, data, device, dtype)
    before = measure(model, model)
    if run is None:
        return before, None
    if run.is_adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, str(run.final))
        with adapter_merged(tuned):
            return before, measure(tuned, None)  # the reference is the tuned model with its adapter off
    return before, measure(load_model(run.final, device, cfg.trust_remote_code, head=facts.model_head,
                                      pad_token_id=pad_id), model)


def check_other(other: str | Path, trust_remote_code: bool = False) -> None:
    """`--with OTHER` names a finished run, a model folder, a .gguf file or a built-in model: checked before any
    model loads, with the error naming the argument."""
    try:
        if (Path(other) / "run.json").is_file():
            open_run(other, trust_remote_code)
        else:
            locate_base_model(str(other))
    except TuneforgeError as err:
        raise type(err)(f"--with {other}: {str(err).removeprefix('base_model: ')}") from None


def evaluate_other(cfg: Config, other: str | Path) -> dict:
    """The held-out evaluation of `cfg` on another model, to set beside base and tuned: a finished run's folder
    (its tuned model), a model folder or a built-in name. Its own tokenizer reads the same held-out records."""
    facts = method_facts(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.precision, device)
    path = Path(other)
    if (path / "run.json").is_file():
        model, tokenizer = load_tuned(open_run(path, cfg.trust_remote_code), device)
        data = prepare_data(cfg, tokenizer)
    else:
        folder = resolve_base_model(str(other))[0]
        tokenizer = function_at(facts.processor)(folder, cfg.chat_template, cfg.trust_remote_code)
        data = prepare_data(cfg, tokenizer)
        model = load_model(folder, device, cfg.trust_remote_code, head=facts.model_head,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None), head_config=data.head_config)
    measure = _measure(cfg, model, tokenizer, data, device, dtype)
    with adapter_merged(model):
        return measure(model, model)  # its own reference, as the base model is before training


def _measure(cfg, base, tokenizer, data, device, dtype):
    """measure(model, reference_model) -> the numbers `train` reports before and after, for the run's method."""
    run = {"tokenizer": tokenizer, "stop_ids": stop_token_ids(tokenizer, data.end_of_turn),
           "end_of_turn": data.end_of_turn, "device": device, "dtype": dtype, "base": Path.cwd()}
    reference = method_facts(cfg).reference
    free = reference == "uniform"
    objective = build_objective(cfg, data, getattr(tokenizer, "pad_token_id", None), Reference(free=free), **run)

    def measure(model, reference_model):
        return objective.held_out(model, data, final=True,
                                  reference=Reference(reference_model, free) if reference else None)
    return measure
