"""API keys: who a request comes from, what it may see, and its share of the queue.

A shared server names its keys in a TOML file (`REFINERY_API_KEYS_FILE`):

    [keys.alice]
    key = "a long random secret"
    [keys.bob]
    key = "another long random secret"
    queue_share = 10        # optional: queued + running jobs this key may hold
    [keys.ops]
    key = "the operators' secret"
    admin = true            # sees every key's jobs and images

Each key sees only its own jobs and images; identical-request attachment and Idempotency-Keys are
per key; and each key holds at most its share of the queue (by default the queue's cap divided
among the keys), so one key filling the queue cannot make every other key wait for a 429.
`REFINERY_API_KEY`, the single key of a private server, is an admin key named `admin`. With
neither, the server is open (loopback only, unless allowed) and everyone is that one admin.
The file is read again when it changes; a changed file that cannot be used keeps the keys
already loaded (logged), so a typo neither locks everyone out nor opens the server.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jobs.store import Owner

log = logging.getLogger(__name__)
MIN_KEY_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class BadKeysFile(Exception):
    """The keys file cannot be used: the message names the key and the rule."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name, whether it sees every job, and its share of the queue."""

    name: str
    admin: bool
    share: int | None = None

    @property
    def owner(self) -> Owner:
        """What the job store records and counts for this caller's jobs."""
        return Owner(self.name, self.share)

    def sees(self, owner: str | None) -> bool:
        """Whether this caller may see a job of `owner` (admins see every job)."""
        return self.admin or owner == self.name


OPEN = Caller("anonymous", admin=True)  # a server without keys: whoever reaches it sees everything


def parse_keys(text: str, max_queue: int) -> dict[str, Caller]:
    """The keys of a keys file's text, by secret.

    Raises:
        BadKeysFile: not TOML, no `[keys.NAME]` tables, a name or key breaking its rule, a key used twice.
    """
    try:
        tables: Any = tomllib.loads(text).get("keys")
    except tomllib.TOMLDecodeError as error:
        raise BadKeysFile(f"not TOML: {error}") from None
    if not isinstance(tables, dict) or not tables:
        raise BadKeysFile('no keys: write one [keys.NAME] table per key, each with key = "..."')
    default_share = max(1, math.floor(max_queue / len(tables)))
    keys: dict[str, Caller] = {}
    for name, table in tables.items():
        if not _NAME.match(name):
            raise BadKeysFile(f"key name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
        if not isinstance(table, dict) or not isinstance(table.get("key"), str):
            raise BadKeysFile(f'keys.{name}: needs key = "..." (a string)')
        secret, admin, share = table["key"], table.get("admin", False), table.get("queue_share", default_share)
        if len(secret) < MIN_KEY_LENGTH:
            raise BadKeysFile(f"keys.{name}.key: must be at least {MIN_KEY_LENGTH} characters, not {len(secret)}")
        if not isinstance(admin, bool):
            raise BadKeysFile(f"keys.{name}.admin: must be true or false")
        if not isinstance(share, int) or isinstance(share, bool) or share < 1:
            raise BadKeysFile(f"keys.{name}.queue_share: must be a whole number of jobs, at least 1")
        if secret in keys:
            raise BadKeysFile(f"keys.{name}.key: the same key as keys.{keys[secret].name}; each key must be its own")
        keys[secret] = Caller(name, admin, share)
    return keys


class ApiKeys:
    """The server's keys: the keys file's (read again when it changes) and the single `api_key`.

    Raises (at construction):
        BadKeysFile: the keys file is missing or cannot be used; the server refuses to start.
    """

    def __init__(self, single_key: str | None, keys_file: Path | None, max_queue: int) -> None:
        self.single_key = single_key or None
        self.keys_file = keys_file
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._version: tuple[int, int] | None = None
        self._keys: dict[str, Caller] = {}
        self._loaded = False  # whether a usable file was read once
        self._missing = False  # whether the file's absence was logged already
        if keys_file is not None:
            if not keys_file.is_file():
                raise BadKeysFile(f"{keys_file} is not a file")
            self._reload()

    @property
    def required(self) -> bool:
        """Whether requests must present a key."""
        return self.single_key is not None or self.keys_file is not None

    def identify(self, presented: str | None) -> Caller | None:
        """The caller `presented` is the key of (`OPEN` on a server without keys), or None for no valid key."""
        if not self.required:
            return OPEN
        if presented is None:
            return None
        found: Caller | None = None
        if self.single_key is not None and secrets.compare_digest(presented.encode(), self.single_key.encode()):
            found = Caller("admin", admin=True)
        for secret, caller in self._current().items():  # every key compared, in constant time each
            if secrets.compare_digest(presented.encode(), secret.encode()):
                found = caller
        return found

    def _current(self) -> dict[str, Caller]:
        if self.keys_file is not None:
            self._reload()
        return self._keys

    def _reload(self) -> None:
        """Read the keys file again if it changed; keep the loaded keys if the new file cannot be used."""
        assert self.keys_file is not None
        with self._lock:
            try:
                stat = self.keys_file.stat()
                version: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
            except OSError as error:  # deleted or unreadable: logged once, the loaded keys stay
                version, problem = None, str(error)
            else:
                if version == self._version:
                    return
                try:
                    self._keys, self._version = (
                        parse_keys(self.keys_file.read_text(encoding="utf-8"), self.max_queue),
                        version,
                    )
                    self._loaded = True
                    log.info("Keys file %s: %d key(s) loaded", self.keys_file, len(self._keys))
                    return
                except (OSError, UnicodeDecodeError, BadKeysFile) as error:
                    problem = str(error)
            if not self._loaded:  # at start: refuse to run without the keys meant to guard it
                raise BadKeysFile(f"{self.keys_file}: {problem}")
            if version != self._version or (version is None and not self._missing):
                log.error("Keys file %s cannot be used (%s); the keys loaded before stay", self.keys_file, problem)
            self._version, self._missing = version, version is None
