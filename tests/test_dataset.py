"""From config to examples: bad records (R-DATA-1), nothing to train on (R-DATA-3), the length policy
(R-DATA-4), validation split, dataset weights, file hashes, label masks and collation (R-EOS-1)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from conftest import chat, write_jsonl
from tuneforge.config import config_from_dict
from tuneforge.data.batching import collate, epoch_order
from tuneforge.data.dataset import prepare_data, write_rejected
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.errors import DataError

MAX_LEN = 64
LONG = " ".join(["word"] * 60)  # about 60 tokens: any chat with this in it is longer than MAX_LEN


def make_cfg(tmp_path, datasets, **kw):
    specs = [d if isinstance(d, dict) else {"path": str(d)} for d in datasets]
    return config_from_dict({"datasets": specs, **kw}, base=tmp_path)


def short_chats(n, start=0):
    return [chat(f"Question {i}?", f"Answer {i}.") for i in range(start, start + n)]


def lines_of(examples):
    return [e.line for e in examples]


def trained_ids(example):
    return [t for t in example.labels if t != IGNORE_INDEX]


# --- R-DATA-1: bad records ------------------------------------------------------------------


def with_bad(tmp_path, n_good, n_bad, name="train.jsonl"):
    """Good chats on odd lines, records with an empty answer on even lines (while both last)."""
    rows, good_lines, bad_lines = [], [], []
    goods, bads = iter(short_chats(n_good)), iter(chat(f"q{i}", "") for i in range(n_bad))
    while len(good_lines) < n_good or len(bad_lines) < n_bad:
        take_good = len(good_lines) < n_good and (len(rows) % 2 == 0 or len(bad_lines) == n_bad)
        rows.append(next(goods) if take_good else next(bads))
        (good_lines if take_good else bad_lines).append(len(rows))
    return write_jsonl(tmp_path / name, rows), good_lines, bad_lines


def test_bad_records_stop_the_run_by_default(tmp_path, smol_tokenizer):
    path, _, bad_lines = with_bad(tmp_path, 3, 2)
    cfg = make_cfg(tmp_path, [path])
    assert cfg.on_bad_record == "error"
    with pytest.raises(DataError) as err:
        prepare_data(cfg, smol_tokenizer)
    msg = str(err.value)
    assert "2 of 5 records cannot be used" in msg
    for line in bad_lines:
        assert f"{path}:{line}: message 2 (assistant): empty content" in msg
    assert "on_bad_record: skip" in msg


def test_error_lists_first_twenty_and_counts_the_rest(tmp_path, smol_tokenizer):
    path, _, bad_lines = with_bad(tmp_path, 5, 25)
    with pytest.raises(DataError) as err:
        prepare_data(make_cfg(tmp_path, [path]), smol_tokenizer)
    msg = str(err.value)
    listed = [ln for ln in msg.splitlines() if ln.strip().startswith(f"{path}:")]
    assert [int(ln.split(f"{path}:")[1].split(":")[0]) for ln in listed] == bad_lines[:20]
    assert "and 5 more" in msg


def test_skip_keeps_good_records_and_writes_rejects(tmp_path, smol_tokenizer):
    path, good_lines, bad_lines = with_bad(tmp_path, 8, 2)
    write_jsonl(path, [json.loads(x) for x in path.read_text().splitlines()] + ["{not json"])
    bad_lines = bad_lines + [11]
    cfg = make_cfg(tmp_path, [path], on_bad_record="skip", max_bad_fraction=0.5)

    data = prepare_data(cfg, smol_tokenizer)

    assert lines_of(data.train) == good_lines
    assert [(r.source, r.line) for r in data.rejected] == [(str(path), n) for n in bad_lines]
    counts = data.summary.per_file[str(path)]
    assert counts["records"] == 11 and counts["bad_record"] == 3

    out = tmp_path / "run" / "rejected.jsonl"
    write_rejected(out, data.rejected)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(w["file"], w["line"]) for w in written] == [(str(path), n) for n in bad_lines]
    assert all(w["reason"] for w in written)
    assert written[0]["reason"] == "message 2 (assistant): empty content"
    assert written[0]["record"] == chat("q0", "")
    assert "not valid JSON" in written[2]["reason"] and written[2]["record"] is None


def test_too_many_bad_records_stop_even_with_skip(tmp_path, smol_tokenizer):
    path, _, _ = with_bad(tmp_path, 8, 2)  # 20% bad
    with pytest.raises(DataError, match=r"2 of 10 records cannot be used(.|\n)*max_bad_fraction=0.1"):
        prepare_data(make_cfg(tmp_path, [path], on_bad_record="skip", max_bad_fraction=0.1), smol_tokenizer)


def test_bad_fraction_at_the_limit_is_allowed(tmp_path, smol_tokenizer):
    path, good_lines, _ = with_bad(tmp_path, 9, 1)  # exactly 10%
    data = prepare_data(make_cfg(tmp_path, [path], on_bad_record="skip", max_bad_fraction=0.1), smol_tokenizer)
    assert lines_of(data.train) == good_lines


def test_bad_records_in_validation_file_count_too(tmp_path, smol_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", short_chats(4))
    val = write_jsonl(tmp_path / "val.jsonl", [chat("q", "a"), chat("q", " ")])
    with pytest.raises(DataError, match=rf"{val}:2: message 2 \(assistant\): empty content"):
        prepare_data(make_cfg(tmp_path, [train], validation={"path": str(val)}), smol_tokenizer)


# --- R-DATA-3: no trained tokens after the final truncation ---------------------------------


def test_example_whose_answer_is_truncated_away_is_rejected(tmp_path, smol_tokenizer):
    rows = short_chats(2) + [chat(LONG, "ok")] + short_chats(2, 2)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(tmp_path, [path], max_seq_len=MAX_LEN, truncation="truncate_right")

    data = prepare_data(cfg, smol_tokenizer)

    assert 3 not in lines_of(data.train)
    assert lines_of(data.train) == [1, 2, 4, 5]
    [rej] = data.rejected
    assert (rej.line, rej.source) == (3, str(path))
    assert rej.reason.startswith("no trained tokens")
    assert rej.record == chat(LONG, "ok")
    counts = data.summary.per_file[str(path)]
    assert counts["no_trained_tokens"] == 1
    assert all(e.n_trained > 0 for e in data.train)


def test_truncate_left_keeps_the_answer_of_the_same_example(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", short_chats(2) + [chat(LONG, "ok")])
    data = prepare_data(make_cfg(tmp_path, [path], max_seq_len=MAX_LEN, truncation="truncate_left"), smol_tokenizer)
    assert lines_of(data.train) == [1, 2, 3]
    assert smol_tokenizer.decode(trained_ids(data.train[2])) == "ok<|im_end|>"


def test_no_example_left_is_an_error(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [chat(LONG, "ok")])
    with pytest.raises(DataError, match="no training example is left"):
        prepare_data(make_cfg(tmp_path, [path], max_seq_len=MAX_LEN, truncation="truncate_right"), smol_tokenizer)


# --- R-DATA-4: one length policy, exactly K --------------------------------------------------

LONG_LINES = [2, 5, 9]  # K = 3 over-length rows among 10


@pytest.fixture
def length_file(tmp_path):
    rows = [chat(f"Tell me {i}", LONG) if i in LONG_LINES else chat(f"Question {i}?", f"Answer {i}.")
            for i in range(1, 11)]
    return write_jsonl(tmp_path / "lengths.jsonl", rows)


@pytest.fixture
def full_encodings(tmp_path, length_file, smol_tokenizer):
    """Every row encoded with room to spare: what truncation starts from."""
    data = prepare_data(make_cfg(tmp_path, [length_file], max_seq_len=4096), smol_tokenizer)
    full = {e.line: e for e in data.train}
    assert sorted(n for n, e in full.items() if len(e.input_ids) > MAX_LEN) == LONG_LINES
    return full


def test_drop_drops_exactly_k(tmp_path, length_file, full_encodings, smol_tokenizer):
    data = prepare_data(make_cfg(tmp_path, [length_file], max_seq_len=MAX_LEN, truncation="drop"), smol_tokenizer)

    assert lines_of(data.train) == [n for n in range(1, 11) if n not in LONG_LINES]
    assert [r.line for r in data.rejected] == LONG_LINES
    for r in data.rejected:
        assert r.reason == f"dropped: {len(full_encodings[r.line].input_ids)} tokens > max_seq_len {MAX_LEN}"
        assert r.record is not None
    counts = data.summary.per_file[str(length_file)]
    assert counts["records"] == 10
    assert counts["over_max_seq_len"] == 3
    assert counts["dropped_too_long"] == 3
    assert counts["truncated"] == 0
    assert len(data.summary.lengths) == 7


@pytest.mark.parametrize("side", ["truncate_right", "truncate_left"])
def test_truncate_truncates_exactly_k(tmp_path, length_file, full_encodings, smol_tokenizer, side):
    data = prepare_data(make_cfg(tmp_path, [length_file], max_seq_len=MAX_LEN, truncation=side), smol_tokenizer)

    assert lines_of(data.train) == list(range(1, 11))
    assert data.rejected == []
    truncated = [e.line for e in data.train if len(e.input_ids) != len(full_encodings[e.line].input_ids)]
    assert truncated == LONG_LINES
    for e in data.train:
        full = full_encodings[e.line]
        if e.line in LONG_LINES:
            assert len(e.input_ids) == MAX_LEN
            keep = slice(None, MAX_LEN) if side == "truncate_right" else slice(-MAX_LEN, None)
            assert e.input_ids == full.input_ids[keep]
            assert e.labels == full.labels[keep]
            assert e.n_trained > 0
        else:
            assert (e.input_ids, e.labels) == (full.input_ids, full.labels)
    counts = data.summary.per_file[str(length_file)]
    assert counts["over_max_seq_len"] == 3
    assert counts["truncated"] == 3
    assert counts["dropped_too_long"] == 0
    assert counts["tokens_cut"] == sum(len(full_encodings[n].input_ids) - MAX_LEN for n in LONG_LINES)
    assert max(data.summary.lengths) == MAX_LEN and len(data.summary.lengths) == 10


def test_truncate_left_keeps_the_end_of_the_sequence(tmp_path, length_file, smol_tokenizer):
    data = prepare_data(make_cfg(tmp_path, [length_file], max_seq_len=MAX_LEN, truncation="truncate_left"),
                        smol_tokenizer)
    eot = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for e in data.train:
        if e.line in LONG_LINES:
            # the answer's end and its end-of-turn token survive and are trained
            assert e.input_ids[-2] == eot and e.labels[-2] == eot
            assert smol_tokenizer.decode(trained_ids(e)).endswith("word word<|im_end|>")


def test_truncation_error_lists_the_k_rows(tmp_path, length_file, full_encodings, smol_tokenizer):
    with pytest.raises(DataError) as err:
        prepare_data(make_cfg(tmp_path, [length_file], max_seq_len=MAX_LEN, truncation="error"), smol_tokenizer)
    msg = str(err.value)
    listed = [ln.strip() for ln in msg.splitlines() if ln.strip().startswith(f"{length_file}:")]
    assert listed == [f"{length_file}:{n}: {len(full_encodings[n].input_ids)} tokens > max_seq_len {MAX_LEN}"
                      for n in LONG_LINES]
    assert "truncation: error" in msg


def test_length_policy_counts_per_file(tmp_path, length_file, smol_tokenizer):
    other = write_jsonl(tmp_path / "other.jsonl", short_chats(4) + [chat("Tell me", LONG)])
    data = prepare_data(make_cfg(tmp_path, [length_file, other], max_seq_len=MAX_LEN), smol_tokenizer)
    assert data.summary.per_file[str(length_file)]["dropped_too_long"] == 3
    assert data.summary.per_file[str(other)]["dropped_too_long"] == 1
    assert data.summary.per_file[str(other)]["records"] == 5
    assert data.dataset_sizes == [7, 4]
    assert sum(c for _, _, c in data.summary.histogram(MAX_LEN)) == 11


# --- validation split ------------------------------------------------------------------------


def split_lines(tmp_path, smol_tokenizer, seed, n=20, split=0.25):
    path = write_jsonl(tmp_path / "train.jsonl", short_chats(n))
    data = prepare_data(make_cfg(tmp_path, [path], seed=seed, validation={"split": split}), smol_tokenizer)
    return data, lines_of(data.train), lines_of(data.validation)


def test_validation_split_is_disjoint_and_adds_up(tmp_path, smol_tokenizer):
    data, train, val = split_lines(tmp_path, smol_tokenizer, seed=1)
    assert len(val) == 5 and len(train) == 15
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(range(1, 21))
    assert data.dataset_sizes == [15]


def test_validation_split_is_deterministic_by_seed(tmp_path, smol_tokenizer):
    _, train_a, val_a = split_lines(tmp_path, smol_tokenizer, seed=1)
    _, train_b, val_b = split_lines(tmp_path, smol_tokenizer, seed=1)
    _, _, val_c = split_lines(tmp_path, smol_tokenizer, seed=2)
    assert (train_a, val_a) == (train_b, val_b)
    assert sorted(val_a) != sorted(val_c)


def test_validation_split_holds_out_from_every_dataset(tmp_path, smol_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", short_chats(10))
    b = write_jsonl(tmp_path / "b.jsonl", short_chats(20, 100))
    data = prepare_data(make_cfg(tmp_path, [a, b], validation={"split": 0.2}), smol_tokenizer)
    held = Counter(e.source for e in data.validation)
    assert held == {str(a): 2, str(b): 4}
    assert data.dataset_sizes == [8, 16]
    assert [e.source for e in data.train] == [str(a)] * 8 + [str(b)] * 16


def test_validation_file(tmp_path, smol_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", short_chats(6))
    val = write_jsonl(tmp_path / "val.jsonl", short_chats(3, 50))
    data = prepare_data(make_cfg(tmp_path, [train], validation={"path": "val.jsonl"}), smol_tokenizer)
    assert [e.source for e in data.train] == [str(train)] * 6
    assert [(e.source, e.line) for e in data.validation] == [(str(val), n) for n in (1, 2, 3)]


# --- dataset weights and epoch order ---------------------------------------------------------


def test_weights_change_examples_per_epoch(tmp_path, smol_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", short_chats(4))
    b = write_jsonl(tmp_path / "b.jsonl", short_chats(6, 10))
    cfg = make_cfg(tmp_path, [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    data = prepare_data(cfg, smol_tokenizer)
    assert data.dataset_sizes == [4, 6] and data.dataset_weights == [2, 0.5]

    order = epoch_order(data.dataset_sizes, data.dataset_weights, seed=cfg.seed, epoch=0)
    counts = Counter(order)
    assert all(counts[i] == 2 for i in range(4))  # weight 2: each example twice
    from_b = [i for i in order if i >= 4]
    assert len(from_b) == 3 and len(set(from_b)) == 3  # weight 0.5: half, without repeats
    assert all(4 <= i < 10 for i in from_b)
    assert len(order) == 11
    assert all(data.train[i].source == (str(a) if i < 4 else str(b)) for i in order)


def test_weight_one_is_a_permutation():
    order = epoch_order([5, 3], [1.0, 1.0], seed=0, epoch=0)
    assert sorted(order) == list(range(8))


def test_fractional_weight_above_one():
    counts = Counter(epoch_order([10], [1.5], seed=3, epoch=0))
    assert sum(counts.values()) == 15
    assert set(counts) == set(range(10))
    assert sorted(counts.values()) == [1] * 5 + [2] * 5


def test_epoch_order_is_a_function_of_seed_and_epoch():
    sizes, weights = [30, 20], [1.0, 0.5]
    assert epoch_order(sizes, weights, seed=7, epoch=1) == epoch_order(sizes, weights, seed=7, epoch=1)
    assert epoch_order(sizes, weights, seed=7, epoch=1) != epoch_order(sizes, weights, seed=7, epoch=2)
    assert epoch_order(sizes, weights, seed=7, epoch=1) != epoch_order(sizes, weights, seed=8, epoch=1)


# --- file hashes -----------------------------------------------------------------------------


def test_file_hashes_are_sha256_of_each_file(tmp_path, smol_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", short_chats(3))
    b = write_jsonl(tmp_path / "b.jsonl", short_chats(3, 5))
    val = write_jsonl(tmp_path / "val.jsonl", short_chats(2, 9))
    data = prepare_data(make_cfg(tmp_path, [a, b], validation={"path": str(val)}), smol_tokenizer)
    assert data.file_hashes == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, val)}


def test_file_hash_changes_with_content(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", short_chats(3))
    before = prepare_data(make_cfg(tmp_path, [path]), smol_tokenizer).file_hashes[str(path)]
    write_jsonl(path, short_chats(3, 1))
    after = prepare_data(make_cfg(tmp_path, [path]), smol_tokenizer).file_hashes[str(path)]
    assert before != after


# --- label masks -----------------------------------------------------------------------------

MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": "Second answer."},
]}


def test_train_on_inputs_trains_every_token(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [MULTI_TURN, chat("Hi", "Hello")])
    data = prepare_data(make_cfg(tmp_path, [path], train_on_inputs=True), smol_tokenizer)
    for e in data.train:
        assert e.labels == e.input_ids
    assert "Be terse." in smol_tokenizer.decode(trained_ids(data.train[0]))


def test_default_trains_only_assistant_spans(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [MULTI_TURN, chat("Hi", "Hello")])
    data = prepare_data(make_cfg(tmp_path, [path]), smol_tokenizer)
    multi, single = data.train
    assert smol_tokenizer.decode(trained_ids(multi)) == "First answer.<|im_end|>Second answer.<|im_end|>"
    assert smol_tokenizer.decode(trained_ids(single)) == "Hello<|im_end|>"
    # every label is either ignored or equal to its input token
    for e in data.train:
        assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(e.labels, e.input_ids))
    # the prompt (system, user, the assistant header) is never trained
    first_trained = next(i for i, lab in enumerate(single.labels) if lab != IGNORE_INDEX)
    assert smol_tokenizer.decode(single.input_ids[:first_trained]).endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


def test_completion_and_text_masks(tmp_path, smol_tokenizer):
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "A whole document."}])
    [c] = prepare_data(make_cfg(tmp_path, [comp]), smol_tokenizer).train
    [t] = prepare_data(make_cfg(tmp_path, [text]), smol_tokenizer).train
    eos = smol_tokenizer.eos_token
    assert smol_tokenizer.decode(trained_ids(c)) == "4" + eos
    assert t.labels == t.input_ids
    assert smol_tokenizer.decode(t.input_ids).endswith("A whole document." + eos)


# --- collate and R-EOS-1 ---------------------------------------------------------------------


def test_collate_pads_labels_by_position_and_keeps_end_of_turn(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [chat("Hi", "Hello"), chat("A much longer question " * 3, "Yes")])
    data = prepare_data(make_cfg(tmp_path, [path]), smol_tokenizer)
    eot_id = smol_tokenizer.convert_tokens_to_ids(data.end_of_turn)
    pad_id = smol_tokenizer.pad_token_id
    assert data.end_of_turn == "<|im_end|>"
    assert pad_id == eot_id  # the case that hides the stop token when labels are masked by id

    examples = data.train
    lengths = [len(e.input_ids) for e in examples]
    assert lengths[0] < lengths[1]
    batch = collate(examples, pad_id)
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)

    for i, (e, n) in enumerate(zip(examples, lengths)):
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert batch["labels"][i, :n].tolist() == e.labels
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [pad_id] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        # the assistant's end-of-turn token (same id as the padding) is still trained
        last_eot = max(j for j in range(n) if e.input_ids[j] == eot_id)
        assert batch["labels"][i, last_eot].item() == eot_id
    # the earlier end-of-turn tokens (system, user turns) are not
    row = batch["labels"][0].tolist()
    assert sum(1 for j in range(lengths[0]) if examples[0].input_ids[j] == eot_id and row[j] == eot_id) == 1


GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_system_turns_a_template_cannot_render_are_counted_bad_records(tmp_path, smol_tokenizer, policy):
    """R-SYS-1: a template that refuses system turns fails the data check with a count, never mid-run."""
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = GEMMA_STYLE
    rows = [chat("q1", "a1"), chat("q2", "a2", system="be brief"), chat("q3", "a3"), chat("q4", "a4", system="x")]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = config_from_dict({"datasets": [{"path": "d.jsonl"}], "on_bad_record": policy, "max_bad_fraction": 0.5},
                           base=tmp_path)
    if policy == "error":
        with pytest.raises(DataError) as err:
            prepare_data(cfg, tok)
        assert "2 of 4 records cannot be used" in str(err.value)
        assert "d.jsonl:2: the chat template cannot render" in str(err.value) and "System role not supported" in str(err.value)
    else:
        data = prepare_data(cfg, tok)
        assert [e.line for e in data.train] == [1, 3]
        assert sorted(r.line for r in data.rejected) == [2, 4]


def test_a_template_that_silently_drops_the_system_prompt_is_caught(tmp_path, smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = GEMMA_STYLE.replace("{{ raise_exception('System role not supported') }}", "").replace(
        "{% for message in messages %}", "{% for message in messages if message['role'] != 'system' %}")
    write_jsonl(tmp_path / "d.jsonl", [chat("q1", "a1", system="Answer in French.")])
    cfg = config_from_dict({"datasets": [{"path": "d.jsonl"}]}, base=tmp_path)
    with pytest.raises(DataError, match="drops the system prompt"):
        prepare_data(cfg, tok)
