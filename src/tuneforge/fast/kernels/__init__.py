"""Fused kernels for a decoder's elementwise work: RMSNorm and the gated MLP's activation; and the
softmax work of the chunked losses.

Each of the first two is one torch.autograd.Function with a Triton kernel (CUDA, or Triton's CPU
interpreter in the tests) and the same arithmetic in PyTorch everywhere else. `apply_kernels(model)`
swaps them into a loaded model; the rest of tuneforge does not know they are there. The cross-entropy
kernel (cross_entropy_triton.py) is no module: fast/chunked_loss.py and fast/chunked_logps.py call it
for each chunk when the fast path's kernels switch is on, and keep their PyTorch path for elsewhere.
"""

from __future__ import annotations

from tuneforge.fast.kernels.launch import triton_importable
from tuneforge.fast.kernels.swap import apply_kernels

__all__ = ["apply_kernels", "triton_importable"]
