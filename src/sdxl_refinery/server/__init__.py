"""The HTTP faces: native, OpenAI- and A1111-compatible APIs, and the web page."""

from .app import create_app

__all__ = ["create_app"]
