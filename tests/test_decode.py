"""One decoding module for eval, serve and GRPO: the same answers as transformers' generate(), serving and
GRPO drawing alike, and no import of the server (nor any import cycle) from the training side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tuneforge.models.decode import Sampling, decode, generate_ids, greedy_generate
from tuneforge.models.load import load_model, load_tokenizer

CPU = torch.device("cpu")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_prompts(request, tiny_models, one_thread):
    folder = tiny_models[request.param]
    tok = load_tokenizer(folder)
    texts = ["Say hello", "A much longer prompt about the weather in the mountains today", "Hi"]
    return load_model(folder, CPU).eval(), tok, [tok(t).input_ids for t in texts]


def test_greedy_answers_equal_transformers_generate(model_and_prompts):
    """Eval's exact match keeps its answers: left-padded batches give what generate() gave, row by row."""
    model, tok, prompts = model_and_prompts
    ours = greedy_generate(model, prompts, [tok.eos_token_id], tok.pad_token_id, 10, CPU, batch_size=2)
    for p, (ids, stopped) in zip(prompts, ours):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False,
                             eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        cut = ref.index(tok.eos_token_id) if tok.eos_token_id in ref else None
        assert (ids, stopped) == ((ref, False) if cut is None else (ref[:cut], True))


def test_served_tokens_equal_the_batched_decoder(model_and_prompts):
    """Serving and GRPO pick tokens alike: greedy streams equal eval's, seeded streams equal GRPO's draws."""
    model, tok, prompts = model_and_prompts
    greedy = greedy_generate(model, prompts, [], tok.pad_token_id, 8, CPU)
    for p, (ids, _) in zip(prompts, greedy):
        assert list(generate_ids(model, p, 8, Sampling(temperature=0), CPU)) == ids
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    sampled = decode(model, prompts, [], tok.pad_token_id, 8, CPU, {"temperature": 0.9, "top_p": 0.8, "generators": gens})
    for seed, p, (ids, _) in zip((11, 12, 13), prompts, sampled):
        assert list(generate_ids(model, p, 8, Sampling(temperature=0.9, top_p=0.8, seed=seed), CPU)) == ids


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every tuneforge module and the tuneforge modules it imports, imports inside functions included."""
    files = {_module(p): p for p in (SRC / "tuneforge").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_training_never_imports_the_server_and_decoding_has_no_cycle():
    graph = import_graph()
    for name in graph:
        if name.startswith(("tuneforge.train", "tuneforge.methods", "tuneforge.eval", "tuneforge.models")):
            served = sorted(m for m in reachable(graph, name) if m.startswith("tuneforge.serve"))
            assert not served, f"{name} imports the server ({served})"
    for name in ("tuneforge.models.decode", "tuneforge.eval.evaluate", "tuneforge.methods.sampling",
                 "tuneforge.serve.engine", "tuneforge.serve.server"):
        assert name not in reachable(graph, name), f"{name} imports itself through a cycle"
