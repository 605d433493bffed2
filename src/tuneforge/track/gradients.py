"""Per-layer gradient norms: which layers a spike of the total gradient norm comes from."""

from __future__ import annotations

import statistics
from collections import deque

import torch

from tuneforge.train.checkpoints import trainable_parameters


class LayerNorms:
    """Measures each trainable tensor's gradient norm before clipping (one small tensor a step, no
    host sync), and names the top ones when the total norm spikes above `factor` x its recent median."""

    def __init__(self, model, factor: float = 5.0, top: int = 5, window: int = 20):
        named = trainable_parameters(model)
        self.names = [_short(n) for n, _ in named]
        self.params = [p for _, p in named]
        self.factor, self.top = factor, top
        self.history: deque[float] = deque(maxlen=window)
        self.last: torch.Tensor | None = None

    def measure(self) -> None:
        """Call after backward, before the optimizer step clears the gradients.

        Under FSDP each process holds a shard of every gradient: the squared norms of the shards are
        summed over the processes in one all-reduce.
        """
        if not self.params:
            self.last = None
            return
        grads = [p.grad for p in self.params]
        sharded = any(hasattr(g, "to_local") for g in grads if g is not None)
        if not sharded:
            zero = torch.zeros((), device=self.params[0].device)
            self.last = torch.stack([g.detach().float().norm() if g is not None else zero for g in grads])
            return
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        zero = torch.zeros((), device=next(t.device for t in local if t is not None))
        squares = torch.stack([t.detach().float().pow(2).sum() if t is not None else zero for t in local])
        torch.distributed.all_reduce(squares)
        self.last = squares.sqrt()

    def top_layers(self, total: float) -> list[dict] | None:
        """The largest layer norms of this step when `total` spikes (or is not finite); else None."""
        spiked = not _finite(total) or (len(self.history) >= 3 and total > self.factor * statistics.median(self.history))
        if _finite(total) and total > 0:  # a skipped zero-gradient step (no signal) is no reference
            self.history.append(total)
        if not spiked or self.last is None:
            return None
        norms = self.last.cpu().tolist()
        order = sorted(range(len(norms)), key=lambda i: -norms[i] if _finite(norms[i]) else float("-inf"))
        return [{"layer": self.names[i], "norm": norms[i]} for i in order[: self.top]]


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _short(name: str) -> str:
    """PEFT's wrapper prefixes say nothing about which layer it is."""
    for prefix in ("base_model.model.", "module."):
        name = name.removeprefix(prefix)
    return name
