"""The fine-tuning service: OpenAI's files and fine-tuning jobs API over tuneforge, with a durable queue,
serving the models it trains (docs/studio.md)."""

from tuneforge.studio.server import StudioLimits, make_studio, studio

__all__ = ["StudioLimits", "make_studio", "studio"]
