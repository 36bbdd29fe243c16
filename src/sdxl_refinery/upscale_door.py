"""The service's upscaling: the upscaler folder on its device, the checks made before any work, and upscale
jobs run on the service's engine thread (one run at a time per device, as generations)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .batching import BatchCall, Enlarge
from .errors import RefineryError
from .png import check_writable_folder
from .request import GenerationRequest
from .upscale_request import UpscaleRequest
from .upscale_run import UpscaleResult, run_upscale

if TYPE_CHECKING:
    from .engine.upscaling import Upscalers


class UpscaleDoor:
    """Upscaler models for one service.

    Args:
        folder: the upscaler folder (`REFINERY_UPSCALER_DIR`), or None for resamplers only.
        device: the service's device (`auto`, `cpu`, `cuda:N`...).
        executor: the service's engine thread, shared with its generations.
    """

    def __init__(self, folder: Path | None, device: str, executor: ThreadPoolExecutor) -> None:
        self.folder, self.device, self._executor = folder, device, executor
        self._upscalers: Upscalers | None = None

    @property
    def upscalers(self) -> Upscalers:
        """The upscaler folder on the service's device (torch loads on first use)."""
        if self._upscalers is None:
            from .engine.upscaling import Upscalers

            self._upscalers = Upscalers(self.folder, self.device)
        return self._upscalers

    def check(self, request: GenerationRequest | UpscaleRequest) -> None:
        """Refuse, before any work, an upscaler that is not a resampler or a usable model of the folder.

        Raises:
            InvalidRequest: field `upscaler`, `upscaler_2` or `hr_upscaler`, naming the upscaler and why.
        """
        if isinstance(request, UpscaleRequest):
            for field, name in zip(("upscaler", "upscaler_2"), request.upscaler_names, strict=False):
                self.upscalers.check(name, field)
        elif request.enable_hr and request.hires_upscaler is None:
            self.upscalers.check(request.hr_upscaler, "hr_upscaler")

    def hires_enlarge(self, request: GenerationRequest) -> Enlarge | None:
        """Hires fix's enlargement by an upscaler model, when the request names one."""
        if not request.enable_hr or request.hires_upscaler is not None:
            return None
        upscalers, name = self.upscalers, request.hr_upscaler
        return lambda image, target: upscalers.enlarge(image, name, target)

    async def run(self, call: BatchCall) -> UpscaleResult | RefineryError:
        """Run an upscale call on the engine thread: its result, or the error that stopped it (its images were
        checked by the caller)."""
        request = call.request
        assert isinstance(request, UpscaleRequest)
        try:
            if call.output_path is not None:
                check_writable_folder(Path(call.output_path))
            self.check(request)
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._executor, run_upscale, self.upscalers, request, call.output_path,
                                        call.on_progress, call.cancel)  # fmt: skip
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                call.cancel.cancel()  # the engine thread stops before its next tile
                raise
        except RefineryError as error:
            return error
