"""Single-file SDXL checkpoints (SGM key layout, .safetensors), with no network at all.

diffusers' `from_single_file` needs a diffusers-format config folder; by
default it fetches one from the Hub. Refinery materialises that folder from
configs shipped in this package (SDXL base and refiner 1.0, the CLIP tokenizer
vocabulary), or from the configs `refinery export` embeds in a file's header,
so loading never touches the network.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..loras import checked_header_shape

CONFIG_METADATA_KEY = "refinery.config"
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
_KIND_MARKERS = {
    "sdxl-base": ("conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.label_emb.0.0.weight"),
    "sdxl-refiner": ("conditioner.embedders.0.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"),
}


# Keys by which fine-tunes mark a sampling variant (NoobAI-XL V-Pred and others carry empty `v_pred` and
# `ztsnr` tensors, which ComfyUI and Forge read).
V_PREDICTION_KEY, ZERO_SNR_KEY = "v_pred", "ztsnr"
_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
SIDECAR_SUFFIX = ".sampling.json"  # `model.safetensors` + `model.sampling.json`, for files that do not mark it
_PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class Sampling:
    """How a model's noise prediction is read: what the scheduler must be told.

    Attributes:
        prediction_type: `epsilon` (SDXL 1.0) or `v_prediction`.
        zero_terminal_snr: trained with zero terminal SNR: the schedule's betas are rescaled, timesteps
            trail from the very last one, and guidance is rescaled (0.7) unless the request says otherwise.
        source: where this was read: `default`, `keys` (the file's marks) or the sidecar's path.
    """

    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    source: str = "default"

    @property
    def is_default(self) -> bool:
        return self.prediction_type == "epsilon" and not self.zero_terminal_snr

    def describe(self) -> str:
        parts = ["v-prediction" if self.prediction_type == "v_prediction" else "epsilon"]
        return " + ".join(parts + (["zero terminal SNR"] if self.zero_terminal_snr else []))

    def scheduler_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` (a scheduler config) telling the scheduler this sampling."""
        if self.is_default:
            return config
        changed = {**config, "prediction_type": self.prediction_type}
        if self.zero_terminal_snr:
            changed |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        return changed


def read_sampling(path: Path, keys: set[str]) -> Sampling:
    """A file's sampling: its sidecar (`<name>.sampling.json`) when present, else its `v_pred`/`ztsnr` keys.

    Raises:
        ModelLoadError: a sidecar that is not JSON or names an unknown prediction type.
    """
    sidecar = path.with_name(path.name.removesuffix(path.suffix) + SIDECAR_SUFFIX)
    if sidecar.is_file():
        try:
            settings = json.loads(sidecar.read_text(encoding="utf-8"))
            prediction = str(settings.get("prediction_type", "epsilon"))
            zero_snr = settings.get("zero_terminal_snr", False)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{sidecar}: not a JSON object ({error})") from error
        if prediction not in _PREDICTIONS or not isinstance(zero_snr, bool):
            raise ModelLoadError(f"{sidecar}: prediction_type must be one of {', '.join(_PREDICTIONS)} and "
                                 f"zero_terminal_snr true or false")  # fmt: skip
        return Sampling(prediction, zero_snr, str(sidecar))
    if V_PREDICTION_KEY in keys or ZERO_SNR_KEY in keys:
        prediction = "v_prediction" if V_PREDICTION_KEY in keys else "epsilon"
        return Sampling(prediction, ZERO_SNR_KEY in keys, "keys")
    return Sampling()


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file holds, read from its header alone.

    Attributes:
        kind: `sdxl-base` or `sdxl-refiner`.
        config: component configs (the shipped SDXL ones or those embedded by export), the scheduler's
            telling it the file's sampling.
        tensors: number of tensors in the file.
        sampling: how its predictions are read (v-prediction, zero terminal SNR), from its keys or sidecar.
    """

    kind: str
    config: dict[str, Any]
    tensors: int
    sampling: Sampling = Sampling()

    @property
    def inpainting(self) -> bool:
        """Whether it is an SDXL inpainting checkpoint (a 9-channel UNet): it needs an init image and a mask."""
        return int(self.config["unet"].get("in_channels", 4)) == 9


def shipped_config(kind: str) -> dict[str, Any]:
    """The packaged diffusers configs of SDXL base or refiner 1.0."""
    text = resources.files(__package__).joinpath("configs", f"{kind}-1.0.json").read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it announces."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        raw_length = stream.read(8)
        if len(raw_length) < 8:
            raise ModelLoadError(f"{path}: truncated or empty file ({size} bytes), not a safetensors checkpoint")
        (length,) = struct.unpack("<Q", raw_length)
        if length > min(size - 8, 100_000_000):
            raise ModelLoadError(f"{path}: not a safetensors file (header length {length} does not fit the file)")
        try:
            header: dict[str, Any] = checked_header_shape(json.loads(stream.read(length)))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ModelLoadError(f"{path}: not a safetensors file (unreadable header)") from error
        except ValueError as error:
            raise ModelLoadError(f"{path}: not a safetensors file ({error})") from error
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ModelLoadError(f"{path}: truncated: the header announces {8 + length + end} bytes, the file has {size}")
    return header


def _describe_foreign(keys: set[str]) -> str:
    """Name what a non-SDXL file most likely is, for the refusal message."""
    if any("lora_" in key or ".lora_down." in key or ".lora_A." in key for key in keys):
        return "a LoRA (low-rank adapter), not a full checkpoint"
    if any(key.startswith("cond_stage_model.") for key in keys):
        return "a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model text encoder), not SDXL"
    if keys and all(key.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv", "first_stage_model."))
                    for key in keys):  # fmt: skip
        return "a VAE alone, not a full checkpoint"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return "a diffusion model without SDXL's text encoders"
    return f"an unknown model ({len(keys)} tensors, none of SDXL's)"


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Classify a single file as SDXL base or refiner from its header, or refuse it.

    Raises:
        ModelLoadError: missing file, pickle file, truncated or foreign file,
            each with a message saying what was found.
    """
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: refused: pickle checkpoints ({path.suffix}) can run arbitrary code when loaded, so Refinery "
            "loads .safetensors only; convert it once with a tool you trust, or download the .safetensors release"
        )
    header = read_header(path)
    metadata = header.pop("__metadata__", {}) or {}
    keys = set(header)
    sampling = read_sampling(path, keys)
    for kind, markers in _KIND_MARKERS.items():
        if all(marker in keys for marker in markers):
            embedded = metadata.get(CONFIG_METADATA_KEY)
            config = json.loads(embedded) if embedded else shipped_config(kind)
            # Sampled as epsilon-prediction, a v-prediction file gives a wrong image every time: its scheduler
            # is told how to read it.
            config = {**config, "scheduler": sampling.scheduler_config(config["scheduler"])}
            # SDXL inpainting files hold a 9-channel first convolution (latents, mask, masked image).
            channels = header.get(_UNET_INPUT, {}).get("shape", [0, 4])[1]
            if kind == "sdxl-base" and channels != config["unet"]["in_channels"]:
                config = {**config, "unet": {**config["unet"], "in_channels": channels}}
            return CheckpointInfo(kind, config, len(keys - {V_PREDICTION_KEY, ZERO_SNR_KEY}), sampling)
    raise ModelLoadError(f"{path}: not an SDXL base or refiner checkpoint: found {_describe_foreign(keys)}")


def materialize_config(config: dict[str, Any], folder: Path) -> Path:
    """Write `config` as a diffusers config folder (configs and tokenizer files, no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(config["model_index"]))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component in config:
            (folder / component).mkdir(exist_ok=True)
            (folder / component / "config.json").write_text(json.dumps(config[component]))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config["scheduler"]))
    shipped = resources.files(__package__).joinpath("configs", "clip_tokenizer")
    for name in ("tokenizer", "tokenizer_2"):
        if name not in config:
            continue
        target = folder / name
        target.mkdir(exist_ok=True)
        settings = dict(config[name])
        files = settings.pop("files", None)  # a non-standard vocabulary embedded by export (the tiny pair's)
        for filename in ("vocab.json", "merges.txt"):
            if files is not None:
                (target / filename).write_text(files[filename], encoding="utf-8")
            else:
                with resources.as_file(shipped.joinpath(filename)) as source:
                    shutil.copyfile(source, target / filename)
        (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", **settings}))
    return folder
