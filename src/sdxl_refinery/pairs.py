"""The service's loaded model pairs: a small cache bounded by count and by free memory."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("sdxl_refinery")

Pair = tuple[str, str]  # (base reference, refiner reference)
Engine = TypeVar("Engine")


class LoadedPairs(Generic[Engine]):
    """Loaded engines by (base, refiner), the one unused longest released first.

    Args:
        limit: at most this many pairs loaded at once.
        room_for: whether a pair not loaded yet would fit in free memory beside those loaded now.
        released: told of each engine released (after its `close()`, when it has one).

    Not thread-safe: the service's one engine thread uses it.
    """

    def __init__(self, limit: int, room_for: Callable[[Pair], bool], released: Callable[[Engine], None]) -> None:
        self.limit = limit
        self._room_for = room_for
        self._released = released
        self._engines: OrderedDict[Pair, Engine] = OrderedDict()  # oldest first
        self.last_load_seconds = 0.0  # what the latest `get` spent loading (0 when the pair was loaded)

    def keys(self) -> list[Pair]:
        """The pairs loaded now, oldest first."""
        return list(self._engines)

    def get(self, key: Pair, load: Callable[[], Engine]) -> Engine:
        """The engine of `key`, loaded by `load` on first use after releasing pairs, oldest first, while the
        limit is reached or the new pair would not fit.

        Raises:
            whatever `load` raises (ModelLoadError, InvalidRequest); the cache is left without the pair.
        """
        engine = self._engines.get(key)
        self.last_load_seconds = 0.0
        if engine is None:
            while self._engines and (len(self._engines) >= self.limit or not self._room_for(key)):
                (old_base, old_refiner), old = self._engines.popitem(last=False)
                log.info("Unloading %s + %s to make room for %s + %s", old_base, old_refiner, *key)
                if (close := getattr(old, "close", None)) is not None:
                    close()
                self._released(old)
            started = time.perf_counter()
            engine = load()
            self.last_load_seconds = time.perf_counter() - started
            log.info("Loaded %s + %s in %.1f s", *key, self.last_load_seconds)
            self._engines[key] = engine
        self._engines.move_to_end(key)
        return engine
