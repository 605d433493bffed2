"""An Ollama Modelfile whose TEMPLATE and stop tokens match the chat template the model was trained with.

Ollama does not run Jinja, so the template is rebuilt as Go template text from the Jinja template's
own output: each role's text before and after the content, the default system block if the template
inserts one, and the generation prompt. `render_turns` renders that same structure in Python, which
is how the tests hold it to the Jinja template byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.errors import ModelError

_X = "\u2063X\u2063"  # a content sentinel no template changes


@dataclass
class TurnFormat:
    default_system: str  # written before the first turn when the conversation has no system message
    wrap: dict[str, tuple[str, str]]  # role -> (text before content, text after)
    generation: str  # the assistant header that asks for a reply


def _render(tokenizer, messages, gen=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _around(text: str) -> tuple[str, str]:
    before, sep, after = text.partition(_X)
    if not sep:
        raise ModelError("Ollama export: the chat template changes message contents, so its TEMPLATE cannot be derived")
    return before, after


def turn_format(tokenizer) -> TurnFormat:
    """Each role's wrapping, read off the Jinja template's output."""
    sys_before, sys_after = _around(_render(tokenizer, [{"role": "system", "content": _X}]))
    system_block = sys_before + _X + sys_after
    with_system = _render(tokenizer, [{"role": "system", "content": _X}, {"role": "user", "content": _X}])
    user_before, user_after = _around(with_system[len(system_block):])
    alone = _render(tokenizer, [{"role": "user", "content": _X}])
    default_system = alone[: len(alone) - len(user_before + _X + user_after)]
    user_turn = [{"role": "user", "content": "Hi"}]
    base = _render(tokenizer, user_turn)
    asst_before, asst_after = _around(_render(tokenizer, user_turn + [{"role": "assistant", "content": _X}])[len(base):])
    generation = _render(tokenizer, user_turn, gen=True)[len(base):]
    return TurnFormat(default_system, {"system": (sys_before, sys_after), "user": (user_before, user_after),
                                       "assistant": (asst_before, asst_after)}, generation)


def render_turns(fmt: TurnFormat, messages: list[dict], add_generation_prompt: bool) -> str:
    """What the Go template below produces for these messages."""
    out = fmt.default_system if messages and messages[0]["role"] != "system" else ""
    for m in messages:
        before, after = fmt.wrap[m["role"]]
        out += before + m["content"] + after
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out += fmt.generation
    return out


def _go(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise ModelError("Ollama export: the chat template's text contains '{{', which a Go template cannot hold as text")
    return text


def go_template(fmt: TurnFormat) -> str:
    """The Ollama TEMPLATE for this turn format."""
    parts = []
    if fmt.default_system:
        parts.append('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                     + _go(fmt.default_system) + "{{ end }}")
    parts.append("{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    for k, role in enumerate(("system", "user", "assistant")):
        before, after = fmt.wrap[role]
        keyword = "if" if k == 0 else "else if"
        parts.append(f'{{{{- {keyword} eq .Role "{role}" }}}}{_go(before)}{{{{ .Content }}}}{_go(after)}')
    parts.append("{{- end }}")
    parts.append('{{- if and $last (ne .Role "assistant") }}' + _go(fmt.generation) + "{{ end }}")
    parts.append("{{- end }}")
    return "".join(parts)


def modelfile(gguf_name: str, tokenizer, stop_tokens: list[str], system: str | None = None,
              params: dict | None = None) -> str:
    fmt = turn_format(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(fmt)}"""']
    for tok in stop_tokens:
        lines.append(f'PARAMETER stop "{tok}"')
    for key, value in (params or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
