"""Model-merging methods as pure functions on one tensor per model.

Each function takes the same-named tensor from every input model (and the base model where
the method works on task vectors, t_i - base) and returns the merged tensor in float32; the
caller casts it to the output dtype. Weights and densities are per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor

# Above this |cosine| two tensors are treated as colinear: slerp's sin(theta) is too small to divide by.
COLINEAR_DOT = 0.9995


def _per_model(values: float | Sequence[float], n: int, like: Tensor) -> Tensor:
    """A (n, 1, ..., 1) float32 tensor of per-model values that broadcasts over a stack of n tensors."""
    vals = [float(values)] * n if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(vals) != n:
        raise ValueError(f"expected {n} values, one per model, got {len(vals)}")
    return torch.tensor(vals, dtype=torch.float32).view(n, *([1] * like.dim()))


def _task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(base in float32, stacked task vectors t_i - base)."""
    base32 = base.float()
    return base32, torch.stack([t.float() - base32 for t in tensors])


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Weighted average of the weights ("model soups", Wortsman et al. 2022).

    With normalize the weights are divided by their sum, so [1, 1] is the plain mean.
    """
    stacked = torch.stack([t.float() for t in tensors])
    w = _per_model(weights, len(tensors), stacked[0])
    total = (w * stacked).sum(0)
    if normalize:
        norm = float(w.sum())
        if norm == 0.0:
            raise ValueError("linear: the weights sum to 0, so they cannot be normalised")
        total = total / norm
    return total


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves").

    The angle is taken between the flattened, normalised tensors and the interpolation weights
    are applied to the originals, so norms interpolate too (as in mergekit). Nearly colinear or
    zero tensors fall back to linear interpolation, where slerp would divide by sin(0).
    """
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a32 + t * b32
    dot = float((a32.flatten() / na) @ (b32.flatten() / nb))
    if abs(dot) > COLINEAR_DOT:
        return (1 - t) * a32 + t * b32
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a32 + (math.sin(t * theta) / s) * b32


def task_arithmetic(
    base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], lambda_: float = 1.0
) -> Tensor:
    """base + lambda * sum_i w_i (t_i - base) ("Editing models with task arithmetic", Ilharco et al. 2023)."""
    base32, deltas = _task_vectors(base, tensors)
    w = _per_model(weights, len(tensors), base32)
    return base32 + lambda_ * (w * deltas).sum(0)


def _trim(delta: Tensor, density: float) -> Tensor:
    """Keep the round(density * numel) largest-magnitude entries (at least one), zero the rest."""
    if density >= 1.0:
        return delta
    flat = delta.flatten()
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(delta)


def _drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability density and rescale the kept ones by 1/density (DARE)."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def _elect_and_merge(weighted: Tensor, w: Tensor) -> Tensor:
    """TIES sign election by mass and disjoint mean.

    The sign of each entry is the sign of the sum of the weighted task vectors (ties go to +);
    each entry is then the weighted mean over only the models whose entry is non-zero and
    agrees with that sign. Entries no model keeps stay 0.
    """
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == elected
    total = (weighted * agree).sum(0)
    divisor = (w * agree).sum(0)
    return torch.where(divisor == 0, torch.zeros_like(total), total / torch.where(divisor == 0, 1.0, divisor))


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    lambda_: float = 1.0,
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models").

    Trim each task vector to its top-density magnitudes, elect a sign per entry by mass, and
    average only the entries that agree with it; base + lambda * that mean.
    """
    base32, deltas = _task_vectors(base, tensors)
    dens = _per_model(density, len(tensors), base32).flatten().tolist()
    trimmed = torch.stack([_trim(d, p) for d, p in zip(deltas, dens)])
    w = _per_model(weights, len(tensors), base32)
    return base32 + lambda_ * _elect_and_merge(w * trimmed, w)


def _dropped(base32: Tensor, deltas: Tensor, density, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    dens = _per_model(density, len(deltas), base32).flatten().tolist()
    return torch.stack([_drop(d, p, generator) for d, p in zip(deltas, dens)])


def dare_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    seed: int,
    lambda_: float = 1.0,
) -> Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario") then task arithmetic.

    Each task-vector entry is kept with probability density and rescaled by 1/density, so the
    expected task vector is unchanged; the same seed gives the same drop masks.
    """
    base32, deltas = _task_vectors(base, tensors)
    w = _per_model(weights, len(tensors), base32)
    return base32 + lambda_ * (w * _dropped(base32, deltas, density, seed)).sum(0)


def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    seed: int,
    lambda_: float = 1.0,
) -> Tensor:
    """DARE random drop and rescale (Yu et al. 2024), then TIES sign election and disjoint mean (Yadav et al. 2023)."""
    base32, deltas = _task_vectors(base, tensors)
    w = _per_model(weights, len(tensors), base32)
    return base32 + lambda_ * _elect_and_merge(w * _dropped(base32, deltas, density, seed), w)


def model_stock_ratio(base: Tensor, tensors: Sequence[Tensor]) -> float:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos) for one tensor.

    cos is the mean pairwise cosine of the k task vectors; a zero task vector counts as
    cosine 0. A negative mean is taken as 0 (t = 0, the base): the paper's geometry assumes
    fine-tuned weights scattered around a common centre, and for cos <= -1/(k-1) the formula
    would divide by zero or flip sign.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two fine-tuned models")
    _, deltas = _task_vectors(base, tensors)
    flat = deltas.flatten(1)
    norms = flat.norm(dim=1)
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            denom = float(norms[i] * norms[j])
            cosines.append(float(flat[i] @ flat[j]) / denom if denom > 0 else 0.0)
    cos = max(0.0, min(1.0, sum(cosines) / len(cosines)))
    k = len(tensors)
    return k * cos / (1 + (k - 1) * cos)


def model_stock(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models").

    t * mean(tensors) + (1 - t) * base, with t from the angle between the task vectors
    (model_stock_ratio), computed per tensor.
    """
    t = model_stock_ratio(base, tensors)
    mean = torch.stack([x.float() for x in tensors]).mean(0)
    return t * mean + (1 - t) * base.float()
