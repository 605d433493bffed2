"""Data formats: every format converts to the common form; every bad record is named with its line."""

from __future__ import annotations

import json

import pytest

from conftest import chat, write_jsonl
from tuneforge.data.formats import Record, read_records
from tuneforge.errors import DataError


def records(path, fmt="auto"):
    return list(read_records(path, fmt))


def good(items):
    return [r for r in items if isinstance(r, Record)]


def bad(items):
    """(line, reason) of each rejected record."""
    return [(item[1], str(item[3])) for item in items if not isinstance(item, Record)]


def only_bad(tmp_path, record, fmt="auto"):
    """Reason for one bad record on line 2, after a good record of the same format on line 1."""
    first = {
        "messages": chat("hi", "hello"),
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        "alpaca": {"instruction": "hi", "output": "hello"},
        "completion": {"prompt": "hi", "completion": "hello"},
        "text": {"text": "hello"},
    }[fmt if fmt != "auto" else "messages"]
    items = records(write_jsonl(tmp_path / "data.jsonl", [first, record]), fmt)
    assert len(good(items)) == 1 and good(items)[0].line == 1
    [(line, reason)] = bad(items)
    assert line == 2
    return reason


# --- every format is read and converted ------------------------------------------------------


def test_messages_with_system(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [chat("What is 2+2?", "4", system="Be brief.")])
    [rec] = records(path)
    assert rec.kind == "chat"
    assert rec.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert (rec.source, rec.line, rec.where) == (str(path), 1, f"{path}:1")


def test_messages_multi_turn_and_extra_keys_dropped(tmp_path):
    msgs = [
        {"role": "user", "content": "a", "weight": 0},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    [rec] = records(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs, "id": 7}]))
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in rec.messages] == ["a", "b", "c", "d"]
    assert "weight" not in rec.messages[0]


def test_sharegpt_roles_and_top_level_system(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [
            {"from": "system", "value": "Sys"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]},
        {"system": "Top sys", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ])
    first, second = records(path)
    assert first.messages == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert second.messages == [
        {"role": "system", "content": "Top sys"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert (first.line, second.line) == (1, 2)


def test_alpaca_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say hi", "input": "", "output": "Hi"},
        {"instruction": "Say bye", "output": "Bye"},
        {"instruction": "Be nice", "output": "OK", "system": "You are kind."},
    ])
    with_input, empty_input, no_input, with_system = records(path)
    assert with_input.messages == [
        {"role": "user", "content": "Translate\n\nHallo"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert empty_input.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]
    assert no_input.messages == [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "Bye"}]
    assert with_system.messages[0] == {"role": "system", "content": "You are kind."}


def test_completion(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "x"}])
    first, second = records(path)
    assert (first.kind, first.prompt, first.completion) == ("completion", "2+2=", "4")
    assert (second.prompt, second.completion) == ("", "x")  # an empty prompt is allowed


def test_text(tmp_path):
    [rec] = records(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert (rec.kind, rec.text) == ("text", "Once upon a time.")


def test_json_list_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([chat("a", "b"), chat("c", "d")], indent=2))
    first, second = records(path)
    assert first.messages[1]["content"] == "b" and second.messages[1]["content"] == "d"
    assert (first.line, second.line) == (1, 2)  # numbered by record


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(chat("a", "b")))
    with pytest.raises(DataError, match="must hold a list"):
        records(path)


def test_broken_json_file_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": \n]\n')
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON"):
        records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        records(tmp_path / "nope.jsonl")


def test_format_is_detected_per_file(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                     {"from": "gpt", "value": "a"}]}])
    assert records(alpaca)[0].messages[0]["content"] == "i"
    assert records(text)[0].kind == "text"
    assert records(sharegpt)[0].messages[1] == {"role": "assistant", "content": "a"}


def test_detected_format_holds_for_the_whole_file(tmp_path):
    # Detected from the first record; a later record of another shape is a bad record of that format.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"text": "t"}])
    items = records(path)
    assert len(good(items)) == 1
    assert bad(items) == [(2, "missing field 'prompt'")]


def test_format_can_be_overridden(tmp_path):
    # A record with both "text" and "prompt/completion": auto picks completion, format: text overrides it.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "whole"}])
    assert records(path)[0].kind == "completion"
    [rec] = records(path, "text")
    assert (rec.kind, rec.text) == ("text", "whole")


def test_detection_skips_a_broken_first_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{broken", {"text": "ok"}])
    items = records(path)
    assert [r.line for r in good(items)] == [2]
    assert bad(items)[0][0] == 1


def test_undetectable_format_names_file_line_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", {"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        records(path)
    msg = str(err.value)
    assert f"{path}:2" in msg
    assert "question" in msg  # the keys it saw
    for fmt in ("messages", "sharegpt", "alpaca", "completion", "text"):
        assert fmt in msg


# --- bad records: reason and line number ----------------------------------------------------


def test_not_json(tmp_path):
    assert "not valid JSON" in only_bad(tmp_path, '{"messages": [', "messages")


def test_not_an_object(tmp_path):
    assert "expected a JSON object" in only_bad(tmp_path, "[1, 2]", "messages")


@pytest.mark.parametrize("fmt, record, reason", [
    ("messages", {"msgs": []}, "field 'messages' must be a list"),
    ("alpaca", {"instruction": "i"}, "missing field 'output'"),
    ("alpaca", {"output": "o"}, "missing field 'instruction'"),
    ("completion", {"prompt": "p"}, "missing field 'completion'"),
    ("text", {"body": "x"}, "missing field 'text'"),
    ("sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "needs 'from' and 'value'"),
])
def test_missing_field(tmp_path, fmt, record, reason):
    assert reason in only_bad(tmp_path, record, fmt)


@pytest.mark.parametrize("content", ["", "   \n\t "])
def test_empty_or_whitespace_assistant_turn(tmp_path, content):
    reason = only_bad(tmp_path, chat("q", content))
    assert "message 2 (assistant): empty content" == reason


def test_whitespace_only_user_turn(tmp_path):
    assert only_bad(tmp_path, chat("  ", "a")) == "message 1 (user): empty content"


@pytest.mark.parametrize("fmt, record, reason", [
    ("alpaca", {"instruction": "i", "output": "   "}, "field 'output' is empty"),
    ("completion", {"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ("text", {"text": "\n"}, "field 'text' is empty"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
     "message 2 (assistant): empty content"),
])
def test_empty_field_in_other_formats(tmp_path, fmt, record, reason):
    assert only_bad(tmp_path, record, fmt) == reason


@pytest.mark.parametrize("fmt, record, reason", [
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"a": 1}}]},
     "message 2 (assistant): content must be a string, got dict"),
    ("messages", {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
     "message 1 (user): content must be a string, got list"),
    ("messages", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     "message 1 (user): content must be a string, got NoneType"),
    ("alpaca", {"instruction": "i", "output": {"answer": 1}}, "field 'output' must be a string, got dict"),
    ("alpaca", {"instruction": "i", "input": 5, "output": "o"}, "field 'input' must be a string, got int"),
    ("completion", {"prompt": "p", "completion": 4}, "field 'completion' must be a string, got int"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
     "message 2 (assistant): content must be a string, got int"),
])
def test_non_string_content(tmp_path, fmt, record, reason):
    assert only_bad(tmp_path, record, fmt) == reason


def test_unknown_role(tmp_path):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    reason = only_bad(tmp_path, record)
    assert "message 2: unknown role 'bot'" in reason
    assert "assistant" in reason  # lists the known roles


def test_unknown_sharegpt_speaker(tmp_path):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    assert "turn 2: unknown speaker 'bot'" in only_bad(tmp_path, record, "sharegpt")


def test_assistant_first(tmp_path):
    record = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "b"}]}
    assert only_bad(tmp_path, record) == "the first turn after the system prompt must be user, got assistant"


def test_assistant_first_after_system(tmp_path):
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}
    assert "must be user, got assistant" in only_bad(tmp_path, record)


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_two_turns_in_a_row(tmp_path, role):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs.insert(1 if role == "user" else 2, {"role": role, "content": "again"})
    assert only_bad(tmp_path, {"messages": msgs}) == f"two {role} turns in a row: turns must alternate user/assistant"


def test_no_assistant_turn(tmp_path):
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    assert only_bad(tmp_path, record) == "no assistant turn to train on"


def test_no_messages(tmp_path):
    assert only_bad(tmp_path, {"messages": []}) == "no messages"


def test_system_not_first(tmp_path):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "a"}]}
    assert only_bad(tmp_path, record) == "message 2: a system message may only come first"


def test_sharegpt_system_twice_is_rejected(tmp_path):
    record = {"system": "top", "conversations": [{"from": "system", "value": "inner"},
                                                 {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert "a system message may only come first" in only_bad(tmp_path, record, "sharegpt")


def test_assistant_with_tool_calls_may_have_no_content(tmp_path):
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    [rec] = records(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]))
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "tool", "assistant"]


def test_line_numbers_with_blank_lines_and_many_kinds(tmp_path):
    lines = [
        chat("q1", "a1"),                                      # 1 good
        "",                                                    # 2 blank
        "not json",                                            # 3
        "   ",                                                 # 4 blank
        chat("q2", ""),                                        # 5 empty assistant
        chat("q3", "a3"),                                      # 6 good
        "",                                                    # 7 blank
        {"messages": [{"role": "user", "content": "q"}]},      # 8 no assistant
        {"messages": [{"role": "user", "content": "q"}, {"role": "human", "content": "a"}]},  # 9 unknown role
        chat("q4", "a4"),                                      # 10 good
    ]
    items = records(write_jsonl(tmp_path / "d.jsonl", lines))
    assert [r.line for r in good(items)] == [1, 6, 10]
    assert [line for line, _ in bad(items)] == [3, 5, 8, 9]
    reasons = dict(bad(items))
    assert "not valid JSON" in reasons[3]
    assert "empty content" in reasons[5]
    assert reasons[8] == "no assistant turn to train on"
    assert "unknown role 'human'" in reasons[9]


def test_bad_record_keeps_the_raw_object(tmp_path):
    record = chat("q", "")
    items = records(write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), record, "{oops"]))
    raws = {item[1]: item[2] for item in items if not isinstance(item, Record)}
    assert raws[2] == record
    assert raws[3] is None  # a line that is not JSON has no object


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n".join(json.dumps(r) for r in [chat("a", "b"), chat("c", "d")]) + "\r\n").encode())
    assert [r.line for r in good(records(path))] == [1, 2]


def test_unicode_line_separators_inside_strings_do_not_split_records(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [chat("first\u2028line", "answer\x85here"), chat("q", "a")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    items = records(path)
    assert bad(items) == []
    assert [r.line for r in good(items)] == [1, 2]
    assert good(items)[0].messages[0]["content"] == "first\u2028line"


@pytest.mark.parametrize("fmt,obj", [
    ("sharegpt", {"system": {"text": "x"}, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ("alpaca", {"system": 3, "instruction": "q", "output": "a"}),
])
def test_non_string_top_level_system_is_a_bad_record(tmp_path, fmt, obj):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    [item] = records(path)
    assert "field 'system' must be a string" in str(item[3])


# --- preference, kto and triplet ------------------------------------------------------------

USER_Q = [{"role": "user", "content": "q"}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def second_is_bad(tmp_path, first, record, fmt="auto"):
    """Reason for `record` on line 2, after the good `first` on line 1 (so the format is detected from it)."""
    items = records(write_jsonl(tmp_path / "data.jsonl", [first, record]), fmt)
    assert [r.line for r in good(items)] == [1]
    [(line, reason)] = bad(items)
    assert line == 2
    return reason


PREFERENCE = {"prompt": "q", "chosen": "good", "rejected": "bad"}
KTO = {"prompt": "q", "completion": "a", "label": True}
TRIPLET = {"query": "q", "positive": "p", "negative": "n"}


def test_preference_as_text(tmp_path):
    [rec] = records(write_jsonl(tmp_path / "p.jsonl", [PREFERENCE]))
    assert (rec.kind, rec.prompt, rec.chosen, rec.rejected) == ("preference", "q", "good", "bad")


def test_preference_as_messages_with_a_prompt(tmp_path):
    record = {"prompt": [{"role": "system", "content": "s"}] + USER_Q, "chosen": assistant("good"),
              "rejected": assistant("bad")}
    [rec] = records(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert (rec.prompt, rec.chosen, rec.rejected) == (record["prompt"], assistant("good"), assistant("bad"))


def test_preference_responses_that_repeat_the_prompt_keep_only_the_response(tmp_path):
    record = {"prompt": USER_Q, "chosen": USER_Q + assistant("good"), "rejected": assistant("bad")}
    [rec] = records(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert (rec.prompt, rec.chosen, rec.rejected) == (USER_Q, assistant("good"), assistant("bad"))


def test_preference_without_prompt_takes_the_shared_leading_turns(tmp_path):
    shared = USER_Q + assistant("a1") + [{"role": "user", "content": "q2"}]
    record = {"chosen": shared + assistant("good"), "rejected": shared + assistant("bad")}
    [rec] = records(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert (rec.prompt, rec.chosen, rec.rejected) == (shared, assistant("good"), assistant("bad"))


def test_preference_response_with_tool_calls(tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    chosen = [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "42"},
              {"role": "assistant", "content": "It is 42."}]
    record = {"prompt": USER_Q, "chosen": chosen, "rejected": assistant("No idea.")}
    [rec] = records(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert rec.chosen == chosen


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "rejected": "bad"}, "missing field 'chosen'"),
    ({"prompt": "q", "chosen": "good", "rejected": "  "}, "field 'rejected' is empty"),
    ({"prompt": "", "chosen": "good", "rejected": "bad"}, "field 'prompt' is empty"),
    ({"prompt": "q", "chosen": [], "rejected": "bad"}, "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "bad"}, "field 'chosen' must be a string or a list of messages, got int"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": USER_Q, "chosen": USER_Q + assistant("a"), "rejected": assistant("a")}, "chosen and rejected are identical"),
    ({"chosen": "good", "rejected": "bad"}, "missing field 'prompt' (it may be left out only when chosen and "
                                            "rejected are both lists of messages that start with the prompt)"),
    ({"chosen": assistant("good"), "rejected": assistant("bad")},
     "chosen and rejected share no leading turns to use as the prompt; add a 'prompt' field"),
    ({"chosen": USER_Q, "rejected": USER_Q + assistant("bad")}, "field 'chosen' has no turns after the prompt"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": " "}], "rejected": "bad"},
     "prompt + chosen: message 2 (assistant): empty content"),
    ({"prompt": USER_Q, "chosen": [{"role": "bot", "content": "x"}], "rejected": "bad"},
     "prompt + chosen: message 2: unknown role 'bot' (expected one of system, user, assistant, tool)"),
    ({"prompt": USER_Q + assistant("a"), "chosen": assistant("good"), "rejected": "bad"},
     "prompt + chosen: two assistant turns in a row: turns must alternate user/assistant"),
    ({"prompt": USER_Q + assistant("a"), "chosen": [{"role": "user", "content": "u"}] + assistant("g"), "rejected": "bad"},
     "field 'chosen': the response after the prompt must start with an assistant turn, got user"),
])
def test_preference_bad_records(tmp_path, record, reason):
    assert second_is_bad(tmp_path, PREFERENCE, record) == reason


def test_kto(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [KTO, {"prompt": USER_Q, "completion": assistant("no"), "label": False}])
    first, second = records(path)
    assert (first.kind, first.prompt, first.completion, first.label) == ("kto", "q", "a", True)
    assert (second.prompt, second.completion, second.label) == (USER_Q, assistant("no"), False)


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "completion": "a", "label": "true"}, 'label must be true or false, got "true"'),
    ({"prompt": "q", "completion": "a", "label": 1}, "label must be true or false, got 1"),
    ({"prompt": "q", "completion": "a", "label": None}, "label must be true or false, got null"),
    ({"prompt": "q", "completion": "a"}, "missing field 'label'"),
    ({"prompt": "q", "completion": " ", "label": True}, "field 'completion' is empty"),
    ({"completion": "a", "label": True}, "missing field 'prompt'"),
])
def test_kto_bad_records(tmp_path, record, reason):
    assert second_is_bad(tmp_path, KTO, record) == reason


def test_label_makes_prompt_completion_kto(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [KTO])
    assert records(path)[0].kind == "kto"
    assert records(path, "completion")[0].kind == "completion"  # format: completion ignores the label


def test_triplet(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [TRIPLET, {"query": "q", "positive": "p", "negative": ["n1", "n2"]}])
    first, second = records(path)
    assert (first.kind, first.query, first.positive, first.negative) == ("triplet", "q", "p", "n")
    assert second.negative == ["n1", "n2"]


@pytest.mark.parametrize("record, reason", [
    ({"query": "q", "negative": "n"}, "missing field 'positive'"),
    ({"query": "", "positive": "p", "negative": "n"}, "field 'query' is empty"),
    ({"query": "q", "positive": "p", "negative": []}, "field 'negative' is empty"),
    ({"query": "q", "positive": "p", "negative": ["n", 2]}, "negative 2 must be a string, got int"),
    ({"query": "q", "positive": "p", "negative": ["n", " "]}, "negative 2 is empty"),
    ({"query": "q", "positive": "p", "negative": {"n": 1}},
     "field 'negative' must be a string or a list of strings, got dict"),
    ({"query": "q", "positive": "p", "negative": ["n", "p"]}, "the positive is also a negative"),
])
def test_triplet_bad_records(tmp_path, record, reason):
    assert second_is_bad(tmp_path, TRIPLET, record) == reason


@pytest.mark.parametrize("record, fmt", [
    (PREFERENCE, "preference"),
    ({"chosen": USER_Q + assistant("g"), "rejected": USER_Q + assistant("b")}, "preference"),
    (KTO, "kto"),
    (TRIPLET, "triplet"),
    ({"messages": chat("q", "a")["messages"], "chosen": "x", "rejected": "y"}, "chat"),  # messages wins
])
def test_new_formats_are_detected(tmp_path, record, fmt):
    [rec] = records(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert rec.kind == fmt


def test_undetectable_format_lists_the_new_formats(tmp_path):
    with pytest.raises(DataError, match="preference, kto, triplet"):
        records(write_jsonl(tmp_path / "d.jsonl", [{"question": "q"}]))


# --- tool calls in messages -----------------------------------------------------------------

CALL = {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}


def tool_chat(call_msg, tool_msg=None):
    return {"messages": [{"role": "user", "content": "weather?"}, call_msg,
                         tool_msg or {"role": "tool", "content": "sunny", "tool_call_id": "1"},
                         {"role": "assistant", "content": "It is sunny."}]}


def test_tool_calls_are_kept_in_messages(tmp_path):
    record = tool_chat({"role": "assistant", "content": "", "tool_calls": [CALL]})
    [rec] = records(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert rec.messages == record["messages"]


@pytest.mark.parametrize("call_msg, tool_msg, reason", [
    ({"role": "assistant", "content": None, "tool_calls": CALL}, None,
     "message 2 (assistant): tool_calls must be a list, got dict"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}, None,
     'message 2 (assistant): tool call 1 needs function.name, as in {"type": "function", "function": '
     '{"name": ..., "arguments": ...}}'),
    ({"role": "assistant", "content": None, "tool_calls": [CALL, "weather"]}, None,
     "message 2 (assistant): tool call 2 needs function.name, as in "
     '{"type": "function", "function": {"name": ..., "arguments": ...}}'),
    ({"role": "assistant", "content": None, "tool_calls": []}, None,
     "message 2 (assistant): content must be a string, got NoneType"),
    ({"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": ""},
     "message 3 (tool): empty content"),
    ({"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "x", "tool_calls": [CALL]},
     "message 3 (tool): only assistant messages may carry tool_calls"),
])
def test_bad_tool_calls(tmp_path, call_msg, tool_msg, reason):
    assert only_bad(tmp_path, tool_chat(call_msg, tool_msg)) == reason
