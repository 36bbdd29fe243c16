"""The errors Refinery raises, shared by every floor.

Each error says what went wrong in words a user can act on; faces map them to
exit codes and HTTP statuses without parsing messages.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator


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


class StoreUnavailable(RefineryError):
    """The job store cannot be read or written now: a full disk, a read-only or damaged database, a lost
    connection. The server answers 503 (507 for a full disk) and its worker retries until it works again.

    Attributes:
        disk_full: the cause is a full disk.
    """

    def __init__(self, message: str, disk_full: bool = False) -> None:
        self.disk_full = disk_full
        super().__init__(message)


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what caused it, and so on down the chain (`raise ... from`, or raised while handling)."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def is_read_only(error: BaseException) -> bool:
    """Whether `error`, or anything that caused it, is a read-only file system or database."""
    return any((isinstance(seen, OSError) and seen.errno == errno.EROFS) or "readonly database" in str(seen)
               for seen in causes(error))  # fmt: skip


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or anything that caused it, is a full disk (ENOSPC, EDQUOT, SQLite's "disk is full")."""
    return any(
        (isinstance(seen, StoreUnavailable) and seen.disk_full)
        or (isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT))
        or "disk is full" in str(seen)
        or "No space left" in str(seen)
        for seen in causes(error)
    )
