"""Hostile input: schemathesis fuzzes every route of the OpenAPI schema, with and without the API key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from sdxl_refinery.server.routes.a1111_settings import OPTIONS_FILE, OPTIONS_LOCK_FILE
from sdxl_refinery.server.signing import KEY_FILE

from ..fakes import fake_service
from .conftest import RunningServer, run_server

KEY = "fuzz-key"
EXAMPLES_PER_ROUTE = 25


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def fuzz_server(fuzz_root: Path) -> Iterator[RunningServer]:
    # The fake engine: the subject is the server's answers. The queue cap makes 429 reachable.
    service, _engine = fake_service()
    with run_server(service, fuzz_root / "data", api_key=KEY, max_width=256, max_height=256, max_steps=4,
                    max_images=2, max_queue=5, sync_wait_seconds=2.0, preview_every=0) as server:  # fmt: skip
        yield server
    service.close()


def _check(case: Any, server: RunningServer) -> None:
    bare = case.call(base_url=server.url, timeout=30)
    if case.path == "/health":
        assert bare.status_code == 200
    else:
        assert bare.status_code == 401, (case.method, case.path, bare.status_code)
    keyed = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert keyed.status_code < 500, (case.method, case.path, keyed.status_code, keyed.text[:500])


def test_no_route_fails_or_hangs_on_any_input(fuzz_server: RunningServer) -> None:
    # schemathesis' pytest plugin does not support this pytest; its case strategies drive hypothesis directly.
    schema = schemathesis.openapi.from_dict(fuzz_server.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            _check(case, fuzz_server)

        fuzz()


def test_fuzzing_wrote_nothing_outside_the_data_folder(fuzz_root: Path, fuzz_server: RunningServer) -> None:
    assert sorted(path.name for path in fuzz_root.iterdir()) == ["data"]
    data = fuzz_root / "data"
    ours = (KEY_FILE, OPTIONS_FILE, OPTIONS_LOCK_FILE, ".gitignore")
    stray = [path for path in data.rglob("*") if path.is_file()
             and not (path.name.startswith("jobs.sqlite3") or path.name in ours
                 or path.parent.parent == data / "images")]  # fmt: skip
    assert stray == []
