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
    # Templates without a system block (Gemma, Mistral v0.1) leave "system" out of wrap; Gemma's
    # folds the system text into the first user turn, followed by this separator.
    system_fold: str | None = None


def _render(tokenizer, messages, gen=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _around(text: str, sentinel: str = _X) -> tuple[str, str]:
    before, sep, after = text.partition(sentinel)
    if not sep:
        raise ModelError("Ollama export: the chat template changes message contents, so its TEMPLATE cannot be derived")
    return before, after


def _after(longer: str, prefix: str) -> str:
    if not longer.startswith(prefix):
        raise ModelError("Ollama export: the chat template renders earlier turns differently once a turn is added, "
                         "so its TEMPLATE cannot be derived")
    return longer[len(prefix):]


def _system_only(tokenizer) -> str | None:
    """The template's output for a lone system message, or None when it has no system block of its own."""
    from jinja2 import TemplateError

    try:
        text = _render(tokenizer, [{"role": "system", "content": _X}])
    except TemplateError:
        return None
    return text if _X in text else None


def turn_format(tokenizer) -> TurnFormat:
    """Each role's wrapping, read off the Jinja template's output."""
    sys_only = _system_only(tokenizer)
    if sys_only is None:
        return _turn_format_without_system_block(tokenizer)
    sys_before, sys_after = _around(sys_only)
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


def _turn_format_without_system_block(tokenizer) -> TurnFormat:
    """Templates that render no system block: the turns are read off a user/assistant/user conversation.

    A system message is then either folded into the first user turn (Gemma: system text and a
    separator before the user's) or refused by the template (Mistral v0.1).
    """
    from jinja2 import TemplateError

    user, answer = {"role": "user", "content": _X}, {"role": "assistant", "content": _X}
    one = _render(tokenizer, [user])
    two = _render(tokenizer, [user, answer])
    three = _render(tokenizer, [user, answer, user])
    asst_before, asst_after = _around(_after(two, one))
    user_before, user_after = _around(_after(three, two))
    turn = user_before + _X + user_after
    if not one.endswith(turn):
        raise ModelError("Ollama export: the chat template renders the first user turn unlike later ones, "
                         "so its TEMPLATE cannot be derived")
    prefix = one[: len(one) - len(turn)]
    generation = _after(_render(tokenizer, [user], gen=True), one)
    fold = None
    system_text = "\u2063S\u2063"
    try:
        folded = _render(tokenizer, [{"role": "system", "content": system_text}, user])
    except TemplateError:
        folded = None
    if folded is not None:
        head = prefix + user_before + system_text
        if not (folded.startswith(head) and folded.endswith(_X + user_after)):
            raise ModelError("Ollama export: the chat template places the system message where a Modelfile "
                             "TEMPLATE cannot reproduce it")
        fold = folded[len(head): len(folded) - len(_X + user_after)]
    return TurnFormat(prefix, {"user": (user_before, user_after), "assistant": (asst_before, asst_after)},
                      generation, fold)


def render_turns(fmt: TurnFormat, messages: list[dict], add_generation_prompt: bool) -> str:
    """What the Go template below produces for these messages."""
    has_block = "system" in fmt.wrap
    out = fmt.default_system if messages and (messages[0]["role"] != "system" or not has_block) else ""
    pending = ""  # a folded system message waiting for the next user turn
    for m in messages:
        if m["role"] == "system" and not has_block:
            if fmt.system_fold is None:
                raise ModelError("the chat template has no system role")
            pending = m["content"] + fmt.system_fold
            continue
        before, after = fmt.wrap[m["role"]]
        content = pending + m["content"] if m["role"] == "user" else m["content"]
        pending = "" if m["role"] == "user" else pending
        out += before + content + after
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out += fmt.generation
    return out


def _go(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise ModelError("Ollama export: the chat template's text contains '{{', which a Go template cannot hold as text")
    return text


def go_template(fmt: TurnFormat) -> str:
    """The Ollama TEMPLATE for this turn format.

    No action uses Go's "{{-" trimming: it would eat the newline that ends many templates' turns.
    """
    if "system" not in fmt.wrap:
        return _go_template_without_system_block(fmt)
    parts = []
    if fmt.default_system:
        parts.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                     + _go(fmt.default_system) + "{{ end }}")
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    for k, role in enumerate(("system", "user", "assistant")):
        before, after = fmt.wrap[role]
        keyword = "if" if k == 0 else "else if"
        parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go(before)}{{{{ .Content }}}}{_go(after)}')
    parts.append("{{ end }}")
    parts.append('{{ if and $last (ne .Role "assistant") }}' + _go(fmt.generation) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def _go_template_without_system_block(fmt: TurnFormat) -> str:
    """Gemma-style: a system message is held in $system (with its separator) and written into the next user turn."""
    if fmt.system_fold is not None and "`" in fmt.system_fold:
        raise ModelError("Ollama export: the system separator contains a backquote, which a Go raw string cannot hold")
    (user_before, user_after), (asst_before, asst_after) = fmt.wrap["user"], fmt.wrap["assistant"]
    parts = ['{{ $system := "" }}' + _go(fmt.default_system)]
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if fmt.system_fold is not None:
        parts.append(f'{{{{ if eq .Role "system" }}}}{{{{ $system = print .Content `{fmt.system_fold}` }}}}')
        parts.append(f'{{{{ else if eq .Role "user" }}}}{_go(user_before)}{{{{ $system }}}}{{{{ $system = "" }}}}'
                     f'{{{{ .Content }}}}{_go(user_after)}')
    else:  # no system role: a system message (Ollama's SYSTEM included) is left out, as the template refuses it
        parts.append(f'{{{{ if eq .Role "user" }}}}{_go(user_before)}{{{{ .Content }}}}{_go(user_after)}')
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{_go(asst_before)}{{{{ .Content }}}}{_go(asst_after)}')
    parts.append("{{ end }}")
    parts.append('{{ if and $last (ne .Role "assistant") }}' + _go(fmt.generation) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def modelfile(gguf_name: str, tokenizer, stop_tokens: list[str], system: str | None = None,
              params: dict | None = None) -> str:
    """The Modelfile: FROM the GGUF, the TEMPLATE, a stop parameter per end-of-turn token, and SYSTEM if given."""
    fmt = turn_format(tokenizer)
    if system and "system" not in fmt.wrap and fmt.system_fold is None:
        raise ModelError("--system: the model's chat template has no system role (it refuses system messages), "
                         "so Ollama would drop the SYSTEM line; leave --system out")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(fmt)}"""']
    for tok in stop_tokens:
        lines.append(f'PARAMETER stop "{tok}"')
    for key, value in (params or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
