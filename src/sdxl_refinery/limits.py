"""A server's own caps, tighter than the request's hard rules (settings `max_*`), and the request schema the
web page builds its form from, with those caps applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .request import MAX_IMAGES, MAX_SIZE, MAX_STEPS, MIN_SIZE, REQUEST_FIELDS, GenerationRequest


@dataclass(frozen=True)
class Limits:
    """A server's own caps, tighter than the request's hard rules (settings `max_*`)."""

    max_width: int = MAX_SIZE
    max_height: int = MAX_SIZE
    max_steps: int = MAX_STEPS
    max_images: int = MAX_IMAGES
    max_prompt_tokens: int | None = None  # CLIP tokens per prompt (prompt_tokens.py); None: no cap

    def caps(self) -> dict[str, int]:
        """The cap of each request field these limits tighten."""
        return {"width": self.max_width, "height": self.max_height, "num_inference_steps": self.max_steps,
                "refiner_steps": self.max_steps, "n": self.max_images}  # fmt: skip


def enforce_limits(request: GenerationRequest, limits: Limits) -> GenerationRequest:
    """Return `request` if it fits `limits`.

    Raises:
        InvalidRequest: naming the first field over its cap.
    """
    for name, cap in limits.caps().items():
        value = getattr(request, name)
        if value > cap:
            works = f"; sizes that work here are multiples of 8 from {MIN_SIZE} to {cap}" if name in _SIZES else ""
            raise InvalidRequest(name, f"must be at most {cap} on this server, not {value}{works}")
    if request.enable_hr:
        width, height = request.hires_size
        if width > limits.max_width or height > limits.max_height:
            raise InvalidRequest("hr_scale", f"makes {width}x{height}; this server makes at most "
                                             f"{limits.max_width}x{limits.max_height}")  # fmt: skip
    if limits.max_prompt_tokens is not None:
        from .prompt_tokens import count_tokens

        for name in ("prompt", "negative_prompt"):
            if (tokens := count_tokens(getattr(request, name))) > limits.max_prompt_tokens:
                raise InvalidRequest(name, f"takes {tokens} CLIP tokens; this server takes at most "
                                           f"{limits.max_prompt_tokens} per prompt")  # fmt: skip
    return request


_SIZES = ("width", "height")


def request_schema(limits: Limits) -> list[dict[str, Any]]:
    """Every request field's default, bounds and face names, with this server's caps applied.

    The web page builds its form from this, so no default or limit is written twice.
    """
    caps = limits.caps()
    fields = []
    for spec in REQUEST_FIELDS:
        entry = spec.schema()
        if spec.name in caps:
            entry["maximum"] = min(entry["maximum"], caps[spec.name])
        fields.append(entry)
    return fields
