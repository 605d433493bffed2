"""Regional compilation as a function applied to a model: `apply_compile`.

torch.compile of each decoder layer rather than of the whole model: the layers share one code path,
so one compilation serves them all and compiling takes the time of one layer, and the embedding,
loss and PEFT wrappers around them stay eager. `Module.compile` compiles in place, so parameter
names, checkpoints and saved adapters are unchanged.

A checkpointed layer (fast/recompute.py) is compiled inside its checkpoint instead: transformers'
output-capturing hooks touch state within the layer, which torch.compile will not trace inside a
checkpoint (it would replay the change in the backward), so the checkpoint stays eager and calls a
compiled function.
"""

from __future__ import annotations

from tuneforge.models.layers import decoder_layers


def _run(function, *args):
    return function(*args)


def apply_compile(model, backend: str = "inductor") -> int:
    """Compile every decoder layer (after activation checkpointing, before DDP or FSDP); returns how many.
    `backend`: torch.compile's; tests use aot_eager, which traces the same graphs without generating code."""
    import torch

    layers = decoder_layers(model)
    compiled_run = torch.compile(_run, backend=backend)  # one compiled region shared by checkpointed layers
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = _inside(layer._gradient_checkpointing_func, compiled_run)
        else:
            layer.compile(backend=backend)
    return len(layers)


def _inside(checkpoint_func, compiled_run):
    """A checkpoint function that runs the layer through the compiled region."""

    def checkpoint_compiled(function, *args, **kwargs):
        return checkpoint_func(compiled_run, function, *args, **kwargs)

    return checkpoint_compiled
