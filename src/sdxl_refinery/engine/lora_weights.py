"""LoRAs in the engine: loaded once into the base's UNet and text encoders, kept in a bounded cache of
adapters, applied per run, and taken out exactly afterwards.

- Loading: diffusers reads both layouts (Kohya/A1111 and diffusers/PEFT) into PEFT adapters; the UNet part
  goes through diffusers, the text-encoder parts through PEFT directly (transformers' own adapter loader
  asks for a newer PEFT than the package registries hold).
- A run: the chosen adapters get their weights (as diffusers' `set_adapters` gives them). The UNet's are
  fused: each touched layer's weight is replaced, for the run, by a new tensor W + sum(w * scale * B @ A),
  so a denoising step costs what it costs without LoRAs; the original tensors are kept and put back
  after, bit for bit (no subtraction, so no rounding residue). Where those copies would not fit in free
  memory, the UNet keeps the adapters as extra layers instead (same image, slower steps). The text
  encoders, run once per prompt, always keep them as extra layers.
- The refiner is untouched: its UNet is another architecture that SDXL LoRAs have no weights for, and its
  prompt is encoded with the LoRA layers of the shared `text_encoder_2` switched off, as A1111, InvokeAI
  and Fooocus give the refiner its own, unchanged encoder.
- Between runs every adapter is switched off: a request without LoRAs computes what it did before any
  LoRA was loaded.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from ..loras import LoraFile, made_for
from .memory import free_bytes
from .recovery import is_out_of_memory

log = logging.getLogger(__name__)
CACHE_SIZE = 8  # adapters kept loaded; the least recently used is dropped past this
_TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


class LoraMismatch(ValueError):
    """A LoRA's weights do not fit the loaded models' layers (another architecture, or a damaged file)."""


def _lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _load_text_encoder(state_dict: dict[str, torch.Tensor], alphas: dict[str, float] | None,
                       encoder: torch.nn.Module, prefix: str, adapter: str) -> None:  # fmt: skip
    """The `prefix.` part of a LoRA state dict into `encoder` as PEFT adapter `adapter` (what diffusers'
    text-encoder loader does, with PEFT's own injection instead of transformers')."""
    own = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if not own:
        return
    own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
    if not hasattr(encoder, "text_model"):
        own = {k.removeprefix("text_model."): v for k, v in own.items()}
    rank = {f"{name}.lora_B.weight": own[f"{name}.lora_B.weight"].shape[1] for name, _ in encoder.named_modules()
            if name.endswith(_TEXT_TARGETS) and f"{name}.lora_B.weight" in own}  # fmt: skip
    own_alphas = None
    if alphas is not None:
        own_alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    config = _create_lora_config(own, own_alphas, None, rank, is_unet=False)
    inject_adapter_in_model(config, encoder, adapter_name=adapter)
    result = set_peft_model_state_dict(encoder, own, adapter_name=adapter)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora" in key]
    if unexpected:
        raise ValueError(f"{len(unexpected)} weights of the {prefix} part match no layer, e.g. {unexpected[0]}")
    reference = next(encoder.parameters())
    encoder.to(device=reference.device, dtype=reference.dtype)  # the new LoRA layers where the encoder is


def _take_fused_projections_apart(unet: torch.nn.Module) -> None:
    """Undo the speed plan's fused QKV on `unet`: a LoRA changes q, k and v apart, and fused attention reads
    a concatenated copy that no LoRA layer touches. The copies are freed (diffusers' unfuse keeps them)."""
    if getattr(unet, "original_attn_processors", None) is None:
        return
    unet.unfuse_qkv_projections()  # type: ignore[operator]
    for module in unet.modules():
        if isinstance(module, Attention) and module.fused_projections:
            for name in ("to_qkv", "to_kv"):
                if hasattr(module, name):
                    delattr(module, name)
            module.fused_projections = False
    unet.original_attn_processors = None  # type: ignore[assignment]  # diffusers: None means "not fused"
    log.warning("LoRAs in use: the base UNet's fused QKV projections are taken apart for good (q, k and v are "
                "changed one by one)")  # fmt: skip


def _fused_weight(layer: Any, adapters: list[str]) -> torch.Tensor:
    """W + sum(scale * B @ A) as a new tensor. For plain Linear LoRAs, one `addmm` per adapter writes the sum
    straight into the output (PEFT's delta, scale and add would be three passes over the weights: on the
    full UNet that measured 12.8 s for the deltas alone on 2 CPU cores); other kinds use PEFT's delta."""
    base = layer.get_base_layer()
    weight: torch.Tensor = base.weight.data
    plain = isinstance(base, torch.nn.Linear) and not layer.fan_in_fan_out
    if plain and not any(layer.use_dora.get(adapter, False) for adapter in adapters):
        fused = weight
        for adapter in adapters:
            down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            fused = torch.addmm(fused, up.to(weight.dtype), down.to(weight.dtype), alpha=layer.scaling[adapter])
        return fused
    deltas = [layer.get_delta_weight(adapter) for adapter in adapters]
    return weight + torch.stack(deltas).sum(0).to(weight.dtype)


class LoraWeights:
    """The LoRA adapters of one loaded base pipeline."""

    def __init__(self, base: StableDiffusionXLPipeline, capacity: int = CACHE_SIZE) -> None:
        self.base = base
        self.capacity = capacity
        self._loaded: OrderedDict[str, LoraFile] = OrderedDict()

    @property
    def models(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        return self.base.unet, self.base.text_encoder, self.base.text_encoder_2

    def loaded(self) -> list[str]:
        """Adapter names in the cache, least recently used first."""
        return list(self._loaded)

    def load(self, lora: LoraFile) -> str:
        """Load `lora` (once; later calls only mark it as recently used); returns its adapter name.

        Raises:
            LoraMismatch: the file's weights do not fit this pipeline's layers (nothing of it stays loaded).
        """
        adapter = f"lora_{lora.short_hash}"
        if adapter in self._loaded:
            self._loaded.move_to_end(adapter)
            return adapter
        width = self.base.unet.config.cross_attention_dim
        if lora.context_width is not None and lora.context_width != width:
            raise LoraMismatch(f"{lora.name}: made for {made_for(lora.context_width)}, not for this SDXL base model")
        while len(self._loaded) >= self.capacity:
            self._drop(next(iter(self._loaded)))
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(lora.path))
        _take_fused_projections_apart(self.base.unet)
        try:
            if any(key.startswith("unet.") for key in state_dict):
                StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=self.base.unet,
                                                              adapter_name=adapter)  # fmt: skip
            _load_text_encoder(state_dict, alphas, self.base.text_encoder, "text_encoder", adapter)
            _load_text_encoder(state_dict, alphas, self.base.text_encoder_2, "text_encoder_2", adapter)
        except BaseException as error:
            self._remove_adapter(adapter)  # nothing half-loaded stays, whatever stopped the load
            # Names or shapes that fit no layer: diffusers and PEFT raise these kinds; anything else (out of
            # memory, an interrupt) is not the file's fault and goes up as it is.
            if isinstance(error, (ValueError, KeyError, RuntimeError)) and not is_out_of_memory(error):
                raise LoraMismatch(f"{lora.name}: its weights do not fit this model's layers ({error})") from error
            raise
        self._loaded[adapter] = lora
        self._switch_off()
        log.info("Loaded LoRA %s (%s) as %s", lora.name, ", ".join(lora.parts), adapter)
        return adapter

    def _drop(self, adapter: str) -> None:
        self._remove_adapter(adapter)
        del self._loaded[adapter]
        log.info("Dropped LoRA adapter %s from the cache", adapter)

    def _remove_adapter(self, adapter: str) -> None:
        for model in self.models:
            for layer in _lora_layers(model):
                if adapter in layer.lora_A:
                    layer.delete_adapter(adapter)
            configs = getattr(model, "peft_config", None)  # diffusers and PEFT refuse a name still listed here
            if isinstance(configs, dict):
                configs.pop(adapter, None)

    def _switch_off(self) -> None:
        for model in self.models:
            for layer in _lora_layers(model):
                layer.enable_adapters(False)

    @contextlib.contextmanager
    def applied(self, loras: list[tuple[LoraFile, float]]) -> Iterator[None]:
        """Apply `loras` (file, weight) for the duration of a run: fused into the UNet, active in the text
        encoders; everything exactly as before afterwards, also on errors."""
        if not loras:
            yield
            return
        weights: dict[str, float] = {}
        for lora, weight in loras:  # the same file twice adds its weights, as two A1111 tags do
            adapter = self.load(lora)
            weights[adapter] = weights.get(adapter, 0.0) + weight
        originals: dict[torch.nn.Parameter, torch.Tensor] = {}
        try:
            for model in self.models:
                self._activate(model, weights)
            if self._fused_copies_fit(weights):
                self._fuse(self.base.unet, weights, originals)
            yield
        finally:
            for parameter, original in originals.items():
                parameter.data = original
            self._switch_off()

    def _fused_copies_fit(self, weights: dict[str, float]) -> bool:
        """Whether the fused copies of the touched UNet weights fit in free memory (with a quarter to spare).
        If not, the LoRA runs as PEFT's extra layers: the same image (diffusers' own way), slower steps."""
        touched: list[Any] = [layer.get_base_layer().weight for layer in _lora_layers(self.base.unet)
                              if any(adapter in layer.lora_A for adapter in weights)]  # fmt: skip
        if any(weight.is_meta for weight in touched):  # offloaded by a memory plan: moved in only while in use
            log.info("LoRA weights not fused: the UNet's weights are offloaded; running the LoRA as extra layers")
            return False
        need = sum(int(weight.numel()) * int(weight.element_size()) for weight in touched)
        device = str(touched[0].device) if touched else "cpu"
        free = free_bytes(device)
        if need <= 0.75 * free:
            return True
        log.warning("LoRA weights not fused: the fused copies need %.1f GiB, %.1f GiB is free; running the LoRA "
                    "as extra layers (same image, slower steps)", need / 2**30, free / 2**30)  # fmt: skip
        return False

    @staticmethod
    def _activate(model: torch.nn.Module, weights: dict[str, float]) -> None:
        """What diffusers' `set_adapters(names, adapter_weights)` does, on every LoRA layer of `model`."""
        for layer in _lora_layers(model):
            present = [adapter for adapter in weights if adapter in layer.lora_A]
            layer.enable_adapters(bool(present))
            if present:
                layer.set_adapter(present)
                for adapter in present:
                    layer.set_scale(adapter, weights[adapter])

    @staticmethod
    @torch.no_grad()
    def _fuse(unet: torch.nn.Module, weights: dict[str, float], originals: dict[Any, torch.Tensor]) -> None:
        for layer in _lora_layers(unet):
            present = [adapter for adapter in weights if adapter in layer.lora_A]
            if not present:
                continue
            weight = layer.get_base_layer().weight
            assert isinstance(weight, torch.nn.Parameter)
            originals[weight] = weight.data
            weight.data = _fused_weight(layer, present)  # a new tensor: the original stays intact
            layer.enable_adapters(False)  # the fused weight carries it now

    @contextlib.contextmanager
    def refiner_view(self) -> Iterator[None]:
        """The shared `text_encoder_2` without LoRA layers, for the refiner's prompt."""
        layers = [layer for layer in _lora_layers(self.base.text_encoder_2) if not layer.disable_adapters]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
