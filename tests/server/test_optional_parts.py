"""The server without the [celery] extra: redis and celery are imported only by the Celery backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK = "import sys; sys.modules['redis'] = None; sys.modules['celery'] = None; "


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_server_imports_without_redis() -> None:
    done = _python("import sys; sys.modules['redis'] = None; import sdxl_refinery.server.app")
    assert done.returncode == 0, done.stderr


def test_an_embedded_app_builds_and_serves_without_redis_or_celery(tmp_path: Path) -> None:
    code = BLOCK + (
        "from fastapi.testclient import TestClient; from sdxl_refinery.config import Settings; "
        "from sdxl_refinery.server import create_app; "
        f"app = create_app(Settings(data_dir={str(tmp_path)!r}, load_on_start=False)); "
        "client = TestClient(app, base_url='http://localhost').__enter__(); "
        "print(client.get('/health').status_code, client.get('/v1/workers').json()['backend'])"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "embedded"]


def test_choosing_celery_without_the_extra_names_what_is_missing(tmp_path: Path) -> None:
    code = BLOCK + (
        "from sdxl_refinery.config import Settings; from sdxl_refinery.server import create_app; "
        f"create_app(Settings(data_dir={str(tmp_path)!r}, backend='celery'))"
    )
    done = _python(code)
    assert done.returncode != 0
    assert (
        "backend=celery needs the celery extra (redis is missing): pip install 'sdxl-refinery[celery]'" in done.stderr
    )
