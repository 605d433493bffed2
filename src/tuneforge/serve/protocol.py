"""The OpenAI wire format: request bodies checked into small dataclasses, and the response and chunk bodies.

Pure functions only, so every rule a client can trip over is tested without a model or a socket.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from dataclasses import dataclass

from tuneforge.models.decode import Sampling

ROLES = {"system", "user", "assistant", "developer"}  # developer is OpenAI's newer name for system

# Fields we cannot honour; a request that sets one to anything else gets a 400 instead of a silent ignore.
UNSUPPORTED = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class ApiError(Exception):
    """A request the server refuses; becomes {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}  # sent with the error, e.g. Retry-After or Allow

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    model: str | None
    sampling: Sampling
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions


def lone_surrogate(body: dict) -> str | None:
    """Where in a parsed body a string (or key) holds half of a UTF-16 surrogate pair, e.g. "\\ud800";
    JSON allows the escape, but it is not text, and tokenizers and encoders fail on it."""
    todo: list[tuple[str, object]] = [("", body)]
    while todo:  # a loop, not recursion: the body may be nested a thousand deep
        where, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                path = key.encode("utf-8", "backslashreplace").decode()  # printable even when it is the culprit
                path = f"{where}.{path}" if where else path
                todo += [(path, key), (path, item)]
        elif isinstance(value, list):
            todo += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    return None


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        raise _bad(key, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"must be an integer, got {type(value).__name__}")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "must be a non-empty string or a list of non-empty strings")
    return stops


def parse_sampling(body: dict) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key)
    if max_tokens is not None and max_tokens <= 0:
        raise _bad(key, f"must be at least 1, got {max_tokens}")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_int(body, "seed"),
        stop=_stop(body),
    )


def _common(body: dict) -> tuple[str | None, Sampling, bool, bool]:
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise _bad(key, "is not supported by tuneforge serve; leave it out "
                       "(vLLM serves the exported folder with it)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"must be a string, got {type(model).__name__}")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise _bad("n", f"only n=1 is supported, got {n}; send n requests instead")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {type(stream).__name__}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", 'must be an object like {"include_usage": true}')
    return model, parse_sampling(body), stream, bool(options.get("include_usage"))


def _content(i: int, content) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(where, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(where, f"must be a string or a list of text parts, got {type(content).__name__}")


def parse_messages(messages) -> list[dict]:
    if messages is None:
        raise _bad("messages", "is required: a list of {\"role\", \"content\"} objects")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}]", f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}, got {role!r}")
        out.append({"role": "system" if role == "developer" else role, "content": _content(i, msg.get("content"))})
    return out


def parse_chat(body: dict) -> Request:
    model, sampling, stream, usage = _common(body)
    return Request(model, sampling, stream, usage, messages=parse_messages(body.get("messages")))


def parse_completion(body: dict) -> Request:
    model, sampling, stream, usage = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "is required and must be a string (one prompt per request)")
    return Request(model, sampling, stream, usage, prompt=prompt)


MAX_TOP_LOGPROBS = 5  # OpenAI's limit for the legacy completions API


@dataclass
class Scoring:
    """A completions request that asks for log-probabilities (lm-eval's log-likelihood requests): each prompt's
    tokens scored in one forward pass (`echo`), then at most one greedy token."""

    model: str | None
    prompts: list  # each a string or a list of token ids
    echo: bool
    top: int  # top log-probs listed per position (0: none)
    max_tokens: int  # 0 or 1


def _prompts(value) -> list:
    """A string, a list of token ids, or a list of either (a batch)."""
    def one(v) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and bool(v) and
                                      all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v))
    if one(value):
        return [value]
    if isinstance(value, list) and value and all(one(v) for v in value):
        return value
    raise _bad("prompt", "must be a string, a list of token ids, or a non-empty list of either")


def parse_scoring(body: dict) -> Scoring | None:
    """The scoring request in `body`, or None when it asks for neither `echo` nor `logprobs` (plain generation)."""
    echo, top = body.get("echo"), body.get("logprobs")
    if echo in (None, False) and top in (None, False, 0):
        return None
    if not isinstance(echo, (bool, type(None))):
        raise _bad("echo", f"must be true or false, got {type(echo).__name__}")
    top = 0 if top in (None, False) else top
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _bad("logprobs", f"must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    max_tokens = body.get("max_tokens", 1 if not echo else 0)
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise _bad("max_tokens", f"with echo or logprobs only 0 or 1 (a greedy token) is supported, got {max_tokens!r}")
    if body.get("stream"):
        raise _bad("stream", "is not supported with echo or logprobs; send stream: false")
    rest = {k: v for k, v in body.items() if k not in ("echo", "logprobs", "max_tokens", "prompt")}
    model, _, _, _ = _common(rest)
    return Scoring(model, _prompts(body.get("prompt")), bool(echo), top, max_tokens)


def scoring_choice(index: int, tokens: list[str], logprobs: list[float | None], tops: list[dict | None],
                   echoed: int) -> dict:
    """One choice in OpenAI's legacy logprobs shape; `echoed` of the tokens are the prompt's own."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    finish = "length" if len(tokens) > echoed else "stop"
    return {"index": index, "text": "".join(tokens), "finish_reason": finish,
            "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, counts: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": counts}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}


def completion_response(rid: str, model: str, text: str, finish: str | None, counts: dict | None = None) -> dict:
    """The whole completion, or (counts None) one streamed chunk of it."""
    return completion_choices(rid, model, [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                              counts)


def completion_choices(rid: str, model: str, choices: list[dict], counts: dict | None = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if counts is not None:
        body["usage"] = counts
    return body


def usage_chunk(rid: str, model: str, obj: str, counts: dict) -> dict:
    """The last chunk of a stream when stream_options.include_usage is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": counts}


def models_list(ids: list[str]) -> dict:
    return {"object": "list", "data": [model_card(i) for i in ids]}


def model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tuneforge"}


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on the texts of one request


def parse_embeddings(body: dict) -> tuple[str | None, list[str], str]:
    """(model, texts, encoding_format) of a POST /v1/embeddings body: `input` a string or a list of strings."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or len(texts) > MAX_EMBEDDING_INPUTS:
        raise _bad("input", f"must be a string or a list of 1 to {MAX_EMBEDDING_INPUTS} strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise _bad(f"input[{i}]", "must be a non-empty string (token arrays are not accepted; send the text)")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format", f"{fmt!r}: expected float or base64")
    if body.get("dimensions") is not None:
        raise _bad("dimensions", "this model's vectors have one size; leave dimensions out")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string")
    return model, texts, fmt


def embeddings_response(model: str, vectors: list[list[float]], tokens: int, encoding_format: str = "float") -> dict:
    """OpenAI's embeddings list; base64 is the little-endian float32 bytes, as the openai client decodes them."""
    def encoded(vector: list[float]):
        if encoding_format == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
