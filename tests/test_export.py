"""Exports read back by real clients: transformers' GGUF reader, gguf-py, PEFT; Ollama's template rebuilt exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from test_train import QUIET, make_cfg

from tuneforge.cli import main
from tuneforge.errors import ModelError
from tuneforge.export.gguf import write_gguf
from tuneforge.export.ollama import go_template, render_turns, turn_format
from tuneforge.export.run_export import export_run
from tuneforge.models.run import open_run
from tuneforge.train.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizers):
    """A LoRA run on a tiny Llama (built-in tokenizer) and a full run on a tiny Llama with a Llama-3 template."""
    tmp = tmp_path_factory.mktemp("export_runs")
    out = {}
    lora = make_cfg(tmp, make_tiny_model(tmp / "llama", "llama", tokenizers["smol"]), out="lora", max_steps=3,
                    learning_rate=2e-2, **{"lora.dropout": 0.0, "evaluation.max_examples": 2})
    train(lora, reporter=QUIET)
    out["lora"] = tmp / "lora"
    full = make_cfg(tmp, make_tiny_model(tmp / "llama3", "llama", tokenizers["llama3"]), out="llama3", max_steps=2,
                    adapter="full", **{"evaluation.before_after": False})
    train(full, reporter=QUIET)
    out["llama3"] = tmp / "llama3"
    return out


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_reads_back_with_the_same_logits(tmp_path, tiny_models, arch):
    """Names, Llama's q/k layout and Qwen2's biases all land where a GGUF reader expects them."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    f32 = load_gguf(write_gguf(tiny_models[arch], tmp_path / "m-f32.gguf", "f32"))
    assert (logits(f32, ref.config.vocab_size) - logits(ref, ref.config.vocab_size)).abs().max() <= 1e-5


def test_gguf_f16_and_q8_0_hold_exactly_the_rounded_weights(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models["llama"]
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = logits(ref, ref.config.vocab_size)
    f16 = load_gguf(write_gguf(folder, tmp_path / "m-f16.gguf", "f16"))
    got = logits(f16, ref.config.vocab_size)
    # fp16 weights move logits by ~1e-3 of their range (0.027 absolute on the 135M built-in model) ...
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
    with torch.no_grad():  # ... and by nothing more: the file holds exactly the fp16-rounded weights
        for p in ref.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
    assert (got - logits(ref, ref.config.vocab_size)).abs().max() <= 1e-5
    q8 = load_gguf(write_gguf(folder, tmp_path / "m-q8.gguf", "q8_0"))
    import gguf

    q8_type = gguf.GGMLQuantizationType.Q8_0
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # Q8_0 file == the weights through Q8_0 rounding, nothing else
        for p in ref.parameters():
            if p.ndim >= 2:
                w = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8_type), q8_type)))
    assert (logits(q8, ref.config.vocab_size) - logits(ref, ref.config.vocab_size)).abs().max() <= 1e-4


def test_gguf_metadata_carries_template_and_every_end_of_turn(runs, tmp_path):
    """R-GGUF-1: chat template identical to the training one; EOS/EOT are the trained end-of-turn."""
    import gguf

    run = open_run(runs["llama3"])
    path = export_run(run, "gguf", tmp_path / "g", quant="f16")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == run.manifest["chat_template"]
    tokens = fields["tokenizer.ggml.tokens"].contents()
    eot = tokens.index("<|eot_id|>")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == eot
    assert fields["tokenizer.ggml.eot_token_id"].contents() == eot
    assert run.manifest["stop_token_ids"][0] == eot
    assert (tmp_path / "g" / "run.json").is_file() and (tmp_path / "g" / "README.md").is_file()


@pytest.mark.parametrize("style", ["smol", "llama3"])
def test_gguf_tokenizer_gives_the_same_ids_on_1000_strings(tmp_path, tokenizers, style):
    """R-GGUF-3: the vocabulary in the file tokenizes like the Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    tok = tokenizers[style]
    folder = make_tiny_model(tmp_path / "m", "llama", tok)
    path = write_gguf(folder, tmp_path / "m.gguf", "f16", pre_fallback="smollm" if style == "smol" else None)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    rng = random.Random(0)
    pieces = ["hello", " world", "  spaced", "tab\tthere", "new\nline", "123456", "ünïcödé", "日本語", "emoji 🤖",
              "<|im_end|>", "<|eot_id|>", "don't", "CamelCase", "x" * 30, "!?", "   "]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(1000)]
    for text in texts:
        assert back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids, text


def test_unsupported_tokenizer_is_refused_before_writing(tmp_path, tiny_models):
    folder = tiny_models["llama"]
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["model"] = {"type": "Unigram", "vocab": [[tok, -1.0] for tok in tj["model"]["vocab"]], "unk_id": 0}
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelError, match="has a Unigram model"):
        write_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_q4_k_m_without_llama_cpp_says_how_to_get_it(tmp_path, tiny_models, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ModelError, match="pip install llama-cpp-python"):
        write_gguf(tiny_models["llama"], tmp_path / "x.gguf", "q4_k_m")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "And now?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
]


@pytest.mark.parametrize("style", ["smol", "qwen", "llama3"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_ollama_template_renders_like_the_chat_template(tokenizers, style, conv):
    """R-GGUF-2: the Modelfile's turn structure renders a 2-turn conversation byte-identically."""
    tok = tokenizers[style]
    msgs = CONVERSATIONS[conv]
    fmt = turn_format(tok)
    gen = msgs[-1]["role"] != "assistant"
    assert render_turns(fmt, msgs, gen) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = go_template(fmt)
    for before, after in fmt.wrap.values():
        assert before in text and after in text
    assert fmt.generation in text


def test_ollama_export_writes_gguf_and_modelfile_with_stops(runs, tmp_path, capsys):
    out = tmp_path / "ollama"
    assert main(["export", str(runs["llama3"]), "--to", "ollama", "--out", str(out), "--quant", "f16",
                 "--system", "Answer briefly."]) == 0
    modelfile = (out / "Modelfile").read_text()
    [gguf_file] = out.glob("*.gguf")
    assert modelfile.startswith(f"FROM ./{gguf_file.name}\n")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and 'PARAMETER stop "<|end_of_text|>"' in modelfile
    assert 'TEMPLATE """' in modelfile and 'SYSTEM """Answer briefly."""' in modelfile
    assert "ollama create" in capsys.readouterr().out


def test_hf_and_adapter_exports_carry_stops_card_and_provenance(runs, tmp_path):
    """R-EOS-2 for the merged folder and the adapter folder; the model card has the run's facts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    run = open_run(runs["lora"])
    hf = export_run(run, "hf", tmp_path / "hf", dtype="float32")
    adapter = export_run(run, "adapter", tmp_path / "adapter")
    for folder in (hf, adapter):
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        assert run.manifest["stop_token_ids"][0] in (eos if isinstance(eos, list) else [eos])
        card = (folder / "README.md").read_text()
        assert "Held-out evaluation" in card and list(run.manifest["data_sha256"].values())[0] in card
        assert json.loads((folder / "run.json").read_text())["seed"] == run.config.seed
    merged = AutoModelForCausalLM.from_pretrained(hf).eval()
    base = AutoModelForCausalLM.from_pretrained(run.manifest["base_model"]["folder"])
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    vocab = merged.config.vocab_size
    assert (logits(merged, vocab) - logits(with_adapter, vocab)).abs().max() <= 1e-3
    bf16 = export_run(run, "hf", tmp_path / "bf16")
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16
    with pytest.raises(Exception, match="not empty"):
        export_run(run, "hf", tmp_path / "hf")


def test_llama_cpp_reads_the_gguf_with_the_same_next_tokens(runs, tmp_path):
    """An integration test against llama.cpp itself, through its Python binding when it is installed."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    import numpy as np
    from transformers import AutoModelForCausalLM

    from tuneforge.data.template import generation_prompt
    from tuneforge.models.load import load_tokenizer

    run = open_run(runs["lora"])
    ids = generation_prompt(load_tokenizer(run.final), [{"role": "user", "content": "Repeat alpha bravo please"}])
    ref = AutoModelForCausalLM.from_pretrained(export_run(run, "hf", tmp_path / "hf", dtype="float32")).eval()
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(export_run(run, "gguf", tmp_path / "g", quant="f32")), n_ctx=256,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max()  # llama.cpp's own kernels
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_exports_are_checked_in_a_fresh_process_against_the_tuned_perplexity(runs, tmp_path):
    """R-MRG-4: reloaded by plain transformers in a new process, held-out perplexity stays within (1 + delta)."""
    from safetensors.torch import load_file, save_file

    from tuneforge.errors import TuneforgeError
    from tuneforge.export.run_export import verify_run_export

    run = open_run(runs["lora"])
    for to, kwargs in (("hf", {"dtype": "float32"}), ("adapter", {}), ("gguf", {"quant": "f16"})):
        path = export_run(run, to, tmp_path / to, **kwargs)
        report = verify_run_export(run, to, path, **kwargs)
        assert report["perplexity"] <= report["allowed"] and report["tokens"] > 0
        if to == "hf":
            assert abs(report["perplexity"] - report["tuned_perplexity"]) <= 1e-3 * report["tuned_perplexity"]
    # An export that lost the adapter (the base weights under the tuned name) is caught.
    broken = export_run(run, "hf", tmp_path / "broken", dtype="float32")
    base = load_file(next(Path(run.manifest["base_model"]["folder"]).glob("*.safetensors")))
    save_file(base, next(broken.glob("*.safetensors")), metadata={"format": "pt"})
    with pytest.raises(TuneforgeError, match="does not behave like the model that was evaluated"):
        verify_run_export(run, "hf", broken, dtype="float32")


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma2", "gemma3"])
def test_gguf_of_other_architectures_reads_back_exactly(tmp_path, tokenizers, arch):
    """Mistral, Qwen3 and Gemma 2/3 with a byte-level BPE tokenizer; Gemma's (1 + w) norms included."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen3Config

    tok = tokenizers["smol"]
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    config = {
        "mistral": lambda: MistralConfig(**common, tie_word_embeddings=False),
        "qwen3": lambda: Qwen3Config(**common, head_dim=128, tie_word_embeddings=False),  # the head size Qwen3 models use
        # Gemma's head size equals query_pre_attn_scalar (256), as llama.cpp assumes; six Gemma 3 layers
        # include one full-attention layer with its own rope base.
        "gemma2": lambda: Gemma2Config(**common, head_dim=256),
        "gemma3": lambda: Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=256, tie_word_embeddings=False),
    }[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    back = load_gguf(write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32"))
    assert (logits(back, len(tok)) - logits(model, len(tok))).abs().max() <= 1e-5
