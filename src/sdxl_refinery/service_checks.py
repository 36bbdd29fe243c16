"""The service's checks before any work: every name a request gives (models, LoRAs, ControlNets and their
preprocessors' models, IP-Adapters, upscalers), its clip skip, and images given only by a recorded hash, each
refused naming the field.

They read the service's folders and what its models are (`model_facts` until the engine is loaded, then the
engine's own figures), so the faces refuse a request at submission, not when a worker runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from . import model_facts
from .annotators import AnnotatorFolder
from .control import ControlUnit
from .controlnets import ControlNetFolder, ControlSource
from .engine.catalog import ModelFolder
from .errors import InvalidRequest
from .ip_adapters import IpAdapterFolder
from .loras import LoraFile, LoraFolder
from .request import GenerationRequest, check_clip_skip
from .upscale_request import UpscaleRequest

if TYPE_CHECKING:
    from .upscale_door import UpscaleDoor


class RequestChecks:
    """The checks `ImageService` runs before any work (a base class: the service holds the folders)."""

    base_model: str
    refiner_model: str
    own_models: dict[str, str]
    models_folder: ModelFolder
    lora_folder: LoraFolder
    controlnet_folder: ControlNetFolder
    annotator_folder: AnnotatorFolder
    ip_adapter_folder: IpAdapterFolder
    upscaling: UpscaleDoor
    _engine: Any

    def resolve_models(self, request: GenerationRequest, allow_paths: bool) -> tuple[str | None, str | None]:
        """The references of the request's `base_model` and `refiner_model` (None: the service's own), before
        any work.

        Args:
            allow_paths: whether a model may be a path or Hub id (the library, the CLI) or only a name from the
                models folder (the server).

        Raises:
            InvalidRequest: naming the field: an unknown name, or a checkpoint of another role.
        """
        resolved: list[str | None] = []
        for field_name, own, roles in (("base_model", self.base_model, ("base", "inpainting")),
                                       ("refiner_model", self.refiner_model, ("refiner",))):  # fmt: skip
            wanted = getattr(request, field_name)
            entry = self.models_folder.find(wanted) if wanted is not None else None
            if wanted is None or (entry is None and self._names_own(wanted, own, field_name.split("_")[0])):
                resolved.append(None)
            elif entry is not None:
                if entry.role not in roles:
                    raise InvalidRequest(field_name, f"{entry.name} is a {entry.role} checkpoint, not a "
                                                     f"{' or '.join(roles)} one")  # fmt: skip
                resolved.append(str(entry.path))
            elif allow_paths:
                resolved.append(wanted)
            else:
                known = [item.name for item in self.models_folder.scan()[0] if item.role in roles]
                listed = f"known: {', '.join(known)}" if known else "the models folder holds none"
                raise InvalidRequest(field_name, f"no model {wanted!r} in the models folder; {listed} (GET /v1/models)")
        return resolved[0], resolved[1]

    def _names_own(self, wanted: str, own: str, role: str) -> bool:
        """Whether `wanted` names the service's own model of `role` (its reference, name or A1111 title)."""
        names = {own, own.split("/")[-1], self.own_models.get(role, own)}
        title, _, tail = wanted.partition(" [")
        if tail.endswith("]") and tail[:-1] == self.own_models.get(f"{role}_hash"):
            return True  # A1111's title `name [hash10]`: the hash says which model it is
        return (title if tail.endswith("]") else wanted) in names

    def control_map(self, unit: ControlUnit, width: int, height: int, field: str = "preprocessor") -> Image.Image:
        """The map a ControlNet unit's model would see at `width` x `height` (its image fitted, preprocessed;
        a depth or pose preprocessor runs on the CPU, leaving the engine's device to runs).

        Raises:
            InvalidRequest: naming `field`: a depth or pose preprocessor whose annotator folder is missing.
        """
        from .engine.control import control_map

        return control_map(unit, width, height, self.annotator_folder.check(unit.preprocessor, field))

    def check_upscalers(self, request: GenerationRequest | UpscaleRequest) -> None:
        """Raises: InvalidRequest: an upscaler that is not a resampler or a usable model (`UpscaleDoor.check`)."""
        self.upscaling.check(request)

    def check_controlnets(self, request: GenerationRequest) -> list[ControlSource]:
        """Each ControlNet unit's model and preprocessor weights, checked before any work (names from the
        folders only).

        Raises:
            InvalidRequest: field `controlnets.N.model`: unknown, or not a ControlNet for this base, and why;
                `controlnets.N.preprocessor`: a depth or pose preprocessor whose annotator folder is missing.
        """
        return [ControlSource(self.controlnet_folder.check(unit.model, f"controlnets.{index}.model",
                                                           self._context_width()),
                              self.annotator_folder.check(unit.preprocessor, f"controlnets.{index}.preprocessor"))
                for index, unit in enumerate(request.controlnets)]  # fmt: skip

    def check_image_prompts(self, request: GenerationRequest) -> list[Path]:
        """The IP-Adapter file of each image prompt, checked before any work (names from the folder only).

        Raises:
            InvalidRequest: field `image_prompts.N.model`: unknown, unusable and why, or another image encoder.
        """
        names = [prompt.model for prompt in request.image_prompts]
        return self.ip_adapter_folder.check(names, self._context_width()) if names else []

    def check_loras(self, request: GenerationRequest, allow_paths: bool) -> list[tuple[LoraFile, float]]:
        """The request's LoRAs (field and prompt tags), each resolved and checked, before any work.

        Args:
            allow_paths: whether a LoRA may be named by a file path (the library and CLI) or only by a name
                from the LoRA folder (the server).

        Raises:
            InvalidRequest: field `loras`, naming the LoRA and the reason.
        """
        wanted = request.all_loras
        if not wanted:
            return []
        files = self.lora_folder.check(wanted, allow_paths, self._context_width())
        return [(file, lora.weight) for file, lora in zip(files, wanted, strict=True)]

    def check_clip_skip(self, request: GenerationRequest) -> None:
        """Refuse at submission a `clip_skip` the server's models cannot take (the engine would at run time).

        Raises:
            InvalidRequest: field `clip_skip`, deeper than the text encoders.
        """
        check_clip_skip(request.clip_skip, self._encoder_layers())

    def _encoder_layers(self) -> int:
        """Layers of the shallowest text encoder: the loaded engine's, else what the references say."""
        loaded: int | None = getattr(self._engine, "encoder_layers", None)
        return loaded if loaded is not None else model_facts.encoder_layers(self.base_model, self.refiner_model)

    def base_context_width(self) -> int:
        """The base's cross-attention width (2048 for SDXL): what LoRAs and ControlNets must be made for."""
        return self._context_width()

    def _context_width(self) -> int:
        """The base's cross-attention width, which a LoRA must be made for: the loaded engine's, else the
        reference's."""
        loaded: int | None = getattr(self._engine, "context_width", None)
        return loaded if loaded is not None else model_facts.context_width(self.base_model)


def check_images(request: GenerationRequest | UpscaleRequest) -> None:
    """Raises: InvalidRequest: an image field holds only a recorded hash; the image itself must be given."""
    for name in request.missing_images:
        image = request.image_at(name)
        assert image is not None
        raise InvalidRequest(name, f"only its hash ({image.short_hash}, {image.width}x{image.height}) was recorded; "
                                   f"give the image itself")  # fmt: skip
