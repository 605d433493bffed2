"""Chat templates and label masks (R-MASK-1, R-MASK-2, R-EOS-1, R-SYS-1, R-FEAT-3).

Every check runs on three real-world template styles (the built-in SmolLM2 ChatML template with a
default system prompt, a Qwen2.5-style one with <tool_response> turns, a Llama-3-style one with header
tokens and <|eot_id|>) and on the two bundled templates.
"""

from __future__ import annotations

import pytest

from conftest import QWEN_TEMPLATE, make_tokenizer
from tuneforge.data.batching import collate
from tuneforge.data.preview import TRAINED_CLOSE, TRAINED_OPEN, preview_plain
from tuneforge.data.template import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    encode_conversation,
    find_end_of_turn,
    generation_prompt,
    resolve_chat_template,
)
from tuneforge.errors import ConfigError, DataError

STYLES = ["smol", "qwen", "llama3", "builtin-chatml", "builtin-llama3"]
EOT = {
    "smol": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>",
    "builtin-chatml": "<|im_end|>", "builtin-llama3": "<|eot_id|>",
}
HEADERS = {
    "smol": ["<|im_start|>"], "qwen": ["<|im_start|>"], "builtin-chatml": ["<|im_start|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>"],
    "builtin-llama3": ["<|start_header_id|>", "<|end_header_id|>"],
}
TRIMS = {"llama3", "builtin-llama3"}  # these templates write `content | trim`

SYSTEM = "You are a terse weather bot."
TOOL_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And the weather in Paris?"},
    {"role": "assistant", "content": TOOL_CALL},
    {"role": "tool", "content": '{"temp_c": 18, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 18 degrees and clear in Paris.  "},  # trailing spaces: trimmed by llama3
]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def toks(tokenizers, builtin_folder):
    """The three conftest styles plus the bundled templates on tokenizers that know their tokens."""
    out = dict(tokenizers)
    chatml = make_tokenizer(builtin_folder, "smol")
    chatml.chat_template = resolve_chat_template(chatml, "chatml")
    llama3 = make_tokenizer(builtin_folder, "llama3")
    llama3.chat_template = resolve_chat_template(llama3, "llama3")
    out["builtin-chatml"], out["builtin-llama3"] = chatml, llama3
    return out


def assistant_contents(style: str, messages: list[dict]) -> list[str]:
    return [m["content"].strip() if style in TRIMS else m["content"] for m in messages if m["role"] == "assistant"]


def trained_groups(input_ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive trained positions."""
    groups, start = [], None
    for i, lab in enumerate(list(labels) + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            groups.append((start, i))
            start = None
    return groups


def trained_texts(tok, input_ids: list[int], labels: list[int]) -> list[str]:
    return [tok.decode(input_ids[a:b], skip_special_tokens=False) for a, b in trained_groups(input_ids, labels)]


def render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


# --- R-MASK-1: golden labels -------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_only_assistant_contents_and_their_end_of_turn_are_trained(toks, style):
    tok, eot = toks[style], EOT[style]
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok))
    expected = [c + eot for c in assistant_contents(style, CONVERSATION)]

    assert trained_texts(tok, enc.input_ids, enc.labels) == expected
    # A trained label is the token itself (the shift happens in the loss), never another id.
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels))
    # Every trained run ends on the end-of-turn token; what follows it (newline, next header) is masked.
    eot_id = tok.convert_tokens_to_ids(eot)
    for a, b in trained_groups(enc.input_ids, enc.labels):
        assert enc.input_ids[b - 1] == eot_id
        if b < len(enc.labels):
            assert enc.labels[b] == IGNORE_INDEX
    if style not in TRIMS:  # ChatML writes "\n" after <|im_end|>: present in the input, never trained
        last = trained_groups(enc.input_ids, enc.labels)[-1][1]
        assert tok.decode(enc.input_ids[last:]) == "\n"
    # No header token is ever trained, and no system/user/tool text is.
    header_ids = {tok.convert_tokens_to_ids(h) for h in HEADERS[style]}
    assert all(lab == IGNORE_INDEX for i, lab in zip(enc.input_ids, enc.labels) if i in header_ids)
    trained = "".join(expected)
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] not in trained
    assert "tool_response" not in trained and "ipython" not in trained


@pytest.mark.parametrize("style", STYLES)
def test_train_on_inputs_trains_every_token(toks, style):
    tok = toks[style]
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok), train_on_inputs=True)
    assert enc.labels == enc.input_ids
    assert enc.n_trained == len(enc.input_ids)
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == render(tok, CONVERSATION)


# --- the mask must not change the tokens ---------------------------------------------------------

@pytest.mark.parametrize("style", STYLES)
def test_masking_does_not_change_the_tokens(toks, style):
    """train_on_inputs encodes the very same ids; only the labels differ."""
    tok = toks[style]
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok))
    unmasked = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok), train_on_inputs=True)
    assert enc.input_ids == unmasked.input_ids
    assert enc.labels != unmasked.labels


@pytest.mark.parametrize("style", ["smol", "qwen", "builtin-chatml"])
def test_ids_equal_the_tokenized_render_where_no_token_spans_a_boundary(toks, style):
    tok = toks[style]
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok))
    assert enc.input_ids == tok(render(tok, CONVERSATION), add_special_tokens=False).input_ids


@pytest.mark.parametrize("style", STYLES)
def test_decoded_ids_are_the_rendered_text(toks, style):
    """Holds for every style even where the token split differs: nothing is added, dropped or doubled."""
    tok = toks[style]
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok))
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == render(tok, CONVERSATION)


@pytest.mark.parametrize("style", ["smol", "llama3"])
def test_a_reply_is_tokenized_as_the_model_would_generate_it(toks, style):
    """A reply starting with spaces: the whole text would merge '\n' + '   '; the model, answering after the
    generation prompt, produces the reply's own tokens, and that is what it is trained on."""
    tok = toks[style]
    eot = find_end_of_turn(tok)
    msgs = [{"role": "user", "content": "Body of f?"}, {"role": "assistant", "content": "    return x"}]
    enc = encode_conversation(tok, msgs, eot)
    prompt = generation_prompt(tok, msgs[:1])
    assert enc.input_ids[: len(prompt)] == prompt
    content = "return x" if style == "llama3" else "    return x"  # llama3 trims
    expected = tok(content + eot, add_special_tokens=False).input_ids
    assert enc.input_ids[len(prompt) : len(prompt) + len(expected)] == expected


# --- R-EOS-1: collated batches ------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_collate_keeps_every_end_of_turn_label_when_pad_is_the_end_of_turn(toks, style):
    tok, eot = toks[style], EOT[style]
    eot_id = tok.convert_tokens_to_ids(eot)
    if style == "smol":  # the shipped tokenizer really pads with its EOS, which is its end-of-turn token
        assert tok.pad_token_id == tok.eos_token_id == eot_id
    convs = [SHORT, CONVERSATION, CONVERSATION[:3]]
    examples = [encode_conversation(tok, m, eot) for m in convs]
    assert len({len(e.input_ids) for e in examples}) == 3
    batch = collate(examples, pad_id=eot_id)  # worst case: padding uses the end-of-turn id itself

    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, (msgs, ex) in enumerate(zip(convs, examples)):
        n = len(ex.input_ids)
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert ids[:n] == ex.input_ids and labels[:n] == ex.labels
        assert labels[n:] == [IGNORE_INDEX] * (width - n)  # padding is never trained ...
        # ... and every assistant turn's end-of-turn token is, padded or not.
        n_turns = sum(m["role"] == "assistant" for m in msgs)
        assert sum(1 for lab in labels if lab == eot_id) == n_turns
        assert trained_texts(tok, ids, labels) == [c + eot for c in assistant_contents(style, msgs)]
        if tok.bos_token_id is not None:
            assert ids[:2] != [tok.bos_token_id] * 2  # never a doubled BOS
        if style in TRIMS:
            assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
            assert ids.count(tok.convert_tokens_to_ids("<|begin_of_text|>")) == 1


# --- end of turn and generation prompt -----------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_find_end_of_turn(toks, style):
    assert find_end_of_turn(toks[style]) == EOT[style]


def test_a_template_without_an_end_of_turn_token_is_refused(builtin_folder):
    tok = make_tokenizer(builtin_folder, "smol")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ConfigError, match="stop"):
        find_end_of_turn(tok)


def _prefix_check(tok, n_reply: int) -> None:
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok))
    starts = [a for a, _ in trained_groups(enc.input_ids, enc.labels)]
    assistant_at = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    history = CONVERSATION[: assistant_at[n_reply]]
    prompt = generation_prompt(tok, history)
    assert tok.decode(prompt, skip_special_tokens=False) == render(tok, history, add_generation_prompt=True)
    assert prompt == enc.input_ids[: starts[n_reply]]


@pytest.mark.parametrize("style", STYLES)
def test_generation_prompt_is_the_training_prefix_of_the_first_reply(toks, style):
    _prefix_check(toks[style], 0)


@pytest.mark.parametrize("style", STYLES)
def test_generation_prompt_is_the_training_prefix_of_the_last_reply(toks, style):
    """generation_prompt(tok, msgs[:-1]): inference sees exactly the tokens training put before the reply."""
    _prefix_check(toks[style], 2)


# --- R-SYS-1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_system_text_is_rendered_once_and_never_trained(toks, style):
    tok = toks[style]
    msgs = [{"role": "system", "content": SYSTEM}] + SHORT
    text = render(tok, msgs)
    assert text.count(SYSTEM) == 1
    assert "You are a helpful" not in text  # a given system turn replaces the template's default one
    enc = encode_conversation(tok, msgs, find_end_of_turn(tok))
    assert trained_texts(tok, enc.input_ids, enc.labels) == ["Hello!" + EOT[style]]


@pytest.mark.parametrize("style", ["smol", "qwen"])
def test_a_default_system_prompt_is_rendered_but_not_trained(toks, style):
    tok = toks[style]
    text = render(tok, SHORT)
    assert text.count("You are a helpful") == 1
    enc = encode_conversation(tok, SHORT, find_end_of_turn(tok))
    assert trained_texts(tok, enc.input_ids, enc.labels) == ["Hello!<|im_end|>"]


# --- R-MASK-2: preview ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_preview_brackets_exactly_the_trained_text(toks, style):
    tok, eot = toks[style], EOT[style]
    enc = encode_conversation(tok, CONVERSATION, find_end_of_turn(tok))
    text = render(tok, CONVERSATION)
    expected, pos = "", 0
    for span in (c + eot for c in assistant_contents(style, CONVERSATION)):
        at = text.index(span, pos)
        expected += text[pos:at] + TRAINED_OPEN + span + TRAINED_CLOSE
        pos = at + len(span)
    expected += text[pos:]
    assert preview_plain(tok, enc.input_ids, enc.labels) == expected
    assert expected.count(TRAINED_OPEN) == 3


# --- templates that cannot be masked exactly ---------------------------------------------------


def test_a_template_that_rewrites_earlier_turns_is_refused(builtin_folder):
    tok = make_tokenizer(builtin_folder, "smol")
    # Like templates that strip reasoning from past turns: earlier assistant contents are dropped.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert find_end_of_turn(tok) == "<|im_end|>"
    with pytest.raises(DataError, match="rewrites earlier turns"):
        encode_conversation(tok, CONVERSATION, "<|im_end|>")


# --- resolve_chat_template (R-FEAT-3) ------------------------------------------------------------


@pytest.fixture
def bare_tokenizer(builtin_folder):
    tok = make_tokenizer(builtin_folder, "smol")
    tok.chat_template = None
    return tok


def test_auto_without_a_template_names_the_choices(bare_tokenizer):
    with pytest.raises(ConfigError) as err:
        resolve_chat_template(bare_tokenizer, "auto")
    assert "chatml" in str(err.value) and "llama3" in str(err.value)


def test_auto_uses_the_models_own_template(toks):
    assert resolve_chat_template(toks["qwen"], "auto") == QWEN_TEMPLATE


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_a_builtin_name_is_accepted(bare_tokenizer, name):
    assert resolve_chat_template(bare_tokenizer, name) == BUILTIN_TEMPLATES[name]


def test_a_jinja_file_and_inline_jinja_are_accepted(bare_tokenizer, tmp_path):
    path = tmp_path / "qwen.jinja"
    path.write_text(QWEN_TEMPLATE)
    assert resolve_chat_template(bare_tokenizer, str(path)) == QWEN_TEMPLATE
    assert resolve_chat_template(bare_tokenizer, QWEN_TEMPLATE) == QWEN_TEMPLATE
    bare_tokenizer.chat_template = resolve_chat_template(bare_tokenizer, str(path))
    assert find_end_of_turn(bare_tokenizer) == "<|im_end|>"


def test_a_missing_jinja_file_or_unknown_name_is_a_config_error(bare_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_chat_template(bare_tokenizer, str(tmp_path / "nope.jinja"))
    with pytest.raises(ConfigError, match="not a known template"):
        resolve_chat_template(bare_tokenizer, "vicuna")
