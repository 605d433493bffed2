"""Image classification data: an image folder (root/<label>/*.png) or JSONL {"image": path, "label": ...}.

Every image is opened once before a model is loaded, so a file that does not decode stops the run
(on_bad_record: error) or is written to rejected.jsonl (skip) with its name, before any step. The
pixels themselves are read per micro-batch (data/images.py:pixel_batch), through the model folder's
own image processor: the resize and normalisation the model was trained with.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tuneforge.config import Config
from tuneforge.data.check import ERROR, WARNING, CheckReport
from tuneforge.data.dataset import (
    DataSummary,
    PreparedData,
    Rejected,
    effective_weights,
    file_hashes,
    _split_chunk,
)
from tuneforge.data.labels import head_config
from tuneforge.data.readers import BadRecord, iter_rows
from tuneforge.errors import ConfigError, DataError, ModelError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_LISTED = 20
RARE_RATIO = 10  # a class with fewer than 1/RARE_RATIO of the largest class's images is flagged


@dataclass(frozen=True)
class ImageRecord:
    source: str  # the JSONL file, or the image folder
    line: int  # the JSONL line; 0 for an image of a folder
    image: str  # the image file
    label: str | tuple[str, ...]  # one class, or (multi-label JSONL) every class the image shows
    raw: object = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.image

    @property
    def labels(self) -> tuple[str, ...]:
        return self.label if isinstance(self.label, tuple) else (self.label,)


@dataclass(frozen=True)
class ImageExample:
    record: ImageRecord
    label: int  # index into PreparedData.labels (multi-label: the first of `classes`)
    classes: tuple[int, ...] = ()  # multi-label: every class of the image

    @property
    def targets(self) -> set[int]:
        return set(self.classes or (self.label,))


@dataclass
class ImageData(PreparedData):
    """PreparedData of images; `multi_label` when any training label is a list (a sigmoid per class)."""

    multi_label: bool = False


def is_image_folder(path: str | Path) -> bool:
    """A folder whose subfolders (one per class) hold images: the layout read here, not a `datasets` folder."""
    path = Path(path)
    return path.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for d in path.iterdir() if d.is_dir()
                                 for f in d.rglob("*"))


def load_image_processor(folder: Path, chat_template: str = "auto", trust_remote_code: bool = False):
    """The model folder's image processor (preprocessor_config.json): its resize and normalisation."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"base_model: {folder} has no usable image processor ({err}); an image classifier needs "
                         "the preprocessor_config.json it was trained with beside its weights") from None


def _label_problem(value) -> str | None:
    """Why a JSONL label is not a class name or number, nor a non-empty list of distinct ones, or None."""
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (str, int)) or v == "" for v in values):
        return f"label {value!r}; give a class name (a string) or number, or a non-empty list of them (multi-label)"
    if len({str(v) for v in values}) < len(values):
        return f"label {value!r} names a class twice"
    return None


def _label(value) -> str | tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else str(value)


def read_image_records(path: str, columns: dict[str, str] | None = None) -> Iterator[ImageRecord | Rejected]:
    """The records of one `datasets`/`validation` path; a record that cannot be used comes as a Rejected."""
    root = Path(path)
    if root.is_dir():
        for label_dir in sorted(d for d in root.iterdir() if d.is_dir()):
            for image in sorted(f for f in label_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES):
                yield ImageRecord(path, 0, str(image), label_dir.name)
        return
    image_key, label_key = (columns or {}).get("image", "image"), (columns or {}).get("label", "label")
    for line, obj in iter_rows(root):
        if isinstance(obj, BadRecord):
            yield Rejected(path, line, str(obj), None)
            continue
        if not isinstance(obj, dict) or image_key not in obj or label_key not in obj:
            yield Rejected(path, line, f'expected {{"{image_key}": path, "{label_key}": class}} (columns: maps other '
                           "names)", obj)
            continue
        problem = _label_problem(obj[label_key])
        if problem:
            yield Rejected(path, line, problem, obj)
            continue
        yield ImageRecord(path, line, str(root.parent / str(obj[image_key])), _label(obj[label_key]), obj)


def pil():
    """Pillow, an optional dependency (the `vision` extra): only image tasks need it."""
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ConfigError("task: image_classification reads images with Pillow, which is not installed; "
                          "pip install 'tuneforge[vision]'") from None
    return PIL


def unreadable(image: str) -> str | None:
    """Why an image file cannot be used (missing, not an image, truncated), or None when it decodes."""
    Image = pil().Image
    try:
        with Image.open(image) as im:
            im.convert("RGB").load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"the image does not open: {err}"
    return None


def as_rgb(im):
    """RGB pixels the right way up, as transformers' pipelines read an image: a photo's EXIF orientation applied,
    so a model trains on what it will be served."""
    return pil().ImageOps.exif_transpose(im).convert("RGB")


def open_rgb(image: str):
    with pil().Image.open(image) as im:
        return as_rgb(im)


def pixel_batch(processor, records: list[ImageRecord], flip: random.Random | None = None):
    """pixel_values of these images through the model's processor; `flip` draws a horizontal flip per image."""
    images = [open_rgb(r.image) for r in records]
    if flip is not None:
        images = [pil().ImageOps.mirror(im) if flip.random() < 0.5 else im for im in images]
    return processor(images, return_tensors="pt")["pixel_values"]


def _images_hash(records: list[ImageRecord]) -> str:
    h = hashlib.sha256()
    for image in sorted({r.image for r in records}):
        h.update(image.encode() + b"\0")
        if Path(image).is_file():
            h.update(Path(image).read_bytes())
    return h.hexdigest()


def label_names(records: list[ImageRecord], given: list[str] | None) -> list[str]:
    """The classes in output order: those configured, else the training labels sorted (numbers as numbers)."""
    if given:
        return list(given)
    names = sorted({name for r in records for name in r.labels})
    return sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else names


def _listed(r: Rejected) -> str:
    return f"{r.source}{f':{r.line}' if r.line else ''}: {r.reason}"


def _raise_bad(bad: list[Rejected], total: int, hint: str) -> None:
    shown = "\n".join(f"  {_listed(r)}" for r in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    raise DataError(f"{len(bad)} of {total} image records cannot be used:\n{shown}{more}\n{hint}")


def _file(rec: ImageRecord | Rejected, source: str, summary: DataSummary, bad: list[Rejected]) -> ImageRecord | None:
    """The record if its image opens; otherwise filed as bad (under the image's own name for a folder)."""
    summary.count(source, "records")
    reason = rec.reason if isinstance(rec, Rejected) else unreadable(rec.image)
    if reason is None:
        return rec
    if isinstance(rec, ImageRecord):
        rec = Rejected(rec.source if rec.line else rec.image, rec.line, reason, rec.raw or {"image": rec.image})
    bad.append(rec)
    summary.count(source, "bad_record")
    return None


def read_checked(cfg: Config) -> tuple[list[list[ImageRecord]], list[list[ImageRecord]], list[Rejected], DataSummary]:
    """(training records per dataset, validation records per dataset or file, bad records, counts)."""
    summary, bad = DataSummary(), []
    split = cfg.validation.split if cfg.validation else None
    train, validation = [], []
    for k, ds in enumerate(cfg.datasets):
        good = [r for r in (_file(rec, ds.path, summary, bad) for rec in read_image_records(ds.path, ds.columns)) if r]
        kept, held = _split_chunk(good, split, cfg.seed, k, 0) if split else (good, [])
        train.append(kept)
        validation.append(held)
    if cfg.validation and cfg.validation.path:
        path = cfg.validation.path
        validation.append([r for r in (_file(rec, path, summary, bad)
                                       for rec in read_image_records(path, cfg.validation.columns)) if r])
    return train, validation, bad, summary


def _examples(records: list[ImageRecord], index: dict[str, int], summary: DataSummary,
              bad: list[Rejected]) -> list[ImageExample]:
    out = []
    for r in records:
        unknown = [name for name in r.labels if name not in index]
        if unknown:
            bad.append(Rejected(r.source if r.line else r.image, r.line, f"label {unknown[0]!r} is not one of "
                                f"image_classification.labels ({', '.join(index)})", r.raw))
            summary.count(r.source, "bad_record")
            continue
        summary.count(r.source, "kept")
        for name in r.labels:
            summary.count(r.source, f"class {name}")
        classes = tuple(index[name] for name in r.labels)
        out.append(ImageExample(r, classes[0], classes if isinstance(r.label, tuple) else ()))
    return out


def prepare_images(cfg: Config, processor=None) -> ImageData:
    """Read and check a config's image data: every image opened once, labels numbered, the split made."""
    train, validation, bad, summary = read_checked(cfg)
    every = [r for group in train for r in group]
    names = label_names(every, cfg.image_classification.labels)
    if len(names) < 2:
        first = f"; {len(bad)} records were left out, the first: {_listed(bad[0])}" if bad else ""
        raise DataError(f"datasets: only one class ({', '.join(names) or 'none'}) in the training images; a "
                        f"classifier needs two or more (one subfolder per class, or a `label` per JSONL line){first}")
    index = {name: i for i, name in enumerate(names)}
    train_sets = [_examples(group, index, summary, bad) for group in train]
    val = _examples([r for group in validation for r in group], index, summary, bad)
    total = sum(c["records"] for c in summary.per_file.values())
    if bad and cfg.on_bad_record == "error":
        _raise_bad(bad, total, "Fix or remove these images, or set `on_bad_record: skip` to leave them out "
                   "(each is then written to <output_dir>/rejected.jsonl).")
    if len(bad) > cfg.max_bad_fraction * total:
        _raise_bad(bad, total, f"That is more than max_bad_fraction={cfg.max_bad_fraction} of the data.")
    sizes = [len(s) for s in train_sets]
    if not sum(sizes):
        raise DataError("no training image is left after the checks; see <output_dir>/rejected.jsonl")
    hashes = file_hashes(cfg)
    for ds in [*cfg.datasets, *([cfg.validation] if cfg.validation and cfg.validation.path else [])]:
        if not Path(ds.path).is_dir():  # a JSONL's images live outside it: their bytes are part of the data too
            hashes[f"{ds.path} (images)"] = _images_hash(
                [e.record for e in [*[x for s in train_sets for x in s], *val] if e.record.source == ds.path])
    weights = effective_weights(sizes, [ds.weight for ds in cfg.datasets], [ds.ratio for ds in cfg.datasets])
    multi = any(isinstance(r.label, tuple) for r in every)
    return ImageData([x for s in train_sets for x in s], val, sizes, weights, bad, summary, None, hashes,
                     labels=names, head_config=head_config(names, multi_label=multi), multi_label=multi)


def check_images(cfg: Config) -> CheckReport:
    """`tuneforge data check` for image data: every image opened, bad ones named; images per class of each
    file; a class missing from the training data or much rarer than the others."""
    report = CheckReport(settings={"task": cfg.task, "base_model": cfg.base_model})
    train, validation, bad, summary = read_checked(cfg)
    for r in bad:
        report.add(ERROR, "bad-record", r.source, r.line, r.reason)
    for source, counts in summary.per_file.items():
        report.records[source] = counts["records"]
    per_class = Counter(name for group in train for r in group for name in r.labels)
    for split, groups in (("training", train), ("validation", validation)):
        for name, n in sorted(Counter(name for g in groups for r in g for name in r.labels).items()):
            report.records[f"{split} images of class {name}"] = n
    names = label_names([r for g in train for r in g], cfg.image_classification.labels)
    if len(per_class) < 2:
        report.add(ERROR, "one-class", cfg.datasets[0].path, 0, f"only {len(per_class)} class in the training images; "
                   "a classifier needs two or more")
    for name in names:
        if not per_class[name]:
            report.add(ERROR, "missing-class", cfg.datasets[0].path, 0, f"class {name} has no training image")
        elif per_class[name] * RARE_RATIO < max(per_class.values()):
            report.add(WARNING, "rare-class", cfg.datasets[0].path, 0,
                       f"class {name} has {per_class[name]} training images, under 1/{RARE_RATIO} of the largest class "
                       f"({max(per_class.values())}): collect more, or expect it to be predicted rarely")
    for r in (r for g in [*train, *validation] for r in g if not set(r.labels) <= set(names)):
        report.add(ERROR, "unknown-label", r.source if r.line else r.image, r.line,
                   f"label {r.label!r} is not one of image_classification.labels")
    return report
