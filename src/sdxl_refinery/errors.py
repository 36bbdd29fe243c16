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


class StoreUnavailable(RefineryError):
    """The job store cannot be read or written now: a full disk, a read-only or damaged database, a lost
    connection. The server answers 503 (507 for a full disk) and its worker retries until it works again.

    Attributes:
        disk_full: the cause is a full disk.
    """

    def __init__(self, message: str, disk_full: bool = False) -> None:
        self.disk_full = disk_full
        super().__init__(message)


def is_read_only(error: BaseException) -> bool:
    """Whether `error`, or anything that caused it, is a read-only file system or database."""
    import errno

    seen: BaseException | None = error
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.EROFS) or "readonly database" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or anything that caused it, is a full disk (ENOSPC, EDQUOT, SQLite's "disk is full")."""
    import errno

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, StoreUnavailable) and seen.disk_full:
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "disk is full" in str(seen) or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
