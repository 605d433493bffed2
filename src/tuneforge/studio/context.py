"""What the web UI's endpoint functions are handed: the running studio's parts, as a protocol, so that the
endpoint modules need not import the server that calls them."""

from __future__ import annotations

from typing import Any, Protocol

from tuneforge.studio.background import Background
from tuneforge.studio.models import Models
from tuneforge.studio.store import Store


class Studio(Protocol):
    store: Store
    background: Background  # runs exports after their request has answered
    models: Models
    keys: dict[str, str] | None
    secret: bytes
    limits: Any  # server.StudioLimits: max_upload_bytes, max_files

