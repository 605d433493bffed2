"""Labelled text for task: classification: read, check, split, encode; the label list is the training data's.

A record is {"text", "label"} with an optional "text_pair"; the label is a string, an integer, or a list of
them (multi-label). Other column names map through the dataset's `columns:`. The class list is every label
seen in training, sorted (integers in numeric order), and is what the model's id2label / label2id and
run.json store. Nothing here loads a model.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from tuneforge.config import Config
from tuneforge.data.check import ERROR, WARNING, CheckReport
from tuneforge.data.dataset import (
    CHUNK,
    DataSummary,
    PreparedData,
    Rejected,
    _check_bad,
    _raise_bad,
    _split_chunk,
    chunks,
    data_paths,
    effective_weights,
    file_hashes,
)
from tuneforge.data.formats import Record, apply_mapping, detect_format
from tuneforge.data.progress import files_progress
from tuneforge.data.readers import BadRecord, iter_rows
from tuneforge.data.tokenized import TokenizedBuilder
from tuneforge.errors import DataError

RARE_EXAMPLES = 5  # a class with fewer training examples than this is flagged: its scores will be noise
IMBALANCE_RATIO = 10  # the largest class over the smallest, beyond which the imbalance is flagged
SHOWN = 5  # examples named in a finding


@dataclass
class LabelledData(PreparedData):
    """PreparedData whose examples carry classes: `*_targets` is one multi-hot row per example over
    `labels`, the class names (a single-label row has one 1). Token arrays hold the input ids; the per-token array
    holds the token type ids (0: text, 1: text_pair), which BERT-style encoders read."""

    multi_label: bool = False
    train_targets: np.ndarray | None = None
    validation_targets: np.ndarray | None = None
    token_types: bool = False  # the tokenizer makes token_type_ids: the model takes them
    findings: list[str] = field(default_factory=list)  # warnings about the labels, shown before training


def head_config(names: list[str], multi_label: bool, pad_token_id: int | None = None) -> dict:
    """What the classifier head is built with, and what final/config.json then carries for the pipeline. The
    tokenizer's pad id is kept too (run.json's `head`): a decoder's score head finds each row's last token by it,
    and a base without one in its config could not be rebuilt for export or serving otherwise."""
    pad = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "problem_type": "multi_label_classification" if multi_label else "single_label_classification", **pad}


def _label_value(value: object, what: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRecord(f"{what} must be a string or an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, str) and not value.strip():
        raise BadRecord(f"{what} is empty")
    return value


def parse_label(value: object) -> list[str | int] | str | int:
    """A record's label: one value, or a list of distinct values (multi-label); BadRecord says why not."""
    if isinstance(value, list):
        if not value:
            raise BadRecord("label is an empty list (a multi-label record needs at least one label)")
        out = [_label_value(v, f"label {i}") for i, v in enumerate(value, 1)]
        if len(set(map(str, out))) != len(out):
            raise BadRecord(f"label lists a class twice: {value!r}")
        return out
    if value is None:
        raise BadRecord("label is null")
    return _label_value(value, "label")


def to_labelled(obj: object, source: str, line: int) -> Record:
    """One row as a Record of kind "labelled": text, fields text_pair and label; BadRecord says what is wrong."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if "label" not in obj:
        raise BadRecord("missing field 'label'")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRecord("field 'text' must be a non-empty string" if "text" in obj else "missing field 'text'")
    pair = obj.get("text_pair")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise BadRecord("field 'text_pair' must be a non-empty string when given")
    return Record(source, line, "labelled", text=text, raw=obj, fields={"text_pair": pair, "label": parse_label(obj["label"])})


def _refuse_other_data(obj: dict, source: str, line: int, columns: dict[str, str]) -> None:
    """The first record decides: chat or preference data, or a file without a label column, is a config mistake."""
    kind = detect_format(obj)
    if "text" not in obj and kind not in (None, "text"):
        raise DataError(f"{source}:{line}: a {kind} record, but task: classification trains on "
                        '{"text": ..., "label": ...} records; give a labelled file, or set task: causal_lm for chat data')
    mapped = f" (mapped from {columns['label']!r})" if "label" in columns else ""
    for key in ("text", "label"):
        if key not in obj:
            raise DataError(f"{source}:{line}: no {key!r} column{mapped if key == 'label' else ''} (columns: "
                            f"{', '.join(obj)}); name yours with the dataset's `columns:`, e.g. columns: {{{key}: "
                            f"{'sentiment' if key == 'label' else 'sentence'}}}")


def read_labelled(spec, advance: Callable[[int], None] = lambda n: None
                  ) -> Iterator[Record | tuple[str, int, object, BadRecord]]:
    """Records of a dataset (or validation) entry: a Record, or (file, line, raw, BadRecord)."""
    source, first = str(spec.path), True
    for line, obj in iter_rows(spec.path, advance):
        obj = apply_mapping(obj, spec.columns, {})
        if first and isinstance(obj, dict):
            _refuse_other_data(obj, source, line, spec.columns)
            first = False
        try:
            yield to_labelled(obj, source, line)
        except BadRecord as bad:
            yield source, line, None if isinstance(obj, BadRecord) else obj, bad


def _as_list(label) -> list:
    return label if isinstance(label, list) else [label]


def _label_order(value: str | int) -> tuple:
    """Integers (and integer strings, as CSV cells hold them) in numeric order, then the other strings."""
    if isinstance(value, int) or re.fullmatch(r"-?\d+", value):
        return (0, int(value), str(value))
    return (1, 0, value)


def label_names(records: list[Record]) -> list[str]:
    """Every label of the training records, sorted: integers in numeric order, before strings."""
    values = {v for r in records for v in _as_list(r.fields["label"])}
    ordered = sorted(values, key=_label_order)
    names = [str(v) for v in ordered]
    if len(set(names)) != len(names):
        raise DataError(f"labels {sorted(names)}: the integer and the string of the same name are both used; "
                        "write every label the same way")
    return names


def label_findings(train: list[Record], validation: list[Record], names: list[str]) -> list[str]:
    """Warnings a user should read before training: rare classes, imbalance, conflicting duplicates, leakage."""
    counts = Counter(str(v) for r in train for v in _as_list(r.fields["label"]))
    notes = []
    rare = [f"{n} ({counts[n]})" for n in names if counts[n] < RARE_EXAMPLES]
    if rare:
        notes.append(f"Rare classes, under {RARE_EXAMPLES} training examples each: {', '.join(rare)}; their scores "
                     "will be noise. Add examples or merge them into another class.")
    most, least = max(counts.values()), min(counts.values())
    if least and most / least >= IMBALANCE_RATIO:
        notes.append(f"Class imbalance ({most / least:.0f}:1): " + ", ".join(f"{n} {counts[n]}" for n in names)
                     + ". Accuracy will flatter the model; read macro F1, or rebalance with per-dataset weight.")
    seen: dict[tuple, list[Record]] = defaultdict(list)
    for r in train:
        seen[(r.text, r.fields["text_pair"])].append(r)
    conflicts = [rs for rs in seen.values() if len({str(_as_list(r.fields["label"])) for r in rs}) > 1]
    if conflicts:
        shown = "; ".join(" vs ".join(f"{r.where} {r.fields['label']!r}" for r in rs[:3]) for rs in conflicts[:SHOWN])
        notes.append(f"{len(conflicts)} texts appear with different labels: {shown}. The model cannot fit both; "
                     "fix the labels or remove the duplicates.")
    leaked = [r for r in validation if (r.text, r.fields["text_pair"]) in seen]
    if leaked:
        notes.append(f"{len(leaked)} validation texts are also in the training data (e.g. "
                     f"{', '.join(r.where for r in leaked[:SHOWN])}): validation scores will overstate the model.")
    return notes


def _read(spec, bad: list[Rejected], summary: DataSummary, advance: Callable[[int], None]):
    for chunk in chunks(read_labelled(spec, advance), CHUNK):
        good = []
        for item in chunk:
            if isinstance(item, Record):
                good.append(item)
            else:
                source, line, raw, reason = item
                bad.append(Rejected(source, line, str(reason), raw))
                summary.count(source, "bad_record")
        summary.count(str(spec.path), "records", len(chunk))
        yield good


def _row(encoded, i: int) -> tuple[list[int], list[int]]:
    """Input ids and token type ids (zeros for a tokenizer that makes none) of one encoded text."""
    ids = encoded["input_ids"][i]
    return ids, encoded["token_type_ids"][i] if "token_type_ids" in encoded else [0] * len(ids)


def _encode(tokenizer, records: list[Record], cfg: Config, summary: DataSummary, left_out: list[Rejected],
            too_long: list[Rejected]) -> list[tuple[Record, list[int], list[int]]]:
    """(record, input ids, token type ids) of the records the length policy keeps."""
    if not records:
        return []
    pairs = [r.fields["text_pair"] for r in records]
    args = ([r.text for r in records], pairs) if any(p is not None for p in pairs) else ([r.text for r in records],)
    if len(args) == 2 and any(p is None for p in pairs):
        raise DataError(f"{records[0].source}: some records have text_pair and some do not; give it to all or none")
    full = tokenizer(*args, truncation=False)
    cut = None
    out = []
    for i, r in enumerate(records):
        ids, types = _row(full, i)
        if len(ids) > cfg.max_seq_len:
            summary.count(r.source, "over_max_seq_len")
            if cfg.truncation == "error":
                too_long.append(Rejected(r.source, r.line, f"{len(ids)} tokens > max_seq_len {cfg.max_seq_len}"))
                continue
            if cfg.truncation == "drop":
                left_out.append(Rejected(r.source, r.line, f"dropped: {len(ids)} tokens > max_seq_len "
                                         f"{cfg.max_seq_len}", r.raw))
                summary.count(r.source, "dropped_too_long")
                continue
            if cut is None:  # the tokenizer truncates the longer of text and text_pair, keeping [SEP]s
                side = tokenizer.truncation_side
                tokenizer.truncation_side = "left" if cfg.truncation == "truncate_left" else "right"
                try:
                    cut = tokenizer(*args, truncation=True, max_length=cfg.max_seq_len)
                finally:
                    tokenizer.truncation_side = side
            summary.count(r.source, "truncated")
            summary.count(r.source, "tokens_cut", len(ids) - len(cut["input_ids"][i]))
            ids, types = _row(cut, i)
        summary.count(r.source, "kept")
        summary.lengths.append(len(ids))
        out.append((r, ids, types))
    return out


def _targets(records: list[Record], index: dict[str, int]) -> np.ndarray:
    rows = np.zeros((len(records), len(index)), dtype=np.float32)
    for i, r in enumerate(records):
        for v in _as_list(r.fields["label"]):
            rows[i, index[str(v)]] = 1.0
    return rows


def _read_split(cfg: Config, verb: str) -> tuple[list[Record], list[Record], list[Rejected], DataSummary]:
    """(training records, held-out records, bad records, counts): the seeded split, or the validation file.
    `verb` names the work in the progress shown for large files ("Preparing", "Checking")."""
    bad: list[Rejected] = []
    summary = DataSummary()
    split = cfg.validation.split if cfg.validation else None
    train, held = [], []
    with files_progress(verb, data_paths(cfg)) as advance:
        for k, ds in enumerate(cfg.datasets):
            for c, chunk in enumerate(_read(ds, bad, summary, advance)):
                if split:
                    chunk, out = _split_chunk(chunk, split, cfg.seed, k, c)
                    held += out
                train += chunk
        if cfg.validation and cfg.validation.path:
            for chunk in _read(cfg.validation, bad, summary, advance):
                held += chunk
    return train, held, bad, summary


def _classes(cfg: Config, train: list[Record]) -> list[str]:
    names = label_names(train)
    if len(names) < 2:
        where = ", ".join(str(ds.path) for ds in cfg.datasets)
        raise DataError(f"{where}: every training record has the label {names[0]!r}; a classifier needs at least "
                        "two classes. Add examples of the other classes, or check the `label` column mapping.")
    return names


def _known(held: list[Record], names: list[str]) -> tuple[list[Record], list[Rejected]]:
    """Held-out records whose labels training has, and those with one it never had (it cannot be predicted)."""
    known, unknown = [], []
    for r in held:
        missing = [str(v) for v in _as_list(r.fields["label"]) if str(v) not in names]
        if missing:
            unknown.append(Rejected(r.source, r.line, f"label {', '.join(missing)} is not in the training data "
                                    f"(classes: {', '.join(names)}); the model cannot predict it", r.raw))
        else:
            known.append(r)
    return known, unknown


def prepare_labelled(cfg: Config, tokenizer) -> LabelledData:
    """Read, check, split and encode the labelled data of a config (the classification row's `prepare`).

    Bad records (a label that is not a string/int/list, a validation label training never saw) follow
    on_bad_record, with their file and line; the label list comes from the training split alone.
    """
    hashes = file_hashes(cfg)
    left_out: list[Rejected] = []
    too_long: list[Rejected] = []
    train, held, bad, summary = _read_split(cfg, "Preparing")
    if not train:
        _check_bad(bad, sum(c["records"] for c in summary.per_file.values()), cfg)
        raise DataError("no training record is left after the checks; see <output_dir>/rejected.jsonl")
    names = _classes(cfg, train)
    index = {n: i for i, n in enumerate(names)}
    validation, unknown = _known(held, names)
    for r in unknown:
        summary.count(r.source, "bad_record")
    bad += unknown
    total = sum(c["records"] for c in summary.per_file.values())
    _check_bad(bad, total, cfg)
    multi = any(isinstance(r.fields["label"], list) for r in train + validation)
    findings = label_findings(train, validation, names)

    sets, targets = [], []
    for records in (train, validation):
        builder = TokenizedBuilder(keep_records=True)
        kept = _encode(tokenizer, records, cfg, summary, left_out, too_long)
        for r, ids, types in kept:
            builder.add(ids, types, r)
        sets.append(builder.build())
        targets.append(_targets([r for r, _, _ in kept], index))
    if too_long:
        _raise_bad(too_long, total, "`truncation: error` is set; raise max_seq_len or choose "
                   "truncation: drop | truncate_right | truncate_left.")
    if not len(sets[0]):
        raise DataError("no training example is left after the length policy; see <output_dir>/rejected.jsonl")
    kept_per_file = Counter(e.record.source for e in sets[0])  # train holds the datasets in config order
    sizes = [kept_per_file[str(ds.path)] for ds in cfg.datasets]
    weights = effective_weights(sizes, [ds.weight for ds in cfg.datasets], [ds.ratio for ds in cfg.datasets])
    return LabelledData(sets[0], sets[1], sizes, weights, bad + left_out, summary, None, hashes,
                        head_config=head_config(names, multi, tokenizer.pad_token_id), labels=names, multi_label=multi,
                        train_targets=targets[0], validation_targets=targets[1],
                        token_types="token_type_ids" in tokenizer.model_input_names, findings=findings)


def label_counts(data: LabelledData) -> dict[str, int]:
    """Training examples per class, in label order."""
    return dict(zip(data.labels, data.train_targets.sum(0).astype(int).tolist()))


def check_labelled(cfg: Config, report: CheckReport) -> None:
    """`tuneforge data check` for labelled data (the classification row's `checks`): bad labels, one class,
    unknown validation labels (errors, with file:line), rare classes, imbalance, conflicts, leakage (warnings)."""
    from_file = str(cfg.datasets[0].path)
    try:
        train, held, bad, summary = _read_split(cfg, "Checking")
        report.records.update({source: c["records"] for source, c in summary.per_file.items()})
        names = _classes(cfg, train) if train else []
    except DataError as err:
        report.add(ERROR, "labels", from_file, 0, str(err))
        return
    validation, unknown = _known(held, names)
    for r in bad + unknown:
        report.add(ERROR, "bad-label", r.source, r.line, r.reason)
    if names:
        for note in label_findings(train, validation, names):
            report.add(WARNING, "labels", from_file, 0, note)
