"""Upscale jobs in both stores: stored and read back as upscales, never batched with generations."""

from __future__ import annotations

import pytest
from PIL import Image

from sdxl_refinery.jobs.models import request_from_record
from sdxl_refinery.jobs.store import JobStore
from sdxl_refinery.upscale_request import UpscaleRequest


@pytest.fixture
def store(each_store: JobStore) -> JobStore:
    return each_store


def test_an_upscale_is_stored_and_read_back_with_its_images(store: JobStore) -> None:
    request = UpscaleRequest(images=[Image.new("RGB", (30, 20), "red"), Image.new("RGB", (8, 8))],
                             upscaler="tiny-4x", scale=4)  # fmt: skip
    job = store.create(request, client="native")
    again = store.get(job.id)
    assert isinstance(again.request, UpscaleRequest) and again.request == request
    assert again.request.images[0] is not None and again.request.images[0].open().size == (30, 20)  # pixels kept
    assert store.depth() == 1


def test_requests_read_back_by_their_kind() -> None:
    upscale = request_from_record({"kind": "upscale", "images": [Image.new("RGB", (8, 8))]})
    assert isinstance(upscale, UpscaleRequest) and upscale.upscaler == "Lanczos" and upscale.scale == 2
    assert type(request_from_record({"prompt": "a kite"})).__name__ == "GenerationRequest"


def test_bad_upscales_are_refused_naming_the_field() -> None:
    from sdxl_refinery.errors import InvalidRequest

    image = Image.new("RGB", (3000, 1000))
    with pytest.raises(InvalidRequest, match="would become 12000x4000; at most 8192") as caught:
        UpscaleRequest(images=[image], scale=4)
    assert caught.value.field == "scale"
    with pytest.raises(InvalidRequest) as caught:
        UpscaleRequest(images=[image], width=1024)
    assert caught.value.field == "width" and "both width and height" in caught.value.rule
    with pytest.raises(InvalidRequest) as caught:
        UpscaleRequest(images=[])
    assert caught.value.field == "images"
