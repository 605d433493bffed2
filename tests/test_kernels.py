"""The fused kernels compute what transformers computes.

Each kernel against its PyTorch reference, forward and gradients, down both of its paths: the Triton
kernel, run on CPU by Triton's interpreter, and the PyTorch path; the cross-entropy kernel through the
chunked loss and the chunked log-probs, against their PyTorch path and the full logits. Then tiny Llama and Gemma models with
the kernels swapped in and the chunked loss on, against the same models without.

Triton fixes interpreter or compiler when it is first imported, and the rest of the suite must not
run in its interpreter; so the tests of the Triton path run in a pytest process of their own, started
by test_interpreted_kernels with TRITON_INTERPRET=1 (or directly: TRITON_INTERPRET=1 pytest -k triton).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

from tuneforge.config import config_from_dict
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.fast import FastPath
from tuneforge.fast.chunked_logps import label_logps
from tuneforge.fast.chunked_loss import kernel_runs, linear_cross_entropy_sum
from tuneforge.fast.kernels import apply_kernels, triton_importable
from tuneforge.fast.kernels.gated_mlp import FusedGatedMLP, gated, gated_reference
from tuneforge.fast.kernels.launch import interpreting, triton_runs
from tuneforge.fast.kernels.rms_norm import FusedRmsNorm, rms_norm, rms_norm_reference
from tuneforge.fast.switches import resolve
from tuneforge.methods.sft import SFT, count_trained

NO_TRITON = "triton is not installed (pip install 'tuneforge[kernels]'); its kernels are tested in its CPU interpreter"
INTERPRETER = triton_importable() and interpreting()  # this process started in Triton's interpreter
IN_INTERPRETER = pytest.mark.skipif(
    not INTERPRETER, reason="run by test_interpreted_kernels in a process started with TRITON_INTERPRET=1")
PATHS = [pytest.param("triton", marks=IN_INTERPRETER), "torch"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


@pytest.mark.skipif(not triton_importable(), reason=NO_TRITON)
@pytest.mark.skipif(INTERPRETER, reason="this process is the interpreter's: the tests run here directly")
def test_interpreted_kernels():
    """The Triton path of every test below, in Triton's CPU interpreter."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                         env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout + run.stderr


@pytest.mark.skipif(not triton_importable(), reason=NO_TRITON)
@pytest.mark.skipif(INTERPRETER, reason="the interpreter's kernels are not compiled")
def test_the_kernels_compile_for_a_gpu(monkeypatch, tmp_path):
    """Triton's compiler for an sm_90 GPU (H100/H200), which needs no GPU: it checks what the interpreter
    lets pass (a kernel reading a global that is not constexpr, say)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tuneforge.fast.kernels import cross_entropy_triton, gated_triton, rms_norm_triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    rows = {"n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32"}
    logits = dict(Z="*bf16", LABELS="*i64", SCALE="*fp32", LSE="*fp32", TARGET="*fp32", n_cols="i32", softcap="fp32",
                  temperature="fp32")

    def both(switch: str) -> list[dict]:
        return [{switch: False}, {switch: True}]

    kernels = [  # each with the constexpr settings it is compiled for
        (rms_norm_triton._forward, dict(X="*bf16", W="*bf16", Y="*bf16", RSTD="*fp32", n_cols="i32", eps="fp32"),
         both("GEMMA")),
        (rms_norm_triton._backward, dict(DY="*bf16", X="*bf16", W="*bf16", RSTD="*fp32", DX="*bf16", DW="*fp32", **rows),
         both("GEMMA")),
        (gated_triton._forward, dict(G="*bf16", U="*bf16", H="*bf16", n="i32"), both("GELU")),
        (gated_triton._backward, dict(DH="*bf16", G="*bf16", U="*bf16", DG="*bf16", DU="*bf16", n="i32"),
         both("GELU")),
        # the log-probs' forward (no gradient, no row factor), and their backward (soft-capped, each row scaled)
        (cross_entropy_triton._cross_entropy, logits, [{"SOFTCAP": False, "GRAD": False, "SCALE": None},
                                                       {"SOFTCAP": True, "GRAD": True}]),
    ]
    for fn, signature, settings in kernels:
        for constexprs in settings:
            constexprs = {**constexprs, "BLOCK": 1024}
            types = {**signature, **{name: "constexpr" for name in constexprs}}  # SCALE=None: a constexpr too
            source = ASTSource(fn=fn, signature=types, constexprs=constexprs)
            assert "ld.global" in triton_compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.fixture
def path(request, monkeypatch):
    """Which path the kernels take in this test: Triton's (interpreted), or PyTorch's."""
    if request.param == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_runs(torch.zeros(1)) == (request.param == "triton")
    return request.param


def _grads(out: torch.Tensor, inputs, seed: int = 1):
    torch.manual_seed(seed)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), inputs)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
@pytest.mark.parametrize("cols", [5, 64, 96, 130])
def test_rms_norm_equals_the_reference_forward_and_gradients(path, gemma, cols):
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 7, cols)).requires_grad_()
    w = (torch.randn(cols) * 0.5 + (0.0 if gemma else 1.0)).requires_grad_()
    fused, plain = rms_norm(x, w, 1e-6, gemma), rms_norm_reference(x, w, 1e-6, gemma)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(_grads(fused, (x, w)), _grads(plain, (x, w)), ("x", "weight")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("gelu", [False, True], ids=["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 67), (2, 1500)])  # one partial block; several blocks
def test_gated_activation_equals_the_reference_forward_and_gradients(path, gelu, shape):
    torch.manual_seed(0)
    gate, up = (3 * torch.randn(shape)).requires_grad_(), torch.randn(shape).requires_grad_()
    fused, plain = gated(gate, up, gelu), gated_reference(gate, up, gelu)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(_grads(fused, (gate, up)), _grads(plain, (gate, up)), ("gate", "up")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def _full_logits(hidden, weight, softcap, temperature=1.0):
    """The plain path's logits in fp64: the yardstick of both paths of the chunked losses."""
    logits = hidden.double() @ weight.double().t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def _assert_same(fused, grads, expected, expected_grads, **tol):
    torch.testing.assert_close(fused.double(), expected.double(), **tol)
    for a, b, name in zip(grads, expected_grads, ("hidden", "weight")):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=name)


# (vocabulary, dtype, soft-cap): one partial block; several blocks and a 7-entry one, capped; bf16
CROSS_ENTROPY_CASES = [(1000, torch.float32, None), (1000, torch.float32, 5.0), (49152 + 7, torch.float32, 5.0),
                       (1000, torch.bfloat16, 5.0)]
FP32 = {"rtol": 1e-5, "atol": 1e-6}
# fp32 sums over a 49,159 vocabulary against fp64 ones: rounding of about 1e-5 of the largest gradient
FP32_VS_FULL = {"rtol": 1e-5, "atol": 2e-5}
BF16 = {"rtol": 1.6e-2, "atol": 2e-2}


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("vocab, dtype, softcap", CROSS_ENTROPY_CASES,
                         ids=["1000", "1000-capped", "49159-capped", "bf16-capped"])
def test_the_chunked_loss_with_kernels_on_equals_the_pytorch_path_and_the_full_logits(path, vocab, dtype, softcap):
    """Ignored positions, chunks of 3 rows; the loss and both gradients. Against the PyTorch path (the
    same products, so fp32 to 1e-5) and the full logits in fp64 (the yardstick of both paths)."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 16).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, 16) / 2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (9,))
    labels[::4] = IGNORE_INDEX
    inputs = (hidden, weight)
    assert kernel_runs(hidden, kernel=True) == (path == "triton")
    fused = linear_cross_entropy_sum(hidden, weight, labels, chunk=3, softcap=softcap, kernel=True)
    plain = linear_cross_entropy_sum(hidden, weight, labels, chunk=3, softcap=softcap, kernel=False)
    full = torch.nn.functional.cross_entropy(_full_logits(hidden, weight, softcap), labels, reduction="sum")
    fp32 = dtype == torch.float32
    grads = _grads(fused, inputs)
    _assert_same(fused, grads, plain, _grads(plain, inputs), **(FP32 if fp32 else BF16))
    _assert_same(fused, grads, full, _grads(full, inputs), **(FP32_VS_FULL if fp32 else BF16))


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (5.0, 0.7)])
def test_the_chunked_log_probs_with_kernels_on_equal_the_pytorch_path_and_log_softmax(path, softcap, temperature):
    """GRPO's temperature and Gemma's soft-cap; each position's gradient differs, as in DPO or GRPO."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = (torch.randn(1000, 16) / 2).requires_grad_()
    labels = torch.randint(0, 1000, (7,))
    inputs = (hidden, weight)
    fused = label_logps(hidden, weight, labels, 3, softcap, temperature, kernel=True)
    plain = label_logps(hidden, weight, labels, 3, softcap, temperature, kernel=False)
    full = torch.log_softmax(_full_logits(hidden, weight, softcap, temperature), -1).gather(1, labels[:, None]).squeeze(1)
    grads = _grads(fused, inputs)
    _assert_same(fused, grads, plain, _grads(plain, inputs), **FP32)
    _assert_same(fused, grads, full, _grads(full, inputs), **FP32_VS_FULL)


def test_the_hand_written_backward_passes_gradcheck(monkeypatch):
    """The PyTorch path in fp64, where its backward formulas must be exact, not just close; the Triton
    kernels compute the same formulas in fp32 (checked against the references above)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for gemma in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6, gemma), (x, w))
    for gelu in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: gated(a, b, gelu), (x, 2 * x.detach().flip(0).requires_grad_()))


def test_the_references_are_what_transformers_computes_in_bf16_too(monkeypatch):
    """The references and the PyTorch path round where transformers rounds: equal bit for bit. (Triton's
    interpreter rounds fp32 to bf16 differently from a GPU, so the Triton path is compared in fp32.)"""
    from transformers.activations import ACT2FN
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 48).to(dtype)
        for cls, gemma in ((LlamaRMSNorm, False), (GemmaRMSNorm, True)):
            norm = cls(48, eps=1e-5).to(dtype)
            torch.nn.init.normal_(norm.weight)
            with torch.no_grad():
                torch.testing.assert_close(rms_norm_reference(x, norm.weight, 1e-5, gemma), norm(x), rtol=0, atol=0)
                torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5, gemma), norm(x), rtol=0, atol=0)
        for act, gelu in (("silu", False), ("gelu_pytorch_tanh", True)):
            with torch.no_grad():
                torch.testing.assert_close(gated_reference(x, 2 * x, gelu), ACT2FN[act](x) * (2 * x), rtol=0, atol=0)
                torch.testing.assert_close(gated(x, 2 * x, gelu), ACT2FN[act](x) * (2 * x), rtol=0, atol=0)


# --- whole models ----------------------------------------------------------------------------------

VOCAB = 97
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(arch: str, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch, VOCAB)
    for k, v in extra.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from their initial ones (zeros for Gemma), so a wrong form shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so the adapter changes the output
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            init_lora_weights=False))


def _loss_and_grads(model, batch, fast: FastPath | None = None):
    """The mean token loss, the model's own or SFT's on the fast path `fast`, and its gradients."""
    model.zero_grad(set_to_none=True)
    if fast is None:
        loss = model(**batch).loss
    else:
        loss, _ = SFT(None, 0, fast).loss(model, batch, {"tokens": count_trained(batch)})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# The Triton path with full fine-tuning (every gradient through the kernels); the PyTorch path in every order.
MODEL_CASES = [pytest.param("triton", arch, "full", marks=IN_INTERPRETER, id=f"triton-{arch}-full")
               for arch in ("llama", "gemma")] + [
    ("torch", arch, order) for arch in ("llama", "gemma") for order in ("full", "lora-then-kernels", "kernels-then-lora")]


@pytest.mark.parametrize("path, arch, order", MODEL_CASES, indirect=["path"])
def test_a_model_with_kernels_gives_the_same_loss_and_gradients(tmp_path, monkeypatch, path, arch, order):
    """What the loop does (LoRA, then kernels), the other order, and full fine-tuning; the swap keeps every
    state-dict key (the plain model's state loads strictly) and the adapter saves the same keys. The fused
    model's loss is SFT's with the chunked loss and its cross-entropy kernel, in chunks of 7 of 20 positions."""
    base = _tiny(arch)
    fused = copy.deepcopy(base)
    plain = base if order == "full" else _lora(base)
    if order == "kernels-then-lora":
        swapped = apply_kernels(fused)
        fused = _lora(fused)
    elif order == "lora-then-kernels":
        fused = _lora(fused)
        swapped = apply_kernels(fused)
    else:
        swapped = apply_kernels(fused)
    # 2 layers: input and post-attention norms and the MLP in each, and the final norm
    assert len(swapped) == 7
    assert {type(m).__name__ for m in fused.modules()} & {"LlamaRMSNorm", "GemmaRMSNorm", "LlamaMLP", "GemmaMLP"} == set()
    assert sum(isinstance(m, FusedGatedMLP) for m in fused.modules()) == 2
    fused.load_state_dict(plain.state_dict())  # strict: the same keys, and now the same weights
    batch = _batch()
    loss, grads = _loss_and_grads(plain, batch)
    launches = []
    if path == "triton":  # SFT must pass the switch down to the kernel, or this compares PyTorch with PyTorch
        from tuneforge.fast.kernels import cross_entropy_triton

        rows = cross_entropy_triton.rows
        monkeypatch.setattr(cross_entropy_triton, "rows", lambda *args, **kw: launches.append(1) or rows(*args, **kw))
    fused_loss, fused_grads = _loss_and_grads(fused, batch, FastPath(chunked_loss=True, loss_chunk_tokens=7, kernels=True))
    assert len(launches) == (3 if path == "triton" else 0)  # 20 positions in chunks of 7
    assert fused_loss == pytest.approx(loss, abs=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, atol=1e-5, rtol=1e-5, msg=name)
    if order != "full":
        keys = []
        for model, folder in ((plain, tmp_path / "plain"), (fused, tmp_path / "fused")):
            model.save_pretrained(str(folder))
            with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
                keys.append(sorted(f.keys()))
        assert keys[0] == keys[1] and any("mlp.gate_proj.lora_A" in k for k in keys[0])


@pytest.mark.parametrize("model_type, swaps", [("mistral", 7), ("qwen2", 7), ("qwen3", 11), ("phi3", 5),
                                               ("gemma2", 11), ("gemma3_text", 15)])
def test_every_listed_architecture_computes_the_same(monkeypatch, model_type, swaps):
    """The other classes in swap.py's table (PyTorch path): Qwen3's and Gemma 3's query/key norms, Gemma 2/3's
    extra norms; Phi-3 keeps its MLP (gate and up are one fused Linear there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    common = {k: v for k, v in tiny_config("llama", VOCAB).to_dict().items()
              if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, head_dim=16, pad_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    fused = copy.deepcopy(model)
    assert len(apply_kernels(fused)) == swaps
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch)
    fused_loss, fused_grads = _loss_and_grads(fused, batch)
    assert fused_loss == pytest.approx(loss, abs=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_unknown_forms_are_left_alone():
    """A Llama with a relu MLP keeps its MLPs (only silu and tanh-gelu are fused) and still computes the same."""
    model = _tiny("llama", hidden_act="relu")
    fused = copy.deepcopy(model)
    swapped = apply_kernels(fused)
    assert swapped and not any(name.endswith("mlp") for name in swapped)
    assert sum(isinstance(m, FusedRmsNorm) for m in fused.modules()) == 5
    assert apply_kernels(fused) == []  # nothing left to swap the second time
    batch = _batch()
    torch.testing.assert_close(fused(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_kernels_are_on_by_default_only_where_triton_compiles_them():
    base = {"datasets": [{"path": "x.jsonl"}]}
    assert not resolve(config_from_dict(base)).kernels  # CPU
    assert resolve(config_from_dict(base), "cuda").kernels == triton_importable()
    assert not resolve(config_from_dict({**base, "performance": "off"}), "cuda").kernels
    assert resolve(config_from_dict({**base, "performance": {"kernels": True}})).kernels  # asked for: the PyTorch path
    assert not resolve(config_from_dict({**base, "performance": {"kernels": False}}), "cuda").kernels
    assert "kernels" in FastPath(kernels=True).describe()


def test_the_loop_trains_the_same_with_kernels_on(tmp_path, tiny_models):
    from test_train import QUIET, make_cfg

    from tuneforge.track.metrics import read_metrics
    from tuneforge.train.loop import train

    logged = {}
    for kernels in (False, True):
        out = f"kernels-{kernels}"
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=out, max_steps=2, performance={"kernels": kernels},
                       **{"lora.dropout": 0.0, "evaluation.before_after": False})
        assert train(cfg, reporter=QUIET)["performance"]["kernels"] == kernels
        logged[kernels] = read_metrics(tmp_path / out / "metrics.jsonl")
    assert len(logged[True]) == len(logged[False]) == 2
    for off, on in zip(logged[False], logged[True]):
        assert on["loss"] == pytest.approx(off["loss"], abs=1e-5)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-4)
