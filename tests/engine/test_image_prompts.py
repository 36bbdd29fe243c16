"""Image prompts on the tiny pair: a tiny SDXL IP-Adapter (with a tiny CLIP vision encoder) built at test time,
guiding the base as diffusers' `load_ip_adapter` does, and leaving nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.ip_adapters import IpAdapterFolder

from .hand_driven import PROMPT, HandDriven
from .test_edits import fresh_schedulers, generators, picture, pixels

SIZE = {"width": 64, "height": 64}
STEPS = {"num_inference_steps": 6, "refiner_steps": 3, "seed": 4}
CLIP_DIM = 32


def write_tiny_ip_adapter(base: Path, folder: Path, name: str, seed: int) -> Path:
    """`folder/name.safetensors` (image projection to 4 tokens, a key and value weight per cross-attention layer,
    numbered as h94's files are) and `folder/image_encoder` (a tiny CLIP vision model with projection)."""
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    width = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(4 * width, CLIP_DIM, generator=generator) * 0.5,
               "image_proj.proj.bias": torch.zeros(4 * width), "image_proj.norm.weight": torch.ones(width),
               "image_proj.norm.bias": torch.zeros(width)}  # fmt: skip
    key_id = 1
    for processor in unet.attn_processors:
        if processor.endswith("attn2.processor"):
            shape = unet.get_submodule(processor.removesuffix(".processor")).to_k.weight.shape
            for part in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{part}.weight"] = torch.randn(shape, generator=generator) * 0.5
            key_id += 2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    if not (folder / "image_encoder").is_dir():
        torch.manual_seed(seed)
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=CLIP_DIM, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
        CLIPVisionModelWithProjection(config).save_pretrained(folder / "image_encoder")
    return folder / f"{name}.safetensors"


def plus_projection(width: int, seed: int) -> dict[str, torch.Tensor]:
    """An IP-Adapter Plus image projection (a 4-layer resampler to 4 tokens, from the encoder's penultimate
    hidden states) with random weights, under the names h94's Plus files use (`layers.N.0.to_kv`...),
    renamed here from diffusers' module independently of diffusers' loader."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(seed)
    module = IPAdapterPlusImageProjection(embed_dims=32, output_dims=width, hidden_dims=32, heads=1, num_queries=4)
    original: dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict().items():
        for new, old in ((".ln0.", ".0.norm1."), (".ln1.", ".0.norm2."), (".attn.to_q.", ".0.to_q."),
                         (".attn.to_out.0.", ".0.to_out."), (".ff.0.", ".1.0."), (".ff.1.net.0.proj.", ".1.1."),
                         (".ff.1.net.2.", ".1.3.")):  # fmt: skip
            key = key.replace(new, old)
        if ".attn.to_v." in key:
            continue  # joined with to_k below
        if ".attn.to_k." in key:
            value = module.state_dict()[key.replace(".attn.to_k.", ".attn.to_v.")]
            key, tensor = key.replace(".attn.to_k.", ".0.to_kv."), torch.cat([tensor, value])
        original[f"image_proj.{key}"] = tensor.contiguous()
    return original


def write_tiny_ip_adapter_plus(base: Path, folder: Path, name: str, seed: int) -> Path:
    """`folder/name.safetensors`: a Plus image projection and the same per-layer weights as the plain adapter's
    (beside the plain adapter's tiny image encoder)."""
    plain = write_tiny_ip_adapter(base, folder, name, seed)
    from safetensors.torch import load_file

    tensors = {key: value for key, value in load_file(plain).items() if not key.startswith("image_proj.")}
    width = int(tensors["ip_adapter.1.to_k_ip.weight"].shape[1])
    save_file({**tensors, **plus_projection(width, seed)}, str(plain))
    return plain


@pytest.fixture(scope="module")
def folder(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ip-adapter")
    write_tiny_ip_adapter(tiny_pair[0], root, "tiny-ip", 1)
    write_tiny_ip_adapter(tiny_pair[0], root, "tiny-ip-b", 2)
    write_tiny_ip_adapter_plus(tiny_pair[0], root, "tiny-ip-plus", 3)
    (root / "sd15").mkdir()
    sd15 = {"image_proj.proj.weight": torch.zeros(3072, 1024), "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768)}
    save_file(sd15, str(root / "sd15" / "ip-adapter_sd15.safetensors"))
    faceid = {
        "image_proj.proj.0.weight": torch.zeros(4, 4),
        "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 80),
        "ip_adapter.1.to_k_lora.down.weight": torch.zeros(4, 8),
    }  # h94's FaceID keys (LoRA in the adapter)
    save_file(faceid, str(root / "ip-adapter-faceid_sdxl.safetensors"))
    return root


@pytest.fixture
def with_folder(service: ImageService, folder: Path, monkeypatch: pytest.MonkeyPatch) -> ImageService:
    monkeypatch.setattr(service, "ip_adapter_folder", IpAdapterFolder(folder))
    return service


def _hand(tiny_pair: tuple[Path, Path], folder: Path, names: list[str], weights: list[float],
          request: GenerationRequest, images: Any, init: Any = None) -> np.ndarray:  # fmt: skip
    """diffusers as its users drive it: load_ip_adapter, set_ip_adapter_scale, the base with ip_adapter_image,
    then the refiner (without), one seed."""
    hand = HandDriven(*tiny_pair)
    hand.base.load_ip_adapter([str(folder)] * len(names), subfolder=[""] * len(names),
                              weight_name=[f"{name}.safetensors" for name in names])  # fmt: skip
    hand.base.set_ip_adapter_scale(weights)
    base = hand.base if init is None else StableDiffusionXLImg2ImgPipeline.from_pipe(hand.base)
    fresh_schedulers(base, hand.refiner)
    common: dict[str, Any] = {"guidance_scale": request.guidance_scale, "generator": generators([request.seed or 0])}
    start = {"image": init, "strength": request.strength} if init is not None else SIZE
    latents = base(prompt=PROMPT, num_inference_steps=request.num_inference_steps, output_type="latent",
                   ip_adapter_image=images, **start, **common).images  # fmt: skip
    refined = hand.refiner(prompt=PROMPT, image=latents, strength=0.3, num_inference_steps=10, output_type="pil",
                           **common).images  # fmt: skip
    return pixels(refined)


def test_the_folder_lists_ip_adapters_and_says_why_others_are_not(folder: Path) -> None:
    entries = {entry.name: entry for entry in IpAdapterFolder(folder).entries(context_width=80)}
    assert entries["tiny-ip"].reason is None and entries["tiny-ip-b"].reason is None
    assert "made for SD 1.x" in str(entries["sd15/ip-adapter_sd15"].reason)
    assert "FaceID" in str(entries["ip-adapter-faceid_sdxl"].reason)
    assert not any("image_encoder" in name for name in entries)


async def test_an_image_prompt_equals_diffusers_ip_adapter_and_leaves_nothing(
    with_folder: ImageService, tiny_pair: tuple[Path, Path], folder: Path
) -> None:
    plain_before = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS))
    reference = picture()
    request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS,
                                image_prompts=[{"model": "tiny-ip", "image": reference, "weight": 0.8}])  # fmt: skip
    result = await with_folder.generate(request)
    expected = _hand(tiny_pair, folder, ["tiny-ip"], [0.8], request, reference)
    assert np.abs(pixels(result.images) - expected).max() <= 2.0
    assert np.abs(pixels(result.images) - pixels(plain_before.images)).max() > 10  # the reference changed it
    plain_after = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS))
    assert np.array_equal(pixels(plain_after.images), pixels(plain_before.images))  # the UNet as it was


async def test_an_ip_adapter_plus_equals_diffusers(with_folder: ImageService, tiny_pair: tuple[Path, Path],
                                                   folder: Path) -> None:  # fmt: skip
    reference = picture()
    prompts = [{"model": "tiny-ip-plus", "image": reference, "weight": 0.7}]
    request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, image_prompts=prompts)
    result = await with_folder.generate(request)
    expected = _hand(tiny_pair, folder, ["tiny-ip-plus"], [0.7], request, reference)
    assert np.abs(pixels(result.images) - expected).max() <= 2.0
    plain = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS))
    assert np.abs(pixels(result.images) - pixels(plain.images)).max() > 10  # the reference changed it


async def test_the_image_encoder_is_kept_between_runs(with_folder: ImageService,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS,
                                image_prompts=[{"model": "tiny-ip", "image": picture(), "weight": 0.8}])  # fmt: skip
    first = await with_folder.generate(request)
    loads = []
    real_load = CLIPVisionModelWithProjection.from_pretrained.__func__  # type: ignore[attr-defined]

    def counted(cls: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", classmethod(counted))
    second = await with_folder.generate(request)
    assert loads == [] and np.array_equal(pixels(first.images), pixels(second.images))


async def test_two_image_prompts_from_an_init_image(with_folder: ImageService, tiny_pair: tuple[Path, Path],
                                                    folder: Path) -> None:  # fmt: skip
    init, first, second = picture(), picture(48, 48), picture(32, 80)
    prompts = [{"model": "tiny-ip", "image": first, "weight": 0.6}, {"model": "tiny-ip-b", "image": second}]
    request = GenerationRequest(prompt=PROMPT, init_image=init, strength=0.7, **STEPS, image_prompts=prompts)
    result = await with_folder.generate(request)
    expected = _hand(tiny_pair, folder, ["tiny-ip", "tiny-ip-b"], [0.6, 1.0], request, [first, second], init)
    assert np.abs(pixels(result.images) - expected).max() <= 2.0


async def test_weight_zero_equals_no_image_prompt(with_folder: ImageService) -> None:
    plain = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS))
    zero = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, image_prompts=[
        {"model": "tiny-ip", "image": picture(), "weight": 0}]))  # fmt: skip
    assert np.abs(pixels(zero.images) - pixels(plain.images)).max() <= 2.0


async def test_unknown_and_foreign_adapters_are_refused_naming_the_field(with_folder: ImageService) -> None:
    for name, words in (("nope", "no IP-Adapter 'nope'; known: tiny-ip, tiny-ip-b"),
                        ("sd15/ip-adapter_sd15", "made for SD 1.x")):  # fmt: skip
        with pytest.raises(InvalidRequest) as caught:
            await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, image_prompts=[
                {"model": name, "image": picture()}]))  # fmt: skip
        assert caught.value.field == "image_prompts.0.model" and words in caught.value.rule
