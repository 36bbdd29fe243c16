"""Settings: one object, built by a face (CLI, server, worker) and passed down.

Nothing here reads the environment at import time; `Settings()` reads
`REFINERY_*` variables when a face constructs it, and explicit keyword
arguments (flags) win over the environment.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"


class Settings(BaseSettings):
    """Every knob of Refinery, read from `REFINERY_*` environment variables.

    Attributes:
        base_model: Hub id, local diffusers folder, or `tiny`.
        refiner_model: Hub id, local diffusers folder, or `tiny`.
        device: `auto`, `cuda`, `cuda:N`, `mps` or `cpu`.
        precision: `auto`, `full`, `half` or `bf16`.
    """

    model_config = SettingsConfigDict(env_prefix="REFINERY_", extra="ignore")

    base_model: str = DEFAULT_BASE_MODEL
    refiner_model: str = DEFAULT_REFINER_MODEL
    device: str = "auto"
    precision: str = "auto"
