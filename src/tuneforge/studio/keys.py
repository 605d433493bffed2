"""API keys of a studio, hashed at rest: a file of `NAME sha256:HEX` lines (# starts a comment). NAME owns
the files, jobs and models made with its key; a key itself is never stored, only its SHA-256.

`tuneforge studio --api-keys FILE --new-key NAME` makes a key, adds its line and prints the key once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from tuneforge.errors import ConfigError

LINE = re.compile(r"^([A-Za-z0-9_.-]{1,64})\s+sha256:([0-9a-f]{64})$")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> dict[str, str]:
    """hash -> owner name, read from the keys file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--api-keys {path}: no such file; make one with "
                          f"`tuneforge studio --api-keys {path} --new-key NAME`")
    keys: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = LINE.match(line)
        if match is None:
            raise ConfigError(f"{path}:{number}: expected `NAME sha256:<64 hex digits>`; add keys with "
                              f"`tuneforge studio --api-keys {path} --new-key NAME`")
        keys[match.group(2)] = match.group(1)
    if not keys:
        raise ConfigError(f"{path}: holds no keys; add one with `tuneforge studio --api-keys {path} --new-key NAME`")
    return keys


def owner_of(keys: dict[str, str], header: str) -> str | None:
    """The owner whose key is in an `Authorization: Bearer KEY` header, or None."""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    given = digest(key.strip())
    found = None
    for known, owner in keys.items():  # every hash compared in constant time, the match not short-cut
        if hmac.compare_digest(given, known):
            found = owner
    return found


def new_key(path: str | Path, owner: str) -> str:
    """A new random key for `owner`, its hash appended to the file (created if needed); the key is returned."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", owner):
        raise ConfigError(f"--new-key {owner!r}: a name of 1 to 64 letters, digits, '.', '-' or '_'")
    key = "sk-tf-" + secrets.token_urlsafe(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{owner} sha256:{digest(key)}\n")
    path.chmod(0o600)
    return key
