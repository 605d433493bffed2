"""An OpenAI-compatible HTTP server for a finished run or a model folder, with several LoRA adapters on one base."""

from tuneforge.serve.engine import Limits
from tuneforge.serve.server import make_server, serve

__all__ = ["Limits", "make_server", "serve"]
