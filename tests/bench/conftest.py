"""The bench tests use the server tests' real uvicorn fixture."""

from ..server.conftest import server_factory  # noqa: F401 - makes the fixture visible here
