"""A quantized frozen base for QLoRA: bitsandbytes through transformers' BitsAndBytesConfig, on CUDA and CPU.

The same quantization config loads the base for training, for answering with the adapter on top, and
for the dequantized merge, so all three see the same rounded weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from tuneforge.config import QuantizationConfig
from tuneforge.errors import ConfigError, ModelError

INSTALL_HINT = "pip install 'tuneforge[qlora]' (bitsandbytes)"


def require_bitsandbytes(key: str):
    """The bitsandbytes module, or an error naming the config key that needs it and how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"{key} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    return bitsandbytes


def bnb_config(q: QuantizationConfig, compute_dtype: torch.dtype, keep: list[str] | None = None):
    """transformers' BitsAndBytesConfig for our quantization section; matmuls run in `compute_dtype`; `keep`
    names modules left unquantized (default: transformers' choice, the language-model head).

    storage: compute packs the 4-bit weights into tensors of the compute dtype (same bytes, other
    element type), so FSDP can shard them like the layer's other weights (R-DIST-3).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=q.bits == 4,
        load_in_8bit=q.bits == 8,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if q.storage == "compute" else torch.uint8,
        llm_int8_skip_modules=keep,
    )


def keep_cpu_training_layout(model) -> None:
    """Keep bitsandbytes' 4-bit CPU weights in the layout that training and dequantizing read.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for a bf16 inference
    kernel the first time it runs in eval mode without gradients. After that the layer computes in
    bf16, backward through it gives wrong gradients (the kernel has no autograd), and dequantizing
    reads the repacked bytes. The loop evaluates before and during training, so that path is turned off.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_quantized(folder: Path, device: torch.device, q: QuantizationConfig, dtype: torch.dtype,
                   trust_remote_code: bool = False, build: Callable | None = None, keep: list[str] | None = None):
    """The base with every linear layer but the output head quantized; other weights in `dtype`. `build`
    (from_pretrained's keywords -> model: models/load.py HEADS bound to the folder) loads another head than the
    language model's; `keep` names that head's modules, which stay unquantized since they train whole."""
    from transformers import AutoModelForCausalLM

    if build is None:
        def build(**kw):
            return AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    require_bitsandbytes(f"adapter: qlora ({q.bits}-bit base)")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"adapter: qlora runs on CUDA or CPU (bitsandbytes), not {device.type}; set device: cuda or cpu")
    # bitsandbytes quantizes while the weights are placed, so the device is chosen at load time.
    place = "cpu" if device.type == "cpu" else (device.index if device.index is not None else torch.cuda.current_device())
    try:
        model = build(dtype=dtype, quantization_config=bnb_config(q, dtype, keep), device_map={"": place},
                      trust_remote_code=trust_remote_code, use_safetensors=True)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"base_model: could not load {folder} quantized to {q.bits} bits: {err}") from None
    if device.type == "cpu":
        keep_cpu_training_layout(model)
    return model


def dequantized_model(folder: Path, q: QuantizationConfig, trust_remote_code: bool = False):
    """The base exactly as training saw it, in fp32: quantized with the run's config, then dequantized.

    This, not the original 16-bit checkpoint, is what a QLoRA adapter learned to correct (R-MRG-1).
    """
    model = load_quantized(folder, torch.device("cpu"), q, torch.float32, trust_remote_code)
    return model.dequantize(dtype=torch.float32)
