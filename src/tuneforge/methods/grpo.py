"""GRPO (Shao et al. 2024): sample a group of answers per prompt, score them, and push up the
answers that beat their group's mean.

Rollouts happen in `prepare` (no gradients), so the loop stays the same as for every other
method: the loss is then taken on the sampled rows. One optimizer step is taken per batch of
rollouts, so the probability ratio starts at 1; the clipped form is kept so the objective is
the standard one. Tokens written by an environment (multi-turn rollouts) are context: their
labels are IGNORE_INDEX and they are never trained (R-FEAT-2).

On several processes each samples the groups of its own micro-batches (a prompt's whole group stays
on one process, so advantages need no communication); rewards, statistics and the loss's units are
summed over the processes by run_objective. Each completion draws from a generator seeded by (seed,
step, its place in the global batch), so the completions do not depend on the number of processes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.data.batching import collate
from tuneforge.data.template import IGNORE_INDEX, conversation_segments, encode_segment_lists
from tuneforge.data.tokenized import Example
from tuneforge.fast import FastPath
from tuneforge.methods.logps import forward_logits, policy_logps, token_logps
from tuneforge.methods.objective import Runtime
from tuneforge.methods.rewards import load_reward, score
from tuneforge.methods.run import as_validation
from tuneforge.methods.sampling import draw_seed, seeded_generators
from tuneforge.models.decode import all_finished, decode
from tuneforge.models.layers import unwrap
from tuneforge.models.precision import autocast_for
from tuneforge.parallel.apply import forward_is_collective

def group_advantages(rewards: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) for rewards shaped [prompts, generations]."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.size(1) > 1 else torch.zeros_like(mean)
    centred = rewards - mean
    if scale == "group":
        centred = centred / (std + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.std() + 1e-4)
    return centred, std.squeeze(1)


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                       eps_high: float) -> torch.Tensor:
    """-min(ratio A, clip(ratio) A) per token; advantages are per row."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref): non-negative, unbiased, low variance."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


class GRPO:
    name = "grpo"
    notes = ()
    fast = FastPath()  # the fast path the log-probs take (set by build_objective)

    def __init__(self, spec, data, pad_id: int, reference, *, tokenizer, stop_ids, end_of_turn, device, dtype,
                 base: Path | None = None, seed: int = 0):
        self.spec, self.data, self.pad_id, self.reference = spec, data, pad_id, reference
        self.seed = seed  # with the step and place of each prompt, seeds its completions' draws
        self.tokenizer, self.stop_ids, self.end_of_turn = tokenizer, stop_ids, end_of_turn
        self.device, self.dtype = device, dtype
        self.rewards = []  # (metric name, weight, function); names are the functions' own, numbered if repeated
        for r in spec.rewards:
            fn = load_reward(r.function, r.args, base)
            name = fn.__name__
            taken = [n for n, _, _ in self.rewards]
            self.rewards.append((name if name not in taken else f"{name}_{len(taken) + 1}", r.weight, fn))
        self.environment = load_reward(spec.environment, {}, base) if spec.environment else None

    @classmethod
    def build(cls, spec, data, pad_id: int, reference, run: Runtime) -> "GRPO":
        return cls(spec, data, pad_id, reference, tokenizer=run.tokenizer, stop_ids=run.stop_ids,
                   end_of_turn=run.end_of_turn, device=run.device, dtype=run.dtype, base=run.base, seed=run.seed)

    def describe(self) -> dict:
        g = self.spec
        return {"method": self.name, "loss": g.loss, "scale_rewards": g.scale_rewards, "beta": g.beta,
                "epsilon": g.epsilon, "epsilon_high": g.epsilon_high or g.epsilon, "generations": g.generations,
                "normalised_by": {"grpo": "completions, then tokens of each", "dapo": "completion tokens of the batch",
                                  "dr_grpo": "completions x max_completion_tokens"}[g.loss]}

    # -- the objective's four calls -------------------------------------------------------------
    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(indices), "place": torch.tensor(place)}

    def prepare(self, model, batch):
        examples = [self.data.train[i] for i in batch["index"].tolist()]
        g = self.spec.generations
        step, micro = batch["place"].tolist()  # the micro-batch's place in the run (Objective.collate)
        seeds = [draw_seed(self.seed, step, micro, i, k) for i in range(len(examples)) for k in range(g)]
        rows, rewards, per_fn = self.rollouts(model, examples, g, seeds=seeds)
        advantages, std = group_advantages(rewards.view(-1, g), self.spec.scale_rewards)
        out = _pad_rows(rows, self.pad_id, self.device)
        out["advantages"] = advantages.reshape(-1).to(self.device)
        if self.spec.beta > 0:
            with self.reference.model(model) as ref:
                out["ref_token_logps"] = token_logps(forward_logits(ref, out) / self.spec.temperature, out["labels"])[0]
        zero = float((std == 0).float().mean())  # watched by the run's diagnosis (track/diagnose.py)
        out["_stats"] = {"reward": (rewards.sum().item(), rewards.numel()),
                         "reward_std": (std.sum().item(), std.numel()),
                         "frac_zero_std": (zero * std.numel(), std.numel()),
                         "completion_length": (float(sum(r["completion_tokens"] for r in rows)), len(rows)),
                         **{f"rewards/{name}": (sum(v), len(v)) for name, v in per_fn.items()}}
        return out

    def units(self, batch) -> dict[str, int]:
        return {"tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), "sequences": batch["labels"].size(0)}

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, dict]:
        s = self.spec
        logps, mask = policy_logps(model, batch, self.fast, s.temperature)
        per_token = clipped_token_loss(logps, logps.detach(), batch["advantages"], s.epsilon, s.epsilon_high or s.epsilon)
        stats = dict(batch["_stats"])
        if s.beta > 0:
            kl = kl_per_token(logps, batch["ref_token_logps"]) * mask
            per_token = per_token + s.beta * kl
            stats["kl"] = (kl.detach().sum().item(), float(mask.sum()))
        per_token = per_token * mask
        if s.loss == "grpo":
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / totals["sequences"]
        elif s.loss == "dapo":
            loss = per_token.sum() / max(totals["tokens"], 1)
        else:  # dr_grpo
            loss = per_token.sum() / (totals["sequences"] * s.max_completion_tokens)
        return loss, stats

    def preflight(self, model) -> None:
        """R-GRPO-1: one forward and backward at the largest shape a step can reach, before any sampling,
        so an out-of-memory error comes at once instead of after many steps."""
        longest = max(range(len(self.data.train)), key=lambda i: len(self.data.train[i].input_ids))
        prompt = self.data.train[longest].input_ids
        ids = prompt + [self.pad_id] * self.spec.max_completion_tokens
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        rows = [{"ids": ids, "labels": labels}] * self.spec.generations
        batch = _pad_rows(rows, self.pad_id, self.device)
        with autocast_for(self.device, self.dtype):
            logps, mask = policy_logps(model, batch, self.fast, self.spec.temperature)  # as the loss runs
            (logps * mask).sum().backward()
        model.zero_grad(set_to_none=True)

    # -- rollouts ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollouts(self, model, examples, n: int,
                 seeds: list[int] | None = None) -> tuple[list[dict], torch.Tensor, dict]:
        """n completions per example (all turns when an environment answers), scored by every reward function.

        Sampled when `seeds` gives one seed per completion, greedy otherwise. Under DDP the wrapped
        module generates (no collective); under FSDP the sharded model does, in step with the others."""
        s = self.spec
        policy = unwrap(model)
        synced = forward_is_collective(policy)
        rows = [{"ids": list(ex.input_ids), "labels": [IGNORE_INDEX] * len(ex.input_ids), "ex": ex,
                 "messages": _messages(ex.record.prompt), "text": "", "completion_tokens": 0, "done": False}
                for ex in examples for _ in range(n)]
        if seeds is not None:
            for row, g in zip(rows, seeded_generators(seeds, self.device)):
                row["generator"] = g  # kept over turns: a row's draws never depend on the other rows
        for turn in range(s.max_turns):
            active = [r for r in rows if not r["done"]]
            # Under FSDP every process takes the same turns; one with nothing left decodes a placeholder.
            if all_finished(not active, synced, self.device):
                break
            prompts = [r["ids"] for r in active] or [[self.pad_id]]
            sampling = None if seeds is None or not active else {
                "temperature": s.temperature, "top_p": s.top_p, "generators": [r["generator"] for r in active]}
            with autocast_for(self.device, self.dtype):
                gens = decode(policy, prompts, self.stop_ids, self.pad_id, s.max_completion_tokens, self.device,
                              sampling, synced)
            for row, (ids, stopped) in zip(active, gens):
                row["ids"] += ids
                row["labels"] += ids
                row["completion_tokens"] += len(ids)
                reply = self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
                row["text"] = (row["text"] + "\n" + reply).strip() if row["text"] else reply.strip()
                row["messages"] = row["messages"] + [{"role": "assistant", "content": reply}]
                row["done"] = True
                if self.environment is not None and stopped and turn + 1 < s.max_turns:
                    self._environment_turn(row)
        completions = [r["text"] for r in rows]
        prompts = [_prompt_text(r["ex"].record.prompt) for r in rows]
        fields = _fields([r["ex"].record for r in rows])
        total = torch.zeros(len(rows))
        per_fn = {}
        for name, weight, fn in self.rewards:
            values = score(fn, prompts, completions, fields)
            per_fn[name] = values
            total += weight * torch.tensor(values)
        return rows, total, per_fn

    def _environment_turn(self, row: dict) -> None:
        """Ask the environment for the next turn; its tokens join the context untrained."""
        reply = self.environment(row["messages"])
        if reply is None:
            return
        if isinstance(reply, str):
            reply = {"role": "user", "content": reply}
        messages = row["messages"] + [reply]
        rendered = "".join(text for text, _ in conversation_segments(
            self.tokenizer, messages, self.end_of_turn, add_generation_prompt=True, train_from=len(messages)))
        # The model's turn ended with its end-of-turn token; the context goes on after it.
        upto = self.tokenizer.apply_chat_template(row["messages"], tokenize=False)
        tail = rendered[upto.rfind(self.end_of_turn) + len(self.end_of_turn):]
        [(ids, _)] = encode_segment_lists(self.tokenizer, [[(tail, False)]])
        row["ids"] += [int(t) for t in ids]
        row["labels"] += [IGNORE_INDEX] * len(ids)
        row["messages"] = messages
        row["done"] = False

    # -- before/after ----------------------------------------------------------------------------
    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """Mean reward of greedy answers to the validation prompts (one answer each: reproducible)."""
        was_training = model.training
        examples = list(data.validation)
        if not examples:
            return {}
        _, rewards, per_fn = self.rollouts(model, examples, 1)
        model.train(was_training)
        out = {"mean_reward": rewards.mean().item(), "prompts": len(examples)}
        out.update({f"mean_reward/{name}": sum(v) / len(v) for name, v in per_fn.items()})
        return out if final else as_validation(out)


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(str(m.get("content") or "") for m in prompt)


def _fields(records) -> dict[str, list]:
    """The data's other columns, as lists aligned with the completions, for the reward functions."""
    keys = list(dict.fromkeys(k for r in records for k in r.fields))
    return {k: [r.fields.get(k) for r in records] for k in keys}


def _pad_rows(rows: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    batch = collate([Example(r["ids"], r["labels"], None) for r in rows], pad_id)
    return {k: v.to(device) for k, v in batch.items()}
