"""Merge methods against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.merge import methods

T = torch.tensor


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32), atol=atol, rtol=0)


def test_linear_normalises_by_the_sum_of_weights():
    a, b = T([1.0, 2.0]), T([5.0, -2.0])
    close(methods.linear([a, b], [1, 3]), [(1 + 15) / 4, (2 - 6) / 4])
    close(methods.linear([a, b], [1, 3], normalize=False), [16.0, -4.0])
    close(methods.linear([a, b], [1, 1]), [3.0, 0.0])


def test_linear_refuses_to_normalise_weights_that_sum_to_zero():
    with pytest.raises(ValueError, match="sum to 0"):
        methods.linear([T([1.0]), T([2.0])], [1, -1])


def test_methods_compute_in_float32_whatever_the_input_dtype():
    a, b = T([1.0, 2.0], dtype=torch.bfloat16), T([3.0, 4.0], dtype=torch.bfloat16)
    assert methods.linear([a, b], [1, 1]).dtype == torch.float32
    assert methods.slerp(a, b, 0.5).dtype == torch.float32
    assert methods.ties(a, [b], [1], 1.0).dtype == torch.float32


def test_slerp_of_orthogonal_unit_vectors_follows_the_circle():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    close(methods.slerp(a, b, 0.0), [1.0, 0.0])
    close(methods.slerp(a, b, 1.0), [0.0, 1.0])
    close(methods.slerp(a, b, 0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    close(methods.slerp(a, b, 1 / 3), [math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_slerp_weights_apply_to_the_unnormalised_tensors():
    # theta = 90 degrees, so both coefficients are sin(45)/sin(90) = sqrt(0.5) at t = 0.5.
    close(methods.slerp(T([[2.0, 0.0]]), T([[0.0, 1.0]]), 0.5), [[2 * math.sqrt(0.5), math.sqrt(0.5)]])


def test_slerp_falls_back_to_linear_for_colinear_or_zero_tensors():
    close(methods.slerp(T([1.0, 2.0]), T([2.0, 4.0]), 0.25), [1.25, 2.5])
    close(methods.slerp(T([0.0, 0.0]), T([2.0, 4.0]), 0.5), [1.0, 2.0])


def test_task_arithmetic_adds_weighted_scaled_task_vectors():
    base, t1, t2 = T([1.0, 2.0]), T([2.0, 2.0]), T([1.0, 5.0])
    # task vectors [1, 0] and [0, 3]; 0.5*[1, 0] + 2*[0, 3] = [0.5, 6]; times lambda 2, plus base
    close(methods.task_arithmetic(base, [t1, t2], [0.5, 2.0], lambda_=2.0), [2.0, 14.0])


BASE = T([1.0, 1, 1, 1, 1, 1])
TV = [
    T([4.0, -3, 0.5, 2, -1, 0.2]),
    T([-2.0, -1, 3, 0.1, 5, -0.3]),
    T([1.0, 2, -0.4, -6, 0.3, 0.7]),
]
MODELS = [BASE + tv for tv in TV]


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    # density 0.5 keeps 3 of 6 per model:
    #   [4, -3, 0, 2, 0, 0], [-2, 0, 3, 0, 5, 0], [1, 2, 0, -6, 0, 0]
    # mass (sum):  [3, -1, 3, -4, 5, 0] -> signs [+, -, +, -, +, + (tie)]
    # agreeing entries, mean: [(4+1)/2, -3, 3, -6, 5, nothing -> 0]
    merged = [2.5, -3.0, 3.0, -6.0, 5.0, 0.0]
    close(methods.ties(BASE, MODELS, [1, 1, 1], 0.5), (BASE + T(merged)).tolist())


def test_ties_weights_and_lambda():
    # weights [2, 1, 1]: weighted trimmed [8, -6, 0, 4, 0, 0], [-2, 0, 3, 0, 5, 0], [1, 2, 0, -6, 0, 0]
    # mass [7, -4, 3, -2, 5, 0]; weighted mean of agreeing: [(8+1)/3, -6/2, 3, -6, 5, 0]
    merged = T([3.0, -3.0, 3.0, -6.0, 5.0, 0.0])
    close(methods.ties(BASE, MODELS, [2, 1, 1], 0.5, lambda_=0.5), (BASE + 0.5 * merged).tolist())


def test_ties_takes_one_density_per_model():
    # model 0 keeps only its largest entry (4); the others keep all six
    expected = methods.ties(BASE, [BASE + T([4.0, 0, 0, 0, 0, 0]), MODELS[1], MODELS[2]], [1, 1, 1], 1.0)
    close(methods.ties(BASE, MODELS, [1, 1, 1], [1 / 6, 1.0, 1.0]), expected.tolist())


def test_dare_with_density_one_is_task_arithmetic_and_ties():
    w = [0.7, 0.2, 0.4]
    close(methods.dare_linear(BASE, MODELS, w, 1.0, seed=1, lambda_=0.9),
          methods.task_arithmetic(BASE, MODELS, w, lambda_=0.9).tolist())
    close(methods.dare_ties(BASE, MODELS, w, 1.0, seed=1), methods.ties(BASE, MODELS, w, 1.0).tolist())


def test_dare_drops_at_random_and_rescales_the_kept_entries():
    base = torch.zeros(20_000)
    tv = torch.linspace(1, 2, 20_000)
    out = methods.dare_linear(base, [tv], [1.0], 0.25, seed=7)
    kept = out != 0
    assert 0.23 < kept.float().mean() < 0.27
    close(out[kept], (tv[kept] / 0.25).tolist())
    # seeded: the same seed repeats the mask, another seed draws a different one
    assert torch.equal(out, methods.dare_linear(base, [tv], [1.0], 0.25, seed=7))
    assert not torch.equal(out, methods.dare_linear(base, [tv], [1.0], 0.25, seed=8))


def test_dare_ties_elects_signs_after_the_drop():
    base = torch.zeros(4)
    a, b = T([1.0, -1, 2, -2]), T([-3.0, -1, 2, 0.5])
    out = methods.dare_ties(base, [a, b], [1, 1], 0.5, seed=3)
    generator = torch.Generator().manual_seed(3)
    keep_a = torch.rand(4, generator=generator) < 0.5
    keep_b = torch.rand(4, generator=generator) < 0.5
    dropped_a, dropped_b = a * keep_a / 0.5, b * keep_b / 0.5
    close(out, methods.ties(base, [dropped_a, dropped_b], [1, 1], 1.0).tolist())


def test_model_stock_identical_task_vectors_give_their_mean():
    base = T([1.0, 2.0, 3.0])
    ft = base + T([0.5, -1.0, 2.0])
    assert methods.model_stock_ratio(base, [ft, ft.clone(), ft.clone()]) == pytest.approx(1.0)
    close(methods.model_stock(base, [ft, ft.clone()]), ft.tolist())


def test_model_stock_ratio_from_the_angle_between_task_vectors():
    base = T([1.0, 1.0])
    a, b = base + T([1.0, 0.0]), base + T([1.0, 1.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert methods.model_stock_ratio(base, [a, b]) == pytest.approx(t)
    close(methods.model_stock(base, [a, b]), (t * (a + b) / 2 + (1 - t) * base).tolist())


def test_model_stock_orthogonal_task_vectors_keep_the_base():
    base = T([1.0, 1.0])
    close(methods.model_stock(base, [base + T([1.0, 0.0]), base + T([0.0, 2.0])]), [1.0, 1.0])


def test_model_stock_needs_two_models():
    with pytest.raises(ValueError, match="at least two"):
        methods.model_stock(T([1.0]), [T([2.0])])
