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
MIN_KEY_BYTES = 16  # a shorter secret (an empty file, a truncated copy) is refused at start


class WeakSigningKey(ValueError):
    """The data folder's signing secret is empty or too short to sign with."""


def load_or_create_key(data_dir: Path) -> bytes:
    """The data folder's signing secret, created on first use without ever overwriting one.

    Raises:
        OSError: the data folder cannot be read or written.
        WeakSigningKey: the file holds fewer than 16 bytes (an empty key would sign for anyone).
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
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise WeakSigningKey(f"{path} holds {len(key)} bytes; a signing key needs at least {MIN_KEY_BYTES} (delete "
                             f"the file and a new key is made)")  # fmt: skip
    return key


class UrlSigner:
    """Signs and checks image paths with the data folder's key, read again whenever the file changes: deleting
    it revokes every URL at once (the next URL signed makes a new key), replacing it takes effect at once.

    Args:
        data_dir: where the key lives (see `load_or_create_key`).
        ttl_seconds: how long a signed URL opens its image.

    Raises:
        WeakSigningKey, OSError: as `load_or_create_key`, at construction (the server's start).
    """

    def __init__(self, data_dir: Path, ttl_seconds: int) -> None:
        self._data_dir = data_dir
        self._version: tuple[int, int] | None = None
        self._key = b""
        self.ttl_seconds = ttl_seconds
        self._load()

    def _load(self) -> None:
        self._key = load_or_create_key(self._data_dir)
        status = (self._data_dir / KEY_FILE).stat()
        self._version = (status.st_mtime_ns, status.st_size)

    def _current_key(self, create: bool) -> bytes | None:
        """The key as the file holds it now; None when it was deleted and `create` is False (revoked)."""
        try:
            status = (self._data_dir / KEY_FILE).stat()
        except FileNotFoundError:
            if not create:
                return None
            self._load()
            return self._key
        if (status.st_mtime_ns, status.st_size) != self._version:
            self._load()
        return self._key

    @staticmethod
    def _signature(key: bytes, path: str, expires: int) -> str:
        return hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, path: str, now: float | None = None) -> str:
        """The query string that opens `path` for the next `ttl_seconds`."""
        expires = int(now if now is not None else time.time()) + self.ttl_seconds
        key = self._current_key(create=True)
        assert key is not None
        return urlencode({"expires": expires, "signature": self._signature(key, path, expires)})

    def verify(self, path: str, expires: str | None, signature: str | None, now: float | None = None) -> bool:
        """Whether `signature` was made for `path` with `expires` under the current key, and `expires` has not
        passed. Anything else (non-ASCII digits or signatures, a deleted or unreadable key) is False."""
        if not expires or not signature or not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            return False
        if not signature.isascii() or int(expires) < (now if now is not None else time.time()):
            return False
        try:
            key = self._current_key(create=False)
        except (OSError, WeakSigningKey):  # replaced by something unusable: nothing opens until it is fixed
            return False
        return key is not None and hmac.compare_digest(signature, self._signature(key, path, int(expires)))
