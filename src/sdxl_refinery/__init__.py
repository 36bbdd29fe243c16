"""Refinery: quality-first SDXL base + refiner image generation."""

from .errors import Cancelled, GenerationFailed, InvalidRequest, ModelLoadError, RefineryError, StorageError
from .request import CancelToken, GenerationRequest, GenerationResult, Mode, Precision, Progress
from .service import ImageService

__all__ = [
    "CancelToken",
    "Cancelled",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "ImageService",
    "InvalidRequest",
    "Mode",
    "ModelLoadError",
    "Precision",
    "Progress",
    "RefineryError",
    "StorageError",
]
__version__ = "0.1.0"
