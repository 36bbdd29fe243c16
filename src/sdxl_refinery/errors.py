"""The errors Refinery raises, shared by every floor.

Each error says what went wrong in words a user can act on; faces map them to
exit codes and HTTP statuses without parsing messages.
"""

from __future__ import annotations


class RefineryError(Exception):
    """Base class of every error Refinery raises on purpose."""


class InvalidRequest(RefineryError, ValueError):
    """A request field broke a rule; raised before any model work.

    Attributes:
        field: the offending field's name, as the user wrote it.
        rule: the rule it broke, in words.
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class Cancelled(RefineryError):
    """The run was cancelled; raised within one denoising step of the request."""


class ModelLoadError(RefineryError):
    """A model reference could not be resolved or its files could not be loaded."""


class GenerationFailed(RefineryError):
    """The run failed for a reason other than bad input or cancellation."""


class StorageError(RefineryError):
    """An image or record could not be written; nothing partial was left behind."""
