"""LoRAs on the tiny pair: made at test time with PEFT, saved in the diffusers and Kohya layouts, and applied
as diffusers applies them (`load_lora_weights` + `set_adapters`), with nothing left behind after a run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.loras import LoraFolder
from sdxl_refinery.png import a1111_parameters, parse_parameters

from .hand_driven import PROMPT, SIZE, HandDriven

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(model: torch.nn.Module, targets: list[str], seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA of `model` with random A and B (PEFT starts B at zero), as a PEFT state dict."""
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model, adapter_name="make")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model, adapter_name="make").items()}


@pytest.fixture(scope="module")
def loras(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder: `unet_a` and `unet_b` (diffusers layout, UNet only), `unet_kohya` (Kohya layout, UNet
    only, alpha twice the rank), `full` (Kohya layout, UNet and both text encoders, alpha twice the rank),
    and `style/ink` (a copy of `unet_a` in a subfolder)."""
    folder = tmp_path_factory.mktemp("loras")
    for name, seed in (("unet_a", 1), ("unet_b", 2)):
        source = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
        layers = _random_lora(source.unet, UNET_TARGETS, seed)
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors")
    source = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    peft_layout = {f"unet.{k}": v for k, v in _random_lora(source.unet, UNET_TARGETS, 3).items()}
    for prefix, encoder in (("text_encoder", source.text_encoder), ("text_encoder_2", source.text_encoder_2)):
        peft_layout |= {f"{prefix}.{k}": v for k, v in _random_lora(encoder, TEXT_TARGETS, 4).items()}
    kohya = convert_state_dict_to_kohya(peft_layout)
    kohya = {key: torch.tensor(8.0) if key.endswith(".alpha") else value.contiguous() for key, value in kohya.items()}
    save_file(kohya, folder / "full.safetensors")
    # The Kohya layout of a UNet LoRA, alpha twice the rank (scale 2): what diffusers reads from Civitai files.
    source = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    unet_kohya = convert_state_dict_to_kohya(
        {f"unet.{k}": v for k, v in _random_lora(source.unet, UNET_TARGETS, 6).items()}
    )
    save_file({key: torch.tensor(8.0) if key.endswith(".alpha") else value.contiguous()
               for key, value in unet_kohya.items()}, folder / "unet_kohya.safetensors")  # fmt: skip
    (folder / "style").mkdir()
    (folder / "style" / "ink.safetensors").write_bytes((folder / "unet_a.safetensors").read_bytes())
    return folder


@pytest.fixture
def with_folder(service: ImageService, loras: Path, monkeypatch: pytest.MonkeyPatch) -> ImageService:
    monkeypatch.setattr(service, "lora_folder", LoraFolder(loras))
    return service


def _request(**fields: object) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "seed": 7, "num_inference_steps": 6, "refiner_steps": 3, **SIZE,
                                **fields})  # fmt: skip


async def _pixels(service: ImageService, request: GenerationRequest) -> np.ndarray:
    result = await service.generate(request)
    return np.stack([np.asarray(image, dtype=np.float64) for image in result.images])


def _hand_with(hand: HandDriven, folder: Path, weights: dict[str, float], request: GenerationRequest) -> np.ndarray:
    """diffusers as its users write it: load_lora_weights, set_adapters(names, adapter_weights), render."""
    for name in weights:
        hand.base.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
    hand.base.set_adapters(list(weights), adapter_weights=list(weights.values()))
    try:
        return hand.render(request, [7])
    finally:
        hand.base.unload_lora_weights()


async def test_a_unet_lora_gives_what_diffusers_set_adapters_gives(with_folder: ImageService, hand: HandDriven,
                                                                    loras: Path) -> None:  # fmt: skip
    request = _request(loras=[{"name": "unet_a", "weight": 0.8}])
    ours = await _pixels(with_folder, request)
    expected = _hand_with(hand, loras, {"unet_a": 0.8}, request)
    assert np.abs(ours - expected).max() <= 2.0
    assert np.abs(ours - await _pixels(with_folder, _request())).max() > 10  # the LoRA did change the image


async def test_a_kohya_layout_lora_gives_what_diffusers_gives(with_folder: ImageService, hand: HandDriven,
                                                               loras: Path) -> None:  # fmt: skip
    request = _request(loras=[{"name": "unet_kohya", "weight": 0.6}])
    expected = _hand_with(hand, loras, {"unet_kohya": 0.6}, request)
    assert np.abs(await _pixels(with_folder, request) - expected).max() <= 2.0


async def test_two_loras_at_once_with_their_weights(with_folder: ImageService, hand: HandDriven, loras: Path) -> None:
    request = _request(loras=[{"name": "unet_a", "weight": 0.8}, {"name": "unet_b", "weight": -0.5}])
    expected = _hand_with(hand, loras, {"unet_a": 0.8, "unet_b": -0.5}, request)
    assert np.abs(await _pixels(with_folder, request) - expected).max() <= 2.0


async def test_the_prompt_syntax_and_the_field_give_the_same_image(with_folder: ImageService) -> None:
    by_field = await _pixels(with_folder, _request(loras=[{"name": "style/ink", "weight": 0.7}]))
    # The tag is taken out of what the encoders see: the prompt differs only by the tag.
    by_tag = await _pixels(with_folder, _request(prompt=f"{PROMPT}<lora:style/ink:0.7>"))
    assert np.array_equal(by_field, by_tag)


async def test_with_without_with_leaves_no_residue(with_folder: ImageService) -> None:
    before = await _pixels(with_folder, _request(seed=11))
    first = await _pixels(with_folder, _request(seed=11, loras=[{"name": "full", "weight": 1.5}]))
    after = await _pixels(with_folder, _request(seed=11))
    again = await _pixels(with_folder, _request(seed=11, loras=[{"name": "full", "weight": 1.5}]))
    assert np.array_equal(before, after)  # today's pixels, bit for bit: the weights were put back, not subtracted
    assert np.array_equal(first, again) and not np.array_equal(first, before)


async def test_text_encoder_parts_apply_to_the_base_prompt_only(with_folder: ImageService) -> None:
    """A Kohya file with both text encoders: the base's prompt changes, the refiner's (shared text_encoder_2)
    is encoded as without the LoRA, since the refiner keeps its own unchanged encoder in A1111 and InvokeAI."""
    engine = with_folder._engine_sync()
    runner = engine.runner  # type: ignore[attr-defined]
    request = _request()
    (full,) = with_folder.check_loras(_request(loras=[{"name": "full", "weight": 1.0}]), allow_paths=False)

    def encode(encoder: object, pipe: object) -> torch.Tensor:
        conditioning = runner._condition(encoder, pipe, request, _NoTracker())
        return conditioning.as_kwargs()["prompt_embeds"]

    plain_base, plain_refiner = encode(runner.base_prompts, engine.pair.base), encode(runner.refiner_prompts, None)
    with runner.lora_weights.applied([full]):
        lora_base = encode(runner.base_prompts, engine.pair.base)
        with runner.lora_weights.refiner_view():
            lora_refiner = encode(runner.refiner_prompts, None)
    assert not torch.equal(plain_base, lora_base)
    assert torch.equal(plain_refiner, lora_refiner)


class _NoTracker:
    @staticmethod
    def check_cancelled() -> None:
        return None


async def test_the_png_records_lora_hashes_as_a1111_writes_them(with_folder: ImageService, loras: Path) -> None:
    result = await with_folder.generate(_request(prompt=f"{PROMPT} <lora:unet_b:0.4>", loras=[{"name": "unet_a"}]))
    text = a1111_parameters(result.metadata())
    (line,) = [part for part in text.splitlines()[-1].split(", Lora hashes: ")[1:]]
    hashes = json.loads(line.split('", ')[0] + '"') if line.startswith('"') else line
    names = LoraFolder(loras).check([*result.request.all_loras], allow_paths=False, context_width=None)
    assert hashes == ", ".join(f"{file.name}: {file.short_hash}" for file in names)
    assert all(len(file.short_hash) == 12 for file in names)
    # The recorded prompt keeps its tag; the field's LoRA follows as a tag, so A1111 applies both from the text.
    assert text.splitlines()[0] == f"{PROMPT} <lora:unet_b:0.4> <lora:unet_a:1>"
    read_back = GenerationRequest(**parse_parameters(text))
    assert sorted(read_back.all_loras, key=str) == sorted(result.request.all_loras, key=str)


def _fake_lora(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, path)
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda folder: None, "no such LoRA"),
        (
            lambda folder: _fake_lora(
                folder / "x.safetensors",
                {
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4),
                },
            ),
            "made for SD 1.x",
        ),
        (
            lambda folder: _fake_lora(folder / "x.safetensors", {"lora_unet_mid_block_attn1_to_q.hada_w1_a": (4, 4)}),
            "LyCORIS LoHa files are not supported",
        ),
        (lambda folder: (folder / "x.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}"), "not a readable"),
        (
            lambda folder: (folder / "x.safetensors").write_bytes(
                (full := (folder.parent / "full.safetensors").read_bytes())[: len(full) // 2]
            ),
            "truncated",
        ),
    ],
    ids=["unknown", "sd15", "lycoris", "garbage", "truncated"],
)
async def test_bad_loras_are_refused_naming_them_before_any_work(
    service: ImageService, loras: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object, said: str
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder.parent / "full.safetensors").write_bytes((loras / "full.safetensors").read_bytes())
    make(folder)  # type: ignore[operator]
    monkeypatch.setattr(service, "lora_folder", LoraFolder(folder))
    with pytest.raises(InvalidRequest) as caught:
        await service.generate(_request(loras=[{"name": "x", "weight": 1.0}]))
    assert caught.value.field == "loras" and "loras[0] x" in caught.value.rule and said in caught.value.rule


def test_weights_outside_minus_five_to_five_and_pickles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest(prompt="a <lora:ink:6>")
    assert caught.value.field == "prompt" and "-5..5" in caught.value.rule
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest(prompt="a", loras=[{"name": "ink", "weight": -5.5}])
    assert caught.value.field.startswith("loras")
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(InvalidRequest) as caught:
        LoraFolder(None).check([GenerationRequest(prompt="a", loras=[{"name": str(pickled)}]).loras[0]], True)
    assert "no such LoRA" in caught.value.rule  # a .pt path is never opened as a LoRA


async def test_fused_qkv_engines_take_their_projections_apart_for_loras(
    tiny_pair: tuple[Path, Path], hand: HandDriven, loras: Path
) -> None:
    """CUDA's speed plan fuses q, k and v into one projection; a LoRA changes them one by one, so the engine
    takes the fusion apart (forced on here, on CPU) and the image is still diffusers' own."""
    from sdxl_refinery.options import SpeedOptions

    fused = ImageService(str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", precision="full",
                         speed=SpeedOptions(fused_qkv="on"), lora_dir=loras)  # fmt: skip
    try:
        await fused.load()
        assert "fused-qkv" in fused.describe()["optimizations"]
        request = _request(loras=[{"name": "unet_a", "weight": 0.8}])
        expected = _hand_with(hand, loras, {"unet_a": 0.8}, request)
        assert np.abs(await _pixels(fused, request) - expected).max() <= 2.0
        assert "fused-qkv" not in fused.describe()["optimizations"]
    finally:
        fused.close()


async def test_text_encoder_parts_equal_their_weights_merged_by_hand(with_folder: ImageService, hand: HandDriven,
                                                                      loras: Path) -> None:  # fmt: skip
    """The Kohya file's text-encoder parts against an independent reading of the same file: each layer's
    W + weight * alpha / rank * up @ down, merged into a copy of diffusers' own encoders. (diffusers' own
    text-encoder loader goes through transformers, which asks for a newer PEFT than the registries hold.)"""
    import copy

    from safetensors.torch import load_file

    engine = with_folder._engine_sync()
    (full,) = with_folder.check_loras(_request(loras=[{"name": "full", "weight": 0.7}]), allow_paths=False)
    tensors = load_file(loras / "full.safetensors")
    ids = hand.base.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    for prefix, name in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        merged = copy.deepcopy(getattr(hand.base, name))
        modules = {prefix + path.replace(".", "_"): module for path, module in merged.named_modules()}
        touched = 0
        with torch.no_grad():
            for key in [key for key in tensors if key.startswith(prefix) and key.endswith(".lora_down.weight")]:
                stem = key.removesuffix(".lora_down.weight")
                down, up = tensors[key], tensors[f"{stem}.lora_up.weight"]
                scale = 0.7 * float(tensors[f"{stem}.alpha"]) / down.shape[0]
                modules[stem].weight += scale * up @ down
                touched += 1
            expected = merged(ids, output_hidden_states=True).hidden_states[-2]
            with engine.runner.lora_weights.applied([full]):  # type: ignore[attr-defined]
                ours = getattr(engine.pair.base, name)(ids, output_hidden_states=True).hidden_states[-2]  # type: ignore[attr-defined]
        assert touched == 12  # q, k, v and out of each of the tiny encoder's three layers
        assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4), (name, (ours - expected).abs().max())  # rounding


async def test_the_adapter_cache_is_bounded_and_drops_the_least_recently_used(
    with_folder: ImageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft.tuners.lora import LoraLayer

    weights = with_folder._engine_sync().runner.lora_weights  # type: ignore[attr-defined]
    monkeypatch.setattr(weights, "capacity", 2)
    for adapter in weights.loaded():  # what earlier tests left: start from an empty cache
        weights._drop(adapter)
    files = with_folder.check_loras(_request(loras=[{"name": name} for name in ("unet_a", "unet_b", "unet_kohya")]),
                                    allow_paths=False)  # fmt: skip
    adapters = [weights.load(file) for file, _ in files]
    assert weights.loaded() == adapters[1:]  # the oldest went first
    layers = [module for module in weights.base.unet.modules() if isinstance(module, LoraLayer)]
    assert layers and not any(adapters[0] in layer.lora_A for layer in layers)
    assert all(adapters[2] in layer.lora_A for layer in layers)
    # A dropped LoRA comes back on its next use, and the image is what it was.
    request = _request(loras=[{"name": "unet_a", "weight": 0.8}])
    first = await _pixels(with_folder, request)
    assert np.array_equal(first, await _pixels(with_folder, request))


async def test_compiled_unets_refuse_loras_before_any_work(with_folder: ImageService,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Compiled graphs hold the weights they were compiled with: a LoRA would be silently left out."""
    import dataclasses

    engine = with_folder._engine_sync()
    monkeypatch.setattr(engine, "speed", dataclasses.replace(engine.speed, compile_mode="frozen"))  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest) as caught:
        await with_folder.generate(_request(loras=[{"name": "unet_a"}]))
    assert caught.value.field == "loras" and "compiled" in caught.value.rule
    assert (await with_folder.generate(_request())).images  # without LoRAs it still runs


async def test_without_room_for_fused_copies_the_lora_runs_as_extra_layers(
    with_folder: ImageService, hand: HandDriven, loras: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from sdxl_refinery.engine import lora_weights

    monkeypatch.setattr(lora_weights, "free_bytes", lambda device: 1024)  # almost no free memory
    request = _request(loras=[{"name": "unet_a", "weight": 0.8}])
    expected = _hand_with(hand, loras, {"unet_a": 0.8}, request)
    assert np.abs(await _pixels(with_folder, request) - expected).max() <= 2.0
    assert "LoRA weights not fused" in caplog.text


def test_offloaded_weights_are_not_fused() -> None:
    """Under an offloading memory plan the UNet's weights sit on the meta device between uses: nothing to add
    a LoRA to, so it runs as extra layers."""
    from types import SimpleNamespace

    from sdxl_refinery.engine.lora_weights import LoraWeights

    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model, adapter_name="a")
    parts = SimpleNamespace(unet=model, text_encoder=torch.nn.Module(), text_encoder_2=torch.nn.Module())
    assert LoraWeights(parts)._fused_copies_fit({"a": 1.0})  # type: ignore[arg-type]
    model.to("meta")
    assert not LoraWeights(parts)._fused_copies_fit({"a": 1.0})  # type: ignore[arg-type]


async def test_a_lora_whose_shapes_fit_no_layer_is_refused_and_leaves_nothing(
    with_folder: ImageService, loras: Path
) -> None:
    """Self-attention only (so the header tells no architecture), but sized for another model: the load
    fails naming the LoRA, no half-loaded adapter stays, and the next run is unharmed."""
    layer = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, 1280), f"{layer}.lora_B.weight": torch.zeros(1280, 4)},
              loras / "wrong_size.safetensors")  # fmt: skip
    weights = with_folder._engine_sync().runner.lora_weights  # type: ignore[attr-defined]
    before = weights.loaded()
    with pytest.raises(InvalidRequest) as caught:
        await with_folder.generate(_request(loras=[{"name": "wrong_size"}]))
    assert caught.value.field == "loras" and "wrong_size: its weights do not fit" in caught.value.rule
    assert weights.loaded() == before
    assert (await with_folder.generate(_request(loras=[{"name": "unet_a"}]))).images
