"""The service's cache of loaded pairs: bounded by count and by room, the one unused longest released first."""

from __future__ import annotations

import pytest

from sdxl_refinery.pairs import LoadedPairs


class Loaded:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_pair_unused_longest_goes_first_and_the_count_never_exceeds_the_limit() -> None:
    released: list[str] = []
    pairs: LoadedPairs[Loaded] = LoadedPairs(2, lambda _pair: True, lambda engine: released.append(engine.name))
    a = pairs.get(("a", "r"), lambda: Loaded("a"))
    pairs.get(("b", "r"), lambda: Loaded("b"))
    assert pairs.get(("a", "r"), lambda: Loaded("a again")) is a and pairs.last_load_seconds == 0.0
    pairs.get(("c", "r"), lambda: Loaded("c"))  # b is the one unused longest now
    assert released == ["b"] and pairs.keys() == [("a", "r"), ("c", "r")] and not a.closed


def test_without_room_every_loaded_pair_is_released_before_the_load() -> None:
    loaded = [Loaded("a"), Loaded("b")]
    pairs: LoadedPairs[Loaded] = LoadedPairs(3, lambda pair: pair[0] != "big", lambda _engine: None)
    for engine in loaded:
        pairs.get((engine.name, "r"), lambda engine=engine: engine)  # type: ignore[misc]
    pairs.get(("big", "r"), lambda: Loaded("big"))
    assert all(engine.closed for engine in loaded) and pairs.keys() == [("big", "r")]


def test_a_failing_load_leaves_no_entry() -> None:
    pairs: LoadedPairs[Loaded] = LoadedPairs(1, lambda _pair: True, lambda _engine: None)

    def broken() -> Loaded:
        raise OSError("no such model")

    with pytest.raises(OSError, match="no such model"):
        pairs.get(("x", "r"), broken)
    assert pairs.keys() == []
