"""Where finished images live. One implementation now: a folder every API server and worker shares.

Writers ask for a job's output path (the service writes its PNGs there
atomically); readers ask for a named image. An object store would implement the
same three methods (upload after the write, download or redirect on read).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_IMAGE_NAME = re.compile(r"^image(\.attempt\d{1,4})?(-\d{1,2})?\.png$")


class ImageStorage(ABC):
    """Images by job id and file name; names are chosen by the server, never by clients."""

    @abstractmethod
    def output_path(self, job_id: str, attempt: int = 1) -> Path:
        """The file a worker writes a job's images to (a batch gets `-1`, `-2`, ... beside it). Each attempt
        after the first writes its own names (`image.attempt2.png`), so that an attempt taken for dead that
        comes back cannot overwrite the images of the attempt that replaced it."""

    @abstractmethod
    def path(self, job_id: str, name: str) -> Path | None:
        """A stored image's local file, or None if the id or name is not one the server makes or it is absent."""

    def read(self, job_id: str, name: str) -> bytes:
        """A stored image's bytes.

        Raises:
            FileNotFoundError: no such image.
        """
        path = self.path(job_id, name)
        if path is None:
            raise FileNotFoundError(f"{job_id}/{name}")
        return path.read_bytes()


class FolderStorage(ImageStorage):
    """Images under `root/<job id>/`; a shared folder (NFS, SMB, a volume) for many machines."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def output_path(self, job_id: str, attempt: int = 1) -> Path:
        return self.root / job_id / ("image.png" if attempt <= 1 else f"image.attempt{attempt}.png")

    def path(self, job_id: str, name: str) -> Path | None:
        if not _JOB_ID.match(job_id) or not _IMAGE_NAME.match(name):
            return None
        root = self.root.resolve()
        path = (root / job_id / name).resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path
