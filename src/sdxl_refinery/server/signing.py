"""Signed, expiring image URLs: what OpenAI's `response_format=url` hands out.

A chat UI puts the URL in an `<img>`, which sends no API key; so the URL itself
carries the permission: `?expires=<unix time>&signature=<HMAC-SHA256 of path and expiry>`.
The secret is kept in the data folder (`url-signing.key`, created once, mode 0600),
so every API server sharing that folder (Celery deployments) signs and checks alike.
A signature opens exactly one image path until it expires, and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

KEY_FILE = "url-signing.key"


def load_or_create_key(data_dir: Path) -> bytes:
    """The data folder's signing secret, created on first use without ever overwriting one.

    Raises:
        OSError: the data folder cannot be read or written.
    """
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=data_dir)  # created 0600
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(secrets.token_bytes(32))
                stream.flush()
                os.fsync(stream.fileno())
            os.link(temporary, path)  # fails if another process created it first: theirs wins
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    return path.read_bytes()


class UrlSigner:
    """Signs and checks image paths.

    Args:
        key: the secret (see `load_or_create_key`).
        ttl_seconds: how long a signed URL opens its image.
    """

    def __init__(self, key: bytes, ttl_seconds: int) -> None:
        self._key = key
        self.ttl_seconds = ttl_seconds

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, path: str, now: float | None = None) -> str:
        """The query string that opens `path` for the next `ttl_seconds`."""
        expires = int(now if now is not None else time.time()) + self.ttl_seconds
        return urlencode({"expires": expires, "signature": self._signature(path, expires)})

    def verify(self, path: str, expires: str | None, signature: str | None, now: float | None = None) -> bool:
        """Whether `signature` was made for `path` with `expires`, and `expires` has not passed."""
        if not expires or not signature or not expires.isdigit() or len(expires) > 12:
            return False
        if int(expires) < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(signature, self._signature(path, int(expires)))
