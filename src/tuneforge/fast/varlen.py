"""Per-example attention for padding-free rows: a packed row costs the sum of L_i^2 query-key pairs, not T^2.

transformers reads a padding-free row (positions restarting at 0, no attention_mask) as packed and
builds a block-diagonal T x T mask for sdpa, which still scores every pair of the row. Here an
attention function registered through transformers' own `AttentionInterface` (and a mask function
through `AttentionMaskInterface`, so that no T x T mask is built for such a row) cuts the row at the
position resets and attends within each example alone:

- CUDA: torch's variable-length attention (torch.nn.attention.varlen) when this torch has it and it
  covers the call, else flash_attn's `flash_attn_varlen_func` when installed, else the loop below;
- otherwise, and as the fallback: sdpa once per example (exact), or the eager product with
  soft-capping for models that cap their attention logits (Gemma 2).

Causal masking, sliding windows, grouped-query attention, `scaling`, dropout and soft-capping are
honoured per example. Anything else (a padded batch with its mask, generation with a cache, where
the query is shorter than the keys) goes to the model's own implementation unchanged.
"""

from __future__ import annotations

import inspect
import sys
from functools import cache

import torch
import torch.nn.functional as F

from tuneforge.models.layers import transformers_model

# Our implementation's name for each implementation it stands in for. Neither contains "sdpa",
# "flash" or "flex": transformers would run its own checks for those on set_attn_implementation.
NAMES = {"sdpa": "tuneforge_varlen", "eager": "tuneforge_varlen_eager"}
# Decoder-only text models whose attention modules pass `position_ids`, `sliding_window` and
# `softcap` through to the attention function and build their masks with masking_utils.
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


def supports(model) -> bool:
    """Whether `apply_varlen_attention` would switch this model (under PEFT and DDP wrappers or not)."""
    config = getattr(transformers_model(model), "config", None)
    return (config is not None and config.model_type in SUPPORTED
            and config._attn_implementation in {*NAMES, *NAMES.values()}
            and not getattr(config, "use_bidirectional_attention", False))


def apply_varlen_attention(model) -> str | None:
    """Switch a loaded model's attention to per-example attention, through set_attn_implementation.
    Returns the implementation it stands in for ("sdpa" or "eager"), None when the model is left as
    is (an unsupported architecture, or flash/flex attention, which handle packed rows themselves).
    The name lives only in the in-memory config: transformers never writes it to config.json."""
    if not supports(model):
        return None
    lm = transformers_model(model)
    current = lm.config._attn_implementation
    if current in NAMES.values():
        return next(base for base, name in NAMES.items() if name == current)
    register()
    lm.set_attn_implementation(NAMES[current])
    return current


def register() -> None:
    """Make our names known to transformers (idempotent; registration is process-wide)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base, name in NAMES.items():
        AttentionInterface.register(name, _attention_for(base))
        AttentionMaskInterface.register(name, _mask_for(base))


def _mask_for(base: str):
    """No mask at all where the attention function cuts the row itself (no padding mask, no cache
    offset); the base implementation's own mask everywhere else."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    base_mask = sdpa_mask if base == "sdpa" else eager_mask

    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
        if attention_mask is None and q_length == kv_length and kv_offset == 0 and not _nonzero(q_offset):
            return None
        return base_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)

    return mask


def _nonzero(offset) -> bool:
    return bool(offset != 0) if isinstance(offset, torch.Tensor) else offset != 0


def _attention_for(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        """query (B, H, T, D), key and value (B, H_kv, S, D) -> ((B, T, H, D), None), as transformers'
        attention functions do."""
        window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
        batch, _, length, _ = query.shape
        if attention_mask is not None or key.shape[2] != length or not getattr(module, "is_causal", True):
            return _base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)
        lengths = example_lengths(kwargs.get("position_ids"), batch, length)
        whole_rows = len(lengths) == batch
        if whole_rows and base == "sdpa" and softcap is None and (window is None or window >= length):
            # One example per row and nothing to cut: exactly what sdpa ran before (is_causal).
            return _base_attention(base, module)(module, query, key, value, None, **kwargs)
        dropout = kwargs.get("dropout", 0.0)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        out = varlen_attention(*map(flat, (query, key, value)), lengths, scaling, dropout, window, softcap,
                               module.training)
        return out.view(batch, length, *out.shape[1:]), None

    return attention


def flat(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, D) -> (B*T, heads, D); a padding-free row (B = 1) as a view, not a copy."""
    if t.shape[0] == 1:
        return t.squeeze(0).transpose(0, 1)
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1])


def _base_attention(base: str, module):
    """sdpa, or the model's own eager function (module-level in its modeling file, as transformers
    itself passes it to get_interface as the default)."""
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward beside it; turn "
                           "performance.varlen_attention off for this model")
    return eager


# The last position_ids read and their lengths. Every layer of a forward (and its recomputation under
# checkpointing) gets the same tensor: reading it once spares a device-to-host copy per layer. The tensor
# is held, so its identity cannot pass to another; its version counter catches a write in place.
_last: list = [None, None, None]


def example_lengths(position_ids: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Lengths of the examples of the flattened (batch x length) tokens: one starts at every row and
    wherever the position does not follow the one before (transformers' own packed-row rule)."""
    if position_ids is None:
        return [length] * batch
    key = (batch, length, position_ids._version)
    if _last[0] is position_ids and _last[1] == key:
        return _last[2]
    positions = position_ids.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    first = torch.nonzero(starts.reshape(-1)).flatten().tolist()
    lengths = [b - a for a, b in zip(first, first[1:] + [batch * length])]
    _last[:] = [position_ids, key, lengths]
    return lengths


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scaling: float,
                     dropout: float = 0.0, window: int | None = None, softcap: float | None = None,
                     training: bool = False) -> torch.Tensor:
    """Causal attention within each example of q (N, H, D), k and v (N, H_kv, D), the examples of
    `lengths` back to back; keys further back than `window` are not seen. Returns (N, H, D)."""
    dropout = dropout if training else 0.0
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernel = _cuda_kernel(q, k, dropout, window, softcap)
        if kernel is not None:
            cu = torch.tensor([0, *lengths], device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            return kernel(*(t.contiguous() for t in (q, k, v)), cu, max(lengths), scaling, dropout, window, softcap)
    # Each example as a (1, heads, n, D) view. split, not slicing: the backward of a slice writes its
    # gradient into zeros the size of the whole row, once per example, where split's concatenates once.
    outs = [_one_example(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], scaling,
                         dropout, window, softcap).squeeze(0)
            for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outs, dim=1).transpose(0, 1)


def _one_example(q, k, v, scaling, dropout, window, softcap):
    n, groups = q.shape[2], q.shape[1] // k.shape[1]
    allowed = None
    if window is not None and window < n:
        i = torch.arange(n, device=q.device)
        gap = i[:, None] - i[None, :]
        allowed = (gap >= 0) & (gap < window)  # transformers' sliding window: kv > q - window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                              is_causal=allowed is None, enable_gqa=groups > 1)
    # sdpa cannot cap logits: the eager product, as Gemma 2's own eager attention computes it.
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


def _cuda_kernel(q, k, dropout, window, softcap):
    """The fastest variable-length kernel that covers this call, or None (the loop then runs)."""
    torch_varlen = _torch_varlen()
    if torch_varlen is not None and dropout == 0.0 and softcap is None:
        params = _torch_varlen_params()
        if "scale" in params and (window is None or "window_size" in params):
            return _run_torch_varlen
    if _flash_attn_varlen() is not None:
        return _run_flash_attn
    return None


@cache
def _torch_varlen_params():
    """The keyword arguments this torch's varlen_attn takes (its signature changed between releases);
    read once, not in every layer of every forward."""
    return inspect.signature(_torch_varlen()).parameters


@cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _run_torch_varlen(q, k, v, cu, longest, scaling, dropout, window, softcap):
    params = _torch_varlen_params()
    extra = {}
    if window is not None:
        extra["window_size"] = (window - 1, 0)
    elif "window_size" in params:
        extra["window_size"] = (-1, 0)  # causal, in the newer signature
    if "is_causal" in params:
        extra["is_causal"] = True  # causal, in the older signature
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # an older torch: each key-value head repeated for its group of query heads
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _torch_varlen()(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)


def _run_flash_attn(q, k, v, cu, longest, scaling, dropout, window, softcap):
    window_size = (window - 1, 0) if window is not None else (-1, -1)
    return _flash_attn_varlen()(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling,
                                causal=True, window_size=window_size, softcap=softcap or 0.0)
