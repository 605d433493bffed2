"""The served model: a run or a Hugging Face folder, its LoRA adapters, and generation that takes turns token by
token between the requests being answered."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.data.template import encode_segment_lists, find_end_of_turn, generation_prompt
from tuneforge.errors import ModelError, TuneforgeError
from tuneforge.methods.facts import METHODS, function_at, method_facts
from tuneforge.models.adapter_files import adapter_weights
from tuneforge.models.decode import Sampling, generate_ids, stop_token_ids
from tuneforge.models.load import load_model, pick_device
from tuneforge.models.run import inference_dtype, load_tuned, open_run
from tuneforge.serve.classify import INPUTS
from tuneforge.serve.heads import GENERATION_ROUTES, SERVED, folder_head
from tuneforge.serve.protocol import ApiError
from tuneforge.serve.targets import is_run_folder
from tuneforge.serve.text import IncrementalDecoder, cut_at_stops
from tuneforge.serve.turns import Turns


class ShuttingDown(Exception):
    """Generation stopped because the server is closing; nobody is left to answer."""


class ClientGone(Exception):
    """Generation stopped because the client closed its connection; nobody is left to answer."""


@dataclass(frozen=True)
class Limits:
    """What one request may take: --max-tokens-default, --max-tokens-cap and --max-concurrent of `tuneforge serve`."""

    max_tokens_default: int = 1024  # new tokens for a request that names no max_tokens (at most the cap)
    max_tokens_cap: int = 4096  # a request asking for more is refused (400)
    max_concurrent: int = 8  # requests decoding at once (taking turns token by token); more get 503

    def __post_init__(self):
        for key in ("max_tokens_default", "max_tokens_cap", "max_concurrent"):
            if getattr(self, key) < 1:
                raise TuneforgeError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be at least 1")


@dataclass
class Result:
    """What one generation produced; filled in while its text streams."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"


@dataclass
class Engine:
    model: object
    tokenizer: object
    device: torch.device
    stop_ids: list[int]
    end_of_turn: str | None
    default_id: str
    base_id: str | None = None  # the model with every adapter switched off (a PEFT model only)
    adapters: dict[str, str] = field(default_factory=dict)  # model id -> PEFT adapter name
    limits: Limits = field(default_factory=Limits)
    turns: Turns = field(default_factory=Turns)  # one model call (or tokenizer call) at a time, in arrival order
    closing: threading.Event = field(default_factory=threading.Event)  # set: generation stops at the next token
    head: str = "causal_lm"  # the model's head (its run's row): which POST routes it answers (serve/heads.py)

    def __post_init__(self):
        self.slots = threading.BoundedSemaphore(self.limits.max_concurrent)

    def model_ids(self) -> list[str]:
        return list(dict.fromkeys(i for i in (self.base_id, self.default_id, *self.adapters) if i))

    def resolve(self, model_id: str | None) -> str:
        """The served id a request asks for; no `model` means the default one."""
        model_id = model_id or self.default_id
        if model_id not in self.model_ids():
            raise ApiError(404, f"model: {model_id!r} is not served here; GET /v1/models lists "
                           f"{', '.join(self.model_ids())}", param="model", code="model_not_found")
        return model_id

    @property
    def routes(self) -> dict[str, str]:
        return SERVED[self.head].routes

    def classify(self, model_id: str, inputs: list) -> tuple[torch.Tensor, list[dict] | None]:
        """Class probabilities of each input (a classifier's or reward model's /v1/classify) and the fields its head
        adds beside them (a reward), one model call in the engine's turn."""
        served = INPUTS[self.head]
        with self.turns.turn(), self._use(model_id):
            batch = served.batch(self.tokenizer, self.model, inputs, self.end_of_turn)
            return served.scores(self.model, batch, self.device)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ApiError(400, "messages: this model has no chat template, so it cannot take chat messages; "
                           "use POST /v1/completions with a prompt", param="messages")
        with self.turns.turn():  # the Rust tokenizer refuses to be used by two threads at once
            return generation_prompt(self.tokenizer, messages, self.end_of_turn)

    def text_prompt(self, prompt: str) -> list[int]:
        """Tokenized as `completion` training data was: with the BOS the tokenizer adds, no EOS."""
        with self.turns.turn():
            [(ids, _)] = encode_segment_lists(self.tokenizer, [[(prompt, False)]])
        if len(ids) == 0:
            raise ApiError(400, "prompt: is empty; give some text to continue", param="prompt")
        return ids.tolist()

    def check_length(self, prompt: list[int], sampling: Sampling) -> int:
        """max_tokens for this request: as asked, or --max-tokens-default cut to the room left in the context;
        400 above --max-tokens-cap or past the context."""
        asked, cap = sampling.max_tokens, self.limits.max_tokens_cap
        if asked is not None and asked > cap:
            raise ApiError(400, f"max_tokens: {asked} is above this server's cap of {cap} new tokens "
                           f"(--max-tokens-cap); ask for at most {cap}", param="max_tokens")
        default = min(self.limits.max_tokens_default, cap)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is None:
            return asked or default
        room = context - len(prompt)
        if room <= 0 or (asked or 0) > room:
            raise ApiError(400, f"max_tokens: the prompt has {len(prompt)} tokens and the model's context is "
                           f"{context}, so at most {max(room, 0)} new tokens fit; shorten the prompt or lower "
                           "max_tokens", param="max_tokens", code="context_length_exceeded")
        return asked or min(default, room)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """A place among the --max-concurrent requests decoding now, or 503 with Retry-After at once:
        a bounded number of KV caches in memory, and no client waits in a line it cannot see."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(503, f"the server is busy: {self.limits.max_concurrent} requests are being answered "
                           "(--max-concurrent); retry after the Retry-After header's seconds",
                           code="server_busy", kind="server_error", headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self.slots.release()

    def stream(self, model_id: str, prompt: list[int], max_new: int, sampling: Sampling, result: Result,
               gone: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Text pieces of the answer; `result` holds the counts and finish reason once the iterator ends.

        Each token is one turn of the engine (the adapter is chosen again for it), so concurrent requests
        take turns token by token. Before each turn `gone()` is asked whether the client has hung up; if so
        generation stops (ClientGone). Close the iterator when you stop reading early.
        """
        decoder = IncrementalDecoder(self.tokenizer)
        tokens = generate_ids(self.model, prompt, max_new, sampling, self.device)

        def pieces():
            with contextlib.closing(tokens):
                while True:
                    if self.closing.is_set():
                        raise ShuttingDown
                    if gone():
                        raise ClientGone
                    with self.turns.turn(), self._use(model_id):
                        tok = next(tokens, None)
                        if tok is None:
                            break
                        result.completion_tokens += 1
                        if tok in self.stop_ids:
                            result.finish_reason = "stop"
                            break
                        piece = decoder.push(tok)
                    yield piece
            with self.turns.turn():
                tail = decoder.flush()
            yield tail

        for text, hit in cut_at_stops(pieces(), sampling.stop):
            if text:
                yield text
            if hit:
                result.finish_reason = "stop"
                return

    def score(self, model_id: str, ids: list[int], top: int, next_token: bool) -> list[tuple[int, float | None, dict]]:
        """(token id, log-prob given the tokens before it, {id: log-prob} of the `top` likeliest there) for each
        prompt token (the first has no log-prob), and with `next_token` one greedy token after them: what lm-eval's
        log-likelihood requests read. One forward pass in fp32 log-softmax, as the model's own scoring does."""
        self.check_length(ids, Sampling(max_tokens=1) if next_token else Sampling(max_tokens=None))
        vocab = self.model.get_input_embeddings().num_embeddings
        if max(ids) >= vocab:
            raise ApiError(400, f"prompt: token id {max(ids)} is outside this model's vocabulary (0-{vocab - 1})",
                           param="prompt")
        with self.turns.turn(), self._use(model_id), torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        chosen = ids + ([int(logp[-1].argmax())] if next_token else [])

        def at(i: int) -> tuple[int, float | None, dict]:  # token i, predicted from position i - 1
            if i == 0:
                return chosen[0], None, {}
            row = logp[i - 1]
            best = row.topk(top) if top else None
            tops = {} if best is None else {int(j): float(v) for v, j in zip(best.values, best.indices)}
            return chosen[i], float(row[chosen[i]]), tops
        return [at(i) for i in range(len(chosen))]

    def token_texts(self, ids: list[int]) -> list[str]:
        with self.turns.turn():
            return [self.tokenizer.decode([i]) for i in ids]

    def add_adapter(self, name: str, path: Path) -> None:
        """Serve one more LoRA adapter (a PEFT folder or a LoRA run) as `name` beside the others, without
        loading the model again: it is loaded in a turn of its own, between two tokens of other requests."""
        if name in self.model_ids():
            raise ModelError(f"adapter {name}: already served here; choose another name")
        folder = adapter_folder(name, Path(path))
        taken = set(self.adapters.values())
        internal = next(f"extra{i}" for i in itertools.count() if f"extra{i}" not in taken)
        with self.turns.turn():
            self.model = _load_adapter(self.model, name, folder, internal)
        if self.base_id is None:
            self.base_id = self.default_id  # as load_engine does: the model's own weights stay servable
        self.adapters = {**self.adapters, name: internal}  # a new dict: readers never see one half-changed

    def _use(self, model_id: str):
        """Switch the PEFT model to this id's adapter, or off for the base id."""
        if model_id == self.base_id:
            return self.model.disable_adapter()
        if model_id in self.adapters:
            self.model.set_adapter(self.adapters[model_id])
        return contextlib.nullcontext()


def parse_adapters(adapters: Mapping[str, str | Path] | Sequence[str] | None) -> dict[str, Path]:
    """NAME=PATH strings (as the CLI gives them) or a mapping, checked."""
    if not adapters:
        return {}
    if isinstance(adapters, Mapping):
        return {str(k): Path(v) for k, v in adapters.items()}
    out = {}
    for spec in adapters:
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise ModelError(f"--adapter {spec}: write it as NAME=PATH, e.g. --adapter support=runs/support")
        if name in out:
            raise ModelError(f"--adapter {spec}: the name {name} is given twice; each adapter needs its own name")
        out[name] = Path(path)
    return out


def adapter_folder(name: str, path: Path) -> Path:
    """A PEFT adapter folder (safetensors only), or a LoRA run folder (its final/)."""
    for folder in (path, path / "final"):
        if (folder / "adapter_config.json").is_file():
            adapter_weights(folder, f"--adapter {name}={path}")
            return folder
    raise ModelError(f"--adapter {name}={path}: no adapter_config.json there or in {path / 'final'}; give a PEFT "
                     "adapter folder or the folder of a LoRA run")


def _served_name(folder: Path) -> str:
    return folder.resolve().name


def _base_name(run) -> str:
    name = run.config.base_model
    return _served_name(Path(name)) if Path(name).is_dir() else name


def load_engine(target: str | Path, adapters: Mapping[str, str | Path] | Sequence[str] | None = None,
                device: str = "auto", limits: Limits = Limits(), trust_remote_code: bool = False) -> Engine:
    """Load a run folder (run.json + final/) or a Hugging Face model folder, and every extra adapter;
    code shipped with the model runs only with `trust_remote_code` (--trust-remote-code)."""
    target = Path(target)
    extra = {name: adapter_folder(name, path) for name, path in parse_adapters(adapters).items()}
    dev = pick_device(device)
    head = "causal_lm"
    if is_run_folder(target):
        run = open_run(target, trust_remote_code)
        head = method_facts(run.config).model_head
        if extra and not SERVED[head].base_servable:
            raise ModelError(f"--adapter: {target} is {SERVED[head].kind} with a head the run trained; it is served "
                             "alone (start one server per run)")
        model, tokenizer = load_tuned(run, dev, inference_dtype(dev))
        end_of_turn, stops = run.manifest.get("end_of_turn"), run.stop_ids
        default_id = _served_name(target)
        base_id = _base_name(run) if run.is_adapter and SERVED[head].base_servable else None
        own = {default_id: "default"} if run.is_adapter else {}
    elif (target / "config.json").is_file():
        head = folder_head(json.loads((target / "config.json").read_text()))
        # The inputs' processor of the head's rows: a tokenizer, or an image classifier's image processor.
        processor = next(m.processor for m in METHODS.values() if m.model_head == head)
        tokenizer = function_at(processor)(target, trust_remote_code=trust_remote_code)
        model = load_model(target, dev, trust_remote_code, inference_dtype(dev), head=head,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None))  # a sequence head's last token
        model.eval()
        end_of_turn = _end_of_turn(tokenizer)
        stops = _folder_stops(model, tokenizer, end_of_turn) if SERVED[head].routes == GENERATION_ROUTES else []
        default_id, base_id, own = _served_name(target), None, {}
    else:
        raise ModelError(f"{target}: neither a run folder (run.json + final/) nor a model folder (config.json); "
                         "give the folder `tuneforge train` wrote, or an exported model folder")
    if not stops and SERVED[head].routes == GENERATION_ROUTES:
        raise ModelError(f"{target}: no end-of-turn or EOS token is known, so answers could never end")
    ids = [i for i in (base_id, default_id) if i]
    for name in extra:
        if name in ids:
            raise ModelError(f"--adapter {name}=...: {name} is already the id of the served model; choose another name")
    if extra and base_id is None:
        base_id = default_id  # the target's own weights become the no-adapter choice
    model = _load_adapters(model, extra)
    names = {**own, **{name: f"extra{i}" for i, name in enumerate(extra)}}
    return Engine(model, tokenizer, dev, stops, end_of_turn, default_id, base_id, names, limits, head=head)


def _end_of_turn(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):  # an image processor has none
        return None
    try:
        return find_end_of_turn(tokenizer)
    except TuneforgeError:
        return None  # chat requests get find_end_of_turn's message; completions still work


def _folder_stops(model, tokenizer, end_of_turn: str | None) -> list[int]:
    """The template's end-of-turn and EOS, plus every EOS id the folder's generation_config.json names."""
    stops = stop_token_ids(tokenizer, end_of_turn)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # none: a classifier's
    for idx in eos if isinstance(eos, list) else [eos]:
        if idx is not None and idx not in stops:
            stops.append(idx)
    return stops


def _load_adapters(model, extra: dict[str, Path]):
    """Each extra adapter under an internal PEFT name (PEFT names cannot hold dots; served ids can)."""
    for i, (name, folder) in enumerate(extra.items()):
        model = _load_adapter(model, name, folder, f"extra{i}")
    return model


def _load_adapter(model, name: str, folder: Path, internal: str):
    """The model (wrapped by PEFT at the first adapter) with one more adapter, in eval mode."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=internal)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=internal)
    except Exception as err:
        raise ModelError(f"--adapter {name}={folder}: could not load it onto the served model ({err}); "
                         "was it trained on this base model?") from None
    model.eval()
    return model
