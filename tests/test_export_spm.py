"""GGUF export of SentencePiece-tokenizer models (Mistral v0.1 layout, Gemma 1/2/3), read back by real clients.

transformers' GGUF reader checks the vocabulary (R-GGUF-3) and the weights (F16 logits); llama.cpp's
Python binding, where it imports, checks that its own tokenizer and kernels agree; Ollama's TEMPLATE
is rendered by Go's text/template where `go` is installed (R-GGUF-2).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_spm_tokenizer

from tuneforge.errors import ModelError
from tuneforge.export.gguf import write_gguf
from tuneforge.export.ollama import go_template, modelfile, render_turns, turn_format

# (tokenizer style, architecture) pairs; Mistral is Llama tensors with a SentencePiece tokenizer.
CASES = {"mistral": "mistral", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}
READ_BY_TRANSFORMERS = ("mistral", "gemma2", "gemma3")  # its GGUF reader has no gemma (1) architecture


@pytest.fixture(scope="module")
def spm_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spm_tok")


@pytest.fixture(scope="module")
def spm(spm_root):
    return {style: make_spm_tokenizer(spm_root / style, style) for style in ("mistral", "gemma")}


def spm_model(folder: Path, arch: str, tok) -> Path:
    """A tiny random model of `arch` with the SentencePiece tokenizer, saved as transformers 5 saves it."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, MistralConfig

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = {
        "mistral": lambda: MistralConfig(**common, tie_word_embeddings=False),
        "gemma": lambda: GemmaConfig(**common, head_dim=16),
        # head size 256 = query_pre_attn_scalar, as in Gemma 2/3 and as llama.cpp assumes
        "gemma2": lambda: Gemma2Config(**common, head_dim=256),
        "gemma3": lambda: Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=256),
    }[arch]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm):
    """Each architecture saved and written to GGUF at F32 and F16."""
    root = tmp_path_factory.mktemp("spm_models")
    out = {}
    for arch, style in CASES.items():
        folder = spm_model(root / f"tiny-{arch}", arch, spm[style])  # a GGUF named just "mistral" confuses transformers
        out[arch] = {"folder": folder, **{q: write_gguf(folder, root / f"{arch}-{q}.gguf", q) for q in ("f32", "f16")}}
    return out


def sample_texts(n: int = 1000, seed: int = 0) -> list[str]:
    """Words in and out of the vocabulary, whitespace runs, digits, bytes only byte fallback can spell, markers."""
    rng = random.Random(seed)
    pieces = ["hello", " world", "  spaced", "tab\tthere", "new\nline", "123456", "ünïcödé", "日本語", "emoji 🤖",
              "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "[INST]", "don't", "CamelCase", "x" * 30, "!?",
              "   ", " Repeat alpha", "\n\n", "\u2581", "<0x41>", "Ωμέγα"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def fields(path: Path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def hf_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("arch", list(CASES))
def test_sentencepiece_vocabulary_metadata(exported, spm, arch):
    """tokenizer.ggml.model llama: scores, token types, special ids, add-BOS/EOS, space prefix, chat template."""
    import gguf

    tok = spm[CASES[arch]]
    f = fields(exported[arch]["f16"])
    T = gguf.TokenType
    assert f["general.architecture"] == {"mistral": "llama"}.get(arch, arch) and f["tokenizer.ggml.model"] == "llama"
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == len(tok)
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items() if types[i] != T.USER_DEFINED)
    assert types[vocab["<unk>"]] == T.UNKNOWN
    assert types[vocab["<0x41>"]] == T.BYTE and sum(t == T.BYTE for t in types) == 256
    assert all(types[vocab[t]] == T.CONTROL for t in (tok.bos_token, tok.eos_token))
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.unknown_token_id"] == vocab["<unk>"]
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is (CASES[arch] == "mistral")  # Gemma writes no leading "▁"
    assert f["tokenizer.chat_template"] == tok.chat_template
    # merged pieces score by merge order, so llama.cpp's highest-score-first merging follows the BPE ranks
    merged = [i for i, t in enumerate(tokens) if types[i] == T.NORMAL and len(t) > 1]
    assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged)
    if CASES[arch] == "gemma":
        assert types[vocab["<start_of_turn>"]] == T.CONTROL and types[vocab["<pad>"]] == T.CONTROL


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sentencepiece_gguf_tokenizes_like_hf_on_1000_strings(exported, spm, arch):
    """R-GGUF-3 through transformers' GGUF reader: identical ids on 1,000 strings."""
    from transformers import AutoTokenizer

    tok = spm[CASES[arch]]
    path = exported[arch]["f16"]
    back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = sample_texts()
    agree = sum(hf_ids(back, t) == hf_ids(tok, t) for t in texts)
    assert agree == len(texts), [t for t in texts if hf_ids(back, t) != hf_ids(tok, t)][:5]
    assert back("hello").input_ids == tok("hello").input_ids  # BOS added by both


def test_tokenizer_model_only_folder_is_read_through_transformers(tmp_path, spm_root, exported):
    """A folder with tokenizer.model and no tokenizer.json (a slow-tokenizer save) gives the same vocabulary."""
    import gguf

    folder = exported["mistral"]["folder"]
    slow = tmp_path / "slow"
    shutil.copytree(folder, slow)
    (slow / "tokenizer.json").unlink()
    shutil.copy(spm_root / "mistral" / "spm-source" / "tokenizer.model", slow / "tokenizer.model")
    path = write_gguf(slow, tmp_path / "slow.gguf", "f16")
    a, b = fields(path), fields(exported["mistral"]["f16"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        assert a[key] == b[key], key
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("arch", READ_BY_TRANSFORMERS)
def test_sentencepiece_gguf_reads_back_with_the_same_logits(exported, arch):
    """transformers' GGUF reader: F32 equal to 1e-5; F16 within 1e-2 of the logits' range, and equal to 1e-5
    to the model with its weights rounded to fp16 (so the file holds those weights and nothing else)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(exported[arch]["folder"], dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))

    def read(quant):
        path = exported[arch][quant]
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        assert (read("f32")(input_ids=ids).logits - expected).abs().max() <= 1e-5
        f16 = read("f16")(input_ids=ids).logits
        assert (f16 - expected).abs().max() <= 1e-2 * expected.abs().max()
        for p in ref.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
        assert (f16 - ref(input_ids=ids).logits).abs().max() <= 1e-5


def chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": "Repeat alpha bravo please"}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("arch", list(CASES))
def test_llama_cpp_runs_the_sentencepiece_gguf_like_transformers(exported, spm, arch):
    """llama.cpp's own loader, kernels and greedy decoding on the F32 file; gemma (1) is checked here only."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from transformers import AutoModelForCausalLM

    tok = spm[CASES[arch]]
    ids = chat_ids(tok)
    ref = AutoModelForCausalLM.from_pretrained(exported[arch]["folder"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(model_path=str(exported[arch]["f32"]), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max()
    answer = []
    for _ in range(12):
        answer.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([answer[-1]])
    assert answer == greedy


@pytest.mark.parametrize("style", ["mistral", "gemma"])
def test_llama_cpp_tokenizes_like_hf(exported, spm, style):
    """llama.cpp's tokenizer on the exported vocabulary.

    Gemma agrees on every string. For the Llama/Mistral layout, transformers 5 prefixes "▁" only to
    the start of a text that does not begin with a space or "▁", while llama.cpp (like SentencePiece
    itself) prefixes it always and again after each special token; strings with neither agree exactly.
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    tok = spm[style]
    arch = "mistral" if style == "mistral" else "gemma2"
    llm = llama_cpp.Llama(model_path=str(exported[arch]["f16"]), vocab_only=True, verbose=False)
    texts = sample_texts()
    if style == "mistral":
        specials = set(tok.all_special_tokens)
        texts = [t for t in texts if not t[0].isspace() and t[0] != "\u2581" and not any(s in t for s in specials)]
    agree = [llm.tokenize(t.encode(), add_bos=False, special=True) == hf_ids(tok, t) for t in texts]
    assert all(agree), [t for t, ok in zip(texts, agree) if not ok][:5]
    assert len(texts) >= 250


def test_gemma_settings_llama_cpp_cannot_hold_are_refused(tmp_path, spm):
    """An untied Gemma 2 head or a query scale llama.cpp does not use stops the export before any file is written."""
    import json as _json

    folder = spm_model(tmp_path / "g2", "gemma2", spm["gemma"])
    config = _json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(_json.dumps({**config, "query_pre_attn_scalar": 144}))
    with pytest.raises(ModelError, match="query_pre_attn_scalar"):
        write_gguf(folder, tmp_path / "x.gguf")
    untied = spm_model(tmp_path / "g", "gemma", spm["gemma"])
    from safetensors.torch import load_file, save_file

    weights = load_file(untied / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone() * 2
    save_file(weights, untied / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lm_head"):
        write_gguf(untied, tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "And now?"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}] + CONVERSATIONS[0]


@pytest.mark.parametrize("style", ["mistral", "gemma"])
def test_ollama_template_of_sentencepiece_models_renders_like_hf(spm, style):
    """R-GGUF-2: Mistral v0.1 (no system role) and Gemma (system folded into the first user turn)."""
    tok = spm[style]
    fmt = turn_format(tok)
    convs = CONVERSATIONS + ([WITH_SYSTEM] if style == "gemma" else [])
    for msgs in convs:
        gen = msgs[-1]["role"] != "assistant"
        assert render_turns(fmt, msgs, gen) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    if style == "mistral":
        with pytest.raises(ModelError, match="no system role"):
            modelfile("m.gguf", tok, [tok.eos_token], system="Be brief.")
    text = modelfile("m.gguf", tok, [tok.eos_token] + (["<end_of_turn>"] if style == "gemma" else []))
    assert f'PARAMETER stop "{tok.eos_token}"' in text
    assert go_template(fmt) in text


GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
    var data struct { Messages []Message }
    if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil { panic(err) }
    tmpl := template.Must(template.New("t").Parse(os.Args[1]))
    if err := tmpl.Execute(os.Stdout, data); err != nil { panic(err) }
}
"""


@pytest.mark.parametrize("style", ["smol", "qwen", "llama3", "mistral", "gemma"])
def test_go_renders_the_ollama_template_byte_identically(tmp_path, tokenizers, spm, style):
    """The TEMPLATE itself, run by Go's text/template (the engine Ollama uses), equals the HF chat template."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go); Ollama's templates are Go text/template")
    tok = {**tokenizers, **spm}[style]
    (tmp_path / "render.go").write_text(GO_RENDER)
    binary = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(binary), str(tmp_path / "render.go")], check=True, cwd=tmp_path,
                   env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                        "GOFLAGS": "-mod=mod", "GO111MODULE": "off"})
    template = go_template(turn_format(tok))
    convs = CONVERSATIONS + ([] if style == "mistral" else [WITH_SYSTEM])
    for msgs in convs:
        gen = msgs[-1]["role"] != "assistant"
        go_in = [{"Role": m["role"], "Content": m["content"]} for m in msgs]
        rendered = subprocess.run([str(binary), template], input=json.dumps({"Messages": go_in}),
                                  capture_output=True, text=True, check=True).stdout
        assert rendered == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen), (style, msgs)
