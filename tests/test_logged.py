"""What a step and an evaluation log: throughput, padding, loader wait, memory, layer norms, per-token losses."""

from __future__ import annotations

import pytest
import torch
from test_train import CPU, QUIET, make_cfg

from tuneforge.data.batching import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.eval.evaluate import validation_loss
from tuneforge.methods.sft import count_trained, sft_loss_sum
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.track.gradients import LayerNorms
from tuneforge.track.metrics import read_metrics
from tuneforge.train.loop import train


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("logged")
    # The padded path (performance: off), whose padding share is not zero.
    cfg = make_cfg(tmp, tiny_models["llama"], max_steps=4, eval_every=2, performance="off",
                   **{"evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    return cfg, read_metrics(tmp / "run" / "metrics.jsonl")


def test_every_step_logs_the_seed_list(logged_run):
    _, records = logged_run
    for m in records:
        assert m["lr"] > 0 and m["grad_norm"] > 0 and m["loss"] > 0
        assert 0 < m["trained_tokens"] < m["tokens"] and m["tokens_per_s"] > 0
        assert 0 <= m["padding_share"] < 1
        assert 0 < m["data_share"] < 1 and m["step_s"] > 0
        assert m["rss_mb"] > 50  # a process holding torch and a model
    assert "gpu_util" not in records[0]  # CPU run: no GPU keys


def test_padding_share_is_exact(logged_run, tiny_models):
    cfg, records = logged_run
    data = prepare_data(cfg, load_tokenizer(tiny_models["llama"]))
    lengths = [len(data.train[i].input_ids) for i in records[0]["examples"]]
    assert records[0]["tokens"] == sum(lengths)
    assert records[0]["padding_share"] == pytest.approx(1 - sum(lengths) / (len(lengths) * max(lengths)))


def test_evaluations_log_token_loss_percentiles_and_hardest_examples(logged_run, tiny_models):
    cfg, records = logged_run
    evals = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    m = evals[-1]
    assert m["val_token_loss_p50"] <= m["val_token_loss_p90"] <= m["val_token_loss_p99"] <= m["val_token_loss_max"]
    hardest = m["val_hardest"]
    assert len(hardest) == 5 and [h["loss"] for h in hardest] == sorted((h["loss"] for h in hardest), reverse=True)
    assert all(h["where"].startswith(cfg.datasets[0].path + ":") for h in hardest)
    assert "val_hardest" not in records[0]


def test_hardest_example_loss_is_that_example_alone(tmp_path, tiny_models):
    """The loss named beside a file:line is the loss of that very example; val_loss is unchanged."""
    tok = load_tokenizer(tiny_models["llama"])
    cfg = make_cfg(tmp_path, tiny_models["llama"])
    examples = prepare_data(cfg, tok).validation
    model = load_model(tiny_models["llama"], CPU)
    result = validation_loss(model, examples, tok.pad_token_id, CPU, torch.float32, batch_size=4, hardest=3)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        assert result["val_loss"] == pytest.approx(sft_loss_sum(model, batch).item() / count_trained(batch), rel=1e-9)
    by_where = {e.record.where: e for e in examples}
    for h in result["val_hardest"]:
        alone = validation_loss(model, [by_where[h["where"]]], tok.pad_token_id, CPU, torch.float32)
        assert h["loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
        assert h["tokens"] == alone["val_tokens"]


def test_gradient_spike_names_the_layer_it_came_from():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    norms = LayerNorms(model, factor=5.0, top=2)

    def step(scale_of_middle: float) -> list | None:
        for i, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, scale_of_middle if i in (2, 3) else 0.1)
        norms.measure()
        total = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
        return norms.top_layers(total)

    assert [step(0.1) for _ in range(5)] == [None] * 5
    top = step(100.0)
    assert [t["layer"] for t in top] == ["1.weight", "1.bias"]
    assert top[0]["norm"] == pytest.approx(100.0 * 4)
    assert step(float("nan"))[0]["layer"].startswith("1.")  # a non-finite step always names its layers



def test_steps_with_zero_gradient_do_not_make_every_later_step_a_spike():
    """GRPO steps without reward spread have a zero gradient and are skipped; they are no reference."""
    model = torch.nn.Linear(2, 2)
    norms = LayerNorms(model, factor=5.0)
    for total in (0.0, 0.0, 0.0, 0.0):
        norms.measure()
        assert norms.top_layers(total) is None
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norms.measure()
    assert norms.top_layers(1.0) is None


def test_healthy_steps_log_no_layer_list(logged_run):
    _, records = logged_run
    assert not any("grad_norm_top" in m for m in records)
