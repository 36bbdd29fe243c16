"""Settings: one object, built by a face (CLI, server, worker) and passed down.

Nothing here reads the environment at import time; `Settings()` reads
`REFINERY_*` variables when a face constructs it, and explicit keyword
arguments (flags) win over the environment.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .options import Precision, SpeedOptions, Toggle, validate_device, validate_precision

MAX_INPUT_BYTES = 32 * 1024 * 1024  # one input image file (a 4096x4096 photo's PNG is well under it)
# The default body cap admits what a request may carry: an init image and a mask at that size, as base64, and
# the rest of the request (A1111's img2img, the native inpainting job).
DEFAULT_MAX_BODY_BYTES = 2 * (MAX_INPUT_BYTES * 4 // 3 + 4) + 1024 * 1024

# Validated by the same functions as the library's arguments, so every face words the rule the same way.
Device = Annotated[str, AfterValidator(validate_device)]
PrecisionPolicy = Annotated[Precision, BeforeValidator(validate_precision)]

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every knob of Refinery, read from `REFINERY_*` environment variables.

    Raises:
        pydantic.ValidationError: a value breaks its rule, e.g. serving on a
            non-loopback address without an API key (set `allow_open=true` to insist).
    """

    model_config = SettingsConfigDict(env_prefix="REFINERY_", extra="ignore")

    # models and device
    base_model: str = DEFAULT_BASE_MODEL
    refiner_model: str = DEFAULT_REFINER_MODEL
    device: Device = "auto"
    precision: PrecisionPolicy = Precision.AUTO
    # speed (docs/performance.md): auto follows the measured policy for the device
    compile: Toggle = Toggle.AUTO
    channels_last: Toggle = Toggle.AUTO
    fused_qkv: Toggle = Toggle.AUTO
    threads: int = Field(0, ge=0)  # 0: one per CPU this process may use

    # the HTTP service
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("refinery-data")
    lora_dir: Path | None = None  # LoRA .safetensors files; default <data_dir>/loras
    models_dir: Path | None = None  # checkpoints chosen per request by name; default <data_dir>/models
    upscaler_dir: Path | None = None  # upscaler models (ESRGAN and kin); default <data_dir>/upscalers
    embeddings_dir: Path | None = None  # SDXL textual-inversion embeddings; default <data_dir>/embeddings
    controlnet_dir: Path | None = None  # SDXL ControlNets (folders, single files); default <data_dir>/controlnet
    ip_adapter_dir: Path | None = None  # SDXL IP-Adapters with their image encoders; default <data_dir>/ip-adapter
    annotator_dir: Path | None = None  # depth models of the depth preprocessors; default <data_dir>/annotators
    max_loaded_pairs: int = Field(1, ge=1, le=8)  # base + refiner pairs kept loaded; the oldest goes first
    api_key: str | None = None  # the single key of a private server: sees everything (an admin key)
    api_keys_file: Path | None = None  # named keys of a shared server, each seeing its own jobs (server/keys.py)
    allow_open: bool = False
    cors_origins: list[str] = Field(default_factory=list)  # other sites allowed to call (and to POST)
    allowed_hosts: list[str] = Field(default_factory=list)  # Host names served; default: see served_hosts()
    load_on_start: bool = True
    preview_every: int = Field(5, ge=0, le=100)
    # How long OpenAI and A1111 calls wait for their job: unset, until it is done (as A1111 does); when set, a
    # call that outlives it gets an error naming the job to poll, never an answer without images.
    sync_wait_seconds: float | None = Field(None, gt=0)
    url_ttl_seconds: int = Field(3600, ge=60)  # signed image URLs (OpenAI response_format=url) open this long

    # limits
    max_queue: int = Field(100, ge=1)
    # At SIGTERM the running job stops within one step; a step longer than this (a CPU step at 1024 can take
    # 45 s) puts the job back in the queue at once, so that a supervisor's later SIGKILL loses nothing.
    shutdown_grace_seconds: float = Field(30.0, gt=0)
    crash_limit: int = Field(3, ge=1, description="A job left running by this many dead processes is failed, not "
                             "run again (it may be what kills them).")  # fmt: skip
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    # A connection that has not sent its whole request head, or its whole body, this long after it began
    # is closed (408 for a body): silent or trickling clients cannot hold connections open.
    client_timeout_seconds: float = Field(30.0, gt=0)
    max_width: int = Field(2048, ge=256, le=4096)
    max_height: int = Field(2048, ge=256, le=4096)
    max_steps: int = Field(150, ge=1, le=500)
    max_images: int = Field(8, ge=1, le=16)
    max_prompt_tokens: int = Field(1000, ge=75)  # CLIP tokens per prompt; each 75 costs an encoder pass

    # batching (docs/api.md, "Batching"): unset, the device's measured default (CUDA batches, CPU does not)
    max_batch: int | None = Field(None, ge=1, le=16)  # images one pass may hold; compatible jobs join whole
    batch_window_ms: int | None = Field(None, ge=0, le=10_000)  # how long a job waits at most for partners

    @property
    def batch_window_seconds(self) -> float | None:
        return None if self.batch_window_ms is None else self.batch_window_ms / 1000

    # scale-out
    backend: Literal["embedded", "celery"] = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The broker's redelivery of a dead worker's message: the last backstop only (seconds; must exceed the
    # longest job). Jobs of dead workers are taken back sooner, by their silence (worker_dead_after_seconds).
    visibility_timeout: int = Field(7200, ge=5)
    # A worker whose heartbeat (every 5 s, from a thread of its own, so a long step does not delay it) is this
    # many seconds old is taken for dead: its running job is queued again within one more heartbeat.
    worker_dead_after_seconds: float = Field(15.0, ge=10.0)

    def served_hosts(self) -> list[str]:
        """The Host header values this server answers (others are refused, against DNS rebinding).

        `allowed_hosts` when set; else the name it is bound to plus localhost's forms; any host when bound
        to every interface (the API key, required there, protects it).
        """
        if self.allowed_hosts:
            return self.allowed_hosts
        if self.host in ("0.0.0.0", "::", ""):
            return ["*"]
        return list(dict.fromkeys([self.host, "localhost", "127.0.0.1", "::1"]))

    def loras_folder(self) -> Path:
        """Where LoRAs are read from: `lora_dir`, else `<data_dir>/loras`."""
        return self.lora_dir if self.lora_dir is not None else self.data_dir / "loras"

    def models_folder(self) -> Path:
        """Where checkpoints are found by name: `models_dir`, else `<data_dir>/models`."""
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    def upscalers_folder(self) -> Path:
        """Where upscaler models are found by name: `upscaler_dir`, else `<data_dir>/upscalers`."""
        return self.upscaler_dir if self.upscaler_dir is not None else self.data_dir / "upscalers"

    def embeddings_folder(self) -> Path:
        """Where embeddings are found by name: `embeddings_dir`, else `<data_dir>/embeddings`."""
        return self.embeddings_dir if self.embeddings_dir is not None else self.data_dir / "embeddings"

    def controlnets_folder(self) -> Path:
        """Where ControlNets are found by name: `controlnet_dir`, else `<data_dir>/controlnet`."""
        return self.controlnet_dir if self.controlnet_dir is not None else self.data_dir / "controlnet"

    def ip_adapters_folder(self) -> Path:
        """Where IP-Adapters are found by name: `ip_adapter_dir`, else `<data_dir>/ip-adapter`."""
        return self.ip_adapter_dir if self.ip_adapter_dir is not None else self.data_dir / "ip-adapter"

    def annotators_folder(self) -> Path:
        """Where depth preprocessors find their models (`<folder>/<module>`): `annotator_dir`, else
        `<data_dir>/annotators`."""
        return self.annotator_dir if self.annotator_dir is not None else self.data_dir / "annotators"

    def speed(self) -> SpeedOptions:
        """The speed options these settings ask for."""
        return SpeedOptions(self.compile, self.channels_last, self.fused_qkv, self.threads)

    @model_validator(mode="after")
    def _refuse_open_server_without_key(self) -> Settings:
        if not _is_loopback(self.host) and not self.api_key and not self.api_keys_file and not self.allow_open:
            raise ValueError(
                f"host {self.host} is reachable from other machines but no api_key is set: set REFINERY_API_KEY "
                "(or REFINERY_API_KEYS_FILE), or REFINERY_ALLOW_OPEN=true to serve without one"
            )
        return self
