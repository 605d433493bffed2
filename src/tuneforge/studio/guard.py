"""What keeps a web page from acting through the studio: Host, Origin and CSRF checks, and the static assets'
names and headers. Pure functions of a request's method and headers, called once per request by the server.

A browser announces itself with `Origin` or `Sec-Fetch-Site`; such a request must come from this server's own
origin, and if it changes state it must carry `X-CSRF-Token` (an HMAC of the owner under a secret kept in the
studio home, so the token survives a restart). Clients that send neither header (the openai client, curl) are
not browsers, so no other site's page can make them send a request; they are unaffected. When the studio is
bound to loopback, a Host that is not a loopback name is a DNS-rebinding page pretending to be us: refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from tuneforge.serve.protocol import ApiError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
STATIC_NAME = re.compile(r"[a-z0-9_-]{1,64}\.(js|css|svg|png)")
CONTENT_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "svg": "image/svg+xml",
                 "png": "image/png", "html": "text/html; charset=utf-8"}
# On the page and every asset: nothing runs or loads but this server's own files (no inline scripts).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
SECRET_FILE = "csrf.secret"


def load_secret(home: Path) -> bytes:
    """The studio's CSRF secret, made once (readable by its owner only) and kept under the home folder."""
    path = home / SECRET_FILE
    if not path.is_file():
        tmp = home / f".{SECRET_FILE}.{os.getpid()}.tmp"
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        os.replace(tmp, path)
    return path.read_bytes()


def csrf_token(secret: bytes, owner: str) -> str:
    """The token a page of this owner sends back in X-CSRF-Token: the same after a restart."""
    return hmac.new(secret, owner.encode(), hashlib.sha256).hexdigest()


def _hostname(netloc: str) -> str:
    """`host:port` or `[v6]:port` -> host, lower-case ("" for a malformed one)."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def _netloc(origin: str) -> str:
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return ""


def loopback_bound(bound_host: str) -> bool:
    return bound_host in LOOPBACK_NAMES


def check_request(method: str, headers: Mapping[str, str], bound_host: str, secret: bytes,
                  owner: Callable[[], str]) -> None:
    """Raise a 403 for a request a browser must not make; `owner` is asked only when a token must be checked."""
    host = headers.get("Host")
    if host and loopback_bound(bound_host) and _hostname(host) not in LOOPBACK_NAMES:
        raise ApiError(403, f"Host {host!r}: this studio is bound to {bound_host} and answers only loopback names "
                       "(127.0.0.1, localhost, ::1); open it at http://127.0.0.1:PORT/", code="host_not_allowed")
    origin, site = headers.get("Origin"), headers.get("Sec-Fetch-Site")
    if origin is None and site is None:
        return  # not a browser
    if origin is not None and (not host or _netloc(origin) != host.lower()):
        raise ApiError(403, f"Origin {origin!r}: requests from another site's page are refused; use the studio's "
                       "own page", code="origin_not_allowed")
    if method not in STATE_CHANGING:
        return
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(403, f"Sec-Fetch-Site {site!r}: a state-changing request must come from the studio's own "
                       "page", code="csrf")
    given = headers.get("X-CSRF-Token", "")
    if not hmac.compare_digest(given.encode(), csrf_token(secret, owner()).encode()):
        raise ApiError(403, "X-CSRF-Token: missing or wrong; send the csrf_token from GET /v1/tuneforge/session "
                       "with every POST, PUT, PATCH and DELETE from a browser", code="csrf")


def static_file(folder: Path, name: str) -> tuple[Path, str]:
    """(the asset's path, its content type); only plain names in the static folder itself, else 404."""
    match = STATIC_NAME.fullmatch(name)
    path = folder / name if match else None
    if path is None or not path.is_file():
        raise ApiError(404, f"/static/{name[:80]}: no such asset", code="not_found")
    return path, CONTENT_TYPES[match.group(1)]
