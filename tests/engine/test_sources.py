"""The model hash: A1111's short SHA-256, remembered per path, size and modification time."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from sdxl_refinery.engine.sources import default_hash_cache, short_hash


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first weights" * 1000)
    return path


def _same_size_and_time(path: Path, content: bytes) -> None:
    stat = path.stat()
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_hash_is_the_first_ten_hex_digits_of_sha256(weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "hashes.json"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert short_hash(weights, cache) == expected[:10]
    entry = json.loads(cache.read_text())[str(weights.resolve())]
    assert entry["sha256"] == expected and entry["size"] == weights.stat().st_size


def test_an_unchanged_file_is_not_read_again(weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hashes.json"
    first = short_hash(weights, cache)
    _same_size_and_time(weights, b"other weights" * 1000)  # what a cache hit cannot notice, by design
    assert short_hash(weights, cache) == first
    assert short_hash(weights) != first  # without the cache the file is read: `models verify`


def test_a_changed_file_is_hashed_again(weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hashes.json"
    first = short_hash(weights, cache)
    weights.write_bytes(b"fine-tuned weights" * 1000)
    assert short_hash(weights, cache) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10] != first


def test_a_corrupt_cache_is_rebuilt_with_a_warning(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "hashes.json"
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert short_hash(weights, cache) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert "unreadable" in caplog.text
    assert str(weights.resolve()) in json.loads(cache.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_the_cache_lives_under_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_hash_cache() == tmp_path / "refinery" / "model-hashes.json"
