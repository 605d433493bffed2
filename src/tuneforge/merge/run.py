"""`tuneforge merge-models CONFIG`: check the inputs fit together, merge tensor by tensor, write atomically.

Weights are read lazily from safetensors (one tensor per model in memory, plus the output
shard being filled), never from pickle files. A PEFT adapter is first merged into its base in
fp32 and saved to a scratch folder, which is then read like any other model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge import __version__
from tuneforge.errors import ModelError
from tuneforge.output_folders import check_apart, check_out, output_folder
from tuneforge.merge import methods
from tuneforge.merge.config import NEEDS_BASE, MergeConfig, config_to_dict, load_merge_config
from tuneforge.models.adapter_files import adapter_weights

# Output shards hold at most this many bytes (a tensor larger than that gets a shard of its own).
SHARD_BYTES = 5 * 2**30

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors dtype names -> (bytes per element, is floating point)
ST_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False), "U8": (1, False), "BOOL": (1, False),
}
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class Input:
    """One model named by the config."""

    key: str  # where the config names it, e.g. "models[1].model"; used in every error
    path: Path  # what the config names: a folder, or an adapter folder
    config_dir: Path  # the folder with the architecture's config.json (an adapter's base)
    adapter_dir: Path | None = None
    weights_dir: Path | None = None  # whose safetensors are read; set once an adapter is merged

    @property
    def label(self) -> str:
        return f"{self.key} ({self.path})"


class Weights:
    """Lazy access to a folder's safetensors: names and shapes from the headers, tensors on demand."""

    def __init__(self, folder: Path, label: str, stack: ExitStack):
        from safetensors import safe_open

        self.files = weight_files(folder, label)
        self._open = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(self.files.values())}

    def names(self) -> list[str]:
        return sorted(self.files)

    def _slice(self, name: str):
        return self._open[self.files[name]].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def st_dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._open[self.files[name]].get_tensor(name)


def weight_files(folder: Path, label: str) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json when the folder is sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelError(f"{label}: {index.name} lists {', '.join(missing)}, which are not in {folder}; re-download the model")
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        extra = f" (it has {', '.join(pickled)}: pickle files, which tuneforge never loads)" if pickled else ""
        raise ModelError(f"{label}: {folder} has no .safetensors weights{extra}; convert the weights to safetensors first")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in out:
                    raise ModelError(f"{label}: tensor {name} is in both {out[name].name} and {path.name}; remove the stale file")
                out[name] = path
    return out


def read_config(folder: Path, label: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{label}: {folder} has no config.json; give a local Hugging Face model folder or a PEFT adapter folder")
    return json.loads(path.read_text())


def vocab_size(config: dict) -> int | None:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def _local_folder(value: str, label: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ModelError(f"{label}: {what} {value} is not a local folder; nothing is downloaded, so give the folder")
    return path


def open_input(key: str, value: str) -> Input:
    """Classify what the config names: a model folder, an adapter folder, or BASE+ADAPTER."""
    path = Path(value)
    if not path.exists() and "+" in value:
        base, adapter = value.split("+", 1)
        label = f"{key} ({value})"
        return Input(key, path, _local_folder(base, label, "base"), _local_folder(adapter, label, "adapter"))
    label = f"{key} ({value})"
    if not path.is_dir():
        raise ModelError(f"{label}: folder not found; give a local Hugging Face model folder (nothing is downloaded)")
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        return Input(key, path, path, weights_dir=path)
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{label}: adapter_config.json has no base_model_name_or_path; write it as BASE+{value}")
    base_path = Path(base).expanduser()
    if not base_path.is_dir():
        raise ModelError(
            f"{label}: the adapter's base {base} (adapter_config.json base_model_name_or_path) is not a local folder; "
            f"nothing is downloaded, so write the model as LOCAL_BASE_FOLDER+{value}"
        )
    return Input(key, path, base_path, adapter_dir=path)


def merge_adapter(inp: Input, dest: Path) -> Path:
    """Fold a PEFT adapter into its base in fp32 and save the result as safetensors in dest."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights = adapter_weights(inp.adapter_dir, inp.label)
    with safe_open(str(weights), framework="pt") as f:
        lora_b = [f.get_tensor(n) for n in f.keys() if "lora_B" in n]
    if lora_b and all(not t.any() for t in lora_b):
        raise ModelError(f"{inp.label}: every lora_B weight is zero, so the adapter changes nothing (untrained?); merging it would merge the base")
    try:
        base = AutoModelForCausalLM.from_pretrained(str(inp.config_dir), dtype=torch.float32, use_safetensors=True)
        merged = PeftModel.from_pretrained(base, str(inp.adapter_dir)).merge_and_unload()
    except Exception as err:
        raise ModelError(f"{inp.label}: could not merge the adapter into its base {inp.config_dir}: {err}") from None
    merged.save_pretrained(str(dest))
    return dest


def check_compatible(ref: Input, ref_w: Weights, others: list[tuple[Input, Weights]]) -> None:
    """R-FEAT-5: one architecture, one vocab size, the same tensor names and shapes, up front."""
    ref_cfg = read_config(ref.config_dir, ref.label)
    names = set(ref_w.names())
    for inp, w in [(ref, ref_w)] + others:
        cfg = read_config(inp.config_dir, inp.label)
        if "quantization_config" in cfg:
            raise ModelError(f"{inp.label}: the model is quantized ({cfg['quantization_config'].get('quant_method', '?')}); merge its 16-bit weights instead")
        if inp is ref:
            continue
        if cfg.get("model_type") != ref_cfg.get("model_type"):
            raise ModelError(
                f"{inp.label}: architecture {cfg.get('model_type')} but {ref.label} is {ref_cfg.get('model_type')}; "
                "only models of one architecture can be merged"
            )
        diffs = [n for n in ref_w.names() if n in w.files and w.shape(n) != ref_w.shape(n)]
        tensor = f" ({', '.join(f'{n} {w.shape(n)} vs {ref_w.shape(n)}' for n in diffs[:3])})" if diffs else ""
        if vocab_size(cfg) != vocab_size(ref_cfg):
            raise ModelError(
                f"{inp.label}: vocab size {vocab_size(cfg)} vs {vocab_size(ref_cfg)} of {ref.label}{tensor}. "
                f"tuneforge keeps the base vocab and never truncates or pads embeddings silently: merge models that "
                f"share its tokenizer, or resize this model's embeddings to {vocab_size(ref_cfg)} rows first"
            )
        missing, extra = sorted(names - set(w.files)), sorted(set(w.files) - names)
        if missing or extra:
            parts = ([f"lacks {', '.join(missing[:5])}"] if missing else []) + ([f"has extra {', '.join(extra[:5])}"] if extra else [])
            raise ModelError(
                f"{inp.label}: tensor names differ from {ref.label}: it {' and '.join(parts)}"
                f"{' (and more)' if len(missing) > 5 or len(extra) > 5 else ''}; only models of one architecture and size can be merged"
            )
        if diffs:
            n = diffs[0]
            raise ModelError(
                f"{inp.label}: tensor {n} has shape {w.shape(n)} but {ref_w.shape(n)} in {ref.label}"
                f"{f' (and {len(diffs) - 1} more tensors differ)' if len(diffs) > 1 else ''}; the models differ in size"
            )


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so DARE's drop masks differ between tensors of the same shape yet repeat run to run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") % 2**63


def merge_tensor(cfg: MergeConfig, name: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply the configured method to one tensor (float32 result)."""
    m, w, d = cfg.merge_method, cfg.weights(), cfg.densities()
    if m == "linear":
        return methods.linear(tensors, w, cfg.normalize)
    if m == "slerp":
        a, b = cfg.slerp_ends()
        return methods.slerp(tensors[a], tensors[b], cfg.t)
    if m == "task_arithmetic":
        return methods.task_arithmetic(base, tensors, w, cfg.lambda_)
    if m == "ties":
        return methods.ties(base, tensors, w, d, cfg.lambda_)
    if m == "dare_linear":
        return methods.dare_linear(base, tensors, w, d, tensor_seed(cfg.seed, name), cfg.lambda_)
    if m == "dare_ties":
        return methods.dare_ties(base, tensors, w, d, tensor_seed(cfg.seed, name), cfg.lambda_)
    return methods.model_stock(base, tensors)


def plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most `limit` bytes."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _first_with(folders: list[Path], names: tuple[str, ...]) -> Path | None:
    return next((f for f in folders if any((f / n).is_file() for n in names)), None)


def _support_dirs(inp: Input) -> list[Path]:
    """Where an input's tokenizer and generation config live: the adapter folder first, then its base."""
    return [inp.adapter_dir, inp.config_dir] if inp.adapter_dir else [inp.path]


def output_plan(cfg: MergeConfig, ref_w: Weights, dtype_w: Weights) -> tuple[dict, dict]:
    """Per tensor: the output torch dtype (None for integer tensors, which are copied) and its size in bytes."""
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    target, sizes = {}, {}
    for name in ref_w.names():
        st = (dtype_w if name in dtype_w.files else ref_w).st_dtype(name)
        nbytes, is_float = ST_DTYPES.get(st, (4, False))
        target[name] = (out_dtype or ST_TO_TORCH[st]) if is_float else None
        numel = 1
        for n in ref_w.shape(name):
            numel *= n
        sizes[name] = numel * (out_dtype.itemsize if out_dtype and is_float else nbytes)
    return target, sizes


def write_weights(cfg: MergeConfig, models: list[Input], ref: Input, readers: dict[str, Weights],
                  dtype_w: Weights, tmp: Path, shard_bytes: int) -> None:
    """Merge shard by shard: one tensor per model in memory plus the shard being filled."""
    from safetensors.torch import save_file

    target, sizes = output_plan(cfg, readers[ref.key], dtype_w)
    shards = plan_shards(sizes, shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for shard, filename in zip(shards, files):
        out = {}
        for name in shard:
            tensors = [readers[m.key].get(name) for m in models]
            if target[name] is None:  # integer buffers are copied, and must agree
                ref_t = readers[ref.key].get(name)
                if any(not torch.equal(t, ref_t) for t in tensors):
                    raise ModelError(f"{name}: this non-float tensor differs between the models, so it cannot be merged")
                out[name] = ref_t.contiguous()
                continue
            base = readers["base_model"].get(name) if cfg.merge_method in NEEDS_BASE else None
            out[name] = merge_tensor(cfg, name, base, tensors).to(target[name]).contiguous()
        save_file(out, str(tmp / filename), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: f for shard, f in zip(shards, files) for n in shard}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_support_files(cfg: MergeConfig, models: list[Input], ref: Input, tmp: Path) -> None:
    """config.json from the reference model; tokenizer files and generation config from tokenizer_source."""
    config = json.loads((ref.config_dir / "config.json").read_text())
    if cfg.dtype:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        config.update({k: cfg.dtype for k in keys})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tok = ref if cfg.tokenizer_source == "base" else models[0]
    tok_dir = _first_with(_support_dirs(tok), TOKENIZER_FILES)
    for n in TOKENIZER_FILES:
        if tok_dir and (tok_dir / n).is_file():
            shutil.copy2(tok_dir / n, tmp / n)
    # The generation config's eos ids belong to the chat template, so it follows the tokenizer.
    gen_dir = _first_with(_support_dirs(tok) + _support_dirs(ref), ("generation_config.json",))
    if gen_dir:
        shutil.copy2(gen_dir / "generation_config.json", tmp / "generation_config.json")


def manifest(cfg: MergeConfig, config_path: Path, inputs: list[Input], ref: Input) -> dict:
    """merge.json: what was merged, from which files (by config hash), by which tuneforge."""
    def record(inp: Input) -> dict:
        rec = {"key": inp.key, "path": str(inp.path), "config_json_sha256": _sha256(inp.config_dir / "config.json")}
        if inp.adapter_dir:
            rec.update(adapter=str(inp.adapter_dir), adapter_base=str(inp.config_dir),
                       adapter_config_json_sha256=_sha256(inp.adapter_dir / "adapter_config.json"))
        return rec

    return {
        "tuneforge_version": __version__,
        "config_file": str(config_path.resolve()),
        "config": config_to_dict(cfg),
        "inputs": [record(i) for i in inputs],
        "config_json_from": str(ref.config_dir),
    }


def merge_models(config_path: str | Path, out: Path | None = None, *, shard_bytes: int = SHARD_BYTES,
                 overwrite: bool = False) -> Path:
    """Merge the models a merge YAML names into a Hugging Face folder; returns the folder.

    out defaults to the YAML's output_dir, else <yaml stem>-merged beside the YAML; it must be new or empty,
    or with `overwrite` an earlier merge output, and apart from every folder the merge reads.
    """
    config_path = Path(config_path)
    cfg = load_merge_config(config_path)
    out = Path(out or cfg.output_dir or config_path.parent / f"{config_path.stem}-merged").resolve()
    check_out(out, "merge", overwrite)

    models = [open_input(f"models[{i}].model", m.model) for i, m in enumerate(cfg.models)]
    base = None
    if cfg.base_model:
        base = {str(m.path): m for m in models}.get(cfg.base_model) or open_input("base_model", cfg.base_model)
    ref = base or models[0]
    inputs = ([base] if base and base not in models else []) + models

    for inp in inputs:
        for folder in _support_dirs(inp):
            check_apart(out, folder)
    with output_folder(out, "merge", overwrite) as tmp:
        with ExitStack() as stack:
            # Checked on the headers before any adapter is merged; an adapter's base stands in for it.
            headers = {i.key: Weights(i.weights_dir or i.config_dir, i.label, stack) for i in inputs}
            check_compatible(ref, headers[ref.key], [(i, headers[i.key]) for i in inputs if i is not ref])
            for inp in inputs:
                if inp.adapter_dir:
                    inp.weights_dir = merge_adapter(inp, tmp / ".adapters" / inp.key.replace("[", "").replace("].", "-"))
            readers = {i.key: Weights(i.weights_dir, i.label, stack) for i in inputs}
            check_compatible(ref, readers[ref.key], [(i, readers[i.key]) for i in inputs if i is not ref])
            # A merged adapter is stored in fp32; the output keeps the dtypes of its base's files.
            write_weights(cfg, models, ref, readers, headers[ref.key], tmp, shard_bytes)
        write_support_files(cfg, models, ref, tmp)
        shutil.rmtree(tmp / ".adapters", ignore_errors=True)
        (tmp / "merge.json").write_text(json.dumps(manifest(cfg, config_path, inputs, ref), indent=2) + "\n")
    return out
