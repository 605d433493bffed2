"""`tuneforge merge-models` against mergekit itself, method by method, on tiny saved Llama models.

Runs where mergekit is importable (it needs its own environment: see docs/merging.md), skipped
elsewhere. Both merge in float32; tensors must agree to 1e-5 absolute (float32 summation order
differs between the two). DARE runs at density 1.0 (no random drop), since mergekit draws its masks
from torch's global generator and tuneforge from a per-tensor seed: what is compared there is the
weighting, sign election and normalisation around the drop. tuneforge's dare_ties averages the
agreeing entries (TIES's disjoint mean), which is mergekit's dare_ties with `normalize: true`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_merge_models import make_model, save_tokenizer

from tuneforge.merge.run import merge_models

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit is not installed; it needs its own venv (docs/merging.md: pip install mergekit)"
)

TOLERANCE = 1e-5

# method -> (tuneforge config, extra mergekit keys), over base + fine-tunes a, b (c for model_stock)
METHODS = {
    "linear": ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.7}},
                                                     {"model": "b", "parameters": {"weight": 0.3}}]}, {}),
    "slerp": ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
               "parameters": {"t": 0.3}}, {}),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": "base",
                         "models": [{"model": "a", "parameters": {"weight": 0.6}},
                                    {"model": "b", "parameters": {"weight": 0.8}}],
                         "parameters": {"lambda": 0.9}}, {}),
    "ties": ({"merge_method": "ties", "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": "b", "parameters": {"weight": 0.8, "density": 0.5}}]}, {}),
    "dare_ties": ({"merge_method": "dare_ties", "base_model": "base",
                   "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 1.0}},
                              {"model": "b", "parameters": {"weight": 0.8, "density": 1.0}}]}, {"normalize": True}),
    "dare_linear": ({"merge_method": "dare_linear", "base_model": "base",
                     "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 1.0}},
                                {"model": "b", "parameters": {"weight": 0.8, "density": 1.0}}]}, {}),
    "model_stock": ({"merge_method": "model_stock", "base_model": "base",
                     "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]}, {}),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mk_zoo")
    base = make_model(root / "base", 0)
    for i, name in enumerate(("a", "b", "c"), start=1):
        make_model(root / name, i, like=base)
    for name in ("base", "a", "b", "c"):
        save_tokenizer(root / name)
    return root


def mergekit_config(cfg: dict, extra: dict, root: Path) -> dict:
    """The same merge in mergekit's YAML: absolute paths, float32."""
    models = [{"model": str(root / m["model"]), **({"parameters": m["parameters"]} if "parameters" in m else {})}
              for m in cfg["models"]]
    out = {"merge_method": cfg["merge_method"], "models": models, "dtype": "float32",
           "parameters": {**cfg.get("parameters", {}), **extra}}
    if cfg.get("base_model"):
        out["base_model"] = str(root / cfg["base_model"])
    return out


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def max_abs_diffs(zoo: Path, tmp_path: Path, method: str) -> dict[str, float]:
    cfg, extra = METHODS[method]
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "dtype": "float32"}))
    for name in ("base", "a", "b", "c"):
        (tmp_path / name).symlink_to(zoo / name)
    ours = merge_models(path, tmp_path / f"{method}-tuneforge")
    theirs = run_mergekit(mergekit_config(cfg, extra, zoo), tmp_path / f"{method}-mergekit")
    mine = load_file(ours / "model.safetensors")
    assert set(mine) == set(theirs), set(mine) ^ set(theirs)
    for name in ("base", "a", "b"):  # the merge moved every weight matrix: a no-op on both sides would also agree
        start = load_file(zoo / name / "model.safetensors")
        assert all((mine[n] - start[n]).abs().max() > 1e-4 for n in mine if mine[n].ndim == 2), (method, name)
    return {name: (mine[name].float() - theirs[name].float()).abs().max().item() for name in mine}


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_models_matches_mergekit(zoo, tmp_path, method):
    diffs = max_abs_diffs(zoo, tmp_path, method)
    worst = max(diffs, key=diffs.get)
    print(f"{method}: max abs diff {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= TOLERANCE, (method, worst, diffs[worst])
