"""The bench tests use the server tests' real uvicorn fixtures."""

from ..server.conftest import fake, real_server_factory, server_factory  # noqa: F401 - makes the fixtures visible here
