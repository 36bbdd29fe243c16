"""What every command shares: the error console and exit codes, logging, sizes typed as WxH, progress bars."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import InvalidRequest
from .request import CancelToken
from .request import Progress as StepProgress

T = TypeVar("T")

console = Console(stderr=True)
EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 1, 2, 130


def fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not match:
        raise InvalidRequest("size", f"must be WIDTHxHEIGHT, e.g. 1024x1024, not {size!r}")
    return int(match.group(1)), int(match.group(2))


def configure_logging(verbose: bool) -> None:
    """Our stage lines with -v; the libraries' load-time chatter only when it is an error."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", force=True)
    for noisy in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
        # transformers and diffusers reset their loggers' levels when first imported, from these variables.
        os.environ.setdefault(f"{noisy.upper()}_VERBOSITY", "error")


class ProgressBar:
    """A rich progress bar fed from the engine thread: stage, step, it/s, ETA."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[elapsed]}"),  # the stage's own time, from its start (not the bar's first draw)
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._tasks: dict[int, Any] = {}
        self._stage_start: dict[int, float] = {}
        self._last_report: float | None = None

    def __call__(self, progress: StepProgress) -> None:
        now = time.perf_counter()
        if progress.stage not in self._tasks:
            label = {1: "Stage 1/2 base", 2: "Stage 2/2 refiner", 3: "Upscale (tiles)"}.get(progress.stage, "Working")
            self._tasks[progress.stage] = self.bar.add_task(label, total=progress.total, rate="", elapsed="")
            # A stage starts where the previous one ended; the first where the run started.
            self._stage_start[progress.stage] = self._last_report or now - progress.elapsed
        self._last_report = now
        elapsed = now - self._stage_start[progress.stage]
        rate = f"{progress.step / elapsed:.2f} it/s" if elapsed > 0 else ""
        self.bar.update(self._tasks[progress.stage], completed=progress.step, rate=rate,
                        elapsed=clock(elapsed))  # fmt: skip


def clock(seconds: float) -> str:
    """H:MM:SS, with tenths under a minute so a one-step stage does not read 0:00:00."""
    if seconds < 60:
        return f"0:00:{seconds:04.1f}"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


async def with_progress_and_interrupt(work: Callable[[ProgressBar, CancelToken], Awaitable[T]]) -> T:
    """`work(bar, token)` with progress bars drawn and Ctrl-C cancelling the token (the run stops within one
    step or tile and raises `Cancelled`)."""
    token = CancelToken()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, token.cancel)
    bar = ProgressBar()
    try:
        with bar.bar:
            return await work(bar, token)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
