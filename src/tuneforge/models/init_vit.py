"""init: random for image classifiers: a ViT-family model built from its config with transformers' own
initialisation under the run's seed; no weights read, nothing downloaded.

base_model names the architecture: `vit` (transformers' ViT at the size `architecture:` gives), a config.json
of a ViT-family model (vit, deit, dinov2: what plan/encoders.py sizes), or a folder holding one. As for
language models (models/init.py), `vit_folder` writes a cache folder holding config.json,
preprocessor_config.json and tuneforge_init.json but no weights; load_model builds the classifier from it
with one output per class of the data (`random_image_classifier`).

Sizes: architecture's n_layer, d_model, n_head and d_ff (or the depth dial) become num_hidden_layers,
hidden_size, num_attention_heads and intermediate_size; image_size and patch_size are the image's and a
patch's side in pixels; init_std, when given, is initializer_range. The images are read with the
preprocessor_config.json beside the config.json when there is one, else with ViTImageProcessor at image_size,
mean and std 0.5 (pixels to [-1, 1], as google/vit-base-patch16-224), which final/ keeps for the pipeline.
The initialisation is the model class's own `_init_weights` under the run's seed (docs/tasks.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.config import Config
from tuneforge.errors import ConfigError
from tuneforge.models.init import INIT_FILE, RandomInit, derived_sizes, write_once
from tuneforge.models.resolve import cache_root

if TYPE_CHECKING:
    import torch

FAMILIES = ("vit",)
VIT_TYPES = ("vit", "deit", "dinov2")  # image classifiers plan sizes exactly (plan/encoders.py VISION)
PROCESSOR_FILE = "preprocessor_config.json"
EXAMPLE = "architecture: {depth: 4, image_size: 224, patch_size: 16}"


def _source(name: str) -> tuple[dict, str, Path | None]:
    """(config.json's fields, where they came from, the preprocessor_config.json beside it or None)."""
    if name.lower() in FAMILIES:
        return {"model_type": name.lower()}, f"base_model {name}", None
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".json":
        raise ConfigError(f"base_model: with init: random and task: image_classification, {name!r} must be "
                          f"{' or '.join(FAMILIES)}, a config.json of a ViT-family model or a folder holding one")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"base_model: {file} is not a readable JSON config ({err})") from None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind not in VIT_TYPES:
        raise ConfigError(f"base_model: {file} describes {f'a {kind} model' if kind else 'no model_type'}, not a "
                          f"ViT-family image model ({', '.join(VIT_TYPES)}), which task: image_classification builds "
                          f"with init: random; give such a config.json, or base_model: vit with {EXAMPLE}")
    if data.get("auto_map"):
        raise ConfigError(f"base_model: {file} needs model code shipped with it (auto_map); tuneforge builds only "
                          "architectures transformers knows")
    processor = file.parent / PROCESSOR_FILE
    return data, str(file), processor if processor.is_file() else None


def _sizes(cfg: Config, family: bool) -> dict:
    """The config keys `architecture:` sets: every size for the family or the depth dial, else those given."""
    spec = cfg.architecture
    if spec is None:
        return {}
    if spec.n_kv_head is not None:
        raise ConfigError("architecture.n_kv_head: a ViT has no grouped-query attention; remove it")
    if family or spec.depth:
        s = derived_sizes(spec)
        sizes = {"num_hidden_layers": s["n_layer"], "hidden_size": s["d_model"], "num_attention_heads": s["n_head"],
                 "intermediate_size": s["d_ff"]}
    else:
        sizes = {"num_hidden_layers": spec.n_layer, "hidden_size": spec.d_model, "num_attention_heads": spec.n_head,
                 "intermediate_size": spec.d_ff}
    sizes |= {"image_size": spec.image_size, "patch_size": spec.patch_size}
    if "init_std" in spec.model_fields_set:
        sizes["initializer_range"] = spec.init_std
    return {k: v for k, v in sizes.items() if v is not None}


def _pair(size) -> list[int]:
    """(height, width) of a config's image_size or patch_size: one side, or both."""
    return list(size) if isinstance(size, (list, tuple)) else [size, size]


def _check_shape(config, where: str) -> None:
    """What would only fail inside the model's forward: patches that do not tile the image, heads that do not
    split the width, images that are not RGB."""
    if any(side % patch for side, patch in zip(_pair(config.image_size), _pair(config.patch_size))):
        raise ConfigError(f"{where}: image_size {config.image_size} is not a multiple of patch_size "
                          f"{config.patch_size}, so the patches would not tile the image; e.g. image_size 224 with "
                          "patch_size 16, or 32 with 8")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"{where}: hidden_size (d_model) {config.hidden_size} is not a multiple of "
                          f"num_attention_heads (n_head) {config.num_attention_heads}; change one of them")
    if getattr(config, "num_channels", 3) != 3:
        raise ConfigError(f"{where}: num_channels {config.num_channels}; images are read as RGB, so set it to 3")


def _check_processor(processor: Path, config) -> None:
    """A preprocessor_config.json must hand the model images of its image_size: another size fails in the
    first forward, after the data has been read."""
    try:
        data = json.loads(processor.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"base_model: {processor} is not a readable JSON file ({err})") from None
    size = data.get("crop_size") if data.get("do_center_crop") else data.get("size")
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        given = [size["height"], size["width"]]
    elif isinstance(size, int):
        given = [size, size]
    else:
        return  # resized by its shortest edge: the side it ends at depends on the image
    if given != _pair(config.image_size):
        raise ConfigError(f"base_model: {processor} gives the model {given[0]}x{given[1]} images, but its image_size "
                          f"is {config.image_size}; make them agree (its `size`, or architecture.image_size)")


def vit_config(cfg: Config):
    """(transformers config of the model to build, its preprocessor_config.json or None), every check made."""
    from transformers import AutoConfig

    if cfg.tokenizer is not None:
        raise ConfigError("tokenizer: an image classifier reads pixels, not tokens; remove the tokenizer section")
    family = cfg.base_model.lower() in FAMILIES
    if family and cfg.architecture is None:
        raise ConfigError(f"architecture: base_model {cfg.base_model} is a family; give its size, e.g. {EXAMPLE} "
                          "(docs/tasks.md)")
    data, where, processor = _source(cfg.base_model)
    sizes = _sizes(cfg, family)
    fields = {k: v for k, v in data.items() if k != "model_type"} | sizes
    config = AutoConfig.for_model(data["model_type"], **fields)
    _check_shape(config, f"{where} with architecture's sizes" if sizes else where)
    if processor is not None:
        _check_processor(processor, config)
    return config, processor


def default_processor(image_size: int | list[int]):
    """ViT's image processor at the model's image size: resize, rescale to [0, 1], mean and std 0.5."""
    try:
        from transformers import ViTImageProcessorPil as Processor  # no torchvision needed
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    side = dict(zip(("height", "width"), _pair(image_size)))
    return Processor(size=side, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def describe_vit(config) -> str:
    c = config
    return (f"{c.model_type} layers={c.num_hidden_layers} hidden={c.hidden_size} heads={c.num_attention_heads} "
            f"mlp={c.intermediate_size} image={c.image_size} patch={c.patch_size}")


def vit_folder(cfg: Config) -> tuple[Path, str]:
    """The cache folder of an init: random image classifier (config.json, preprocessor_config.json, recipe)."""
    import transformers

    config, processor = vit_config(cfg)
    processor_json = processor.read_text() if processor else default_processor(config.image_size).to_json_string()
    # The model class's own initialisation, which may change between transformers versions: the version is kept.
    recipe = {"init": "transformers' _init_weights", "transformers": transformers.__version__,
              "initializer_range": config.initializer_range, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps([config.to_json_string(), recipe, processor_json],
                                    sort_keys=True).encode()).hexdigest()[:24]

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        (tmp / PROCESSOR_FILE).write_text(processor_json)
        (tmp / INIT_FILE).write_text(json.dumps(recipe, indent=1) + "\n")

    folder = write_once(cache_root() / "models" / f"random-{key}", write)
    images = f"images by {processor}" if processor else "images resized, mean and std 0.5"
    return folder, (f"random init {describe_vit(config)}, transformers' own initialisation (initializer_range "
                    f"{config.initializer_range:g}, seed {cfg.seed}), {images}")


def random_image_classifier(folder: Path, dtype: torch.dtype | None = None, head_config: dict | None = None):
    """The classifier of a folder `vit_folder` wrote, with the data's classes (`head_config`: num_labels,
    id2label, ...), initialised by the model class's own `_init_weights` from torch's generator seeded by the
    recipe's seed: the same seed and classes give the same weights, bit for bit (fp32 unless `dtype`)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    recipe = json.loads((folder / INIT_FILE).read_text())
    config = AutoConfig.from_pretrained(str(folder))
    config.update(head_config or {})
    with torch.random.fork_rng(devices=[]):  # the run's own random stream is left as it was
        torch.manual_seed(recipe["seed"])
        return AutoModelForImageClassification.from_config(config, dtype=dtype or torch.float32)


def check_vit(cfg: Config) -> None:
    vit_config(cfg)


VIT = RandomInit(check_vit, vit_folder)
