"""Hardening, round two (issue 31): the signing key, URL queries that were 500s, an empty Idempotency-Key."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from sdxl_refinery.config import Settings
from sdxl_refinery.errors import StorageError
from sdxl_refinery.server.app import create_app
from sdxl_refinery.server.signing import KEY_FILE

from ..fakes import fake_service
from .conftest import RunningServer, ServerFactory


def _url_image(server: RunningServer) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
    answer = client.images.generate(prompt="a fox", size="256x256", response_format="url")
    return answer.data[0].url or ""


@pytest.mark.parametrize("content", [b"", b"short"])
def test_an_empty_or_short_signing_key_is_refused_at_start(tmp_path: Path, content: bytes) -> None:
    (tmp_path / KEY_FILE).write_bytes(content)
    service, _engine = fake_service()
    try:
        with pytest.raises(StorageError, match="holds [05] bytes; a signing key needs at least 16"):
            create_app(Settings(data_dir=tmp_path, base_model="tiny", refiner_model="tiny"), service=service)
    finally:
        service.close()


def test_deleting_the_signing_key_revokes_every_url_at_once(server_factory: ServerFactory, tmp_path: Path) -> None:
    with server_factory(api_key="s3cret") as server:
        url = _url_image(server)
        assert httpx.get(url).status_code == 200
        (tmp_path / "data" / KEY_FILE).unlink()
        assert httpx.get(url).status_code == 401  # revoked without a restart
        fresh = _url_image(server)  # a new key is made for new URLs
        assert httpx.get(fresh).status_code == 200 and (tmp_path / "data" / KEY_FILE).stat().st_size >= 16
        assert httpx.get(url).status_code == 401  # the old ones stay revoked


def test_unicode_digits_and_non_ascii_signatures_are_401_not_500(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        path = _url_image(server).removeprefix(server.url).split("?")[0]
        for query in ("expires=%C2%B2&signature=x", "expires=99999999999&signature=%C3%A9",
                      "expires=%D9%A3%D9%A3&signature=ab"):  # fmt: skip
            assert httpx.get(f"{server.url}{path}?{query}").status_code == 401, query


def test_an_empty_idempotency_key_is_no_key(server: RunningServer) -> None:
    body = {"prompt": "a kite", "width": 64, "height": 64, "num_inference_steps": 2, "refiner_steps": 1}
    first = server.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": ""})
    other = server.client.post("/v1/jobs", json={**body, "prompt": "a boat"}, headers={"Idempotency-Key": ""})
    assert (first.status_code, other.status_code) == (202, 202)  # not a 409 for reusing "" with another body
    assert first.json()["id"] != other.json()["id"]
