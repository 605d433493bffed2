"""A tokenizer read from a folder's tokenizer.json by the `tokenizers` library alone, for plan's token counts.

Importing transformers costs 1-1.6 s of a cold `tuneforge plan` on a 2-core machine, yet counting
tokens needs only the Rust tokenizer, the special tokens and the chat template. FileTokenizer offers
the part of a transformers tokenizer that data.template and data.dataset read, and renders chat
templates as transformers' apply_chat_template does (a sandboxed Jinja environment with the same
options and helpers, the special tokens as variables), so plan counts what training will count
(tests/test_plan_tokenizer.py compares the two on chat and text data).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from tuneforge.data.template import resolve_chat_template

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
REASONING = ("reasoning_content", "thinking", "reasoning")  # names a turn's reasoning goes by in templates


def _text(token) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict with its `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _raise(message: str):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled in the environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _with_reasoning_aliases(messages: list[dict]) -> list[dict]:
    """A turn's reasoning under each name templates read it by, as transformers passes it."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


class FileTokenizer:
    """tokenizer.json plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, backend: Tokenizer, config: dict, chat_template: str | None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.special_tokens_map = {k: t for k in SPECIAL_TOKENS if (t := _text(config.get(k))) is not None}
        for key in SPECIAL_TOKENS:
            setattr(self, key, self.special_tokens_map.get(key))
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.all_special_tokens = list(dict.fromkeys(self.special_tokens_map.values()))

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend_tokenizer.get_added_tokens_decoder().items()}

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.backend_tokenizer.encode(text, add_special_tokens=True).ids)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The rendered text (tokenize=False only: the callers here tokenize span by span)."""
        assert not tokenize, "FileTokenizer renders text; encode it with backend_tokenizer"
        template = _compiled(self.chat_template)
        return template.render(messages=_with_reasoning_aliases(messages), tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **self.special_tokens_map)


def file_tokenizer(folder: Path, chat_template: str = "auto") -> FileTokenizer | None:
    """The folder's tokenizer without transformers, or None when it needs transformers' own classes
    (no tokenizer.json, named chat templates, BOS/EOS that transformers adds beyond tokenizer.json's own)."""
    path = folder / "tokenizer.json"
    config_path = folder / "tokenizer_config.json"
    if not path.is_file() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
        backend = Tokenizer.from_file(str(path))
    except Exception:  # anything odd: transformers reads the folder and says what is wrong
        return None
    template = config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    if template is not None and not isinstance(template, str):  # named templates: transformers picks one
        return None
    tokenizer = FileTokenizer(backend, config, template)
    ids = tokenizer("a").input_ids
    if ((config.get("add_bos_token") and ids[:1] != [tokenizer.bos_token_id])
            or (config.get("add_eos_token") and ids[-1:] != [tokenizer.eos_token_id])):
        return None  # transformers adds these itself (its post-processor, rebuilt at load): let it
    if chat_template != "auto" or tokenizer.chat_template:
        tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # as models.load.load_tokenizer does
        tokenizer.pad_token = tokenizer.special_tokens_map["pad_token"] = tokenizer.eos_token
    return tokenizer
