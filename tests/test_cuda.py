"""The GPU paths no CPU can run: Triton kernels compiled for the GPU (RMSNorm, gated MLP, cross-entropy),
the variable-length attention kernels, and a training step of the whole fast path against the plain path.

Skipped without CUDA (CI has none). The first session with a GPU runs them with the one command in
bench/RESULTS.md before it trusts any speed figure.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_kernel_on_the_gpu(dtype, tol, gemma):
    from tuneforge.fast.kernels.launch import triton_runs
    from tuneforge.fast.kernels.rms_norm import rms_norm, rms_norm_reference

    torch.manual_seed(0)
    x = torch.randn(37, 4096, device=CUDA, dtype=dtype, requires_grad=True)
    w = torch.randn(4096, device=CUDA, dtype=dtype, requires_grad=True)
    assert triton_runs(x)
    fused = rms_norm(x, w, 1e-6, gemma)
    reference = rms_norm_reference(x, w, 1e-6, gemma)
    torch.testing.assert_close(fused.float(), reference.float(), atol=tol, rtol=tol)
    dy = torch.randn_like(fused)
    grads = torch.autograd.grad(fused, (x, w), dy)
    expected = torch.autograd.grad(reference, (x, w), dy)
    for got, want in zip(grads, expected):
        # the weight's gradient sums 37 rows: its rounding grows with them
        torch.testing.assert_close(got.float(), want.float(), atol=tol * 8, rtol=tol * 8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_kernel_on_the_gpu(dtype, tol, gelu):
    from tuneforge.fast.kernels.gated_mlp import gated, gated_reference

    torch.manual_seed(0)
    gate = torch.randn(3, 513, 1408, device=CUDA, dtype=dtype, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    fused, reference = gated(gate, up, gelu), gated_reference(gate, up, gelu)
    torch.testing.assert_close(fused.float(), reference.float(), atol=tol, rtol=tol)
    dh = torch.randn_like(fused)
    for got, want in zip(torch.autograd.grad(fused, (gate, up), dh), torch.autograd.grad(reference, (gate, up), dh)):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cross_entropy_kernel_on_the_gpu(dtype, tol, softcap):
    """The chunked loss and log-probs with the kernel against their PyTorch path, at Llama 3's vocabulary
    (128,256: 16 blocks, the last partial) in chunks of 96 of 300 rows."""
    from tuneforge.fast.chunked_logps import label_logps
    from tuneforge.fast.chunked_loss import kernel_runs, linear_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(300, 512, device=CUDA, dtype=dtype, requires_grad=True)
    weight = (torch.randn(128256, 512, device=CUDA) / 8).to(dtype).requires_grad_()
    labels = torch.randint(0, 128256, (300,), device=CUDA)
    assert kernel_runs(hidden, kernel=True)
    labels[::5] = -100
    losses = [linear_cross_entropy_sum(hidden, weight, labels, 96, softcap, kernel=k) for k in (True, False)]
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=tol)
    grads = [torch.autograd.grad(loss, (hidden, weight)) for loss in losses]
    for got, want in zip(*grads):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    labels[::5] = 0
    g = torch.randn(300, device=CUDA)
    logps = [label_logps(hidden, weight, labels, 96, softcap, 0.7, kernel=k) for k in (True, False)]
    torch.testing.assert_close(logps[0], logps[1], atol=tol, rtol=tol)
    grads = [torch.autograd.grad((g * lp).sum(), (hidden, weight)) for lp in logps]
    for got, want in zip(*grads):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_fused_lora_layer_under_bf16_autocast_on_the_gpu():
    """fast/fused_lora.py as the loop runs it on a GPU (bf16 base, fp32 adapter, bf16 autocast) against PEFT's forward."""
    import copy

    from peft import LoraConfig, get_peft_model

    from tuneforge.fast.fused_lora import apply_fused_lora

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(1024, 2816, bias=False)).to(CUDA, torch.bfloat16)
    peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], init_lora_weights=False))
    fused = copy.deepcopy(peft)
    assert apply_fused_lora(fused)
    x = torch.randn(4, 513, 1024, device=CUDA, dtype=torch.bfloat16)
    dy = torch.randn(4, 513, 2816, device=CUDA, dtype=torch.bfloat16)
    results = []
    for model in (peft, fused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(xi)
            out.backward(dy)
        results.append([out, xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for want, got in zip(*results):  # bf16 rounds each path's products differently: compared as a whole
        assert got.dtype == want.dtype
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_variable_length_kernel_equals_the_loop_per_example(window, kv_heads):
    """The CUDA kernel fast/varlen.py picks (torch's varlen_attn or flash_attn) against sdpa per example."""
    from tuneforge.fast import varlen

    torch.manual_seed(0)
    lengths = [7, 130, 1, 64, 300]
    n = sum(lengths)
    q = torch.randn(n, 8, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, kv_heads, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    kernel = varlen._cuda_kernel(q, k, 0.0, window, None)
    if kernel is None:
        pytest.skip("neither torch.nn.attention.varlen nor flash_attn is usable here: the loop runs")
    fast = varlen.varlen_attention(q, k, v, lengths, 0.125, window=window)
    loop = torch.cat([varlen._one_example(*(t[a:a + m].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), 0.125,
                                          0.0, window, None)[0].transpose(0, 1)
                      for a, m in zip(varlen._starts(lengths), lengths)])
    torch.testing.assert_close(fast.float(), loop.float(), atol=2e-2, rtol=2e-2)
    do = torch.randn_like(fast)
    for got, want in zip(torch.autograd.grad(fast, (q, k, v), do), torch.autograd.grad(loop, (q, k, v), do)):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_fast_path_step_equals_the_plain_step_on_the_gpu(tmp_path, tiny_models):
    """A whole LoRA step in bf16 with every default switch on (kernels, fused LoRA layers, per-example
    attention, chunked loss, fused AdamW) against performance: off: the same losses to bf16 rounding."""
    from test_train import QUIET, make_cfg

    from tuneforge.track.metrics import read_metrics
    from tuneforge.train.loop import train

    losses = {}
    for mode in ("off", "auto"):
        cfg = make_cfg(tmp_path / mode, tiny_models["llama"], device="cuda", precision="bf16", max_steps=4,
                       performance=mode, **{"evaluation.before_after": False, "lora.dropout": 0.0})
        run = train(cfg, reporter=QUIET)
        if mode == "auto":
            assert run["performance"]["kernels"] and run["performance"]["varlen_attention"], run["performance"]
            assert run["performance"]["fused_lora"], run["performance"]
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode / "run" / "metrics.jsonl")]
    assert losses["auto"] == pytest.approx(losses["off"], rel=2e-2)
