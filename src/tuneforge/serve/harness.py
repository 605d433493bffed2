"""The lm_eval suite entry of `tuneforge eval`: base and tuned behind `tuneforge serve`, scored by lm-eval's
local-completions model (eval/harness.py). It lives here, above evaluation, because it starts the server."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from tuneforge.eval.harness import check_task_data, run_tasks
from tuneforge.serve.server import Server, make_server


@contextlib.contextmanager
def serving(server: Server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def harness_before_after(spec, run, base: Path, device: str) -> dict:
    """{before: {task: metrics}, after: ...} for the base model folder and the finished run (None: base only).
    A LoRA run is served once (its base is the adapter switched off); a full fine-tune beside its base."""
    check_task_data(spec.include_path, spec.tasks)
    if run is None:
        with serving(make_server(base, port=0, device=device, quiet=True)) as server:
            return {"before": run_tasks(spec, server.url, server.engine.default_id, base), "after": None}
    with serving(make_server(run.dir, port=0, device=device, quiet=True)) as tuned:
        after = run_tasks(spec, tuned.url, tuned.engine.default_id, run.final)
        if tuned.engine.base_id is not None:
            return {"before": run_tasks(spec, tuned.url, tuned.engine.base_id, run.final), "after": after}
    with serving(make_server(base, port=0, device=device, quiet=True)) as server:
        return {"before": run_tasks(spec, server.url, server.engine.default_id, run.final), "after": after}
