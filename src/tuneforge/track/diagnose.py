"""Live diagnosis: the usual debugging checklist, run by itself while a model trains.

Each check looks at what the run already has (the tokenized examples, the step records) and, when
something is wrong, says what it saw and what to do. The loop talks to one `Watch`: before step 1,
after each step (which may answer "stop" or "rollback") and after each evaluation (which may answer
"best" or "early_stop"). Findings go to the console, every tracker and diagnosis.jsonl.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

from tuneforge.data.preview import preview_plain
from tuneforge.methods.facts import METHODS, method_facts
from tuneforge.methods.learning_rates import USUAL_LR, far_outside, range_words, training_kind
from tuneforge.track.gradients import LayerNorms

# A learning rate more than this many times beyond the usual range (methods/learning_rates.py) is flagged
# before step 1: farther than plan's warning, since a started run is flagged only where it is likely to fail.
LR_FACTOR = 10.0
CHECKLIST = (
    "Checklist: (1) the chat template is the base model's own (chat_template: auto); (2) only answers are "
    "trained (train_on_inputs: false; see `tuneforge data preview CONFIG`); (3) the learning rate suits the "
    "method and adapter (LoRA SFT: {:g} to {:g}; full: {:g} to {:g}); (4) the examples below look as intended "
    "(trained text inside [[ ]])."
).format(*USUAL_LR[("sft", "lora")], *USUAL_LR[("sft", "full")]
)


@dataclass
class Finding:
    code: str  # which check: masking, end_of_turn, learning_rate, flat_loss, divergence, rollback, overfitting,
    #            early_stop, loader_wait, gpu_util, zero_std, empty_step
    message: str  # what was seen and what to do
    severity: str = "warning"  # warning | error | info
    action: str | None = None  # what the run does about it: stop | rollback | early_stop

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---- before step 1: the data and the settings -------------------------------------------------


def check_masking(chat: list) -> Finding | None:
    """Chat examples whose every position is trained: the loss is computed on the prompts too."""
    unmasked = [e for e in chat if e.n_trained >= len(e.input_ids) - 1]
    if not chat or len(unmasked) < len(chat) / 2:
        return None
    return Finding("masking", (
        f"loss is computed on prompt tokens: in {len(unmasked)} of {len(chat)} chat examples every token is trained, "
        f"the user's and system's too (first: {unmasked[0].record.where}). The model learns to write prompts as well "
        "as answers. Set train_on_inputs: false unless that is what you want; `tuneforge data preview CONFIG` "
        "shows what is trained."))


def check_end_of_turn(chat: list, eot_id: int, eot: str, truncation: str, max_seq_len: int) -> Finding | None:
    """Chat examples whose trained labels never hold the end-of-turn token: the model never learns to stop."""
    if not chat:
        return None
    missing = [e for e in chat if eot_id not in e.labels]
    if len(missing) < len(chat) / 2:
        return None
    cause = (f"truncation: {truncation} with max_seq_len {max_seq_len} cuts the answers' ends off; raise max_seq_len "
             "or use truncation: drop" if truncation != "drop" else
             "the chat template does not close the answers the way the base model does; use the model's own "
             "(chat_template: auto)")
    return Finding("end_of_turn", (
        f"template mismatch: the end-of-turn token {eot} never appears in the trained labels of {len(missing)} of "
        f"{len(chat)} chat examples (first: {missing[0].record.where}), so the model will not learn to stop "
        f"answering. Likely cause: {cause}."))


def check_learning_rate(lr: float, method: str, adapter: str, init: str = "pretrained") -> Finding | None:
    family, kind = METHODS[method].lr_family, training_kind(adapter, init)
    side = far_outside(lr, family, kind, LR_FACTOR)
    if side is None:
        return None
    effect = ("the loss is likely to explode or turn NaN" if side == "above" else "the loss will barely move")
    return Finding("learning_rate", (
        f"learning_rate {lr:g} is far {side} the usual range for {range_words(family, kind)}: {effect}. "
        "Set learning_rate inside that range unless you know why not."))


def rendered_examples(examples: list, tokenizer, n: int = 5) -> str:
    """The first examples as trained (an image example: its file, there is no text to show)."""
    return "\n".join(f"--- {e.record.where}" + (f"\n{preview_plain(tokenizer, e.input_ids, e.labels)}"
                                                 if hasattr(e, "input_ids") else "") for e in examples[:n])


# ---- after each step -------------------------------------------------------------------------


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def divergence(record: dict, losses: list[float], factor: float, rise: float) -> str | None:
    """Why this step diverged, or None: a non-finite loss or gradient; a loss `factor` x the median of
    the last 10 steps (a spike); or the last 3 steps' median `rise` x the first 3 steps' (a climb).
    Both need the loss 1 nat above a positive reference too, so a tiny loss doubling is no divergence
    (and a loss that may be negative, as GRPO's, is judged by its finiteness only)."""
    loss, grad = record.get("loss"), record.get("grad_norm")
    if not _finite(loss) or not _finite(grad):
        return f"loss {loss} / grad norm {grad} is not finite"
    if losses:
        median = statistics.median(losses[-10:])
        if median > 0 and loss > factor * median and loss > median + 1.0:
            return f"loss {loss:.4g} exploded ({loss / median:.1f} x the median {median:.4g} of the last steps)"
    if len(losses) >= 5:
        start, now = statistics.median(losses[:3]), statistics.median(losses[-2:] + [loss])
        if start > 0 and now > rise * start and now > start + 1.0:
            return f"the loss climbed from {start:.4g} (first steps) to {now:.4g} (last steps): the run diverges"
    return None


def is_flat(losses: list[float], min_drop: float) -> tuple[bool, float, float]:
    """(flat, mean of the first steps, mean of the last steps): the loss dropped by less than `min_drop` of its start."""
    k = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return (first - last) < min_drop * abs(first), first, last


def rising(values: list[float], n: int) -> bool:
    """The last n values each above the one before."""
    tail = values[-(n + 1):]
    return len(tail) == n + 1 and all(b > a for a, b in zip(tail, tail[1:]))


class Watch:
    """The diagnosis of one run. Each finding is shown by `warn` (the console) and stored by `record`
    (the trackers' `finding`: diagnosis.jsonl, TensorBoard, MLflow, W&B)."""

    def __init__(self, cfg, total_steps: int, data, tokenizer, warn: Callable[[str], None],
                 record: Callable[[int, dict], None], model=None):
        self.cfg, self.d = cfg, cfg.diagnose
        self.layers = LayerNorms(model, self.d.spike_factor, self.d.top_layers) if model is not None else None
        self.total_steps, self.data, self.tokenizer = total_steps, data, tokenizer
        self.warn, self.record = warn, record
        self.codes: list[str] = []  # every finding's code, in order: run.json's "diagnoses"
        self.enabled = self.d.enabled
        # The healthy steps so far, in order: their numbers, losses and gradient norms.
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.shares: deque[float] = deque(maxlen=20)
        self.utils: deque[float] = deque(maxlen=20)
        self.val: list[float] = []
        self.train_at_val: list[float] = []
        self.zero_std_run = 0
        self.warned: set[str] = set()
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.stop_message = ""
        self.best: tuple[int, float] | None = None  # (step, value) of the early-stopping metric
        self.since_best = 0
        self.early_stopped = False
        self.seconds = 0.0  # time spent here: the diagnosis overhead
        grpo = getattr(cfg, "grpo", None)
        self.zero_std_steps = grpo.zero_std_warn_steps if grpo is not None else self.d.zero_std_steps

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run acts as the uninterrupted one would."""
        return {"lr_scale": self.lr_scale, "evals_since_best": self.since_best}

    def restore(self, state: dict, best: tuple[int, float] | None) -> None:
        self.lr_scale, self.since_best, self.best = state.get("lr_scale", 1.0), state.get("evals_since_best", 0), best

    def emit(self, step: int, finding: Finding) -> None:
        self.codes.append(finding.code)
        self.warn(finding.message)
        self.record(step, finding.as_json())

    def _once(self, step: int, finding: Finding) -> None:
        if finding.code not in self.warned:
            self.warned.add(finding.code)
            self.emit(step, finding)

    def before_training(self) -> None:
        """Checks of the data and settings, before step 1."""
        if not self.enabled:
            return
        eot = self.data.end_of_turn
        facts = method_facts(self.cfg)
        checks = [check_learning_rate(self.cfg.learning_rate, facts.name, self.cfg.adapter, self.cfg.init)]
        if facts.label_checks and eot:  # chat data: the template's end-of-turn token was found
            eot_id = self.tokenizer.convert_tokens_to_ids(eot)
            chat = [e for e in self.data.train[:200] if eot_id in e.input_ids]  # rendered by the template
            checks += [check_masking(chat), check_end_of_turn(chat, eot_id, eot, self.cfg.truncation, self.cfg.max_seq_len)]
        for finding in checks:
            if finding is not None:
                self._once(0, finding)

    def measure_gradients(self) -> None:
        """After backward, before the optimizer step clears the gradients: each layer's gradient norm."""
        if self.layers is not None:
            t0 = time.perf_counter()
            self.layers.measure()
            self.seconds += time.perf_counter() - t0

    def after_step(self, record: dict, where: Callable[[], list[str]]) -> str | None:
        """Checks of one optimizer step; returns "stop", "rollback" or None. `where` lists the step's examples.
        Adds `grad_norm_top` (the largest layer gradients) to the record when the gradient norm spikes."""
        t0 = time.perf_counter()
        try:
            top = self.layers.top_layers(record["grad_norm"]) if self.layers is not None else None
            if top:
                record["grad_norm_top"] = top
            return self._after_step(record, where)
        finally:
            self.seconds += time.perf_counter() - t0

    def _after_step(self, record: dict, where: Callable[[], list[str]]) -> str | None:
        step = record["step"]
        if record.get("trained_tokens") == 0:
            self.emit(step, Finding("empty_step", f"step {step} had no trained token (examples {', '.join(where())}); "
                                    "its loss is not logged. Check the data with `tuneforge data check CONFIG`."))
            return None
        # A non-finite loss always stops the run (R-PREF-2); a finite explosion only when diagnosis is on.
        why = divergence(record, self.losses if self.enabled else [], self.d.explode_factor, self.d.explode_rise)
        if why is not None:
            return self._diverged(step, why, record, where())
        self.steps.append(step)
        self.losses.append(record["loss"])
        self.grad_norms.append(record["grad_norm"])
        if not self.enabled:
            return None
        self._flat(step)
        self._zero_std(step, record)
        self._throughput(step, record)
        return None

    def safe_checkpoint(self, ckpt_step: int) -> bool:
        """Whether the weights saved at `ckpt_step` came before the divergence: the loss they gave on
        the next step was not yet above the climb threshold (and the weights of step 0 always are)."""
        if ckpt_step == 0:
            return True
        if ckpt_step + 1 not in self.steps:
            return False
        following = self.losses[self.steps.index(ckpt_step + 1)]
        return following <= self.d.explode_rise * statistics.median(self.losses[:3])

    def rewind(self, step: int) -> None:
        """After a roll-back to `step`: forget what came after it."""
        keep = bisect.bisect_right(self.steps, step)
        del self.steps[keep:], self.losses[keep:], self.grad_norms[keep:]

    def _diverged(self, step: int, why: str, record: dict, examples: list[str]) -> str:
        history = ", ".join(f"{g:.3g}" for g in self.grad_norms[-10:]) or "none yet"
        top = record.get("grad_norm_top")
        layers = (" Largest layer gradients: " + ", ".join(f"{t['layer']} {t['norm']:.3g}" for t in top) + ".") if top else ""
        text = (f"step {step}: {why} (examples {', '.join(examples)}). Gradient norms of the steps before: "
                f"{history}.{layers}")
        if self.cfg.on_divergence == "rollback" and self.rollbacks < self.d.max_rollbacks:
            self.rollbacks += 1
            self.lr_scale /= 2
            self.emit(step, Finding("divergence", f"{text} Rolling back to the last checkpoint with the learning rate "
                                    f"halved (now x{self.lr_scale:g}; roll-back {self.rollbacks} of {self.d.max_rollbacks}).",
                                    "error", "rollback"))
            return "rollback"
        tried = f" after {self.rollbacks} roll-backs" if self.rollbacks else ""
        remedies = "lower learning_rate, use precision: fp32, check those examples"
        remedies += ", or set on_divergence: rollback" if self.cfg.on_divergence != "rollback" else \
            f" (roll-backs down to x{self.lr_scale:g} of it did not help)"
        self.stop_message = (f"{text} The run stops here{tried}, without writing a checkpoint of this state: "
                             f"{remedies}.")
        self.emit(step, Finding("divergence", self.stop_message, "error", "stop"))
        return "stop"

    def _flat(self, step: int) -> None:
        if step != max(4, math.ceil(self.d.flat_after * self.total_steps)) or len(self.losses) < 4:
            return
        flat, first, last = is_flat(self.losses, self.d.flat_min_drop)
        if flat:
            self._once(step, Finding("flat_loss", (
                f"the training loss has not dropped after {step} of {self.total_steps} steps (from {first:.4g} to "
                f"{last:.4g}). {CHECKLIST}\n{rendered_examples(self.data.train, self.tokenizer)}")))

    def _zero_std(self, step: int, record: dict) -> None:
        """R-GRPO-1: every group's rewards equal, so no advantage and no learning signal."""
        value = record.get("frac_zero_std")
        if value is None:
            return
        self.zero_std_run = self.zero_std_run + 1 if value >= 1.0 else 0
        if self.zero_std_run == self.zero_std_steps:
            self.emit(step, Finding("zero_std", (
                f"for {self.zero_std_run} steps in a row every group's rewards were equal (frac_zero_std 1.0): the "
                "advantages are all zero and nothing is learned. The task is too hard or too easy for the model, or "
                "the reward functions cannot tell completions apart: check the rewards on a few samples, raise "
                "grpo.generations or grpo.temperature, or choose easier/harder prompts.")))

    def _throughput(self, step: int, record: dict) -> None:
        if step <= 3:  # the first steps pay for warm-up
            return
        self.shares.append(record.get("data_share", 0.0))
        if "gpu_util" in record:
            self.utils.append(record["gpu_util"])
        if len(self.shares) == self.shares.maxlen and statistics.mean(self.shares) > self.d.loader_share:
            self._once(step, Finding("loader_wait", (
                f"the data loader took {100 * statistics.mean(self.shares):.0f}% of the step time over the last "
                f"{len(self.shares)} steps (above {100 * self.d.loader_share:.0f}%). Likely cause: batches so small that "
                "collating them costs as much as the model, or a slow disk; raise micro_batch_size (and lower "
                "grad_accum), and keep prepare.cache on.")))
        if len(self.utils) == self.utils.maxlen and statistics.mean(self.utils) < self.d.gpu_util_min:
            self._once(step, Finding("gpu_util", (
                f"GPU utilisation averaged {100 * statistics.mean(self.utils):.0f}% over the last {len(self.utils)} steps. "
                "Likely cause: micro-batches too small for the GPU, the data loader (see data_share), or evaluation "
                "and checkpoints too often; raise micro_batch_size, lower grad_accum, eval_every and save_every.")))

    # ---- after each evaluation ---------------------------------------------------------------

    def after_eval(self, record: dict) -> str | None:
        """Overfitting, and early stopping; returns "best" (save these weights), "early_stop" or None."""
        step = record["step"]
        if self.enabled and record.get("val_loss") is not None:
            self.val.append(record["val_loss"])
            window = self.losses[-max(1, self.cfg.eval_every or 1):]
            self.train_at_val.append(sum(window) / len(window))
            n = self.d.overfit_evals
            if rising(self.val, n) and self.train_at_val[-1] < self.train_at_val[-(n + 1)]:
                self._once(step, Finding("overfitting", (
                    f"validation loss rose for {n} evaluations in a row ({', '.join(f'{v:.4g}' for v in self.val[-(n + 1):])}) "
                    "while the training loss fell: the model is memorising the training data. Use fewer epochs, "
                    "more data, a lower learning rate or lora.dropout, or early_stopping: {patience: 3}.")))
        return self._early_stopping(step, record)

    def _early_stopping(self, step: int, record: dict) -> str | None:
        es = self.cfg.early_stopping
        if es is None or record.get(es.metric) is None:
            return None
        value = record[es.metric]
        higher = es.mode == "max" or (es.mode == "auto" and any(w in es.metric for w in ("accurac", "margin", "match")))
        better = self.best is None or (value > self.best[1] + es.min_delta if higher else value < self.best[1] - es.min_delta)
        if better:
            self.best, self.since_best = (step, value), 0
            return "best"
        self.since_best += 1
        if self.since_best < es.patience:
            return None
        self.early_stopped = True
        self.emit(step, Finding("early_stop", (
            f"{es.metric} has not improved for {self.since_best} evaluations (best {self.best[1]:.4g} at step "
            f"{self.best[0]}, now {value:.4g}); training stops and final/ holds the weights of step {self.best[0]}."),
            "info", "early_stop"))
        return "early_stop"
