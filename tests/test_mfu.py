"""MFU in the step metrics on a GPU: the model's FLOPs per token, counted by hand here, x tokens/s over the peak."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import config_from_dict
from tuneforge.track.mfu import gpu_row, mfu_meter

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 256, "vocab_size": 320, "tie_word_embeddings": True}


@pytest.mark.parametrize("torch_name, row", [
    ("NVIDIA H100 80GB HBM3", "H100-80GB"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"), ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("Tesla T4", "T4"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA L40S", "L40S"), ("NVIDIA H100 PCIe", None), ("NVIDIA B200", None),
])
def test_the_gpu_torch_names_finds_its_row_of_peak_rates(torch_name, row):
    found = gpu_row(torch_name)
    assert (found.name if found else None) == row


def test_mfu_is_model_flops_times_tokens_per_second_over_the_peak(tmp_path, monkeypatch):
    # One token's forward: 2 FLOPs per matmul weight (per layer q 64x64, k and v 64x32 (one KV head of 32),
    # o 64x64, gate, up, down 64x256; the output layer 320x64, tied or not) and, per layer and head,
    # 2 x head_dim x max_seq_len for the scores and as many for the weighted sum, halved (a causal window).
    matmul = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256) + 320 * 64
    forward = 2 * matmul + 2 * 2 * 2 * 32 * 128
    cfg = config_from_dict({"datasets": [{"path": "x.jsonl"}], "max_seq_len": 128, "adapter": "full"}, base=tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    meter = mfu_meter(LLAMA, cfg, torch.device("cuda"), torch.bfloat16)
    assert meter(50_000.0)["mfu"] == pytest.approx(50_000 * 3 * forward / 989e12)  # backward = 2 forwards
    assert mfu_meter(LLAMA, cfg, torch.device("cuda"), torch.float32)(50_000.0)["mfu"] == pytest.approx(
        50_000 * 3 * forward / 67e12)
    assert mfu_meter(LLAMA, cfg, torch.device("cpu"), torch.float32)(50_000.0) == {}  # no MFU on the CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    assert mfu_meter(LLAMA, cfg, torch.device("cuda"), torch.bfloat16)(50_000.0) == {}  # not in plan's table
