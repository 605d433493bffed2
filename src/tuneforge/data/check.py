"""`tuneforge data check`: every problem in the data, with its file and line, before a GPU is paid for.

Records are streamed; what is kept per record is a 16-byte key, a MinHash signature and a length,
so a large file is checked in bounded memory. Template checks use the chosen base model's own
tokenizer and chat template.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from tuneforge.config import Config
from tuneforge.data.dataset import chunks, data_paths, good_records, record_segments, record_text
from tuneforge.data.formats import Record, apply_mapping
from tuneforge.data.pairs_text import pair_record
from tuneforge.data.progress import files_progress
from tuneforge.data.readers import BadRecord, iter_rows
from tuneforge.data.template import IGNORE_INDEX, encode_segment_lists, find_end_of_turn
from tuneforge.errors import ConfigError, DataError
from tuneforge.methods.facts import function_at
from tuneforge.methods.facts import method_facts

ERROR, WARNING = "error", "warning"
ALLOWED_CONTROL = {"\n", "\t", "\r"}


@dataclass
class Finding:
    severity: str
    code: str
    source: str
    line: int
    message: str

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    records: Counter = field(default_factory=Counter)  # per file
    settings: dict = field(default_factory=dict)

    def add(self, severity: str, code: str, source: str, line: int, message: str) -> None:
        self.findings.append(Finding(severity, code, source, line, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def by_code(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in sorted(self.findings, key=lambda f: (f.severity != ERROR, f.code, f.source, f.line)):
            out.setdefault(f.code, []).append(f)
        return out

    def as_json(self) -> dict:
        return {
            "ok": not self.errors,
            "errors": len(self.errors),
            "warnings": len(self.findings) - len(self.errors),
            "records": dict(self.records),
            "settings": self.settings,
            "findings": [asdict(f) | {"where": f.where} for f in self.findings],
        }


def control_characters(text: str) -> list[str]:
    """Invisible control characters (not newline or tab) that usually mean broken extraction."""
    return sorted({f"U+{ord(c):04X}" for c in text if c not in ALLOWED_CONTROL and unicodedata.category(c) == "Cc"})


def record_strings(rec: Record) -> list[str]:
    """Every piece of text a record carries."""
    strings = [rec.text, rec.prompt if isinstance(rec.prompt, str) else "", rec.completion if isinstance(rec.completion, str) else ""]
    for m in rec.messages:
        if isinstance(m.get("content"), str):
            strings.append(m["content"])
    return [s for s in strings if s]


class _TemplateCheck:
    """Render and encode each record as training would, and check what the model will see."""

    def __init__(self, tokenizer, cfg: Config, report: CheckReport):
        self.tok, self.cfg, self.report = tokenizer, cfg, report
        specials = sorted({t for t in tokenizer.all_special_tokens if t} | set(tokenizer.get_added_vocab()), key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.end_of_turn: str | None = None
        self.lengths: list[tuple[int, int]] = []  # (prompt tokens, response tokens) per example
        self.where: list[tuple[str, int]] = []

    def segments(self, rec: Record):
        if rec.kind not in ("chat", "completion", "text"):
            return None  # preference, kto, triplet: trained by their own methods, checked for their fields only
        if rec.kind == "chat" and self.end_of_turn is None:
            self.end_of_turn = find_end_of_turn(self.tok)
        return record_segments(self.tok, rec, self.cfg.train_on_inputs, self.end_of_turn)

    def check_chunk(self, records: list[Record]) -> None:
        rep = self.report
        kept, segment_lists = [], []
        for rec in records:
            for s in record_strings(rec):
                found = sorted(set(self.special_re.findall(s))) if self.special_re else []
                if found:
                    rep.add(WARNING, "special-token-in-text", rec.source, rec.line,
                            f"the text contains {', '.join(found[:3])}, which the tokenizer reads as a control token")
                    break
            for s in record_strings(rec):
                bad = control_characters(s)
                if bad:
                    rep.add(WARNING, "control-characters", rec.source, rec.line, f"control characters {', '.join(bad[:5])}")
                    break
            try:
                segs = self.segments(rec)
            except (TemplateError, DataError) as err:
                rep.add(ERROR, "template", rec.source, rec.line, f"the chat template cannot render this record: {err}")
                continue
            if segs is not None:
                kept.append((rec, segs))
                segment_lists.append(segs)
        for (rec, segs), (ids, labels) in zip(kept, encode_segment_lists(self.tok, segment_lists)):
            self._check_encoded(rec, segs, ids, labels)

    def _check_encoded(self, rec: Record, segs, ids: np.ndarray, labels: np.ndarray) -> None:
        rep, n = self.report, len(ids)
        rendered = "".join(t for t, _ in segs)
        decoded = self.tok.decode(ids.tolist(), skip_special_tokens=False)
        if not decoded.endswith(rendered) or len(decoded) - len(rendered) > len(self.tok.bos_token or ""):
            rep.add(ERROR, "round-trip", rec.source, rec.line,
                    "the tokens do not decode back to the rendered text (the tokenizer changes this text)")
        if rec.kind == "chat" and not self.cfg.train_on_inputs:
            self._check_spans(rec, ids, labels)
        if n > self.cfg.max_seq_len:
            lost = n if self.cfg.truncation == "drop" else n - self.cfg.max_seq_len
            rep.add(WARNING, "too-long", rec.source, rec.line,
                    f"{n} tokens > max_seq_len {self.cfg.max_seq_len}: {lost} tokens lost ({self.cfg.truncation})")
        trained = int((labels != IGNORE_INDEX).sum())
        self.lengths.append((n - trained, trained))
        self.where.append((rec.source, rec.line))

    def _check_spans(self, rec: Record, ids: np.ndarray, labels: np.ndarray) -> None:
        trained = labels != IGNORE_INDEX
        starts = np.flatnonzero(trained & ~np.concatenate([[False], trained[:-1]]))
        ends = np.flatnonzero(trained & ~np.concatenate([trained[1:], [False]]))
        n_assistant = sum(1 for m in rec.messages if m["role"] == "assistant")
        if len(starts) != n_assistant:
            self.report.add(ERROR, "assistant-span", rec.source, rec.line,
                            f"{n_assistant} assistant turns but {len(starts)} trained spans")
            return
        eot_id = self.tok.convert_tokens_to_ids(self.end_of_turn)
        if any(ids[e] != eot_id for e in ends):
            self.report.add(ERROR, "end-of-turn", rec.source, rec.line,
                            f"an assistant turn is not closed by {self.end_of_turn}, so the model would not learn to stop")


def _near_duplicates(report: CheckReport, seen: dict, lsh, rec: Record, key: bytes, sig, leak_index=None) -> None:
    """Exact and near repeats within the data; with leak_index, also matches against training data."""
    if leak_index is not None:
        train_seen, train_lsh = leak_index
        if key in train_seen:
            report.add(ERROR, "leakage", rec.source, rec.line, f"also in the training data at {train_seen[key]}")
        else:
            match = train_lsh.query(sig)
            if match:
                report.add(ERROR, "leakage", rec.source, rec.line, f"near duplicate of training record {match[0]}")
    if key in seen:
        report.add(WARNING, "duplicate", rec.source, rec.line, f"exact duplicate of {seen[key]}")
        return
    match = lsh.query(sig)
    if match:
        report.add(WARNING, "near-duplicate", rec.source, rec.line, f"near duplicate of {match[0]}")
    seen[key] = rec.where
    lsh.add(rec.where, sig)


def check_data(cfg: Config, tokenizer, near_threshold: float = 0.85, model_folder: Path | None = None,
               chunk: int = 1024) -> CheckReport:
    """Lint the training and validation files of a config."""
    from tuneforge.data.dedupe import LSHIndex, MinHasher, exact_key
    from tuneforge.data.stats import length_outliers

    report = CheckReport(settings={"max_seq_len": cfg.max_seq_len, "truncation": cfg.truncation,
                                   "near_threshold": near_threshold, "base_model": cfg.base_model})
    checks = method_facts(cfg).checks
    if checks:  # a task whose records are not text to train on (labelled text, images) checks them itself
        function_at(checks)(cfg, report)
        return report
    template = _TemplateCheck(tokenizer, cfg, report)
    hasher = MinHasher()
    train_seen: dict = {}
    train_lsh = LSHIndex(near_threshold)
    files = [(ds, False) for ds in cfg.datasets]
    if cfg.validation and cfg.validation.path:
        files.append((cfg.validation, True))
    def on_bad(source: str, line: int, _raw, reason: str) -> None:
        report.records[source] += 1
        report.add(ERROR, "bad-record", source, line, reason)

    # One pass: each chunk is hashed for (near) duplicates and rendered through the template together.
    with files_progress("Checking", data_paths(cfg)) as advance:
        for spec, held_out in files:
            seen, lsh = (train_seen, train_lsh) if not held_out else ({}, LSHIndex(near_threshold))
            for records in chunks(good_records(spec, on_bad, advance), chunk):
                report.records[spec.path] += len(records)
                texts = [record_text(rec) for rec in records]
                leak = (train_seen, train_lsh) if held_out else None
                for rec, text, sig in zip(records, texts, hasher.signatures(texts)):
                    _near_duplicates(report, seen, lsh, rec, exact_key(text), sig, leak)
                template.check_chunk(records)

    for part, column in (("prompt", 0), ("response", 1)):
        lengths = [max(1, pair[column]) for pair in template.lengths]
        median = float(np.median(lengths)) if lengths else 0.0
        for i in length_outliers(lengths):
            n = lengths[i]
            if max(n / median, median / n) < 2:  # a tight distribution is not worth a warning
                continue
            source, line = template.where[i]
            report.add(WARNING, "length-outlier", source, line, f"{part} of {n} tokens, far from the median of {median:.0f}")
    if model_folder is not None and tokenizer.chat_template:
        from tuneforge.models.load import embedding_weights, template_special_ids, untrained_rows

        bad = untrained_rows(embedding_weights(model_folder), template_special_ids(tokenizer))
        if bad:
            report.add(ERROR, "untrained-template-token", str(model_folder), 0,
                       f"the chat template uses {', '.join(bad)}, whose embeddings are untrained in this model; "
                       "train with `adapter: full` or choose a template the model knows")
    return report


def _pair_key(*texts: str) -> bytes:
    """A 16-byte key of texts compared as a reader would: case and runs of whitespace ignored."""
    joined = "\x1f".join(" ".join(t.split()).casefold() for t in texts)
    return hashlib.blake2b(joined.encode(), digest_size=16).digest()


def check_pairs(cfg: Config, report: CheckReport) -> None:
    """`tuneforge data check` for embedding pairs (the embedding row's `checks`), each finding with file:line.
    Errors: a record that cannot be read (a missing field, an empty text, a negative equal to the positive),
    contrastive and scored records mixed, a validation query that is also a training query (the retrieval
    evaluation would measure recall of trained pairs). Warnings: a query equal to its positive (nothing to
    learn), a pair repeated, a score outside [-1, 1] (a cosine cannot reach it)."""
    files = [(ds, False) for ds in cfg.datasets]
    if cfg.validation and cfg.validation.path:
        files.append((cfg.validation, True))
    train_queries: dict[bytes, str] = {}
    first_of_kind: dict[str, Record] = {}
    with files_progress("Checking", data_paths(cfg)) as advance:
        for spec, held_out in files:
            pairs: dict[bytes, str] = {}
            for line, obj in iter_rows(spec.path, advance):
                report.records[spec.path] += 1
                try:
                    rec = pair_record(apply_mapping(obj, spec.columns, {}), str(spec.path), line)
                except BadRecord as err:
                    report.add(ERROR, "bad-record", str(spec.path), line, str(err))
                    continue
                if first_of_kind.setdefault(rec.kind, rec) is rec and len(first_of_kind) == 2:  # the other's first
                    other = next(iter(first_of_kind.values()))
                    report.add(ERROR, "mixed-kinds", rec.source, line, f"a {rec.kind} record, but {other.where} is a "
                               f"{other.kind} record; train contrastive (query, positive[, negative]) or scored pairs, "
                               "not both")
                _pair_findings(report, rec, pairs, train_queries, held_out)


def _pair_findings(report: CheckReport, rec: Record, pairs: dict, train_queries: dict, held_out: bool) -> None:
    query = _pair_key(rec.query)
    if query == _pair_key(rec.positive):
        report.add(WARNING, "query-is-positive", rec.source, rec.line,
                   "the query equals its positive (case and spacing aside): the pair teaches nothing")
    pair = _pair_key(rec.query, rec.positive)
    if pair in pairs:
        report.add(WARNING, "duplicate", rec.source, rec.line, f"the same query and positive as {pairs[pair]}")
    pairs.setdefault(pair, rec.where)
    if held_out and query in train_queries:
        report.add(ERROR, "leakage", rec.source, rec.line, f"the query is also a training query at {train_queries[query]}")
    elif not held_out:
        train_queries.setdefault(query, rec.where)
    score = rec.fields.get("score") if rec.kind == "scored" else None
    if score is not None and not -1 <= score <= 1:
        report.add(WARNING, "score-range", rec.source, rec.line, f"score {score:g} is outside [-1, 1], which a cosine "
                   "similarity cannot reach; rescale the scores (e.g. divide 0-5 ratings by 5)")


def load_check_target(target: str | Path, overrides: list[str] | None = None) -> Config:
    """A config file as it is, or a bare data file with the built-in model and max_seq_len 2048."""
    from tuneforge.config import apply_overrides, config_from_dict, load_config

    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        return load_config(path, overrides)
    if not path.exists():
        raise ConfigError(f"{path}: no such config or data file")
    raw = apply_overrides({"datasets": [{"path": str(path.resolve())}], "max_seq_len": 2048}, overrides)
    return config_from_dict(raw, f"--set for {path}")
