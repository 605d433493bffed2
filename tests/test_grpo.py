"""GRPO: advantages, the clipped objective, reward checks (R-GRPO-1) and environment masking (R-FEAT-2)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import write_jsonl
from test_train import QUIET, make_cfg
from tuneforge.config import GRPOSpec
from tuneforge.data.dataset import prepare_data
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.errors import ConfigError
from tuneforge.eval.evaluate import stop_token_ids
from tuneforge.methods.grpo import GRPO, clipped_token_loss, group_advantages, kl_per_token
from tuneforge.methods.rewards import RewardError, exact_match, json_valid, length_penalty, load_reward, regex, score
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.track.metrics import read_metrics
from tuneforge.train.loop import train

CPU = torch.device("cpu")


def test_group_advantages_and_zero_spread_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv, std = group_advantages(rewards, "group")
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    assert adv[0].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)] * 1 + [-0.5 / (s + 1e-4), 0.5 / (s + 1e-4)])
    assert adv[1].tolist() == [0.0] * 4 and std.tolist() == pytest.approx([s, 0.0])
    unscaled, _ = group_advantages(rewards, "none")
    assert unscaled[0].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_clipped_objective_and_kl_in_closed_form():
    logps = torch.tensor([[math.log(1.5), math.log(0.5)]])
    old = torch.zeros_like(logps)
    plus = clipped_token_loss(logps, old, torch.tensor([2.0]), 0.2, 0.2)
    assert plus[0].tolist() == pytest.approx([-1.2 * 2.0, -0.5 * 2.0])  # gains capped at 1 + eps
    minus = clipped_token_loss(logps, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert minus[0].tolist() == pytest.approx([1.5, 0.8])  # losses not capped from below: the pessimistic side
    kl = kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5]))
    assert kl.tolist() == pytest.approx([0.0, math.exp(0.5) - 0.5 - 1])


def test_builtin_rewards():
    assert exact_match([""] * 2, [" 12 ", "13"], answer=["12", "12"]) == [1.0, 0.0]
    assert regex([""] * 2, ["42", "42 apples"], pattern=r"\d+") == [1.0, 0.0]
    assert regex([""], ["42 apples"], pattern=r"\d+", full=False) == [1.0]
    assert json_valid([""] * 2, ['{"a": 1}', "{a: 1}"]) == [1.0, 0.0]
    assert length_penalty([""] * 2, ["abcd", "a" * 15], max_chars=10) == [0.0, -0.5]


def test_reward_function_faults_name_the_function_and_the_sample():
    """R-GRPO-1: a reward that raises, returns one value for many completions, or a non-number stops the step."""
    def broken(prompts, completions, **_):
        raise ValueError("boom")

    def single(prompts, completions, **_):
        return [1.0]

    def words(prompts, completions, **_):
        return ["good"] * len(completions)

    def nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    prompts, completions = ["p1", "p2"], ["c1", "c2"]
    with pytest.raises(RewardError, match=r"broken raised ValueError: boom\n.*'c1' to prompt 'p1'"):
        score(broken, prompts, completions, {})
    with pytest.raises(RewardError, match=r"single returned 1 values for 2 completions"):
        score(single, prompts, completions, {})
    with pytest.raises(RewardError, match=r"words returned 'good' for completion 1 \('c1' to prompt 'p1'\)"):
        score(words, prompts, completions, {})
    with pytest.raises(RewardError, match=r"nan returned nan"):
        score(nan, prompts, completions, {})
    with pytest.raises(ConfigError, match="unknown function 'exactmatch'"):
        load_reward("exactmatch", {})
    with pytest.raises(ConfigError, match="cannot load 'no_such_module:f'"):
        load_reward("no_such_module:f", {})


def test_user_reward_function_from_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, completions, bonus=0, **f):\n"
                                            "    return [float(c.isupper()) + bonus for c in completions]\n")
    fn = load_reward("my_rewards:shout", {"bonus": 0.5}, base=tmp_path)
    assert score(fn, ["p", "p"], ["YES", "no"], {}) == [1.5, 0.5]


def prompt_records(n: int = 8) -> list[dict]:
    return [{"prompt": f"Say yes {i}", "answer": "yes"} for i in range(n)]


def grpo_objective(tmp_path, tiny_models, environment=None, **spec):
    data_file = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    grpo = {"generations": 3, "max_completion_tokens": 5, "rewards": [{"function": "length_penalty",
                                                                         "args": {"max_chars": 4}}], **spec}
    if environment:
        grpo.update(environment=environment, max_turns=2)
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="grpo", datasets=[{"path": str(data_file)}], validation=None,
                   grpo=grpo)
    tok = load_tokenizer(tiny_models["llama"])
    data = prepare_data(cfg, tok)
    notes = []
    obj = GRPO(GRPOSpec(**grpo), data, tok.pad_token_id, None, tokenizer=tok,
               stop_ids=stop_token_ids(tok, data.end_of_turn), end_of_turn=data.end_of_turn, device=CPU,
               dtype=torch.float32, base=tmp_path)
    return obj, data, tok, notes


def test_environment_turns_are_context_never_trained(tmp_path, tiny_models):
    """R-FEAT-2: in a multi-turn rollout the environment's tokens carry no labels."""
    (tmp_path / "env_echo.py").write_text(
        "def reply(messages):\n    return {'role': 'user', 'content': 'TOOL SAYS ' + str(len(messages))}\n")
    obj, data, tok, _ = grpo_objective(tmp_path, tiny_models, environment="env_echo:reply")
    model = load_model(tiny_models["llama"], CPU)
    torch.manual_seed(0)
    rows, rewards, _ = obj.rollouts(model, [data.train[0]], 3, seeds=[1, 2, 3])
    assert rewards.shape == (3,)
    prompt_len = len(data.train[0].input_ids)
    stopped_and_answered = [r for r in rows if "TOOL SAYS" in tok.decode(r["ids"])]
    for r in rows:
        assert r["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        trained = [t for t, lab in zip(r["ids"], r["labels"]) if lab != IGNORE_INDEX]
        assert "TOOL SAYS" not in tok.decode(trained)
        assert len(trained) == r["completion_tokens"]  # every generated token, nothing else
    for r in stopped_and_answered:
        env_ids = [t for t, lab in zip(r["ids"][prompt_len:], r["labels"][prompt_len:]) if lab == IGNORE_INDEX]
        assert "TOOL SAYS" in tok.decode(env_ids)


def test_environment_masking_with_a_model_that_always_stops(tmp_path, tiny_models):
    """The same check where the first reply surely ends (max 1 token, then the environment speaks)."""
    (tmp_path / "env_two.py").write_text("def reply(messages):\n    return 'TOOL SAYS hi'\n")
    obj, data, tok, _ = grpo_objective(tmp_path, tiny_models, environment="env_two:reply")
    row = {"ids": list(data.train[0].input_ids) + [obj.stop_ids[0]],
           "labels": [IGNORE_INDEX] * len(data.train[0].input_ids) + [obj.stop_ids[0]],
           "messages": [{"role": "user", "content": "Say yes 0"}, {"role": "assistant", "content": ""}],
           "done": True}
    before = len(row["ids"])
    obj._environment_turn(row)
    added = tok.decode(row["ids"][before:])
    assert "TOOL SAYS hi" in added and added.rstrip().endswith("assistant")
    assert row["labels"][before:] == [IGNORE_INDEX] * (len(row["ids"]) - before) and row["done"] is False


def test_a_step_raises_the_logprob_of_the_better_completions(tmp_path, tiny_models):
    obj, data, tok, _ = grpo_objective(tmp_path, tiny_models)
    model = load_model(tiny_models["llama"], CPU)
    torch.manual_seed(0)
    batch = obj.prepare(model, obj.collate([0, 1]))
    assert batch["advantages"].abs().sum() > 0  # seeded: the sampled answers differ in length, so in reward
    from tuneforge.methods.logps import sequence_logps

    before = sequence_logps(model, batch)[0].detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, _ = obj.loss(model, batch, obj.units(batch))
    loss.backward()
    opt.step()
    after = sequence_logps(model, batch)[0].detach()
    change = after - before
    adv = batch["advantages"]
    assert change[adv > 0].mean() > change[adv < 0].mean()


def test_completions_depend_on_step_and_place_not_on_what_the_process_did_before(tmp_path, tiny_models):
    """What lets 2 processes equal 1: micro-batch 1 of a step draws the same completions whether this process
    sampled micro-batch 0 first (one process) or not (rank 1 of 2), whatever the global random state; another
    step or place draws others."""
    obj, data, tok, _ = grpo_objective(tmp_path, tiny_models)
    model = load_model(tiny_models["llama"], CPU)

    def completions(indices, place, seed=0):
        torch.manual_seed(seed)
        return obj.prepare(model, {**obj.collate(indices), "place": torch.tensor(place)})["input_ids"]

    as_rank_one = completions([2, 3], [0, 1])
    completions([0, 1], [0, 0], seed=5)  # one process samples micro-batch 0 first
    assert torch.equal(completions([2, 3], [0, 1], seed=123), as_rank_one)
    assert not torch.equal(completions([2, 3], [1, 1]), as_rank_one)
    assert not torch.equal(completions([2, 3], [0, 3]), as_rank_one)


def test_zero_spread_groups_are_logged(tmp_path, tiny_models):
    """frac_zero_std reaches the step record; the run's diagnosis warns on it (tests/test_diagnose.py)."""
    obj, data, tok, _ = grpo_objective(tmp_path, tiny_models, rewards=[{"function": "json_valid"}])  # all 0
    model = load_model(tiny_models["llama"], CPU)
    for _ in range(2):
        batch = obj.prepare(model, obj.collate([0]))
        assert batch["_stats"]["frac_zero_std"] == (1.0, 1)


def test_grpo_runs_through_the_loop_and_logs_its_metrics(tmp_path, tiny_models):
    records = [{"prompt": "Say yes " + "please " * (i % 3) + str(i), "answer": "yes"} for i in range(8)]
    data_file = write_jsonl(tmp_path / "prompts.jsonl", records)
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="grpo", datasets=[{"path": str(data_file)}],
                   validation={"split": 0.25}, max_steps=2, micro_batch_size=2, eval_every=2,
                   grpo={"generations": 2, "max_completion_tokens": 4, "beta": 0.05,
                         "rewards": [{"function": "exact_match"}, {"function": "length_penalty", "args": {"max_chars": 3}}]})
    run = train(cfg, reporter=QUIET)
    assert {"mean_reward", "mean_reward/exact_match"} <= set(run["eval_after"])
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(logged) == 2
    for key in ("reward", "reward_std", "frac_zero_std", "kl", "rewards/exact_match", "completion_length"):
        assert all(math.isfinite(r[key]) for r in logged), key
    # The evaluation during training is logged under val_, where early stopping and `runs` look.
    assert "val_mean_reward" in logged[1] and "val_mean_reward/exact_match" in logged[1]
    # The padding share is that of the rollouts the model read (prompts of different lengths, left-padded).
    assert all(0 < r["padding_share"] < 1 and r["tokens"] > 0 for r in logged)


def test_reward_file_beside_the_config(tmp_path):
    from tuneforge.config import config_from_dict

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "scoring.py").write_text("def ok(prompts, completions, **f):\n    return [1.0] * len(completions)\n")
    cfg = config_from_dict({"datasets": [{"path": "p.jsonl"}], "method": "grpo",
                            "grpo": {"rewards": [{"function": "scoring.py:ok"}, {"function": "exact_match"}]}},
                           base=tmp_path / "conf")
    assert cfg.grpo.rewards[0].function == f"{tmp_path / 'conf' / 'scoring.py'}:ok"
    assert cfg.grpo.rewards[1].function == "exact_match"
    assert score(load_reward(cfg.grpo.rewards[0].function, {}), ["p"], ["c"], {}) == [1.0]
    with pytest.raises(ConfigError, match="no file"):
        load_reward(str(tmp_path / "missing.py") + ":ok", {})


def test_reward_fields_survive_the_prepared_data_cache(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    data_file = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    cfg = make_cfg(tmp_path, tiny_models["llama"], method="grpo", datasets=[{"path": str(data_file)}],
                   validation={"split": 0.25}, grpo={"rewards": [{"function": "exact_match"}]})
    tok = load_tokenizer(tiny_models["llama"])
    first, again = prepare_data(cfg, tok), prepare_data(cfg, tok)
    assert again.from_cache and not first.from_cache
    for data in (first, again):
        assert all(ex.record.fields == {"answer": "yes"} for ex in data.validation)
        assert all(ex.record.fields == {"answer": "yes"} for ex in data.train)
