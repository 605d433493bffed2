"""Turn each record of a training file into a common form, with its file and line.

Formats: messages (OpenAI chat fine-tuning, tool calls included), sharegpt, alpaca, completion,
text, and for preference methods preference (prompt/chosen/rejected, or OpenAI's input.messages/
preferred_output/non_preferred_output), kto (prompt/completion/label)
and triplet (query/positive/negative), and for online methods prompt (a prompt plus any fields the
reward functions read). A record that cannot be used raises `BadRecord` with the
reason; the caller decides whether that stops the run or goes to rejected.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tuneforge.data.readers import BadRecord, iter_rows
from tuneforge.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "completion", "text", "preference", "kto", "triplet", "prompt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "tool": "tool", "observation": "tool", "function_response": "tool",
}
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id")
TOOL_CALL_SHAPE = '{"type": "function", "function": {"name": ..., "arguments": ...}}'


@dataclass
class Record:
    """One example in common form. `kind` is chat, completion, text, preference, kto, triplet or prompt.

    preference and kto keep the prompt apart from the responses: `chosen`, `rejected` and a kto
    `completion` hold only what follows the prompt, each as text or as a list of messages.
    """

    source: str
    line: int
    kind: str
    messages: list[dict] = field(default_factory=list)
    prompt: str | list[dict] = ""
    completion: str | list[dict] = ""
    text: str = ""
    raw: object = None
    chosen: str | list[dict] = ""
    rejected: str | list[dict] = ""
    label: bool | None = None
    query: str = ""
    positive: str = ""
    negative: str | list[str] = ""
    fields: dict = field(default_factory=dict)  # a prompt record's other columns, for reward functions

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


iter_raw = iter_rows  # the earlier name of the reader


def detect_format(obj: object) -> str | None:
    """The format a record's keys declare; the more specific shape wins (kto before completion)."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if ("chosen" in obj and "rejected" in obj) or ("preferred_output" in obj and "non_preferred_output" in obj):
        return "preference"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "kto" if "label" in obj else "completion"
    if "query" in obj and "positive" in obj and "negative" in obj:
        return "triplet"
    if "text" in obj:
        return "text"
    if "prompt" in obj:
        return "prompt"
    return None


def _string(obj: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def _prepend_system(rec: Record, obj: dict) -> None:
    """sharegpt and alpaca may carry the system prompt as a top-level field."""
    system = obj.get("system")
    if system is None or system == "":
        return
    if not isinstance(system, str):
        raise BadRecord(f"field 'system' must be a string, got {type(system).__name__}")
    if system.strip():
        rec.messages.insert(0, {"role": "system", "content": system})


def _keep_message_keys(messages: list) -> list:
    """Only the keys a chat template reads; extras such as per-turn weights are dropped."""
    return [{k: v for k, v in m.items() if k in MESSAGE_KEYS} if isinstance(m, dict) else m for m in messages]


def _check_tool_calls(i: int, role: str, calls: object) -> None:
    if role != "assistant":
        raise BadRecord(f"message {i} ({role}): only assistant messages may carry tool_calls")
    if not isinstance(calls, list):
        raise BadRecord(f"message {i} (assistant): tool_calls must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls, 1):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise BadRecord(f"message {i} (assistant): tool call {j} needs function.name, as in {TOOL_CALL_SHAPE}")


def check_turns(messages: list[dict], need_answer: bool = True) -> None:
    """Roles known, contents non-empty strings, tool calls well formed, turns in a trainable order (R-DATA-5).

    `need_answer`: there must be an assistant turn to train on (not so for a prompt the model answers).
    """
    if not messages:
        raise BadRecord("no messages")
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            raise BadRecord(f"message {i} is not an object")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRecord(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        calls = msg.get("tool_calls")
        if calls is not None and calls != []:  # Arrow and some exporters give every turn an empty list
            _check_tool_calls(i, role, calls)
        content = msg.get("content")
        if role == "assistant" and calls and content in (None, ""):
            continue
        if not isinstance(content, str):
            raise BadRecord(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRecord(f"message {i} ({role}): empty content")
        if role == "system" and i != 1:
            raise BadRecord(f"message {i}: a system message may only come first")
    chat = [m["role"] for m in messages if m["role"] != "system"]
    if need_answer and "assistant" not in chat:
        raise BadRecord("no assistant turn to train on")
    if chat[0] != "user":
        raise BadRecord(f"the first turn after the system prompt must be user, got {chat[0]}")
    for prev, cur in zip(chat, chat[1:]):
        if prev == cur and cur != "tool":
            raise BadRecord(f"two {cur} turns in a row: turns must alternate user/assistant")


def _text_or_messages(obj: dict, key: str) -> str | list[dict]:
    if obj.get(key) is None:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"field {key!r} is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"field {key!r} is empty")
        return _keep_message_keys(value)
    raise BadRecord(f"field {key!r} must be a string or a list of messages, got {type(value).__name__}")


def as_messages(value: str | list[dict], role: str) -> list[dict]:
    """Text as one turn of `role`; a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _response(prompt: str | list[dict], value: str | list[dict], key: str) -> str | list[dict]:
    """What `key` says after the prompt, checked as one conversation with it.

    A list that repeats the prompt (prompt + answer, as many preference sets store it) loses the repeat.
    """
    if isinstance(prompt, list) and isinstance(value, list) and value[: len(prompt)] == prompt:
        value = value[len(prompt):]
        if not value:
            raise BadRecord(f"field {key!r} has no turns after the prompt")
    try:
        check_turns(as_messages(prompt, "user") + as_messages(value, "assistant"))
    except BadRecord as err:
        raise BadRecord(f"prompt + {key}: {err}") from None
    first = as_messages(value, "assistant")[0]["role"]
    if first != "assistant":
        raise BadRecord(f"field {key!r}: the response after the prompt must start with an assistant turn, got {first}")
    return value


def _shared_turns(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def openai_preference(obj: dict) -> dict:
    """OpenAI's preference fine-tuning record ({"input": {"messages": [...]}, "preferred_output": [...],
    "non_preferred_output": [...]}) as prompt/chosen/rejected; any other record as it is."""
    if "preferred_output" not in obj:
        return obj
    given = obj.get("input")
    if not isinstance(given, dict) or "messages" not in given:
        raise BadRecord("field 'input' must be an object with 'messages' (OpenAI's preference format)")
    return {"prompt": given["messages"], "chosen": obj["preferred_output"], "rejected": obj.get("non_preferred_output")}


def _preference(obj: dict, rec: Record) -> None:
    obj = openai_preference(obj)
    chosen, rejected = _text_or_messages(obj, "chosen"), _text_or_messages(obj, "rejected")
    if as_messages(chosen, "assistant") == as_messages(rejected, "assistant"):
        raise BadRecord("chosen and rejected are identical")
    if obj.get("prompt") in (None, "") and isinstance(chosen, list) and isinstance(rejected, list):
        # Full conversations: the turns both share are the prompt.
        n = _shared_turns(chosen, rejected)
        if n == 0:
            raise BadRecord("chosen and rejected share no leading turns to use as the prompt; add a 'prompt' field")
        prompt = chosen[:n]
    elif "prompt" not in obj:
        raise BadRecord("missing field 'prompt' (it may be left out only when chosen and rejected are "
                        "both lists of messages that start with the prompt)")
    else:
        prompt = _text_or_messages(obj, "prompt")
    rec.prompt = prompt
    rec.chosen = _response(prompt, chosen, "chosen")
    rec.rejected = _response(prompt, rejected, "rejected")
    if as_messages(rec.chosen, "assistant") == as_messages(rec.rejected, "assistant"):
        raise BadRecord("chosen and rejected are identical")


def _show(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _kto(obj: dict, rec: Record) -> None:
    rec.prompt = _text_or_messages(obj, "prompt")
    completion = _text_or_messages(obj, "completion")
    if "label" not in obj:
        raise BadRecord("missing field 'label'")
    if not isinstance(obj["label"], bool):
        raise BadRecord(f"label must be true or false, got {_show(obj['label'])}")
    rec.label = obj["label"]
    rec.completion = _response(rec.prompt, completion, "completion")


def _triplet(obj: dict, rec: Record) -> None:
    rec.query = _string(obj, "query")
    rec.positive = _string(obj, "positive")
    negative = obj.get("negative")
    if isinstance(negative, list):
        if not negative:
            raise BadRecord("field 'negative' is empty")
        for i, text in enumerate(negative, 1):
            if not isinstance(text, str):
                raise BadRecord(f"negative {i} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise BadRecord(f"negative {i} is empty")
    elif negative is None or isinstance(negative, str):
        negative = _string(obj, "negative")
    else:
        raise BadRecord(f"field 'negative' must be a string or a list of strings, got {type(negative).__name__}")
    if rec.positive in ([negative] if isinstance(negative, str) else negative):
        raise BadRecord("the positive is also a negative")
    rec.negative = negative


def to_record(obj: object, fmt: str, source: str, line: int) -> Record:
    """Convert one parsed object of format `fmt`; raises BadRecord with the reason."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    rec = Record(source=source, line=line, kind="chat", raw=obj)
    if fmt == "messages":
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            raise BadRecord("field 'messages' must be a list")
        rec.messages = _keep_message_keys(msgs)
    elif fmt == "sharegpt":
        conv = obj.get("conversations")
        if not isinstance(conv, list):
            raise BadRecord("field 'conversations' must be a list")
        for i, turn in enumerate(conv, 1):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadRecord(f"conversation turn {i} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise BadRecord(f"turn {i}: unknown speaker {turn['from']!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
            rec.messages.append({"role": role, "content": turn["value"]})
        _prepend_system(rec, obj)
    elif fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord(f"field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        rec.messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(obj, "output")}]
        _prepend_system(rec, obj)
    elif fmt == "completion":
        rec.kind = "completion"
        rec.prompt = _string(obj, "prompt", allow_empty=True)
        rec.completion = _string(obj, "completion")
        return rec
    elif fmt == "text":
        rec.kind = "text"
        rec.text = _string(obj, "text")
        return rec
    elif fmt == "prompt":
        # Online methods (GRPO): the model writes the answer; other fields go to the reward functions.
        rec.kind = "prompt"
        rec.prompt = _text_or_messages(obj, "prompt")
        rec.fields = {k: v for k, v in obj.items() if k != "prompt"}
        check_turns(as_messages(rec.prompt, "user"), need_answer=False)
        if as_messages(rec.prompt, "user")[-1]["role"] == "assistant":
            raise BadRecord("the prompt ends with an assistant turn; it must end where the model is to answer")
        return rec
    elif fmt in ("preference", "kto", "triplet"):
        rec.kind = fmt
        {"preference": _preference, "kto": _kto, "triplet": _triplet}[fmt](obj, rec)
        return rec
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    check_turns(rec.messages)
    return rec


def apply_mapping(obj: object, columns: dict[str, str], roles: dict[str, str]) -> object:
    """Rename the file's columns to ours and its role names to ours (merged over the format's own)."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for ours, theirs in columns.items():
        if theirs in out:
            out[ours] = out.pop(theirs)
    if roles:
        for key, role_key in (("messages", "role"), ("conversations", "from")):
            turns = out.get(key)
            if isinstance(turns, list):
                out[key] = [{**t, role_key: roles.get(t.get(role_key), t.get(role_key))} if isinstance(t, dict) else t
                            for t in turns]
    return out


def read_records(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                 roles: dict[str, str] | None = None, advance: Callable[[int], None] = lambda n: None,
                 ) -> Iterator[Record | tuple[str, int, object, BadRecord]]:
    """Every record of a file: a Record, or (file, line, raw, BadRecord) for one that cannot be used.

    `columns` maps our field names to the file's ({"messages": "dialog"}); a mapped column that the
    first record lacks is an error naming both. `roles` maps the file's role names to ours.
    `advance(n)` hears of the file's bytes as they are read (see iter_rows).
    """
    source = str(path)
    columns, roles = columns or {}, roles or {}
    checked = not columns
    for line, obj in iter_rows(path, advance):
        if not checked and isinstance(obj, dict):
            absent = [f"{theirs} (for {ours})" for ours, theirs in columns.items() if theirs not in obj]
            if absent:
                raise DataError(f"{source}:{line}: mapped column {', '.join(absent)} is not in the file "
                                f"(its columns: {', '.join(obj)}); fix `columns:` for this dataset")
            checked = True
        obj = apply_mapping(obj, columns, roles)
        if fmt == "auto":
            detected = detect_format(obj)
            if detected is None:
                if isinstance(obj, BadRecord):
                    yield source, line, None, obj
                    continue
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"{source}:{line}: cannot tell the data format from this record (keys: {keys}); "
                    f"set `format:` for this dataset to one of {', '.join(FORMATS)}"
                )
            fmt = detected
        try:
            yield to_record(obj, fmt, source, line)
        except BadRecord as bad:
            yield source, line, None if isinstance(obj, BadRecord) else obj, bad
