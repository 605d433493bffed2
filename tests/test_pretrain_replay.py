"""A replay share of general text (`ratio` / `weight` on a raw-text dataset): drawn deterministically from a stream
of its own, and the data position still exact after a kill and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_pretrain import QUIET, make_cfg, stories
from tuneforge.data.batching import epoch_order
from tuneforge.data.dataset import prepare_data
from tuneforge.models.init import run_tokenizer
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints
from tuneforge.train.loop import train

FACTS = ["Paris is in France.", "Rain falls from clouds.", "Iron is a metal.", "Seven is a prime number.",
         "Whales live in the sea.", "Ice melts when warm."]


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("\n\n".join(stories(60)) + "\n")  # the domain text
    general = [" ".join(FACTS[(i + k) % len(FACTS)] for k in range(4)) for i in range(90)]
    (tmp_path / "general.txt").write_text("\n\n".join(general) + "\n")


def replay_cfg(tmp_path, ratio=0.25, **over):
    return make_cfg(tmp_path, datasets=[{"path": "a.txt"}, {"path": "general.txt", "ratio": ratio}], **over)


def test_replay_share_is_drawn_from_the_general_stream_each_epoch(tmp_path, corpora):
    cfg = replay_cfg(tmp_path)
    tokenizer = run_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    n_domain, n_general = data.dataset_sizes
    assert len(data.train) == n_domain + n_general and n_general > n_domain / 3
    epochs = [epoch_order(data.dataset_sizes, data.dataset_weights, cfg.seed, e) for e in range(2)]
    for order in epochs:
        domain = sorted(i for i in order if i < n_domain)
        replay = [i for i in order if i >= n_domain]
        assert domain == list(range(n_domain))  # every domain block once per epoch
        assert len(replay) == round(n_domain * 0.25 / 0.75) and len(set(replay)) == len(replay)  # 25% of the epoch
        for i in replay:  # replayed blocks hold general text only, domain blocks none of it
            text = tokenizer.decode(data.train.block(i))
            assert any(fact.split()[0] in text for fact in FACTS) and "had a" not in text
        assert not any("Paris" in tokenizer.decode(data.train.block(i)) for i in domain)
    assert set(epochs[0]) - set(range(n_domain)) != set(epochs[1]) - set(range(n_domain))  # another share each epoch
    again = prepare_data(cfg, tokenizer)
    assert epoch_order(again.dataset_sizes, again.dataset_weights, cfg.seed, 1) == epochs[1]  # a function of the seed


def test_replay_resumes_at_the_exact_block_bit_equal(tmp_path, corpora):
    over = {"save_every": 2, "keep_last": 5, "max_steps": 4}
    train(replay_cfg(tmp_path, out="full", **over), reporter=QUIET)
    cut = replay_cfg(tmp_path, out="cut", **over)
    assert train(cut, reporter=QUIET, stop_after=2) == {"stopped_at": 2}  # as kill -9 after step 2
    train(cut, resume=True, reporter=QUIET)
    full, resumed = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["examples"] for m in resumed] == [m["examples"] for m in full]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    n_domain = prepare_data(cut, run_tokenizer(cut)).dataset_sizes[0]
    assert any(i >= n_domain for m in full for i in m["examples"])  # replayed blocks were trained
    a = load_file(list_checkpoints(tmp_path / "full")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "cut")[-1] / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
