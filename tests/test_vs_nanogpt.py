"""bench/vs_nanogpt_cpu.py's arithmetic: nanoGPT's printed losses read right and turned into bits per byte."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import vs_nanogpt_cpu as bench  # noqa: E402

# Written for this test in the shape of nanoGPT's train.py output (log_interval=1, eval_interval=2).
LOG = """tokens per iteration will be: 768
found vocab_size = 46 (inside /tmp/x/meta.pkl)
Initializing a new model from scratch
number of parameters: 0.79M
num decayed parameter tensors: 18, with 800,512 parameters
using fused AdamW: False
step 0: train loss 3.8974, val loss 3.8959
iter 0: loss 3.8764, time 2838.46ms, mfu -100.00%
iter 1: loss 3.8721, time 93.15ms, mfu -100.00%
step 2: train loss 3.1075, val loss 3.1130
saving checkpoint to /tmp/x/out
iter 2: loss 3.0884, time 1710.45ms, mfu -100.00%
iter 3: loss 2.9000, time 101.00ms, mfu 0.00%
"""


def test_nanogpt_log_is_parsed():
    log = bench.parse_nanogpt_log(LOG)
    assert log["evals"] == [(0, 3.8974, 3.8959), (2, 3.1075, 3.1130)]
    assert log["iters"] == [(0, 3.8764, 2838.46), (1, 3.8721, 93.15), (2, 3.0884, 1710.45), (3, 2.9, 101.0)]
    assert log["params_m"] == 0.79
    # iterations 0 and 2 also timed an evaluation: the step time is that of 1 and 3
    assert bench.step_seconds(log["iters"], 2) == pytest.approx([0.09315, 0.101])


def test_nats_per_character_become_bits_per_byte():
    assert bench.bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)  # ASCII: a character is a byte
    assert bench.bits_per_byte(math.log(2), 100, 200) == pytest.approx(0.5)  # two bytes a character
    assert bench.bits_per_byte(2.0, 12549, 12549) == pytest.approx(2.0 / math.log(2))


def test_character_unigram_baseline():
    assert bench.char_unigram_bpb("ab" * 500, "abab") == pytest.approx(1.0)
    # a character never seen in training is add-one smoothed, not infinite
    assert math.isfinite(bench.char_unigram_bpb("aaaa", "ab"))


def test_parameter_count_matches_nanogpts_print():
    # nanoGPT printed 0.79M (its count leaves out the 64 x 128 position embeddings) for this vocabulary
    assert round((bench.nanogpt_parameters(46) - 64 * 128) / 1e6, 2) == 0.79
    assert bench.nanogpt_parameters(46) == 801_664


@pytest.mark.parametrize("budget", [30.0, 240.0, 600.0])
def test_iteration_plan_fits_the_budget_and_ends_on_an_evaluation(budget):
    fixed, eval_s, iter_s = 6.0, 1.5, 0.1
    iters, interval = bench.iteration_plan(budget, fixed, eval_s, iter_s)
    evals = iters // interval + 1
    assert iters % interval == 0  # the last evaluation is at the last iteration
    assert fixed + evals * eval_s + (iters + 1) * iter_s <= budget
    assert fixed + evals * eval_s + (iters + 1) * iter_s >= 0.9 * budget
    assert interval <= 2 * bench.RECIPE_EVAL_INTERVAL
