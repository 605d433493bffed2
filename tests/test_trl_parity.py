"""Same tiny model, same batch: tuneforge's preference losses and gradients equal TRL's (R-PREF-4).

TRL is a test-only dependency. Each test builds TRL's trainer around one copy of a tiny random
Llama and feeds its loss code the token ids of our batch; our objective runs on a second copy.
The policy and reference are different random models, so the log-ratios are far from zero and
every term of each loss is exercised.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from conftest import make_tiny_model
from tuneforge.config import DPOSpec, KTOSpec, ORPOSpec, SimPOSpec
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.data.tokenized import Example
from tuneforge.methods.run import run_objective
from tuneforge.methods.dpo import DPO
from tuneforge.methods.kto import KTO
from tuneforge.methods.orpo import ORPO
from tuneforge.methods.reference import Reference
from tuneforge.methods.simpo import SimPO
from tuneforge.models.load import load_model

CPU = torch.device("cpu")
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizers):
    root = tmp_path_factory.mktemp("parity")
    return (make_tiny_model(root / "policy", "llama", tokenizers["smol"], seed=0),
            make_tiny_model(root / "reference", "llama", tokenizers["smol"], seed=1))


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(5, 400, (n,), generator=g).tolist()


def example(prompt: list[int], answer: list[int], tag: int = 0) -> Example:
    return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, None, tag)


@pytest.fixture(scope="module")
def pairs():
    """Three pairs of different prompt and answer lengths, so padding and per-row sums matter."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = [], []
    for i in range(3):
        prompt = _ids(g, 4 + i)
        chosen.append(example(prompt, _ids(g, 3 + 2 * i)))
        rejected.append(example(prompt, _ids(g, 6 - i)))
    return SimpleNamespace(train=chosen, train_rejected=rejected)


def ours(objective, policy_dir) -> tuple[float, dict, dict]:
    model = load_model(policy_dir, CPU)
    model.train()
    loss, _, stats = run_objective(objective, model, [objective.collate(list(range(3)))], CPU, torch.float32, True)
    return loss, stats, {n: p.grad for n, p in model.named_parameters()}


def assert_same_grads(ours_grads: dict, trl_model) -> None:
    compared = 0
    for name, p in trl_model.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(ours_grads[name], p.grad, atol=TOL, rtol=TOL, msg=name)
        compared += 1
    assert compared > 0


def quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def compare(trainer, trl_loss: torch.Tensor, metrics: dict, ours_result: tuple, keys: tuple[str, ...]) -> None:
    """Backward through TRL's loss, then check loss, gradients and the named metrics against ours."""
    loss, stats, grads = ours_result
    trl_loss.backward()
    assert abs(loss - trl_loss.item()) <= TOL
    assert_same_grads(grads, trainer.model)
    for key in keys:
        assert stats[key] == pytest.approx(float(metrics[key]), abs=1e-4), key


def trl_loss_and_logged(trainer, inputs: dict) -> tuple[torch.Tensor, dict]:
    """TRL's DPO/KTO loss on `inputs` and the metrics it logged for that batch."""
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_batch_loss(trainer, batch: dict) -> tuple[torch.Tensor, dict]:
    """TRL's ORPO/CPO loss and metrics on a chosen_*/rejected_* batch."""
    trainer.model.train()
    return trainer.get_batch_loss_metrics(trainer.model, batch)


def tiny_dataset(kind: str) -> Dataset:
    if kind == "kto":
        return Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                                  {"prompt": "c", "completion": "d", "label": False}])
    return Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])


def common_args(tmp_path) -> dict:
    return {"output_dir": str(tmp_path / "trl"), "report_to": [], "use_cpu": True, "bf16": False}


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_matches_trl(tmp_path, models, pairs, tokenizers, variant):
    tok = tokenizers["smol"]
    spec = DPOSpec(beta=0.3, loss=variant, label_smoothing=0.2 if variant == "robust" else 0.0)
    objective = DPO(spec, pairs, tok.pad_token_id, Reference(frozen=load_model(models[1], CPU).eval()))
    result = ours(objective, models[0])

    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(beta=0.3, loss_type=[variant], label_smoothing=spec.label_smoothing, **common_args(tmp_path))
    trainer = quiet(lambda: DPOTrainer(model=load_model(models[0], CPU), ref_model=load_model(models[1], CPU),
                                       args=args, train_dataset=tiny_dataset("pairs"), processing_class=tok))
    batch = objective.collate(list(range(3)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}
    compare(trainer, *trl_loss_and_logged(trainer, inputs), result,
            ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"))


def _pair_tensors(examples: list[Example], pad: int, prefix: str) -> dict:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": mask, f"{prefix}_labels": labels}


def trl_pair_batch(pairs, pad: int) -> dict:
    """The batch layout of TRL's ORPO and CPO trainers: chosen_* and rejected_* tensors."""
    return {**_pair_tensors(pairs.train, pad, "chosen"), **_pair_tensors(pairs.train_rejected, pad, "rejected")}


def test_orpo_matches_trl(tmp_path, models, pairs, tokenizers):
    tok = tokenizers["smol"]
    # TRL's NLL term counts the prompt tokens too; nll_on_prompt reproduces that choice.
    objective = ORPO(ORPOSpec(beta=0.25, nll_on_prompt=True), pairs, tok.pad_token_id)
    result = ours(objective, models[0])

    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(beta=0.25, **common_args(tmp_path))
    trainer = quiet(lambda: ORPOTrainer(model=load_model(models[0], CPU), args=args,
                                        train_dataset=tiny_dataset("pairs"), processing_class=tok))
    compare(trainer, *trl_batch_loss(trainer, trl_pair_batch(pairs, tok.pad_token_id)), result,
            ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "log_odds_ratio",
             "log_odds_chosen", "nll_loss"))


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_simpo_matches_trl(tmp_path, models, pairs, tokenizers, sft_weight):
    tok = tokenizers["smol"]
    objective = SimPO(SimPOSpec(beta=2.0, gamma=0.6, sft_weight=sft_weight), pairs, tok.pad_token_id)
    result = ours(objective, models[0])

    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.6, cpo_alpha=sft_weight, **common_args(tmp_path))
    trainer = quiet(lambda: CPOTrainer(model=load_model(models[0], CPU), args=args,
                                       train_dataset=tiny_dataset("pairs"), processing_class=tok))
    compare(trainer, *trl_batch_loss(trainer, trl_pair_batch(pairs, tok.pad_token_id)), result,
            ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll_loss"
             if sft_weight else "logps/chosen"))


@pytest.fixture(scope="module")
def kto_examples():
    """Four unpaired examples, desirable and not, of different lengths."""
    g = torch.Generator().manual_seed(1)
    examples = [example(_ids(g, 3 + i), _ids(g, 5 - i), tag=int(i % 2 == 0)) for i in range(4)]
    return SimpleNamespace(train=examples, train_rejected=None)


def test_kto_matches_trl(tmp_path, models, kto_examples, tokenizers):
    tok = tokenizers["smol"]
    spec = KTOSpec(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    objective = KTO(spec, kto_examples, tok.pad_token_id, Reference(frozen=load_model(models[1], CPU).eval()))
    model = load_model(models[0], CPU)
    model.train()
    batch = objective.collate(list(range(4)))
    loss, _, stats = run_objective(objective, model, [batch], CPU, torch.float32, True)
    grads = {n: p.grad for n, p in model.named_parameters()}

    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8, per_device_train_batch_size=4,
                     **common_args(tmp_path))
    trainer = quiet(lambda: KTOTrainer(model=load_model(models[0], CPU), ref_model=load_model(models[1], CPU),
                                       args=args, train_dataset=tiny_dataset("kto"), processing_class=tok))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long(), "label": batch["desirable"],
              "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
              "KL_completion_mask": (batch["kl_labels"] != IGNORE_INDEX).long()}
    trl_loss, logged = trl_loss_and_logged(trainer, inputs)
    compare(trainer, trl_loss, logged, (loss, stats, grads),
            ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"))
    assert logged["kl"] > 0  # the KL term is live, not clamped to zero
