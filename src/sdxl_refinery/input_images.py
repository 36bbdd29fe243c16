"""Images a request starts from (init images and masks): read, checked and hashed before any work.

An `InputImage` keeps the file's encoded bytes, so a request carrying one can be
queued as JSON (a `data:` URL) and read back the same in any worker. Recorded
results carry only its hash and size (`InputImage.summary`); a request read back
from such a record holds a *reference*, which says what the image was but cannot
be run until the image itself is given again (`--from` asks for it).

Text is always image data (base64, with or without a `data:` prefix), never a
file name: a file is read only when given as a `pathlib.Path` (the library, the
command line), so no HTTP client can make the server read one of its files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path
from typing import Annotated, Any

from PIL import Image, UnidentifiedImageError
from pydantic import BeforeValidator, PlainSerializer, SerializationInfo, WithJsonSchema

from .config import MAX_INPUT_BYTES
from .errors import InvalidRequest

MAX_INPUT_PIXELS = 4096 * 4096  # the largest image a request may produce; Pillow's bomb check is set to it
HASH_LENGTH = 12  # hex digits recorded in metadata (as A1111 records LoRA hashes)
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif"}
_DATA_URL = re.compile(r"^data:([\w/+.-]*)(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-f]{12,64}$")
_BASE64_PIECE = 1 << 20  # characters decoded per call: a multiple of 4, so each piece decodes alone


class InputImage:
    """An image file given to a request, checked to decode within the pixel limit.

    Attributes:
        sha256: the hex sha256 of the file's bytes (a reference may hold only its first digits).
        width, height: its size in pixels.
        data: the encoded file, or None for a reference (a recorded hash without the image).
    """

    __slots__ = ("data", "height", "mime", "sha256", "width")

    def __init__(self, data: bytes | None, mime: str, sha256: str, width: int, height: int) -> None:
        self.data, self.mime, self.sha256, self.width, self.height = data, mime, sha256, width, height

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> InputImage:
        """An encoded image file (PNG, JPEG, WebP, BMP, GIF).

        Raises:
            ValueError: not an image of those formats, larger than the byte or pixel limit, or truncated.
        """
        if len(data) > MAX_INPUT_BYTES:
            raise ValueError(f"is {len(data)} bytes; at most {MAX_INPUT_BYTES} bytes are read")
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only: the size is known before decoding
                width, height, kind = image.width, image.height, image.format or ""
                if width * height > MAX_INPUT_PIXELS:
                    raise ValueError(f"has {width}x{height} pixels; at most {MAX_INPUT_PIXELS} pixels "
                                     f"(4096x4096) are decoded")  # fmt: skip
                if kind not in _FORMATS:
                    raise ValueError(f"is a {kind or 'unknown'} file; PNG, JPEG, WebP, BMP or GIF are read")
                image.load()  # a truncated or corrupt file fails here, not in the middle of a run
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as error:
            raise ValueError(f"is not a readable image ({type(error).__name__}: {error})") from None
        return cls(data, _FORMATS[kind], hashlib.sha256(data).hexdigest(), width, height)

    @classmethod
    def from_pil(cls, image: Image.Image) -> InputImage:
        """A PIL image, kept as the PNG it encodes to.

        Raises:
            ValueError: more pixels than the limit.
        """
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ValueError(f"has {image.width}x{image.height} pixels; at most {MAX_INPUT_PIXELS} are taken")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()  # just encoded from pixels: no need to decode it again to check it
        return cls(data, _FORMATS["PNG"], hashlib.sha256(data).hexdigest(), image.width, image.height)

    @classmethod
    def from_text(cls, text: str) -> InputImage:
        """Base64 text as HTTP clients send it: with or without a `data:image/...;base64,` prefix.

        Raises:
            ValueError: the text is not base64, or what it encodes is not an image.
        """
        body = _DATA_URL.sub("", text.strip(), count=1)
        if len(body) > MAX_INPUT_BYTES * 4 // 3 + 4:
            raise ValueError(f"is {len(body)} characters of base64; at most {MAX_INPUT_BYTES} bytes are read")
        if any(space in body for space in " \n\r\t"):  # some clients wrap base64 lines; most send one line
            body = "".join(body.split())
        try:  # in pieces: one call over 40 MB would hold the GIL, and so the server's event loop, for 70 ms
            data = b"".join(base64.b64decode(body[start : start + _BASE64_PIECE], validate=True)
                            for start in range(0, len(body), _BASE64_PIECE))  # fmt: skip
        except (binascii.Error, ValueError):
            raise ValueError("is not base64 image data (a data: URL or plain base64 of a PNG, JPEG or WebP)") from None
        return cls.from_bytes(data)

    @classmethod
    def from_path(cls, path: str | Path) -> InputImage:
        """An image file on this machine (library and command line only).

        Raises:
            ValueError: no such file, or not a readable image.
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"no image file at {str(file)!r}")
        if file.stat().st_size > MAX_INPUT_BYTES:
            raise ValueError(f"{str(file)!r} is over {MAX_INPUT_BYTES} bytes")
        return cls.from_bytes(file.read_bytes())

    @classmethod
    def reference(cls, summary: dict[str, Any]) -> InputImage:
        """A recorded image (`summary()`): its hash and size, without the pixels.

        Raises:
            ValueError: the record is not a summary.
        """
        sha256 = str(summary.get("sha256", "")).lower()
        if not _SHA256.match(sha256):
            raise ValueError("a recorded image needs its sha256 (hex)")
        try:
            width, height = int(summary["width"]), int(summary["height"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("a recorded image needs its width and height") from None
        return cls(None, "", sha256, width, height)

    # ---- use ----------------------------------------------------------------------------------------------
    @property
    def is_reference(self) -> bool:
        """Whether this is only a recorded hash: the image must be given again to run."""
        return self.data is None

    @property
    def short_hash(self) -> str:
        return self.sha256[:HASH_LENGTH]

    def matches(self, other: InputImage) -> bool:
        """Whether `other` is the image this one records (same file bytes)."""
        return other.sha256.startswith(self.sha256) or self.sha256.startswith(other.sha256)

    def open(self) -> Image.Image:
        """The decoded image (loaded, a fresh copy each call).

        Raises:
            InvalidRequest: this is a reference without the image.
        """
        if self.data is None:
            raise InvalidRequest("init_image", f"only the hash {self.short_hash} was recorded; give the image again")
        with Image.open(io.BytesIO(self.data)) as image:
            image.load()
            return image.copy()

    def data_url(self) -> str:
        """The image as a `data:` URL (what queues and JSON carry)."""
        if self.data is None:
            raise ValueError("a recorded image reference has no data")
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def summary(self) -> dict[str, Any]:
        """What results and PNG metadata record: the hash and the size."""
        return {"sha256": self.sha256, "width": self.width, "height": self.height}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InputImage) and (self.sha256, self.data) == (other.sha256, other.data)

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        kind = "reference" if self.data is None else self.mime
        return f"InputImage({self.width}x{self.height}, {kind}, sha256={self.short_hash})"


def parse_input_image(value: Any) -> InputImage:
    """What the request model accepts for an image field (library and queue payloads).

    An `InputImage`, a PIL image, encoded bytes, a `pathlib.Path` (library), base64 text with or without a
    `data:` prefix (JSON, queue payloads), or a recorded summary `{sha256, width, height}`.

    Raises:
        ValueError: naming what was wrong with it.
    """
    if isinstance(value, InputImage):
        return value
    if isinstance(value, Image.Image):
        return InputImage.from_pil(value)
    if isinstance(value, bytes | bytearray):
        return InputImage.from_bytes(bytes(value))
    if isinstance(value, Path):
        return InputImage.from_path(value)
    if isinstance(value, dict):
        return InputImage.reference(value)
    if isinstance(value, str):
        try:
            return InputImage.from_text(value)
        except ValueError as error:
            looks_like_a_file = "." in value[-6:] and len(value) < 1024
            hint = "; to read a file, pass a pathlib.Path" if looks_like_a_file else ""
            raise ValueError(f"{error}{hint}") from None
    raise ValueError(f"must be an image (PIL image, pathlib.Path, bytes or base64 text), not {type(value).__name__}")


def http_input_image(value: Any) -> Any:
    """An image field as an HTTP client sent it: text is base64 image data; a recorded summary passes as a
    reference (refused later, when the request is checked to run).

    Raises:
        ValueError: text that is not base64 image data, or another type.
    """
    if isinstance(value, str):
        return InputImage.from_text(value)
    if isinstance(value, dict) or value is None:
        return value
    raise ValueError(f"must be base64 image data, not {type(value).__name__}")


# The request model's image fields: what they accept (`parse_input_image`) and how they serialise.
def _image_or_none(value: Any) -> InputImage | None:
    return None if value is None else parse_input_image(value)


def _image_json(value: InputImage | None, info: SerializationInfo) -> Any:
    """Queues carry the image itself (a data: URL); records (`context={"images": "summary"}`) its hash and size."""
    if value is None:
        return None
    if value.is_reference or (info.context or {}).get("images") == "summary":
        return value.summary()
    return value.data_url() if info.mode == "json" else value


ImageField = Annotated[
    InputImage | None,
    BeforeValidator(_image_or_none),
    PlainSerializer(_image_json),
    WithJsonSchema({"type": "string", "description": "an image: a data: URL (base64 PNG, JPEG or WebP)"}),
]
