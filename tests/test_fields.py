"""The field table: every request field is declared once and reaches every face that names it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from pydantic import BaseModel

from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.fields import Faces, field_table
from sdxl_refinery.limits import Limits, request_schema
from sdxl_refinery.request import REQUEST_FIELDS, GenerationRequest
from sdxl_refinery.server.routes.a1111 import Txt2ImgRequest
from sdxl_refinery.server.routes.openai import ImagesRequest


def test_the_table_is_the_request_model() -> None:
    assert [spec.name for spec in REQUEST_FIELDS] == list(GenerationRequest.model_fields)
    steps = next(spec for spec in REQUEST_FIELDS if spec.name == "num_inference_steps")
    assert (steps.default, steps.minimum, steps.maximum, steps.faces.cli, steps.faces.a1111) == (
        50, 1, 500, "--steps", "steps")  # fmt: skip
    switch = next(spec for spec in REQUEST_FIELDS if spec.name == "switch_at")
    assert (switch.exclusive_minimum, switch.exclusive_maximum, switch.bounds_text()) == (0.0, 1.0, "(0, 1)")
    assert next(spec for spec in REQUEST_FIELDS if spec.name == "mode").choices == ["sequential", "handoff"]


def test_a_field_without_faces_is_refused() -> None:
    class Loose(BaseModel):
        forgotten: int = 1

    with pytest.raises(TypeError, match="Loose.forgotten has no Faces"):
        field_table(Loose)
    assert isinstance(GenerationRequest.model_fields["seed"].metadata[-1], Faces)


def test_every_cli_name_in_the_table_is_a_generate_option() -> None:
    command = [sys.executable, "-m", "sdxl_refinery", "generate", "--help"]
    wide = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    help_text = subprocess.run(command, capture_output=True, text=True, env=wide, check=True).stdout
    flags = set(re.findall(r"(--[a-z-]+|-[a-zA-Z]\b)", help_text))
    for spec in REQUEST_FIELDS:
        if spec.faces.cli:
            assert set(spec.faces.cli.split("/")) <= flags, spec.name
    assert "Range [64, 4096], multiple of 8. Default 1024." in " ".join(help_text.split())


def test_every_a1111_name_is_an_optional_adapter_field_that_falls_to_the_request_default() -> None:
    named = {spec.faces.a1111: spec.name for spec in REQUEST_FIELDS if spec.faces.a1111}
    assert set(named) <= set(Txt2ImgRequest.model_fields)
    bare = Txt2ImgRequest(prompt="x").to_request()
    assert bare == GenerationRequest(prompt="x")  # nothing restated: omitted fields take the request's defaults
    sent = Txt2ImgRequest(prompt="x", steps=7, cfg_scale=5.0, seed=-1, batch_size=2, n_iter=3, width=512,
                          refiner_switch_at=0.6).to_request()  # fmt: skip
    assert (sent.num_inference_steps, sent.guidance_scale, sent.seed, sent.n, sent.width) == (7, 5.0, None, 6, 512)
    assert sent.mode.value == "handoff" and sent.switch_at == 0.6


def test_adapter_errors_name_the_clients_own_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        Txt2ImgRequest(prompt="x", steps=0).to_request()
    assert caught.value.field == "steps"
    with pytest.raises(InvalidRequest) as caught:
        ImagesRequest(prompt="x", size="12x").to_request()
    assert caught.value.field == "size"


def test_openai_omitted_fields_fall_to_defaults_and_quality_maps_guidance() -> None:
    assert ImagesRequest(prompt="x").to_request() == GenerationRequest(prompt="x", guidance_scale=7.5)
    assert ImagesRequest(prompt="x", quality="hd").to_request().guidance_scale == 8.0
    assert ImagesRequest(prompt="x", quality="auto").to_request() == GenerationRequest(prompt="x")
    assert ImagesRequest(prompt="x", size="512x768", n=2).to_request().model_dump(include={"width", "height", "n"}) == {
        "width": 512, "height": 768, "n": 2}  # fmt: skip


def test_the_schema_applies_the_servers_caps() -> None:
    fields = {entry["name"]: entry for entry in request_schema(Limits(max_width=2048, max_images=3))}
    assert set(fields) == set(GenerationRequest.model_fields)
    assert fields["width"]["maximum"] == 2048 and fields["n"]["maximum"] == 3 and fields["height"]["maximum"] == 4096
    assert fields["guidance_scale"]["default"] == GenerationRequest.default("guidance_scale")
    assert fields["mode"]["choices"] == ["sequential", "handoff"] and fields["mode"]["default"] == "sequential"


def test_every_generate_option_has_help_text() -> None:
    import typer

    from sdxl_refinery.cli import app

    generate = typer.main.get_command(app).commands["generate"]  # type: ignore[attr-defined]
    options = [param for param in generate.params if param.param_type_name == "option"]
    assert len(options) > 20
    assert [param.name for param in options if not getattr(param, "help", None)] == []
